"""The operator contract and the one place that turns an operator into Ray Data `map_batches` arguments.

An operator is a small class: it declares the columns it needs and adds, loads heavy state (a model, an
engine) in its constructor, which Ray runs once per actor, and maps a pyarrow batch to a pyarrow batch.
Rows it cannot process are not dropped: it returns them with a reason in the `QUARANTINE` column, and the
stage runner writes them to `quarantine/` and counts them in the manifest.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

if TYPE_CHECKING:
    import ray.data

QUARANTINE = "_quarantine"  # null for a good row, else the reason it was set aside
# Optional free text beside the reason (the file and line of a bad input line, the field and type found).
# The reason stays a category that the manifest counts; the detail goes to quarantine/ only.
QUARANTINE_DETAIL = "_quarantine_detail"


class ColumnError(ValueError):
    """The data lacks columns an operator needs."""


class InputError(ValueError):
    """The input cannot be read as asked; the message names the path and the problem."""


@dataclass(frozen=True)
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    concurrency: int | tuple[int, int] = 1  # an int is a fixed pool; (min, max) autoscales
    batch_size: int | None = 64
    # map_batches calls one actor runs at once. An async operator (`async def __call__`) interleaves them on
    # its event loop, e.g. to queue the next batch in an engine while the current one finishes; a sync one
    # runs them in threads and must guard its own state.
    max_concurrency: int = 1
    # Actor restarts after a crash. None keeps Ray Data's default for actor pools: unlimited restarts, and
    # the batch a dead actor held is retried (ActorPoolMapOperator._apply_default_remote_args), so every
    # input row still comes out exactly once. A number caps restarts (a crash loop then fails the run).
    max_restarts: int | None = None
    # The actor process's niceness, which Ray adds to its raylet's (so no privilege is needed, and a raylet
    # started under `nice` keeps its offset). None keeps Ray's default for workers, 15: the kernel then gives
    # the actor's threads a small share against Ray's daemons, the driver and other tasks, all at 0. An actor
    # whose busy thread sets the run's speed (an inference engine) asks for 0, as Ray's own job supervisor
    # does (README, Performance: generation).
    niceness: int | None = None
    # The operator shuts its own child processes down when Ray Data deletes it, at its actor's graceful exit
    # (an inference engine's, in its __del__). Ray's kill of an exiting worker's direct children
    # (RAY_kill_child_processes_on_worker_exit) is then off for the actor: it killed multiprocessing's
    # resource tracker while vLLM's shared memory was still registered in the actor, whose exit then logged
    # the tracker's KeyError tracebacks. An engine that is never closed (the actor ended otherwise) is ended by
    # its reaper (operators.vllm_engines.reaped): vLLM's engine core does not watch its parent.
    closes_children: bool = False


class Operator:
    """Base for Ray Data actors. Subclasses set `name`, `requires`, `adds` and implement `__call__`."""

    name: ClassVar[str] = "operator"
    requires: ClassVar[tuple[str, ...]] = ()
    # Alternatives: each inner tuple needs at least one of its columns present, e.g. ("prompt", "messages").
    requires_any: ClassVar[tuple[tuple[str, ...], ...]] = ()
    adds: ClassVar[tuple[str, ...]] = ()

    def __call__(self, batch: pa.Table) -> pa.Table:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Release what the constructor started (an inference engine's processes); nothing by default."""

    def __del__(self) -> None:
        # Ray Data deletes the UDF when its actor exits gracefully (the map worker's __ray_shutdown__), before
        # the actor exits: an engine is shut down as it expects, not found dead (Resources.closes_children).
        with contextlib.suppress(Exception):  # a constructor that failed part way
            self.close()


def check_columns(op: type[Operator], columns: list[str] | tuple[str, ...], where: str = "input") -> None:
    """Fail before the first batch runs, naming every missing column."""
    have = set(columns)
    missing = [c for c in op.requires if c not in have]
    for group in op.requires_any:
        if not any(c in have for c in group):
            missing.append(" or ".join(group))
    if missing:
        raise ColumnError(
            f"{op.name} needs column(s) {', '.join(repr(m) for m in missing)} that the {where} lacks; "
            f"it has: {', '.join(sorted(have)) or '(none)'}"
        )


