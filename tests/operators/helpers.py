"""Helpers shared by the operator tests."""

from __future__ import annotations

import pyarrow as pa

from operators.base import Operator


def priority_probe(op: type[Operator]) -> type[Operator]:
    """`op`, also reporting the niceness of its own threads and of its engines' processes (every child process
    but multiprocessing's resource tracker and the engines' reaper). `op.__call__` must be async. Built in a
    function so that cloudpickle ships it by value to the actors."""

    class Probe(op):  # type: ignore[misc, valid-type]
        adds = (*op.adds, "thread_nice", "engine_nice")

        async def __call__(self, batch: pa.Table) -> pa.Table:
            import psutil

            from operators.vllm_engines import REAPER_MARK, thread_niceness

            out = await super().__call__(batch)
            threads = sorted(set(thread_niceness().values()))
            engines = [p for p in psutil.Process().children(recursive=True)
                       if not any(m in " ".join(p.cmdline()) for m in ("resource_tracker", REAPER_MARK))]
            return out.append_column("thread_nice", pa.array([threads] * out.num_rows)) \
                .append_column("engine_nice", pa.array([sorted({p.nice() for p in engines})] * out.num_rows))

    Probe.__name__ = Probe.__qualname__ = f"PriorityProbe{op.__name__}"
    return Probe
