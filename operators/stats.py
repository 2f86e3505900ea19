"""Per-prompt preference statistics: PVar, margin, preference divergence, length correlation.

Definitions (see DESIGN.md, "Statistics: definitions"):

* PVar (PVar paper, Var over response pairs of the Bradley-Terry preference probability). With rewards
  r_1..r_n and p_ij = sigmoid((r_i - r_j) / tau), E[p] = 1/2 by symmetry, and the U-statistic over ordered
  pairs i != j is  pvar = mean_{i != j} (p_ij - 1/2)^2.  We evaluate (sigmoid(x) - 1/2)^2 as
  tanh(x/2)^2 / 4, which is the same number without the cancellation near x = 0. 0 <= pvar < 1/4.
* margin (MixDPO difficulty): r_best - r_worst with best = argmax, worst = argmin (first in sample_idx
  order on ties). For already-paired data (one response labelled `chosen`, one `rejected`) the pair is the
  given one and margin = score_chosen - score_rejected.
* pd (fine-grained selection): for the pair (w, l) chosen by the target (the overall reward, or one aspect),
  pd = mean over aspects a != target of (r~_a(l) - r~_a(w)), with r~ the aspect reward standardized over
  the whole data set and length-debiased (`none` | `penalty` | `residual`). Negative when the other aspects
  agree with the choice. Aspects with no score for either response are skipped.
* reward_std is the population standard deviation (ddof = 0); len_corr is Pearson's r of reward against
  response length in characters (null when either is constant).

The math is plain numpy over padded [groups, responses] arrays; the Ray part at the bottom is thin.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators.base import QUARANTINE

ASPECT_PREFIX = "reward__"
STAT_COLUMNS = (
    "n", "reward_mean", "reward_std", "pvar", "margin", "best_idx", "worst_idx", "pd", "len_corr",
)


# ----------------------------------------------------------------------------------------------------------
# Pure math on one prompt
# ----------------------------------------------------------------------------------------------------------


def pvar(rewards, tau: float = 1.0) -> float:
    """U-statistic of Var[p] over ordered pairs i != j; nan for fewer than 2 rewards."""
    r = np.asarray(rewards, dtype=np.float64)
    n = r.size
    if n < 2:
        return float("nan")
    d = (r[:, None] - r[None, :]) / tau
    sq = np.tanh(d / 2.0) ** 2 / 4.0  # (sigmoid(d) - 1/2)^2
    return float(sq.sum() / (n * (n - 1)))  # the diagonal is exactly 0


def implied_rewards(policy_logp, ref_logp, beta: float):
    """DPO's implicit reward r = beta * (log pi_theta - log pi_ref), for PVar in rounds where theta != ref."""
    return beta * (np.asarray(policy_logp, dtype=np.float64) - np.asarray(ref_logp, dtype=np.float64))


def best_worst(rewards) -> tuple[int, int]:
    """Positions of the best and the worst reward, first occurrence on ties."""
    r = np.asarray(rewards, dtype=np.float64)
    return int(np.argmax(r)), int(np.argmin(r))


def pearson(x, y) -> float:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size < 2:
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    den = np.sqrt((xc * xc).sum() * (yc * yc).sum())
    return float((xc * yc).sum() / den) if den > 0 else float("nan")


def preference_divergence(aspects_w, aspects_l) -> float:
    """mean_a (r~_a(l) - r~_a(w)) over the aspects given (the target already left out), skipping NaNs."""
    diff = np.asarray(aspects_l, dtype=np.float64) - np.asarray(aspects_w, dtype=np.float64)
    diff = diff[np.isfinite(diff)]
    return float(diff.mean()) if diff.size else float("nan")


# ----------------------------------------------------------------------------------------------------------
# Data-set-level normalisation for PD
# ----------------------------------------------------------------------------------------------------------


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


def sufficient_sums(table: pa.Table, aspects: list[str]) -> dict[str, float]:
    """Per-batch sums for `norms_from_sums`; sums from all batches add up."""
    lengths = table.column("response_len").to_numpy(zero_copy_only=False).astype(np.float64)
    x = np.log1p(lengths)
    out = {"len:n": float(lengths.size), "len:v": float(lengths.sum()), "len:vv": float((lengths**2).sum())}
    for a in aspects:
        v = _as_float(table.column(ASPECT_PREFIX + a))
        m = np.isfinite(v)
        vv, xx = v[m], x[m]
        out.update({
            f"{a}:n": float(m.sum()), f"{a}:v": float(vv.sum()), f"{a}:vv": float((vv * vv).sum()),
            f"{a}:x": float(xx.sum()), f"{a}:xx": float((xx * xx).sum()), f"{a}:xv": float((xx * vv).sum()),
        })
    return out