def _allow_async_calls_per_task(calls: int) -> None:
    """Let one Ray Data task run `calls` batches of an async operator at once.

    A task carries every batch of its input bundle, and Ray Data (2.60) runs at most
    RAY_DATA_DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY (4) of them at once, a module constant it reads at
    import and again when it plans the stage. An input of one large block would then hold an actor at 4 calls
    whatever `max_concurrent_calls_per_actor` says. Raised here, before the plan is built, never lowered.
    """
    from ray.data._internal.planner import plan_udf_map_op

    plan_udf_map_op.DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY = max(
        plan_udf_map_op.DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY, calls)


def map_batches_kwargs(op: type[Operator], resources: Resources, **ctor_kwargs: Any) -> dict[str, Any]:
    """The single translation from an operator's declared resources to Ray Data's `map_batches` arguments."""
    from ray.data import ActorPoolStrategy

    size = resources.concurrency
    calls = {} if resources.max_concurrency == 1 else {
        "max_concurrent_calls_per_actor": resources.max_concurrency, "enable_true_multi_threading": True}
    if resources.max_concurrency > 1:
        _allow_async_calls_per_task(resources.max_concurrency)
    pool = ActorPoolStrategy(min_size=size[0], max_size=size[1], **calls) if isinstance(size, (tuple, list)) \
        else ActorPoolStrategy(size=size, **calls)
    kwargs: dict[str, Any] = dict(
        fn=op,
        fn_constructor_kwargs=ctor_kwargs,
        batch_format="pyarrow",
        batch_size=resources.batch_size,
        compute=pool,  # `concurrency=` is deprecated since Ray 2.51
        num_cpus=resources.num_cpus,
    )
    if resources.max_restarts is not None:
        kwargs["max_restarts"] = resources.max_restarts
        kwargs["max_task_retries"] = -1 if resources.max_restarts else 0
    if resources.num_gpus:
        kwargs["num_gpus"] = resources.num_gpus
    if env := actor_runtime_env(resources):
        kwargs["runtime_env"] = env
    return kwargs


def niceness_problem(key: str, niceness: int | None) -> str | None:
    """What is wrong with an operator's configured niceness (`generate.niceness`, `score.niceness`), or None.
    Ray adds it to the raylet's niceness; below 0 needs a privilege Ray's workers rarely hold."""
    if niceness is not None and not 0 <= niceness <= 19:
        return f"{key} must be in 0..19 or null (Ray's 15), got {niceness}"
    return None


def actor_runtime_env(resources: Resources) -> dict[str, Any] | None:
    """The runtime_env an operator's actor needs for its niceness and child processes (Resources), or None.

    Read by the raylet when it starts the actor's worker, and by the worker. Ray merges a task's env_vars with
    the job's runtime_env, so a `ray job submit --runtime-env` keeps its working_dir and variables. Used by
    map_batches_kwargs and by the resident hosts (operators.resident) alike.
    """
    env = {}
    if resources.niceness is not None:
        env["RAY_worker_niceness"] = str(resources.niceness)
    if resources.closes_children:
        env["RAY_kill_child_processes_on_worker_exit"] = "false"
    return {"env_vars": env} if env else None


def apply(
    ds: ray.data.Dataset, op: type[Operator], resources: Resources, **ctor_kwargs: Any
) -> ray.data.Dataset:
    """Check the column contract against the dataset's schema, then add the operator as a stage."""
    schema = ds.schema()
    if schema is not None:
        check_columns(op, list(schema.names))
    return ds.map_batches(**map_batches_kwargs(op, resources, **ctor_kwargs))


def with_quarantine(table: pa.Table, reasons: list[str | None] | pa.Array) -> pa.Table:
    """Set (or merge into) the quarantine column; an existing reason wins over a new one."""
    new = reasons if isinstance(reasons, pa.Array) else pa.array(reasons, type=pa.string())
    if QUARANTINE in table.column_names:
        import pyarrow.compute as pc

        old = table.column(QUARANTINE).cast(pa.string())  # all-null blocks infer the null type
        merged = pc.coalesce(old, new)
        return table.set_column(table.column_names.index(QUARANTINE), QUARANTINE, merged)
    return table.append_column(QUARANTINE, new)
