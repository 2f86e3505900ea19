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
s*G + a*B*W .. s*G + (a+1)*B*W - 1: gradient accumulation follows the order too.

Without an order, the usual split applies (each worker reads its own shard) and each rank shuffles its rows
with a seed per (rank, epoch); every rank runs exactly `total_steps` steps, cycling its rows as needed.
Ray's split is not deterministic, so a resumed shuffled run continues at the right step and lr, but its
ranks may hold other rows than before (statistically the same; a curriculum resumes exactly).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

TRAINER_STATE = "trainer_state.pt"
TRAINER_STATE_JSON = "trainer_state.json"


# ----------------------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------------------


def locate_pairs(path: str) -> str:
    """A run folder's pairs/ when there is one, else the path itself."""
    if "://" not in path and os.path.isdir(os.path.join(path, "pairs")):
        return os.path.join(path, "pairs")
    return path


def input_stamp(path: str) -> list:
    """Sizes and mtimes of local parquet inputs: a changed input recomputes the reference log-probs."""
    if "://" in path or not os.path.exists(path):
        return [path]
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".parquet"))
    return [[f, os.stat(f).st_size, int(os.stat(f).st_mtime)] for f in files]


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


# ----------------------------------------------------------------------------------------------------------
# Which rows, when
# ----------------------------------------------------------------------------------------------------------


