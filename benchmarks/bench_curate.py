"""The whole rated curation: `prefsift curate` (pipelines.curate.main, embedded local Ray) vs a DuckDB script.

    python benchmarks/bench_curate.py --quick                 # 5k prompts x 4 (CI smoke; asserts no time)
    python benchmarks/bench_curate.py                         # 250k prompts x 4
    python benchmarks/bench_curate.py --prompts 1000000 --data-dir /tmp/rated1m
    python benchmarks/bench_curate.py --select-keys 10000000  # also: the selection's driver cost at 10M keys

Data: synthetic rated prompts in the shared rated schema, in 8 parquet files: prompt text lognormal around
300 characters, 4 responses around 1,200 characters (slices of a pool of English-like words, so parquet
compresses them as it would real text), `overall` and three aspect scores per response, and 1% duplicate
prompt ids (half exact copies, half conflicting rows), placed in other files than their first copy.

Both contenders do the same job on the same files: set aside duplicate ids (an exact copy keeps one row, an
id whose rows differ loses all of them), compute per prompt n, reward_mean, reward_std (ddof 0), pvar (tau
1), margin, best and worst index, score and text, len_corr and pd (aspects z-scored over the data set),
select the top 10% by pvar, and write the statistics and the pairs as parquet. Checked: the statistics agree
on every prompt (max |difference|) and the selections are the same set.

Reported: the whole job's wall time (prefsift's includes Ray's start-up), each prefsift stage's seconds from
its manifest, the memory of all processes (sampled PSS of the process tree), the ratio, Ray Data's own
execution stats of every dataset the run executed (per stage and operator: span, summed task time, rows and
bytes out; a shuffle would show as its own operator), every shuffle the run asked for with the columns it
carried (none may carry a text), and Ray's floor here: its start plus as many Ray Data executions of a
one-row file as the run made.
"""

from __future__ import annotations

import argparse
import json
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
    REPO,
    MemorySampler,
    clean,
    emit,
    markdown_table,
    ratio,
    result,
    run_contender,
    tree_cpu_seconds,
)
from benchmarks.duckdb_baseline import CURATE_SQL, compare_stats, run_duckdb
from benchmarks.ray_data_stats import operator_stats

K = 4
FILES = 8
ASPECTS = ("helpfulness", "correctness", "coherence")
FRACTION = 0.1
TEXT_COLUMNS = ("prompt", "responses", "messages", "best_response", "worst_response", "chosen", "rejected")
WORDS = ("the of and to in is that for it as with was on be by this are or from at an which have not can "
         "model answer data function value result example question code return time first because would "
         "each should between number string list error using python where when system however also these "
         "response explain different important following information process user step example approach").split()


# ----------------------------------------------------------------------------------------------------------
# Synthetic rated data
# ----------------------------------------------------------------------------------------------------------


