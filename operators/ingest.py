"""Already-rated data to the long scored table the scorer produces, without regenerating anything.

One input row is a prompt with a list of responses, each `{text, model, scores: {aspect: float}, overall,
label?}`. One output row is a response: `overall` becomes `reward`, `scores[aspect]` becomes
`reward__<aspect>`, the list position becomes `sample_idx`, and `label` (chosen / rejected) is kept so that
already-paired data keeps its pair. Every other column of the prompt row is copied onto its responses,
unless a response column has the same name. A response's `problem` (a wrong type found by the JSONL reader)
is its quarantine reason.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators.base import QUARANTINE, QUARANTINE_DETAIL, with_quarantine
from operators.stats import ASPECT_PREFIX, RESPONSE_LEVEL


def _scores_to_columns(scores: pa.Array) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Aspect name -> (values, null mask). `scores` may be a struct (from JSON) or a map (from parquet)."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if pa.types.is_struct(scores.type):
        for i in range(scores.type.num_fields):
            name = scores.type.field(i).name
            col = pc.struct_field(scores, [i])
            out[name] = (_floats(col), _null_mask(col))
    elif pa.types.is_map(scores.type) or pa.types.is_list(scores.type):
        rows = scores.to_pylist()
        names = sorted({k for r in rows if r for k, _ in (r.items() if isinstance(r, dict) else r)})
        for name in names:
            raw = [(dict(r) if r else {}).get(name) for r in rows]
            vals = np.array([np.nan if v is None else float(v) for v in raw], dtype=np.float64)
            out[name] = (vals, np.array([v is None for v in raw]))
    return out


def _floats(col) -> np.ndarray:
    arr = pc.cast(col, pa.float64())
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.float64)


def _null_mask(col) -> np.ndarray:
    return np.asarray(pc.is_null(col).to_numpy(zero_copy_only=False), dtype=bool)


def explode_rated(batch: pa.Table) -> pa.Table:
    """Rated prompt rows -> response rows. Non-finite or missing scores are quarantined with a reason."""
    responses = batch.column("responses").combine_chunks()
    parent = pc.list_parent_indices(responses).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(responses)
    starts = responses.offsets.to_numpy()[:-1] if len(responses) else np.array([], dtype=np.int64)
    sample_idx = np.arange(len(flat)) - starts[parent] if len(flat) else np.array([], dtype=np.int64)
    take = pa.array(parent)

    cols: dict[str, pa.Array] = {}
    for c in batch.column_names:
        if c not in ("responses", QUARANTINE, QUARANTINE_DETAIL, *RESPONSE_LEVEL) \
                and not c.startswith(ASPECT_PREFIX):
            cols[c] = batch.column(c).take(take)
    cols["sample_idx"] = pa.array(sample_idx.astype(np.int64))

    fields = {flat.type.field(i).name: i for i in range(flat.type.num_fields)} if len(flat) or \
        pa.types.is_struct(flat.type) else {}
    text = pc.struct_field(flat, [fields["text"]]) if "text" in fields else pa.nulls(len(flat), pa.string())
    text = pc.cast(text, pa.string())
    cols["response"] = text
    cols["response_len"] = pc.fill_null(pc.utf8_length(text), 0).cast(pa.int64())
    cols["model"] = (pc.cast(pc.struct_field(flat, [fields["model"]]), pa.string()) if "model" in fields
                     else pa.nulls(len(flat), pa.string()))
    cols["label"] = (pc.cast(pc.struct_field(flat, [fields["label"]]), pa.string()) if "label" in fields
                     else pa.nulls(len(flat), pa.string()))
    overall_col = pc.struct_field(flat, [fields["overall"]]) if "overall" in fields else pa.nulls(len(flat))
    reward = _floats(overall_col)
    reward_missing = _null_mask(overall_col)
    cols["reward"] = pa.array(reward)
    aspects = _scores_to_columns(pc.struct_field(flat, [fields["scores"]])) if "scores" in fields else {}
    for name, (vals, null) in aspects.items():
        cols[ASPECT_PREFIX + name] = pa.array(vals, mask=null)

    reasons = np.array([None] * len(flat), dtype=object)
    if "problem" in fields:
        problem = pc.struct_field(flat, [fields["problem"]]).to_numpy(zero_copy_only=False)
        reasons[:] = problem
    free = reasons == None  # noqa: E711
    reasons[free & _null_mask(text)] = "missing_response"
    free = reasons == None  # noqa: E711
    reasons[free & reward_missing] = "missing_reward"
    free = reasons == None  # noqa: E711
    reasons[free & ~np.isfinite(reward)] = "non_finite_reward"
    for vals, null in aspects.values():
        free = reasons == None  # noqa: E711
        # A missing aspect (null) is allowed and skipped by PD; NaN or inf is a broken score.
        reasons[free & ~null & ~np.isfinite(vals)] = "non_finite_aspect_score"
    out = pa.table(cols)
    if QUARANTINE in batch.column_names:
        out = with_quarantine(out, batch.column(QUARANTINE).take(take))
    return with_quarantine(out, pa.array(list(reasons), pa.string()))


def count_responses(batch: pa.Table) -> pa.Table:
    lens = pc.fill_null(pc.list_value_length(batch.column("responses")), 0)
    return pa.table({"k": [int(pc.sum(lens).as_py() or 0)]})
