"""Process and output helpers for the cluster tests.

Other people's Ray clusters run on the same machine while these tests run, so nothing here ends processes
by name (`ray stop` kills every Ray process on the host). Each command starts in a new session; teardown
ends exactly the processes of those sessions and their descendants (the job driver runs in a session of its
own, started by the job supervisor, so descendants are collected too).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable  # the venv that runs pytest; `python` on PATH may be another interpreter
RAY = str(Path(sys.executable).with_name("ray"))

RATED_CONFIG = "pipelines/configs/real_rated.yaml"
# 60 prompts keep each run near its fixed per-stage cost; fraction 0.5 leaves 30 pairs, enough to train on.
RATED_OVERRIDES = ("input.limit=60", "select.fraction=0.5", "ray.progress=false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment without anything that would attach a child to another Ray cluster."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


class Processes:
    """Commands started in their own sessions; `stop()` ends them and every descendant, and nothing else."""

    def __init__(self) -> None:
        self.sids: set[int] = set()
        self.seen: dict[int, psutil.Process] = {}

    def popen(self, args: Sequence[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(list(args), start_new_session=True, **kwargs)
        self.sids.add(proc.pid)  # a new session's id is its leader's pid
        return proc

    def run(self, args: Sequence[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
        proc = self.popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise AssertionError(f"{' '.join(args[:4])} ... timed out after {timeout}s:\n{out[-4000:]}") from None
        return subprocess.CompletedProcess(list(args), proc.returncode, out, None)

    def members(self) -> list[psutil.Process]:
        """Live processes of our sessions, their descendants, and descendants seen earlier (to a fixed point)."""
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) in self.sids:
                    found[p.pid] = p
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        for p in list(self.seen.values()):
            if p.is_running():
                found.setdefault(p.pid, p)
        frontier = list(found.values())
        while frontier:
            nxt = []
            for p in frontier:
                try:
                    kids = p.children(recursive=True)
                except psutil.Error:
                    continue
                for k in kids:
                    if k.pid not in found:
                        found[k.pid] = k
                        nxt.append(k)
            frontier = nxt
        self.seen.update(found)
        return [p for p in found.values() if _alive(p)]

    def stop(self, grace_s: float = 10.0) -> list[str]:
        """SIGTERM, then SIGKILL what is left; returns what survived (should be nothing)."""
        procs = self.members()
        for p in procs:
            _signal(p, signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        alive += [p for p in self.members() if p not in alive]  # anything spawned during the grace period
        for p in alive:
            _signal(p, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=grace_s)
        time.sleep(0.5)
        return [f"{p.pid} {_describe(p)}" for p in self.members()]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)
    except psutil.Error:
        pass


def _describe(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:160]
    except psutil.Error:
        return "?"


# ----------------------------------------------------------------------------------------------------------
# Outputs: equal after sorting by ids (Ray Data does not preserve order)
# ----------------------------------------------------------------------------------------------------------


def read_sorted(stage_dir: str | Path, keys: Sequence[str]) -> pa.Table:
    table = pq.read_table(str(stage_dir))  # `_SUCCESS` starts with `_`, which parquet discovery skips
    return table.sort_by([(k, "ascending") for k in keys])


def assert_same_rows(a_dir: str | Path, b_dir: str | Path, keys: Sequence[str]) -> int:
    """Same columns, same rows by id; floats to 1e-9 relative (a shuffle may sum a group in another order)."""
    a, b = read_sorted(a_dir, keys), read_sorted(b_dir, keys)
    assert sorted(a.column_names) == sorted(b.column_names), (a.column_names, b.column_names)
    assert a.num_rows == b.num_rows, (a_dir, a.num_rows, b_dir, b.num_rows)
    for name in a.column_names:
        x, y = a.column(name), b.column(name)
        if pa.types.is_floating(x.type):
            xs = x.to_numpy(zero_copy_only=False).astype(float)
            ys = y.to_numpy(zero_copy_only=False).astype(float)
            assert np.allclose(xs, ys, rtol=1e-9, atol=1e-12, equal_nan=True), name
        else:
            assert x.to_pylist() == y.to_pylist(), name
    return a.num_rows
