"""How every entry point ends on an error: the `prefsift` console script, each `python -m pipelines.<recipe>`
(what `ray job submit` runs) and the reporting mains print the same thing for the same mistake.

- A problem with the config, the input or a path is one line, `error: ...` (`config error: ...` for a
  config key), on stderr, with exit code 2.
- Anything else is one line naming the exception, a hint, and exit code 1.
- `PREFSIFT_DEBUG=1` prints the full traceback first.

Errors raised inside Ray tasks and Ray Train workers reach the driver wrapped (RayTaskError, UserCodeException,
WorkerGroupError); the line names the cause, not the wrapper.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEBUG_ENV = "PREFSIFT_DEBUG"
# A ValueError raised by prefsift's own code is a message written for the user (a model folder that is not
# one, too few pairs for a batch, an aspect scored twice); one raised deeper, by a library, is not.
_OWN_DIRS = tuple(str(Path(__file__).resolve().parents[2] / d) + os.sep for d in ("operators", "pipelines"))


def _user_error_types() -> tuple[type[BaseException], ...]:
    from operators.base import ColumnError, InputError
    from operators.select import SelectionError
    from pipelines.runtime.config import ConfigError

    return (ConfigError, InputError, ColumnError, SelectionError, FileNotFoundError, NotADirectoryError,
            IsADirectoryError, PermissionError)


def _inner(e: BaseException) -> BaseException | None:
    """The exception this one wraps, if any: Ray's task and user-code wrappers, Ray Train's worker group."""
    failures = getattr(e, "worker_failures", None)  # ray.train.WorkerGroupError: {rank: exception}
    if isinstance(failures, dict) and failures:
        return failures[min(failures)]
    for attr in ("cause", "controller_failure"):  # RayTaskError, ray.train.ControllerError
        inner = getattr(e, attr, None)
        if isinstance(inner, BaseException) and inner is not e:
            return inner
    inner = e.__cause__
    # Ray Data chains an empty SystemException to mark its own failures; it says nothing about the cause.
    if inner is not None and type(inner).__module__ == "ray.data.exceptions" and not inner.args:
        return None
    return inner


def _chain(e: BaseException) -> list[BaseException]:
    out, seen = [e], {id(e)}
    while (inner := _inner(out[-1])) is not None and id(inner) not in seen:
        seen.add(id(inner))
        out.append(inner)
    return out


def _is_ray_wrapper(e: BaseException) -> bool:
    ray_exceptions = sys.modules.get("ray.exceptions")
    return ray_exceptions is not None and isinstance(e, ray_exceptions.RayError)


_CAUSE_SEP = "\n\nThe above exception was the direct cause of the following exception:\n\n"


def _worker_cause(e: BaseException) -> BaseException | None:
    """Ray Data wraps what a map function raised in a UserCodeException inside the worker, so the original
    reaches the driver only as the first block of the worker's traceback text; rebuilt from that block when
    its class is one the driver has imported and takes a message."""
    text = str(e)
    if _CAUSE_SEP not in text:
        return None
    block = text.split(_CAUSE_SEP)[0].splitlines()
    heads = [ln for ln in block[1:] if ln and not ln.startswith(" ")]  # block[0] names the Ray task
    if not heads:
        return None
    name, _, message = heads[0].partition(": ")
    module, _, cls_name = name.rpartition(".")
    cls = getattr(sys.modules.get(module or "builtins"), cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        return None
    try:
        cause = cls(message)
    except Exception:  # a constructor that wants more than a message: keep Ray's wrapper
        return None
    files = [ln.split('"')[1] for ln in block if ln.strip().startswith('File "')]
    cause.raised_in = files[-1] if files else None
    return cause


def root_cause(e: BaseException) -> BaseException:
    """The user error in a wrapped chain (the outermost, so that our own `raise ConfigError(...) from
    json_error` keeps its message), else the innermost exception. Ray's RayTaskError(InputError) is an
    InputError too, but its text is a traceback: the plain one inside it is the one to show."""
    chain = _chain(e)
    found = next((c for c in chain if is_user_error(c) and not _is_ray_wrapper(c)), None)
    if found is None:
        rebuilt = [w for c in chain if _is_ray_wrapper(c) and (w := _worker_cause(c)) is not None]
        found = rebuilt[0] if rebuilt else chain[-1]
    return found


def _raised_by_us(e: BaseException) -> bool:
    last = getattr(e, "raised_in", None)  # rebuilt from a worker's traceback text
    tb = e.__traceback__
    while tb is not None:
        last, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    return last is not None and last.startswith(_OWN_DIRS)


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, _user_error_types()) or (isinstance(e, ValueError) and _raised_by_us(e))


def one_line(e: BaseException) -> str:
    """The first line of the message: Ray Data appends retry notes, and Ray its own traceback text."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def report(e: BaseException) -> int:
    """Print what a user needs about `e` on stderr; return the exit code."""
    from pipelines.runtime.config import ConfigError

    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        traceback.print_exception(e, file=sys.stderr)
    cause = root_cause(e)
    if is_user_error(cause):
        # A wrapped cause may be the dual RayTaskError(InputError) whose text is a traceback; first line only.
        kind = "config error" if isinstance(cause, ConfigError) else "error"
        print(f"{kind}: {one_line(cause)}", file=sys.stderr, flush=True)
        return 2
    print(f"error: {type(cause).__name__}: {one_line(cause)}", file=sys.stderr, flush=True)
    if os.environ.get(DEBUG_ENV, "") in ("", "0"):
        print(f"hint: not a config or input problem prefsift knows; rerun with {DEBUG_ENV}=1 for the full "
              "traceback (and include it if you report a bug)", file=sys.stderr, flush=True)
    return 1


def run_cli(fn: Callable[..., int | None], *args: Any) -> int:
    """Run an entry point's body; its return value (None: 0) or the exit code of its error."""
    try:
        return fn(*args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:
        return report(e)
