"""Faults injected by killing real processes: a generation and a scoring actor, the curation driver, and a
Ray Train worker. Each run must finish with every id exactly once, or resume from what was complete.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from operators.base import Resources, map_batches_kwargs
from pipelines.runtime.config import CurateConfig, from_dict, load_config, load_yaml
from tests.cluster.helpers import (
    PYTHON,
    RATED_CONFIG,
    RATED_OVERRIDES,
    REPO,
    Processes,
    assert_same_rows,
    child_env,
)

# ----------------------------------------------------------------------------------------------------------
# Actor restarts and task retries
# ----------------------------------------------------------------------------------------------------------


def crash_once(base: type, marker_dir: str, crash_at: int) -> type:
    """A subclass of a real operator whose actor SIGKILLs its own process when its `crash_at`-th batch
    arrives, once per run. Batch `crash_at` is then in flight on a dead actor: Ray must restart the actor
    and retry that batch. Built in a function so that cloudpickle ships it by value to the actors."""
    name = base.__name__

    def maybe_crash(batch):
        log = Path(marker_dir) / f"{name}.batches"
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {batch.num_rows}\n")
        n_seen = len(log.read_text(encoding="utf-8").splitlines())
        marker = Path(marker_dir) / f"{name}.crashed"
        if n_seen == crash_at and not marker.exists():
            marker.write_text(str(os.getpid()), encoding="utf-8")
            os.kill(os.getpid(), signal.SIGKILL)

    # Ray Data runs an async __call__ (the vLLM-ready Generator's) on the actor's event loop: the subclass
    # must stay async, or Ray would call it as a plain function and get an un-awaited coroutine back.
    if inspect.iscoroutinefunction(base.__call__):
        async def __call__(self, batch):
            maybe_crash(batch)
            return await base.__call__(self, batch)
    else:
        def __call__(self, batch):
            maybe_crash(batch)
            return base.__call__(self, batch)

    return type(f"Crashing{name}", (base,), {"__call__": __call__})


def test_restart_settings_reach_ray_data():
    """What `operators.base.map_batches_kwargs` hands Ray, and what Ray Data's actor pool makes of it."""
    from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator
    from ray.data.context import DataContext

    from operators.generate import Generator
    from operators.score import RewardScorer, ScoreCfg, scorer_resources

    ctx = DataContext.get_current()
    apply_defaults = ActorPoolMapOperator._apply_default_remote_args
    # Default (max_restarts: null): nothing passed, so Ray Data's actor-pool defaults apply: unlimited actor
    # restarts, and unlimited retries of the task a dead actor held.
    default = map_batches_kwargs(RewardScorer, scorer_resources(ScoreCfg()), cfg=ScoreCfg())
    assert "max_restarts" not in default and "max_task_retries" not in default
    remote = apply_defaults({}, ctx)
    assert remote["max_restarts"] == -1 and remote["max_task_retries"] == -1
    # A cap from the config: restarts capped, and the batch a dead actor held is still retried.
    capped = map_batches_kwargs(Generator, Resources(max_restarts=2))
    assert capped["max_restarts"] == 2 and capped["max_task_retries"] == -1
    remote = apply_defaults({k: capped[k] for k in ("max_restarts", "max_task_retries")}, ctx)
    assert remote["max_restarts"] == 2 and remote["max_task_retries"] == -1
    # 0 turns fault tolerance off on purpose: no restart and no retry.
    off = map_batches_kwargs(Generator, Resources(max_restarts=0))
    assert off["max_restarts"] == 0 and off["max_task_retries"] == 0


def _keys(path: Path, *cols: str) -> list[tuple]:
    if not path.exists():
        return []
    t = pq.read_table(str(path), columns=list(cols))
    return list(zip(*(t.column(c).to_pylist() for c in cols), strict=True))


def _sample_keys(path: Path) -> list[tuple]:
    """(prompt_id, sample_idx) of every response in a stage of per-prompt rows."""
    if not path.exists():
        return []
    t = pq.read_table(str(path), columns=["prompt_id", "responses"])
    return [(pid, r["sample_idx"]) for pid, rs in zip(t.column("prompt_id").to_pylist(),
                                                      t.column("responses").to_pylist(), strict=True)
            for r in rs or []]