def curriculum_rows(batches: Iterable[pa.Table], positions: np.ndarray, rank: int, world: int,
                    global_batch: int) -> pa.Table:
    """This rank's rows of the curriculum, sorted by position, with a `_pos` column (see the module doc)."""
    used = (len(positions) // global_batch) * global_batch  # the last partial slice is dropped
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
    expected = curriculum_positions(used // global_batch, rank, world, global_batch)
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
               global_batch: int) -> pa.Table:
    projected = (b.select([c for c in TRAIN_COLUMNS if c in b.column_names]) for b in batches)
    if positions is None:
        return shard_rows(projected)
    return curriculum_rows(projected, positions, rank, world, global_batch)


@dataclass(frozen=True)
class LocalData:
    """A rank's pairs, tokenized once, with what the loss needs per row."""

    examples: list[dict[str, list[int]]]
    is_sft: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    ids: list[str]
    pos: list[int | None]

    @property
    def n_rows(self) -> int:
        return len(self.examples)

    @classmethod
    def build(cls, rows: pa.Table, tokenizer: Any, max_length: int | None) -> LocalData:
        from pipelines.dpo_data import completion_lengths, encode_pairs
        from pipelines.losses import route_mask

        cols = set(rows.column_names)
        examples = encode_pairs(tokenizer, *(rows.column(c).to_pylist() for c in ("prompt", "chosen", "rejected")))
        if "chosen_tokens" in cols:  # the reference stage must have tokenized exactly as we do
            ours = [completion_lengths(e, max_length) for e in examples]
            theirs = list(zip(rows.column("chosen_tokens").to_pylist(), rows.column("rejected_tokens").to_pylist(),
                              strict=True))
            if ours != theirs:
                raise RuntimeError("the reference log-probs were computed with another tokenization (tokenizer "
                                   "or input.max_length changed); delete pairs_ref/ and rerun")

        def floats(name: str) -> torch.Tensor | None:
            if name not in cols:
                return None
            return torch.tensor(rows.column(name).to_numpy(zero_copy_only=False), dtype=torch.float64)

        has_ref = {"ref_chosen_logp", "ref_rejected_logp"} <= cols
        return cls(
            examples=examples,
            is_sft=route_mask(route_column(rows)),
            ref_chosen=floats("ref_chosen_logp") if has_ref else None,
            ref_rejected=floats("ref_rejected_logp") if has_ref else None,
            ids=row_ids(rows),
            pos=rows.column("_pos").to_pylist() if "_pos" in cols else [None] * rows.num_rows,
        )


@dataclass(frozen=True)
class LocalSchedule:
    """Local row indices for (step, micro-batch). Curriculum rows are already in order; others are cycled
    through a fresh seeded permutation per local epoch."""

    n_rows: int
    micro_batch: int
    grad_accum: int
    curriculum: bool
    seed: int = 0
    rank: int = 0

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch * self.grad_accum

    def indices(self, step: int, micro: int) -> np.ndarray:
        per = self.rows_per_step
        if self.curriculum:
            steps_per_epoch = self.n_rows // per
            start = (step % steps_per_epoch) * per + micro * self.micro_batch
            return np.arange(start, start + self.micro_batch)
        k = step * per + micro * self.micro_batch + np.arange(self.micro_batch)
        epoch, within = k // self.n_rows, k % self.n_rows
        out = np.empty_like(k)
        for e in np.unique(epoch):
            perm = np.random.default_rng([self.seed, self.rank, int(e)]).permutation(self.n_rows)
            out[epoch == e] = perm[within[epoch == e]]
        return out


def route_column(table: pa.Table) -> list[str | None]:
    return table.column("route").to_pylist() if "route" in table.column_names else [None] * table.num_rows


def row_ids(table: pa.Table) -> list[str]:
    if "prompt_id" in table.column_names:
        return [str(x) for x in table.column("prompt_id").to_pylist()]
    return [str(i) for i in range(table.num_rows)]


# ----------------------------------------------------------------------------------------------------------
# Model wrapping and checkpoints
# ----------------------------------------------------------------------------------------------------------


def disable_dropout(model: torch.nn.Module) -> None:
    """As TRL's DPOTrainer does: dropout would make the policy's log-probs noisy against the fixed reference."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def wrap_model(model: torch.nn.Module, *, fsdp: bool, device: torch.device, world: int) -> torch.nn.Module:
    """DDP for models that fit one device; FSDP2 (`fully_shard` on each decoder layer, then the root) for
    those that do not. FSDP shards the CPU-loaded model and moves only the shards to the device."""
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        layer_names = set(getattr(model, "_no_split_modules", None) or [])
        layers = [m for m in model.modules() if type(m).__name__ in layer_names]
        if not layers:
            raise ValueError(f"{type(model).__name__} declares no _no_split_modules; cannot pick FSDP units")
        mesh = init_device_mesh(device.type, (world,))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    model = model.to(device)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def unwrap(model: torch.nn.Module) -> Any:
    return getattr(model, "module", model)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state on rank 0, for DDP and FSDP alike. A collective: every
    rank must call it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def fast_forward(scheduler: Any, step: int) -> None:
    """Put a fresh LambdaLR at `step`: the optimizer's lr becomes base_lr * lambda(step)."""
    import warnings

    scheduler.last_epoch = step - 1
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore")
        scheduler.step()


def write_checkpoint(folder: str, model: torch.nn.Module, model_state: dict, tokenizer: Any,
                     trainer_state: dict[str, Any], summary: dict[str, Any]) -> None:
    """A Hugging Face folder that from_pretrained and vLLM load as is, plus the trainer state to resume."""
    unwrap(model).save_pretrained(folder, state_dict=model_state)
    tokenizer.save_pretrained(folder)
    torch.save(trainer_state, os.path.join(folder, TRAINER_STATE))
    with open(os.path.join(folder, TRAINER_STATE_JSON), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, sort_keys=True, default=float)


def param_digest(model: torch.nn.Module) -> str:
    """A hash of every parameter's bytes: equal across DDP ranks iff the replicas are bit-identical."""
    h = hashlib.sha256()
    for name, p in sorted(unwrap(model).named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------


class StepMetrics:
    """Sums of per-example metrics over one step's micro-batches; `reduce` averages them over all ranks."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.count = 0
        self.tokens = 0

    def add(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], tokens: int) -> None:
        self.sums["loss"] += float(loss.detach().sum())
        for k, v in metrics.items():
            self.sums[k] += float(v.detach().float().sum())
        self.count += int(loss.numel())
        self.tokens += tokens

    def reduce(self, device: torch.device) -> tuple[dict[str, float], int, int]:
        keys = sorted(self.sums)
        t = torch.tensor([self.sums[k] for k in keys] + [self.count, self.tokens], dtype=torch.float64,
                         device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        count = int(t[-2].item())
        return {k: float(t[i].item()) / max(count, 1) for i, k in enumerate(keys)}, count, int(t[-1].item())


def append_jsonl(path: str, record: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True, default=float) + "\n")
