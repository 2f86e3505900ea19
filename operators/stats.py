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

The input is one row per prompt with its responses as a list (DESIGN.md, "Stages and their data"), so the
statistics are a map over blocks: no shuffle. The math is plain numpy over padded [groups, responses] arrays
built from the list offsets; the Ray part at the bottom is thin.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators.base import QUARANTINE, QUARANTINE_DETAIL
from operators.norms import PD_LEN, PD_LOGLEN, PD_PARTS, PDNorms, normalized_aspect
from operators.responses import Flat, aspect_values, flatten, floats, is_good, response_reasons, response_type

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
# Vectorised over a block of whole prompt rows
# ----------------------------------------------------------------------------------------------------------


def aspect_names(schema: pa.Schema) -> list[str]:
    """The aspects of `responses[].scores` in a stage's schema (a struct's field names)."""
    item = response_type(schema)
    scores = item.field("scores").type if item is not None and item.get_field_index("scores") >= 0 else None
    return sorted(scores.field(i).name for i in range(scores.num_fields)) if scores is not None and \
        pa.types.is_struct(scores) else []



def _padded(values: np.ndarray, starts: np.ndarray, sizes: np.ndarray, width: int, fill=np.nan):
    """Scatter a flat array of group-ordered values into a [groups, width] matrix."""
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
    norms: PDNorms | None = None  # None: no PD (single-score data), or PD from its parts later (pd_parts)
    carry: tuple[str, ...] = ("prompt", "source")  # per-prompt columns copied into the statistics table
    # Before the data-set-wide norms exist (statistics computed in the read's pass): write each prompt's raw
    # aspect differences between its pair as PD_PARTS columns, for `fill_pd` once the norms are known.
    pd_parts: bool = False


# Columns of the statistics table that the statistics themselves make (beside the carried ones).
STATS_TABLE_COLUMNS = ("prompt_id", *STAT_COLUMNS, "score_best", "score_worst", "best_response",
                       "worst_response", "paired", "tau", "messages")
# The sample_idx of a quarantined response, beside its prompt_id; `sample_idx` in quarantine/.
QUARANTINE_SAMPLE = "_quarantine_sample_idx"


def carry_columns(columns) -> tuple[str, ...]:
    """The prompt-level columns (prompt, source, messages, any extra input column) that reach the statistics
    and the pairs: all but the responses, our own underscore columns and names a statistic would shadow."""
    skip = {"prompt_id", "responses", *(c for c in STATS_TABLE_COLUMNS if c != "messages")}
    return tuple(c for c in columns if c not in skip and not c.startswith("_"))


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


@dataclass(frozen=True)
class GoodResponses:
    """The good responses of a block, compacted in prompt order, with their place in the flat column."""

    index: np.ndarray  # position in the flat responses of each good response
    sizes: np.ndarray  # good responses per prompt row
    reward: np.ndarray
    sample_idx: np.ndarray
    length: np.ndarray
    label: np.ndarray | None
    aspects: dict[str, np.ndarray]


def good_responses(table: pa.Table) -> tuple[GoodResponses, Flat, np.ndarray]:
    """Check every response of the block's prompts; (the good ones, the flat view, each response's reason)."""
    flat = flatten(table.column("responses"))
    f, n = flat.fields, flat.count
    reward, reward_null = floats(f.get("overall"), n)
    text = f.get("text")
    text_missing = pc.is_null(text).to_numpy(zero_copy_only=False) if text is not None else np.ones(n, bool)
    if "len" in f:
        length = pc.fill_null(pc.cast(f["len"], pa.float64()), 0.0).to_numpy(zero_copy_only=False)
    elif text is not None:
        length = pc.fill_null(pc.utf8_length(pc.cast(text, pa.string())), 0).to_numpy(zero_copy_only=False)
    else:
        length = np.zeros(n)
    aspects = aspect_values(f.get("scores"), n)
    reasons = response_reasons(f.get("problem"), np.asarray(text_missing, bool), reward, reward_null, aspects)
    idx = np.flatnonzero(is_good(reasons))
    sample = (pc.cast(f["sample_idx"], pa.int64()).to_numpy(zero_copy_only=False) if "sample_idx" in f
              else flat.position())
    label = (np.asarray(pc.cast(f["label"], pa.string()).to_numpy(zero_copy_only=False), dtype=object)[idx]
             if "label" in f else None)
    good = GoodResponses(
        index=idx, sizes=np.bincount(flat.parent[idx], minlength=flat.sizes.size).astype(np.int64),
        reward=reward[idx], sample_idx=np.asarray(sample, dtype=np.int64)[idx],
        length=np.asarray(length, dtype=np.float64)[idx], label=label,
        aspects={a: v[idx] for a, (v, _null) in aspects.items()},
    )
    return good, flat, reasons


