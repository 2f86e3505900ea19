"""Running one stage: skip if complete, split good rows from quarantined ones, write, count, record."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from ray.data.datasource import Datasink

from operators.base import QUARANTINE, QUARANTINE_DETAIL
from operators.read import read_parquet_files
from operators.responses import one_array
from operators.stats import QUARANTINE_SAMPLE
from pipelines.runtime.console import say
from pipelines.runtime.manifest import SUCCESS, RunDir, StageRecord
from pipelines.runtime.shards import PerShard, run_per_shard, stage_files

QUARANTINE_DIR = "quarantine"
HELD_SUFFIX = ".held"  # <stage>.held/: rows an Aside holds until the pass ends
# Fault injection, for the test that kills a driver mid-stage (tests/cluster/test_faults.py): with this set to a
# stage's name, the driver writes that stage's rows, says so, and waits before the commit (its _SUCCESS) until
# it is killed or HOLD_S pass. A stage can take a tenth of a second, less than a watcher needs to see it.
HOLD_ENV = "PREFSIFT_HOLD_BEFORE_COMMIT"
HOLD_S = 600


def _good(table: pa.Table) -> pa.Table:
    if QUARANTINE not in table.column_names:
        return table
    # A filter copies every column, texts included, even when it keeps every row.
    reasons = table.column(QUARANTINE)
    keep = table.filter(pc.is_null(reasons)) if reasons.null_count < table.num_rows else table
    return keep.drop_columns([c for c in keep.column_names if c.startswith(QUARANTINE)])


def _one_chunk(table: pa.Table) -> pa.Table:
    """Columns in several chunks (a block Ray Data built from smaller ones) combined; single chunks kept."""
    return pa.Table.from_arrays([one_array(c) for c in table.columns], schema=table.schema)


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

    def finish(self) -> None:
        """Close, then delete parts past this try's last one: a failed try of the task that wrote more parts
        would otherwise leave its tail beside this try's files."""
        import pyarrow.fs as pafs

        self.close()
        part = self.parts
        while True:
            path = f"{self.folder}/{self.stem}-{part}.parquet"
            if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
                return
            self.fs.delete_file(path)
            part += 1


@dataclass(frozen=True)
class Aside:
    """Rows a stage can judge only once it has seen all of them (rows whose prompt_id repeats): the write
    holds the rows with `flag` set in a side folder instead of the stage's; after the pass, `settle(held)`
    returns them with their reasons in the quarantine column, and they go where the others went. `private`:
    columns only the held rows need (row ids), dropped from the others."""

    flag: str
    settle: Callable[[pa.Table], pa.Table]
    private: tuple[str, ...] = ()


@dataclass(frozen=True)
class Then:
    """A second stage computed in the same pass from the first one's good rows, where the boundary between
    them buys no resumability (rated input: the statistics of the validated prompts, without reading prompts/
    back). `derive(good)` returns the second stage's rows, reasons in the quarantine column; `sums(good)`
    returns numbers that add up over blocks (the response count, PD's norms). Rows an `Aside` holds are
    derived when they are settled, so the second stage covers exactly the first one's good rows. After the
    first stage commits, `finish(sink)` runs (PD from the norms), then the second stage commits with
    `fp`; a driver killed before that leaves it without `_SUCCESS`, and the rerun computes it on its own.
    `private_prefix`: columns the derived good rows keep until `finish`, dropped from its quarantined rows."""

    stage: str
    fp: str
    derive: Callable[[pa.Table], pa.Table]
    sums: Callable[[pa.Table], dict[str, float]] | None = None
    finish: Callable[[SplitSink], None] | None = None
    private_prefix: str = ""
    rows_in: str | None = None  # the key of `sums` that counts the second stage's input
    out_as_input: str | None = None
    unit_in: str = "row"
    unit_out: str = "row"


