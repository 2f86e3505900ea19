"""Run folders without directory renames: the stage commit protocol on a local folder, then whole runs on an
S3-compatible server (moto's) on loopback: curate, select, train, and reruns that resume.

As on a cluster, the two settings reach Ray's workers in different ways. Credentials are resolved on each
node from its own environment (a job's runtime_env env_vars, or an instance role): pyarrow does not pickle
credentials it found in the environment. So they are set here at import, before the session's Ray starts
its workers. The endpoint is set (AWS_ENDPOINT_URL) only in this process and only once Ray runs, so workers
reach the server only through the filesystem object the driver resolved, which carries it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from operators.base import QUARANTINE
from pipelines import curate
from pipelines import select as select_pipeline
from pipelines.runtime.config import CurateConfig, from_dict, load_config
from pipelines.runtime.manifest import SUCCESS, RunDir, StageRecord
from pipelines.runtime.stages import run_stage
from pipelines.train_dpo import TrainConfig
from pipelines.train_dpo import main as train_main
from pipelines.training.metrics import JsonlLog
from pipelines.training.placement import input_stamp, locate_pairs

REPO = Path(__file__).resolve().parents[2]
UF_300 = REPO / "pipelines" / "data" / "ultrafeedback_binarized_sample_300.jsonl.gz"
BUCKET = "prefsift"
for _key, _value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(_key, _value)  # moto accepts any credentials


def ten_rows() -> pa.Table:
    """Ten rows, two of them set aside with a reason: 8 out + 2 quarantined."""
    return pa.table({"prompt_id": [f"p{i}" for i in range(10)], "x": list(range(10)),
                     QUARANTINE: [None] * 8 + ["too_short", "too_short"]})


class Builds:
    """A stage's build that counts how often the stage really ran."""

    def __init__(self, table: pa.Table):
        self.table, self.calls = table, 0

    def __call__(self):
        import ray

        self.calls += 1
        return ray.data.from_arrow(self.table)


def stage_rows(run: RunDir, *parts: str) -> int:
    return pq.read_table(run.path(*parts)).num_rows


def test_is_complete_needs_the_matching_marker_and_record(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    (tmp_path / "run" / "s").mkdir()
    pq.write_table(ten_rows(), tmp_path / "run" / "s" / "part-0.parquet")
    assert not run.is_complete("s", "fp1")  # shards, no _SUCCESS: a killed run's
    run.write_text("fp0", "s", SUCCESS)
    assert not run.is_complete("s", "fp1")  # another config's output
    run.write_text("fp1", "s", SUCCESS)
    assert not run.is_complete("s", "fp1")  # the manifest has no record of it yet
    run.record("s", StageRecord(rows_in=10, rows_out=10, rows_out_as_input=10, fingerprint="fp0"))
    assert not run.is_complete("s", "fp1")  # the record is an older run's (killed between the two writes)
    run.record("s", StageRecord(rows_in=10, rows_out=10, rows_out_as_input=10, fingerprint="fp1"))
    assert run.is_complete("s", "fp1")
    assert RunDir(str(tmp_path / "run")).is_complete("s", "fp1")  # from the manifest on disk
    assert not (tmp_path / "run" / "manifest.json.tmp").exists()


def test_stage_commits_in_place_and_reruns_incomplete_folders(ray_local, tmp_path):
    run = RunDir(str(tmp_path / "run"))
    build = Builds(ten_rows())
    rec = run_stage(run, "s", "fp1", build, rows_in=None)
    assert (rec.rows_in, rec.rows_out, rec.quarantined) == (10, 8, {"too_short": 2})
    assert build.calls == 1
    assert run.read_text("s", SUCCESS) == "fp1"
    assert run.read_text("quarantine", "s", SUCCESS) == "fp1"
    assert stage_rows(run, "s") == 8 and stage_rows(run, "quarantine", "s") == 2
    assert not list(tmp_path.glob("run/**/*.tmp"))  # nothing renamed into place

    # Same fingerprint: skipped, the stage does not run.
    again = run_stage(run, "s", "fp1", build, rows_in=None)
    assert again.skipped and again.rows_out == 8 and build.calls == 1

    # A killed rerun: shards of its own beside the old ones and no _SUCCESS. The folder is cleared and
    # rewritten, so the stray shard's rows do not add to the output.
    (tmp_path / "run" / "s" / SUCCESS).unlink()
    pq.write_table(ten_rows(), tmp_path / "run" / "s" / "stray-0.parquet")
    rec = run_stage(run, "s", "fp1", build, rows_in=None)
    assert build.calls == 2 and not rec.skipped
    assert stage_rows(run, "s") == 8 and stage_rows(run, "quarantine", "s") == 2
    assert not (tmp_path / "run" / "s" / "stray-0.parquet").exists()

    # A _SUCCESS of another config reruns too; with no bad rows now, the old quarantine goes.
    run.write_text("fp0", "s", SUCCESS)
    rec = run_stage(run, "s", "fp1", Builds(ten_rows().drop_columns([QUARANTINE])), rows_in=None)
    assert (rec.rows_out, rec.quarantined) == (10, {})
    assert stage_rows(run, "s") == 10 and not run.exists("quarantine", "s")
    assert run.read_text("s", SUCCESS) == "fp1"


# ----------------------------------------------------------------------------------------------------------
# On an S3-compatible server
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Store:
    fs: pafs.S3FileSystem
    endpoint: str

    def keys(self, prefix: str) -> list[str]:
        found = self.fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True))
        return sorted(i.path for i in found if i.type == pafs.FileType.File)

    def text(self, key: str) -> str:
        with self.fs.open_input_stream(f"{BUCKET}/{key}") as f:
            return f.read().decode("utf-8")

    def put(self, key: str, data: bytes) -> None:
        with self.fs.open_output_stream(f"{BUCKET}/{key}", compression=None) as f:  # the bytes as they are
            f.write(data)

    def table(self, key: str) -> pa.Table:
        shards = [k for k in self.keys(key) if k.endswith(".parquet")]  # not the tests' marker objects
        return pads.dataset(shards, filesystem=self.fs, format="parquet").to_table()


