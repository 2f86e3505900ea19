"""Adaptive sampling: draw samples in rounds and stop a prompt once its PVar cannot make the selection cut.

PVar selection (`pvar_top`) keeps about a tenth of the prompts, so generating and scoring all K samples for
every prompt spends most of the budget on prompts that are thrown away. Instead a prompt gets `k0` samples,
and after each round `decide` says which prompts get `step` more, up to `k_max`:

* `rank`: the prompts whose current PVar estimate ranks in the top `keep` fraction of those still in play
  (that continued in the previous round).
* `ucb`: the prompts still in play whose upper bound, estimate + z * se, is at or above the current cut:
  the estimate that would just make the selection (the round(fraction * prompts)-th largest estimate over
  all prompts). se is the jackknife standard error of the PVar U-statistic, pooled over the prompts with
  the same number of rewards, with the finite-population factor toward the k_max-sample PVar. With
  `resume`, a prompt that stopped comes back when the cut falls to its bound. `ucb_prompt` uses each
  prompt's own se.

A prompt that can still make the cut keeps drawing to `k_max`, so a selected prompt gets as many samples for
its chosen/rejected pair as without adaptive sampling; only prompts that cannot make it stop early. With
`z_in` set, `ucb` also stops a prompt that is sure to make the cut (estimate - z_in * se at or above it):
the samples saved there can buy a higher z for the prompts near the cut, at the price of fewer samples, so
a smaller reward margin, for the chosen/rejected pair of a prompt that stopped that way.

A prompt whose PVar is not defined yet (fewer than 2 valid rewards) continues. The inputs are what a round
can know: the rewards drawn so far per prompt (NaN for a sample that has no valid reward), how many samples
each prompt has drawn, and which continued in the previous round. The PVar itself is `operators.stats`'.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from operators.select import Budget
from operators.stats import _group_pvar


@dataclass(frozen=True)
class AdaptiveCfg:
    k0: int = 4  # samples every prompt gets in the first round
    step: int = 4  # more samples per round for a prompt that continues
    k_max: int | None = None  # cap per prompt; null: the generator's num_samples (all responses, simulated)
    rule: str = "ucb"  # a name in RULES
    keep: float = 0.7  # rank: the fraction of the prompts still in play that continues
    z: float = 1.0  # ucb: continue while estimate + z * se >= the cut
    # ucb: look again at prompts that stopped; one comes back when the cut falls to its bound. Without it a
    # low z stops prompts for good on a few unlucky samples (README, Adaptive sampling).
    resume: bool = True
    # ucb: also stop a prompt whose lower bound, estimate - z_in * se, is at or above the cut (sure to make
    # it). null: never, so every prompt that can make the cut draws to k_max.
    z_in: float | None = None
    fraction: float = 0.1  # the selection fraction the cut is for (select.fraction of pvar_top)
    tau: float = 1.0  # the Bradley-Terry temperature of the PVar (stats.tau)


def check_cfg(cfg: AdaptiveCfg, prefix: str = "adaptive") -> None:
    """Raise a ValueError naming the first bad key."""
    if cfg.rule not in RULES:
        raise ValueError(f"{prefix}.rule: {cfg.rule!r} is not allowed (choose one of {', '.join(RULES)})")
    for key, value, low in (("k0", cfg.k0, 2), ("step", cfg.step, 1)):
        if value < low:
            raise ValueError(f"{prefix}.{key}: {value} is not allowed (at least {low})")
    if cfg.k_max is not None and cfg.k_max < cfg.k0:
        raise ValueError(f"{prefix}.k_max: {cfg.k_max} is not allowed (at least k0 = {cfg.k0})")
    if not 0.0 < cfg.keep <= 1.0:
        raise ValueError(f"{prefix}.keep: {cfg.keep} is not allowed (a fraction in (0, 1])")
    if not 0.0 < cfg.fraction <= 1.0:
        raise ValueError(f"{prefix}.fraction: {cfg.fraction} is not allowed (a fraction in (0, 1])")
    if not (cfg.tau > 0 and math.isfinite(cfg.tau)):
        raise ValueError(f"{prefix}.tau: {cfg.tau} is not allowed (a positive number)")
    if not math.isfinite(cfg.z):
        raise ValueError(f"{prefix}.z: {cfg.z} is not allowed (a finite number)")
    if cfg.z_in is not None:
        if RULE_PARAM[cfg.rule] != "z":
            raise ValueError(f"{prefix}.z_in: {cfg.z_in} is not allowed with rule {cfg.rule!r} (only the bound "
                             f"rules {', '.join(r for r, p in RULE_PARAM.items() if p == 'z')} read it)")
        if not (cfg.z_in >= 0 and math.isfinite(cfg.z_in)):
            raise ValueError(f"{prefix}.z_in: {cfg.z_in} is not allowed (a finite number >= 0, or null)")


# ----------------------------------------------------------------------------------------------------------
# The PVar estimate and its standard error, over a NaN-padded [prompts, samples] reward matrix
# ----------------------------------------------------------------------------------------------------------


def padded(rewards: Sequence[Sequence[float | None]]) -> np.ndarray:
    """Per-prompt reward lists as a [prompts, longest] float matrix; None and padding become NaN."""
    width = max((len(r) for r in rewards), default=0)
    out = np.full((len(rewards), max(width, 1)), np.nan)
    for g, r in enumerate(rewards):
        out[g, :len(r)] = np.array([np.nan if v is None else v for v in r], dtype=np.float64)
    return out


def pvar_estimates(R: np.ndarray, tau: float, max_cells: int = 4_000_000) -> np.ndarray:
    """PVar per row over the finite rewards; NaN for fewer than 2. Chunked so that the [rows, pairs]
    temporaries stay under `max_cells` each: the driver calls this over every prompt of a run."""
    R = np.asarray(R, dtype=np.float64)
    G, w = R.shape
    chunk = max(1, max_cells // max(w * (w - 1) // 2, 1))
    if G <= chunk:
        return _group_pvar(R, tau)
    return np.concatenate([_group_pvar(R[g0:g0 + chunk], tau) for g0 in range(0, G, chunk)])


def pair_kernel(R: np.ndarray, tau: float) -> np.ndarray:
    """h_ij = (sigmoid((r_i - r_j) / tau) - 1/2)^2 for every pair of a row, as a [rows, width, width] tensor:
    the PVar of the two rewards alone (PVar is the mean of h over pairs), so the definition stays in one
    place. NaN where either reward is missing; 0 on the diagonal."""
    R = np.asarray(R, dtype=np.float64)
    G, w = R.shape
    pairs = np.stack(np.broadcast_arrays(R[:, :, None], R[:, None, :]), axis=-1)
    return pvar_estimates(pairs.reshape(-1, 2), tau).reshape(G, w, w)


def jackknife_se(R: np.ndarray, tau: float, max_cells: int = 4_000_000) -> np.ndarray:
    """Jackknife standard error of each row's PVar over its m finite rewards: sqrt((m-1)/m * sum_i (U_{-i} -
    mean U_{-i})^2), U_{-i} the PVar without reward i. NaN for fewer than 3 rewards (U_{-i} needs 2).

    From the pair kernel: with S = sum_{i != j} h_ij = m(m-1) U and row sums s_i = sum_j h_ij,
    U_{-i} = (S - 2 s_i) / ((m-1)(m-2)). Chunked so that the [rows, width, width] tensor stays under
    `max_cells`."""
    R = np.asarray(R, dtype=np.float64)
    G, w = R.shape
    out = np.full(G, np.nan)
    chunk = max(1, max_cells // max(w * w, 1))
    for g0 in range(0, G, chunk):
        block = R[g0:g0 + chunk]
        H = pair_kernel(block, tau)
        m = np.isfinite(block).sum(axis=1).astype(np.float64)
        rows = np.nansum(H, axis=2)
        total = rows.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            loo = (total[:, None] - 2.0 * rows) / ((m - 1) * (m - 2))[:, None]
            loo = np.where(np.isfinite(block), loo, np.nan)  # a missing reward is no jackknife sample
            dev = loo - np.nanmean(np.where(m[:, None] >= 3, loo, 0.0), axis=1)[:, None]
            var = (m - 1) / m * np.nansum(dev * dev, axis=1)
        out[g0:g0 + block.shape[0]] = np.where(m >= 3, np.sqrt(np.where(m >= 3, var, 0.0)), np.nan)
    return out


def selection_cut(estimates: np.ndarray, fraction: float) -> float:
    """The estimate that just makes the selection: the k-th largest finite estimate with k = pvar_top's
    round-half-up of fraction * (prompts with an estimate); NaN when no prompt has one."""
    est = np.asarray(estimates, dtype=np.float64)
    est = est[np.isfinite(est)]
    k = Budget(fraction=fraction).size(est.size)
    return float(np.sort(est)[::-1][k - 1]) if k else float("nan")


# ----------------------------------------------------------------------------------------------------------
# Rules: which prompts still in play continue. Each gets the rewards so far and returns a mask.
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundState:
    rewards: np.ndarray  # [prompts, width] rewards drawn so far, NaN for none
    estimates: np.ndarray  # PVar per prompt over its rewards so far
    active: np.ndarray  # bool: continued in the previous round (all True in the first)
    cap: np.ndarray  # k_max per prompt


def pooled_se(se: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Root mean jackknife variance over the prompts with the same number of rewards m, for each prompt.

    One prompt's jackknife from a few rewards is itself noisy (0 when its rewards happen to tie), so the
    bound uses the typical error at that sample size instead."""
    out = np.full(se.shape, np.nan)
    for k in np.unique(m):
        same = m == k
        ok = same & np.isfinite(se)
        if ok.any():
            out[same] = np.sqrt(np.mean(se[ok] ** 2))
    return out


