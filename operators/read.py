"""Reading prompts and rated data: file formats, schema detection and validation (duplicate ids:
`operators.dedupe`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators.base import QUARANTINE, QUARANTINE_DETAIL, ColumnError, InputError, with_quarantine

SCHEMAS = ("prompts", "rated", "binarized")


@contextlib.contextmanager
def input_errors():
    """A read task's InputError (a truncated .gz, say) reaches the driver wrapped in Ray's task and stage
    errors; raise it as itself, so that the message the user sees is the one naming the file."""
    try:
        yield
    except Exception as e:
        cause: BaseException | None = e
        seen: set[int] = set()
        while cause is not None and id(cause) not in seen:
            seen.add(id(cause))
            inner = getattr(cause, "cause", None) or cause.__cause__
            if isinstance(cause, InputError) and not isinstance(inner, InputError):
                break  # the innermost: Ray's RayTaskError(InputError) is an InputError too, with a traceback
            cause = inner
        if cause is None or cause is e:
            raise
        # Our messages are one line; Ray Data appends its retry notes to the exception's text.
        raise InputError(str(cause).splitlines()[0]) from e


def detect_format(path: str) -> str:
    p = path.lower().rstrip("/")
    if p.endswith((".parquet", ".pq")):
        return "parquet"
    if p.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz", ".jsonl.zst")):
        return "jsonl"
    if "://" not in path and os.path.isdir(path):
        names = set(os.listdir(path))
        if {"dataset_info.json", "state.json"} & names or "dataset_dict.json" in names:
            return "hf_disk"
        if any(n.endswith(".parquet") for n in names):
            return "parquet"
        if any(n.endswith((".jsonl", ".jsonl.gz", ".json")) for n in names):
            return "jsonl"
    raise InputError(
        f"cannot tell the format of input {path!r}; set input.format to parquet, jsonl or hf_disk"
    )


def detect_schema(columns: list[str]) -> str:
    cols = set(columns)
    if "responses" in cols:
        return "rated"
    if {"chosen", "rejected"} <= cols:
        return "binarized"
    return "prompts"


def check_local_path(path: str) -> None:
    if not path:
        raise InputError("input.path is empty; set it in the config or with input.path=...")
    if "://" in path:
        return
    if not Path(path).exists():
        raise InputError(f"input path does not exist: {path}")


# Parquet under this many bytes is read with Ray Data's V1 reader, which lists the files on the driver. The
# default V2 reader lists them in a task of its own, with footer-reader actors started and killed for every
# read: a fixed 1.5-2.5 s per read on 2 cores, where V1 takes 0.1-0.3 s (README, Performance). On 694 MB of
# rated data, V1's read tasks took twice V2's, so larger inputs keep V2.
V1_MAX_BYTES = 64 << 20


def read_parquet_files(path: str, filesystem=None, **kwargs):
    """`ray.data.read_parquet` with one read task per file: more tasks than files would split each file's
    blocks in an operator of their own, apart from the map after the read. Small inputs are read with Ray Data's
    V1 reader (V1_MAX_BYTES); `filesystem` is the one `path` lives on, else found from the path."""
    import ray

    from operators.jsonl import file_infos

    _, shards = file_infos(path, ("parquet",), filesystem, allow_not_found=True)
    ctx = ray.data.DataContext.get_current()
    v2 = ctx.use_datasource_v2
    # The reader is chosen when the dataset is made; an explicit V1 setting (RAY_DATA_USE_DATASOURCE_V2=0) stays.
    ctx.use_datasource_v2 = v2 and sum(f.size or 0 for f in shards) > V1_MAX_BYTES
    try:
        if filesystem is not None:
            kwargs["filesystem"] = filesystem
        return ray.data.read_parquet(path, override_num_blocks=max(1, len(shards)), **kwargs)
    finally:
        ctx.use_datasource_v2 = v2


def read_input(path: str, fmt: str = "auto", limit: int | None = None, peek_lines: int | None = None):
    """A Ray Dataset over the input. `limit` keeps the first N rows in file order; `peek_lines` is how many
    JSONL lines fix the columns (default `operators.jsonl.PEEK_LINES`, 0 for all)."""
    import ray

    check_local_path(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    if limit is not None:
        # `limit` must take the same rows every run: keep file order for this read.
        ray.data.DataContext.get_current().execution_options.preserve_order = True
    if fmt == "parquet":
        ds = read_parquet_files(path)
    elif fmt == "jsonl":
        from operators.jsonl import JsonlDatasource, peek_columns

        if peek_lines is not None and peek_lines < 0:
            raise InputError(f"input.peek_lines must be >= 0 (0 reads every line), got {peek_lines}")
        columns, seen, problem = peek_columns(path) if peek_lines is None else peek_columns(path, peek_lines)
        if not seen:
            raise InputError(f"input {path} holds no readable rows: {problem}" if problem
                             else f"input {path} holds no rows (empty or blank)")
        ds = ray.data.read_datasource(JsonlDatasource(path, columns))
    elif fmt == "hf_disk":
        ds = ray.data.from_arrow(load_hf_disk(path).data.table)
    else:
        raise InputError(f"unknown input.format {fmt!r}; use auto, parquet, jsonl or hf_disk")
    if limit is not None:
        ds = ds.limit(limit)
    return ds


def load_hf_disk(path: str):
    """A `datasets.save_to_disk` folder; of a DatasetDict, the `train` split, else the first."""
    import datasets

    hf = datasets.load_from_disk(path)
    if isinstance(hf, datasets.DatasetDict):
        hf = hf["train" if "train" in hf else next(iter(hf))]
    return hf


def binarized_to_rated(batch: pa.Table) -> pa.Table:
    """UltraFeedback-binarized rows (prompt, chosen, rejected, score_chosen, score_rejected) as rated rows.

    `chosen` / `rejected` may be strings or message lists; a message list contributes its last assistant turn.
    A missing `prompt_id` is derived from the prompt text (sha1), so re-reads give the same ids.
    """
    rows = batch.to_pylist()
    out = []
    for r in rows:
        prompt = r.get("prompt")
        if prompt is None and isinstance(r.get("chosen"), list):
            prompt = next((m.get("content") for m in r["chosen"] if m.get("role") == "user"), None)
        pid = r.get("prompt_id")
        if pid is None and isinstance(prompt, str):
            pid = hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]
        responses = []
        for label in ("chosen", "rejected"):
            text = _last_assistant(r.get(label))
            score = r.get(f"score_{label}")
            responses.append({"text": text, "model": None, "label": label, "overall": score,
                              "scores": {"score": score}})
        item = {k: v for k, v in r.items() if k not in ("chosen", "rejected", "score_chosen", "score_rejected",
                                                        "messages")}
        item.update({"prompt_id": pid, "prompt": prompt, "responses": responses})
        out.append(item)
    return pa.Table.from_pylist(out)


def _last_assistant(value):
    if isinstance(value, list):
        for m in reversed(value):
            if isinstance(m, dict) and m.get("role") == "assistant":
                return m.get("content")
        return None
    return value


def _prompt_text(batch: pa.Table):
    """Per row, the text the generator will read: the messages when the row has them, else the prompt (a file
    may mix both kinds of row). For the emptiness check only."""
    n = batch.num_rows
    if "messages" not in batch.column_names:
        return batch.column("prompt") if "prompt" in batch.column_names else pa.nulls(n, pa.string())
    prompts = batch.column("prompt").to_pylist() if "prompt" in batch.column_names else [None] * n
    msgs = batch.column("messages").to_pylist()
    return pa.array([" ".join((m or {}).get("content") or "" for m in ms) if ms else p
                     for p, ms in zip(prompts, msgs, strict=True)], pa.string())


def _as_string_column(batch: pa.Table, name: str) -> pa.Table:
    col = batch.column(name)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return batch
    return batch.set_column(batch.column_names.index(name), name, pc.cast(col, pa.string()))


def _blank(values) -> np.ndarray:
    """Null, empty or only whitespace, per row."""
    stripped = pc.utf8_trim_whitespace(pc.cast(values, pa.string()))
    return np.asarray(pc.fill_null(pc.equal(pc.utf8_length(stripped), 0), True).to_numpy(zero_copy_only=False))


def validate_prompts(batch: pa.Table, schema: str, source: str) -> pa.Table:
    """Row checks that need no model: ids as strings, empty prompts, too few responses; `source` filled in.
    Vectorised over the columns: the first reason that applies is the row's."""
    n = batch.num_rows
    batch = _as_string_column(batch, "prompt_id")
    if "source" not in batch.column_names:
        batch = batch.append_column("source", pa.array([source] * n, pa.string()))
    batch = _as_string_column(batch, "source")
    checks = [(_blank(batch.column("prompt_id")), "missing_prompt_id"), (_blank(_prompt_text(batch)), "empty_prompt")]
    if schema == "rated":
        lens = pc.fill_null(pc.list_value_length(batch.column("responses")), 0).to_numpy(zero_copy_only=False)
        checks.append((np.asarray(lens) < 2, "fewer_than_2_responses"))
    reasons = np.select([c for c, _ in checks], [r for _, r in checks], default=None).astype(object) if n else \
        np.array([], dtype=object)
    return with_quarantine(batch, pa.array(list(reasons), pa.string()))


