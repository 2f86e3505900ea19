"""JSON Lines input, read line by line so that one bad line is one quarantined row, never a failed read.

Ray's own `read_json(lines=True)` goes through pandas: one invalid UTF-8 byte or one non-JSON line fails the
whole read with no file name, a BOM fails it, a NaN literal turns into null, and a column whose type changes
between rows (an int `prompt_id` among strings) becomes pickled Python objects or a schema clash in a later
stage. Here each line is parsed on its own and normalised to the column contract:

* the contract fields get fixed types (`CONTRACT`); a value of the wrong type quarantines its row as
  `wrong_type_<field>` (an int `prompt_id` is not wrong: ids are cast to strings, as for parquet input);
* inside `responses`, a response whose text, score or scores have the wrong type keeps its row and carries
  the reason in its `problem` field, which ingest turns into a per-response quarantine;
* every other top-level field is carried as a string column: text as it is, anything else as JSON text.
  The set of columns is fixed up front from the first `PEEK_LINES` lines (`peek_columns`; `input.peek_lines`,
  0 for every line), so every block has the same schema; a line holding a field first seen after them is
  quarantined as `field_not_in_schema`, naming the fields, rather than losing them quietly;
* blank lines, a UTF-8 BOM and CRLF line ends are accepted; a line that is not UTF-8, not JSON, not an
  object, or holds a lone UTF-16 surrogate (`"\\ud800"`) is quarantined with a reason, and the detail column
  names the file and line;
* a `.json` file holding one JSON array of objects is read as those objects (item numbers for lines).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from operators.base import QUARANTINE, QUARANTINE_DETAIL, InputError

EXTENSIONS = ["jsonl", "json", "jsonl.gz", "json.gz", "jsonl.zst", "json.zst", "jsonl.bz2", "json.bz2",
              "jsonl.lz4", "json.lz4"]
PEEK_LINES = 1000
BOM = b"\xef\xbb\xbf"
# A block is cut at whichever comes first; 16 MB of JSON keeps a block near Ray's preferred size once parsed.
BLOCK_LINES, BLOCK_BYTES = 50_000, 16 << 20
SNIPPET = 120  # characters of a bad line kept in the detail column
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)
RESPONSE = pa.struct([("text", pa.string()), ("model", pa.string()), ("label", pa.string()),
                      ("overall", pa.float64()), ("scores", pa.map_(pa.string(), pa.float64())),
                      ("problem", pa.string())])
CONTRACT: dict[str, pa.DataType] = {
    "prompt_id": pa.string(), "prompt": pa.string(), "messages": MESSAGES, "source": pa.string(),
    "responses": pa.list_(RESPONSE),
    # UltraFeedback-binarized rows: a side is a string or a message list; a string becomes one assistant turn.
    "chosen": MESSAGES, "rejected": MESSAGES, "score_chosen": pa.float64(), "score_rejected": pa.float64(),
}


class WrongType(ValueError):
    def __init__(self, field: str, value: Any, expected: str):
        super().__init__(f"{field} is {type(value).__name__} {_short(value)}, expected {expected}")
        self.reason = f"wrong_type_{field}"


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


# ----------------------------------------------------------------------------------------------------------
# Pure parts: one value, one line, one block
# ----------------------------------------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _string(field: str, v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v
    raise WrongType(field, v, "a string")


def _messages(field: str, v: Any) -> list[dict[str, str | None]] | None:
    if v is None:
        return None
    if isinstance(v, str) and field in ("chosen", "rejected"):
        return [{"role": "assistant", "content": v}]
    ok = isinstance(v, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), (str, type(None)))
        for m in v)
    if not ok:
        raise WrongType(field, v, "a list of {role: string, content: string}"
                        + (" or a string" if field in ("chosen", "rejected") else ""))
    return [{"role": m["role"], "content": m.get("content")} for m in v]


def _number(field: str, v: Any) -> float | None:
    if v is None or _is_number(v):
        return None if v is None else float(v)
    raise WrongType(field, v, "a number")  # "7" is not parsed: a string score means a broken export


def normalize_response(r: Any) -> dict[str, Any]:
    """One response; a wrong type keeps the response with its `problem` set, so the prompt's others survive."""
    if not isinstance(r, dict):
        return {"text": None, "model": None, "label": None, "overall": None, "scores": None,
                "problem": "wrong_type_response"}
    problem = None
    text, overall, scores = r.get("text"), r.get("overall"), r.get("scores")
    if not isinstance(text, (str, type(None))):
        text, problem = None, "wrong_type_text"
    if not (overall is None or _is_number(overall)):
        overall, problem = None, problem or "wrong_type_overall"
    if scores is not None and not (isinstance(scores, dict)
                                   and all(v is None or _is_number(v) for v in scores.values())):
        scores, problem = None, problem or "wrong_type_scores"
    return {
        "text": text,
        "model": None if r.get("model") is None else str(r["model"]),
        "label": None if r.get("label") is None else str(r["label"]),
        "overall": None if overall is None else float(overall),
        "scores": None if scores is None else [(str(k), None if v is None else float(v)) for k, v in scores.items()],
        "problem": problem,
    }


