"""pipelines.evaluate: the win-rate math by hand, and a real run (Ray Data, HF generation, RM judge)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipelines import evaluate
from pipelines.runtime.config import from_dict


def test_win_rate_ci_by_hand():
    rate, lo, hi = evaluate.win_rate_ci(np.array([1.0, 0.0, 0.5, 1.0]), n_boot=500, seed=0)
    assert rate == pytest.approx(0.625)
    assert 0.0 <= lo <= rate <= hi <= 1.0 and hi - lo > 0.2
    assert evaluate.win_rate_ci(np.ones(7)) == (1.0, 1.0, 1.0)  # no spread, no interval
    assert all(math.isnan(x) for x in evaluate.win_rate_ci(np.array([])))


def test_paired_wins_pairs_by_prompt_and_sample():
    policy = {("a", 0): 2.0, ("a", 1): 0.0, ("b", 0): 1.0, ("c", 0): 5.0}
    reference = {("a", 0): 1.0, ("a", 1): 0.0, ("b", 0): 3.0}  # c has no reference sample: not compared
    assert evaluate.paired_wins(policy, reference).tolist() == [0.75, 0.0]  # a: win + tie; b: loss


def test_sample_rewards_reads_scored_prompt_rows():
    rows = [{"prompt_id": "a", "responses": [{"sample_idx": 0, "overall": 1.5, "problem": None},
                                             {"sample_idx": 1, "overall": None, "problem": "non_finite_reward"}]},
            {"prompt_id": "b", "responses": [{"sample_idx": 1, "overall": -2.0, "problem": None}]},
            {"prompt_id": "c", "responses": None}]
    assert evaluate.sample_rewards(rows) == {("a", 0): 1.5, ("b", 1): -2.0}  # a's sample 1 has no reward


def test_evaluate_same_model_ties_everywhere_and_balances(ray_local, tiny_models, tmp_path):
    """Policy = reference with the same per-sample seeds gives the same samples, so every pair ties: the win
    rate is exactly 0.5 with a zero-width interval. Quarantined input rows are counted, not generated."""
    rows = [{"prompt_id": f"h{i}", "prompt": f"Question {i}: name a colour."} for i in range(5)]
    rows += [{"prompt_id": "dup", "prompt": "one"}, {"prompt_id": "dup", "prompt": "two"}, {"prompt_id": "e", "prompt": " "}]
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = from_dict(evaluate.EvaluateConfig, {
        "input": {"path": str(path)}, "output": {"dir": str(tmp_path / "eval")},
        "policy": tiny_models["policy"], "reference": tiny_models["policy"],
        "generate": {"backend": "hf", "num_samples": 2, "max_tokens": 8, "max_model_len": 256, "num_cpus": 0.5},
        "score": {"models": [{"path": tiny_models["reward"]}], "backend": "hf", "num_cpus": 0.5},
        "bootstrap": 200, "ray": {"progress": False},
    })
    summary = evaluate.main(cfg)
    assert summary["prompts"] == 5 and summary["samples_per_prompt"] == 2
    assert (summary["win_rate"], *summary["ci95"]) == (0.5, 0.5, 0.5)
    assert summary["mean_reward_policy"] == summary["mean_reward_reference"]
    manifest = json.loads((tmp_path / "eval" / "manifest.json").read_text())
    for stage in ("eval_policy", "eval_reference"):
        s = manifest["stages"][stage]
        assert s["rows_in"] == 8 and s["rows_out"] == 5  # prompt rows, 2 scored samples each
        assert s["quarantined"] == {"conflicting_duplicate_prompt_id": 2, "empty_prompt": 1}
        assert s["balanced"]
    assert json.loads((tmp_path / "eval" / "eval_summary.json").read_text())["win_rate"] == 0.5
