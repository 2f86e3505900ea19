"""A prompt's responses as one `list<struct>` column: flattening over the list offsets, and response checks.

Curation keeps one row per prompt (DESIGN.md, "Stages and their data"). Per-response work flattens the
`responses` column once (`pc.list_flatten` is a view over the list's child array, so texts are not copied)
and maps results back to prompts through each response's parent row.

A response is set aside on its own, with the first reason that applies (`response_reasons`):

| reason | when |
|---|---|
| the response's `problem` | set upstream: a wrong type in a JSONL line, a response the scorer could not score |
| `missing_response` | no text |
| `missing_reward` | `overall` is null |
| `non_finite_reward` | `overall` is NaN or +-inf |
| `reward_out_of_range` | abs(`overall`) > SCORE_LIMIT |
| `non_finite_aspect_score` | an aspect score is NaN or +-inf (a null aspect is allowed: PD skips it) |
| `aspect_score_out_of_range` | abs(aspect score) > SCORE_LIMIT |
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# A finite score this large is a broken score, not a rating: squares of 1e308 overflow reward_std, the margin
# and PD's z-score sums to inf. Reward-model logits and ratings sit many orders of magnitude below it.
SCORE_LIMIT = 1e6

REASONS = ("missing_response", "missing_reward", "non_finite_reward", "reward_out_of_range",
           "non_finite_aspect_score", "aspect_score_out_of_range")


@dataclass(frozen=True)
class Flat:
    """The responses of a block of prompts, flattened: `fields[name]` holds one value per response, in prompt
    order; prompt g's responses are positions starts[g] .. starts[g] + sizes[g]."""

    sizes: np.ndarray
    starts: np.ndarray
    parent: np.ndarray
    fields: dict[str, pa.Array]

    @property
    def count(self) -> int:
        return int(self.parent.size)

    def position(self) -> np.ndarray:
        """Each response's position in its prompt's list."""
        return np.arange(self.count, dtype=np.int64) - np.repeat(self.starts, self.sizes)


def one_array(col) -> pa.Array:
    """A column as one array. A single chunk is taken as it is: `combine_chunks` copies even one chunk, and a
    block's `responses` holds all its texts, so each copy is a block's size of fresh memory."""
    if not isinstance(col, pa.ChunkedArray):
        return col
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def flatten(responses) -> Flat:
    """Flatten a `list<struct>` column (chunked or not; a null list has no responses)."""
    col = one_array(responses)
    sizes = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if sizes.size else sizes
    flat = pc.list_flatten(col)
    item = col.type.value_type
    names = [item.field(i).name for i in range(item.num_fields)] if pa.types.is_struct(item) else []
    fields = {name: pc.struct_field(flat, [i]) for i, name in enumerate(names)}
    parent = np.repeat(np.arange(sizes.size, dtype=np.int64), sizes)
    return Flat(sizes=sizes, starts=starts, parent=parent, fields=fields)


def floats(arr: pa.Array | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values with NaN for null, null mask); an absent field is all null."""
    if arr is None:
        return np.full(n, np.nan), np.ones(n, dtype=bool)
    f = pc.cast(arr, pa.float64())
    null = pc.is_null(f).to_numpy(zero_copy_only=False)
    return pc.fill_null(f, np.nan).to_numpy(zero_copy_only=False).astype(np.float64), np.asarray(null, bool)


def aspect_values(scores: pa.Array | None, n: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Aspect name -> (values, null mask). `scores` is a struct (JSON, our own stages) or a map (some parquet
    writers); a response without scores has every aspect null."""
    if scores is None or pa.types.is_null(scores.type):
        return {}
    if pa.types.is_struct(scores.type):
        whole_null = pc.is_null(scores).to_numpy(zero_copy_only=False)
        out = {}
        for i in range(scores.type.num_fields):
            vals, null = floats(pc.struct_field(scores, [i]), n)
            out[scores.type.field(i).name] = (vals, null | whole_null)
        return out
    rows = [dict(r) if r else {} for r in scores.to_pylist()]  # maps: rare, read row by row
    names = sorted({k for r in rows for k in r})
    out = {}
    for name in names:
        raw = [r.get(name) for r in rows]
        out[name] = (np.array([np.nan if v is None else float(v) for v in raw], dtype=np.float64),
                     np.array([v is None for v in raw], dtype=bool))
    return out


def response_reasons(problem: pa.Array | None, text_missing: np.ndarray, reward: np.ndarray,
                     reward_null: np.ndarray, aspects: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Per response, None when it is good, else its reason (the table in the module docstring), as objects."""
    n = reward.size
    upstream = (np.asarray(problem.to_numpy(zero_copy_only=False), dtype=object) if problem is not None
                else np.full(n, None, dtype=object))
    has_problem = ~pc.is_null(problem).to_numpy(zero_copy_only=False) if problem is not None else np.zeros(n, bool)
    with np.errstate(invalid="ignore"):
        aspect_bad = np.zeros(n, bool)
        aspect_big = np.zeros(n, bool)
        for vals, null in aspects.values():
            aspect_bad |= ~null & ~np.isfinite(vals)
            aspect_big |= ~null & np.isfinite(vals) & (np.abs(vals) > SCORE_LIMIT)
        conds = [np.asarray(has_problem, bool), text_missing, reward_null, ~np.isfinite(reward),
                 np.abs(reward) > SCORE_LIMIT, aspect_bad, aspect_big]
    code = np.select(conds, np.arange(1, len(conds) + 1), default=0)
    names = np.array([None, None, *REASONS], dtype=object)
    out = names[code]
    out[code == 1] = upstream[code == 1]
    return out


def response_type(schema) -> pa.StructType | None:
    """The struct type of a schema's `responses` list (pyarrow or Ray Data schema), else None."""
    schema = getattr(schema, "base_schema", schema)
    if "responses" not in schema.names:
        return None
    t = schema.field("responses").type
    return t.value_type if pa.types.is_list(t) and pa.types.is_struct(t.value_type) else None



def is_good(reasons: np.ndarray) -> np.ndarray:
    """The mask of responses without a reason, from `response_reasons`."""
    return np.equal(reasons, None).astype(bool)


def rebuild(col, flat: Flat, fields: dict[str, pa.Array]) -> pa.Array:
    """A `list<struct>` column with the same lists as `col` and the given struct fields."""
    arr = one_array(col)
    offsets = pa.array(np.concatenate([[0], np.cumsum(flat.sizes)]).astype(np.int32))
    names = list(fields)
    values = pa.StructArray.from_arrays([fields[k] for k in names], names=names) if names else \
        pa.StructArray.from_arrays([pa.nulls(flat.count)], names=["text"])
    return pa.ListArray.from_arrays(offsets, values, mask=pc.is_null(arr))