# ----------------------------------------------------------------------------------------------------------
# Vectorised over a block holding whole prompts
# ----------------------------------------------------------------------------------------------------------


def aspect_names(columns) -> list[str]:
    return sorted(c[len(ASPECT_PREFIX):] for c in columns if c.startswith(ASPECT_PREFIX))


def _as_float(col) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


def _padded(values: np.ndarray, starts: np.ndarray, sizes: np.ndarray, width: int, fill=np.nan):
    """Scatter a flat array of group-sorted values into a [groups, width] matrix."""
    out = np.full((sizes.size, width), fill, dtype=values.dtype if fill is not np.nan else np.float64)
    col = np.arange(values.size) - np.repeat(starts, sizes)
    out[np.repeat(np.arange(sizes.size), sizes), col] = values
    return out


def _group_pvar(R: np.ndarray, tau: float) -> np.ndarray:
    """PVar per row of a padded [groups, width] reward matrix, over the width*(width-1)/2 pairs i < j only
    (the ordered-pair mean is the same number, as (p - 1/2)^2 is symmetric in i, j)."""
    n = np.isfinite(R).sum(axis=1)
    i, j = np.triu_indices(R.shape[1], k=1)
    sq = np.tanh((R[:, i] - R[:, j]) / (2.0 * tau)) ** 2 / 4.0
    sq = np.where(np.isfinite(sq), sq, 0.0)  # pairs with padding
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n >= 2, 2.0 * sq.sum(axis=1) / (n * (n - 1)), np.nan)


def _group_pearson(R: np.ndarray, L: np.ndarray) -> np.ndarray:
    m = np.isfinite(R)
    n = m.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rm = np.nansum(R, axis=1) / n
        lm = np.where(m, L, 0.0).sum(axis=1) / n
        rc = np.where(m, R - rm[:, None], 0.0)
        lc = np.where(m, L - lm[:, None], 0.0)
        den = np.sqrt((rc * rc).sum(axis=1) * (lc * lc).sum(axis=1))
        return np.where(den > 0, (rc * lc).sum(axis=1) / den, np.nan)


@dataclass(frozen=True)
class StatsParams:
    tau: float = 1.0
    pd_target: str = "overall"
    norms: PDNorms | None = None  # None: no PD (single-score data)
    carry: tuple[str, ...] = ("prompt", "source")  # per-prompt columns copied into the statistics table


# Columns of the statistics table that the statistics themselves make (beside the carried ones).
STATS_TABLE_COLUMNS = ("prompt_id", *STAT_COLUMNS, "score_best", "score_worst", "best_response",
                       "worst_response", "paired", "tau", "messages")
# Columns of the long scored table that belong to one response, not to its prompt.
RESPONSE_LEVEL = ("sample_idx", "response", "response_len", "model", "label", "reward", "num_tokens",
                  "finish_reason", "seed", "generator")


def carry_columns(prompt_columns, scored_columns) -> tuple[str, ...]:
    """The prompt-level input columns (prompt, source and any extra ones) that reach the statistics and the
    pairs: those still in the scored table under their own name, not shadowed by a column a stage adds."""
    scored = set(scored_columns)
    skip = {"prompt_id", "responses", *STATS_TABLE_COLUMNS, *RESPONSE_LEVEL}
    return tuple(c for c in prompt_columns if c in scored and c not in skip and not c.startswith(ASPECT_PREFIX)
                 and not c.startswith("_"))


def _group_starts(pid: pa.Array) -> np.ndarray:
    """Row positions where a new prompt_id begins, for a column sorted by prompt_id (compared in Arrow)."""
    change = np.ones(len(pid), dtype=bool)
    if len(pid) > 1 and pid.null_count:  # nulls sort last and form one group, as in a plain comparison
        ids = pid.to_numpy(zero_copy_only=False)
        change[1:] = ids[1:] != ids[:-1]
    elif len(pid) > 1:
        change[1:] = pc.not_equal(pid.slice(1), pid.slice(0, len(pid) - 1)).to_numpy(zero_copy_only=False)
    return np.flatnonzero(change)


