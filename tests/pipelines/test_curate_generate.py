"""The generation path end to end on tiny models: prompts -> HF samples -> reward scores -> stats -> pairs."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq
import pytest

from operators.stats import pvar
from pipelines import curate
from pipelines.runtime.config import CurateConfig, from_dict, load_yaml


@pytest.fixture(scope="module")
def gen_run(ray_local, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    data = load_yaml("pipelines/configs/demo_cpu.yaml")["curate"]
    data["input"]["limit"] = 14
    data["generate"].update(model=tiny_models["policy"], num_samples=3, max_tokens=12, max_model_len=256)
    data["score"]["models"] = [{"path": tiny_models["reward_multi"]}]
    data["output"] = {"dir": str(out)}
    data["select"] = {"rule": "pd_consensus", "fraction": 0.5}
    data["ray"]["progress"] = False
    cfg = from_dict(CurateConfig, data)
    return out, cfg, curate.main(cfg)


def table(out, stage):
    return pq.read_table(out / stage).to_pylist()


def test_every_prompt_has_k_samples_and_counts_balance(gen_run):
    out, cfg, _ = gen_run
    samples = table(out, "samples")
    per_prompt = Counter(s["prompt_id"] for s in samples)
    assert set(per_prompt.values()) == {3}
    assert len({(s["prompt_id"], s["sample_idx"]) for s in samples}) == len(samples)
    m = json.loads((out / "manifest.json").read_text())
    st = m["stages"]
    for name, s in st.items():
        assert s["rows_in"] == s["rows_out_as_input"] + sum(s["quarantined"].values()), name
    assert st["samples"]["rows_in"] == 14
    # Arena-Hard prompts longer than the 256-token context are set aside, not generated
    q = st["samples"]["quarantined"]
    assert set(q) <= {"prompt_too_long"}
    assert st["samples"]["rows_out"] == 3 * (14 - q.get("prompt_too_long", 0))
    if q:
        qrows = pq.read_table(out / "quarantine" / "samples").to_pylist()
        assert all(r["reason"] == "prompt_too_long" for r in qrows)


def test_scores_and_stats_agree(gen_run):
    out, _, _ = gen_run
    scored = table(out, "scored")
    assert {"reward", "reward__helpfulness", "reward__correctness", "response_len"} <= set(scored[0])
    for r in scored:
        assert r["reward"] == pytest.approx((r["reward__helpfulness"] + r["reward__correctness"]) / 2)
        assert r["response_len"] == len(r["response"])
    by_prompt: dict[str, list] = {}
    for r in scored:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    stats = {s["prompt_id"]: s for s in table(out, "stats")}
    assert set(stats) == set(by_prompt)
    for pid, rows in by_prompt.items():
        rows.sort(key=lambda r: r["sample_idx"])
        rewards = [r["reward"] for r in rows]
        s = stats[pid]
        assert s["pvar"] == pytest.approx(pvar(rewards), abs=1e-12)
        assert s["margin"] == pytest.approx(max(rewards) - min(rewards), abs=1e-12)
        assert s["pd"] is not None  # two aspects: preference divergence is defined
        best = rows[rewards.index(max(rewards))]
        assert s["best_response"] == best["response"] and s["best_idx"] == best["sample_idx"]


def test_pd_consensus_pairs(gen_run):
    out, _, res = gen_run
    pairs = table(out, "pairs")
    stats = table(out, "stats")
    assert len(pairs) == res["num_pairs"] > 0
    kept = sorted(s["pd"] for s in stats)[: len(pairs)]
    assert sorted(p["pd"] for p in pairs) == pytest.approx(kept)
    assert all(p["chosen"] != p["rejected"] or p["score_chosen"] == p["score_rejected"] for p in pairs)
