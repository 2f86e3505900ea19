"""A real two-node Ray cluster on loopback: `ray start --head`, `ray start --address`, then `ray job submit`.

The nodes advertise 127.0.0.2 and 127.0.0.3. `ray start` rewrites 127.0.0.1 to the host's routable address
(services.resolve_ip_for_localhost), but leaves the rest of 127.0.0.0/8 alone, so every connection between
the nodes, the job driver and the client stays on the loopback interface. Token authentication is on
(RAY_AUTH_MODE=token with a fresh RAY_AUTH_TOKEN), as a production cluster should run.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.cluster.helpers import (
    PYTHON,
    RATED_CONFIG,
    RATED_OVERRIDES,
    RAY,
    REPO,
    Processes,
    assert_same_rows,
    child_env,
    free_port,
)

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU, dashboard and job API on 127.0.0.1) + one worker node (1 CPU, a `worker_node` resource)."""
    pytest.importorskip("aiohttp_cors", reason="the job API needs the dashboard: install ray[default]")
    # Short, private temp root: Ray's unix socket paths live under it and must stay under ~107 characters.
    tmp = Path(tempfile.mkdtemp(prefix="prefsift-mn-", dir="/tmp"))
    token = secrets.token_hex(32)
    env = child_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    gcs, dash = free_port(), free_port()
    procs = Processes()
    info = {"tmp": tmp, "env": env, "dash": f"http://127.0.0.1:{dash}", "procs": procs, "token": token}
    try:
        head = procs.run([
            RAY, "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={gcs}", "--num-cpus=1",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={tmp}/head", "--object-store-memory=400000000", "--disable-usage-stats",
        ], timeout=240, env=env)
        assert head.returncode == 0, head.stdout[-4000:]
        worker = procs.run([
            RAY, "start", f"--address={HEAD_IP}:{gcs}", f"--node-ip-address={WORKER_IP}", "--num-cpus=1",
            '--resources={"worker_node": 1}', f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={tmp}/worker", "--object-store-memory=400000000", "--disable-usage-stats",
        ], timeout=240, env=env)
        assert worker.returncode == 0, worker.stdout[-4000:]
        yield info
    finally:
        survivors = procs.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        assert not survivors, f"Ray processes survived teardown: {survivors}"


def ray_cli(cluster, *args: str, timeout: float = 120, env: dict | None = None):
    return cluster["procs"].run([RAY, *args], timeout=timeout, env=env or cluster["env"])


@pytest.mark.slow
def test_job_submit_on_two_nodes_equals_local_run(cluster, request):
    out = cluster["tmp"] / "job_run"  # both nodes are this machine, so a local path is a shared filesystem
    nodes = json.loads(ray_cli(cluster, "list", "nodes", "--address", cluster["dash"], "--format", "json").stdout)
    alive = {n["node_ip"]: n for n in nodes if n["state"] == "ALIVE"}
    assert set(alive) == {HEAD_IP, WORKER_IP}, nodes

    job_id = f"prefsift-mn-{secrets.token_hex(4)}"
    sub = ray_cli(
        cluster, "job", "submit", "--address", cluster["dash"], "--submission-id", job_id, "--no-wait",
        "--working-dir", str(REPO), "--runtime-env", "cluster/runtime_env.yaml", "--",
        PYTHON, "-m", "pipelines.curate", "--config", RATED_CONFIG, *RATED_OVERRIDES, f"output.dir={out}",
    )
    assert sub.returncode == 0, sub.stdout[-4000:]
    # The local reference runs in this process while the job runs on the cluster (shared with test_faults).
    reference = request.getfixturevalue("rated_reference")
    logs = ray_cli(cluster, "job", "logs", job_id, "--address", cluster["dash"], "--follow", timeout=600)
    status = ray_cli(cluster, "job", "status", job_id, "--address", cluster["dash"])
    log = logs.stdout
    # `ray job status` prints "Job '<id>' succeeded" (its colour codes aside) once the job has ended well.
    assert f"Job '{job_id}' succeeded" in status.stdout, status.stdout[-2000:] + log[-6000:]
    for stage in ("prompts", "stats", "selection", "pairs"):  # rated data has no scored/ stage
        assert f"[prefsift] stage {stage}: " in log, stage

    # The worker node did part of the work (Ray Data spreads tasks; each node has one CPU).
    worker_id = alive[WORKER_IP]["node_id"]
    tasks = json.loads(ray_cli(cluster, "list", "tasks", "--address", cluster["dash"], "--format", "json",
                               "--limit", "10000", "--filter", f"node_id={worker_id}").stdout)
    assert any(t.get("type") == "NORMAL_TASK" or t.get("type") == "ACTOR_TASK" for t in tasks), tasks[:5]

    assert_same_rows(out / "stats", reference / "stats", ["prompt_id"])
    assert assert_same_rows(out / "pairs", reference / "pairs", ["prompt_id"]) > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(s["balanced"] for s in manifest["stages"].values())


@pytest.mark.slow
def test_job_api_refuses_requests_without_the_token(cluster):
    # A client with no token (and no ~/.ray/auth_token: HOME is empty) is turned away by the job API.
    env = {k: v for k, v in cluster["env"].items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(cluster["tmp"])
    res = ray_cli(cluster, "job", "list", "--address", cluster["dash"], env=env)
    assert res.returncode != 0
    assert "Unauthorized" in res.stdout or "authentication" in res.stdout.lower(), res.stdout[-2000:]
    ok = ray_cli(cluster, "job", "list", "--address", cluster["dash"])
    assert ok.returncode == 0, ok.stdout[-2000:]
    assert os.environ.get("RAY_AUTH_TOKEN") != cluster["token"]  # the token never leaked into the test process