@pytest.fixture(scope="module")
def s3(ray_local):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = "http://{}:{}".format(*server.get_host_and_port())
    env = pytest.MonkeyPatch()
    env.setenv("AWS_ENDPOINT_URL", endpoint)  # the AWS SDK's variable, which pyarrow reads
    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    yield Store(fs, endpoint)
    env.undo()
    server.stop()


def test_endpoint_in_the_uri_and_logs_without_append(s3, monkeypatch):
    """A query URI alone reaches the server; a run folder's pairs/ is found on S3 with the query kept; a
    JSON-lines log on S3 appears at flush and keeps the earlier run's lines."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    query = f"?endpoint_override={s3.endpoint}&scheme=http"
    run = RunDir(f"s3://{BUCKET}/q{query}")
    run.set("note", "via the query")
    assert json.loads(s3.text("q/manifest.json"))["note"] == "via the query"
    assert run.uri_of("pairs") == f"s3://{BUCKET}/q/pairs"
    assert locate_pairs(run.uri) == run.uri  # no pairs/ yet: the path is taken as the pairs
    s3.put("q/pairs/part-0.parquet", _parquet_bytes(pa.table({"prompt_id": ["a"]})))
    pairs = locate_pairs(run.uri)
    assert pairs == f"s3://{BUCKET}/q/pairs{query}"
    # The reference stage's fingerprint sees a changed input on S3 as on a local disk.
    before = input_stamp(pairs)
    assert [f[:2] for f in before] == [[f"{BUCKET}/q/pairs/part-0.parquet", len(_parquet_bytes(
        pa.table({"prompt_id": ["a"]})))]]
    s3.put("q/pairs/part-0.parquet", _parquet_bytes(pa.table({"prompt_id": ["a", "b"]})))
    assert input_stamp(pairs) != before

    log = JsonlLog(run.fs, run.path("train", "metrics.jsonl"))
    log.append({"step": 1})
    assert f"{BUCKET}/q/train/metrics.jsonl" not in s3.keys("q")  # held until a checkpoint flushes it
    log.flush()
    resumed = JsonlLog(run.fs, run.path("train", "metrics.jsonl"))
    resumed.append({"step": 2})
    resumed.flush()
    assert steps_of(s3.text("q/train/metrics.jsonl")) == [1, 2]


def curate_cfg(out: str, *overrides: str) -> CurateConfig:
    return load_config(CurateConfig, "pipelines/configs/real_rated.yaml",
                       [f"output.dir={out}", "ray.progress=false", *overrides])


@pytest.fixture(scope="module")
def s3_curated(s3):
    """UltraFeedback's 300 rated prompts curated into s3://prefsift/uf, the input read from the bucket too."""
    s3.put("inputs/uf_300.jsonl.gz", UF_300.read_bytes())
    cfg = curate_cfg(f"s3://{BUCKET}/uf", f"input.path=s3://{BUCKET}/inputs/uf_300.jsonl.gz",
                     "select.fraction=0.1")
    return cfg, curate.main(cfg)