def normalize_field(name: str, v: Any) -> Any:
    """A contract field to its CONTRACT type (WrongType if it cannot be); any other field to a string."""
    if name == "prompt_id":
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)  # an int id is an id; cast as the parquet path casts an int64 column
        return _string(name, v)
    if name == "prompt":
        return _string(name, v)
    if name in ("messages", "chosen", "rejected"):
        return _messages(name, v)
    if name == "source":
        return v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    if name == "responses":
        if v is None:
            return None
        if not isinstance(v, list):
            raise WrongType(name, v, "a list of responses")
        return [normalize_response(r) for r in v]
    if name in ("score_chosen", "score_rejected"):
        return _number(name, v)
    return v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def parse_line(raw: bytes) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """(object, reason, message) for one non-blank line."""
    if raw.startswith(BOM):
        raw = raw[len(BOM):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, "invalid_utf8", f"invalid UTF-8: byte 0x{raw[e.start]:02x} at byte {e.start} of the line"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, "invalid_json", f"invalid JSON: {e.msg} at column {e.colno}"
    if not isinstance(obj, dict):
        return None, "not_a_json_object", f"a JSON {type(obj).__name__}, not an object"
    if _SURROGATE.search(raw):
        try:  # a valid surrogate pair decodes to one character; a lone half cannot be written as UTF-8
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return None, "invalid_unicode", "a lone UTF-16 surrogate escape (\\ud800-\\udfff)"
    return obj, None, None


def parse_lines(lines: list[tuple[int, bytes]], path: str, columns: list[str]) -> pa.Table:
    """(line number, raw bytes) -> a block with exactly `columns` (+ quarantine, detail), typed per CONTRACT."""
    cols: dict[str, list[Any]] = {c: [] for c in columns}
    known = set(columns)
    reasons: list[str | None] = []
    details: list[str | None] = []
    for lineno, raw in lines:
        obj, reason, msg = parse_line(raw)
        row: dict[str, Any] = {}
        if obj is not None and not known.issuperset(obj):
            unknown = ", ".join(repr(k) for k in obj if k not in known)
            reason = "field_not_in_schema"
            msg = (f"field(s) {unknown} first appear after the lines read to fix the columns; they would be "
                   f"lost, so the line is set aside (input.peek_lines=0 reads every line for the columns)")
        if obj is not None:
            for c in columns:
                try:
                    row[c] = normalize_field(c, obj.get(c))
                except WrongType as e:
                    row[c] = None
                    if reason is None:
                        reason, msg = e.reason, str(e)
        if reason is not None and obj is None:
            snippet = raw[:SNIPPET * 4].decode("utf-8", errors="replace")[:SNIPPET]
            msg = f"{msg}; line starts {snippet!r}"
        for c in columns:
            cols[c].append(row.get(c))
        reasons.append(reason)
        details.append(None if reason is None else f"{path}:{lineno}: {msg}")
    arrays = {c: pa.array(v, type=CONTRACT.get(c, pa.string())) for c, v in cols.items()}
    arrays[QUARANTINE] = pa.array(reasons, pa.string())
    arrays[QUARANTINE_DETAIL] = pa.array(details, pa.string())
    return pa.table(arrays)


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------


def iter_lines(f, first_block: bytes = b"", block: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """Numbered non-blank lines of a binary stream (its `read(n)` returns bytes)."""
    pieces, lineno = [first_block], 0
    while True:
        chunk = f.read(block)
        if chunk and b"\n" not in chunk:
            pieces.append(chunk)  # inside one long line: join once its end arrives, not on every read
            continue
        parts = b"".join([*pieces, chunk]).split(b"\n")
        pieces = [parts.pop()] if chunk else []
        for line in parts:
            lineno += 1
            line = line.removeprefix(BOM).rstrip(b"\r")  # BOM: at the start, or where files were concatenated
            if line.strip():
                yield lineno, line
        if not chunk:
            return


def iter_records(f) -> Iterator[tuple[int, bytes]]:
    """Numbered raw records of a JSONL file, or of a file holding one JSON array (re-encoded per item)."""
    head = f.read(1 << 16)
    if head.lstrip(BOM + b" \t\r\n").startswith(b"["):
        data = head + f.read()
        try:
            items = json.loads(data.removeprefix(BOM).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"it starts with '[' but is not one valid JSON array: {e}") from e
        for i, item in enumerate(items):
            yield i + 1, json.dumps(item).encode()  # ASCII escapes: parse_line sees the item as a line would be
        return
    yield from iter_lines(f, head)


def read_records(f, path: str) -> Iterator[tuple[int, bytes]]:
    """`iter_records`, with a read failure (a truncated or corrupt compressed file) as an InputError naming
    the file and the last good line: the lines before the damage are not a usable file."""
    records = iter_records(f)
    lineno = 0
    while True:
        try:
            item = next(records, None)
        except (OSError, EOFError, pa.ArrowException, ValueError) as e:
            raise InputError(f"input file {path}: read failed after line {lineno}: {e}") from e
        if item is None:
            return
        lineno = item[0]
        yield item


def list_files(path: str, extensions: tuple[str, ...] = EXTENSIONS) -> list[tuple[Any, str]]:
    """(filesystem, path) of every input file under `path` (JSON by default), sorted; hidden and marker files
    skipped."""
    fs, infos = file_infos(path, extensions)
    return [(fs, i.path) for i in infos]


def file_infos(path: str, extensions: tuple[str, ...], filesystem=None,
               allow_not_found: bool = False) -> tuple[Any, list[Any]]:
    """(filesystem, pyarrow FileInfo of each file `list_files` names, sorted by path). `filesystem`: the one
    `path` lives on, else found from the path. A single file is itself, whatever its extension."""
    import pyarrow.fs as pafs

    fs, root = (filesystem, path) if filesystem is not None else pafs.FileSystem.from_uri(
        path if "://" in path else os.path.abspath(path))
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return fs, [info]
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=allow_not_found))
    return fs, sorted((i for i in found if i.type == pafs.FileType.File
                       and not os.path.basename(i.path).startswith((".", "_"))
                       and any(i.path.lower().endswith("." + e) for e in extensions)), key=lambda i: i.path)


