"""`--dry-run` counts the rows the reader will read: the same files, compressions and record rules, checked
against a real read (operators.read.read_input through Ray Data) of each input."""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.read import read_input
from pipelines.tools.cli import inspect_input, main

REPO = Path(__file__).resolve().parents[2]


def rows(n: int, start: int = 0) -> list[str]:
    return [json.dumps({"prompt_id": f"p{i}", "prompt": f"question {i}"}) for i in range(start, start + n)]


def jsonl_gz_with_blank_lines(root: Path) -> tuple[Path, int]:
    # A BOM, CRLF ends, blank and whitespace-only lines, no newline at the end: 5 records in 11 lines.
    a, b, c, d, e = rows(5)
    text = "\ufeff" + a + "\r\n\r\n" + b + "\r\n   \n\n" + c + "\n\t\n" + d + "\n\n" + e
    path = root / "blank.jsonl.gz"
    path.write_bytes(gzip.compress(text.encode("utf-8")))
    return path, 5


def plain_jsonl(root: Path) -> tuple[Path, int]:
    # Uncompressed, blank lines at the end, and one line that is not JSON: the read quarantines it as a
    # row, so it counts.
    path = root / "plain.jsonl"
    path.write_text("\n".join([*rows(3), "{not json", *rows(2, 3)]) + "\n\n\n", encoding="utf-8")
    return path, 6


def folder_of_files(root: Path) -> tuple[Path, int]:
    # bz2 and zstd (the line counter opened anything but .gz as plain text), and a .json array of 3 objects
    folder = root / "mixed"
    folder.mkdir()
    (folder / "a.jsonl.bz2").write_bytes(bz2.compress(("\n".join(rows(4)) + "\n\n").encode()))
    with pa.CompressedOutputStream(str(folder / "b.jsonl.zst"), "zstd") as f:
        f.write(("\n\n".join(rows(2, 4)) + "\n").encode())
    (folder / "c.json").write_text(json.dumps([json.loads(r) for r in rows(3, 6)], indent=2), encoding="utf-8")
    return folder, 9


def parquet_folder(root: Path) -> tuple[Path, int]:
    folder = root / "pq"
    folder.mkdir()
    for k, n in enumerate((7, 4)):
        pq.write_table(pa.Table.from_pylist([json.loads(r) for r in rows(n, 10 * k)]), folder / f"part-{k}.parquet")
    (folder / "_SUCCESS").write_text("")  # a run's marker: neither reader counts it
    return folder, 11


def hf_disk(root: Path) -> tuple[Path, int]:
    import datasets

    table = [json.loads(r) for r in rows(6)]
    dd = datasets.DatasetDict({"test": datasets.Dataset.from_list(table[:2]),
                               "train": datasets.Dataset.from_list(table[2:])})
    dd.save_to_disk(str(root / "hf"))
    return root / "hf", 4  # the train split, as the reader picks it


@pytest.mark.parametrize("make", [jsonl_gz_with_blank_lines, plain_jsonl, folder_of_files, parquet_folder, hf_disk])
def test_dry_run_counts_what_a_read_reads(ray_local, tmp_path, make):
    path, expected = make(tmp_path)
    info = inspect_input(str(path), "auto", "auto", None)
    assert info.note == "" and info.schema == "prompts"
    read = read_input(str(path)).count()
    assert info.prompts == read == expected
    assert inspect_input(str(path), "auto", "auto", 3).prompts == 3


def test_dry_run_prints_the_reader_count(tmp_path, capsys):
    path, n = plain_jsonl(tmp_path)
    rc = main(["curate", "--config", str(REPO / "pipelines/configs/real_rated.yaml"), f"input.path={path}",
               f"output.dir={tmp_path / 'never'}", "--dry-run"])
    assert rc == 0 and not (tmp_path / "never").exists()
    assert f"# input: {path}: {n} prompts, schema prompts" in capsys.readouterr().out
