"""Adaptive sampling rules against hand-computed values (operators/adaptive.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from operators.adaptive import (
    AdaptiveCfg,
    check_cfg,
    decide,
    first_draws,
    jackknife_se,
    next_draws,
    padded,
    pair_kernel,
    pooled_se,
    pvar_estimates,
    selection_cut,
)
from operators.stats import pvar

NAN = float("nan")


def h(d: float, tau: float = 1.0) -> float:
    """The PVar kernel by hand: (sigmoid(d / tau) - 1/2)^2."""
    return (1.0 / (1.0 + math.exp(-d / tau)) - 0.5) ** 2


# --- the U-statistic and its jackknife ---------------------------------------------------------------------


def test_pair_kernel_by_hand():
    H = pair_kernel(np.array([[1.0, 0.0, NAN]]), tau=1.0)
    assert H.shape == (1, 3, 3)
    assert H[0, 0, 1] == pytest.approx(h(1.0), abs=1e-15)
    assert H[0, 0, 1] == pytest.approx(0.053388, abs=1e-6)  # sigmoid(1) = 0.7310586
    assert H[0, 1, 0] == pytest.approx(H[0, 0, 1], abs=1e-15)
    assert H[0, 0, 0] == 0.0 and H[0, 1, 1] == 0.0
    assert np.isnan(H[0, 0, 2]) and np.isnan(H[0, 2, 2])


def test_jackknife_three_rewards_by_hand():
    # r = (2, 0, 0): h12 = h13 = a, h23 = 0; U = 2a/3. Leave-one-out: U_-1 = 0, U_-2 = U_-3 = a, mean 2a/3.
    # var = (2/3) * ((2a/3)^2 + 2 (a/3)^2) = 4a^2/9, se = 2a/3.
    a = h(2.0)
    se = jackknife_se(np.array([[2.0, 0.0, 0.0], [0.0, NAN, 2.0]]), tau=1.0)
    assert se[0] == pytest.approx(2 * a / 3, abs=1e-12)
    assert se[1] != se[1]  # two rewards: no leave-one-out PVar, NaN


def test_jackknife_four_rewards_by_hand():
    # r = (1, 0, 0, 0), b = h(1): U = 3b/6 = b/2. U_-1 = 0 (only zeros), U_-i = 2b/3 for the three zeros.
    # var = (3/4) * ((b/2)^2 + 3 (2b/3 - b/2)^2) = (3/4) * (b^2/4 + b^2/12) = b^2/4, se = b/2.
    b = h(1.0)
    R = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, NAN, 1.0, 0.0], [4.0, 0.0, 0.0, NAN]])
    se = jackknife_se(R, tau=1.0)
    assert se[0] == pytest.approx(b / 2, abs=1e-12)
    assert se[1] == pytest.approx(2 * b / 3, abs=1e-12)  # (0, 1, 0): as (2, 0, 0) above, se = 2 h(1) / 3
    # tau rescales: (4, 0, 0) at tau 1 is (2, 0, 0) at tau 0.5
    assert se[2] == pytest.approx(jackknife_se(np.array([[2.0, 0.0, 0.0]]), tau=0.5)[0], abs=1e-12)


def test_jackknife_matches_leave_one_out_by_brute_force():
    rng = np.random.default_rng(3)
    R = rng.normal(size=(7, 9)) * 2
    R[2, 5:] = NAN
    R[4, [0, 3]] = NAN
    se = jackknife_se(R, tau=0.7, max_cells=100)  # several chunks
    for g in range(R.shape[0]):
        r = R[g][np.isfinite(R[g])]
        m = r.size
        loo = np.array([pvar(np.delete(r, i), tau=0.7) for i in range(m)])
        assert se[g] == pytest.approx(math.sqrt((m - 1) / m * ((loo - loo.mean()) ** 2).sum()), rel=1e-10)


def test_estimates_are_the_statistics_pvar():
    R = padded([[3.0, 1.0, None, 2.0], [5.0], [1.0, 1.0, 4.0]])
    est = pvar_estimates(R, tau=2.0)
    assert est[0] == pytest.approx(pvar([3.0, 1.0, 2.0], tau=2.0), abs=1e-15)
    assert np.isnan(est[1])
    assert est[2] == pytest.approx(pvar([1.0, 1.0, 4.0], tau=2.0), abs=1e-15)
    # in chunks of 2 rows (6 pairs of 4 rewards each, 12 cells): the same numbers
    chunked = pvar_estimates(np.vstack([R, R[::-1]]), tau=2.0, max_cells=12)
    assert np.array_equal(chunked, np.concatenate([est, est[::-1]]), equal_nan=True)


# --- cut and pooling ---------------------------------------------------------------------------------------


def test_selection_cut_is_pvar_tops_last_selected():
    est = np.array([0.1, 0.5, 0.3, NAN, 0.2])
    assert selection_cut(est, 0.5) == 0.3  # 4 estimates, round(2.0) = 2 selected: the second largest
    assert selection_cut(est, 0.1) == 0.5  # round(0.4) = 0, at least 1
    assert selection_cut(est, 0.65) == 0.2  # round-half-up of 2.6 = 3: the third largest
    assert np.isnan(selection_cut(np.array([NAN, NAN]), 0.1))


def test_pooled_se_by_sample_count():
    se = np.array([0.1, 0.3, NAN, 0.2])
    m = np.array([4, 4, 4, 8])
    out = pooled_se(se, m)
    assert out[:3] == pytest.approx([math.sqrt(0.05)] * 3, abs=1e-15)  # sqrt((0.01 + 0.09) / 2)
    assert out[3] == pytest.approx(0.2, abs=1e-15)


# --- rules through decide ----------------------------------------------------------------------------------

# Four prompts with hand-known PVar: D (4,0,0) = 2 h(4)/3, A (2,0,0) = 2 h(2)/3, B (1,0,0,0) = h(1)/2,
# C (0,0,0) = 0. With fraction 0.5, two are selected: the cut is A's estimate.
ROUND = [[4.0, 0.0, 0.0], [2.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


def test_round_fixture_by_hand():
    est = pvar_estimates(padded(ROUND), 1.0)
    assert est == pytest.approx([2 * h(4.0) / 3, 2 * h(2.0) / 3, h(1.0) / 2, 0.0], abs=1e-15)
    assert selection_cut(est, 0.5) == pytest.approx(2 * h(2.0) / 3, abs=1e-15)


def test_ucb_prompt_own_jackknife():
    # cap 6. A is the cut and continues; B: h/2 + z (h/2) sqrt(1 - 4/6) = 0.0267 + 0.0154 z, below
    # A's 0.0967 for z = 1 (stops) and above it for z = 5 (0.1038). C: se 0, never reaches the cut.
    cfg = AdaptiveCfg(rule="ucb_prompt", z=1.0, fraction=0.5)
    go = decide(ROUND, [3, 3, 4, 3], [True] * 4, cfg, k_max=6)
    assert go.tolist() == [True, True, False, False]
    b_bound = h(1.0) / 2 * (1 + 5.0 * math.sqrt(1 - 4 / 6))
    assert b_bound > 2 * h(2.0) / 3
    go = decide(ROUND, [3, 3, 4, 3], [True] * 4, AdaptiveCfg(rule="ucb_prompt", z=5.0, fraction=0.5), k_max=6)
    assert go.tolist() == [True, True, True, False]


def test_ucb_pooled_se_and_resume():
    # m = 3 group (D, A, C): pooled se = sqrt(((2h(4)/3)^2 + (2h(2)/3)^2 + 0) / 3) ~ 0.1049, times
    # sqrt(1 - 3/6). C's bound = z * 0.0742: below the cut 0.0967 at z = 1, above it at z = 2.
    pooled = math.sqrt(((2 * h(4.0) / 3) ** 2 + (2 * h(2.0) / 3) ** 2) / 3) * math.sqrt(0.5)
    cut = 2 * h(2.0) / 3
    assert 1.0 * pooled < cut < 2.0 * pooled
    drawn = [3, 3, 4, 3]
    assert decide(ROUND, drawn, [True] * 4, AdaptiveCfg(rule="ucb", z=1.0, fraction=0.5), 6).tolist() == \
        [True, True, False, False]
    # C stopped in an earlier round: at z = 2 its bound reaches the cut, so with resume it comes back.
    inactive_c = [True, True, True, False]
    assert decide(ROUND, drawn, inactive_c, AdaptiveCfg(rule="ucb", z=2.0, fraction=0.5, resume=False),
                  6).tolist() == [True, True, False, False]
    assert decide(ROUND, drawn, inactive_c, AdaptiveCfg(rule="ucb", z=2.0, fraction=0.5, resume=True),
                  6).tolist() == [True, True, False, True]
    # at the cap nothing continues, whatever the bound
    assert not decide(ROUND, [6, 6, 6, 6], [True] * 4, AdaptiveCfg(rule="ucb", z=9.0, fraction=0.5), 6).any()


def test_ucb_z_in_stops_the_prompts_sure_to_make_the_cut():
    # As above: the m = 3 prompts' pooled se times sqrt(1 - 3/6) is s ~ 0.0745 and the cut is A's 0.0967.
    # D's lower bound 2 h(4)/3 - z_in * s (0.1549 - 0.0745 z_in) is at or above the cut for z_in up to
    # (0.1549 - 0.0967) / 0.0745 ~ 0.781: D stops at z_in 0.5 and draws on at z_in 1. A is the cut
    # itself, so only z_in 0 stops it. E (one reward) has no estimate and continues whatever z_in.
    s = math.sqrt(((2 * h(4.0) / 3) ** 2 + (2 * h(2.0) / 3) ** 2) / 3) * math.sqrt(0.5)
    cut = 2 * h(2.0) / 3
    assert s == pytest.approx(0.074539, abs=1e-6) and cut == pytest.approx(0.096671, abs=1e-6)
    assert 0.5 < (2 * h(4.0) / 3 - cut) / s < 1.0
    rewards, drawn = [*ROUND, [7.0, None]], [3, 3, 4, 3, 2]

    def go(active=(True,) * 5, **kw):
        return decide(rewards, drawn, list(active), AdaptiveCfg(rule="ucb", z=1.0, fraction=0.5, **kw), 6).tolist()

    assert go() == [True, True, False, False, True]  # z_in null: as ucb always did
    assert go(z_in=1.0) == [True, True, False, False, True]
    assert go(z_in=0.5) == [False, True, False, False, True]
    assert go(z_in=0.0) == [False, False, False, False, True]
    # D stopped sure in an earlier round. With resume it is looked at again: it stays stopped while its
    # lower bound holds (z_in 0.5) and comes back when it does not (z_in 1); without resume it stays out.
    d_out = (False, True, True, True, True)
    assert go(d_out, z_in=0.5, resume=True) == [False, True, False, False, True]
    assert go(d_out, z_in=1.0, resume=True) == [True, True, False, False, True]
    assert go(d_out, z_in=1.0, resume=False) == [False, True, False, False, True]


def test_rank_keeps_the_top_of_those_in_play():
    # in play: D, A, B, and E (one reward: no estimate, continues); C is out. keep 0.5 of the 3 with an
    # estimate = round(1.5) = 2: D and A.
    rewards = [*ROUND, [7.0, None]]
    cfg = AdaptiveCfg(rule="rank", keep=0.5)
    go = decide(rewards, [3, 3, 4, 3, 2], [True, True, True, False, True], cfg, k_max=8)
    assert go.tolist() == [True, True, False, False, True]
    # keep 0.7 of 3 = round(2.1) = 2 as well; keep 1.0 continues all in play
    assert decide(rewards, [3, 3, 4, 3, 2], [True] * 5, AdaptiveCfg(rule="rank", keep=1.0), 8).tolist() == \
        [True] * 5


def test_rank_ties_by_position():
    R = [[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]
    go = decide(R, [2] * 4, [True] * 4, AdaptiveCfg(rule="rank", keep=0.5), 4)
    assert go.tolist() == [True, True, False, False]


def test_decide_lists_and_matrix_agree_and_counts_checked():
    cfg = AdaptiveCfg(rule="ucb", fraction=0.5)
    assert decide(ROUND, [3, 3, 4, 3], [True] * 4, cfg, 6).tolist() == \
        decide(padded(ROUND), [3, 3, 4, 3], [True] * 4, cfg, 6).tolist()
    with pytest.raises(ValueError, match="k_max"):
        decide(ROUND, [3, 3, 4, 3], [True] * 4, cfg)
    with pytest.raises(ValueError, match="differ"):
        decide(ROUND, [3, 3, 4], [True] * 4, cfg, 6)


def test_decide_takes_a_rule_in_place_of_the_registry():
    # a rule that continues everything: every prompt below its cap continues, whatever cfg.rule says
    everyone = decide(ROUND, [3, 3, 4, 6], [True] * 4, AdaptiveCfg(rule="rank", keep=0.1), 6,
                      rule=lambda state, cfg: np.ones(state.estimates.size, dtype=bool))
    assert everyone.tolist() == [True, True, True, False]


def test_draws_per_round():
    cfg = AdaptiveCfg(k0=4, step=3)
    assert first_draws(np.array([16, 3, 4]), cfg).tolist() == [4, 3, 4]
    go = np.array([True, True, False, True])
    assert next_draws([4, 14, 4, 16], go, cfg, 16).tolist() == [3, 2, 0, 0]


def test_check_cfg_names_the_key():
    check_cfg(AdaptiveCfg())
    check_cfg(AdaptiveCfg(z_in=2.0))
    check_cfg(AdaptiveCfg(rule="ucb_prompt", z_in=0.0))
    for bad, key in ((AdaptiveCfg(rule="bandit"), "adaptive.rule"), (AdaptiveCfg(k0=1), "adaptive.k0"),
                     (AdaptiveCfg(step=0), "adaptive.step"), (AdaptiveCfg(k0=8, k_max=4), "adaptive.k_max"),
                     (AdaptiveCfg(keep=0.0), "adaptive.keep"), (AdaptiveCfg(fraction=1.5), "adaptive.fraction"),
                     (AdaptiveCfg(tau=0.0), "adaptive.tau"), (AdaptiveCfg(z_in=-0.5), "adaptive.z_in"),
                     (AdaptiveCfg(z_in=math.inf), "adaptive.z_in"),
                     (AdaptiveCfg(rule="rank", z_in=2.0), "adaptive.z_in")):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            check_cfg(bad)