def peek_columns(path: str, max_lines: int | None = PEEK_LINES) -> tuple[list[str], int, str | None]:
    """(field names in first-seen order, objects seen, first problem) over the first `max_lines` records
    (every record for 0 or None)."""
    keys: dict[str, None] = {}
    seen, problem = 0, None
    for fs, file in list_files(path):
        with fs.open_input_stream(file, compression="detect") as f:
            for lineno, raw in read_records(f, file):
                obj, _, msg = parse_line(raw)
                if obj is None:
                    problem = problem or f"{file}:{lineno}: {msg}"
                    continue
                keys.update(dict.fromkeys(obj))
                seen += 1
                if max_lines and seen >= max_lines:
                    return list(keys), seen, problem
    return list(keys), seen, problem


class JsonlDatasource(FileBasedDatasource):
    """Ray Data reads each file in a task of its own; blocks come out with the same columns and types."""

    _FILE_EXTENSIONS = EXTENSIONS

    def __init__(self, paths, columns: list[str], **kwargs):
        super().__init__(paths, file_extensions=EXTENSIONS, **kwargs)
        self.columns = list(columns)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        chunk: list[tuple[int, bytes]] = []
        size = 0
        for item in read_records(f, path):
            chunk.append(item)
            size += len(item[1])
            if len(chunk) >= BLOCK_LINES or size >= BLOCK_BYTES:
                yield parse_lines(chunk, path, self.columns)
                chunk, size = [], 0
        if chunk:
            yield parse_lines(chunk, path, self.columns)
