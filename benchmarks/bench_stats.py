"""Per-prompt statistics: prefsift on Ray Data vs one DuckDB query vs a pandas groupby-apply script.

    python benchmarks/bench_stats.py --quick          # 100k rows (CI smoke; asserts nothing about time)
    python benchmarks/bench_stats.py                  # 10M rows = 2.5M prompts x 4 responses
    python benchmarks/bench_stats.py --rows 1000000 --keep-data /tmp/stats1m

The input is synthetic scored data in the per-prompt layout the pipeline writes (scored/): one row per
prompt, its K = 4 responses as a list of structs {text (short), sample_idx, overall ~ N(0, 1), len, scores
{two aspects}}, in parquet shards. `--rows` counts responses. All three do the same work: read the parquet,
compute per prompt n, reward_mean, reward_std (ddof 0), pvar (tau 1), margin, best/worst sample index, score
and response, len_corr and pd (aspects z-scored over the data set, length_debias none), and write parquet.
prefsift maps over whole prompt rows (no shuffle); DuckDB and pandas unnest the lists and group. The
statistics of prefsift and DuckDB are compared on every prompt.

Ray's start-up (`ray.init`) is reported but not counted: DuckDB and pandas have none, and a pipeline pays
it once per run, not per stage. Everything after it is counted, the shuffle's fixed cost included.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import (
    MemorySampler,
    clean,
    emit,
    init_local_ray,
    markdown_table,
    ratio,
    result,
    run_contender,
    tree_cpu_seconds,
)
from benchmarks.duckdb_baseline import STATS_SQL, compare_stats, run_duckdb

K = 4
ASPECTS = ("helpfulness", "correctness")
TAU = 1.0
ROWS_PER_SHARD = 500_000


# ----------------------------------------------------------------------------------------------------------
# Synthetic data
# ----------------------------------------------------------------------------------------------------------


def _shard(shard: int, lo: int, hi: int, response_chars: int) -> pa.Table:
    """Prompts lo..hi-1, one row each with K responses; deterministic per shard."""
    idx = np.arange(lo, hi)
    n = idx.size
    rng = np.random.default_rng(shard)
    pid = np.char.add("p", np.char.zfill(idx.astype(str), 9))
    reward = rng.standard_normal(n * K)
    # Aspects correlate with the overall reward, as real aspect scores do.
    aspects = {a: 0.6 * reward + 0.8 * rng.standard_normal(n * K) for a in ASPECTS}
    length = np.clip(rng.lognormal(6.0, 0.8, n * K), 1, 20_000).astype(np.int64)
    filler = "x" * max(0, response_chars - 16)
    j = np.tile(np.arange(K), n)
    text = np.char.add(np.char.add(np.char.add("s", j.astype(str)), np.char.add(":", np.repeat(pid, K))), filler)
    item = pa.StructArray.from_arrays(
        [pa.array(text), pa.array(j.astype(np.int64)), pa.array(reward), pa.array(length),
         pa.StructArray.from_arrays([pa.array(aspects[a]) for a in ASPECTS], names=list(ASPECTS))],
        names=["text", "sample_idx", "overall", "len", "scores"])
    responses = pa.ListArray.from_arrays(pa.array(np.arange(0, n * K + 1, K, dtype=np.int32)), item)
    return pa.table({"prompt_id": pa.array(pid), "responses": responses})


def write_synthetic(out_dir: Path, rows: int, response_chars: int = 32) -> dict[str, int]:
    """rows // K prompts x K responses, one row per prompt, in shards of ~ROWS_PER_SHARD responses."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n_prompts = rows // K
    shards = max(2, -(-rows // ROWS_PER_SHARD))
    per = -(-n_prompts // shards)
    for s in range(shards):
        table = _shard(s, s * per, min(n_prompts, (s + 1) * per), response_chars)
        pq.write_table(table, out_dir / f"part-{s:05d}.parquet", row_group_size=32 * 1024)
    return {"rows": n_prompts * K, "prompts": n_prompts, "shards": shards}


# ----------------------------------------------------------------------------------------------------------
# Contenders (each in its own process)
# ----------------------------------------------------------------------------------------------------------


def run_prefsift(data: str, out: str, rows: int) -> dict:
    """The pipeline's stats stage: one pass over the score leaves for PD's norms, then a map over prompts."""
    import pyarrow.fs as pafs

    from operators.norms import norms_from_sums, response_pass
    from operators.read import read_parquet_files
    from operators.stats import StatsParams, aspect_names, stats_map

    init_s = init_local_ray()
    files = sorted(str(f) for f in Path(data).glob("*.parquet"))
    with MemorySampler() as mem:
        c0, t0 = tree_cpu_seconds(), time.perf_counter()
        ds = read_parquet_files(data, file_extensions=["parquet"])  # one read task per shard, as the pipeline
        schema = ds.schema()
        aspects = aspect_names(schema)
        sums = response_pass(pafs.LocalFileSystem(), files, schema, aspects, with_length=False)
        norms = norms_from_sums(sums, aspects, "none", 1.0)
        t_norms = time.perf_counter() - t0
        params = StatsParams(tau=TAU, norms=norms, carry=())
        stats_map(ds, params).write_parquet(out)
        seconds = time.perf_counter() - t0
        cpu = tree_cpu_seconds() - c0
    return {"seconds": seconds, "cpu_s": cpu, "norms_s": t_norms, "ray_init_s": init_s,
            "responses": sums.get("responses"), **mem.figures()}


def _emptied(table: pa.Table) -> pa.Table:
    return table.slice(0, 0)


def run_ray_floor(data: str, rows: int) -> dict:
    """What Ray Data itself costs here, with no statistics and no output: one read pass (every block emptied
    after it). A lower bound for any Ray Data implementation of the statistics stage."""
    from operators.read import read_parquet_files

    init_local_ray()
    t0 = time.perf_counter()
    read_parquet_files(data, file_extensions=["parquet"]).map_batches(_emptied, batch_format="pyarrow").materialize()
    read_s = time.perf_counter() - t0
    return {"read_s": read_s, "seconds": read_s}


def run_duckdb_job(data: str, out: str) -> dict:
    return run_duckdb(STATS_SQL.format(data=data, out=out, tau=TAU))


def run_pandas(data: str, out: str, max_prompts: int | None) -> dict:
    """The script papers ship: read everything, groupby-apply a Python function per prompt."""
    import pandas as pd

    c0, t0 = tree_cpu_seconds(), time.perf_counter()
    filters = [("prompt_id", "<", f"p{max_prompts:09d}")] if max_prompts else None
    df = pd.read_parquet(data, filters=filters).explode("responses", ignore_index=True)
    r = pd.json_normalize(df.pop("responses").tolist())
    df = pd.concat([df, r.rename(columns={"overall": "reward", "len": "response_len", "text": "response",
                                           **{f"scores.{a}": f"reward__{a}" for a in ASPECTS}})], axis=1)
    norms = {a: (df[f"reward__{a}"].mean(), df[f"reward__{a}"].std(ddof=0)) for a in ASPECTS}

    def per_prompt(g: pd.DataFrame) -> pd.Series:
        g = g.sort_values("sample_idx")
        r = g["reward"].to_numpy()
        n = len(r)
        d = (r[:, None] - r[None, :]) / TAU
        b, w = int(np.argmax(r)), int(np.argmin(r))
        lens = g["response_len"].to_numpy(dtype=float)
        z = [(g[f"reward__{a}"].to_numpy() - m) / s for a, (m, s) in norms.items()]
        return pd.Series({
            "n": n, "reward_mean": r.mean(), "reward_std": r.std(),
            "pvar": (np.tanh(d / 2) ** 2 / 4).sum() / (n * (n - 1)) if n >= 2 else np.nan,
            "margin": r[b] - r[w], "best_idx": int(g["sample_idx"].iloc[b]),
            "worst_idx": int(g["sample_idx"].iloc[w]), "score_best": r[b], "score_worst": r[w],
            "best_response": g["response"].iloc[b], "worst_response": g["response"].iloc[w],
            "len_corr": np.corrcoef(r, lens)[0, 1] if n >= 2 else np.nan,
            "pd": float(np.mean([zz[w] - zz[b] for zz in z])),
        })

    stats = df.groupby("prompt_id").apply(per_prompt)
    os.makedirs(out, exist_ok=True)
    stats.reset_index().to_parquet(os.path.join(out, "stats.parquet"))
    return {"seconds": time.perf_counter() - t0, "cpu_s": tree_cpu_seconds() - c0, "rows": len(df),
            "prompts": len(stats)}


# ----------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------


def compare(a_dir: str, b_dir: str) -> dict:
    return compare_stats(f"{a_dir}/*.parquet", f"{b_dir}/*.parquet")


# ----------------------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100k rows (CI smoke)")
    ap.add_argument("--rows", type=int, default=None, help="scored responses (default 10M; 100k with --quick)")
    ap.add_argument("--response-chars", type=int, default=32)
    ap.add_argument("--data-dir", default=None, help="reuse (or keep) the synthetic data here")
    ap.add_argument("--pandas-slice", type=int, default=1_000_000,
                    help="above this many rows, time pandas on a slice first and extrapolate if too slow")
    ap.add_argument("--pandas-budget-s", type=float, default=600.0)
    ap.add_argument("--skip-pandas", action="store_true")
    ap.add_argument("--contender", choices=["prefsift", "ray-floor", "duckdb", "pandas"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--max-prompts", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    rows = args.rows or (100_000 if args.quick else 10_000_000)

    if args.contender:
        if args.contender == "prefsift":
            result(run_prefsift(args.data, args.out, rows))
        elif args.contender == "ray-floor":
            result(run_ray_floor(args.data, rows))
        elif args.contender == "duckdb":
            result(run_duckdb_job(args.data, args.out))
        else:
            result(run_pandas(args.data, args.out, args.max_prompts))
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench_stats_"))
    data = Path(args.data_dir) if args.data_dir else work / "data"
    try:
        t0 = time.perf_counter()
        marker = data / f"_rows_{rows}_{args.response_chars}"
        if marker.exists():
            info = {"rows": rows - rows % K, "prompts": rows // K, "shards": len(list(data.glob("*.parquet")))}
        else:
            shutil.rmtree(data, ignore_errors=True)
            info = write_synthetic(data, rows, args.response_chars)
            marker.touch()
        gen_s = time.perf_counter() - t0
        size_mb = sum(f.stat().st_size for f in data.glob("*.parquet")) / 2**20
        print(f"[bench_stats] data: {info['rows']:,} rows, {info['prompts']:,} prompts, {info['shards']} shards, "
              f"{size_mb:.0f} MB parquet ({gen_s:.1f}s)", file=sys.stderr, flush=True)

        me = str(Path(__file__).resolve())
        common = ["--rows", str(rows), "--data", str(data)]
        res: dict[str, dict] = {}
        for name in ["prefsift", "duckdb", "ray-floor"]:
            print(f"[bench_stats] {name} ...", file=sys.stderr, flush=True)
            res[name] = run_contender(me, [*common, "--contender", name, "--out", str(work / name)])
        check = compare(str(work / "prefsift"), str(work / "duckdb"))

        notes = []
        pandas: dict = {}
        if not args.skip_pandas:
            if info["rows"] > args.pandas_slice:
                sl = args.pandas_slice // K
                print(f"[bench_stats] pandas on a {sl * K:,}-row slice ...", file=sys.stderr, flush=True)
                part = run_contender(me, [*common, "--contender", "pandas", "--out", str(work / "pandas"),
                                          "--max-prompts", str(sl)])
                estimate = part["seconds"] * info["rows"] / part["rows"]
                if estimate > args.pandas_budget_s:
                    scale = info["rows"] / part["rows"]
                    pandas = {**part, "seconds": estimate, "cpu_s": part["cpu_s"] * scale,
                              "measured_seconds": part["seconds"], "measured_cpu_s": part["cpu_s"],
                              "measured_rows": part["rows"], "extrapolated": True}
                    notes.append(f"pandas: measured {part['seconds']:.1f}s on {part['rows']:,} rows, extrapolated "
                                 f"linearly to {info['rows']:,} rows = {estimate:.0f}s (over the "
                                 f"{args.pandas_budget_s:.0f}s budget, so not run in full)")
                else:
                    shutil.rmtree(work / "pandas", ignore_errors=True)
            if not pandas:
                print("[bench_stats] pandas ...", file=sys.stderr, flush=True)
                pandas = {**run_contender(me, [*common, "--contender", "pandas", "--out", str(work / "pandas")]),
                          "extrapolated": False}
            pcheck = compare(str(work / "pandas"), str(work / "duckdb"))
            pandas["agrees_with_duckdb_on"] = pcheck["joined"]
            pandas["max_abs_diff_vs_duckdb"] = pcheck["max_abs_diff"]

        p, d, fl = res["prefsift"], res["duckdb"], res["ray-floor"]
        def row(name: str, r: dict, note: str) -> list:
            return [name, r["seconds"], r["cpu_s"], info["rows"] / r["seconds"], r["peak_rss_mb"],
                    r.get("ray_workers_pss_peak_mb"), note]

        rows_tab = [row("prefsift (Ray Data)", p, f"ray.init {p['ray_init_s']}s not counted; a map, no shuffle")]
        rows_tab.append(row("DuckDB GROUP BY", d, f"{d['threads']} threads"))
        if pandas:
            rows_tab.append(row("pandas groupby-apply", pandas,
                                f"extrapolated from {pandas['measured_rows']:,} rows" if pandas["extrapolated"]
                                else "measured"))
        table = markdown_table(["contender", "wall s", "CPU s", "rows/s (wall)", "driver peak RSS MB",
                                "Ray workers PSS MB", "note"], rows_tab)
        table += f"\n\nRay Data alone, nothing computed or written: read {fl['read_s']:.1f}s"
        table += (f"\n\nprefsift vs DuckDB on {check['joined']:,} prompts: max |diff| {check['max_abs_diff']:.2e}, "
                  f"agree: {check['agree']}")
        ratios = {
            "prefsift_time_over_duckdb": ratio(p["seconds"], d["seconds"]),
            "pandas_time_over_prefsift": ratio(pandas.get("seconds"), p["seconds"]),
            "prefsift_cpu_over_duckdb": ratio(p["cpu_s"], d["cpu_s"]),
            "pandas_cpu_over_prefsift": ratio(pandas.get("cpu_s"), p["cpu_s"]),
            "driver_peak_rss_gb": round(p["peak_rss_mb"] / 1024, 3),
        }
        # Ray Data's own floor (one read, nothing computed or written) against DuckDB's whole job.
        ratios["ray_read_over_duckdb"] = ratio(fl["read_s"], d["seconds"])
        ratios["prefsift_over_ray_read"] = ratio(p["seconds"], fl["seconds"])
        emit("statistics", clean({
            "rows": info["rows"], "prompts": info["prompts"], "parquet_mb": round(size_mb, 1),
            "prefsift": p, "duckdb": d, "ray_floor": fl, "pandas": pandas, "check": check,
        }), ratios, table=table, notes=notes,
            targets={"prefsift_time_over_duckdb": "<= 1.5", "pandas_time_over_prefsift": ">= 10",
                     "driver_peak_rss_gb": "< 2"},
            config={"rows": rows, "k": K, "aspects": list(ASPECTS), "tau": TAU, "quick": args.quick,
                    "response_chars": args.response_chars})
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
