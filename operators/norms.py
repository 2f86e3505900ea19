"""Data-set-wide quantities for the statistics, from sums that add up over blocks (no shuffle).

* PD's aspect normalisation (DESIGN.md, "Statistics: definitions"): each aspect's mean and population std over
  the good responses of the data set, and for `residual` length debiasing its least-squares fit on
  log(1 + len); built from counts, sums, sums of squares and products (`sufficient_sums`).
* The score-leaf pass (`response_pass`): one Ray task per parquet file reads only the score leaves of the
  `responses` list (parquet column projection into the list of structs, never the texts) and returns the
  response count and those sums; only the sums reach the driver.
* PD from its parts (`pd_from_parts`, `fill_pd`): when the statistics are computed in the pass that reads the
  prompts, before the norms are known, each pair's raw differences are kept and turned into PD afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators.responses import aspect_values, flatten, floats, is_good, response_reasons, response_type

# PD's parts (StatsParams.pd_parts): `_pd:<aspect>` = r_a(l) - r_a(w), and the pair's length differences.
PD_PRIVATE = "_pd"  # the prefix of every part's column
PD_PARTS = "_pd:"
PD_LEN, PD_LOGLEN = "_pd_len", "_pd_loglen"


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


def pd_from_parts(parts: dict[str, np.ndarray], dlen: np.ndarray, dlog: np.ndarray, norms: PDNorms,
                  target: str = "overall", absent: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """PD from its parts (StatsParams.pd_parts): r~_a(l) - r~_a(w) is linear in the raw differences, because
    each aspect's mean (and the residual fit's intercept) cancels between the two responses of a pair:
    none: d_a / std_a; penalty: that minus rho * dlen / len_std; residual: (d_a - slope_a * dlog) / resid_std_a.
    A zero spread gives 0, as `normalized_aspect` does; a NaN part (a score a response lacks) is skipped, and so
    is an aspect `absent` from a row's block."""
    diffs = []
    for a, norm in norms.aspects.items():
        if a == target or a not in parts:
            continue
        d = np.asarray(parts[a], dtype=np.float64)
        if norms.mode == "residual":
            z = (d - norm.slope * dlog) / norm.resid_std if norm.resid_std > 0 else np.zeros_like(d)
        else:
            z = d / norm.std if norm.std > 0 else np.zeros_like(d)
            if norms.mode == "penalty":
                z = z - norms.rho * (dlen / norms.len_std if norms.len_std > 0 else np.zeros_like(d))
        if absent is not None and a in absent:
            z = np.where(absent[a], np.nan, z)
        diffs.append(z)
    if not diffs:
        return np.full(np.asarray(dlen).size, np.nan)
    D = np.stack(diffs, axis=1)
    cnt = np.isfinite(D).sum(axis=1)
    with np.errstate(invalid="ignore"):
        return np.where(cnt > 0, np.nansum(D, axis=1) / cnt, np.nan)


def fill_pd(table: pa.Table, norms: PDNorms | None, target: str = "overall") -> pa.Table:
    """A statistics table written with PD's parts: `pd` from them and the data set's norms, the parts dropped.
    A null part (the shard of a block without that aspect) counts as an aspect the block lacked."""
    names = [c for c in table.column_names if c.startswith(PD_PARTS)]
    if PD_LEN not in table.column_names:
        return table
    if norms is not None and names:
        parts, absent = {}, {}
        n = table.num_rows
        for c in names:
            parts[c[len(PD_PARTS):]], absent[c[len(PD_PARTS):]] = floats(table.column(c), n)
        pdv = pd_from_parts(parts, floats(table.column(PD_LEN), n)[0], floats(table.column(PD_LOGLEN), n)[0], norms,
                            target, absent)
        table = table.set_column(table.column_names.index("pd"), "pd", pa.array(pdv, mask=~np.isfinite(pdv)))
    return table.drop_columns([*names, PD_LEN, PD_LOGLEN])
