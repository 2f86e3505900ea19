"""Starting (or joining) Ray, with the settings a small machine and a quiet log need."""

from __future__ import annotations

import logging
import os
from typing import Any


def init_ray(address: str | None = None, num_cpus: int | None = None, object_store_gb: float | None = None,
             progress: bool = True) -> None:
    """An embedded local Ray by default; `address` (or RAY_ADDRESS, as `ray job submit` sets) joins a cluster."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **kwargs)
    else:
        cpus = num_cpus or os.cpu_count() or 2
        # On small machines the object store default (30% of RAM) competes with model memory.
        store = int((object_store_gb or 2.0) * (1 << 30))
        # Ray Data lists parquet footers with 32 reader actors by default: 32 worker processes to start on a
        # laptop before the first row is read (~2 s per read on 2 cores). Workers inherit this environment.
        os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", str(min(32, cpus)))
        ray.init(num_cpus=cpus, object_store_memory=store, **kwargs)
        if "RAY_DATA_SHUFFLE_INPUT_BATCH_BYTES" not in os.environ:
            # Ray coalesces up to 1 GiB of input per shuffle map task, so on one node a whole data set is often
            # hash-partitioned by ONE task while the other cores idle; 64 MiB tasks run in parallel with the
            # read (README, "Performance": statistics).
            ray.data.DataContext.get_current().shuffle_input_batch_bytes = 64 << 20
    # Ray Data logs one INFO line per execution; our own stage lines say what matters.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