@pytest.mark.slow
def test_killed_generation_and_scoring_actors_lose_and_duplicate_nothing(ray_local, tiny_models, tmp_path,
                                                                          monkeypatch):
    import ray

    import operators.generate
    import operators.score
    from pipelines import curate

    markers = tmp_path / "markers"
    markers.mkdir()
    gen_cls = crash_once(operators.generate.Generator, str(markers), crash_at=2)
    score_cls = crash_once(operators.score.RewardScorer, str(markers), crash_at=2)
    # curate.main imports both classes when it builds the stages, so the crashing subclasses replace them.
    monkeypatch.setattr(operators.generate, "Generator", gen_cls)
    monkeypatch.setattr(operators.score, "RewardScorer", score_cls)

    data = load_yaml(REPO / "pipelines/configs/demo_cpu.yaml")["curate"]
    data["input"]["limit"] = 16
    # 4 prompts x 3 samples per generation batch and 12 rows per scoring batch: several batches each, so
    # the crash lands mid-stage with batches done before it and after it.
    data["generate"].update(model=tiny_models["policy"], num_samples=3, max_tokens=8, max_model_len=512,
                            batch_size=4, max_restarts=1)
    data["score"].update(models=[{"path": tiny_models["reward_multi"]}], batch_size=12)
    data["select"] = {"rule": "pvar_top", "fraction": 0.5}
    data["output"] = {"dir": str(tmp_path / "run")}
    data["ray"]["progress"] = False
    cfg = from_dict(CurateConfig, data)
    result = curate.main(cfg)
    run = tmp_path / "run"

    # Both crashes happened, and a different process (the restarted actor) did the batches after them.
    for name in ("Generator", "RewardScorer"):
        crashed_pid = int((markers / f"{name}.crashed").read_text())
        pids = [int(line.split()[0]) for line in (markers / f"{name}.batches").read_text().splitlines()]
        # Batches 1 and 2 reached the first process; from the retried batch 2 on, only restarted ones.
        assert pids[:2] == [crashed_pid] * 2 and pids[2:] and crashed_pid not in pids[2:], (name, pids)
        print(f"[fault] {name}: SIGKILLed pid {crashed_pid} on batch 2; batches by pid: {pids}")
    restarts = {a["ActorClassName"]: a["NumRestarts"] for a in ray._private.state.actors().values()
                if "Crashing" in a["ActorClassName"]}
    print(f"[fault] actor restarts: {restarts}")
    assert any("CrashingGenerator" in k and v >= 1 for k, v in restarts.items()), restarts
    assert any("CrashingRewardScorer" in k and v >= 1 for k, v in restarts.items()), restarts

    # Exactly once: every prompt either has samples 0..K-1, each once, or was quarantined (too long).
    prompts = {p for (p,) in _keys(run / "prompts", "prompt_id")}
    too_long = {p for (p,) in _keys(run / "quarantine" / "samples", "prompt_id")}
    samples = _sample_keys(run / "samples")
    assert max(Counter(samples).values()) == 1
    assert set(samples) == {(p, j) for p in prompts - too_long for j in range(3)}
    # One row per prompt, each prompt once: a retried batch did not write its prompts twice.
    sample_rows = [p for (p,) in _keys(run / "samples", "prompt_id")]
    assert len(sample_rows) == len(set(sample_rows)) == len(prompts - too_long)
    scored = _sample_keys(run / "scored")
    assert max(Counter(scored).values()) == 1
    assert set(scored) | set(_sample_keys(run / "quarantine" / "scored")) == set(samples)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["samples"]["rows_out"] == len(sample_rows)
    assert all(s["balanced"] for s in manifest["stages"].values())
    assert result["num_pairs"] > 0


# ----------------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------------


def stage_in_progress(run: Path, stage: str) -> list[str] | None:
    """The stage's output files while it is being written, None otherwise. Written means its folder exists
    (`<stage>/`, or `<stage>.tmp/` under the older rename commit) and `<stage>/_SUCCESS`, which the driver
    writes last, does not."""
    if (run / stage / "_SUCCESS").exists():
        return None
    for folder in (run / stage, run / f"{stage}.tmp"):
        try:
            return sorted(str(p.relative_to(run)) for p in folder.iterdir())
        except FileNotFoundError:
            continue
    return None


