"""Already-rated data in the shared rated schema, validated in place, without regenerating anything.

One row is a prompt with a list of responses, each `{text, model, scores: {aspect: float}, overall, label?,
problem?}`, which is also what the scorer writes (DESIGN.md, "Stages and their data"). Ingest keeps one row
per prompt and normalises each response struct: `text`, `model`, `label` as strings, `overall` as float64,
`scores` as a struct of float64 (a parquet map becomes a struct), and adds `sample_idx` (the list position,
unless the response has one) and `len` (characters of text; null without text). `label` (chosen /
rejected) keeps already-paired data's pair. A response's `problem` (a wrong type found by the JSONL reader)
stays: the statistics quarantine that response on its own, with the other checks of
`operators.responses.response_reasons`. Any other response field is carried as it is.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from operators.responses import aspect_values, flatten, rebuild

STRING_FIELDS = ("text", "model", "label", "problem")


def ingest_rated(batch: pa.Table) -> pa.Table:
    """Rated prompt rows with their responses in the shared rated schema (same rows, same lists)."""
    if "responses" not in batch.column_names:
        return batch
    col = batch.column("responses")
    flat = flatten(col)
    n = flat.count
    f = flat.fields
    out: dict[str, pa.Array] = {}
    for name in STRING_FIELDS:
        if name in f:
            out[name] = pc.cast(f[name], pa.string())
    if "text" not in out:
        out["text"] = pa.nulls(n, pa.string())
    out["overall"] = pc.cast(f["overall"], pa.float64()) if "overall" in f else pa.nulls(n, pa.float64())
    aspects = aspect_values(f.get("scores"), n)
    if aspects:
        names = sorted(aspects)
        out["scores"] = pa.StructArray.from_arrays(
            [pa.array(aspects[a][0], mask=aspects[a][1]) for a in names], names=names)
    out["sample_idx"] = pc.cast(f["sample_idx"], pa.int64()) if "sample_idx" in f \
        else pa.array(flat.position(), pa.int64())
    out["len"] = pc.cast(pc.utf8_length(out["text"]), pa.int64())
    for name, arr in f.items():  # generator fields and anything else a response carries
        if name not in out and name != "scores":
            out[name] = arr
    responses = rebuild(col, flat, out)
    return batch.set_column(batch.column_names.index("responses"), "responses", responses)