class SplitSink(Datasink):
    """A stage's one write: each block's good rows go to `<stage>/`, its quarantined rows (with `reason`) to
    `quarantine/<stage>/`, in the pass that computes them; with an `Aside`, its flagged rows to `held_dir`.
    Nothing is materialized first, so a stage's rows (and their texts) never sit in the object store or spill;
    the counts come back with the write: good rows, quarantined rows by reason, and the totals of `sum_columns`
    over the good rows."""

    def __init__(self, fs, good_dir: str, bad_dir: str, sum_columns: tuple[str, ...] = (),
                 aside: Aside | None = None, held_dir: str | None = None, then: Then | None = None,
                 then_dirs: tuple[str, str] | None = None, private_prefix: str = ""):
        self.fs, self.good_dir, self.bad_dir = fs, good_dir, bad_dir
        self.sum_columns = sum_columns
        self.aside, self.held_dir = aside, held_dir
        self.private_prefix = private_prefix  # columns of good rows only (kept for a later step), not of bad ones
        # The second stage's own split, fed the first one's good rows through `then.derive` (`then.finish`, the
        # driver's, does not travel with the sink to the write tasks).
        self.derive, self.derive_sums = (then.derive, then.sums) if then is not None else (None, None)
        self.then_sink = SplitSink(fs, *then_dirs, (then.out_as_input,) if then.out_as_input else (),
                                   private_prefix=then.private_prefix) \
            if then is not None and then_dirs is not None else None
        self.token = uuid.uuid4().hex[:12]  # drawn on the driver: the same for every try of a task
        self.rows_out = 0
        self.held = 0
        self.reasons: dict[str, int] = {}
        self.sums: dict[str, float] = dict.fromkeys(sum_columns, 0.0)
        self.schema: pa.Schema | None = None  # of the good rows, for an empty stage's one empty shard

    def write(self, blocks, ctx) -> dict:
        from ray.data.block import BlockAccessor

        return self.write_tables((BlockAccessor.for_block(b).to_arrow() for b in blocks), f"{ctx.task_idx:06d}")

    def write_tables(self, tables, name: str) -> dict:
        """Split and write `tables` under shard names made of the write's token and `name` (a task's index,
        or the driver's part), and return their counts."""
        out: dict = {}
        if self.then_sink is None:
            for _ in self._split(tables, name, out):
                pass
            return out
        sums: dict[str, float] = {}

        def derived():
            # The first stage's good rows, derived for the second one's split as each part is written.
            for good in self._split(tables, name, out):
                if good.num_rows:
                    good = _one_chunk(good)  # once here, not once per column read by `sums` and `derive`
                    for k, v in (self.derive_sums(good) if self.derive_sums else {}).items():
                        sums[k] = sums.get(k, 0.0) + v
                    yield self.derive(good)

        inner = self.then_sink.write_tables(derived(), name)
        inner["sums"] = {**sums, **inner["sums"]}
        out["then"] = inner
        return out

    def _split(self, tables, name: str, out: dict):
        """Write `tables` (good, quarantined, held), fill `out` with their counts and yield each good part."""
        stem = f"{self.token}-{name}"
        good_out, bad_out = _Shards(self.fs, self.good_dir, stem), _Shards(self.fs, self.bad_dir, stem)
        held_out = _Shards(self.fs, self.held_dir, stem) if self.aside is not None else None
        out.update({"good": 0, "held": 0, "reasons": {}, "sums": dict.fromkeys(self.sum_columns, 0.0),
                    "schema": None})
        try:
            for table in tables:
                if held_out is not None and self.aside.flag in table.column_names:
                    flag = pc.fill_null(table.column(self.aside.flag), False)
                    table = table.drop_columns([self.aside.flag])
                    if pc.any(flag).as_py():  # else no filter: it would copy the block's texts
                        held = table.filter(flag)
                        held_out.add(held)
                        out["held"] += held.num_rows
                        table = table.filter(pc.invert(flag))
                    table = table.drop_columns([c for c in self.aside.private if c in table.column_names])
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
                    if self.private_prefix:
                        bad = bad.drop_columns([c for c in bad.column_names if c.startswith(self.private_prefix)])
                    bad_out.add(bad)
                    for v in pc.value_counts(bad.column("reason").combine_chunks()).to_pylist():
                        reason = str(v["values"])
                        out["reasons"][reason] = out["reasons"].get(reason, 0) + int(v["counts"])
                yield good
        finally:
            for shards in (good_out, bad_out, held_out):
                if shards is not None:
                    shards.finish()

    def on_write_complete(self, write_result) -> None:
        for r in write_result.write_returns:
            self.add(r)

    def add(self, r: dict | None) -> None:
        if not r:
            return
        self.rows_out += r["good"]
        self.held += r["held"]
        for k, v in r["reasons"].items():
            self.reasons[k] = self.reasons.get(k, 0) + v
        for c, v in r["sums"].items():
            self.sums[c] = self.sums.get(c, 0.0) + v
        if self.schema is None:
            self.schema = r["schema"]
        if self.then_sink is not None:
            self.then_sink.add(r.get("then"))


def read_stage(run: RunDir, stage: str, columns: list[str] | None = None):
    """A stage's shards as a dataset, one read task per shard: a stage writes a few large shards (one per write
    task), and more read tasks than shards would split each file's blocks in an operator of its own, which the
    next map cannot fuse with, and start a task per piece."""
    return read_parquet_files(run.path(stage), filesystem=run.fs, columns=columns, file_extensions=["parquet"])