def _pool(rng: np.random.Generator, nbytes: int) -> bytes:
    words = rng.choice(np.array(WORDS, dtype=object), size=nbytes // 5)
    return (" ".join(words) + " ").encode()[:nbytes]


def _texts(pool: np.ndarray, rng: np.random.Generator, lengths: np.ndarray) -> pa.Array:
    """Consecutive slices of the word pool, from a random start (the pool wraps around)."""
    total = int(lengths.sum())
    start = int(rng.integers(0, pool.size))
    reps = -(-(start + total) // pool.size)
    data = np.tile(pool, reps)[start:start + total]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return pa.LargeStringArray.from_buffers(len(lengths), pa.py_buffer(offsets), pa.py_buffer(data)) \
        .cast(pa.string())


def _rows(rng: np.random.Generator, pool: np.ndarray, ids: np.ndarray) -> pa.Table:
    n = ids.size
    plen = np.clip(rng.lognormal(np.log(300), 0.6, n), 10, 8_000).astype(np.int64)
    rlen = np.clip(rng.lognormal(np.log(1200), 0.5, n * K), 5, 20_000).astype(np.int64)
    quality = rng.normal(5.0, 1.5, n * K)
    aspects = {a: np.round(quality + rng.normal(0, 1.0, n * K), 3) for a in ASPECTS}
    overall = np.round(np.mean([aspects[a] for a in ASPECTS], axis=0) + rng.normal(0, 0.2, n * K), 4)
    models = pa.array(np.array(["model-a", "model-b", "model-c", "model-d"], dtype=object)[rng.integers(0, 4, n * K)])
    scores = pa.StructArray.from_arrays([pa.array(aspects[a]) for a in ASPECTS], names=list(ASPECTS))
    item = pa.StructArray.from_arrays([_texts(pool, rng, rlen), models, scores, pa.array(overall)],
                                      names=["text", "model", "scores", "overall"])
    responses = pa.ListArray.from_arrays(pa.array(np.arange(0, n * K + 1, K, dtype=np.int32)), item)
    return pa.table({"prompt_id": pa.array(ids.astype(str)), "prompt": _texts(pool, rng, plen),
                     "source": pa.array(np.full(n, "synthetic", dtype=object)), "responses": responses})


def write_rated(out_dir: Path, prompts: int, seed: int = 0) -> dict:
    """`prompts` rows in FILES files; 1% of them repeat an id of another file (half exact copies)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = np.frombuffer(_pool(rng, 4 << 20), dtype=np.uint8)
    n_dup = prompts // 100
    n_unique = prompts - n_dup
    ids = np.char.add("p", np.char.zfill(np.arange(n_unique).astype(str), 9))
    per_file = -(-n_unique // FILES)
    tables = [_rows(np.random.default_rng([seed, f]), pool, ids[f * per_file:(f + 1) * per_file])
              for f in range(FILES)]
    dup_src = rng.choice(n_unique, size=n_dup, replace=False)
    exact = np.arange(n_dup) < n_dup // 2
    for f in range(FILES):
        here = (dup_src // per_file + 1) % FILES == f  # a duplicate goes to the next file
        ex, cf = dup_src[here & exact], dup_src[here & ~exact]
        src = tables[(f - 1) % FILES]
        lo = ((f - 1) % FILES) * per_file
        parts = [tables[f]]
        if ex.size:
            parts.append(src.take(pa.array(ex - lo)))
        if cf.size:
            parts.append(_rows(np.random.default_rng([seed, 100 + f]), pool, ids[cf]))
        pq.write_table(pa.concat_tables(parts), out_dir / f"part-{f:02d}.parquet", row_group_size=32_768)
    conflicting = int((~exact).sum())
    return {"rows": prompts, "unique_ids": n_unique, "exact_copies": int(exact.sum()),
            "conflicting_ids": conflicting, "prompts_kept": n_unique - conflicting}


# ----------------------------------------------------------------------------------------------------------
# Contenders (each in its own process)
# ----------------------------------------------------------------------------------------------------------


def run_prefsift(data: str, out: str, object_store_gb: float) -> dict:
    """`prefsift curate` on the rated config, in this process (Ray starts inside, and is timed)."""
    import ray.data

    from pipelines import curate
    from pipelines import select as select_pipeline
    from pipelines.runtime.config import CurateConfig, load_config

    shuffles: list[dict] = []
    executions: list[dict] = []
    stage = {"name": "setup"}
    repartition = ray.data.Dataset.repartition

    def recorded(self, *args, **kwargs):
        # Every hash shuffle the pipeline asks for, with the columns it moves (the schema of its input).
        if kwargs.get("keys"):
            shuffles.append({"op": "repartition", "keys": kwargs["keys"], "columns": list(self.schema().names)})
        return repartition(self, *args, **kwargs)

    def executed(name: str):
        # Ray Data's own execution stats of every dataset the run executes, under the stage that ran it.
        call = getattr(ray.data.Dataset, name)

        def wrapped(self, *args, **kwargs):
            if stage.get("inside"):  # write_datasink materializes: one record of the one execution
                return call(self, *args, **kwargs)
            stage["inside"] = True
            try:
                out = call(self, *args, **kwargs)
            finally:
                stage["inside"] = False
            done = self._write_ds if name == "write_datasink" else out if name == "materialize" else self
            executions.append({"stage": stage["name"], "call": name, "operators": operator_stats(done.stats())})
            return out

        setattr(ray.data.Dataset, name, wrapped)

    def staged(run_stage):
        def wrapped(run, name, *args, **kwargs):
            stage["name"] = name
            return run_stage(run, name, *args, **kwargs)

        return wrapped

    ray.data.Dataset.repartition = recorded  # type: ignore[method-assign]
    for name in ("write_datasink", "materialize", "to_arrow_refs"):
        executed(name)
    curate.run_stage = staged(curate.run_stage)  # type: ignore[assignment]
    select_pipeline.run_stage = staged(select_pipeline.run_stage)  # type: ignore[assignment]
    cfg = load_config(CurateConfig, str(REPO / "pipelines/configs/real_rated.yaml"), [
        f"input.path={data}", f"output.dir={out}", "select.rule=pvar_top", f"select.fraction={FRACTION}",
        "ray.progress=false", "ray.num_cpus=2", f"ray.object_store_memory_gb={object_store_gb}"])
    with MemorySampler() as mem:
        c0, t0 = tree_cpu_seconds(), time.perf_counter()
        curate.main(cfg)
        seconds = time.perf_counter() - t0
        cpu = tree_cpu_seconds() - c0
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    return {"seconds": seconds, "cpu_s": cpu, "shuffles": shuffles, "executions": executions,
            "stages": {k: {"seconds": v["seconds"], "rows_in": v["rows_in"], "rows_out": v["rows_out"],
                           "quarantined": v["quarantined"]} for k, v in manifest["stages"].items()},
            **mem.figures()}


def run_floor(out: str, executions: int, object_store_gb: float) -> dict:
    """What Ray costs this job before any data work: Ray's start as curate does it, then as many Ray Data
    executions as the prefsift run made, each a read of a one-row parquet file, a map and a write."""
    import ray.data

    from pipelines.runtime.ray_start import init_ray

    t0 = time.perf_counter()
    init_ray(None, 2, object_store_gb, False)
    init_s = time.perf_counter() - t0
    tiny = Path(out) / "tiny.parquet"
    pq.write_table(pa.table({"x": [1]}), tiny)
    each = []
    for i in range(executions):
        t = time.perf_counter()
        ray.data.read_parquet(str(tiny)).map_batches(lambda b: b, batch_format="pyarrow").write_parquet(f"{out}/w{i}")
        each.append(time.perf_counter() - t)
    return {"ray_init_s": init_s, "executions": executions, "per_execution_s": [round(x, 3) for x in each],
            "seconds": init_s + sum(each)}


def run_duckdb_job(data: str, out: str, memory_gb: float | None) -> dict:
    return run_duckdb(CURATE_SQL.format(data=data, out=out, fraction=FRACTION), memory_gb, f"{out}/duckdb_tmp")


def run_select_keys(prompts: int) -> dict:
    """What the selection costs the driver at `prompts` prompts: the key columns it collects (prompt_id,
    source, pvar, margin, pd) and the rule with its tie-break hash, timed and measured (RSS)."""
    import psutil

    from operators.select import Budget, RuleParams, select

    rng = np.random.default_rng(0)
    proc = psutil.Process()
    base = proc.memory_info().rss
    keys = pa.table({"prompt_id": pa.array(np.char.add("p", np.char.zfill(np.arange(prompts).astype(str), 9))),
                     "source": pa.array(np.full(prompts, "synthetic", dtype=object)),
                     "pvar": rng.uniform(0, 0.25, prompts).round(3),  # rounded: many ties for the hash to break
                     "margin": rng.uniform(0, 5, prompts), "pd": rng.normal(0, 1, prompts)})
    keys_mb = keys.nbytes / 2**20
    t0 = time.perf_counter()
    out = select(keys, "pvar_top", Budget(fraction=FRACTION), RuleParams(seed=0))
    seconds = time.perf_counter() - t0
    return {"prompts": prompts, "select_s": seconds, "keys_mb": round(keys_mb, 1),
            "decision_mb": round(out.nbytes / 2**20, 1),
            "rss_over_start_mb": round((proc.memory_info().rss - base) / 2**20, 1)}


# ----------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------


def compare(prefsift_run: str, duck_out: str) -> dict:
    """The statistics on every prompt (duckdb_baseline.compare_stats), then the selections as sets."""
    import duckdb

    out = compare_stats(f"{prefsift_run}/stats/*.parquet", f"{duck_out}/stats/*.parquet")
    con = duckdb.connect()
    mine = {r[0] for r in con.execute(f"SELECT prompt_id FROM read_parquet('{prefsift_run}/selection/*.parquet') "
                                      f"WHERE selected").fetchall()}
    theirs = {r[0] for r in con.execute(f"SELECT prompt_id FROM read_parquet('{duck_out}/selection/*.parquet')")
              .fetchall()}
    out["selected"] = len(mine)
    out["selection_same"] = mine == theirs
    return out


# ----------------------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5k prompts (CI smoke)")
    ap.add_argument("--prompts", type=int, default=None, help="rated prompts (default 250k; 5k with --quick)")
    ap.add_argument("--data-dir", default=None, help="reuse (or keep) the synthetic data here")
    ap.add_argument("--object-store-gb", type=float, default=2.0)
    ap.add_argument("--select-keys", type=int, default=0, help="also measure the selection's driver cost here")
    ap.add_argument("--duckdb-memory-gb", type=float, default=None,
                    help="DuckDB's memory_limit (it spills past it); unset: its default, 80%% of RAM")
    ap.add_argument("--contender", choices=["prefsift", "duckdb", "select-keys", "floor"], help=argparse.SUPPRESS)
    ap.add_argument("--executions", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    prompts = args.prompts or (5_000 if args.quick else 250_000)

    if args.contender == "prefsift":
        result(run_prefsift(args.data, args.out, args.object_store_gb))
        return 0
    if args.contender == "duckdb":
        result(run_duckdb_job(args.data, args.out, args.duckdb_memory_gb))
        return 0
    if args.contender == "floor":
        result(run_floor(args.out, args.executions, args.object_store_gb))
        return 0
    if args.contender == "select-keys":
        result(run_select_keys(args.select_keys))
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench_curate_"))
    data = Path(args.data_dir) if args.data_dir else work / "data"
    try:
        t0 = time.perf_counter()
        marker = data / f"_prompts_{prompts}.json"
        if marker.exists():
            info = json.loads(marker.read_text())
        else:
            shutil.rmtree(data, ignore_errors=True)
            info = write_rated(data, prompts)
            marker.write_text(json.dumps(info))
        size_mb = sum(f.stat().st_size for f in data.glob("*.parquet")) / 2**20
        print(f"[bench_curate] data: {prompts:,} rows x {K}, {size_mb:.0f} MB parquet in {FILES} files "
              f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)

        me = str(Path(__file__).resolve())
        res: dict[str, dict] = {}
        for name in ("prefsift", "duckdb"):
            print(f"[bench_curate] {name} ...", file=sys.stderr, flush=True)
            (work / name).mkdir(parents=True, exist_ok=True)
            limit = ["--duckdb-memory-gb", str(args.duckdb_memory_gb)] if args.duckdb_memory_gb else []
            res[name] = run_contender(me, ["--data", str(data), "--contender", name, "--out", str(work / name),
                                           "--object-store-gb", str(args.object_store_gb), *limit])
        check = compare(str(work / "prefsift"), str(work / "duckdb"))
        floor: dict = {}
        if not args.quick:  # a timing figure; the CI smoke checks results only and stays short
            (work / "floor").mkdir()
            floor = run_contender(me, ["--contender", "floor", "--out", str(work / "floor"), "--object-store-gb",
                                       str(args.object_store_gb), "--executions",
                                       str(len(res["prefsift"]["executions"]))])
        keys = run_contender(me, ["--contender", "select-keys", "--select-keys", str(args.select_keys)]) \
            if args.select_keys else {}

        p, d = res["prefsift"], res["duckdb"]
        text_shuffles = [s for s in p["shuffles"] if s["columns"] is None or set(s["columns"]) & set(TEXT_COLUMNS)]

        def mem_gb(r: dict) -> float:
            return round((r["peak_rss_mb"] + r["all_children_pss_peak_mb"]) / 1024, 2)

        rows = [["prefsift curate (Ray Data)", p["seconds"], p["cpu_s"], mem_gb(p), "Ray start-up included"],
                ["DuckDB script", d["seconds"], d["cpu_s"], mem_gb(d),
                 f"{d['threads']} threads" + (f", memory_limit {d['memory_limit_gb']} GB" if d["memory_limit_gb"] else "")]]
        if floor:
            rows.append(["Ray floor: start + the run's executions on one row", floor["seconds"], "", "",
                         f"start {floor['ray_init_s']:.1f}s + {floor['executions']} x "
                         f"{np.mean(floor['per_execution_s'] or [0]):.2f}s"])
        table = markdown_table(["contender", "wall s", "CPU s", "peak memory GB (all processes)", "note"], rows)
        table += "\n\n" + markdown_table(
            ["stage", "seconds", "in", "out", "quarantined"],
            [[k, v["seconds"], v["rows_in"], v["rows_out"], sum(v["quarantined"].values())]
             for k, v in p["stages"].items()])
        table += "\n\nRay Data execution stats, per stage (operator, its span, its tasks' summed wall time, output):\n\n"
        table += markdown_table(
            ["stage", "call", "operator", "span s", "task s", "rows out", "MB out"],
            [[e["stage"], e["call"], op["op"][:70], op["seconds"], op.get("task_s", ""), op.get("rows", ""),
              round(op.get("bytes", 0) / 2**20, 1)] for e in p["executions"] for op in e["operators"]])
        stat_shuffles = [(e["stage"], op) for e in p["executions"] for op in e["operators"] if op["shuffle"]]
        table += "\n\nShuffle operators in Ray Data's execution stats: " + ("; ".join(
            f"{st}: {op['op']} ({op.get('bytes', 0) / 2**20:.1f} MB)" for st, op in stat_shuffles) or "none")
        table += "\n\nRay Data shuffles asked for: " + ("; ".join(f"{s['op']} by {s['keys']} carrying {s['columns']}"
                                                                 for s in p["shuffles"]) or "none")
        table += (f"\n\nstatistics vs DuckDB on {check['joined']:,} prompts: max |diff| {check['max_abs_diff']:.2e}, "
                  f"agree: {check['agree']}; selections the same ({check['selected']:,}): {check['selection_same']}")
        if keys:
            table += (f"\n\nselection at {keys['prompts']:,} prompts on the driver: keys {keys['keys_mb']} MB, "
                      f"select {keys['select_s']:.1f}s, RSS +{keys['rss_over_start_mb']} MB")
        check["no_text_shuffle"] = not text_shuffles
        check["shuffle_operators_in_stats"] = [op["op"] for e in p["executions"] for op in e["operators"] if op["shuffle"]]
        ratios = {"prefsift_time_over_duckdb": ratio(p["seconds"], d["seconds"]),
                  "ray_floor_over_duckdb": ratio(floor["seconds"], d["seconds"]) if floor else None,
                  "prefsift_cpu_over_duckdb": ratio(p["cpu_s"], d["cpu_s"]),
                  "prefsift_peak_memory_gb": mem_gb(p), "duckdb_peak_memory_gb": mem_gb(d)}
        emit("curation", clean({"prompts": prompts, "parquet_mb": round(size_mb, 1), "data": info,
                                "prefsift": p, "duckdb": d, "floor": floor, "check": check, "select_keys": keys}),
             ratios, table=table,
             targets={"prefsift_time_over_duckdb": "<= 2", "prefsift_peak_memory_gb": "report"},
             config={"prompts": prompts, "k": K, "aspects": list(ASPECTS), "fraction": FRACTION, "quick": args.quick,
                     "object_store_gb": args.object_store_gb, "duckdb_memory_gb": args.duckdb_memory_gb})
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