def _rank(state: RoundState, cfg: AdaptiveCfg) -> np.ndarray:
    """The top `keep` of the prompts in play by estimate (ties by position); NaN estimates continue."""
    est = state.estimates
    scored = state.active & np.isfinite(est)
    idx = np.flatnonzero(scored)
    order = idx[np.lexsort((idx, -est[idx]))]  # descending estimate, then position
    out = state.active & ~np.isfinite(est)
    out[order[:Budget(fraction=cfg.keep).size(idx.size)]] = True
    return out


def _bound(state: RoundState, cfg: AdaptiveCfg, pooled: bool) -> np.ndarray:
    """estimate + z * se at or above the cut, for the prompts in play (all below their cap with `resume`:
    the prompts that continue regress from lucky estimates and the cut falls toward a stopped one); with
    `z_in`, not those whose estimate - z_in * se is at or above the cut as well (sure to make it).

    se is the error of the estimate against the PVar of all k_max samples, the selection this stands in
    for: the first m of k_max exchangeable samples are a random subset of them, so the finite-population
    factor 1 - m/k_max applies (the U-statistic's leading variance term 4 zeta_1 (1/m - 1/k_max))."""
    cut = selection_cut(state.estimates, cfg.fraction)
    out = np.ones(state.estimates.size, dtype=bool) if cfg.resume else state.active.copy()
    if not math.isfinite(cut):
        return out
    m = np.isfinite(state.rewards).sum(axis=1)
    se = jackknife_se(state.rewards, cfg.tau)
    se = pooled_se(se, m) if pooled else se
    se = se * np.sqrt(np.clip(1.0 - m / np.maximum(state.cap, 1), 0.0, 1.0))
    ucb = state.estimates + cfg.z * se
    out &= ~np.isfinite(ucb) | (ucb >= cut)
    if cfg.z_in is not None:
        out &= ~(state.estimates - cfg.z_in * se >= cut)  # NaN (no se yet) compares False: continues
    return out


