"""The generation path end to end on tiny models: prompts -> HF samples -> reward scores -> stats -> pairs."""

from __future__ import annotations

import json

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
    samples = table(out, "samples")  # one row per prompt, its K samples as a list
    assert len({s["prompt_id"] for s in samples}) == len(samples)
    assert all([r["sample_idx"] for r in s["responses"]] == [0, 1, 2] for s in samples)
    m = json.loads((out / "manifest.json").read_text())
    st = m["stages"]
    for name, s in st.items():
        assert s["rows_in"] == s["rows_out_as_input"] + sum(s["quarantined"].values()), name
    assert st["samples"]["rows_in"] == 14 and st["samples"]["unit_out"] == "prompt"
    # Arena-Hard prompts longer than the 256-token context are set aside, not generated
    q = st["samples"]["quarantined"]
    assert set(q) <= {"prompt_too_long"}
    assert st["samples"]["rows_out"] == 14 - q.get("prompt_too_long", 0) == len(samples)
    assert st["stats"]["rows_in"] == 3 * len(samples) and st["stats"]["unit_in"] == "response"
    if q:
        qrows = pq.read_table(out / "quarantine" / "samples").to_pylist()
        assert all(r["reason"] == "prompt_too_long" for r in qrows)


def test_scores_and_stats_agree(gen_run):
    out, _, _ = gen_run
    scored = table(out, "scored")
    stats = {s["prompt_id"]: s for s in table(out, "stats")}
    assert set(stats) == {r["prompt_id"] for r in scored}
    for row in scored:
        resp = row["responses"]
        for r in resp:
            assert r["overall"] == pytest.approx((r["scores"]["helpfulness"] + r["scores"]["correctness"]) / 2)
            assert r["len"] == len(r["text"]) and r["problem"] is None
        rewards = [r["overall"] for r in sorted(resp, key=lambda r: r["sample_idx"])]
        s = stats[row["prompt_id"]]
        assert s["pvar"] == pytest.approx(pvar(rewards), abs=1e-12)
        assert s["margin"] == pytest.approx(max(rewards) - min(rewards), abs=1e-12)
        assert s["pd"] is not None  # two aspects: preference divergence is defined
        best = resp[rewards.index(max(rewards))]
        assert s["best_response"] == best["text"] and s["best_idx"] == best["sample_idx"]


def test_pd_consensus_pairs(gen_run):
    out, _, res = gen_run
    pairs = table(out, "pairs")
    stats = table(out, "stats")
    assert len(pairs) == res["num_pairs"] > 0
    kept = sorted(s["pd"] for s in stats)[: len(pairs)]
    assert sorted(p["pd"] for p in pairs) == pytest.approx(kept)
    assert all(p["chosen"] != p["rejected"] or p["score_chosen"] == p["score_rejected"] for p in pairs)
