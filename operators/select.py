"""Selection rules, by name, over the per-prompt statistics table.

A rule reads statistic columns and decides; it never recomputes them (statistics first, decisions after).
Every rule returns, for every prompt: `selected`, `rank` (1 = most wanted, within its stratum), and for the
MixDPO curriculum `route` and `order`. Ties break by a stable hash of (seed, prompt_id), so a selection
is the same on every run and every machine, whatever order Ray delivered the rows in.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SELECT_COLUMNS = ("prompt_id", "source", "pvar", "margin", "pd")


class SelectionError(ValueError):
    pass


@dataclass(frozen=True)
class Budget:
    fraction: float | None = None
    count: int | None = None

    def size(self, n: int) -> int:
        """Rows kept out of n: round-half-up of fraction * n (at least 1 when n > 0), or min(count, n)."""
        if self.count is not None:
            return max(0, min(int(self.count), n))
        f = 1.0 if self.fraction is None else float(self.fraction)
        if n == 0 or f <= 0:
            return 0
        return max(1, min(n, int(math.floor(f * n + 0.5))))


FNV_PRIME = np.uint64(0x100000001B3)


def tiebreak(prompt_ids, seed: int | str) -> np.ndarray:
    """A stable 64-bit hash of (seed, prompt_id): deterministic across runs, processes and machines.

    FNV-1a over the id's UTF-8 bytes, started from a state drawn from the seed (blake2b of the seed) and
    finished with splitmix64's mixer so that the high bits, which decide the order, depend on every byte.
    It runs vectorised over an Arrow string column: one numpy step per byte position over the ids at least
    that long (a blake2b call per id took most of the selection's time at millions of prompts).
    """
    ids = prompt_ids if isinstance(prompt_ids, (pa.Array, pa.ChunkedArray)) else pa.array(
        [None if p is None else str(p) for p in prompt_ids], pa.string())
    ids = pc.fill_null(pc.cast(ids, pa.large_string()), "None")
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    n = len(ids)
    start = np.frombuffer(hashlib.blake2b(f"{seed}".encode(), digest_size=8).digest(), dtype="<u8")[0]
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    buffers = ids.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64)[ids.offset: ids.offset + n + 1]
    data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    by_length = np.argsort(-lengths, kind="stable")  # ids still going at position j are a prefix
    begin, lens = offsets[:-1][by_length], lengths[by_length]
    h = np.full(n, start, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(int(lens[0]) if n else 0):
            k = int(np.searchsorted(-lens, -j, side="left"))  # lens > j for the first k
            h[:k] = (h[:k] ^ data[begin[:k] + j].astype(np.uint64)) * FNV_PRIME
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    out = np.empty(n, dtype=np.uint64)
    out[by_length] = h
    return out


def rank_by(key: np.ndarray, tb: np.ndarray, descending: bool) -> np.ndarray:
    """0-based rank of each row when sorted by key (nulls last), ties by the hash."""
    k = np.asarray(key, dtype=np.float64)
    valid = np.isfinite(k)
    primary = np.where(valid, -k if descending else k, np.inf)  # invalid (null, NaN, inf) last
    order = np.lexsort((tb, primary))  # last key is the primary sort key
    ranks = np.empty(k.size, dtype=np.int64)
    ranks[order] = np.arange(k.size)
    return ranks


# ----------------------------------------------------------------------------------------------------------
# Rules: (table, params) -> (score-ordered ranks, eligible mask, extra columns)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleParams:
    seed: int = 0
    margin_tau: float | None = None
    sft_quantile: float | None = None
    column: str | None = None
    min: float | None = None
    max: float | None = None


def _col(table: pa.Table, name: str, rule: str) -> np.ndarray:
    if name not in table.column_names:
        raise SelectionError(f"rule {rule!r} needs the statistic column {name!r}, which the statistics lack")
    return pc.cast(table.column(name), pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


def _by_column(name: str, descending: bool, rule: str):
    def rule_fn(table: pa.Table, p: RuleParams, tb: np.ndarray):
        key = _col(table, name, rule)
        return rank_by(key, tb, descending), np.isfinite(key), {}

    return rule_fn


def _random(table: pa.Table, p: RuleParams, tb: np.ndarray):
    # Its own salt: ordering by the tie-break hash itself would make `random` agree with every other rule
    # wherever that rule's ties are split, inflating their overlap.
    key = tiebreak(table.column("prompt_id"), f"random:{p.seed}").astype(np.float64)
    return rank_by(key, tb, False), np.ones(table.num_rows, bool), {}


def _margin_curriculum(table: pa.Table, p: RuleParams, tb: np.ndarray):
    """MixDPO: easy (large margin) to hard; the hardest pairs are routed to SFT instead of DPO."""
    margin = _col(table, "margin", "margin_curriculum")
    ranks = rank_by(margin, tb, descending=True)
    if p.margin_tau is not None and p.sft_quantile is not None:
        raise SelectionError("margin_curriculum takes select.margin_tau or select.sft_quantile, not both")
    if p.sft_quantile is not None and not 0.0 <= p.sft_quantile <= 1.0:
        raise SelectionError(f"select.sft_quantile must lie in [0, 1], got {p.sft_quantile}")
    route = np.full(table.num_rows, "dpo", dtype=object)
    if p.margin_tau is not None:
        route[margin < p.margin_tau] = "sft"
    # A quantile is taken over the selected pairs, after the budget: see `select`.
    return ranks, np.isfinite(margin), {"route": route}


def _pd_consensus(table: pa.Table, p: RuleParams, tb: np.ndarray):
    pd = _col(table, "pd", "pd_consensus")
    if not np.isfinite(pd).any() and table.num_rows:
        raise SelectionError("pd_consensus needs multi-aspect scores (reward__<aspect> columns); pd is empty")
    return rank_by(pd, tb, descending=False), np.isfinite(pd), {}


def _threshold(table: pa.Table, p: RuleParams, tb: np.ndarray):
    if not p.column:
        raise SelectionError("rule 'threshold' needs select.column (and select.min and/or select.max)")
    key = _col(table, p.column, "threshold")
    ok = np.isfinite(key)
    if p.min is not None:
        ok &= key >= p.min
    if p.max is not None:
        ok &= key <= p.max
    return rank_by(key, tb, descending=True), ok, {}


Rule = Callable[[pa.Table, RuleParams, np.ndarray], tuple[np.ndarray, np.ndarray, dict]]

SELECTORS: dict[str, Rule] = {
    "pvar_top": _by_column("pvar", True, "pvar_top"),
    "pvar_bottom": _by_column("pvar", False, "pvar_bottom"),
    "random": _random,
    "margin_curriculum": _margin_curriculum,
    "pd_consensus": _pd_consensus,
    "threshold": _threshold,
}

# A rule's default budget when the config names none: the papers' settings.
DEFAULT_FRACTION = {"pvar_top": 0.1, "pvar_bottom": 0.1, "random": 0.1, "margin_curriculum": 1.0,
                    "pd_consensus": 0.3, "threshold": 1.0}


def select(table: pa.Table, rule: str, budget: Budget, params: RuleParams,
           stratify_by: str | None = None) -> pa.Table:
    """prompt_id plus `selected`, `rank`, `selector`, `route`, `order` for every row of `table`."""
    if rule not in SELECTORS:
        raise SelectionError(f"unknown selection rule {rule!r}; choose one of {', '.join(SELECTORS)}")
    if budget.fraction is not None and budget.count is not None:
        raise SelectionError("set select.fraction or select.count, not both")
    if budget.fraction is not None and not 0.0 <= budget.fraction <= 1.0:
        raise SelectionError(f"select.fraction must lie in [0, 1], got {budget.fraction}")
    if budget.fraction is None and budget.count is None:
        budget = Budget(fraction=DEFAULT_FRACTION[rule])
    ids = pc.cast(table.column("prompt_id"), pa.string())
    tb = tiebreak(ids, params.seed)
    n = table.num_rows
    ranks, eligible, extra = SELECTORS[rule](table, params, tb)

    if stratify_by:
        if stratify_by not in table.column_names:
            raise SelectionError(f"select.stratify_by={stratify_by!r} is not a column of the statistics")
        strata = np.array([str(s) for s in table.column(stratify_by).to_pylist()], dtype=object)
        groups = [np.flatnonzero(strata == s) for s in sorted(set(strata.tolist()), key=str)]
    else:
        groups = [np.arange(n)]  # one stratum: no per-row Python objects at millions of prompts
    selected = np.zeros(n, dtype=bool)
    local_rank = np.zeros(n, dtype=np.int64)
    total_eligible = int(eligible.sum())
    for idx in groups:
        if idx.size == n:  # ranks are a permutation of 0..n-1: invert it instead of sorting again
            order = np.empty(n, dtype=np.int64)
            order[ranks] = np.arange(n)
        else:
            order = idx[np.argsort(ranks[idx], kind="stable")]
        local_rank[order] = np.arange(1, order.size + 1)
        elig = order[eligible[order]]
        if budget.count is not None and stratify_by:
            # A count is split across strata in proportion to their eligible sizes.
            k = int(math.floor(budget.count * elig.size / max(total_eligible, 1) + 0.5))
        else:
            k = budget.size(elig.size)
        selected[elig[:k]] = True

    route = extra.get("route", np.full(n, "dpo", dtype=object))
    order_col = np.full(n, -1, dtype=np.int64)
    if rule == "margin_curriculum":
        sel_idx = np.flatnonzero(selected)
        sel_sorted = sel_idx[np.argsort(ranks[sel_idx], kind="stable")]  # global easy -> hard
        order_col[sel_sorted] = np.arange(sel_sorted.size)
        if params.sft_quantile is not None:
            # MixDPO: the hardest share of the pairs that will be trained on goes to SFT.
            n_sft = int(math.floor(params.sft_quantile * sel_sorted.size + 0.5))
            if n_sft:
                route[sel_sorted[sel_sorted.size - n_sft:]] = "sft"
    return pa.table({
        "prompt_id": ids,
        "selected": pa.array(selected),
        "rank": pa.array(local_rank),
        "selector": pa.array(np.full(n, rule, dtype=object), pa.string()),
        "route": pa.array(route, pa.string()),
        "order": pa.array(order_col, mask=order_col < 0),
    })
