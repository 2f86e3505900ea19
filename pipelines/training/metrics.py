"""Per-step training metrics, averaged over ranks, and the metrics.jsonl they go to."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist


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