def _sorted_by_prompt(table: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """The table in (prompt_id, sample_idx) order and its group starts; a cheap check when it is in that
    order already (a reorder inside prompts keeps the group starts)."""
    pid = table.column("prompt_id").combine_chunks()
    n = len(pid)
    if n > 1 and not pid.null_count and pc.all(pc.less_equal(pid.slice(0, n - 1), pid.slice(1))).as_py():
        starts = _group_starts(pid)
        group = np.zeros(n, dtype=np.int64)
        group[starts[1:]] = 1
        group = np.cumsum(group)
        sample = table.column("sample_idx").to_numpy(zero_copy_only=False)
        if ((sample[1:] >= sample[:-1]) | (group[1:] != group[:-1])).all():
            return table, starts
        return table.take(pa.array(np.lexsort((sample, group)))), starts  # only the order inside prompts was off
    if n > 1:
        table = table.take(pc.sort_indices(table, sort_keys=[("prompt_id", "ascending"), ("sample_idx", "ascending")]))
    return table, _group_starts(table.column("prompt_id").combine_chunks())


def chunk_bounds(sizes: np.ndarray, max_cells: int) -> list[tuple[int, int]]:
    """[g0, g1) ranges of consecutive groups whose padded [groups, w, w] pair tensor (w = the widest group in
    the range) stays under `max_cells`; at least one group per range. One numpy scan per range."""
    out = []
    g0, n = 0, sizes.size
    while g0 < n:
        w = np.maximum.accumulate(sizes[g0:]).astype(np.int64)
        cells = np.arange(1, n - g0 + 1, dtype=np.int64) * w * w
        g1 = g0 + max(1, int(np.searchsorted(cells, max_cells, side="right")))
        out.append((g0, g1))
        g0 = g1
    return out


def prompt_stats(table: pa.Table, params: StatsParams, max_cells: int = 4_000_000) -> pa.Table:
    """Statistics for every prompt in `table` (a long scored table holding each prompt's rows whole).

    Prompts with fewer than 2 valid responses come back as rows with a reason in the quarantine column.
    """
    if table.num_rows == 0:
        return _empty_stats(table, params)
    table, starts = _sorted_by_prompt(table)
    sizes = np.diff(np.append(starts, table.num_rows))
    pieces = []
    for g0, g1 in chunk_bounds(sizes, max_cells):
        lo = starts[g0]
        hi = starts[g1] if g1 < starts.size else table.num_rows
        pieces.append(_stats_chunk(table.slice(lo, hi - lo), starts[g0:g1] - lo, sizes[g0:g1], params))
    return pa.concat_tables(pieces)


def _stats_chunk(t: pa.Table, starts: np.ndarray, sizes: np.ndarray, params: StatsParams) -> pa.Table:
    width = int(sizes.max())
    G = sizes.size
    rewards = _as_float(t.column("reward"))
    R = _padded(rewards, starts, sizes, width)
    S = _padded(t.column("sample_idx").to_numpy(zero_copy_only=False).astype(np.float64), starts, sizes, width)
    lengths = t.column("response_len").to_numpy(zero_copy_only=False).astype(np.float64)
    L = _padded(lengths, starts, sizes, width)
    n = sizes.astype(np.int64)
    rows = np.arange(G)

    with np.errstate(invalid="ignore"):
        mean = np.nanmean(R, axis=1)
        std = np.sqrt(np.nanmean((R - mean[:, None]) ** 2, axis=1))
    pv = _group_pvar(R, params.tau)
    Rmax = np.where(np.isfinite(R), R, -np.inf)
    Rmin = np.where(np.isfinite(R), R, np.inf)
    bpos, wpos = Rmax.argmax(axis=1), Rmin.argmin(axis=1)

    # Already-paired prompts: the labelled pair decides, not argmax/argmin.
    paired = np.zeros(G, dtype=bool)
    if "label" in t.column_names:
        lab = t.column("label").combine_chunks().to_numpy(zero_copy_only=False)
        ch = _padded((lab == "chosen").astype(np.float64), starts, sizes, width, fill=0.0) > 0
        rj = _padded((lab == "rejected").astype(np.float64), starts, sizes, width, fill=0.0) > 0
        paired = (ch.sum(axis=1) == 1) & (rj.sum(axis=1) == 1)
        bpos = np.where(paired, ch.argmax(axis=1), bpos)
        wpos = np.where(paired, rj.argmax(axis=1), wpos)
    score_best, score_worst = R[rows, bpos], R[rows, wpos]
    margin = score_best - score_worst

    pd = np.full(G, np.nan)
    if params.norms is not None and params.norms.aspects:
        target = params.pd_target
        if target != "overall" and target in params.norms.aspects:
            # The pair is chosen by the target aspect (unpaired data); the others vote on it.
            T = _padded(_as_float(t.column(ASPECT_PREFIX + target)), starts, sizes, width)
            tb = np.where(np.isfinite(T), T, -np.inf).argmax(axis=1)
            tw = np.where(np.isfinite(T), T, np.inf).argmin(axis=1)
            pw, pl = np.where(paired, bpos, tb), np.where(paired, wpos, tw)
        else:
            pw, pl = bpos, wpos
        diffs = []
        for a, norm in params.norms.aspects.items():
            if a == target:
                continue
            z = normalized_aspect(_as_float(t.column(ASPECT_PREFIX + a)), lengths, norm, params.norms)
            Z = _padded(z, starts, sizes, width)
            diffs.append(Z[rows, pl] - Z[rows, pw])
        if diffs:
            D = np.stack(diffs, axis=1)
            cnt = np.isfinite(D).sum(axis=1)
            with np.errstate(invalid="ignore"):
                pd = np.where(cnt > 0, np.nansum(D, axis=1) / cnt, np.nan)

    len_corr = _group_pearson(R, L)
    responses = t.column("response").combine_chunks()
    first = starts
    flat = lambda pos: starts + pos  # noqa: E731 - index of a group-local position in the chunk
    out = {
        "prompt_id": t.column("prompt_id").take(pa.array(first)),
        **{c: t.column(c).take(pa.array(first)) for c in params.carry if c in t.column_names},
        "n": pa.array(n),
        "reward_mean": pa.array(mean),
        "reward_std": pa.array(std),
        "pvar": pa.array(pv, mask=~np.isfinite(pv)),
        "margin": pa.array(margin, mask=n < 2),
        "best_idx": pa.array(S[rows, bpos].astype(np.int64)),
        "worst_idx": pa.array(S[rows, wpos].astype(np.int64)),
        "pd": pa.array(pd, mask=~np.isfinite(pd)),
        "len_corr": pa.array(len_corr, mask=~np.isfinite(len_corr)),
        "score_best": pa.array(score_best),
        "score_worst": pa.array(score_worst),
        "best_response": responses.take(pa.array(flat(bpos))),
        "worst_response": responses.take(pa.array(flat(wpos))),
        "paired": pa.array(paired),
        "tau": pa.array(np.full(G, params.tau)),
        QUARANTINE: pa.array(np.where(n < 2, "fewer_than_2_responses", None), type=pa.string()),
    }
    if "messages" in t.column_names:
        out["messages"] = t.column("messages").take(pa.array(first))
    return pa.table(out)


def _empty_stats(table: pa.Table, params: StatsParams) -> pa.Table:
    """The statistics schema for a block with no rows: carried columns keep their input types."""
    one = pa.table({
        "prompt_id": ["x", "x"], "sample_idx": [0, 1], "reward": [0.0, 1.0], "response_len": [1, 1],
        "response": ["a", "b"],
    })
    out = prompt_stats(one, StatsParams(tau=params.tau, carry=())).slice(0, 0)
    out = out.set_column(0, "prompt_id", table.column("prompt_id").slice(0, 0))
    for i, c in enumerate(c for c in params.carry if c in table.column_names):
        out = out.add_column(1 + i, c, table.column(c).slice(0, 0))
    if "messages" in table.column_names:
        out = out.append_column("messages", table.column("messages").slice(0, 0))
    return out


# ----------------------------------------------------------------------------------------------------------
# Ray plumbing
# ----------------------------------------------------------------------------------------------------------


def compute_norms(ds, aspects: list[str], mode: str, rho: float) -> PDNorms:
    """Data-set-wide aspect normalisation from one streaming pass; only a dict of sums reaches the driver.

    The pass reads only the length and aspect columns (the projection reaches the parquet reader)."""
    cols = ["response_len", *(ASPECT_PREFIX + a for a in aspects)]
    parts = ds.select_columns(cols).map_batches(
        lambda t: pa.Table.from_pylist([sufficient_sums(t, aspects)]), batch_format="pyarrow", batch_size=None,
    ).take_all()  # one small row per block; no shuffle
    keys = [f"{a}:{s}" for a in aspects for s in ("n", "v", "vv", "x", "xx", "xv")] + ["len:n", "len:v", "len:vv"]
    return norms_from_sums({k: float(sum(p.get(k) or 0.0 for p in parts)) for k in keys}, aspects, mode, rho)


def grouped_stats(ds, params: StatsParams, num_partitions: int):
    """Co-locate each prompt's rows with one hash shuffle, then run the vectorised statistics per block.

    This is what `groupby(...).map_groups` does internally, minus its per-group Python call: after
    `repartition(keys=...)` each partition is one block holding whole groups (Ray does not split these
    blocks), and `batch_size=None` hands over whole blocks. The shuffle does not sort (`sort=False`):
    `prompt_stats` sorts by (prompt_id, sample_idx) itself, so a sorting reduce would sort twice.
    """
    shuffled = ds.repartition(num_partitions, keys=["prompt_id"], sort=False)
    return shuffled.map_batches(prompt_stats, fn_kwargs={"params": params}, batch_format="pyarrow",
                                batch_size=None)