def prompt_stats(table: pa.Table, params: StatsParams, max_cells: int = 4_000_000) -> pa.Table:
    """Statistics for every prompt row of `table` (one row per prompt, its responses as a list).

    Out come, in one table: a statistics row per prompt with at least 2 good responses; a row quarantined as
    `fewer_than_2_responses` per prompt left with one; and one quarantined row per bad response (prompt_id,
    its sample_idx in QUARANTINE_SAMPLE, the reason). A prompt left with none has only its responses' rows,
    so that, counted in responses, in = out + quarantined.
    """
    good, flat, reasons = good_responses(table)
    keep = np.flatnonzero(good.sizes >= 1)  # prompt rows that get a statistics row
    sizes = good.sizes[keep]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if sizes.size else sizes
    parts: dict[str, list[np.ndarray]] = {}
    for g0, g1 in chunk_bounds(sizes, max_cells):
        lo = int(starts[g0])
        hi = int(starts[g1]) if g1 < starts.size else int(sizes.sum())
        for k, v in _stats_chunk(good, lo, hi, starts[g0:g1] - lo, sizes[g0:g1], params).items():
            parts.setdefault(k, []).append(v)
    cols = {k: np.concatenate(v) for k, v in parts.items()} if parts else _no_stats()
    rows = pa.array(keep)
    out: dict[str, pa.Array] = {"prompt_id": pc.cast(table.column("prompt_id").take(rows), pa.string())}
    for c in params.carry:
        if c in table.column_names:
            out[c] = table.column(c).take(rows)
    n = sizes
    texts = pc.cast(flat.fields["text"], pa.string()) if "text" in flat.fields else pa.nulls(flat.count, pa.string())
    pdv, lc, pv = cols["pd"], cols["len_corr"], cols["pvar"]
    out.update({
        "n": pa.array(n),
        "reward_mean": pa.array(cols["mean"]),
        "reward_std": pa.array(cols["std"]),
        "pvar": pa.array(pv, mask=~np.isfinite(pv)),
        "margin": pa.array(cols["margin"], mask=n < 2),
        "best_idx": pa.array(cols["best_idx"].astype(np.int64)),
        "worst_idx": pa.array(cols["worst_idx"].astype(np.int64)),
        "pd": pa.array(pdv, mask=~np.isfinite(pdv)),
        "len_corr": pa.array(lc, mask=~np.isfinite(lc)),
        "score_best": pa.array(cols["score_best"]),
        "score_worst": pa.array(cols["score_worst"]),
        # Only the two texts a pair needs are copied out of the block.
        "best_response": texts.take(pa.array(good.index[cols["best"].astype(np.int64)])),
        "worst_response": texts.take(pa.array(good.index[cols["worst"].astype(np.int64)])),
        "paired": pa.array(cols["paired"].astype(bool)),
        "tau": pa.array(np.full(n.size, params.tau)),
        **{k: pa.array(v) for k, v in cols.items() if k.startswith("_pd")},
        QUARANTINE: pa.array(np.where(n < 2, "fewer_than_2_responses", None), type=pa.string()),
        QUARANTINE_DETAIL: pa.nulls(n.size, pa.string()),
        QUARANTINE_SAMPLE: pa.nulls(n.size, pa.int64()),
    })
    stats = pa.table(out)
    bad = np.flatnonzero(~is_good(reasons))
    if not bad.size:
        return stats
    sample = (pc.cast(flat.fields["sample_idx"], pa.int64()).to_numpy(zero_copy_only=False)
              if "sample_idx" in flat.fields else flat.position())
    quarantined = pa.table({
        "prompt_id": pc.cast(table.column("prompt_id").take(pa.array(flat.parent[bad])), pa.string()),
        QUARANTINE: pa.array(list(reasons[bad]), pa.string()),
        # A scorer's word on why (operators.reward_functions: the function and what it raised), else null.
        QUARANTINE_DETAIL: (pc.cast(flat.fields["problem_detail"], pa.string()).take(pa.array(bad))
                            if "problem_detail" in flat.fields else pa.nulls(bad.size, pa.string())),
        QUARANTINE_SAMPLE: pa.array(np.asarray(sample, dtype=np.int64)[bad]),
    })
    return pa.concat_tables([stats, quarantined], promote_options="default")


def _no_stats() -> dict[str, np.ndarray]:
    f, i = np.zeros(0), np.zeros(0, dtype=np.int64)
    return {"mean": f, "std": f, "pvar": f, "margin": f, "best_idx": i, "worst_idx": i, "pd": f, "len_corr": f,
            "score_best": f, "score_worst": f, "best": i, "worst": i, "paired": np.zeros(0, bool)}


