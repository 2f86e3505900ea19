"""Duplicate prompt ids, found from keys alone: no text moves and no shuffle runs.

The rule (`duplicate_decisions`): exact copies of a row keep one, and an id whose rows differ loses all of
them. Only live rows count: a copy already quarantined for another reason does not make its id a duplicate.
Rows are told apart by ROW_ID: for parquet input, Ray Data's row hash (file and place); otherwise a random id
per block on rows held once in the object store.

Parquet input is read once: the driver reads the ids alone (`parquet_ids`), and the stage's streaming write
holds the live rows whose id repeats (`hold_repeated`, a few per cent) in a side folder, to be judged
together on the driver once the pass is over (`settle_duplicates`). That read is `KeyedParquet`, a batch of
rows at a time, with the row ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data.datasource import Datasource

from operators.base import QUARANTINE, QUARANTINE_DETAIL, with_quarantine
from operators.jsonl import file_infos, list_files

ROW_ID = "_row_id"  # a 64-bit id per row that tells copies of one prompt_id apart
HELD = "_held"  # set on the live rows whose prompt_id repeats: the stage's write holds them for the rule


def with_row_ids(batch: pa.Table) -> pa.Table:
    """Row ids for input that cannot be read twice alike: a random base per block plus the row's position."""
    base = int.from_bytes(os.urandom(8), "little") >> 2  # room for the block's rows without wrapping
    return batch.append_column(ROW_ID, pa.array(base + np.arange(batch.num_rows, dtype=np.uint64), pa.uint64()))


def parquet_ids(path: str) -> pa.Table:
    """The prompt_id column of every parquet file of an input, read on the driver: parquet column projection
    decodes no other column, and only the ids' repeats matter here, not which row holds them."""
    import pyarrow.parquet as pq

    tables = []
    for fs, f in list_files(path, extensions=("parquet",)):
        with fs.open_input_file(f) as fh:
            pf = pq.ParquetFile(fh)
            if "prompt_id" in pf.schema_arrow.names:
                tables.append(pa.table({"prompt_id": pc.cast(pf.read(columns=["prompt_id"]).column(0), pa.string())}))
    return pa.concat_tables(tables) if tables else pa.table({"prompt_id": pa.array([], pa.string())})


# The keyed parquet read: decoded bytes per batch (and block), and per read task (whole row groups; one larger
# row group is a task alone). Ray Data's write keeps every block its task wrote until the task ends (it tees
# the blocks to report them), so a task's share is what a worker holds at its peak.
KEYED_BATCH_BYTES = 16 << 20
KEYED_TASK_BYTES = 256 << 20


class KeyedParquet(Datasource):
    """Parquet files read a batch of rows at a time, each row with its ROW_ID: a hash of the file's path plus
    the row's place in the file, the same on every run, so which exact copy of a repeated id is kept does not
    change between runs. One read task per run of whole row groups of about `task_bytes` (footers read on
    the driver).

    Ray Data's parquet readers go through `pyarrow.dataset`, which decodes a whole row group before slicing
    it, and V2 also prefetches the compressed row group: with long texts, a few hundred MB per read task
    before any work. A process pays system time the first time it touches memory, so that peak, paid again
    by every worker, cost more than the work. `ParquetFile.iter_batches` decodes `batch_bytes` of rows at a
    time instead, and reads the file through a buffer rather than prefetching it.
    """

    def __init__(self, fs, paths: list[str], batch_bytes: int = KEYED_BATCH_BYTES,
                 task_bytes: int = KEYED_TASK_BYTES):
        import pyarrow.parquet as pq

        self.fs, self.batch_bytes = fs, batch_bytes
        self.units: list[tuple[str, list[int], int, int, int]] = []  # path, row groups, first row, rows, bytes
        for path in paths:
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
            groups: list[int] = []
            first = start = size = 0
            for g in range(meta.num_row_groups):
                rg = meta.row_group(g)
                rg_size = _uncompressed(rg)
                if groups and size + rg_size > task_bytes:
                    self.units.append((path, groups, first, start - first, size))
                    groups, first, size = [], start, 0
                groups.append(g)
                start += rg.num_rows
                size += rg_size
            # The last run of row groups; a file without any is one empty unit, which still gives its schema.
            self.units.append((path, groups, first, start - first, size))

    def estimate_inmemory_data_size(self) -> int:
        return sum(u[4] for u in self.units)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        from ray.data.block import BlockMetadata
        from ray.data.datasource import ReadTask

        return [ReadTask(partial(_read_keyed, self.fs, path, groups, first, self.batch_bytes),
                         BlockMetadata(num_rows=rows, size_bytes=int(size), input_files=[path], exec_stats=None),
                         per_task_row_limit=per_task_row_limit)
                for path, groups, first, rows, size in self.units]