def required_columns(schema: str) -> tuple[tuple[str, ...], ...]:
    """Each inner tuple needs one of its columns."""
    base: tuple[tuple[str, ...], ...] = (("prompt_id",), ("prompt", "messages"))
    if schema == "rated":
        return base + (("responses",),)
    return base


def check_input_columns(columns: list[str], schema: str, path: str) -> None:
    missing = [" or ".join(g) for g in required_columns(schema) if not any(c in columns for c in g)]
    if missing:
        shown = [c for c in columns if c not in (QUARANTINE, QUARANTINE_DETAIL)]
        raise ColumnError(
            f"input {path} ({schema} schema) lacks required column(s): {', '.join(missing)}; "
            f"it has: {', '.join(shown) or '(none)'}"
        )


# Column types. Parquet and saved datasets type a whole column, so a wrong type is a ColumnError before
# anything runs; JSONL rows are typed one by one (operators.jsonl), so there a wrong type quarantines a row.
def _str(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def _num(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_null(t)


def _items(t: pa.DataType) -> pa.DataType | None:
    """The item type of a list column, else None."""
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return t.value_type
    return None


def _fields(t: pa.DataType) -> dict[str, pa.DataType]:
    return {t.field(i).name: t.field(i).type for i in range(t.num_fields)} if pa.types.is_struct(t) else {}


def _messages_ok(t: pa.DataType) -> bool:
    item = _items(t)
    if pa.types.is_null(t) or (item is not None and pa.types.is_null(item)):
        return True
    f = _fields(item) if item is not None else {}
    return "role" in f and "content" in f and _str(f["role"]) and _str(f["content"])


def _response_problem(t: pa.DataType) -> str | None:
    item = _items(t)
    if pa.types.is_null(t) or (item is not None and pa.types.is_null(item)):
        return None
    if item is None or not pa.types.is_struct(item):
        return f"has type {t}; expected a list of {{text, overall, scores}} objects"
    f = _fields(item)
    for name in ("text", "model", "label"):
        if name in f and not _str(f[name]):
            return f"field {name!r} has type {f[name]}; expected a string"
    if "overall" in f and not _num(f["overall"]):
        return f"field 'overall' has type {f['overall']}; expected a number"
    scores = f.get("scores")
    if scores is not None and not pa.types.is_null(scores):
        values = (list(_fields(scores).values()) if pa.types.is_struct(scores)
                  else [scores.item_type] if pa.types.is_map(scores) else None)
        if values is None or not all(_num(v) for v in values):
            return f"field 'scores' has type {scores}; expected {{aspect: number}}"
    return None


TYPE_RULES = {
    "prompt_id": (lambda t: _str(t) or pa.types.is_integer(t), "a string (an integer is cast to one)"),
    "prompt": (_str, "a string"),
    "messages": (_messages_ok, "a list of {role: string, content: string}"),
    "source": (lambda t: _str(t) or pa.types.is_integer(t), "a string"),
    "chosen": (lambda t: _str(t) or _messages_ok(t), "a string or a list of {role, content}"),
    "rejected": (lambda t: _str(t) or _messages_ok(t), "a string or a list of {role, content}"),
    "score_chosen": (_num, "a number"),
    "score_rejected": (_num, "a number"),
}


def check_input_types(schema, path: str) -> None:
    """Name every contract column whose type is wrong (`schema`: a pyarrow or a Ray Data schema)."""
    schema = getattr(schema, "base_schema", schema)
    if not isinstance(schema, pa.Schema):
        return
    problems = []
    for field in schema:
        if field.name in TYPE_RULES:
            ok, expected = TYPE_RULES[field.name]
            if not ok(field.type):
                problems.append(f"column {field.name!r} has type {field.type}; expected {expected}")
        elif field.name == "responses" and (why := _response_problem(field.type)):
            problems.append(f"column 'responses' {why}")
    if problems:
        raise ColumnError(f"input {path}: {'; '.join(problems)}")