def test_curate_writes_committed_stages_to_s3(s3, s3_curated):
    _, res = s3_curated
    assert res["pairs"] == f"s3://{BUCKET}/uf/pairs" and res["num_pairs"] == 30
    keys = s3.keys("uf")
    m = json.loads(s3.text("uf/manifest.json"))
    assert {"prompts", "stats", "selection", "pairs"} <= set(m["stages"])
    for stage, st in m["stages"].items():
        assert st["balanced"] and st["fingerprint"] == s3.text(f"uf/{stage}/{SUCCESS}"), stage
        assert any(k.startswith(f"{BUCKET}/uf/{stage}/") and k.endswith(".parquet") for k in keys), stage
    assert not [k for k in keys if ".tmp" in k], keys
    assert m["stages"]["prompts"]["rows_out"] == 300
    stats, pairs = s3.table("uf/stats"), s3.table("uf/pairs")
    assert stats.num_rows == 300 and len(set(stats.column("prompt_id").to_pylist())) == 300
    top = sorted(stats.column("pvar").to_pylist(), reverse=True)[:30]
    assert sorted(pairs.column("pvar").to_pylist(), reverse=True) == pytest.approx(top)


def test_rerun_on_s3_skips_complete_stages_and_redoes_unmarked_ones(s3, s3_curated):
    cfg, first = s3_curated
    # A stage that reruns clears its folder, so a marker object left in a folder shows what was redone.
    stages = list(json.loads(s3.text("uf/manifest.json"))["stages"])
    for stage in stages:
        s3.put(f"uf/{stage}/untouched.txt", b"x")
    # pairs/ as a killed run leaves it: its shards and a stray one, and no _SUCCESS.
    s3.fs.delete_file(f"{BUCKET}/uf/pairs/{SUCCESS}")
    s3.put("uf/pairs/stray-0.parquet", _parquet_bytes(pa.table({"prompt_id": ["stray"]})))

    again = curate.main(cfg)
    keys = s3.keys("uf")
    for stage in stages:
        assert (f"{BUCKET}/uf/{stage}/untouched.txt" in keys) == (stage != "pairs"), stage
    assert f"{BUCKET}/uf/pairs/stray-0.parquet" not in keys
    assert f"{BUCKET}/uf/pairs/{SUCCESS}" in keys
    assert again["num_pairs"] == first["num_pairs"] == s3.table("uf/pairs").num_rows


def test_select_reruns_only_selection_on_s3(s3, s3_curated):
    cfg, _ = s3_curated
    cfg = curate_cfg(cfg.output.dir, f"input.path={cfg.input.path}", "select.fraction=0.2")
    s3.put("uf/stats/untouched.txt", b"x")
    out = select_pipeline.main(cfg)
    assert out["records"]["pairs"].rows_out == 60 == s3.table("uf/pairs").num_rows
    assert f"{BUCKET}/uf/stats/untouched.txt" in s3.keys("uf/stats")  # statistics were not recomputed


def train_cfg(policy: str, max_steps: int) -> TrainConfig:
    """2 workers x 2 pairs a step, a checkpoint every 2 steps, reference log-probs computed as a stage."""
    return from_dict(TrainConfig, {
        "run": {"name": "uf", "seed": 0},
        "input": {"path": f"s3://{BUCKET}/uf", "max_length": 64},  # a run folder: its pairs/ is read
        "output": {"dir": f"s3://{BUCKET}/train", "log_batches": True},
        "model": {"policy": policy},
        "reference": {"num_cpus": 0.5, "batch_size": 16, "micro_batch_size": 8},
        "loss": {"name": "sigmoid", "beta": 0.1},
        "optim": {"lr": 1e-3, "max_steps": max_steps, "per_device_batch_size": 2},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "checkpoint": {"every_n_steps": 2, "keep": 2},
        "ray": {"num_cpus": 2, "object_store_memory_gb": 1.0, "progress": False},
    })


@pytest.fixture(scope="module")
def s3_trained(s3, s3_curated, tiny_models):
    """4 steps on the curated pairs, then the same run rerun with max_steps 6: it resumes at step 4."""
    first = train_main(train_cfg(tiny_models["policy"], 4))
    after_first = {"metrics": s3.text("train/train/metrics.jsonl"), "keys": s3.keys("train")}
    s3.put("train/pairs_ref/untouched.txt", b"x")
    second = train_main(train_cfg(tiny_models["policy"], 6))
    return {"first": first, "after_first": after_first, "second": second}


def steps_of(jsonl: str) -> list[int]:
    return [json.loads(line)["step"] for line in jsonl.splitlines()]


