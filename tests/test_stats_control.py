"""Many methods against one control: Holm, Wilcoxon over settings and the Bayesian signed-rank
test, on hand-made score tables whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mmbalance.stats import StatisticsError
from mmbalance.stats_control import (
    bayesian_signed_rank,
    bayesian_vs_control,
    compare_with_control,
    control_markdown,
    holm,
    per_setting_vs_control,
    signed_rank_sums,
    wilcoxon_vs_control,
)

CONTROL = "Concat + uni CE"
SETTINGS = [f"d{i}" for i in range(8)]
BASE = np.array([71.0, 84.5, 92.0, 60.25, 77.0, 88.0, 55.5, 97.0])
STEPS = np.array([1.5, 2.0, 3.0, 2.5, 4.0, 1.25, 2.75, 3.5])  # distinct, all > the 1-point ROPE


def table(**rows: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(rows, index=SETTINGS).T


@pytest.fixture
def scores() -> pd.DataFrame:
    """Control; 'Up' better everywhere by 1.25-4 points; 'Same' identical; 'Down' worse
    everywhere by the same steps; 'Tiny' better everywhere by 0.3 points (inside the ROPE)."""
    return table(**{CONTROL: BASE, "Up": BASE + STEPS, "Same": BASE.copy(), "Down": BASE - STEPS,
                    "Tiny": BASE + 0.3})


def test_holm_by_hand():
    """Sorted p (0.005, 0.01, 0.03, 0.04) x (4, 3, 2, 1) = (0.02, 0.03, 0.06, 0.04); the running
    maximum lifts the last to 0.06. Wrong variants caught: no running maximum (0.04 for the last),
    multiplying by m - i + 1 or by m for all (Bonferroni), or returning them in sorted order."""
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    # capped at 1; NaN is no test: out of the family (m = 2 here) and stays NaN
    np.testing.assert_allclose(holm([0.6, np.nan, 0.01]), [0.6, np.nan, 0.02])
    np.testing.assert_allclose(holm([0.7, 0.8]), [1.0, 1.0])
    assert holm([]).shape == (0,)
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(3)
    p = rng.uniform(0, 0.2, 12)
    np.testing.assert_allclose(holm(p), multipletests(p, method="holm")[1])
    with pytest.raises(StatisticsError, match=r"\[0, 1\]"):
        holm([0.5, 1.5])


def test_wilcoxon_detects_a_method_better_on_every_setting(scores):
    """8 settings all in one direction: exact two-sided p = 2 / 2**8; Holm over the four tested
    methods (Up, Down, Tiny at 2/256, Same at p = 1) multiplies the three smallest by 4, 3, 2 and
    takes the running max: 4 * 2/256 for each. Wrong variants caught: control and method swapped
    (Up 'worse'), Holm skipped (p_holm = p)."""
    w = wilcoxon_vs_control(scores, CONTROL).set_index("method")
    p = 2 / 2**8
    assert w.loc["Up", "p"] == pytest.approx(p) and w.loc["Down", "p"] == pytest.approx(p)
    assert w.loc["Up", "p_holm"] == pytest.approx(4 * p)
    assert w.loc["Same", "p"] == 1.0 and w.loc["Same", "p_holm"] == 1.0
    assert w.loc["Up", "verdict"] == "better" and w.loc["Down", "verdict"] == "worse"
    assert w.loc["Tiny", "verdict"] == "better"  # consistent, however small: Wilcoxon has no ROPE
    assert w.loc["Same", "verdict"] == "identical"
    assert (w.loc["Up", "wins"], w.loc["Up", "ties"], w.loc["Up", "losses"]) == (8, 0, 0)
    assert w.loc["Up", "mean_diff"] == pytest.approx(STEPS.mean())
    assert w.loc["Down", "median_diff"] == pytest.approx(-np.median(STEPS))
    assert list(w.index) == ["Up", "Same", "Down", "Tiny"]  # the scores' order, control left out


def test_wilcoxon_not_significant_when_mixed():
    """Alternating +-2 points: no direction, p = 1 after Holm; rank sums equal."""
    mixed = BASE + np.array([2.0, -2.0] * 4)
    w = wilcoxon_vs_control(table(**{CONTROL: BASE, "Mixed": mixed})).set_index("method")
    assert w.loc["Mixed", "verdict"] == "n.s." and w.loc["Mixed", "p"] > 0.5
    assert signed_rank_sums([2.0, -2.0] * 4) == (18.0, 18.0)
    # ranks of |d| with the zero dropped and ties averaged: |1|->1, |-3|->2.5, |3|->2.5
    assert signed_rank_sums([1.0, 0.0, -3.0, 3.0]) == (3.5, 2.5)


def test_bayes_better_worse_and_equivalent(scores):
    """Up/Down by 1.25-4 points everywhere: P(better) / P(worse) near 1. Same: every Walsh
    average is 0, inside the ROPE, so P(equivalent) = 1 exactly. Tiny (+0.3 everywhere) is
    equivalent within the 1-point ROPE although Wilcoxon calls it better. Wrong variants caught:
    baycomp's x and y swapped (better <-> worse), the ROPE given as a fraction (0.01: Tiny
    'better'), per-seed values instead of per-setting means (other n)."""
    b = bayesian_vs_control(scores, CONTROL, rope=1.0, nsamples=5_000).set_index("method")
    assert b.loc["Up", "p_better"] > 0.95 and b.loc["Up", "decision"] == "better"
    assert b.loc["Down", "p_worse"] > 0.95 and b.loc["Down", "decision"] == "worse"
    assert b.loc["Same", "p_equivalent"] == 1.0 and b.loc["Same", "decision"] == "equivalent"
    assert b.loc["Tiny", "p_equivalent"] > 0.95 and b.loc["Tiny", "decision"] == "equivalent"
    for m in b.index:
        assert b.loc[m, "p_better"] + b.loc[m, "p_equivalent"] + b.loc[m, "p_worse"] == pytest.approx(1.0)
    assert (b["n"] == 8).all()
    # seeded: the same call gives the same probabilities
    again = bayesian_vs_control(scores, CONTROL, rope=1.0, nsamples=5_000).set_index("method")
    pd.testing.assert_frame_equal(b, again)


def test_bayes_one_difference_by_hand():
    """One setting, difference d = 1.5, ROPE 1, prior weight 0.5 at 0: Dirichlet weights
    (w0, w1) ~ Dir(0.5, 1). Walsh averages: (0+0)/2 = 0 and (0+d)/2 = 0.75 inside the ROPE,
    d = 1.5 above it, so P(above) = w1**2 and 'above' wins iff w1 > 1/sqrt(2). w1 ~ Beta(1, 0.5),
    P(w1 > t) = (1 - t)**0.5 = 0.5412 for t = 1/sqrt(2); 'below' never wins."""
    better, equal, worse = bayesian_signed_rank([81.5], [80.0], rope=1.0, nsamples=20_000, seed=1)
    expected = (1 - 1 / math.sqrt(2)) ** 0.5
    assert better == pytest.approx(expected, abs=0.015)
    assert equal == pytest.approx(1 - expected, abs=0.015) and worse == 0.0
    # the mirror image: the method 1.5 points below the control
    b2, e2, w2 = bayesian_signed_rank([78.5], [80.0], rope=1.0, nsamples=20_000, seed=1)
    assert (b2, e2, w2) == (worse, equal, better)


def test_bayes_refuses_no_rope_and_needs_the_control(scores):
    with pytest.raises(StatisticsError, match="rope > 0"):
        bayesian_signed_rank([1.0, 2.0], [1.0, 2.0], rope=0.0)
    with pytest.raises(StatisticsError, match="control method 'Concat'"):
        wilcoxon_vs_control(scores, "Concat")
    with pytest.raises(StatisticsError, match="control method"):
        bayesian_vs_control(scores, "Concat")


def test_methods_missing_settings_compare_on_the_common_ones(scores):
    """A two-modality method is N/A on the multi-view settings: compared on the rest (n = 5),
    and a method with one common setting gets no test (n < 2)."""
    s = scores.copy()
    s.loc["Up", ["d5", "d6", "d7"]] = np.nan
    s.loc["Down", SETTINGS[1:]] = np.nan
    w = wilcoxon_vs_control(s).set_index("method")
    assert w.loc["Up", "n"] == 5 and w.loc["Up", "p"] == pytest.approx(2 / 2**5)
    assert w.loc["Down", "n"] == 1 and pd.isna(w.loc["Down", "verdict"]) and math.isnan(w.loc["Down", "p"])
    b = bayesian_vs_control(s, nsamples=5_000).set_index("method")
    assert pd.isna(b.loc["Down", "decision"]) and b.loc["Up", "n"] == 5
    text = control_markdown(compare_with_control(long_form(s).dropna(), nsamples=2_000))
    assert "nan" not in text.lower() and "| Down " in text and "| 1 " in text


def test_lower_is_better_flips_the_direction(scores):
    w = wilcoxon_vs_control(scores, higher_is_better=False).set_index("method")
    b = bayesian_vs_control(scores, higher_is_better=False, nsamples=5_000).set_index("method")
    assert w.loc["Up", "verdict"] == "worse" and w.loc["Down", "verdict"] == "better"
    assert b.loc["Up", "decision"] == "worse" and b.loc["Down", "decision"] == "better"


def long_form(scores: pd.DataFrame, seeds=(0, 1, 2)) -> pd.DataFrame:
    """One run per (method, setting, seed): the setting's score +- a seed offset that cancels
    in the mean (so the per-setting means are the table's)."""
    offsets = {0: -0.5, 1: 0.0, 2: 0.5}
    rows = [{"method": m, "dataset": d, "seed": s, "best_val.fused.acc": scores.loc[m, d] + offsets[s]}
            for m in scores.index for d in scores.columns for s in seeds]
    return pd.DataFrame(rows)


def test_compare_with_control_from_the_long_form(scores):
    """Seeds are averaged per setting before the across-settings tests; the per-setting paired
    differences are the hand steps (the seed offsets cancel in each paired difference)."""
    df = long_form(scores)
    comp = compare_with_control(df, nsamples=5_000)
    pd.testing.assert_frame_equal(comp.scores.loc[scores.index, SETTINGS], scores.astype(float),
                                  check_names=False)
    per = comp.per_setting.set_index(["method", "setting"])
    for d, step in zip(SETTINGS, STEPS, strict=True):
        assert per.loc[("Up", d), "diff"] == pytest.approx(step)
        assert per.loc[("Up", d), "verdict"] == "better"  # equal differences on every seed: p = 0
    assert per.loc[("Same", "d0"), "verdict"] == "n.s."
    assert comp.wilcoxon.set_index("method").loc["Up", "verdict"] == "better"
    assert comp.bayes.set_index("method").loc["Tiny", "decision"] == "equivalent"
    assert comp.note is None
    text = control_markdown(comp)
    assert "±1 points" in text and "Holm" in text and "| Up " in text
    assert per_setting_vs_control(df, "best_val.fused.acc").equals(comp.per_setting)


def test_few_settings_are_noted_not_refused(scores):
    comp = compare_with_control(long_form(scores[SETTINGS[:3]]), nsamples=2_000)
    assert "3 settings" in comp.note
    assert comp.wilcoxon.set_index("method").loc["Up", "verdict"] == "n.s."  # p = 0.25 at best