def _ucb(state: RoundState, cfg: AdaptiveCfg) -> np.ndarray:
    return _bound(state, cfg, pooled=True)


def _ucb_prompt(state: RoundState, cfg: AdaptiveCfg) -> np.ndarray:
    """ucb with each prompt's own jackknife se (measured worse: see README, Adaptive sampling)."""
    return _bound(state, cfg, pooled=False)


Rule = Callable[[RoundState, AdaptiveCfg], np.ndarray]
RULES: dict[str, Rule] = {"rank": _rank, "ucb": _ucb, "ucb_prompt": _ucb_prompt}
RULE_PARAM = {"rank": "keep", "ucb": "z", "ucb_prompt": "z"}  # the AdaptiveCfg field each rule reads


# ----------------------------------------------------------------------------------------------------------
# What a round loop calls
# ----------------------------------------------------------------------------------------------------------


def first_draws(k_max: np.ndarray | int, cfg: AdaptiveCfg) -> np.ndarray:
    """Samples per prompt in the first round: k0, or fewer where a prompt's cap is lower."""
    return np.minimum(np.asarray(k_max, dtype=np.int64), cfg.k0)


def decide(rewards, drawn, active, cfg: AdaptiveCfg, k_max=None, rule: Rule | None = None) -> np.ndarray:
    """Which prompts continue into the next round (bool per prompt).

    `rewards`: per prompt the rewards of the samples drawn so far (a NaN-padded matrix, or lists with None
    for a sample without a valid reward); `drawn`: samples drawn per prompt, valid or not; `active`:
    continued in the previous round (all True in the first; read by `rank`, and by `ucb` without `resume`);
    `k_max`: the cap per prompt (an int or one per prompt; default cfg.k_max); `rule`: in place of
    RULES[cfg.rule] (the simulation's oracle reference, which needs the data's full responses). A prompt at
    its cap never continues."""
    R = rewards if isinstance(rewards, np.ndarray) and rewards.ndim == 2 else padded(rewards)
    R = np.asarray(R, dtype=np.float64)
    drawn = np.asarray(drawn, dtype=np.int64)
    active = np.asarray(active, dtype=bool)
    cap = cfg.k_max if k_max is None else k_max
    if cap is None:
        raise ValueError("adaptive.k_max: not set; pass k_max (the generator's num_samples)")
    if not (R.shape[0] == drawn.size == active.size):
        raise ValueError(f"decide: {R.shape[0]} reward rows, {drawn.size} counts and {active.size} flags differ")
    cap = np.broadcast_to(np.asarray(cap, dtype=np.int64), drawn.shape)
    state = RoundState(rewards=R, estimates=pvar_estimates(R, cfg.tau), active=active, cap=cap)
    return (rule or RULES[cfg.rule])(state, cfg) & (drawn < cap)


def next_draws(drawn, go: np.ndarray, cfg: AdaptiveCfg, k_max) -> np.ndarray:
    """Samples per prompt in the next round: `step` (less near the cap) for those that continue, else 0."""
    room = np.asarray(k_max, dtype=np.int64) - np.asarray(drawn, dtype=np.int64)
    return np.where(go, np.clip(room, 0, cfg.step), 0)