class StageWatcher(threading.Thread):
    """SIGKILLs a curation driver while it is in the stage `kill_in`: the driver, run with
    `PREFSIFT_HOLD_BEFORE_COMMIT=<kill_in>`, says when that stage's rows are written and then waits before
    the commit, so the kill lands mid-stage however fast the stage is (polling the folder lost a 0.1 s stage
    on a loaded machine). `seen` is what the stage folder held at the kill. The driver's output is collected
    meanwhile."""

    def __init__(self, proc, run: Path, kill_in: str, timeout_s: float = 600):
        super().__init__(daemon=True)
        self.proc, self.run_dir, self.kill_in, self.timeout_s = proc, run, kill_in, timeout_s
        self.lines: list[str] = []
        self.seen: list[str] | None = None
        self.killed = threading.Event()
        self.holding = threading.Event()
        self.reader = threading.Thread(target=self.read, daemon=True)

    def read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if f"stage {self.kill_in}: rows written, holding before the commit" in line:
                self.holding.set()

    def run(self) -> None:
        self.reader.start()
        if self.holding.wait(self.timeout_s) and self.proc.poll() is None:
            self.seen = stage_in_progress(self.run_dir, self.kill_in)
            self.proc.send_signal(signal.SIGKILL)
            self.killed.set()


def _success_mtimes(run: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in run.glob("*/_SUCCESS")}