@pytest.mark.slow  # two Ray Train fits
def test_training_writes_checkpoints_and_metrics_to_s3(s3, s3_trained):
    first, seen = s3_trained["first"], s3_trained["after_first"]
    assert first["checkpoint"] == f"s3://{BUCKET}/train/train/uf/checkpoint_000004"
    assert first["metrics_file"] == f"s3://{BUCKET}/train/train/metrics.jsonl"
    assert steps_of(seen["metrics"]) == [1, 2, 3, 4]
    ckpt = f"{BUCKET}/train/train/uf/checkpoint_000004"
    assert {f"{ckpt}/trainer_state.json", f"{ckpt}/config.json", f"{ckpt}/trainer_state.pt"} <= set(seen["keys"])
    assert f"{BUCKET}/train/pairs_ref/{SUCCESS}" in seen["keys"]
    # Most real prompts exceed max_length 64 and are quarantined by the reference stage, on S3 too.
    pairs, ref, bad = s3.table("uf/pairs"), s3.table("train/pairs_ref"), s3.table("train/quarantine/pairs_ref")
    assert ref.num_rows == first["pairs"] > 0 and bad.num_rows > 0
    assert ref.num_rows + bad.num_rows == pairs.num_rows
    assert {"ref_chosen_logp", "ref_rejected_logp"} <= set(ref.column_names)
    assert set(bad.column("reason").to_pylist()) == {"prompt_exceeds_max_length"}
    assert f"{BUCKET}/train/quarantine/pairs_ref/{SUCCESS}" in seen["keys"]
    assert all(k.startswith(f"{BUCKET}/") for k in seen["keys"])
    assert not [k for k in seen["keys"] if ".tmp" in k]


@pytest.mark.slow  # two Ray Train fits
def test_training_on_s3_resumes_from_its_checkpoint(s3, s3_trained):
    second = s3_trained["second"]
    assert second["checkpoint"] == f"s3://{BUCKET}/train/train/uf/checkpoint_000006"
    state = json.loads(s3.text("train/train/uf/checkpoint_000006/trainer_state.json"))
    assert state["step"] == 6
    rows = [json.loads(line) for line in s3.text("train/train/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # 5..6 follow the first run's 1..4
    # Resumed at step 4 of a cosine schedule rebuilt for 6 steps: lr = lr0 * 0.5 (1 + cos(pi 4/6)) = 2.5e-4.
    assert rows[4]["lr"] == pytest.approx(2.5e-4, rel=1e-6)
    assert f"{BUCKET}/train/pairs_ref/untouched.txt" in s3.keys("train/pairs_ref")  # reference not recomputed
    m = json.loads(s3.text("train/manifest.json"))
    assert m["train"]["checkpoint"] == second["checkpoint"] and m["stages"]["pairs_ref"]["balanced"]


def _read_checkpoint_late(config: dict) -> None:
    """A worker that opens the checkpoint through local_folder. Rank 1 comes 1 s after rank 0 has downloaded
    it; rank 0 keeps reading for 1.5 s. Each writes what it saw to <out>/rank<r>.json."""
    import hashlib
    import time

    import ray.train

    from pipelines.training.checkpoint import local_folder

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    ckpt = config["checkpoint"]  # one object for both ranks, as ray.train.get_checkpoint() gives them
    if rank == 1:
        time.sleep(1.0)
    with local_folder(ckpt, ctx.get_local_rank(), ctx.get_world_size()) as folder:
        weights = os.path.join(folder, "weights.bin")
        before = os.stat(weights)
        if rank == 0:
            time.sleep(1.5)
        digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest()
        after = os.stat(weights)
    seen = {"folder": folder, "sha256": digest,
            "unchanged": (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)}
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(seen))


@pytest.mark.slow  # a Ray Train fit
def test_a_checkpoint_on_s3_is_downloaded_once_per_node(s3, tmp_path):
    """Two ranks on one node read one download of the checkpoint, which nothing rewrites while they read it
    (Ray's as_directory downloads again for a rank that comes after the first download finished), and the
    folder is gone afterwards."""
    import hashlib

    from ray.train import Checkpoint, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    weights = os.urandom(3 << 20)
    s3.put("late/checkpoint_000001/weights.bin", weights)
    s3.put("late/checkpoint_000001/config.json", b"{}")
    TorchTrainer(_read_checkpoint_late,
                 train_loop_config={"checkpoint": Checkpoint(f"{BUCKET}/late/checkpoint_000001", filesystem=s3.fs),
                                    "out": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(name="late", storage_path=str(tmp_path / "ray"))).fit()
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0]["folder"] == seen[1]["folder"]
    assert [s["sha256"] for s in seen] == [hashlib.sha256(weights).hexdigest()] * 2
    assert [s["unchanged"] for s in seen] == [True, True]
    assert not os.path.exists(seen[0]["folder"])


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()
