"""Run folders without directory renames: the stage commit protocol on a local folder, then whole runs on an
S3-compatible server (moto) on loopback."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from operators.base import QUARANTINE
from pipelines.runtime.manifest import SUCCESS, RunDir, StageRecord
from pipelines.runtime.stages import run_stage


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