@pytest.mark.slow
def test_killed_driver_rerun_skips_completed_stages_and_equals_uninterrupted_run(request, tmp_path):
    run = tmp_path / "run"
    cmd = [PYTHON, "-m", "pipelines.curate", "--config", RATED_CONFIG, *RATED_OVERRIDES, f"output.dir={run}"]
    first, second = Processes(), Processes()
    try:
        driver = first.popen(cmd, cwd=REPO, env=child_env(PREFSIFT_HOLD_BEFORE_COMMIT="stats"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        watcher = StageWatcher(driver, run, kill_in="stats")
        watcher.start()
        # The uninterrupted reference runs meanwhile in this process (shared with test_multinode).
        reference = request.getfixturevalue("rated_reference")
        driver.wait(timeout=600)
        watcher.reader.join(timeout=30)
        assert watcher.killed.is_set(), "".join(watcher.lines)[-4000:]
        assert driver.returncode == -signal.SIGKILL
        # Only the driver writes _SUCCESS, so with the driver dead the marker's absence now means the kill
        # landed before the commit: stats/ was incomplete, and the rerun has a partial folder to deal with.
        assert stage_in_progress(run, "stats") is not None, (watcher.seen, "".join(watcher.lines)[-3000:])
        assert watcher.seen and any(p.endswith(".parquet") for p in watcher.seen), watcher.seen  # rows, no commit
        print(f"[fault] at the kill the stats folder held {watcher.seen}")
        # The driver's embedded Ray (GCS, raylet, workers) may outlive a SIGKILLed driver; end it.
        orphans = first.members()
        print(f"[fault] driver SIGKILLed while writing stats; {len(orphans)} of its Ray processes outlived it")
        leftovers = first.stop()
        assert not leftovers, leftovers

        done = _success_mtimes(run)
        assert {"prompts"} <= set(done) and "stats" not in done, sorted(done)  # rated data: no scored/ stage

        res = second.run(cmd, timeout=600, cwd=REPO, env=child_env())
        log = res.stdout
        assert res.returncode == 0, log[-6000:]
        assert "stage prompts: complete for this config, skipped" in log, log[-3000:]
        assert "stage stats: running" in log
        print("[fault] rerun:", *[ln for ln in log.splitlines() if "[prefsift] stage" in ln], sep="\n  ")
        after = _success_mtimes(run)
        assert all(after[s] == done[s] for s in done), (done, after)  # completed stages were not rewritten
        assert not list(run.glob("**/*.tmp")), list(run.glob("**/*.tmp"))

        assert_same_rows(run / "prompts", reference / "prompts", ["prompt_id"])
        assert_same_rows(run / "stats", reference / "stats", ["prompt_id"])
        assert_same_rows(run / "selection", reference / "selection", ["prompt_id"])
        assert assert_same_rows(run / "pairs", reference / "pairs", ["prompt_id"]) > 0
        manifest = json.loads((run / "manifest.json").read_text())
        assert all(s["balanced"] for s in manifest["stages"].values())
    finally:
        survivors = first.stop() + second.stop()
        assert not survivors, survivors


# ----------------------------------------------------------------------------------------------------------
# A Ray Train worker
# ----------------------------------------------------------------------------------------------------------


def _train_worker_pids(ray) -> list[int]:
    # The embedded test cluster has no dashboard, so the state API is unavailable; the GCS actor table
    # (what `ray list actors` reads) still names each actor's class and process.
    return [a["Pid"] for a in ray._private.state.actors().values()
            if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE" and a["Pid"]]


def _registered(ckpt_dir: Path) -> list[str]:
    """Checkpoints Ray Train's controller has committed (its snapshot file is rewritten on each report)."""
    try:
        snap = json.loads((ckpt_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-rewrite
        return []
    return [c["checkpoint_dir_name"] for c in snap.get("checkpoint_results", [])]


def _steps(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]


def write_pairs(path: Path, n: int = 24) -> Path:
    """TRL-schema pairs from the shipped UltraFeedback sample (higher-rated response chosen): pairs as
    curation writes them, without running a curation first."""
    import gzip

    import pyarrow as pa

    rows = []
    with gzip.open(REPO / "pipelines/data/ultrafeedback_binarized_sample_300.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            a, b = sorted(r["responses"][:2], key=lambda x: x["overall"], reverse=True)
            rows.append({"prompt_id": r["prompt_id"], "prompt": r["prompt"], "chosen": a["text"],
                         "rejected": b["text"]})
            if len(rows) == n:
                break
    path.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), path / "pairs-0.parquet")
    return path


@pytest.mark.slow
def test_killed_train_worker_restores_from_last_checkpoint(ray_local, tiny_models, tmp_path):
    import ray

    from pipelines import train_dpo

    pairs = write_pairs(tmp_path / "pairs")
    out = tmp_path / "train_run"
    every, total = 5, 60
    cfg = load_config(train_dpo.TrainConfig, REPO / "pipelines/configs/train_demo_cpu.yaml", [
        f"input.path={pairs}", f"output.dir={out}", f"model.policy={tiny_models['policy']}",
        # SFT needs no reference log-probs: the test is about restarts, not the loss. Without the reference
        # stage nothing quarantines a prompt that fills max_length, so prompts keep their last 256 tokens.
        "loss.name=sft", "input.max_prompt_length=256", f"optim.max_steps={total}", "optim.per_device_batch_size=2", "optim.grad_accum=1",
        f"checkpoint.every_n_steps={every}", "checkpoint.keep=null", "failure.max_failures=2",
        "run.name=fault", "ray.progress=false",
    ])
    ckpt_dir = out / "train" / "fault"
    kill: dict = {}

    def kill_a_worker_after_first_checkpoint() -> None:
        # A checkpoint folder appears while the report is still in flight; only once the controller has
        # recorded it in its snapshot is it what a restarted worker group resumes from.
        deadline = time.monotonic() + 480
        while time.monotonic() < deadline and not _registered(ckpt_dir):
            time.sleep(0.2)
        pids = _train_worker_pids(ray)
        if not pids:
            return
        kill["step"] = max(_steps(out / "train" / "metrics.jsonl"), default=0)
        kill["checkpoints"] = _registered(ckpt_dir)
        kill["pid"] = pids[0]
        os.kill(pids[0], signal.SIGKILL)

    killer = threading.Thread(target=kill_a_worker_after_first_checkpoint, daemon=True)
    killer.start()
    summary = train_dpo.main(cfg)
    killer.join(timeout=10)

    assert kill.get("pid"), "no Ray Train worker was found to kill"
    steps = _steps(out / "train" / "metrics.jsonl")
    assert kill["step"] < total, f"training had finished before the kill: {kill}"
    restarts = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    assert len(restarts) <= 1, steps
    if restarts:
        resumed = steps[restarts[0]]
    else:
        # Killed before any step past the committed checkpoint was logged: the new group's first step is the
        # next one, so no step repeats (a restart from step 1 would repeat them all).
        assert steps == list(range(1, total + 1)), steps
        resumed = kill["step"] + 1
    print(f"[fault] train worker pid {kill['pid']} SIGKILLed at step {kill['step']} with committed "
          f"{kill['checkpoints']}; the new group resumed at step {resumed}, finished at {steps[-1]}")
    # The restarted group began right after a checkpoint committed before the kill, not at step 1.
    assert f"checkpoint_{resumed - 1:06d}" in kill["checkpoints"], (resumed, kill, steps)
    assert steps[-1] == total and summary["steps"] == total
    assert Path(summary["checkpoint"]).name == f"checkpoint_{total:06d}"
    assert kill["pid"] not in _train_worker_pids(ray)
