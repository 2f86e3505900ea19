"""prefsift ablate on tiny models: 2 rules x 1 seed, a few steps, a small held-out set. One row per (rule,
seed) with win rates in [0, 1] inside their CIs, the page and curves written, and a rerun that skips every
selection, training and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from operators.base import InputError
from pipelines import ablate, curate
from pipelines.ablate import AblateConfig, cells, table_text, validate
from pipelines.runtime.config import ConfigError, CurateConfig, from_dict

DATA = Path(__file__).resolve().parents[2] / "pipelines" / "data"


def ablate_config(run_dir: Path, tiny_models: dict[str, str], **over) -> AblateConfig:
    data = {
        "run_dir": str(run_dir),
        "fraction": 0.5,
        "rules": [{"rule": "pvar_top"}, {"rule": "random"}],
        "losses": ["sigmoid"],
        "seeds": [0],
        "train": {
            "input": {"max_length": 128, "max_prompt_length": 64},
            "model": {"policy": tiny_models["policy"]},
            "reference": {"num_cpus": 0.5, "batch_size": 16, "micro_batch_size": 8},
            "loss": {"beta": 0.1},
            "optim": {"lr": 1e-3, "max_steps": 2, "per_device_batch_size": 4},
            "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
            "checkpoint": {"every_n_steps": 0, "keep": 1},
        },
        "evaluate": {
            "run": {"seed": 1},
            "input": {"path": str(DATA / "arena_hard_heldout_50.jsonl.gz"), "limit": 6},
            "generate": {"backend": "hf", "num_samples": 2, "max_tokens": 6, "max_model_len": 256,
                         "num_cpus": 0.5},
            # hf: a vLLM pooling engine per evaluation stage costs more than its 12 samples (test_score has it)
            "score": {"models": [{"path": tiny_models["reward_multi"]}], "backend": "hf", "num_cpus": 0.5},
            "bootstrap": 200,
        },
        "ray": {"num_cpus": 2, "object_store_memory_gb": 1.0, "progress": False},
        **over,
    }
    return from_dict(AblateConfig, data)


@pytest.fixture(scope="module")
def rated_run(ray_local, tmp_path_factory) -> Path:
    """A curation run folder over 24 rated UltraFeedback prompts: stats/ without generating or scoring."""
    out = tmp_path_factory.mktemp("ablate_run")
    cfg = from_dict(CurateConfig, {
        "input": {"path": str(DATA / "ultrafeedback_binarized_sample_300.jsonl.gz"), "limit": 24},
        "output": {"dir": str(out)}, "select": {"rule": "pvar_top", "fraction": 0.5},
        "ray": {"num_cpus": 2, "object_store_memory_gb": 1.0, "progress": False}})
    curate.main(cfg)
    return out


def test_config_is_checked_before_ray(tmp_path, tiny_models):
    (tmp_path / "stats").mkdir()
    (tmp_path / "stats" / "_SUCCESS").write_text("x")
    cfg = ablate_config(tmp_path, tiny_models)
    validate(cfg)
    assert [c.name for c in cells(cfg)] == ["pvar_top-sigmoid-s0", "random-sigmoid-s0"]
    with pytest.raises(ConfigError, match="fraction and count: set exactly one"):
        validate(ablate_config(tmp_path, tiny_models, count=4))
    with pytest.raises(ConfigError, match="rules\\[0\\].rule: 'pvar_tpo' is not allowed; did you mean 'pvar_top'"):
        validate(ablate_config(tmp_path, tiny_models, rules=[{"rule": "pvar_tpo"}]))
    with pytest.raises(ConfigError, match="two rules share a label"):
        validate(ablate_config(tmp_path, tiny_models, rules=[{"rule": "random"}, {"rule": "random"}]))
    mixed = ablate_config(tmp_path, tiny_models, rules=[
        {"rule": "pvar_top"}, {"rule": "margin_curriculum", "sft_quantile": 0.25, "losses": ["mixdpo"]}],
        seeds=[0, 1])
    assert [c.name for c in cells(mixed)] == ["pvar_top-sigmoid-s0", "pvar_top-sigmoid-s1",
                                              "margin_curriculum-mixdpo-s0", "margin_curriculum-mixdpo-s1"]
    with pytest.raises(FileNotFoundError, match="no complete stats/"):
        validate(ablate_config(tmp_path / "nowhere", tiny_models))


@pytest.mark.slow
def test_ablation_table_and_rerun_skips(rated_run, tiny_models, capsys):
    cfg = ablate_config(rated_run, tiny_models)
    first = ablate.main(cfg)
    rows = first["table"]
    assert [(r["rule"], r["seed"]) for r in rows] == [("pvar_top", 0), ("random", 0)]
    n_stats = pq.read_table(rated_run / "stats").num_rows
    for r in rows:
        lo, hi = r["ci95"]
        assert 0.0 <= lo <= r["win_rate"] <= hi <= 1.0
        assert r["prompts"] >= 1 and r["steps"] == 2
        # the same budget for every rule: half of the prompts, as pairs (a prompt may have no pair)
        sel = pq.read_table(rated_run / "ablate" / f"{r['rule']}-s0" / "selection").to_pylist()
        assert sum(bool(s["selected"]) for s in sel) == int(0.5 * n_stats + 0.5)
        assert 0 < r["pairs"] <= int(0.5 * n_stats + 0.5)
    # The two rules trained on different pairs (pvar_top vs random differ on 24 prompts), each its own folder.
    pairs = [set(pq.read_table(rated_run / "ablate" / f"{r['rule']}-s0" / "pairs").column("prompt_id").to_pylist())
             for r in rows]
    assert pairs[0] != pairs[1]
    report = rated_run / "report"
    page = (report / "ablate.html").read_text()
    assert "pvar_top" in page and "random" in page and f"{rows[0]['win_rate']:.3f}" in page
    assert (report / "ablate_training.png").stat().st_size > 0
    assert json.loads((report / "ablate.json").read_text()) == json.loads(json.dumps(rows))
    assert table_text(rows).count("\n") == 1 + len(rows)
    ledger = json.loads((rated_run / "ablate" / "cells.json").read_text())
    assert sorted(ledger) == ["pvar_top-sigmoid-s0/evaluate", "pvar_top-sigmoid-s0/train",
                              "random-sigmoid-s0/evaluate", "random-sigmoid-s0/train"]
    metrics = {r["rule"]: (Path(r["train_dir"]) / "train" / "metrics.jsonl").stat().st_mtime_ns for r in rows}

    capsys.readouterr()
    second = ablate.main(cfg)
    log = capsys.readouterr().err
    assert second["table"] == rows
    assert log.count("trained already, skipped") == 2 and log.count("evaluated already, skipped") == 2
    assert log.count("stage selection: complete") == 2 and log.count("stage pairs: complete") == 2
    assert "train: done" not in log and "stage eval_" not in log
    assert {r["rule"]: (Path(r["train_dir"]) / "train" / "metrics.jsonl").stat().st_mtime_ns
            for r in rows} == metrics



def test_a_rule_that_leaves_no_pair_is_named_before_training(ray_local, tiny_models, tmp_path):
    """8 unlabelled prompts, 3 rated responses each; 4 rated 5, 5, 5 (PVar 0: nothing to prefer). pvar_bottom
    at a budget of 4 keeps exactly those, so its cell has no pair: a one-line InputError naming the cell, not
    a failure inside a Ray Train worker."""
    rows = [{"prompt_id": f"p{i}", "prompt": f"question {i}?",
             "responses": [{"text": f"answer {j} to {i}", "overall": 5.0 if i < 4 else float(4 * j + 1)}
                           for j in range(3)]} for i in range(8)]
    src = tmp_path / "rated.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    curate.main(from_dict(CurateConfig, {
        "input": {"path": str(src)}, "output": {"dir": str(run)}, "select": {"rule": "pvar_top", "fraction": 0.5},
        "ray": {"num_cpus": 2, "object_store_memory_gb": 1.0, "progress": False}}))
    cfg = ablate_config(run, tiny_models, fraction=None, count=4, rules=[{"rule": "pvar_bottom"}])
    with pytest.raises(InputError, match=r"^ablate pvar_bottom-sigmoid-s0: rule pvar_bottom keeps 4 prompts at this "
                                         r"budget and none .* leaves no pair to train on"):
        ablate.main(cfg)
    assert not (run / "ablate" / "pvar_bottom-sigmoid-s0" / "train").exists()
