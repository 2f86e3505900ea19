"""Duplicate prompt ids from keys alone: the pure steps of `operators.dedupe.dedupe_prompts`, and the keyed
parquet read that gives rows their ids."""

from __future__ import annotations

import pyarrow as pa

from operators import dedupe
from operators.base import QUARANTINE
from operators.dedupe import (
    HELD,
    ROW_ID,
    apply_decisions,
    digest_rows,
    duplicate_decisions,
    hold_repeated,
    live_ids,
    read_parquet_keyed,
    repeated_ids,
    settle_duplicates,
)


def rows() -> pa.Table:
    return pa.table({
        "prompt_id": ["a", "b", "a", "c", "c", "d", "d"],
        "prompt": ["same", "x", "same", "one", "two", "q", "q"],
        QUARANTINE: [None, None, None, None, None, None, "empty_prompt"],
        ROW_ID: pa.array([10, 11, 12, 13, 14, 15, 16], pa.uint64()),
    })


def test_only_live_ids_are_shuffled_and_repeats_found():
    keys = live_ids(rows())
    assert keys.column_names == ["prompt_id"]  # no text goes into the shuffle
    assert sorted(keys.column("prompt_id").to_pylist()) == ["a", "a", "b", "c", "c", "d"]  # d's 2nd is quarantined
    assert sorted(repeated_ids(keys).column("prompt_id").to_pylist()) == ["a", "c"]


def test_exact_copies_keep_one_and_differing_rows_all_go():
    t = rows()
    keys = digest_rows(t, pa.array(["a", "c"]))
    assert sorted(keys.column(ROW_ID).to_pylist()) == [10, 12, 13, 14]
    decisions = duplicate_decisions(keys)
    assert dict(zip(decisions.column(ROW_ID).to_pylist(), decisions.column("reason").to_pylist(), strict=True)) == {
        12: "duplicate_prompt_id", 13: "conflicting_duplicate_prompt_id", 14: "conflicting_duplicate_prompt_id"}
    out = apply_decisions(t, decisions)
    assert ROW_ID not in out.column_names
    assert out.column(QUARANTINE).to_pylist() == [None, None, "duplicate_prompt_id",
                                                  "conflicting_duplicate_prompt_id",
                                                  "conflicting_duplicate_prompt_id", None, "empty_prompt"]


def test_held_rows_are_the_live_ones_of_repeated_ids_and_settle_by_the_rule():
    t = rows()
    flagged = hold_repeated(t, pa.array(["a", "c", "d"]))
    # d's second row is quarantined already: not held, so d's first row is not held for judging either way.
    assert flagged.column(HELD).to_pylist() == [True, False, True, True, True, True, False]
    held = flagged.filter(flagged.column(HELD)).drop_columns([HELD])
    settled = settle_duplicates(held)
    assert ROW_ID not in settled.column_names
    assert settled.column("prompt_id").to_pylist() == ["a", "a", "c", "c", "d"]
    assert settled.column(QUARANTINE).to_pylist() == [None, "duplicate_prompt_id", "conflicting_duplicate_prompt_id",
                                                      "conflicting_duplicate_prompt_id", None]


def test_keyed_read_streams_small_blocks_with_ids_stable_across_runs(ray_local, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    for f in range(2):  # part-0: one row group, which the read must still cut; part-1: 3, one task each
        pq.write_table(pa.table({"prompt_id": [f"p{f}-{i}" for i in range(300)], "prompt": ["x" * 100] * 300}),
                       tmp_path / f"part-{f}.parquet", row_group_size=300 if f == 0 else 100)
    (tmp_path / "_SUCCESS").write_text("")  # a marker file is not read
    monkeypatch.setattr(dedupe, "KEYED_BATCH_BYTES", 4000)  # about 38 rows of ~105 bytes per batch
    monkeypatch.setattr(dedupe, "KEYED_TASK_BYTES", 1)
    ds = read_parquet_keyed(str(tmp_path))
    blocks = [pa.Table.from_batches(b.to_batches()) for b in ds.iter_batches(batch_format="pyarrow",
                                                                              batch_size=None)]
    rows = pa.concat_tables(blocks)
    assert rows.num_rows == 600 and len(blocks) >= 10 and max(b.num_rows for b in blocks) < 300
    ids = dict(zip(rows.column("prompt_id").to_pylist(), rows.column(ROW_ID).to_pylist(), strict=True))
    assert len(set(ids.values())) == 600
    # Within a file, the ids count the rows from the file's own base, across its row groups and read tasks.
    assert ids["p0-5"] - ids["p0-0"] == 5 and ids["p1-299"] - ids["p1-0"] == 299
    again = pa.concat_tables(read_parquet_keyed(str(tmp_path)).iter_batches(batch_format="pyarrow", batch_size=None))
    assert dict(zip(again.column("prompt_id").to_pylist(), again.column(ROW_ID).to_pylist(), strict=True)) == ids
