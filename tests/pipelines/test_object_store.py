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
from pipelines.runtime.config import CurateConfig, load_config
from pipelines.runtime.manifest import SUCCESS, RunDir, StageRecord
from pipelines.runtime.stages import run_stage

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
        return pads.dataset(f"{BUCKET}/{key}", filesystem=self.fs, format="parquet").to_table()


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


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()
