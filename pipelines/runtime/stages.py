"""Running one stage: skip if complete, split good rows from quarantined ones, write, count, record."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from operators.base import QUARANTINE, QUARANTINE_DETAIL
from operators.stats import QUARANTINE_SAMPLE
from pipelines.runtime.console import say
from pipelines.runtime.manifest import SUCCESS, RunDir, StageRecord

QUARANTINE_DIR = "quarantine"


def _good(table: pa.Table) -> pa.Table:
    if QUARANTINE not in table.column_names:
        return table
    keep = table.filter(pc.is_null(table.column(QUARANTINE)))
    return keep.drop_columns([c for c in keep.column_names if c.startswith(QUARANTINE)])


def _bad(table: pa.Table) -> pa.Table:
    if QUARANTINE not in table.column_names:
        return table.slice(0, 0).append_column("reason", pa.array([], pa.string()))
    bad = table.filter(pc.is_valid(table.column(QUARANTINE)))
    # A stage that quarantines single responses of a prompt row (the statistics) names the response's
    # sample_idx beside the prompt_id.
    names = {QUARANTINE: "reason", QUARANTINE_DETAIL: "detail", QUARANTINE_SAMPLE: "sample_idx"}
    return bad.rename_columns([names.get(c, c) for c in bad.column_names])


def _block_sums(table: pa.Table, columns: list[str]) -> pa.Table:
    return pa.table({c: [float(pc.sum(pc.cast(table.column(c), pa.float64())).as_py() or 0.0)] for c in columns})


def _quarantine_counts(table: pa.Table) -> pa.Table:
    bad = table.num_rows - table.column(QUARANTINE).null_count
    return pa.table({"good": [table.num_rows - bad], "bad": [bad]})


def _split_counts(ds) -> tuple[int, int]:
    """(good, quarantined) rows of a materialized dataset from its quarantine column alone: one pass that
    copies no other column (filtering whole rows to count them would copy every text)."""
    if QUARANTINE not in ds.schema().names:
        return ds.count(), 0
    parts = ds.select_columns([QUARANTINE]).map_batches(_quarantine_counts, batch_format="pyarrow",
                                                        batch_size=None).take_all()
    return int(sum(p["good"] for p in parts)), int(sum(p["bad"] for p in parts))


def column_sums(ds, columns: list[str]) -> dict[str, float]:
    """Column totals from per-block partial sums. Ray's `Dataset.sum` runs a hash aggregation with its own
    actor pool (seconds of start-up on a small machine); partial sums need no shuffle at all."""
    parts = ds.map_batches(_block_sums, fn_kwargs={"columns": columns}, batch_format="pyarrow",
                           batch_size=None).take_all()
    return {c: float(sum(p[c] for p in parts)) for c in columns}


def read_stage(run: RunDir, stage: str, columns: list[str] | None = None):
    import ray

    return ray.data.read_parquet(run.path(stage), filesystem=run.fs, columns=columns, file_extensions=["parquet"])


def stage_files(run: RunDir, stage: str) -> list[str]:
    """The parquet shards of a stage, as paths on `run.fs`."""
    return sorted(f.path for f in run.fs.get_file_info(pafs_selector(run.path(stage))) if f.path.endswith(".parquet"))


def count_reasons(run: RunDir, stage: str) -> dict[str, int]:
    if not run.exists(QUARANTINE_DIR, stage):
        return {}
    files = [
        f.path
        for f in run.fs.get_file_info(pafs_selector(run.path(QUARANTINE_DIR, stage)))
        if f.path.endswith(".parquet")
    ]
    if not files:
        return {}
    reasons = pads.dataset(files, filesystem=run.fs, format="parquet").to_table(columns=["reason"])
    counts = pc.value_counts(reasons.column("reason").combine_chunks())
    return {str(v["values"]): int(v["counts"]) for v in counts.to_pylist()}


def pafs_selector(path: str):
    import pyarrow.fs as pafs

    return pafs.FileSelector(path, recursive=True, allow_not_found=True)


def run_stage(
    run: RunDir,
    stage: str,
    fp: str,
    build: Callable[[], Any],
    *,
    rows_in: int | Callable[[], int] | None,
    out_as_input: Callable[[Any, int], int] | None = None,
    unit_in: str = "row",
    unit_out: str = "row",
) -> StageRecord:
    """Build the stage's dataset, write good rows to `<stage>/` and the rest to `quarantine/<stage>/`.

    `build` returns a lazy Ray Dataset whose rows may carry a reason in the quarantine column. It is
    materialized once (in the object store, spilling to disk when large) so that the two writes do not run
    the models twice.
    """
    if run.is_complete(stage, fp):
        rec = run.stage_record(stage)
        assert rec is not None
        rec.skipped = True
        say(f"stage {stage}: complete for this config, skipped ({rec.rows_out} {unit_out}s)")
        return rec

    say(f"stage {stage}: running")
    t0 = time.perf_counter()
    # A folder without this fingerprint's _SUCCESS is a killed run's or another config's: cleared, not mixed.
    run.remove(stage)
    run.remove(QUARANTINE_DIR, stage)

    ds = build().materialize()
    good = ds.map_batches(_good, batch_format="pyarrow", batch_size=None)
    bad = ds.map_batches(_bad, batch_format="pyarrow", batch_size=None)

    rows_out, n_bad = _split_counts(ds)
    _write(good, run, stage, rows_out)
    if n_bad:
        _write(bad, run, f"{QUARANTINE_DIR}/{stage}", n_bad)
        run.write_text(fp, QUARANTINE_DIR, stage, SUCCESS)
    quarantined = count_reasons(run, stage)
    # rows_in=None: a 1:1 stage whose every input row comes out, good or quarantined.
    n_in = rows_out + n_bad if rows_in is None else (rows_in() if callable(rows_in) else int(rows_in))
    as_input = out_as_input(good, rows_out) if out_as_input else rows_out
    rec = StageRecord(
        rows_in=int(n_in),
        rows_out=int(rows_out),
        rows_out_as_input=int(as_input),
        quarantined=quarantined,
        seconds=round(time.perf_counter() - t0, 2),
        fingerprint=fp,
        unit_in=unit_in,
        unit_out=unit_out,
    )
    # The commit: _SUCCESS goes in after every shard (and the quarantine), then the manifest's record. No
    # folder is renamed, which object stores cannot do; a killed run leaves a folder without the marker.
    run.write_text(fp, stage, SUCCESS)
    run.record(stage, rec)
    qmsg = f", quarantined {rec.quarantined_total} ({', '.join(f'{k}: {v}' for k, v in quarantined.items())})" \
        if quarantined else ""
    say(f"stage {stage}: {rec.rows_in} {unit_in}s in -> {rec.rows_out} {unit_out}s out{qmsg} in {rec.seconds:.1f}s")
    if not rec.balanced:
        raise RuntimeError(
            f"stage {stage}: row accounting does not add up: {rec.rows_in} in != "
            f"{rec.rows_out_as_input} out + {rec.quarantined_total} quarantined"
        )
    return rec


def _write(ds, run: RunDir, rel: str, n_rows: int) -> None:
    """Write parquet shards; an empty result still gets one empty shard carrying the schema."""
    path = run.path(*rel.split("/"))
    if n_rows:
        ds.write_parquet(path, filesystem=run.fs)
        return
    import pyarrow.parquet as pq

    schema = ds.schema()
    arrow_schema = schema.base_schema if schema is not None and hasattr(schema, "base_schema") else None
    if not isinstance(arrow_schema, pa.Schema):
        arrow_schema = pa.schema([])
    run.fs.create_dir(path, recursive=True)
    with run.fs.open_output_stream(path + "/empty-0.parquet") as f:
        pq.write_table(arrow_schema.empty_table(), f)
