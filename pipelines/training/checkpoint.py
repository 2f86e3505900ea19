"""Checkpoints: a Hugging Face folder that from_pretrained and vLLM load as is, plus the trainer state."""

from __future__ import annotations

import json
import os
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