def read_columns(run: RunDir, stage: str, columns: list[str] | None = None) -> pa.Table:
    """Some columns of a stage (all with None), read on the driver: keys, or rows few enough to hold (the
    texts of a large stage stay in its files). Shards written by different tasks may type an all-null column
    as null; their schemas are unified first."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    files = stage_files(run, stage)
    schemas = [pq.read_schema(f, filesystem=run.fs) for f in files]
    schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
    have = None if columns is None else [c for c in columns if c in schema.names]
    return pads.dataset(files, schema=schema, filesystem=run.fs, format="parquet").to_table(columns=have)


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
    aside: Aside | None = None,
    then: Then | None = None,
) -> StageRecord:
    """Build the stage's dataset, write good rows to `<stage>/` and the rest to `quarantine/<stage>/`.

    `build` returns a lazy Ray Dataset whose rows may carry a reason in the quarantine column. It runs once,
    streaming into one write (`SplitSink`) that splits each block as it comes, so the models run once and the
    rows are never materialized. A `build` that returns a pyarrow table (a decision made on the driver from
    key columns) is written from the driver, without a Ray Data execution; one that returns a `PerShard`, by
    a Ray task per shard of the stage it maps. `aside`: rows held out of the pass
    and settled after it (`Aside`). `out_as_input` names a column whose total over the good rows counts them
    in the input's unit (the statistics' `n`: responses per prompt row). `then`: a second stage written by
    the same pass (`Then`), committed after this one; a skipped stage computes no second one.
    """
    if run.is_complete(stage, fp):
        rec = run.stage_record(stage)
        assert rec is not None
        rec.skipped = True
        say(f"stage {stage}: complete for this config, skipped ({rec.rows_out} {unit_out}s)")
        return rec

    say(f"stage {stage}: running" + (f" (and {then.stage}, in the same pass)" if then is not None else ""))
    t0 = time.perf_counter()
    # A folder without this fingerprint's _SUCCESS is a killed run's or another config's: cleared, not mixed.
    held_dir = run.path(stage + HELD_SUFFIX)
    for name in (stage, *((then.stage,) if then is not None else ())):
        run.remove(name)
        run.remove(QUARANTINE_DIR, name)
    run.remove(stage + HELD_SUFFIX)

    ds = build()
    sink = SplitSink(run.fs, run.path(stage), run.path(QUARANTINE_DIR, stage),
                     (out_as_input,) if out_as_input else (), aside=aside, held_dir=held_dir, then=then,
                     then_dirs=(run.path(then.stage), run.path(QUARANTINE_DIR, then.stage)) if then else None)
    if isinstance(ds, pa.Table):
        sink.add(sink.write_tables([ds], "driver"))
    elif isinstance(ds, PerShard):
        run_per_shard(ds, sink)
    else:
        ds.write_datasink(sink)
    if aside is not None and sink.held:
        # The held rows (a few per cent: the ids that repeat) are judged together on the driver and written
        # beside the others (and derived, with a second stage); their side folder goes once they are in.
        held = read_columns(run, stage + HELD_SUFFIX)
        sink.add(sink.write_tables([aside.settle(held)], "settled"))
    run.remove(stage + HELD_SUFFIX)
    rec = _commit(run, stage, fp, sink, lambda: sink.schema or _schema_of(ds), t0, rows_in=rows_in,
                  out_as_input=out_as_input, unit_in=unit_in, unit_out=unit_out)
    if then is not None:
        t1 = time.perf_counter()
        inner = sink.then_sink
        assert inner is not None
        if then.finish is not None:
            then.finish(inner)

        def derived_schema() -> pa.Schema:
            return inner.schema or _schema_of(then.derive(sink.schema.empty_table()) if sink.schema else pa.table({}))

        _commit(run, then.stage, then.fp, inner, derived_schema, t1,
                rows_in=(lambda: int(round(inner.sums.get(then.rows_in, 0.0)))) if then.rows_in else None,
                out_as_input=then.out_as_input, unit_in=then.unit_in, unit_out=then.unit_out)
    return rec


def _commit(run: RunDir, stage: str, fp: str, sink: SplitSink, schema: Callable[[], pa.Schema], t0: float, *,
            rows_in, out_as_input: str | None, unit_in: str, unit_out: str) -> StageRecord:
    """A written stage's counts checked and recorded, then its _SUCCESS: the commit."""
    rows_out, quarantined = sink.rows_out, dict(sorted(sink.reasons.items()))
    if not rows_out:
        _empty_shard(run, stage, _good(schema().empty_table()).schema)
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
    if os.environ.get(HOLD_ENV) == stage:
        say(f"stage {stage}: rows written, holding before the commit ({HOLD_ENV})")
        time.sleep(HOLD_S)
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
    if isinstance(ds, pa.Table):
        return ds.schema
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
