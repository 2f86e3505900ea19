"""Starting (or joining) Ray, with the settings a small machine and a quiet log need.

A run's log should show prefsift's stage lines, progress, the summary table and any problem the user has to
act on; not library chatter that repeats from every actor. What is turned off here, and why:

- transformers' progress bars (`Loading weights`, `Writing model shards`): one bar per model load, in every
  actor, relayed line by line. HF_HUB_DISABLE_PROGRESS_BARS is the switch transformers reads at import.
- vLLM's INFO lines at each engine start: VLLM_LOGGING_LEVEL=WARNING keeps its warnings and errors.
- Ray Data's INFO line per execution and its execution-start banner: our stage lines say what ran.
- In worker processes (`quiet_worker`, run by Ray in each worker before it does any work):
  - Ray Train's PlacementGroupCleaner polls the State API, which an embedded Ray started without the
    dashboard does not serve, and warns on every poll that the query failed (or, with several Ray
    instances on the host, its thread dies with a ConnectionError traceback). It only frees a placement
    group if the train controller dies, and an embedded Ray's placement groups end with the driver.
  - Ray Train's report line per rank and step (`Reporting training result N: TrainingReport(...)`, the
    whole metrics dict): its logger is named by file path, out of reach of RunConfig's LoggingConfig.
  - Ray Train's own use of an option Ray Data deprecated (`ExecutionOptions.exclude_resources`).
  - Ray Data's note, per actor, that progress bars are off (they are turned off for Ray Train's split).
  - Ray Data's directory listing ends its completion-signaler thread with an InterruptedError traceback
    when the listing finishes before the thread's last put (a race in Ray 2.60's dynamic_work_queue on
    normal completion; the listing's results are complete).
- Ray Data's log of an error that aborts an execution, with its traceback, before it raises that error:
  the entry point reports it in one line (pipelines/runtime/entry.py), in full under PREFSIFT_DEBUG=1.
Ray Train's other INFO lines (resources requested, checkpoint written) are turned down where the trainer is
built, by its RunConfig's LoggingConfig. Values the user already set in the environment win.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

# Set before ray.init: an embedded Ray's workers inherit the driver's environment. On a cluster they belong in
# the job's runtime_env (cluster/runtime_env.yaml); the worker hook does not, since a cluster's State API works.
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
}
SETUP_HOOK = f"{__name__}.quiet_worker"


def _is_harmless_thread_error(args: threading.ExceptHookArgs) -> bool:
    name = args.thread.name if args.thread else ""
    if name == "PlacementGroupCleanerMonitor":
        # No State API here; with several Ray instances on the host its client cannot pick one (ConnectionError)
        return issubclass(args.exc_type, ConnectionError) or args.exc_type.__name__ == "RayStateApiException"
    if args.exc_type is not InterruptedError or "completion-signaler" not in name:
        return False
    where = os.path.join("ray", "data", "_internal", "dynamic_work_queue.py")
    tb = args.exc_traceback
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(where):
            return True
        tb = tb.tb_next
    return False


def quiet_worker() -> None:
    """Ray's worker_process_setup_hook for an embedded Ray (see the module docstring)."""
    import warnings

    import ray

    cleaner = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    logging.getLogger(cleaner).setLevel(logging.ERROR)
    # Ray Train 2.60 names this logger by its file path, so RunConfig's LoggingConfig misses it: each
    # report's whole metrics dict from every rank, at INFO.
    reports = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    logging.getLogger(reports).setLevel(logging.WARNING)
    # Ray Data's bars inside actors (Ray Train's split) are turned off where the data set is built; the note
    # on how to turn them back on is Ray Data's, per actor.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # Ray Train's own DataConfig passes an option Ray Data deprecated; nothing for the user to change.
    warnings.filterwarnings("ignore", message=r"`ExecutionOptions\.exclude_resources` is deprecated")
    default_hook = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if not _is_harmless_thread_error(args):
            default_hook(args)

    threading.excepthook = hook


class _RaisedAnyway(logging.Filter):
    """Ray Data logs an aborting execution's error, with its traceback, twice, then raises it; the entry point
    reports the raised error in one line (pipelines/runtime/entry.py), and in full under PREFSIFT_DEBUG=1.
    An error Ray Data ignores (DataContext.max_errored_blocks) is not raised, and is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        return record.name != "ray.data.exceptions" and "will now abort" not in record.getMessage()


def quiet_libraries() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if os.environ.get("PREFSIFT_DEBUG", "") in ("", "0"):
        for name in ("ray.data.exceptions", "ray.data._internal.execution.streaming_executor_state"):
            if not any(isinstance(f, _RaisedAnyway) for f in logging.getLogger(name).filters):
                logging.getLogger(name).addFilter(_RaisedAnyway())
    if "transformers" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        # imported before the variable was set: its bars are on already
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def init_ray(address: str | None = None, num_cpus: int | None = None, object_store_gb: float | None = None,
             progress: bool = True) -> None:
    """An embedded local Ray by default; `address` (or RAY_ADDRESS, as `ray job submit` sets) joins a cluster."""
    import ray

    if ray.is_initialized():
        return
    quiet_libraries()
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **kwargs)
    else:
        cpus = num_cpus or os.cpu_count() or 2
        # On small machines the object store default (30% of RAM) competes with model memory.
        store = int((object_store_gb or 2.0) * (1 << 30))
        # Ray Data lists parquet footers with a pool of 32 reader actors, started and killed again for every
        # read: 32 worker processes to start before the first row is read, on every stage. Footers of local
        # files are small local reads, and one actor runs 128 of them at once; on 2 cores a second actor
        # doubled a small read's time instead (README, Performance). Workers inherit this environment.
        os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", str(max(1, min(32, cpus // 8))))
        ray.init(num_cpus=cpus, object_store_memory=store, runtime_env={"worker_process_setup_hook": SETUP_HOOK},
                 **kwargs)
        if "RAY_DATA_SHUFFLE_INPUT_BATCH_BYTES" not in os.environ:
            # Ray coalesces up to 1 GiB of input per shuffle map task, so on one node a whole data set is often
            # hash-partitioned by ONE task while the other cores idle; 64 MiB tasks run in parallel with the
            # read (README, "Performance": statistics).
            ray.data.DataContext.get_current().shuffle_input_batch_bytes = 64 << 20
    # Ray Data logs one INFO line per execution; our own stage lines say what matters.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    # Ray Data's notes on how its bars are shown (off, as asked by ray.progress=false or for Ray Train's split;
    # logged as lines when stdout is not a terminal), not on the data.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
