"""Stage work done by one Ray task per parquet shard of a stage, without a Ray Data execution: a map into a
new stage (`PerShard`, written through the stage's `SplitSink`) or a rewrite of a stage's own shards."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from pipelines.runtime.manifest import RunDir

if TYPE_CHECKING:
    from pipelines.runtime.stages import SplitSink


def stage_files(run: RunDir, stage: str) -> list[str]:
    """The parquet shards of a stage, as paths on `run.fs`."""
    return sorted(f.path for f in run.fs.get_file_info(pafs_selector(run.path(stage))) if f.path.endswith(".parquet"))


def pafs_selector(path: str):
    import pyarrow.fs as pafs

    return pafs.FileSelector(path, recursive=True, allow_not_found=True)


@dataclass(frozen=True)
class PerShard:
    """A stage made by one Ray task per parquet shard of another stage: `fn(table)` on each shard's record
    batches, each task writing its own part of the stage (`SplitSink.write_tables`). For a map over a stage
    already split into a few large shards it is what a Ray Data read -> map -> write does, without the
    execution's fixed cost (a file-listing task, planning, scheduling), and the rows never reach the driver."""

    source: RunDir
    stage: str
    fn: Callable[[pa.Table], pa.Table]


def run_per_shard(job: PerShard, sink: SplitSink) -> None:
    import ray

    # A whole CPU each: as many at once as Ray Data's read tasks before them, whose idle workers they reuse,
    # where half a CPU each would start new worker processes for a few seconds' work.
    task = ray.remote(num_cpus=1)(_shard_task)
    fn = ray.put(job.fn)
    for r in ray.get([task.remote(sink, job.source.fs, path, fn, f"{i:06d}")
                      for i, path in enumerate(stage_files(job.source, job.stage))]):
        sink.add(r)


def _shard_task(sink: SplitSink, fs, path: str, fn, name: str) -> dict:
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        # At least one table, empty for an empty shard, so that the schema reaches the sink.
        tables = [pa.Table.from_batches([b], pf.schema_arrow) for b in pf.iter_batches()] or \
            [pf.schema_arrow.empty_table()]
        return sink.write_tables((fn(t) for t in tables), name)


def rewrite_shards(run: RunDir, stage: str, fn: Callable[[pa.Table], pa.Table]) -> None:
    """Each parquet shard of a stage replaced by `fn(shard)`, one Ray task per shard (before the stage's
    commit: a driver killed meanwhile leaves the folder without _SUCCESS, and the rerun starts it again)."""
    import ray

    task = ray.remote(num_cpus=1)(_rewrite_shard)  # a whole CPU each: see run_per_shard
    fn_ref = ray.put(fn)
    ray.get([task.remote(run.fs, path, fn_ref) for path in stage_files(run, stage)])


def _rewrite_shard(fs, path: str, fn: Callable[[pa.Table], pa.Table]) -> None:
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    new = path[: -len(".parquet")] + "-r.parquet"
    if fs.get_file_info(path).type == pafs.FileType.NotFound:  # a retried task whose first try got this far
        return
    with fs.open_input_file(path) as f:
        table = fn(pq.read_table(f))
    with fs.open_output_stream(new) as f:
        pq.write_table(table, f)
    fs.delete_file(path)
