"""Data-set-wide quantities for the statistics, from sums that add up over blocks (no shuffle).

* PD's aspect normalisation (DESIGN.md, "Statistics: definitions"): each aspect's mean and population std over
  the good responses of the data set, and for `residual` length debiasing its least-squares fit on
  log(1 + len); built from counts, sums, sums of squares and products (`sufficient_sums`).
* The score-leaf pass (`response_pass`): one Ray task per parquet file reads only the score leaves of the
  `responses` list (parquet column projection into the list of structs, never the texts) and returns the
  response count and those sums; only the sums reach the driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators.responses import aspect_values, flatten, floats, is_good, response_reasons, response_type


@dataclass(frozen=True)
class AspectNorm:
    """How to turn one aspect's raw score into r~: standardize, then remove length bias."""

    mean: float
    std: float
    slope: float = 0.0  # residual mode: fit r = intercept + slope * log1p(len)
    intercept: float = 0.0
    resid_std: float = 1.0


@dataclass(frozen=True)
class PDNorms:
    mode: str = "none"
    rho: float = 1.0
    len_mean: float = 0.0
    len_std: float = 1.0
    aspects: dict[str, AspectNorm] = field(default_factory=dict)


def norms_from_sums(sums: dict[str, float], aspects: list[str], mode: str, rho: float) -> PDNorms:
    """Build the normalisation from sufficient statistics (counts, sums, sums of squares and products).

    Keys: `<a>:n`, `<a>:v`, `<a>:vv`, `<a>:x`, `<a>:xx`, `<a>:xv` per aspect (x = log1p(len), v = score,
    over rows where the score is finite), and `len:n`, `len:v`, `len:vv` for raw length.
    """
    out = {}
    for a in aspects:
        n = sums.get(f"{a}:n", 0.0)
        if n <= 0:
            continue
        mv = sums[f"{a}:v"] / n
        var_v = max(sums[f"{a}:vv"] / n - mv * mv, 0.0)
        mx = sums[f"{a}:x"] / n
        var_x = max(sums[f"{a}:xx"] / n - mx * mx, 0.0)
        cov = sums[f"{a}:xv"] / n - mx * mv
        slope = cov / var_x if var_x > 0 else 0.0
        resid_var = max(var_v - slope * cov, 0.0)
        out[a] = AspectNorm(
            mean=mv, std=float(np.sqrt(var_v)), slope=slope, intercept=mv - slope * mx,
            resid_std=float(np.sqrt(resid_var)),
        )
    ln = sums.get("len:n", 0.0)
    lm = sums.get("len:v", 0.0) / ln if ln else 0.0
    lv = max(sums.get("len:vv", 0.0) / ln - lm * lm, 0.0) if ln else 0.0
    return PDNorms(mode=mode, rho=rho, len_mean=lm, len_std=float(np.sqrt(lv)), aspects=out)


def normalized_aspect(values: np.ndarray, lengths: np.ndarray, norm: AspectNorm, norms: PDNorms) -> np.ndarray:
    """r~ for one aspect: z-score, then `penalty` (minus rho * z(len)) or `residual` (OLS on log-length)."""
    v = np.asarray(values, dtype=np.float64)
    if norms.mode == "residual":
        resid = v - (norm.intercept + norm.slope * np.log1p(lengths))
        return resid / norm.resid_std if norm.resid_std > 0 else np.zeros_like(v)
    z = (v - norm.mean) / norm.std if norm.std > 0 else np.zeros_like(v)
    if norms.mode == "penalty":
        zlen = (lengths - norms.len_mean) / norms.len_std if norms.len_std > 0 else np.zeros_like(v)
        z = z - norms.rho * zlen
    return z


def sufficient_sums(lengths: np.ndarray, aspects: dict[str, np.ndarray]) -> dict[str, float]:
    """Sums for `norms_from_sums` over good responses (lengths and aspect values); sums of blocks add up."""
    lengths = np.asarray(lengths, dtype=np.float64)
    x = np.log1p(lengths)
    out = {"len:n": float(lengths.size), "len:v": float(lengths.sum()), "len:vv": float((lengths**2).sum())}
    for a, v in aspects.items():
        m = np.isfinite(v)
        vv, xx = v[m], x[m]
        out.update({
            f"{a}:n": float(m.sum()), f"{a}:v": float(vv.sum()), f"{a}:vv": float((vv * vv).sum()),
            f"{a}:x": float(xx.sum()), f"{a}:xx": float((xx * xx).sum()), f"{a}:xv": float((xx * vv).sum()),
        })
    return out


def sums_aspects(sums: dict[str, float]) -> list[str]:
    """The aspects whose sums `sufficient_sums` wrote (their `<a>:n` keys), sorted."""
    return sorted(k[: -len(":n")] for k in sums if k.endswith(":n") and k != "len:n")


def response_leaves(schema: pa.Schema, with_length: bool) -> list[str]:
    """The parquet leaf paths a pass over the response scores reads: never the texts, unless a length must
    come from them (data without a `len` field, with length debiasing on)."""
    item = response_type(schema)
    names = [item.field(i).name for i in range(item.num_fields)] if item is not None else []
    want = ["overall", "problem", "scores", "sample_idx"] + (["len"] if with_length else [])
    if with_length and "len" not in names:
        want.append("text")
    return [f"responses.list.element.{n}" for n in want if n in names]


def block_sums(table: pa.Table, aspects: list[str] | None = None) -> dict[str, float]:
    """Response count and the norms' sums over the good responses of a table of prompt rows (or of their score
    leaves); `aspects` None: those of the table's scores."""
    flat = flatten(table.column("responses"))
    f, n = flat.fields, flat.count
    reward, reward_null = floats(f.get("overall"), n)
    values = aspect_values(f.get("scores"), n)
    aspects = sorted(values) if aspects is None else aspects
    text_missing = pc.is_null(f["text"]).to_numpy(zero_copy_only=False) if "text" in f else np.zeros(n, bool)
    good = is_good(response_reasons(f.get("problem"), np.asarray(text_missing, bool), reward, reward_null,
                                    values))
    if "len" in f:
        length = pc.fill_null(pc.cast(f["len"], pa.float64()), 0.0).to_numpy(zero_copy_only=False)
    elif "text" in f:
        length = pc.fill_null(pc.utf8_length(pc.cast(f["text"], pa.string())), 0).to_numpy(zero_copy_only=False)
    else:
        length = np.zeros(n)
    sums = sufficient_sums(np.asarray(length, np.float64)[good],
                           {a: values[a][0][good] if a in values else np.zeros(0) for a in aspects})
    sums["responses"] = float(n)
    return sums


def _file_sums(fs, path: str, leaves: list[str], aspects: list[str]) -> dict[str, float]:
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as f:
        table = pq.ParquetFile(f).read(columns=leaves)
    return block_sums(table, aspects)


def response_pass(fs, files: list[str], schema: pa.Schema, aspects: list[str],
                  with_length: bool) -> dict[str, float]:
    """One Ray task per parquet file of a stage reads only the score leaves of `responses` (parquet column
    projection into the list of structs) and returns a dict of sums: the response count and the PD norms'
    sufficient statistics. No shuffle, no text read, only the sums reach the driver."""
    import ray

    leaves = response_leaves(schema, with_length)
    task = ray.remote(num_cpus=0.5)(_file_sums)
    parts = ray.get([task.remote(fs, p, leaves, aspects) for p in files])
    keys = {k for p in parts for k in p}
    return {k: float(sum(p.get(k, 0.0) for p in parts)) for k in keys}