def _stats_chunk(g: GoodResponses, lo: int, hi: int, starts: np.ndarray, sizes: np.ndarray,
                 params: StatsParams) -> dict[str, np.ndarray]:
    """Statistics of the prompts whose good responses are g[lo:hi] (`starts` relative to lo)."""
    width = int(sizes.max())
    G = sizes.size
    R = _padded(g.reward[lo:hi], starts, sizes, width)
    S = _padded(g.sample_idx[lo:hi].astype(np.float64), starts, sizes, width)
    lengths = g.length[lo:hi]
    L = _padded(lengths, starts, sizes, width)
    rows = np.arange(G)

    with np.errstate(invalid="ignore"):
        mean = np.nanmean(R, axis=1)
        std = np.sqrt(np.nanmean((R - mean[:, None]) ** 2, axis=1))
    pv = _group_pvar(R, params.tau)
    # Best and worst are first in sample_idx order on ties: order each prompt's responses by sample_idx.
    order = np.argsort(np.where(np.isfinite(S), S, np.inf), axis=1, kind="stable")
    Ro = np.take_along_axis(R, order, axis=1)
    bpos = np.take_along_axis(order, np.where(np.isfinite(Ro), Ro, -np.inf).argmax(axis=1)[:, None], 1)[:, 0]
    wpos = np.take_along_axis(order, np.where(np.isfinite(Ro), Ro, np.inf).argmin(axis=1)[:, None], 1)[:, 0]

    # Already-paired prompts: the labelled pair decides, not argmax/argmin.
    paired = np.zeros(G, dtype=bool)
    if g.label is not None:
        lab = g.label[lo:hi]
        ch = _padded((lab == "chosen").astype(np.float64), starts, sizes, width, fill=0.0) > 0
        rj = _padded((lab == "rejected").astype(np.float64), starts, sizes, width, fill=0.0) > 0
        paired = (ch.sum(axis=1) == 1) & (rj.sum(axis=1) == 1)
        bpos = np.where(paired, ch.argmax(axis=1), bpos)
        wpos = np.where(paired, rj.argmax(axis=1), wpos)
    score_best, score_worst = R[rows, bpos], R[rows, wpos]

    pd = np.full(G, np.nan)
    parts: dict[str, np.ndarray] = {}
    if params.pd_parts and params.norms is None and g.aspects:
        # The pair is best vs worst (pd_target overall); the raw differences wait for the norms (`fill_pd`).
        for a in sorted(g.aspects):
            V = _padded(g.aspects[a][lo:hi], starts, sizes, width)
            parts[PD_PARTS + a] = V[rows, wpos] - V[rows, bpos]
        parts[PD_LEN] = L[rows, wpos] - L[rows, bpos]
        parts[PD_LOGLEN] = np.log1p(L[rows, wpos]) - np.log1p(L[rows, bpos])
    if params.norms is not None and params.norms.aspects:
        target = params.pd_target
        if target != "overall" and target in params.norms.aspects and target in g.aspects:
            # The pair is chosen by the target aspect (unpaired data); the others vote on it.
            T = _padded(g.aspects[target][lo:hi], starts, sizes, width)
            tb = np.where(np.isfinite(T), T, -np.inf).argmax(axis=1)
            tw = np.where(np.isfinite(T), T, np.inf).argmin(axis=1)
            pw, pl = np.where(paired, bpos, tb), np.where(paired, wpos, tw)
        else:
            pw, pl = bpos, wpos
        diffs = []
        for a, norm in params.norms.aspects.items():
            if a == target or a not in g.aspects:
                continue
            Z = _padded(normalized_aspect(g.aspects[a][lo:hi], lengths, norm, params.norms), starts, sizes, width)
            diffs.append(Z[rows, pl] - Z[rows, pw])
        if diffs:
            D = np.stack(diffs, axis=1)
            cnt = np.isfinite(D).sum(axis=1)
            with np.errstate(invalid="ignore"):
                pd = np.where(cnt > 0, np.nansum(D, axis=1) / cnt, np.nan)

    return {
        "mean": mean, "std": std, "pvar": pv, "margin": score_best - score_worst,
        "best_idx": S[rows, bpos], "worst_idx": S[rows, wpos], "pd": pd, "len_corr": _group_pearson(R, L),
        "score_best": score_best, "score_worst": score_worst,
        "best": lo + starts + bpos, "worst": lo + starts + wpos, "paired": paired, **parts,
    }


# ----------------------------------------------------------------------------------------------------------
# Ray plumbing
# ----------------------------------------------------------------------------------------------------------


def block_stats(table: pa.Table, params: StatsParams) -> pa.Table:
    """`prompt_stats` of a block of validated prompt rows, carrying that block's own prompt-level columns:
    the statistics computed in the pass that reads them (pipelines.runtime.stages.Then)."""
    return prompt_stats(table, replace(params, carry=carry_columns(table.column_names)))


def stats_map(ds, params: StatsParams):
    """The statistics as a map over whole prompt rows: no shuffle, each block on its own."""
    return ds.map_batches(prompt_stats, fn_kwargs={"params": params}, batch_format="pyarrow", batch_size=None)
