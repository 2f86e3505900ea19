"""A stage's write without Ray: the split into good, quarantined and held rows, and retried tasks' shards."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from operators.base import QUARANTINE
from pipelines.runtime.stages import Aside, SplitSink, _Shards


def test_split_holds_flagged_rows_and_settles_them_after(tmp_path):
    fs = pafs.LocalFileSystem()
    aside = Aside("_held", settle=lambda held: held, private=("_rid",))  # settled by run_stage, after the pass
    sink = SplitSink(fs, f"{tmp_path}/good", f"{tmp_path}/bad", ("n",), aside=aside, held_dir=f"{tmp_path}/held")
    block = pa.table({"id": ["a", "b", "c", "d"], "n": [2, 3, 4, 5], "_rid": [1, 2, 3, 4],
                      QUARANTINE: [None, "empty_prompt", None, None], "_held": [False, False, True, None]})
    sink.add(sink.write_tables([block], "000000"))
    assert (sink.rows_out, sink.held, sink.reasons, sink.sums) == (2, 1, {"empty_prompt": 1}, {"n": 7.0})
    good = pq.read_table(f"{tmp_path}/good")
    assert good.column_names == ["id", "n"]  # no row id, no flag, no quarantine column
    held = pq.read_table(f"{tmp_path}/held")
    assert held.column("id").to_pylist() == ["c"] and "_rid" in held.column_names
    assert pq.read_table(f"{tmp_path}/bad").column("reason").to_pylist() == ["empty_prompt"]


def test_a_retried_task_with_fewer_parts_leaves_no_stale_part(tmp_path):
    fs = pafs.LocalFileSystem()
    first = _Shards(fs, str(tmp_path), "tok-000003")
    first.add(pa.table({"x": [1]}))
    first.add(pa.table({"x": ["not an int"]}))  # a schema it cannot cast: a second part
    first.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok-000003-0.parquet", "tok-000003-1.parquet"]
    retry = _Shards(fs, str(tmp_path), "tok-000003")
    retry.add(pa.table({"x": [1]}))
    retry.finish()
    assert [p.name for p in tmp_path.iterdir()] == ["tok-000003-0.parquet"]
    assert pc.sum(pq.read_table(tmp_path).column("x")).as_py() == 1
