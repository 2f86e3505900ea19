"""Per-step training metrics, averaged over ranks, and the metrics.jsonl they go to."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.distributed as dist


class StepMetrics:
    """Sums of per-example metrics over one step's micro-batches; `reduce` averages them over all ranks."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.count = 0
        self.tokens = 0

    def add(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], tokens: int,
            weight: torch.Tensor | None = None) -> None:
        """`weight` (0 or 1 per row) leaves out the padding rows of a partial last step."""
        w = torch.ones_like(loss.detach()) if weight is None else weight.to(loss.device, loss.dtype)
        self.sums["loss"] += float((loss.detach() * w).sum())
        for k, v in metrics.items():
            self.sums[k] += float((v.detach().float() * w.float()).sum())
        self.count += int(round(float(w.sum())))
        self.tokens += tokens

    def reduce(self, device: torch.device) -> tuple[dict[str, float], int, int]:
        keys = sorted(self.sums)
        t = torch.tensor([self.sums[k] for k in keys] + [self.count, self.tokens], dtype=torch.float64,
                         device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        count = int(t[-2].item())
        return {k: float(t[i].item()) / max(count, 1) for i, k in enumerate(keys)}, count, int(t[-1].item())

class JsonlLog:
    """A JSON-lines file (metrics.jsonl, the batch log) on any pyarrow filesystem.

    A local file is appended line by line, so it can be followed live. An object store has no append:
    the lines are held and the whole object is written again at each `flush`, which the trainer calls at
    every checkpoint. A killed run thus loses only lines after its last checkpoint, the steps its resumed
    run trains and logs again.
    """

    def __init__(self, fs: pafs.FileSystem, path: str):
        self.fs, self.path = fs, path
        self.local = isinstance(fs, pafs.LocalFileSystem)
        self.held = ""
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        if not self.local and fs.get_file_info(path).type == pafs.FileType.File:
            with fs.open_input_stream(path) as f:  # a resumed run keeps the lines logged before
                self.held = f.read().decode("utf-8")

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True, default=float) + "\n"
        if not self.local:
            self.held += line
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)

    def flush(self) -> None:
        if not self.local:
            with self.fs.open_output_stream(self.path) as f:
                f.write(self.held.encode("utf-8"))
