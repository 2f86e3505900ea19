"""Running one stage: skip if complete, split good rows from quarantined ones, write, count, record."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from ray.data.datasource import Datasink

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


class _Shards:
    """One task's parquet shards in a folder: blocks go to one file while their schema matches (a block whose
    null-typed column a later block types is cast), else a new file starts. Names carry the write's token and
    the task's index, so a retried task overwrites its own files rather than adding beside them."""

    def __init__(self, fs, folder: str, stem: str):
        self.fs, self.folder, self.stem = fs, folder, stem
        self.writer = None
        self.sink = None
        self.parts = 0

    def add(self, table: pa.Table) -> None:
        import pyarrow.parquet as pq

        if self.writer is not None and table.schema != self.writer.schema:
            try:
                table = table.cast(self.writer.schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
                self.close()
        if self.writer is None:
            if self.parts == 0:
                self.fs.create_dir(self.folder, recursive=True)
            self.sink = self.fs.open_output_stream(f"{self.folder}/{self.stem}-{self.parts}.parquet")
            self.writer = pq.ParquetWriter(self.sink, table.schema)
            self.parts += 1
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.sink.close()
        self.writer = self.sink = None


class SplitSink(Datasink):
    """A stage's one write: each block's good rows go to `<stage>/`, its quarantined rows (with `reason`) to
    `quarantine/<stage>/`, in the pass that computes them. Nothing is materialized first, so a stage's rows
    (and their texts) never sit in the object store or spill; the counts come back with the write: good rows,
    quarantined rows by reason, and the totals of `sum_columns` over the good rows."""

    def __init__(self, fs, good_dir: str, bad_dir: str, sum_columns: tuple[str, ...] = ()):
        self.fs, self.good_dir, self.bad_dir = fs, good_dir, bad_dir
        self.sum_columns = sum_columns
        self.token = uuid.uuid4().hex[:12]  # drawn on the driver: the same for every try of a task
        self.rows_out = 0
        self.reasons: dict[str, int] = {}
        self.sums: dict[str, float] = dict.fromkeys(sum_columns, 0.0)
        self.schema: pa.Schema | None = None  # of the good rows, for an empty stage's one empty shard

    def write(self, blocks, ctx) -> dict:
        from ray.data.block import BlockAccessor

        stem = f"{self.token}-{ctx.task_idx:06d}"
        good_out, bad_out = _Shards(self.fs, self.good_dir, stem), _Shards(self.fs, self.bad_dir, stem)
        out: dict = {"good": 0, "reasons": {}, "sums": dict.fromkeys(self.sum_columns, 0.0), "schema": None}
        try:
            for block in blocks:
                table = BlockAccessor.for_block(block).to_arrow()
                good = _good(table)
                if out["schema"] is None:
                    out["schema"] = good.schema
                if good.num_rows:
                    good_out.add(good)
                    out["good"] += good.num_rows
                    for c in self.sum_columns:
                        out["sums"][c] += float(pc.sum(pc.cast(good.column(c), pa.float64())).as_py() or 0.0)
                if QUARANTINE in table.column_names and table.column(QUARANTINE).null_count < table.num_rows:
                    bad = _bad(table)
                    bad_out.add(bad)
                    for v in pc.value_counts(bad.column("reason").combine_chunks()).to_pylist():
                        out["reasons"][str(v["values"])] = out["reasons"].get(str(v["values"]), 0) + int(v["counts"])
        finally:
            good_out.close()
            bad_out.close()
        return out

    def on_write_complete(self, write_result) -> None:
        for r in write_result.write_returns:
            if not r:
                continue
            self.rows_out += r["good"]
            for k, v in r["reasons"].items():
                self.reasons[k] = self.reasons.get(k, 0) + v
            for c, v in r["sums"].items():
                self.sums[c] += v
            if self.schema is None:
                self.schema = r["schema"]


def read_stage(run: RunDir, stage: str, columns: list[str] | None = None):
    import ray

    return ray.data.read_parquet(run.path(stage), filesystem=run.fs, columns=columns, file_extensions=["parquet"])


def read_columns(run: RunDir, stage: str, columns: list[str]) -> pa.Table:
    """Some columns of a stage, read on the driver (keys only: the texts stay in the files). Shards written by
    different tasks may type an all-null column as null; their schemas are unified first."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    files = stage_files(run, stage)
    schemas = [pq.read_schema(f, filesystem=run.fs) for f in files]
    schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
    have = [c for c in columns if c in schema.names]
    return pads.dataset(files, schema=schema, filesystem=run.fs, format="parquet").to_table(columns=have)


def stage_files(run: RunDir, stage: str) -> list[str]:
    """The parquet shards of a stage, as paths on `run.fs`."""
    return sorted(f.path for f in run.fs.get_file_info(pafs_selector(run.path(stage))) if f.path.endswith(".parquet"))


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
    out_as_input: str | None = None,
    unit_in: str = "row",
    unit_out: str = "row",
) -> StageRecord:
    """Build the stage's dataset, write good rows to `<stage>/` and the rest to `quarantine/<stage>/`.

    `build` returns a lazy Ray Dataset whose rows may carry a reason in the quarantine column. It runs once,
    streaming into one write (`SplitSink`) that splits each block as it comes, so the models run once and the
    rows are never materialized. `out_as_input` names a column whose total over the good rows counts them in
    the input's unit (the statistics' `n`: responses per prompt row).
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

    ds = build()
    sink = SplitSink(run.fs, run.path(stage), run.path(QUARANTINE_DIR, stage),
                     (out_as_input,) if out_as_input else ())
    ds.write_datasink(sink)
    rows_out, quarantined = sink.rows_out, dict(sorted(sink.reasons.items()))
    if not rows_out:
        _empty_shard(run, stage, sink.schema or _good(_schema_of(ds).empty_table()).schema)
    if quarantined:
        run.write_text(fp, QUARANTINE_DIR, stage, SUCCESS)
    # rows_in=None: a 1:1 stage whose every input row comes out, good or quarantined.
    n_bad = sum(quarantined.values())
    n_in = rows_out + n_bad if rows_in is None else (rows_in() if callable(rows_in) else int(rows_in))
    as_input = int(round(sink.sums[out_as_input])) if out_as_input else rows_out
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


def _schema_of(ds) -> pa.Schema:
    schema = ds.schema()
    arrow_schema = schema.base_schema if schema is not None and hasattr(schema, "base_schema") else None
    return arrow_schema if isinstance(arrow_schema, pa.Schema) else pa.schema([])


def _empty_shard(run: RunDir, stage: str, schema: pa.Schema) -> None:
    """A stage with no good rows still gets one empty shard carrying the schema, for the stages after it."""
    import pyarrow.parquet as pq

    path = run.path(stage)
    run.fs.create_dir(path, recursive=True)
    with run.fs.open_output_stream(path + "/empty-0.parquet") as f:
        pq.write_table(schema.empty_table(), f)
