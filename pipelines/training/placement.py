"""Helpers of the DPO training loop (pipelines/train_dpo.py): which rows each rank trains on at each step,
model wrapping (DDP / FSDP2), checkpoints, and cross-rank metric reduction.

Data placement. With a curriculum (an `order` column), global step s must consume the s-th slice of the
ordered pairs, G = workers x per_device_batch x grad_accum rows, split across ranks. Ray Data's streaming
split hands out blocks in no particular order, and even a sorted dataset is only iterated in order with
`preserve_order`, which Train's per-worker iterators do not promise. So every worker receives the whole
dataset (DataConfig(datasets_to_split=[])), maps each row's `order` to its dense position p (rank of the
order value among all of them, which the driver computed once), and keeps the rows with p mod G mod W ==
rank. That is exact whatever order the blocks arrive in, keeps 1/W of the rows in each worker's memory, and
costs one full read per worker, which is small next to training. Rank r's i-th row of step s is position
s*G + r + i*W, so micro-batch a of every rank together covers the contiguous positions
s*G + a*B*W .. s*G + (a+1)*B*W - 1: gradient accumulation follows the order too. The last slice may be
partial (optim.drop_last false, the default, as the MixDPO authors' HF dataloader): the same rule places its
rows, and the ranks pad their step with zero-weight rows (batches.LocalSchedule).

Without an order, the usual split applies (each worker reads its own shard) and each rank shuffles its rows
with a seed per (rank, epoch); every rank runs exactly `total_steps` steps, cycling its rows as needed.
Ray's split is not deterministic, so a resumed shuffled run continues at the right step and lr, but its
ranks may hold other rows than before (statistically the same; a curriculum resumes exactly).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipelines.runtime.manifest import filesystem_of


def locate_pairs(path: str) -> str:
    """A run folder's pairs/ when there is one, else the path itself: a local path or a URI (s3://, gs://;
    a query such as ?endpoint_override=... stays at the end)."""
    fs, root = filesystem_of(path)
    if fs.get_file_info(root.rstrip("/") + "/pairs").type != pafs.FileType.Directory:
        return path
    if "://" not in path:
        return os.path.join(path, "pairs")
    base, sep, query = path.partition("?")
    return f"{base.rstrip('/')}/pairs{sep}{query}"

def input_stamp(path: str) -> list:
    """Sizes and mtimes of the parquet inputs, local or behind a URI: a changed input recomputes the
    reference log-probs."""
    fs, root = filesystem_of(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return [path]
    files = [info] if info.type == pafs.FileType.File else sorted(
        (f for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if f.path.endswith(".parquet")),
        key=lambda f: f.path)
    return [[f.path, f.size, int(f.mtime.timestamp()) if f.mtime else None] for f in files]

def require_sft_routes(ds: Any, where: str) -> int:
    """MixDPO with no pair routed to SFT is plain DPO under another name (with `select.margin_tau` and
    `select.sft_quantile` both null, margin_curriculum routes every pair to dpo): refuse it, with the fix.
    One string column to the driver. Returns the number of sft rows."""
    from pipelines.runtime.config import ConfigError

    how = ("curate with select.rule=margin_curriculum select.margin_tau=0.5 (the MixDPO paper: route = sft "
           "where score_chosen - score_rejected < 0.5, on 1-10 ratings; rescale tau for other scales), or "
           "select.sft_quantile=q (prefsift's own option, not in the paper: the hardest q of the pairs); or train "
           "with loss.name=sigmoid")
    if "route" not in ds.schema().names:
        raise ConfigError(f"loss mixdpo needs the column 'route' (dpo | sft), which the pairs at {where} lack: "
                          + how)
    n_sft = 0
    for b in ds.select_columns(["route"]).iter_batches(batch_format="pyarrow", batch_size=None):
        n_sft += int(pc.sum(pc.equal(b.column("route"), "sft")).as_py() or 0)
    if n_sft == 0:
        raise ConfigError(f"loss mixdpo: no pair at {where} has route = sft, so every pair would train with "
                          "DPO: " + how)
    return n_sft


def order_values(ds: Any) -> np.ndarray | None:
    """Sorted `order` values when every pair has one, None when none has; one int column to the driver."""
    if "order" not in ds.schema().names:
        return None
    chunks = [b.column("order") for b in ds.select_columns(["order"]).iter_batches(batch_format="pyarrow",
                                                                                   batch_size=None)]
    order = pa.chunked_array([c.cast(pa.int64()) for ch in chunks for c in ch.chunks], type=pa.int64()) \
        if chunks else None
    if order is None or order.null_count == len(order):
        return None
    if order.null_count:
        raise ValueError(f"column 'order' is null for {order.null_count} of {len(order)} pairs; a curriculum "
                         "needs a position for every pair (or for none)")
    values = np.sort(order.to_numpy())
    if len(values) > 1 and (np.diff(values) == 0).any():
        raise ValueError("column 'order' has repeated values; it must be a position, unique per pair")
    return values

def curriculum_rows(batches: Iterable[pa.Table], positions: np.ndarray, rank: int, world: int,
                    global_batch: int, drop_last: bool = True) -> pa.Table:
    """This rank's rows of the curriculum, sorted by position, with a `_pos` column (see the module doc).
    With drop_last false the last partial slice is kept: its rows follow the same rule, so a rank may hold
    fewer of them than a full step (LocalSchedule pads with zero weight)."""
    n = len(positions)
    used = (n // global_batch) * global_batch if drop_last else n
    kept = []
    for b in batches:
        pos = np.searchsorted(positions, b.column("order").to_numpy(zero_copy_only=False))
        keep = (pos < used) & ((pos % global_batch) % world == rank)
        if keep.any():
            t = b.filter(pa.array(keep))
            kept.append(t.append_column("_pos", pa.array(pos[keep], pa.int64())))
    if not kept:
        raise ValueError(f"rank {rank} received no curriculum rows")
    table = pa.concat_tables(kept).sort_by("_pos")
    expected = curriculum_positions(-(-used // global_batch), rank, world, global_batch)
    expected = expected[expected < used]
    got = table.column("_pos").to_numpy()
    if len(got) != len(expected) or not np.array_equal(got, expected):
        raise RuntimeError(f"rank {rank}: curriculum rows do not match the order ({len(got)} rows, "
                           f"expected {len(expected)}); is `order` unique and the input unchanged?")
    return table

def curriculum_positions(steps: int, rank: int, world: int, global_batch: int) -> np.ndarray:
    per_rank = global_batch // world
    s = np.repeat(np.arange(steps), per_rank)
    i = np.tile(np.arange(per_rank), steps)
    return s * global_batch + rank + i * world


def shard_rows(batches: Iterable[pa.Table]) -> pa.Table:
    """This rank's split, in a canonical row order, so a seed gives the same shuffle whatever the arrival."""
    tables = list(batches)
    if not tables:
        raise ValueError("this rank received no pairs")
    table = pa.concat_tables(tables)
    text = {f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)}
    # Message-list (conversational) columns cannot be sorted; the string ones identify a row well enough.
    return table.sort_by([(c, "ascending") for c in ("prompt_id", "prompt", "chosen", "rejected") if c in text])

# Only the columns training uses travel to the worker's memory.
TRAIN_COLUMNS = ("prompt", "chosen", "rejected", "prompt_id", "route", "order", "ref_chosen_logp",
                 "ref_rejected_logp", "chosen_tokens", "rejected_tokens")

def local_rows(batches: Iterable[pa.Table], positions: np.ndarray | None, rank: int, world: int,
               global_batch: int, drop_last: bool = True) -> pa.Table:
    projected = (b.select([c for c in TRAIN_COLUMNS if c in b.column_names]) for b in batches)
    if positions is None:
        return shard_rows(projected)
    return curriculum_rows(projected, positions, rank, world, global_batch, drop_last)
