"""Checkpoints: a Hugging Face folder that from_pretrained and vLLM load as is, plus the trainer state."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

from pipelines.training.model import unwrap

TRAINER_STATE = "trainer_state.pt"
TRAINER_STATE_JSON = "trainer_state.json"


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


@contextlib.contextmanager
def local_folder(checkpoint: Any, local_rank: int, world: int) -> Iterator[str]:
    """A Ray Train checkpoint as a local folder that every rank of the worker group reads. A collective when
    world > 1: every rank must enter, and leave without an error.

    On a local (or shared) filesystem the folder is the checkpoint itself. On an object store each node's
    local rank 0 downloads it once, into a folder of its own, while the node's other ranks wait; the folder
    is removed once every rank has left. Not Ray's `Checkpoint.as_directory`: there a rank that asks after
    the node's first download has finished downloads again into the same folder while the first rank reads
    it (ray-project/ray#48726), and from_pretrained then meets a model.safetensors being rewritten under it
    ("header too small").
    """
    import pyarrow.fs as pafs

    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield checkpoint.path
        return
    mine = None
    if local_rank == 0:
        mine = tempfile.mkdtemp(prefix="prefsift-checkpoint-")
        try:
            checkpoint.to_directory(mine)
        except BaseException:
            shutil.rmtree(mine, ignore_errors=True)
            raise
    folder = mine
    if world > 1:
        import ray

        node = ray.get_runtime_context().get_node_id()
        seen: list[Any] = [None] * world
        torch.distributed.all_gather_object(seen, (node, mine))
        folder = next(path for n, path in seen if n == node and path is not None)
    try:
        yield folder
        if world > 1:
            torch.distributed.barrier()  # every rank of the node has loaded what it needs from the folder
    finally:
        if mine is not None:
            shutil.rmtree(mine, ignore_errors=True)
