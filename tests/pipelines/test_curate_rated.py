"""Curation of already-rated real data, end to end on Ray Data, checked on its outputs."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import curate
from pipelines import select as select_pipeline
from pipelines.runtime.config import CurateConfig, load_config

CONFIG = "pipelines/configs/real_rated.yaml"
# The first 300 of UltraFeedback binarized's 1,200-row sample, shipped for the demo and reused here.
UF_300 = Path(__file__).resolve().parents[2] / "pipelines" / "data" / "ultrafeedback_binarized_sample_300.jsonl.gz"


def run_cfg(tmp_path, **overrides) -> CurateConfig:
    ov = [f"{k}={v}" for k, v in overrides.items()]
    return load_config(CurateConfig, CONFIG, [f"output.dir={tmp_path}", "ray.progress=false", *ov])


def independent_stats(path, tau=1.0):
    """A direct, loop-per-prompt reading of DESIGN.md's definitions."""
    out = {}
    for line in gzip.open(path, "rt"):
        row = json.loads(line)
        r = [x["overall"] for x in row["responses"]]
        n = len(r)
        pv = sum((1 / (1 + math.exp(-(r[i] - r[j]) / tau)) - 0.5) ** 2
                 for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        labels = [x.get("label") for x in row["responses"]]
        if "chosen" in labels:
            margin = r[labels.index("chosen")] - r[labels.index("rejected")]
        else:
            margin = max(r) - min(r)
        out[row["prompt_id"]] = {"pvar": pv, "margin": margin, "mean": sum(r) / n, "std": float(np.std(r)), "n": n}
    return out


def read(run_dir, stage):
    return pq.read_table(f"{run_dir}/{stage}").to_pylist()


def check_manifest(run_dir):
    m = json.loads((run_dir / "manifest.json").read_text())
    for name, st in m["stages"].items():
        q = sum(st["quarantined"].values())
        assert st["rows_in"] == st["rows_out_as_input"] + q, name
        assert st["balanced"], name
    assert m["configs"]["curate"]["select"]["rule"]
    assert "ray" in m["versions"] and "torch" in m["versions"]
    return m


@pytest.fixture(scope="module")
def uf_run(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("uf")
    path = UF_300
    res = curate.main(run_cfg(out, **{"input.path": str(path), "select.rule": "pvar_top", "select.fraction": 0.1}))
    return out, path, res


def test_ultrafeedback_stats_match_definitions(uf_run):
    out, path, _ = uf_run
    ref = independent_stats(path)
    stats = {s["prompt_id"]: s for s in read(out, "stats")}
    assert set(stats) == set(ref) and len(ref) == 300
    for pid, r in ref.items():
        s = stats[pid]
        assert s["n"] == r["n"]
        assert s["pvar"] == pytest.approx(r["pvar"], abs=1e-12)
        assert s["margin"] == pytest.approx(r["margin"], abs=1e-12)
        assert s["reward_mean"] == pytest.approx(r["mean"], abs=1e-12)
        assert s["reward_std"] == pytest.approx(r["std"], abs=1e-12)


def test_ultrafeedback_pvar_top_10_percent_pairs(uf_run):
    out, path, res = uf_run
    pairs = read(out, "pairs")
    assert len(pairs) == 30 == res["num_pairs"]
    stats = read(out, "stats")
    cutoff = sorted((s["pvar"] for s in stats), reverse=True)[29]
    assert all(p["pvar"] >= cutoff - 1e-15 for p in pairs)
    assert sum(s["pvar"] > cutoff for s in stats) <= 30
    raw = {json.loads(line)["prompt_id"]: json.loads(line) for line in gzip.open(path, "rt")}
    for p in pairs:
        resp = {x["label"]: x for x in raw[p["prompt_id"]]["responses"]}
        assert p["chosen"] == resp["chosen"]["text"] and p["rejected"] == resp["rejected"]["text"]
        assert p["prompt"] == raw[p["prompt_id"]]["prompt"]
        assert p["score_chosen"] - p["score_rejected"] == pytest.approx(p["margin"])
        assert p["route"] == "dpo"
    check_manifest(out)


def test_pairs_load_with_datasets(uf_run):
    import datasets

    out, _, _ = uf_run
    ds = datasets.load_dataset("parquet", data_files=str(out / "pairs" / "*.parquet"), split="train")
    assert ds.num_rows == 30
    assert {"prompt", "chosen", "rejected", "prompt_id", "margin", "pvar", "route", "order"} <= set(ds.column_names)


def test_selection_holds_keys_and_decisions_only(uf_run):
    out, _, _ = uf_run
    sel = pq.read_table(out / "selection")
    assert sel.column_names == ["prompt_id", "selected", "rank", "selector", "route", "order"]
    assert sel.num_rows == 300 and sum(sel.column("selected").to_pylist()) == 30


def test_rerun_skips_completed_stages_and_select_reuses_stats(uf_run):
    out, path, _ = uf_run
    stages = ("prompts", "stats", "selection", "pairs")
    marks = {s: (out / s / "_SUCCESS").stat().st_mtime_ns for s in stages}
    before = marks["stats"]
    cfg = run_cfg(out, **{"input.path": str(path), "select.rule": "pvar_top", "select.fraction": 0.1})
    curate.main(cfg)
    assert {s: (out / s / "_SUCCESS").stat().st_mtime_ns for s in stages} == marks  # nothing was redone
    # A different rule through the select pipeline: stats untouched, pairs rebuilt.
    cfg2 = run_cfg(out, **{"input.path": str(path), "select.rule": "margin_curriculum",
                           "select.sft_quantile": 0.1, "select.fraction": "null"})
    res = select_pipeline.main(cfg2)
    assert (out / "stats" / "_SUCCESS").stat().st_mtime_ns == before
    pairs = read(out, "pairs")
    assert res["records"]["pairs"].rows_out == len(pairs)
    # all_rewards_equal, and identical_chosen_rejected (the same text twice with different scores) stay out;
    # these 300 rows have neither (a tie between labelled chosen/rejected is still a pair), test_bad_input has both
    assert len(pairs) == 300 - sum(1 for s in read(out, "stats") if s["best_idx"] == s["worst_idx"]
                                    or s["best_response"] == s["worst_response"])
    orders = sorted(p["order"] for p in pairs)
    assert orders == list(range(len(orders))) or len(set(orders)) == len(orders)
    by_order = sorted(pairs, key=lambda p: p["order"])
    assert all(a["margin"] >= b["margin"] for a, b in zip(by_order, by_order[1:], strict=False))
    n_sft = sum(p["route"] == "sft" for p in pairs)
    assert 0 < n_sft and max(p["margin"] for p in pairs if p["route"] == "sft") <= \
        min(p["margin"] for p in pairs if p["route"] == "dpo")
    check_manifest(out)


def test_arena_bench_many_responses(ray_local, real_data, tmp_path):
    path = real_data / "arena_bench_v1_gpt4_single_100.jsonl.gz"
    curate.main(run_cfg(tmp_path, **{"input.path": str(path), "select.fraction": 0.1}))
    ref = independent_stats(path)
    stats = {s["prompt_id"]: s for s in read(tmp_path, "stats")}
    assert len(stats) == 100
    for pid, r in ref.items():
        assert stats[pid]["pvar"] == pytest.approx(r["pvar"], abs=1e-12)
        assert stats[pid]["margin"] == pytest.approx(r["margin"], abs=1e-12)
        assert stats[pid]["n"] == r["n"]
    assert len(read(tmp_path, "pairs")) == 10
    m = check_manifest(tmp_path)
    assert m["stages"]["stats"]["rows_in"] == sum(r["n"] for r in ref.values())  # counted in responses


def test_a_runs_rated_output_is_input_to_another_run(uf_run, tmp_path):
    """prompts/ of a rated run (scored/ of a generated one) is the shared rated schema: another run reads it as
    it is, here to recompute the statistics with another tau, and gets the same prompts and responses."""
    out, path, _ = uf_run
    again = tmp_path / "tau2"
    curate.main(run_cfg(again, **{"input.path": str(out / "prompts"), "stats.tau": 2.0,
                                  "select.rule": "pvar_top", "select.fraction": 0.1}))
    ref = independent_stats(path, tau=2.0)
    stats = {s["prompt_id"]: s for s in read(again, "stats")}
    assert set(stats) == set(ref)
    for pid, r in ref.items():
        assert stats[pid]["pvar"] == pytest.approx(r["pvar"], abs=1e-12)
        assert stats[pid]["margin"] == pytest.approx(r["margin"], abs=1e-12) and stats[pid]["tau"] == 2.0
    first = {p["prompt_id"]: p for p in read(out, "prompts")}
    second = {p["prompt_id"]: p for p in read(again, "prompts")}
    assert first.keys() == second.keys()
    assert all(first[k]["responses"] == second[k]["responses"] for k in first)
    check_manifest(again)


def test_parquet_duplicate_ids_across_files(ray_local, tmp_path):
    """Parquet is read twice, the ids alone and then whole rows (each row named by its file and place); the
    duplicate rule must come out as on JSONL: an exact copy keeps one row, an id whose rows differ loses all,
    and a copy already quarantined for another reason does not make its id a duplicate. The statistics come
    out of the same pass (the held rows' at their settlement, PD once the norms are known) and must equal
    those computed from prompts/ by a rerun whose stats/ was left uncommitted, as by a killed driver."""
    import pyarrow as pa

    def row(pid, prompt, *rewards):
        return {"prompt_id": pid, "prompt": prompt,
                "responses": [{"text": f"{pid}-{i}" * (i + 1), "overall": r,
                               "scores": {"a": r * r, "b": 3.0 - r + i}} for i, r in enumerate(rewards)]}

    first = [row("same", "p", 1.0, 2.0), row("clash", "p", 1.0, 2.0), row("solo", "p", 3.0, 1.0, 2.5),
             row("blank", "p", 1.0, 4.0)]
    second = [row("same", "p", 1.0, 2.0), row("clash", "p", 1.0, 5.0), row("blank", "  ", 1.0, 4.0)]
    data = tmp_path / "in"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(first), data / "a.parquet")
    pq.write_table(pa.Table.from_pylist(second), data / "b.parquet")
    out = tmp_path / "run"
    curate.main(run_cfg(out, **{"input.path": str(data), "select.fraction": 1.0}))
    kept = sorted(r["prompt_id"] for r in read(out, "prompts"))
    assert kept == ["blank", "same", "solo"]
    assert next(r for r in read(out, "prompts") if r["prompt_id"] == "blank")["prompt"] == "p"
    reasons = sorted((r["prompt_id"], r["reason"]) for r in read(out / "quarantine", "prompts"))
    assert reasons == [("blank", "empty_prompt"), ("clash", "conflicting_duplicate_prompt_id"),
                       ("clash", "conflicting_duplicate_prompt_id"), ("same", "duplicate_prompt_id")]
    m = check_manifest(out)
    assert (m["stages"]["prompts"]["rows_in"], m["stages"]["prompts"]["rows_out"]) == (7, 3)
    assert m["stages"]["stats"]["rows_in"] == 7  # the kept prompts' responses
    fused = {r["prompt_id"]: r for r in read(out, "stats")}
    assert all(math.isfinite(r["pd"]) for r in fused.values()) and not any(c.startswith("_") for c in
                                                                           next(iter(fused.values())))
    (out / "stats" / "_SUCCESS").unlink()
    curate.main(run_cfg(out, **{"input.path": str(data), "select.fraction": 1.0}))
    again = {r["prompt_id"]: r for r in read(out, "stats")}
    assert again.keys() == fused.keys() == {"same", "solo", "blank"}
    for pid, r in again.items():
        assert list(r) == list(fused[pid])
        for k, v in r.items():
            assert fused[pid][k] == (pytest.approx(v, abs=1e-12) if isinstance(v, float) else v), (pid, k)
    counts = ("rows_in", "rows_out", "rows_out_as_input", "quarantined")
    rec = check_manifest(out)["stages"]["stats"]
    assert [rec[k] for k in counts] == [m["stages"]["stats"][k] for k in counts]


def test_parquet_files_whose_schemas_differ(ray_local, tmp_path):
    """The keyed read gives each file its own schema: a file with an extra column and an extra response field
    is curated with the others, no row lost, and its prompts/ shard keeps what the file had."""
    import pyarrow as pa

    def row(pid, *rewards, extra=False):
        resp = [{"text": f"{pid}-{i}" * (i + 1), "overall": r, "scores": {"a": r * r, "b": 3.0 - r + i},
                 **({"model": "m"} if extra else {})} for i, r in enumerate(rewards)]
        return {"prompt_id": pid, "prompt": f"p {pid}", "responses": resp, **({"meta": "x"} if extra else {})}

    data = tmp_path / "in"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist([row("a1", 1.0, 2.0), row("a2", 3.0, 1.0, 2.5)]), data / "a.parquet")
    pq.write_table(pa.Table.from_pylist([row("b1", 1.0, 2.0, extra=True), row("b2", 0.5, 4.0, extra=True)]),
                   data / "b.parquet")
    out = tmp_path / "run"
    curate.main(run_cfg(out, **{"input.path": str(data), "select.fraction": 1.0}))
    m = check_manifest(out)["stages"]
    assert (m["prompts"]["rows_in"], m["prompts"]["rows_out"], m["stats"]["rows_in"]) == (4, 4, 9)
    shards = {tuple(sorted(t.column("prompt_id").to_pylist())): t
              for t in (pq.read_table(f) for f in sorted((out / "prompts").glob("*.parquet")))}
    assert set(shards) == {("a1", "a2"), ("b1", "b2")}
    assert shards[("b1", "b2")].column("meta").to_pylist() == ["x", "x"]
    assert "meta" not in shards[("a1", "a2")].column_names
    assert [r["model"] for r in shards[("b1", "b2")].column("responses").to_pylist()[0]] == ["m", "m"]
    stats = {r["prompt_id"]: r for r in read(out, "stats")}
    assert stats["a2"]["margin"] == 2.0 and stats["b2"]["margin"] == 3.5 and stats["b1"]["n"] == 2
