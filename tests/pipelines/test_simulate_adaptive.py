"""`prefsift simulate-adaptive`: the replay on crafted rewards where the answer is known, and the console script."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from operators.adaptive import AdaptiveCfg
from pipelines.tools.simulate_adaptive import (
    SimulateCfg,
    isotonic,
    oracle_rule,
    oracle_thresholds,
    read_rewards,
    settings,
    simulate,
    standard_error,
)

REPO = Path(__file__).resolve().parents[2]
PREFSIFT = Path(sys.executable).with_name("prefsift")
ARENA_100 = REPO / "tests" / "data" / "arena_bench_v1_gpt4_single_100.jsonl.gz"


def write_rated(path: Path, extra_lines: tuple[str, ...] = ()) -> Path:
    """20 prompts x 8 responses: 2 with rewards 0, 10, ..., 70 (every pair's p near 0 or 1: PVar near 1/4
    from any 2 of them), 18 with all rewards 5 (PVar 0 from any subset). fraction 0.1 selects 2: the two."""
    rows = []
    for g in range(20):
        rewards = [10.0 * i for i in range(8)] if g in (3, 11) else [5.0] * 8
        rows.append({"prompt_id": f"p{g:02d}", "prompt": f"prompt {g}",
                     "responses": [{"text": f"r{i}", "overall": r, "scores": {"q": r}} for i, r in enumerate(rewards)]})
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


BAD_LINES = (
    "{not json",
    json.dumps({"prompt_id": "one", "responses": [{"text": "a", "overall": 1.0}, {"text": "b", "overall": None}]}),
    json.dumps({"prompt_id": "nolist", "responses": "x"}),
)


def test_read_rewards_sets_aside_and_counts(tmp_path):
    data = read_rewards(str(write_rated(tmp_path / "r.jsonl.gz", BAD_LINES)))
    assert data.counts.tolist() == [8] * 20
    assert dict(data.skipped) == {"prompt: invalid_json": 1, "prompt: fewer_than_2_valid_rewards": 1,
                                  "response: no_finite_overall": 1, "prompt: no_responses_list": 1}


def test_ucb_stops_the_flat_prompts_after_the_first_round(tmp_path):
    # The 18 flat prompts have estimate 0 and jackknife se 0 at k0 = 4; the two spread ones' se is ~0,
    # so the pooled bound of a flat prompt stays below the cut (the lower spread prompt's estimate) and it
    # stops; the spread ones draw to 8. Share = (2 * 8 + 18 * 4) / 160 = 0.55 in every draw order.
    data = read_rewards(str(write_rated(tmp_path / "r.jsonl.gz")))
    res = simulate(data, AdaptiveCfg(rule="ucb", k0=4, step=2, z=1.0), repeats=3, seed=0)
    assert res["sample_share"] == pytest.approx(0.55, abs=1e-12)
    assert res["recall"] == res["recall_strict"] == 1.0
    assert res["sample_share_sd"] == res["recall_sd"] == 0.0  # the same in every draw order
    assert res["sample_share_se"] == res["recall_se"] == 0.0
    assert res["rounds"] == 3  # 4 -> 6 -> 8, then the cap


def test_z_in_stops_the_sure_prompts_and_reports_the_pairs_margin(tmp_path):
    # Without z_in the two spread prompts draw all 8 (0, 10, ..., 70): margin 70 with or without adaptive
    # sampling. z_in 0 stops every prompt whose estimate is at or above the cut, so both spread prompts stop
    # at k0 4 with the flat ones: share 80 / 160, both still selected (recall 1), both stopped early, and
    # each pair's margin is the range of 4 of its 8 rewards (at least 30, below 70 unless 0 and 70 are drawn).
    data = read_rewards(str(write_rated(tmp_path / "r.jsonl.gz")))
    full = simulate(data, AdaptiveCfg(rule="ucb", k0=4, step=2, z=1.0), repeats=3, seed=0)
    assert full["margin"] == full["margin_full"] == 70.0 and full["stopped_early"] == 0.0
    res = simulate(data, AdaptiveCfg(rule="ucb", k0=4, step=2, z=1.0, z_in=0.0), repeats=3, seed=0)
    assert res["sample_share"] == pytest.approx(0.5, abs=1e-12)
    assert res["recall"] == 1.0 and res["rounds"] == 1 and res["stopped_early"] == 1.0
    assert res["margin_full"] == 70.0 and 30.0 <= res["margin"] < 70.0


def test_standard_error_by_hand():
    # [0.8, 0.9, 1.0]: mean 0.9, squared deviations 0.01 + 0 + 0.01, sample variance 0.02 / 2 = 0.01,
    # sd 0.1, se 0.1 / sqrt(3) = 0.057735; one draw order has none.
    assert standard_error([0.8, 0.9, 1.0]) == pytest.approx(0.1 / 3 ** 0.5, abs=1e-12)
    assert standard_error([0.7, 0.7]) == 0.0
    assert standard_error([0.9]) is None


def test_rank_halves_the_prompts_in_play_each_round(tmp_path):
    # keep 0.5, k0 4, step 2, cap 8: 20 in play -> 10 continue to 6 -> 5 continue to 8 (the two spread
    # prompts always among them). Drawn: 10 * 4 + 5 * 6 + 5 * 8 = 110 of 160.
    data = read_rewards(str(write_rated(tmp_path / "r.jsonl.gz")))
    res = simulate(data, AdaptiveCfg(rule="rank", keep=0.5, k0=4, step=2), repeats=2, seed=1)
    assert res["sample_share"] == pytest.approx(110 / 160, abs=1e-12)
    assert res["recall"] == 1.0
    assert res["recall_even"] == 1.0  # 5 or 6 samples of a spread prompt still beat PVar 0


def test_adaptive_beats_the_even_budget_on_real_ratings():
    # 100 Arena-Bench prompts with 13-16 GPT-4 ratings each: the even spread of the same samples is the
    # baseline that adaptive sampling must beat.
    data = read_rewards(str(ARENA_100))
    assert data.counts.size == 100
    res = simulate(data, AdaptiveCfg(rule="ucb", k0=4, step=4, z=1.0), repeats=10, seed=0)
    assert 0.3 < res["sample_share"] < 0.9
    assert res["recall"] > res["recall_even"]


def test_isotonic_pools_adjacent_violators():
    assert isotonic(np.array([1.0, 3.0, 2.0, 4.0]), np.ones(4)).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert isotonic(np.array([3.0, 1.0]), np.array([1.0, 3.0])).tolist() == [1.5, 1.5]  # (3 + 3) / 4
    assert isotonic(np.array([2.0, 1.0, 0.0]), np.ones(3)).tolist() == [1.0, 1.0, 1.0]


def test_oracle_thresholds_and_replay_on_crafted_rewards(tmp_path):
    # Every m-sample estimate of a flat prompt is 0 (never selected), of a spread prompt positive (always
    # selected): P(selected | m, estimate) is 0 at 0 and 1 above it, so at any alpha the threshold is the
    # lowest spread estimate over the draws, a mean of pair terms h(d) with d >= 10, so in [h(10), 1/4); the
    # rule stops the 18 flat prompts at k0 and draws the two to the cap, as ucb does: share 0.55, recall 1.
    data = read_rewards(str(write_rated(tmp_path / "r.jsonl.gz")))
    cfg = AdaptiveCfg(k0=4, step=2)
    bars = oracle_thresholds(data, cfg, alpha=0.5, draws=20, seed=0)
    assert sorted(bars) == [4, 6]  # the counts a round sees below the cap of 8
    h10 = (1 / (1 + np.exp(-10.0)) - 0.5) ** 2
    assert all(h10 - 1e-12 <= b < 0.25 for b in bars.values())
    res = simulate(data, cfg, repeats=3, seed=0, rule=oracle_rule(bars))
    assert res["sample_share"] == pytest.approx(0.55, abs=1e-12)
    assert res["recall"] == 1.0 and res["rounds"] == 3


def test_oracle_on_real_ratings_is_monotone_in_alpha():
    # a larger alpha stops more prompts: fewer samples, thresholds no lower at every m
    data = read_rewards(str(ARENA_100))
    cfg = AdaptiveCfg(k0=4, step=4)
    lo, hi = (oracle_thresholds(data, cfg, alpha=a, draws=20, seed=0) for a in (0.05, 0.3))
    assert sorted(lo) == sorted(hi) == [4, 8, 12]
    assert all(hi[m] >= lo[m] for m in lo)
    shares = [simulate(data, cfg, repeats=3, seed=0, rule=oracle_rule(b))["sample_share"] for b in (lo, hi)]
    assert shares[0] > shares[1]


def test_pinned_keys_replace_their_grid_dimension():
    cfg = SimulateCfg(adaptive=AdaptiveCfg(rule="ucb", z=2.0, step=3))
    pinned = settings(cfg, {"rule", "step"})
    assert {(s.rule, s.step) for s in pinned} == {("ucb", 3)}
    assert sorted(s.z for s in pinned) == sorted(cfg.grid.z)  # z not pinned: the grid's values
    full = settings(SimulateCfg(), set())
    assert {s.rule for s in full} == set(SimulateCfg().grid.rule)
    assert all(s.keep == AdaptiveCfg().keep for s in full if s.rule != "rank")
    # a pinned z_in reaches the rules that read z; rank, which would refuse it, runs without
    both = settings(SimulateCfg(adaptive=AdaptiveCfg(z_in=2.0)), {"z_in"})
    assert {(s.rule, s.z_in) for s in both} == {("rank", None), ("ucb", 2.0)}


def test_console_script_prints_one_json_line_per_setting(tmp_path):
    path = write_rated(tmp_path / "r.jsonl.gz", BAD_LINES)
    out = subprocess.run([str(PREFSIFT), "simulate-adaptive", "--input", str(path), "repeats=2",
                          "adaptive.k0=4", "grid.step=[2,4]", "adaptive.rule=ucb", "adaptive.z=1"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "skipped: 1 prompt: fewer_than_2_valid_rewards, 1 prompt: invalid_json" in out.stdout
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [(r["rule"], r["k0"], r["step"]) for r in rows] == [("ucb", 4, 2), ("ucb", 4, 4)]
    for r in rows:
        assert {"recall", "recall_strict", "sample_share", "recall_even", "repeats", "rounds", "z", "z_in",
                "margin", "margin_full", "stopped_early"} <= set(r)
        assert r["repeats"] == 2 and r["recall"] == 1.0
    assert rows[0]["sample_share"] == pytest.approx(0.55, abs=1e-12)


def test_oracle_rows_follow_the_rules_rows(tmp_path, capsys):
    from pipelines.tools.simulate_adaptive import main

    path = write_rated(tmp_path / "r.jsonl.gz")
    assert main(["--input", str(path), "repeats=2", "adaptive.rule=ucb", "adaptive.k0=4", "adaptive.step=2",
                 "adaptive.z=1", "oracle=[0.5]", "oracle_draws=5"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["rule"], r.get("alpha")) for r in rows] == [("ucb", None), ("oracle", 0.5)]
    assert rows[1]["sample_share"] == pytest.approx(0.55, abs=1e-12) and rows[1]["recall"] == 1.0
    assert "oracle alpha=0.5" in out
    assert main(["--input", str(path), "oracle=[0]"]) == 2
    assert "oracle: 0" in capsys.readouterr().err


def test_console_script_names_a_bad_key(tmp_path):
    path = write_rated(tmp_path / "r.jsonl.gz")
    out = subprocess.run([str(PREFSIFT), "simulate-adaptive", "--input", str(path), "adaptive.rule=bandit"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 2
    assert "adaptive.rule" in out.stderr and "bandit" in out.stderr
    out = subprocess.run([str(PREFSIFT), "simulate-adaptive", "--input", str(tmp_path / "none.jsonl")],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 2 and "none.jsonl" in out.stderr


def test_config_file_pins_keys_and_overrides_win(tmp_path, capsys):
    from pipelines.tools.simulate_adaptive import main

    path = write_rated(tmp_path / "r.jsonl.gz")
    cfg = tmp_path / "sim.yaml"
    cfg.write_text("repeats: 1\nadaptive:\n  rule: rank\n  keep: 0.5\n  step: 2\n", encoding="utf-8")
    assert main(["--input", str(path), "--config", str(cfg), "adaptive.k0=4"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["rule"], r["keep"], r["k0"], r["step"], r["repeats"]) for r in rows] == [("rank", 0.5, 4, 2, 1)]
    assert rows[0]["sample_share"] == pytest.approx(110 / 160, abs=1e-12)  # as in the rank test above
    cfg.write_text("adaptive:\n  kepp: 0.5\n", encoding="utf-8")
    assert main(["--input", str(path), "--config", str(cfg)]) == 2
    assert "adaptive.kepp" in capsys.readouterr().err
