"""Statistics against hand-computed values and properties (DESIGN.md, "Statistics: definitions")."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from operators.base import QUARANTINE
from operators.norms import (
    AspectNorm,
    PDNorms,
    block_sums,
    fill_pd,
    normalized_aspect,
    norms_from_sums,
    sufficient_sums,
)
from operators.stats import (
    QUARANTINE_SAMPLE,
    StatsParams,
    best_worst,
    chunk_bounds,
    implied_rewards,
    pearson,
    preference_divergence,
    prompt_stats,
    pvar,
)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --- PVar: hand-computed ---------------------------------------------------------------------------------


def test_pvar_two_responses_by_hand():
    # r = (1, 0): p_12 = sigmoid(1) = 0.7310585786, p_21 = 0.2689414214; both (p - 1/2)^2 = 0.0536882...
    expected = (0.7310585786300049 - 0.5) ** 2
    assert pvar([1.0, 0.0]) == pytest.approx(expected, abs=1e-12)
    assert pvar([1.0, 0.0]) == pytest.approx(0.053388, abs=1e-6)


def test_pvar_three_responses_by_hand():
    # r = (2, 0, 0): pairs (1,2),(1,3) have d=2, their mirrors d=-2, (2,3),(3,2) have d=0.
    d2 = (sig(2.0) - 0.5) ** 2  # 0.1451...
    expected = (4 * d2 + 2 * 0.0) / 6
    assert pvar([2.0, 0.0, 0.0]) == pytest.approx(expected, abs=1e-12)
    assert pvar([2.0, 0.0, 0.0]) == pytest.approx(0.0967, abs=1e-4)


def test_pvar_tau_rescales_rewards():
    assert pvar([2.0, 0.0], tau=2.0) == pytest.approx(pvar([1.0, 0.0]), abs=1e-15)
    # on 0-1 win probabilities tau=1 gives a tiny PVar, as DESIGN.md notes for AlpacaEval
    assert pvar([1.0, 0.0, 0.5]) < 0.05


def test_pvar_single_response_is_nan():
    assert math.isnan(pvar([3.0]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-15, 15, allow_nan=False), min_size=2, max_size=12), st.floats(1.0, 10))
def test_pvar_bounds(rewards, tau):
    # Strictly below 1/4 while float64 can still tell sigmoid(d) from 1 (|d| < ~36); see the next test.
    v = pvar(rewards, tau)
    assert 0.0 <= v < 0.25


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=2, max_size=6))
def test_pvar_never_exceeds_quarter_even_when_sigmoid_saturates(rewards):
    assert 0.0 <= pvar(rewards) <= 0.25


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-20, 20, allow_nan=False), min_size=2, max_size=10), st.floats(-100, 100),
       st.randoms(use_true_random=False))
def test_pvar_invariances(rewards, shift, rnd):
    base = pvar(rewards)
    assert pvar([r + shift for r in rewards]) == pytest.approx(base, abs=1e-9)
    perm = list(rewards)
    rnd.shuffle(perm)
    assert pvar(perm) == pytest.approx(base, abs=1e-12)


@given(st.floats(-1e3, 1e3, allow_nan=False), st.integers(2, 20))
def test_pvar_zero_when_equal(r, n):
    assert pvar([r] * n) == 0.0


def test_pvar_unordered_equals_ordered():
    r = np.array([0.3, 1.7, -0.4, 2.2])
    unordered = np.mean([(sig(r[i] - r[j]) - 0.5) ** 2 for i in range(4) for j in range(i + 1, 4)])
    assert pvar(r) == pytest.approx(unordered, abs=1e-12)


def test_implied_rewards():
    assert implied_rewards([-1.0, -3.0], [-2.0, -2.0], beta=0.1) == pytest.approx([0.1, -0.1])


# --- margin, best/worst, len_corr, pd --------------------------------------------------------------------


def test_best_worst_first_occurrence_on_ties():
    assert best_worst([1.0, 3.0, 3.0, 0.0, 0.0]) == (1, 3)


def test_pearson_by_hand_and_constant():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_preference_divergence_by_hand():
    # two other aspects: l - w = (0.5 - 1.5) and (-1 - 1) -> mean -1.5: they agree with the choice
    assert preference_divergence([1.5, 1.0], [0.5, -1.0]) == pytest.approx(-1.5)
    assert preference_divergence([1.5, np.nan], [0.5, 2.0]) == pytest.approx(-1.0)


def long_table(rows):
    """Response rows (the tests' readable form) as the per-prompt layout the statistics read: one row per
    prompt, in first-seen order, its responses as a list of structs in the order given."""
    prompts: dict = {}
    for r in rows:
        resp = {"text": r["response"], "sample_idx": r["sample_idx"], "overall": r["reward"],
                "len": r["response_len"]}
        if "label" in r:
            resp["label"] = r["label"]
        aspects = {k[len("reward__"):]: v for k, v in r.items() if k.startswith("reward__")}
        if aspects:
            resp["scores"] = aspects
        prompts.setdefault(r["prompt_id"], []).append(resp)
    return pa.Table.from_pylist([{"prompt_id": p, "prompt": f"q-{p}", "responses": rs} for p, rs in prompts.items()])


def sums_of(t: pa.Table, aspects):
    return sufficient_sums(np.asarray(t.column("response_len").to_pylist(), float),
                           {a: np.asarray(t.column("reward__" + a).to_pylist(), float) for a in aspects})


def test_prompt_stats_by_hand_and_quarantine():
    rows = [
        # prompt a: rewards 1, 3, 2 (sample_idx out of order on purpose)
        {"prompt_id": "a", "sample_idx": 2, "reward": 2.0, "response": "cc", "response_len": 2},
        {"prompt_id": "a", "sample_idx": 0, "reward": 1.0, "response": "a", "response_len": 1},
        {"prompt_id": "a", "sample_idx": 1, "reward": 3.0, "response": "bbb", "response_len": 3},
        # prompt b: one response only -> quarantined
        {"prompt_id": "b", "sample_idx": 0, "reward": 5.0, "response": "x", "response_len": 1},
        # prompt c: all equal
        {"prompt_id": "c", "sample_idx": 0, "reward": 4.0, "response": "p", "response_len": 1},
        {"prompt_id": "c", "sample_idx": 1, "reward": 4.0, "response": "q", "response_len": 5},
    ]
    out = prompt_stats(long_table(rows), StatsParams(tau=1.0)).to_pylist()
    by = {r["prompt_id"]: r for r in out}
    a = by["a"]
    assert a["n"] == 3 and a[QUARANTINE] is None
    assert a["reward_mean"] == pytest.approx(2.0)
    assert a["reward_std"] == pytest.approx(math.sqrt(2 / 3))  # population std
    expected = (2 * (sig(2) - 0.5) ** 2 + 4 * (sig(1) - 0.5) ** 2) / 6
    assert a["pvar"] == pytest.approx(expected, abs=1e-12)
    assert (a["margin"], a["best_idx"], a["worst_idx"]) == (2.0, 1, 0)
    assert (a["best_response"], a["worst_response"]) == ("bbb", "a")
    assert a["len_corr"] == pytest.approx(1.0)
    assert by["b"][QUARANTINE] == "fewer_than_2_responses"
    c = by["c"]
    assert c["pvar"] == 0.0 and c["margin"] == 0.0 and c["best_idx"] == c["worst_idx"] == 0
    assert c["len_corr"] is None  # constant reward
    assert c["pd"] is None  # no aspects


def test_prompt_stats_paired_labels_decide():
    rows = [
        {"prompt_id": "p", "sample_idx": 0, "reward": 6.0, "response": "c", "response_len": 1, "label": "chosen"},
        {"prompt_id": "p", "sample_idx": 1, "reward": 6.0, "response": "r", "response_len": 1, "label": "rejected"},
    ]
    (s,) = prompt_stats(long_table(rows), StatsParams()).to_pylist()
    assert s["paired"] and s["best_idx"] == 0 and s["worst_idx"] == 1 and s["margin"] == 0.0
    # swapped labels: margin = score_chosen - score_rejected, even when negative
    rows[0]["reward"], rows[1]["reward"] = 2.0, 5.0
    (s,) = prompt_stats(long_table(rows), StatsParams()).to_pylist()
    assert s["margin"] == -3.0 and s["best_response"] == "c"


def test_prompt_stats_pd_by_hand_with_z_scores():
    # two aspects over 4 responses of 2 prompts; overall reward chooses the pair
    rows = [
        {"prompt_id": "a", "sample_idx": 0, "reward": 3.0, "response": "w", "response_len": 1,
         "reward__x": 4.0, "reward__y": 1.0},
        {"prompt_id": "a", "sample_idx": 1, "reward": 1.0, "response": "l", "response_len": 1,
         "reward__x": 2.0, "reward__y": 3.0},
        {"prompt_id": "b", "sample_idx": 0, "reward": 0.0, "response": "l", "response_len": 1,
         "reward__x": 0.0, "reward__y": 2.0},
        {"prompt_id": "b", "sample_idx": 1, "reward": 2.0, "response": "w", "response_len": 1,
         "reward__x": 2.0, "reward__y": 2.0},
    ]
    t = long_table(rows)
    norms = norms_from_sums(sums_of(pa.Table.from_pylist(rows), ["x", "y"]), ["x", "y"], "none", 1.0)
    # x: mean 2, population std sqrt(2); y: mean 2, std sqrt(0.5)
    assert norms.aspects["x"].mean == pytest.approx(2.0) and norms.aspects["x"].std == pytest.approx(math.sqrt(2))
    assert norms.aspects["y"].std == pytest.approx(math.sqrt(0.5))
    by = {r["prompt_id"]: r for r in prompt_stats(t, StatsParams(norms=norms)).to_pylist()}
    # prompt a: w = sample 0, l = sample 1. x: (2-4)/sqrt2 = -1.41421; y: (3-1)/sqrt(.5) = 2.82843 -> mean 0.70711
    assert by["a"]["pd"] == pytest.approx(((2 - 4) / math.sqrt(2) + (3 - 1) / math.sqrt(0.5)) / 2)
    # prompt b: w = sample 1, l = sample 0. x: (0-2)/sqrt2; y: 0 -> mean -0.70711
    assert by["b"]["pd"] == pytest.approx((-2 / math.sqrt(2)) / 2)
    # target aspect x: the pair is chosen by x and only y votes
    by = {r["prompt_id"]: r for r in prompt_stats(t, StatsParams(pd_target="x", norms=norms)).to_pylist()}
    assert by["a"]["pd"] == pytest.approx((3 - 1) / math.sqrt(0.5))


def test_length_debias_modes_by_hand():
    lengths = np.array([1.0, 2.0, 3.0, 4.0])
    v = np.array([1.0, 2.0, 3.0, 4.0])  # perfectly length-driven
    t = pa.table({"response_len": lengths.astype(int), "reward__a": v})
    sums = sums_of(t, ["a"])
    # residual: the log-length fit explains nothing exactly linear in len, but the residual has mean 0
    res = norms_from_sums(sums, ["a"], "residual", 1.0)
    z = normalized_aspect(v, lengths, res.aspects["a"], res)
    assert z.mean() == pytest.approx(0.0, abs=1e-12) and z.std() == pytest.approx(1.0)
    # penalty with rho=1: z(r) - z(len) = 0 when the score is the length
    pen = norms_from_sums(sums, ["a"], "penalty", 1.0)
    assert np.allclose(normalized_aspect(v, lengths, pen.aspects["a"], pen), 0.0)
    # none: plain z-scores
    none = PDNorms(mode="none", aspects={"a": AspectNorm(mean=2.5, std=math.sqrt(1.25))})
    assert normalized_aspect(v, lengths, none.aspects["a"], none) == pytest.approx((v - 2.5) / math.sqrt(1.25))


@pytest.mark.parametrize("mode", ["none", "penalty", "residual"])
def test_pd_from_its_parts_equals_pd_with_the_norms_known(mode):
    """The read's pass writes PD's parts (raw aspect differences of the pair) before the norms exist; PD filled
    from them afterwards must be the PD computed with the norms in hand, in every length mode, with an aspect of
    zero spread (z = 0) and a missing aspect score (skipped)."""
    rng = np.random.default_rng(1)
    rows = [{"prompt_id": f"p{i // 3}", "sample_idx": i % 3, "reward": float(rng.normal()),
             "response": "r" * int(n), "response_len": int(n), "reward__x": float(rng.normal(5, 2)),
             "reward__y": float(rng.normal()), "reward__flat": 2.0}
            for i, n in enumerate(rng.integers(1, 300, 24))]
    rows[4]["reward__y"] = None
    t = long_table(rows)
    norms = norms_from_sums(block_sums(t), ["flat", "x", "y"], mode, 0.7)
    direct = prompt_stats(t, StatsParams(norms=norms))
    later = fill_pd(prompt_stats(t, StatsParams(pd_parts=True)), norms)
    assert later.column_names == direct.column_names
    assert later.column("pd").to_pylist() == pytest.approx(direct.column("pd").to_pylist(), abs=1e-12)
    assert later.drop_columns(["pd"]).equals(direct.drop_columns(["pd"]))
    assert np.isfinite(np.asarray(later.column("pd").to_pylist(), float)).all()


def test_residual_removes_length_correlation():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, 400).astype(float)
    v = 0.8 * np.log1p(lengths) + rng.normal(0, 0.3, 400)
    t = pa.table({"response_len": lengths.astype(int), "reward__a": v})
    res = norms_from_sums(sums_of(t, ["a"]), ["a"], "residual", 1.0)
    z = normalized_aspect(v, lengths, res.aspects["a"], res)
    assert abs(pearson(z, np.log1p(lengths))) < 1e-9
    assert abs(pearson(v, np.log1p(lengths))) > 0.5


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=6), min_size=1, max_size=8))
def test_vectorised_stats_equal_per_prompt_math(groups):
    rows = []
    for g, rewards in enumerate(groups):
        for i, r in enumerate(rewards):
            rows.append({"prompt_id": f"p{g}", "sample_idx": i, "reward": r, "response": "r" * (i + 1),
                         "response_len": i + 1})
    out = {r["prompt_id"]: r for r in prompt_stats(long_table(rows), StatsParams(), max_cells=50).to_pylist()}
    for g, rewards in enumerate(groups):
        s = out[f"p{g}"]
        assert s["n"] == len(rewards)
        if len(rewards) < 2:
            assert s[QUARANTINE] == "fewer_than_2_responses"
            continue
        assert s["pvar"] == pytest.approx(pvar(rewards), abs=1e-12)
        b, w = best_worst(rewards)
        assert (s["best_idx"], s["worst_idx"]) == (b, w)
        assert s["margin"] == pytest.approx(max(rewards) - min(rewards))
        assert s["reward_std"] == pytest.approx(float(np.std(rewards)), abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=5), min_size=2, max_size=12),
       st.randoms(use_true_random=False))
def test_row_order_does_not_change_the_statistics(groups, rnd):
    """Prompts in another order, and responses listed out of sample_idx order, give the same statistics
    (best and worst stay first in sample_idx order on ties)."""
    rows = [{"prompt_id": f"p{g:02d}", "sample_idx": i, "reward": r, "response": f"{g}-{i}", "response_len": i + 1}
            for g, rewards in enumerate(groups) for i, r in enumerate(rewards)]
    shuffled = rows[:]
    rnd.shuffle(shuffled)
    in_prompt = sorted(rows, key=lambda r: (r["prompt_id"], -r["sample_idx"]))
    outs = [prompt_stats(long_table(x), StatsParams(), max_cells=40).sort_by("prompt_id").to_pylist()
            for x in (rows, shuffled, in_prompt)]
    for o in outs[1:]:
        for a, b in zip(outs[0], o, strict=True):
            assert a.keys() == b.keys()
            for k in a:
                assert a[k] == pytest.approx(b[k], abs=1e-12) if isinstance(a[k], float) else a[k] == b[k], k
    assert [o["n"] for o in outs[0]] == [len(g) for g in groups]


@given(st.lists(st.integers(1, 9), min_size=1, max_size=60), st.integers(1, 400))
def test_chunk_bounds_cover_every_group_once_under_the_cap(sizes, cap):
    sizes = np.array(sizes)
    bounds = chunk_bounds(sizes, cap)
    assert bounds[0][0] == 0 and bounds[-1][1] == sizes.size
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    for g0, g1 in bounds:
        cells = (g1 - g0) * int(sizes[g0:g1].max()) ** 2
        assert g1 - g0 == 1 or cells <= cap  # a single group may exceed the cap on its own
        if g1 < sizes.size:  # greedy: one more group would pass the cap
            assert (g1 + 1 - g0) * int(sizes[g0:g1 + 1].max()) ** 2 > cap


def test_bad_responses_are_quarantined_one_by_one_and_the_prompt_keeps_the_others():
    def r(text, overall, i, **extra):
        return {"text": text, "sample_idx": i, "overall": overall, **extra}

    t = pa.Table.from_pylist([
        {"prompt_id": "a", "responses": [r("x", 1.0, 0), r("y", float("nan"), 1), r(None, 2.0, 2), r("z", 3.0, 3),
                                         r("w", 1e300, 4), r("v", None, 5), r("u", 2.0, 6, problem="wrong_type_text")]},
        {"prompt_id": "b", "responses": [r("x", 1.0, 0), r("y", -1e308, 1)]},  # left with one: set aside
        {"prompt_id": "c", "responses": [r("x", float("inf"), 0), r("y", float("-inf"), 1)]},  # left with none
        {"prompt_id": "d", "responses": [r("x", 1.0, 0, scores={"h": 1.0}), r("y", 2.0, 1, scores={"h": None}),
                                         r("z", 0.0, 2, scores={"h": float("nan")}), r("s", 0.5, 3, scores={"h": 2e6})]},
    ])
    out = prompt_stats(t, StatsParams()).to_pylist()
    stats = {o["prompt_id"]: o for o in out if o[QUARANTINE_SAMPLE] is None}
    bad = {(o["prompt_id"], o[QUARANTINE_SAMPLE]): o[QUARANTINE] for o in out if o[QUARANTINE_SAMPLE] is not None}
    assert bad == {("a", 1): "non_finite_reward", ("a", 2): "missing_response", ("a", 4): "reward_out_of_range",
                   ("a", 5): "missing_reward", ("a", 6): "wrong_type_text", ("b", 1): "reward_out_of_range",
                   ("c", 0): "non_finite_reward", ("c", 1): "non_finite_reward",
                   ("d", 2): "non_finite_aspect_score", ("d", 3): "aspect_score_out_of_range"}
    a = stats["a"]
    assert (a["n"], a["margin"], a["best_idx"], a["worst_idx"], a["best_response"]) == (2, 2.0, 3, 0, "z")
    assert a[QUARANTINE] is None and stats["b"][QUARANTINE] == "fewer_than_2_responses" and stats["b"]["n"] == 1
    assert "c" not in stats  # every response quarantined: the responses' rows account for the prompt
    assert stats["d"]["n"] == 2 and stats["d"]["margin"] == 1.0  # a null aspect is allowed
    # counted in responses: 7 + 2 + 2 + 4 in = 2 + 1 + 0 + 2 out + 10 quarantined (b's one counts once)
    assert sum(s["n"] for s in stats.values() if s[QUARANTINE] is None) + len(bad) + 1 == 15


def test_block_sums_skip_bad_responses_and_count_all():
    t = pa.Table.from_pylist([{"responses": [
        {"overall": 1.0, "len": 3, "scores": {"h": 1.0}}, {"overall": float("nan"), "len": 5, "scores": {"h": 9.0}},
        {"overall": 2.0, "len": 7, "scores": {"h": 3.0}}, {"overall": 2.0, "len": 1, "problem": "x", "scores": {"h": 5.0}},
    ]}])
    s = block_sums(t, ["h"])
    assert s["responses"] == 4 and s["h:n"] == 2 and s["h:v"] == 4.0 and s["len:v"] == 10.0
