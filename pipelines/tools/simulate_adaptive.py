"""`prefsift simulate-adaptive`: how much of the full-K PVar selection adaptive sampling keeps, and at what share
of the samples, replayed over rated data with many responses per prompt.

    prefsift simulate-adaptive --input rated.jsonl.gz [--config FILE] [key.sub=value ...]
    prefsift simulate-adaptive --input rated.jsonl.gz adaptive.rule=ucb adaptive.z=1.5 repeats=50

A prompt's rated responses stand for the K samples a generator would draw. Each repeat shuffles every prompt's
responses (its draw order), replays the rounds of `operators.adaptive` over them, selects the top `fraction`
by the PVar estimate on what was drawn, and compares with the top `fraction` by the PVar over all responses.
`recall_even` spends the same number of samples spread evenly over the prompts. The pair's cost: `margin`
is the mean over the selected prompts of their chosen/rejected reward margin (best minus worst of the samples
drawn), `margin_full` the same prompts' margin over all k_max samples, and `stopped_early` the share of the
selected prompts that drew fewer than k_max. No Ray: this is numpy.

Settings: the grid below, in which every `adaptive.<key>` given (in the config or as an override) pins that
key. Output: a table, then one JSON line per setting: means over the draw orders, with `<key>_sd` their spread
and `<key>_se` the standard error of the mean.

`oracle=[alpha, ...]` adds a reference no real run can use: a prompt continues while its probability of being
in the full-K selection, given how many samples it drew and its PVar estimate, is at least alpha, with that
probability learned from the same data's full responses. It shows how close a rule is to what that
information allows (in-sample, so an optimistic reference rather than a proven bound).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from operators.adaptive import (
    RULE_PARAM,
    AdaptiveCfg,
    RoundState,
    Rule,
    check_cfg,
    decide,
    first_draws,
    next_draws,
    pvar_estimates,
)
from operators.select import Budget, rank_by, tiebreak
from pipelines.runtime.config import ConfigError, apply_overrides, from_dict, load_yaml


@dataclass(frozen=True)
class GridCfg:
    """Values tried for each adaptive key that the config does not pin; `keep` is the rank rule's, `z` ucb's."""

    k0: list[int] = field(default_factory=lambda: [4])
    step: list[int] = field(default_factory=lambda: [2, 4])
    rule: list[str] = field(default_factory=lambda: ["rank", "ucb"])
    keep: list[float] = field(default_factory=lambda: [0.7])
    z: list[float] = field(default_factory=lambda: [1.0, 1.5])


@dataclass(frozen=True)
class SimulateCfg:
    repeats: int = 20  # random draw orders per setting
    seed: int = 0
    # levels alpha of the oracle reference (rule "oracle", simulation only): a prompt continues while the
    # probability that it is in the full-K selection, given its samples drawn and its PVar estimate, is at
    # least alpha, that probability learned from the data's full responses. [] runs none.
    oracle: list[float] = field(default_factory=list)
    oracle_draws: int = 200  # draw orders per prompt that the oracle's probabilities are learned from
    adaptive: AdaptiveCfg = field(default_factory=AdaptiveCfg)
    grid: GridCfg = field(default_factory=GridCfg)


# ----------------------------------------------------------------------------------------------------------
# Rewards from rated JSONL
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Rewards:
    prompt_ids: list[str]
    matrix: np.ndarray  # [prompts, most responses] valid rewards first, NaN padding
    counts: np.ndarray  # valid rewards per prompt
    skipped: Counter  # reason -> count, lines (whole prompts) and responses set aside


def _valid(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_rewards(path: str) -> Rewards:
    """Each line's `prompt_id` and its responses' `overall`; a bad line or a prompt with fewer than 2 valid
    rewards is skipped and a response without a finite `overall` left out, each counted by reason."""
    opener = gzip.open if path.endswith(".gz") else open
    ids, lists, skipped = [], [], Counter()
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skipped["prompt: invalid_json"] += 1
                continue
            if not isinstance(row, dict) or not isinstance(row.get("responses"), list):
                skipped["prompt: no_responses_list"] += 1
                continue
            vals = [r.get("overall") if isinstance(r, dict) else None for r in row["responses"]]
            good = [float(v) for v in vals if _valid(v)]
            if len(good) < len(vals):
                skipped["response: no_finite_overall"] += len(vals) - len(good)
            if len(good) < 2:
                skipped["prompt: fewer_than_2_valid_rewards"] += 1
                continue
            ids.append(str(row.get("prompt_id", len(ids))))
            lists.append(good)
    counts = np.array([len(v) for v in lists], dtype=np.int64)
    matrix = np.full((len(lists), int(counts.max(initial=2))), np.nan)
    for g, v in enumerate(lists):
        matrix[g, :len(v)] = v
    return Rewards(ids, matrix, counts, skipped)


# ----------------------------------------------------------------------------------------------------------
# Replay
# ----------------------------------------------------------------------------------------------------------


def draw_order(data: Rewards, rng: np.random.Generator) -> np.ndarray:
    """Each prompt's valid rewards in a random order (the order a generator would have drawn them)."""
    keys = np.where(np.isfinite(data.matrix), rng.random(data.matrix.shape), np.inf)
    return np.take_along_axis(data.matrix, np.argsort(keys, axis=1), axis=1)


