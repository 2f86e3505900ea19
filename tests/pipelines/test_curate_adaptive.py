"""generate.adaptive: rounds of sampling inside curation against a full run with the same seed, on tiny
models (HF backend), and the round helpers on hand-built Arrow tables."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.generate import N_TARGET, SAMPLE_START
from pipelines import curate
from pipelines.runtime.config import ConfigError, CurateConfig, from_dict, load_yaml
from pipelines.runtime.rounds import PRIOR, adaptive_cfg, merge_prior, to_next_round

K = 6  # generate.num_samples: the cap a prompt that keeps drawing reaches (2 -> 4 -> 6)


def config(out, tiny_models, adaptive: dict | None, **select) -> CurateConfig:
    data = load_yaml("pipelines/configs/demo_cpu.yaml")["curate"]
    data["input"]["limit"] = 10
    data["generate"].update(model=tiny_models["policy"], num_samples=K, max_tokens=10, max_model_len=256)
    if adaptive is not None:
        data["generate"]["adaptive"] = adaptive
    data["score"]["models"] = [{"path": tiny_models["reward_multi"]}]
    data["stats"]["length_debias"] = "none"
    data["select"] = {"rule": "pvar_top", "fraction": 0.25, **select}
    data["output"] = {"dir": str(out)}
    data["ray"]["progress"] = False
    return from_dict(CurateConfig, data)


RANK = {"rule": "rank", "k0": 2, "step": 2, "keep": 0.5}


@pytest.fixture(scope="module")
def runs(ray_local, tiny_models, tmp_path_factory):
    ada, full = tmp_path_factory.mktemp("adaptive"), tmp_path_factory.mktemp("full")
    cfg = config(ada, tiny_models, RANK)
    curate.main(cfg)
    curate.main(config(full, tiny_models, None))
    return ada, full, cfg


def rows(path):
    return {r["prompt_id"]: r for r in pq.read_table(path).to_pylist()}


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.slow
def test_prompts_at_k_max_match_a_full_run(runs):
    ada, full, _ = runs
    a_stats, f_stats = rows(ada / "stats"), rows(full / "stats")
    assert set(a_stats) == set(f_stats)
    capped = [p for p, s in a_stats.items() if s["n"] == K]
    assert 0 < len(capped) < len(a_stats)  # some prompts stopped early, some drew all K
    for p in capped:
        for col in ("n", "reward_mean", "pvar", "margin"):
            assert a_stats[p][col] == pytest.approx(f_stats[p][col], rel=1e-6, abs=1e-6), (p, col)
    # every sample both runs drew is the same sample: text, seed and reward
    a_scored, f_scored = rows(ada / "scored"), rows(full / "scored")
    for p, row in a_scored.items():
        mine = row["responses"]
        theirs = f_scored[p]["responses"][:len(mine)]
        assert [r["sample_idx"] for r in mine] == list(range(len(mine)))
        assert [(r["text"], r["seed"]) for r in mine] == [(r["text"], r["seed"]) for r in theirs]
        assert [r["overall"] for r in mine] == pytest.approx([r["overall"] for r in theirs], rel=1e-6, abs=1e-6)
        assert a_stats[p]["n"] == len(mine)


@pytest.mark.slow
def test_manifest_counts_rounds_and_balances(runs):
    ada, full, _ = runs
    m = manifest(ada)
    for name, s in m["stages"].items():
        assert s["rows_in"] == s["rows_out_as_input"] + sum(s["quarantined"].values()), name
    ad = m["adaptive"]
    served = m["stages"]["round_0"]["rows_out"]
    # rank keep 0.5 from k0 2 by step 2 to 6: every served prompt draws 2, half of them 2 more, half of
    # those the last 2 (Budget's round-half-up of 0.5 * prompts in play)
    second = int(served * 0.5 + 0.5)
    third = int(second * 0.5 + 0.5)
    assert [r["prompts"] for r in ad["rounds"]][1:] == [second, third]
    assert [r["samples"] for r in ad["rounds"]] == [2 * served, 2 * second, 2 * third]
    assert ad["samples_generated"] == 2 * (served + second + third) < ad["samples_full_run"] == K * served
    assert ad["prompts_at_k_max"] == third
    assert m["stages"]["scored"]["rows_out"] == served
    assert m["stages"]["stats"]["rows_in"] == ad["samples_generated"]  # responses into the statistics
    f = manifest(full)
    assert f["stages"]["stats"]["rows_in"] == ad["samples_full_run"]
    assert {f"round_{r}" for r in range(3)} <= set(m["stages"]) and "round_3" not in m["stages"]


@pytest.mark.slow
def test_rerun_skips_completed_rounds(runs, capsys):
    ada, _, cfg = runs
    marks = {r: os.stat(ada / f"round_{r}" / "_SUCCESS").st_mtime_ns for r in range(3)}
    before = manifest(ada)["adaptive"]
    capsys.readouterr()
    curate.main(cfg)
    printed = capsys.readouterr().err  # say() writes to stderr
    for r in range(3):
        assert f"stage round_{r}: complete for this config, skipped" in printed
        assert os.stat(ada / f"round_{r}" / "_SUCCESS").st_mtime_ns == marks[r]
    assert manifest(ada)["adaptive"] == before


def test_next_round_columns_and_merge():
    def r(text, idx, overall):
        return {"text": text, "sample_idx": idx, "overall": overall}

    resp = pa.array([[r("a", 0, 1.0), r("b", 1, 2.0)], [r("c", 0, 3.0), r("d", 1, 4.0)]])
    t = pa.table({"prompt_id": ["p", "q"], "responses": resp})
    nxt = to_next_round(t, step=3, k_max=4)
    assert nxt.column(SAMPLE_START).to_pylist() == [2, 2] and nxt.column(N_TARGET).to_pylist() == [4, 4]
    assert PRIOR in nxt.column_names and "responses" not in nxt.column_names
    new = pa.array([[r("e", 2, 5.0)], [r("f", 2, 6.0), r("g", 3, 7.0)]])
    merged = merge_prior(nxt.append_column("responses", new))
    assert merged.column_names == ["prompt_id", "responses"]
    got = [[r["text"] for r in row] for row in merged.column("responses").to_pylist()]
    assert got == [["a", "b", "e"], ["c", "d", "f", "g"]]


def test_adaptive_keys_follow_select_and_stats(tmp_path):
    tiny_models = {"policy": "policy", "reward_multi": "reward"}  # parsed only, never loaded
    a = adaptive_cfg(config(tmp_path, tiny_models, {"k0": 2}))
    assert (a.fraction, a.tau, a.k_max) == (0.25, 1.0, K)
    with pytest.raises(ConfigError, match=r"generate.adaptive.fraction: 0.5 contradicts select.fraction"):
        adaptive_cfg(config(tmp_path, tiny_models, {"k0": 2, "fraction": 0.5}))
    with pytest.raises(ConfigError, match="select.rule pvar_top"):
        adaptive_cfg(config(tmp_path, tiny_models, {"k0": 2}, rule="random"))
    with pytest.raises(ConfigError, match=r"generate.adaptive.k_max: 3 contradicts generate.num_samples"):
        adaptive_cfg(config(tmp_path, tiny_models, {"k0": 2, "k_max": 3}))
    with pytest.raises(ConfigError, match=r"generate.adaptive.k0: 1 is not allowed"):
        adaptive_cfg(config(tmp_path, tiny_models, {"k0": 1}))


def test_generator_draws_only_the_requested_sample_range(tiny_models):
    """A later round's row (_sample_start, _n_target) gets exactly those samples, identical to the same
    samples of an all-K draw (the per-sample seed), whatever the other rows of the call ask for."""
    import asyncio

    import torch

    from operators.generate import GenerateCfg, Generator

    torch.set_num_threads(1)  # the tests' CPU share; a forward pass is far slower with more threads here
    gen = Generator(GenerateCfg(model=tiny_models["policy"], num_samples=4, max_tokens=8, max_model_len=128),
                    seed=3)
    prompts = {"p": "Name a colour.", "q": "Count to three, please."}
    full = asyncio.run(gen(pa.table({"prompt_id": list(prompts), "prompt": list(prompts.values())})))
    part = asyncio.run(gen(pa.table({"prompt_id": list(prompts), "prompt": list(prompts.values()),
                                     SAMPLE_START: [2, 1], N_TARGET: [4, 2]})))
    got = {r["prompt_id"]: r["responses"] for r in part.to_pylist()}
    want = {r["prompt_id"]: r["responses"] for r in full.to_pylist()}
    assert [s["sample_idx"] for s in got["p"]] == [2, 3] and [s["sample_idx"] for s in got["q"]] == [1]
    assert got["p"] == want["p"][2:4] and got["q"] == want["q"][1:2]


def test_dry_run_estimate_of_samples():
    from operators.adaptive import AdaptiveCfg
    from pipelines.runtime.rounds import planned_samples

    # rank keeps the top 0.7 (round half up) of those in play: 96 x 4, then 67 x 4 reach the cap 8
    assert planned_samples(96, AdaptiveCfg(rule="rank", k0=4, step=4, keep=0.7), 8) == (652, 652, True)
    # step 3 to the cap 10 (4 + 3 + 3): 20 x 4, then 14 x 3, then 10 x 3
    assert planned_samples(20, AdaptiveCfg(rule="rank", k0=4, step=3, keep=0.7), 10) == (80 + 42 + 30, 152, True)
    # ucb: at fewest k0 each and the selected 10 of 96 on to the cap; at most a full run
    assert planned_samples(96, AdaptiveCfg(rule="ucb", k0=4, fraction=0.1), 8) == (96 * 4 + 10 * 4, 768, False)
