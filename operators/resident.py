"""Resident operators: one constructed operator (its model, its engine) serving many Ray Data executions.

`apply` builds an operator in each execution's actor pool, so a recipe that runs several executions in a row
(adaptive sampling's rounds, pipelines/runtime/rounds.py) would load its models once per execution. A
`Resident` instead holds `concurrency` long-lived Ray actors (`_Host`), each with the operator's own
resources (CPUs, GPUs, restarts) and constructing the operator once; every execution then maps its batches
through one light `Forward` actor (no CPU, no GPU) that sends each batch to the host with the fewest calls in
flight and returns what the host's operator returned. This is how Ray's own batch LLM processor calls a
long-lived Serve deployment from Ray Data (ray.llm's serve_deployment_stage), with plain actors in place of
Serve.

What an operator gets is what an actor pool gives it: the constructor runs once per actor, an async
`__call__` runs on an event loop thread of its own (as Ray Data runs one), `max_concurrency` calls run at
once, and a host that dies is restarted by Ray (its constructor runs again) and the calls it held are retried
(max_task_retries -1), so every batch still comes back exactly once. A host whose restarts are spent fails
the execution with an error that says so. `Residents.close` ends the hosts: the operator's `close` first
(a vLLM engine's subprocess stops cleanly), then the actor.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from operators.base import Operator, Resources, actor_runtime_env, check_columns, map_batches_kwargs

if TYPE_CHECKING:
    import ray.data

CLOSE_TIMEOUT_S = 120  # an engine's shutdown and the actor's exit; past it the actor is killed


class _Host:
    """The actor body: one operator, its calls, and what the driver reads back (pid, calls served)."""

    def __init__(self, op: type[Operator], ctor_kwargs: dict[str, Any]):
        self.op = op(**ctor_kwargs)
        self.calls = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        if inspect.iscoroutinefunction(type(self.op).__call__):
            self.loop = asyncio.new_event_loop()
            threading.Thread(target=self.loop.run_forever, daemon=True, name="resident-loop").start()

    def ready(self) -> int:
        return os.getpid()

    def call(self, batch: pa.Table) -> pa.Table:
        self.calls += 1  # threads: a lost increment only undercounts the report, never a batch
        if self.loop is None:
            return self.op(batch)
        return asyncio.run_coroutine_threadsafe(self.op(batch), self.loop).result()

    def served(self) -> tuple[int, int]:
        return os.getpid(), self.calls

    def close(self) -> None:
        self.op.close()


class Forward(Operator):
    """The map_batches side: one batch to one host and back. Async, so it holds a call in flight per host
    slot while Ray Data moves the other batches."""

    name = "forward"

    def __init__(self, hosts: list[Any], op_name: str, max_restarts: int | None):
        self.hosts = hosts
        self.op_name = op_name
        self.max_restarts = max_restarts
        self.busy = [0] * len(hosts)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        from ray.exceptions import RayActorError

        i = min(range(len(self.hosts)), key=self.busy.__getitem__)
        self.busy[i] += 1
        try:
            return await self.hosts[i].call.remote(batch)
        except RayActorError as e:
            limit = "unlimited" if self.max_restarts is None else self.max_restarts
            raise RuntimeError(f"{self.op_name}: resident actor {i} died and was not restarted (max_restarts "
                               f"{limit}); this execution fails, and a rerun resumes from its last completed "
                               "stage") from e
        finally:
            self.busy[i] -= 1


class Resident:
    """`resources.concurrency` hosts of one operator (the upper bound of an autoscaling range: residents do
    not scale)."""

    def __init__(self, op: type[Operator], resources: Resources, **ctor_kwargs: Any):
        import ray

        self.op, self.resources = op, resources
        size = resources.concurrency
        self.size = size[1] if isinstance(size, (tuple, list)) else size
        restarts = -1 if resources.max_restarts is None else resources.max_restarts
        env = actor_runtime_env(resources)  # the engines' niceness and child processes, as on Ray Data
        host = ray.remote(_Host).options(
            num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
            max_concurrency=resources.max_concurrency, max_restarts=restarts,
            max_task_retries=-1 if restarts else 0, **({"runtime_env": env} if env else {}))
        self.hosts = [host.remote(op, ctor_kwargs) for _ in range(self.size)]
        try:  # every constructor: a model that cannot load fails here, before any execution starts
            self.pids = [{pid} for pid in ray.get([h.ready.remote() for h in self.hosts])]
        except BaseException:
            for h in self.hosts:
                ray.kill(h, no_restart=True)
            raise
        self.calls = [0] * self.size

    def apply(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        """`operators.base.apply` for this resident: the operator's column contract, then the forwarder."""
        schema = ds.schema()
        if schema is not None:
            check_columns(self.op, list(schema.names))
        slots = self.size * self.resources.max_concurrency
        # No CPU: it only awaits the hosts, and a CPU share here would be one Ray Data's own tasks lack.
        # Twice the host slots in flight: each host holds its next batch while it works on the current one.
        forward = Resources(num_cpus=0, concurrency=1, batch_size=self.resources.batch_size,
                            max_concurrency=2 * slots)
        return ds.map_batches(**map_batches_kwargs(Forward, forward, hosts=self.hosts, op_name=self.op.name,
                                                   max_restarts=self.resources.max_restarts))

    def served(self) -> dict[str, Any]:
        """Calls served since the last report, and the pid of every construction seen so far: one per host,
        plus one per restart seen (a restarted host is a new process)."""
        import ray

        new = 0
        for i, (pid, calls) in enumerate(ray.get([h.served.remote() for h in self.hosts])):
            if pid not in self.pids[i]:
                self.pids[i].add(pid)
                self.calls[i] = 0  # a restarted host counts from 0
            new += calls - self.calls[i]
            self.calls[i] = calls
        return {"calls": new, "pids": sorted(set().union(*self.pids))}

    def close(self) -> None:
        """The operator's close, then the actor exits by itself (queued behind the close): no kill, whose
        RPC to an exiting worker the GCS logs as a failure. One still busy past the timeout is killed."""
        import ray

        for h in self.hosts:
            h.close.remote()
        ends = [h.__ray_terminate__.options(max_task_retries=0).remote() for h in self.hosts]
        done, _ = ray.wait(ends, num_returns=len(ends), timeout=CLOSE_TIMEOUT_S)
        for h, end in zip(self.hosts, ends, strict=True):
            if end not in done:
                ray.kill(h, no_restart=True)


class Residents:
    """The residents of one recipe, made on first use (a resumed run whose executions are all done starts
    none) and closed together: `with Residents() as residents: residents.get(...).apply(ds)`."""

    def __init__(self) -> None:
        self.by_name: dict[str, Resident] = {}

    def get(self, op: type[Operator], resources: Resources, **ctor_kwargs: Any) -> Resident:
        if op.name not in self.by_name:
            self.by_name[op.name] = Resident(op, resources, **ctor_kwargs)
        return self.by_name[op.name]

    def served(self) -> dict[str, dict[str, Any]]:
        return {name: r.served() for name, r in self.by_name.items()}

    def __enter__(self) -> Residents:
        return self

    def __exit__(self, *exc: object) -> None:
        for r in self.by_name.values():
            r.close()
        self.by_name.clear()