def _uncompressed(rg) -> int:
    return sum(rg.column(i).total_uncompressed_size for i in range(rg.num_columns))


def _read_keyed(fs, path: str, groups: list[int], first: int, batch_bytes: int):
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20)
        if not groups:
            yield pf.schema_arrow.empty_table().append_column(ROW_ID, pa.array([], pa.uint64()))
            return
        base = np.frombuffer(hashlib.blake2b(path.encode(), digest_size=8).digest(), np.uint64)[0]
        start = first
        for batch in pf.iter_batches(batch_size=batch_rows(pf.metadata, batch_bytes), row_groups=groups,
                                     use_threads=False):
            table = pa.Table.from_batches([batch])
            # Wraps around 2**64 (uint64 arithmetic): ids of two files meet only if their hashes fall within
            # a file's row count of each other.
            ids = base + np.arange(start, start + table.num_rows, dtype=np.uint64)
            start += table.num_rows
            yield table.append_column(ROW_ID, pa.array(ids, pa.uint64()))


def batch_rows(meta, batch_bytes: int) -> int:
    """Rows per batch for about `batch_bytes` of decoded columns, from the widest row group's uncompressed
    size per row (the footer's figure, no data read)."""
    per_row = max((_uncompressed(rg) / rg.num_rows
                   for rg in (meta.row_group(g) for g in range(meta.num_row_groups)) if rg.num_rows),
                  default=1.0)
    return max(1, int(batch_bytes // max(per_row, 1.0)))


def read_parquet_keyed(path: str, limit: int | None = None):
    """The parquet files of an input (`operators.jsonl.file_infos`), in blocks of about KEYED_BATCH_BYTES, each
    row with its ROW_ID (`KeyedParquet`)."""
    import ray

    fs, files = file_infos(path, ("parquet",))
    source = KeyedParquet(fs, [f.path for f in files], KEYED_BATCH_BYTES, KEYED_TASK_BYTES)
    ds = ray.data.read_datasource(source, override_num_blocks=max(1, len(source.units)))
    # This dataset's own context (read_datasource copies the global one): a batch is a block, not
    # concatenated with the next ones up to Ray Data's 128 MiB before the maps.
    ds.context.target_max_block_size = KEYED_BATCH_BYTES
    return ds.limit(limit) if limit is not None else ds


def live_ids(batch: pa.Table) -> pa.Table:
    """The prompt_ids of rows not already quarantined: the only column the duplicate search collects."""
    ids = batch.column("prompt_id")
    if QUARANTINE in batch.column_names:
        ids = ids.filter(pc.is_null(batch.column(QUARANTINE)))
    return pa.table({"prompt_id": pc.cast(ids, pa.string())})


def repeated_ids(batch: pa.Table) -> pa.Table:
    """The ids seen more than once in a table of ids (nulls are no id)."""
    batch = batch.filter(pc.is_valid(batch.column("prompt_id")))
    counts = batch.group_by("prompt_id").aggregate([("prompt_id", "count")])
    return counts.filter(pc.greater(counts.column("prompt_id_count"), 1)).select(["prompt_id"])


def hold_repeated(batch: pa.Table, ids: pa.Array) -> pa.Table:
    """Flag (HELD) the live rows whose prompt_id is in `ids`: the write sets them aside for `settle_duplicates`."""
    hit = pc.is_in(pc.cast(batch.column("prompt_id"), pa.string()), value_set=ids)
    if QUARANTINE in batch.column_names:
        hit = pc.and_(hit, pc.is_null(batch.column(QUARANTINE)))
    return batch.append_column(HELD, pc.fill_null(hit, False))


def settle_duplicates(held: pa.Table) -> pa.Table:
    """The held rows, all live and of repeated ids, judged together: the rule's reasons in the quarantine
    column, the row ids dropped."""
    ids = pc.unique(pc.cast(held.column("prompt_id"), pa.string()))
    return apply_decisions(held, duplicate_decisions(digest_rows(held, ids)))


def digest_rows(batch: pa.Table, ids: pa.Array) -> pa.Table:
    """(prompt_id, row id, digest of the row's content) for the live rows whose id is in `ids`; the other rows,
    and so nearly every text, stay where they are."""
    hit = pc.is_in(pc.cast(batch.column("prompt_id"), pa.string()), value_set=ids)
    if QUARANTINE in batch.column_names:
        hit = pc.and_(hit, pc.is_null(batch.column(QUARANTINE)))
    rows = batch.filter(pc.fill_null(hit, False))
    cols = [c for c in rows.column_names if c not in (QUARANTINE, QUARANTINE_DETAIL, ROW_ID)]
    digests = [_row_digest(r) for r in rows.select(cols).to_pylist()]
    return pa.table({"prompt_id": pc.cast(rows.column("prompt_id"), pa.string()), ROW_ID: rows.column(ROW_ID),
                     "digest": pa.array(digests, pa.string())})


def duplicate_decisions(keys: pa.Table) -> pa.Table:
    """The rule, over the keys of every live row whose id repeats: exact duplicates keep one copy (the lowest
    row id) and the others are `duplicate_prompt_id`; every copy of an id whose rows differ is set aside as
    `conflicting_duplicate_prompt_id`, because no copy is the right one. Returns (row id, reason)."""
    by_id: dict[str, list[tuple[int, str]]] = {}
    for pid, rid, dig in zip(*(keys.column(c).to_pylist() for c in ("prompt_id", ROW_ID, "digest")), strict=True):
        by_id.setdefault(pid, []).append((rid, dig))
    out_ids, reasons = [], []
    for rows in by_id.values():
        if len({d for _, d in rows}) == 1:
            keep = min(r for r, _ in rows)
            drop = [(r, "duplicate_prompt_id") for r, _ in rows if r != keep]
        else:
            drop = [(r, "conflicting_duplicate_prompt_id") for r, _ in rows]
        out_ids += [r for r, _ in drop]
        reasons += [why for _, why in drop]
    return pa.table({ROW_ID: pa.array(out_ids, pa.uint64()), "reason": pa.array(reasons, pa.string())})


def apply_decisions(batch: pa.Table, decisions: pa.Table) -> pa.Table:
    """Quarantine the rows the duplicate rule set aside; drop the row ids."""
    idx = pc.index_in(batch.column(ROW_ID), value_set=decisions.column(ROW_ID))
    reasons = decisions.column("reason").combine_chunks().take(idx) if len(decisions) else \
        pa.nulls(batch.num_rows, pa.string())
    return with_quarantine(batch.drop_columns([ROW_ID]), reasons)


def dedupe_prompts(raw, prepare: Callable | None = None):
    """Set aside duplicate prompt_ids (`duplicate_decisions`) without moving a text and without a shuffle, for
    input that cannot be read twice alike (JSONL, saved datasets). `prepare(ds)` is the row-local work on the
    raw rows (validation); the rows come out of it with reasons. The prepared rows are materialized once; the
    driver collects their live ids, and only the rows whose id repeats are digested."""
    import ray

    prepare = prepare or (lambda ds: ds)
    rows = prepare(raw).map_batches(with_row_ids, batch_format="pyarrow").materialize()
    ids = _collect(ray.get(rows.map_batches(live_ids, batch_format="pyarrow", batch_size=None).to_arrow_refs()),
                   pa.schema([("prompt_id", pa.string())]))
    found = repeated_ids(ids)
    if found.num_rows == 0:
        return rows.drop_columns([ROW_ID])
    repeated = found.column("prompt_id").combine_chunks()
    keys = rows.map_batches(digest_rows, fn_kwargs={"ids": repeated}, batch_format="pyarrow", batch_size=None)
    decisions = duplicate_decisions(_collect(ray.get(keys.to_arrow_refs()), None))
    return rows.map_batches(apply_decisions, fn_kwargs={"decisions": decisions}, batch_format="pyarrow",
                            batch_size=None)


def hold_duplicates(raw, prepare: Callable, ids: pa.Table):
    """Parquet input (`read_parquet_keyed`, whose rows carry ROW_ID), with its prompt_ids read on the driver
    (`parquet_ids`): the prepared rows, the live ones with a repeated id flagged HELD for the stage's write to
    set aside and `settle_duplicates` to judge. The raw ids, quarantined rows' among them, are a superset of
    the repeats among live rows; the rule judges live rows only. One read of the input, nothing materialized."""
    rows = prepare(raw)
    found = repeated_ids(ids)
    if found.num_rows == 0:
        return rows.drop_columns([ROW_ID])
    return rows.map_batches(hold_repeated, fn_kwargs={"ids": found.column("prompt_id").combine_chunks()},
                            batch_format="pyarrow")


def _collect(tables: list[pa.Table], schema: pa.Schema | None) -> pa.Table:
    tables = [t for t in tables if t.num_rows]
    if tables:
        return pa.concat_tables(tables, promote_options="default")
    return schema.empty_table() if schema is not None else \
        pa.table({"prompt_id": pa.array([], pa.string()), ROW_ID: pa.array([], pa.uint64()),
                  "digest": pa.array([], pa.string())})


def _row_digest(row: dict) -> str:
    return hashlib.sha1(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()
