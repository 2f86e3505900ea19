"""Resident operators on real Ray: one construction serves several Ray Data executions, a host killed
mid-batch is restarted and the batch retried, a host whose restarts are spent fails the execution by name."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from operators.base import ColumnError, Operator, Resources
from operators.resident import Residents


def tag_operator(marker_dir: Path, crash_first_call: bool = False) -> type[Operator]:
    """An async operator that adds `add` to column x and logs each construction's pid to a file; with
    `crash_first_call` its first call in the run SIGKILLs its own process. Built in a function so that
    cloudpickle ships it by value to the actors."""
    constructions, crashed = str(marker_dir / "constructions"), str(marker_dir / "crashed")

    class Tag(Operator):
        name = "tag"
        requires = ("x",)
        adds = ("y",)

        def __init__(self, add: int):
            self.add = add
            with open(constructions, "a", encoding="utf-8") as f:
                f.write(f"{os.getpid()}\n")

        async def __call__(self, batch: pa.Table) -> pa.Table:
            if crash_first_call and not os.path.exists(crashed):
                Path(crashed).write_text(str(os.getpid()), encoding="utf-8")
                os.kill(os.getpid(), signal.SIGKILL)
            await asyncio.sleep(0.01)  # a call in flight while the others queue
            return batch.append_column("y", pc.add(batch.column("x"), self.add))

    return Tag


def pids(marker_dir: Path) -> list[str]:
    return (marker_dir / "constructions").read_text(encoding="utf-8").split()


RES = Resources(num_cpus=0.5, batch_size=4, max_concurrency=2)


def data(n: int):
    import ray

    return ray.data.from_arrow(pa.table({"x": list(range(n))}))


@pytest.mark.slow
def test_one_construction_serves_every_execution(ray_local, tmp_path):
    import ray

    with Residents() as residents:
        resident = residents.get(tag_operator(tmp_path), RES, add=10)
        for n in (10, 7):  # two executions: 3 batches of up to 4, then 2
            got = sorted((r["x"], r["y"]) for r in resident.apply(data(n)).take_all())
            assert got == [(x, x + 10) for x in range(n)]
            # the one construction the operator logged served both executions
            logged = [int(p) for p in pids(tmp_path)]
            assert residents.served() == {"tag": {"calls": -(-n // 4), "pids": logged}}
        with pytest.raises(ColumnError, match="tag needs column"):
            resident.apply(ray.data.from_arrow(pa.table({"z": [1]})))
        hosts = resident.hosts
    assert len(pids(tmp_path)) == 1
    with pytest.raises(ray.exceptions.RayActorError):  # closed: the host is gone
        ray.get(hosts[0].ready.remote(), timeout=60)


@pytest.mark.slow
def test_killed_host_is_restarted_and_its_batch_retried(ray_local, tmp_path):
    with Residents() as residents:
        resident = residents.get(tag_operator(tmp_path, crash_first_call=True), RES, add=1)
        got = sorted(r["y"] for r in resident.apply(data(10)).take_all())
        assert got == [x + 1 for x in range(10)]  # every row once
        assert residents.served()["tag"]["pids"] == sorted(int(p) for p in pids(tmp_path))
    first, second = pids(tmp_path)
    assert first == (tmp_path / "crashed").read_text(encoding="utf-8") and second != first


@pytest.mark.slow
def test_host_past_its_restarts_fails_the_execution(ray_local, tmp_path):
    with Residents() as residents:
        resident = residents.get(tag_operator(tmp_path, crash_first_call=True),
                                 Resources(num_cpus=0.5, batch_size=4, max_restarts=0), add=1)
        with pytest.raises(Exception, match="tag: resident actor 0 died and was not restarted"):
            resident.apply(data(10)).take_all()


def env_operator() -> type[Operator]:
    """Reports its process's niceness and whether Ray kills its children at exit. Built in a function so that
    cloudpickle ships it by value to the actors."""

    class Env(Operator):
        name = "env"
        requires = ("x",)
        adds = ("nice", "kill_children")

        def __call__(self, batch: pa.Table) -> pa.Table:
            n = batch.num_rows
            return batch.append_column("nice", pa.array([os.getpriority(os.PRIO_PROCESS, 0)] * n)) \
                .append_column("kill_children", pa.array([os.environ.get("RAY_kill_child_processes_on_worker_exit")] * n))

    return Env


@pytest.mark.slow
def test_a_host_runs_at_its_niceness_and_keeps_its_children(ray_local):
    """A resident host gets the runtime_env a Ray Data actor of the same Resources gets: the niceness an
    engine's processes inherit (score.niceness, generate.niceness) and Ray's kill of its children at exit
    turned off for an operator that closes its engines itself. Before, residents ran at Ray's 15."""
    base = os.getpriority(os.PRIO_PROCESS, 0)  # the raylet's, inherited from this driver
    for resources, seen in ((Resources(num_cpus=0.5, niceness=7, closes_children=True), (min(base + 7, 19), "false")),
                            (Resources(num_cpus=0.5), (min(base + 15, 19), None))):
        with Residents() as residents:
            rows = residents.get(env_operator(), resources).apply(data(4)).take_all()
        assert {(r["nice"], r["kill_children"]) for r in rows} == {seen}, resources