def first_n(order: np.ndarray, n: np.ndarray) -> np.ndarray:
    width = max(int(n.max(initial=0)), 1)
    return np.where(np.arange(width)[None, :] < n[:, None], order[:, :width], np.nan)


def replay(order: np.ndarray, counts: np.ndarray, cfg: AdaptiveCfg, rule: Rule | None = None) -> tuple[np.ndarray, int]:
    """Samples drawn per prompt when the rounds run over `order` (with `rule` in place of cfg.rule's), and the
    number of rounds."""
    cap = counts if cfg.k_max is None else np.minimum(counts, cfg.k_max)
    n = first_draws(cap, cfg)
    active = np.ones(counts.size, dtype=bool)
    rounds = 1
    while True:
        go = decide(first_n(order, n), n, active, cfg, k_max=cap, rule=rule)
        if not go.any():
            return n, rounds
        n, active, rounds = n + next_draws(n, go, cfg, cap), go, rounds + 1


def even_counts(budget: int, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`budget` samples spread evenly: each prompt gets budget // prompts, a random few one more."""
    G = counts.size
    n = np.full(G, budget // G, dtype=np.int64)
    n[rng.permutation(G)[:budget - n.sum()]] += 1
    return np.minimum(n, counts)


def top_set(estimates: np.ndarray, tb: np.ndarray, k: int) -> np.ndarray:
    return rank_by(estimates, tb, descending=True) < k


def reference(data: Rewards, cfg: AdaptiveCfg) -> tuple[np.ndarray, np.ndarray]:
    """The full-K PVar per prompt and the full-K selection (pvar_top's ties by hash)."""
    full = pvar_estimates(data.matrix, cfg.tau)
    k = Budget(fraction=cfg.fraction).size(full.size)
    return full, top_set(full, tiebreak(data.prompt_ids, 0), k)


# ----------------------------------------------------------------------------------------------------------
# The oracle reference: what a rule that sees (samples drawn, PVar estimate) could do at best
# ----------------------------------------------------------------------------------------------------------


def isotonic(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Non-decreasing weighted least-squares fit of y (pool adjacent violators)."""
    vals, wts, sizes = [], [], []
    for v, wt in zip(y.tolist(), w.tolist(), strict=True):
        vals.append(v), wts.append(wt), sizes.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            wsum = wts[-2] + wts[-1]
            vals[-2:] = [(vals[-2] * wts[-2] + vals[-1] * wts[-1]) / wsum]
            wts[-2:], sizes[-2:] = [wsum], [sizes[-2] + sizes[-1]]
    return np.repeat(vals, sizes)


def oracle_thresholds(data: Rewards, cfg: AdaptiveCfg, alpha: float, draws: int, seed: int) -> dict[int, float]:
    """Per number of samples m: the lowest PVar estimate at which P(in the full-K selection | m, estimate) is
    at least `alpha`. The probability is the isotonic fit of the selection indicator on the m-sample estimate
    over `draws` random draw orders of every prompt with more than m responses; inf where none reaches alpha.
    Only the counts a round can see below a cap: k0, k0 + step, ..."""
    full, ref = reference(data, cfg)
    hit = full >= full[ref].min()  # as `recall` counts a hit: ties with the selection's lowest count
    rng = np.random.default_rng([seed, 1 << 20])
    orders = [draw_order(data, rng) for _ in range(draws)]
    out = {}
    for m in range(cfg.k0, int(data.counts.max()), cfg.step):
        rows = data.counts > m
        est = np.concatenate([pvar_estimates(o[rows, :m], cfg.tau) for o in orders])
        y = np.tile(hit[rows], draws).astype(np.float64)
        u, inv = np.unique(est, return_inverse=True)
        p = isotonic(np.bincount(inv, weights=y) / np.bincount(inv), np.bincount(inv).astype(np.float64))
        ok = np.flatnonzero(p >= alpha)
        out[m] = float(u[ok[0]]) if ok.size else math.inf
    return out


def oracle_rule(thresholds: dict[int, float]) -> Rule:
    """Continue while the estimate reaches the threshold for the prompt's sample count (no estimate: continue)."""
    def rule(state: RoundState, cfg: AdaptiveCfg) -> np.ndarray:
        m = np.isfinite(state.rewards).sum(axis=1)
        bar = np.array([thresholds.get(int(k), -math.inf) for k in m])
        return ~np.isfinite(state.estimates) | (state.estimates >= bar)
    return rule


def simulate(data: Rewards, cfg: AdaptiveCfg, repeats: int, seed: int, rule: Rule | None = None) -> dict:
    """Mean recall and sample share over `repeats` draw orders, and the recall of the same budget spent evenly.

    `recall` counts a selected prompt as a hit when its full-K PVar is at least the reference set's lowest,
    so that which of several tied prompts made the reference does not count; `recall_strict` is the overlap
    with the reference set itself (ties broken by pvar_top's hash)."""
    G = data.counts.size
    k = Budget(fraction=cfg.fraction).size(G)
    tb = tiebreak(data.prompt_ids, 0)
    full, ref = reference(data, cfg)
    floor = full[ref].min()
    keys = ("recall", "recall_strict", "sample_share", "recall_even", "rounds", "margin", "margin_full",
            "stopped_early")
    out = {key: [] for key in keys}
    cap = data.counts if cfg.k_max is None else np.minimum(data.counts, cfg.k_max)
    for r in range(repeats):
        rng = np.random.default_rng([seed, r])
        order = draw_order(data, rng)
        n, rounds = replay(order, data.counts, cfg, rule)
        drawn = first_n(order, n)
        sel = top_set(pvar_estimates(drawn, cfg.tau), tb, k)
        even = top_set(pvar_estimates(first_n(order, even_counts(int(n.sum()), data.counts, rng)), cfg.tau), tb, k)
        out["recall"].append(float((full[sel] >= floor).sum() / k))
        out["recall_strict"].append(float((sel & ref).sum() / k))
        out["recall_even"].append(float((full[even] >= floor).sum() / k))
        out["sample_share"].append(float(n.sum() / data.counts.sum()))
        out["rounds"].append(rounds)
        out["margin"].append(float(np.mean(spread(drawn[sel]))))
        out["margin_full"].append(float(np.mean(spread(first_n(order, cap)[sel]))))
        out["stopped_early"].append(float(np.mean(n[sel] < cap[sel])))
    res = {key: round(float(np.mean(v)), 4) for key, v in out.items()}
    for key in ("recall", "sample_share", "recall_even"):
        res[f"{key}_sd"] = round(float(np.std(out[key])), 4)  # the spread over draw orders
        se = standard_error(out[key])
        res[f"{key}_se"] = None if se is None else round(se, 4)
    return res


def spread(R: np.ndarray) -> np.ndarray:
    """Per row the best minus the worst finite reward: the chosen/rejected pair's margin (operators.stats)."""
    return np.nanmax(R, axis=1) - np.nanmin(R, axis=1)


def standard_error(values: list[float]) -> float | None:
    """The standard error of a mean over draw orders: the sample standard deviation (n - 1) over sqrt(n);
    None for one draw order. A target is met only if it holds beyond this; two settings compare more
    tightly on the same draw orders (the same seed), where the noise is shared."""
    n = len(values)
    return float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else None


# ----------------------------------------------------------------------------------------------------------
# Settings, output, CLI
# ----------------------------------------------------------------------------------------------------------


def settings(cfg: SimulateCfg, pinned: set[str]) -> list[AdaptiveCfg]:
    """The grid, each pinned adaptive key held at the config's value; `keep` varies only for rank, `z` only
    for ucb, and `z_in` (pinned or null) is kept only for the rules that read `z`."""
    def values(key: str) -> list:
        return [getattr(cfg.adaptive, key)] if key in pinned else list(getattr(cfg.grid, key))

    out = []
    for rule in values("rule"):
        key = RULE_PARAM.get(rule)
        for k0 in values("k0"):
            for step in values("step"):
                for v in values(key) if key else [None]:
                    extra = {key: v} if key else {}
                    extra["z_in"] = cfg.adaptive.z_in if key == "z" else None
                    out.append(dataclasses.replace(cfg.adaptive, rule=rule, k0=k0, step=step, **extra))
    return out


def oracle_settings(cfg: SimulateCfg, pinned: set[str]) -> list[tuple[float, AdaptiveCfg]]:
    """(alpha, the k0/step setting) for the oracle reference: each level over the grid's (or pinned) k0, step."""
    def values(key: str) -> list:
        return [getattr(cfg.adaptive, key)] if key in pinned else list(getattr(cfg.grid, key))

    return [(a, dataclasses.replace(cfg.adaptive, k0=k0, step=step, z_in=None))
            for a in cfg.oracle for k0 in values("k0") for step in values("step")]


def describe(row: dict) -> str:
    if row["rule"] == "oracle":
        return f"oracle alpha={row['alpha']:g}"
    key = RULE_PARAM.get(row["rule"])
    text = f"{row['rule']} {key}={row[key]:g}" if key else row["rule"]
    text += f" z_in={row['z_in']:g}" if row.get("z_in") is not None else ""
    return text + " resume" if row["resume"] and row["rule"] != "rank" else text


def run(path: str, cfg: SimulateCfg, pinned: set[str]) -> list[dict]:
    data = read_rewards(path)
    if data.counts.size == 0:
        raise ValueError(f"{path}: no prompt with at least 2 valid rewards ({dict(data.skipped)})")
    skipped = ", ".join(f"{v} {k}" for k, v in sorted(data.skipped.items())) or "none"
    print(f"# {os.path.basename(path)}: {data.counts.size} prompts, {int(data.counts.sum())} rated responses "
          f"({data.counts.min()}-{data.counts.max()} per prompt); skipped: {skipped}")
    print(f"# {cfg.repeats} draw orders per setting, seed {cfg.seed}")
    runs = [(s.rule, None, s, None) for s in settings(cfg, pinned)]
    runs += [("oracle", a, s, oracle_rule(oracle_thresholds(data, s, a, cfg.oracle_draws, cfg.seed)))
             for a, s in oracle_settings(cfg, pinned)]
    rows = []
    for name, alpha, s, rule in runs:
        check_cfg(s)
        res = simulate(data, s, cfg.repeats, cfg.seed, rule)
        rows.append({"data": os.path.basename(path), "prompts": int(data.counts.size), "rule": name,
                     "k0": s.k0, "step": s.step, "k_max": s.k_max, "keep": s.keep, "z": s.z, "z_in": s.z_in,
                     "resume": s.resume,
                     "fraction": s.fraction, "tau": s.tau, "repeats": cfg.repeats,
                     **({"alpha": alpha} if rule else {}), **res})
    head = f"{'rule':<28} {'k0':>3} {'step':>4} {'share':>6} {'recall':>7} {'sd':>6} {'se':>6} {'strict':>7} " \
           f"{'even':>6} {'rounds':>6} {'margin':>7} {'of_all':>7}"
    print(head)
    for r in rows:
        se = "-" if r["recall_se"] is None else f"{r['recall_se']:.3f}"
        print(f"{describe(r):<28} {r['k0']:>3} "
              f"{r['step']:>4} {r['sample_share']:>6.3f} {r['recall']:>7.3f} {r['recall_sd']:>6.3f} {se:>6} "
              f"{r['recall_strict']:>7.3f} {r['recall_even']:>6.3f} {r['rounds']:>6.1f} {r['margin']:>7.3f} "
              f"{r['margin_full']:>7.3f}")
    for r in rows:
        print(json.dumps(r))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="prefsift simulate-adaptive", description=__doc__.strip().splitlines()[0],
                                 epilog="overrides: key.sub=value, e.g. adaptive.rule=ucb adaptive.z=1 repeats=50")
    ap.add_argument("--input", required=True, help="rated JSONL(.gz): {prompt_id, responses: [{overall}]}")
    ap.add_argument("--config", help="YAML config file (a SimulateCfg mapping)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        data = apply_overrides(load_yaml(args.config) if args.config else {}, args.overrides)
        cfg = from_dict(SimulateCfg, data)
        if cfg.repeats < 1:
            raise ConfigError(f"repeats: {cfg.repeats} is not allowed (at least 1)")
        if cfg.oracle_draws < 1:
            raise ConfigError(f"oracle_draws: {cfg.oracle_draws} is not allowed (at least 1)")
        for a in cfg.oracle:
            if not 0.0 < a <= 1.0:
                raise ConfigError(f"oracle: {a} is not allowed (a probability in (0, 1])")
        if not os.path.isfile(args.input):
            raise FileNotFoundError(f"--input: {args.input} is not a file")
        run(args.input, cfg, set(data.get("adaptive") or {}))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
