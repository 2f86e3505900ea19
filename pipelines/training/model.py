"""Model wrapping for the training loop: DDP or FSDP2, and a digest to check replicas stay in sync."""

from __future__ import annotations

import hashlib
from typing import Any

import torch


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

def param_digest(model: torch.nn.Module) -> str:
    """A hash of every parameter's bytes: equal across DDP ranks iff the replicas are bit-identical, and
    equal to the digest of `from_pretrained(checkpoint)` iff the checkpoint holds these weights. Under FSDP2
    each parameter is gathered whole (`full_tensor`, a collective: every rank calls this), which is not the
    state-dict path the checkpoint is written through, so a wrong gather there shows as a different digest."""
    from torch.distributed.tensor import DTensor

    h = hashlib.sha256()
    for name, p in sorted(unwrap(model).named_parameters()):
        t = p.detach()
        h.update(name.encode())
        h.update((t.full_tensor() if isinstance(t, DTensor) else t).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
