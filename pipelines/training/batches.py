"""A rank's training rows, tokenized once, and which of them each (step, micro-batch) uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch


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
    def build(cls, rows: pa.Table, tokenizer: Any, max_length: int | None,
              max_prompt_length: int | None = None) -> LocalData:
        from operators.logprobs import completion_lengths, encode_pairs
        from pipelines.training.losses import route_mask

        cols = set(rows.column_names)
        examples = encode_pairs(tokenizer, *(rows.column(c).to_pylist() for c in ("prompt", "chosen", "rejected")),
                                max_prompt_length=max_prompt_length)
        ours = [completion_lengths(e, max_length) for e in examples]
        empty = [i for i, lengths in enumerate(ours) if min(lengths) == 0]
        if empty:
            # The reference stage quarantines these; they get here when the input brought its own reference
            # columns or the loss needs none. Training them would silently give a zero (SFT) or meaningless
            # (DPO) loss.
            ids = row_ids(rows)
            raise ValueError(f"{len(empty)} pairs (e.g. {ids[empty[0]]!r}) have a prompt that fills "
                             f"input.max_length={max_length} tokens, leaving no completion token; set "
                             "input.max_prompt_length below input.max_length (it keeps the prompt's end) or drop "
                             "these pairs")
        if "chosen_tokens" in cols:  # the reference stage must have tokenized exactly as we do
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
    through a fresh seeded permutation per local epoch.

    With a curriculum and the last partial global batch kept (optim.drop_last false), every rank still runs
    `steps_per_epoch` steps of `grad_accum` full micro-batches, so the ranks' collectives stay in lockstep:
    the slots past a rank's last row repeat a real row with weight 0 (`weights`), and contribute nothing to
    the loss, the gradient or the metrics. Those are the last (hardest) rows of the order, the SFT-routed
    pairs of MixDPO, which dropping the partial slice would never train on.
    """

    n_rows: int
    micro_batch: int
    grad_accum: int
    curriculum: bool
    seed: int = 0
    rank: int = 0
    steps_per_epoch: int | None = None  # curriculum: the same on every rank; null = n_rows // rows_per_step

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch * self.grad_accum

    def _slots(self, step: int, micro: int) -> np.ndarray:
        per = self.rows_per_step
        steps_per_epoch = self.steps_per_epoch or self.n_rows // per
        start = (step % steps_per_epoch) * per + micro * self.micro_batch
        return np.arange(start, start + self.micro_batch)

    def indices(self, step: int, micro: int) -> np.ndarray:
        if self.curriculum:
            slots = self._slots(step, micro)
            return np.where(slots < self.n_rows, slots, self.n_rows - 1)
        per = self.rows_per_step
        k = step * per + micro * self.micro_batch + np.arange(self.micro_batch)
        epoch, within = k // self.n_rows, k % self.n_rows
        out = np.empty_like(k)
        for e in np.unique(epoch):
            perm = np.random.default_rng([self.seed, self.rank, int(e)]).permutation(self.n_rows)
            out[epoch == e] = perm[within[epoch == e]]
        return out

    def weights(self, step: int, micro: int) -> np.ndarray:
        """1.0 for a real row, 0.0 for a padding slot of the last partial curriculum step."""
        if not self.curriculum:
            return np.ones(self.micro_batch)
        return (self._slots(step, micro) < self.n_rows).astype(np.float64)


def steps_per_epoch(n_pairs: int, global_batch: int, drop_last: bool) -> int:
    return n_pairs // global_batch if drop_last else -(-n_pairs // global_batch)


def global_rows(step: int, n_pairs: int, global_batch: int, drop_last: bool, curriculum: bool) -> int:
    """Real rows that global step `step` trains on, over all ranks: the loss is their mean. Only the last
    step of a curriculum epoch can be partial; shuffled ranks fill theirs from the next local epoch."""
    if not curriculum:
        return global_batch
    s = step % steps_per_epoch(n_pairs, global_batch, drop_last)
    return min(global_batch, n_pairs - s * global_batch)


def route_column(table: pa.Table) -> list[str | None]:
    return table.column("route").to_pylist() if "route" in table.column_names else [None] * table.num_rows

def row_ids(table: pa.Table) -> list[str]:
    if "prompt_id" in table.column_names:
        return [str(x) for x in table.column("prompt_id").to_pylist()]
    return [str(i) for i in range(table.num_rows)]
