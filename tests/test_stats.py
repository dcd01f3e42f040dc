"""Statistics across settings and paired tests over seeds, against hand-made score tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from mmbalance import stats
from mmbalance.stats import (
    StatisticsError,
    compare_methods,
    nemenyi_cd,
    paired_p,
    paired_vs_reference,
    rank_table,
    score_table,
    statistics_section,
)

# methods x settings; higher is better. Hand ranks per setting (1 = best, ties averaged):
#        d1  d2  d3   d4
#   A     1   1   2    1.5
#   B     2   3   1    1.5
#   C     3   2   3    3
SCORES = pd.DataFrame(
    {"d1": [90.0, 85.0, 80.0], "d2": [70.0, 60.0, 65.0], "d3": [50.0, 55.0, 40.0], "d4": [88.0, 88.0, 87.0]},
    index=["A", "B", "C"],
)
HAND_RANKS = pd.DataFrame(
    {"d1": [1.0, 2.0, 3.0], "d2": [1.0, 3.0, 2.0], "d3": [2.0, 1.0, 3.0], "d4": [1.5, 1.5, 3.0]}, index=["A", "B", "C"]
)


def test_ranks_by_hand_with_ties():
    pd.testing.assert_frame_equal(rank_table(SCORES), HAND_RANKS)
    comp = compare_methods(SCORES)
    assert comp.average_ranks.to_dict() == pytest.approx({"A": 5.5 / 4, "B": 7.5 / 4, "C": 11 / 4})
    assert list(comp.average_ranks.index) == ["A", "B", "C"]  # best first
    # lower is better flips the ranks: rank k + 1 - r
    pd.testing.assert_frame_equal(rank_table(SCORES, higher_is_better=False), 4.0 - HAND_RANKS)


def test_friedman_matches_scipy_and_the_textbook_formula():
    comp = compare_methods(SCORES)
    ref = sps.friedmanchisquare(SCORES.loc["A"], SCORES.loc["B"], SCORES.loc["C"])
    assert comp.friedman_p == pytest.approx(ref.pvalue)
    assert comp.friedman_statistic == pytest.approx(ref.statistic)
    # without ties, Friedman's statistic is 12N/(k(k+1)) * (sum R_j^2 - k(k+1)^2/4) (Demšar Eq. 1)
    no_ties = SCORES.drop(columns="d4")
    k, n = 3, 3
    r = HAND_RANKS.drop(columns="d4").mean(axis=1)
    chi2 = 12 * n / (k * (k + 1)) * ((r**2).sum() - k * (k + 1) ** 2 / 4)
    comp = compare_methods(no_ties)
    assert comp.friedman_statistic == pytest.approx(chi2)
    assert comp.friedman_p == pytest.approx(sps.chi2.sf(chi2, k - 1))


def test_nemenyi_cd_against_demsar_table():
    # Demšar (2006) Table 5(a): q_0.05 for k = 2..10, and the worked example: k=4, N=14 -> CD 1.25
    q = {2: 1.960, 3: 2.343, 4: 2.569, 5: 2.728, 6: 2.850, 7: 2.949, 8: 3.031, 9: 3.102, 10: 3.164}
    for k, qk in q.items():
        assert nemenyi_cd(k, 7) / math.sqrt(k * (k + 1) / 42) == pytest.approx(qk, abs=1.5e-3)
    assert nemenyi_cd(4, 14) == pytest.approx(1.25, abs=5e-3)
    assert nemenyi_cd(4, 14, alpha=0.10) < nemenyi_cd(4, 14)  # a looser level, a smaller CD
    with pytest.raises(StatisticsError, match="k >= 2"):
        nemenyi_cd(1, 5)


def test_cd_agrees_with_scikit_posthocs_nemenyi_p_values():
    rng = np.random.default_rng(3)
    scores = pd.DataFrame(rng.normal(size=(6, 25)) + np.linspace(0, 2, 6)[:, None], index=list("abcdef"))
    comp = compare_methods(scores)
    assert comp.significant and comp.cd == pytest.approx(nemenyi_cd(6, 25))
    decided = 0
    for i in comp.average_ranks.index:
        for j in comp.average_ranks.index:
            if i < j:
                far = abs(comp.average_ranks[i] - comp.average_ranks[j]) > comp.cd
                assert far == (comp.nemenyi_p.loc[i, j] < 0.05), (i, j)
                decided += far
    assert decided >= 1  # the linear trend makes at least one pair significant


def test_too_few_methods_or_settings_give_notes_not_crashes():
    two = compare_methods(SCORES.loc[["A", "B"]])
    assert two.friedman_p is None and two.cd is None and "at least 3 methods" in two.note
    assert two.average_ranks.to_dict() == pytest.approx({"A": 5.5 / 4, "B": 6.5 / 4})  # (1+1+2+1.5), (2+2+1+1.5)
    one = compare_methods(SCORES[["d1"]])
    assert one.friedman_p is None and "at least 2 settings (here 1)" in one.note
    assert one.average_ranks.to_dict() == {"A": 1.0, "B": 2.0, "C": 3.0}
    empty = compare_methods(SCORES.iloc[:0])
    assert empty.note and empty.n_methods == 0
    assert "no ranks" in stats.ranks_markdown(empty, "best_val")


def test_methods_missing_a_setting_are_excluded_and_named():
    scores = SCORES.copy()
    scores.loc["U"] = [99.0, np.nan, 99.0, 99.0]
    comp = compare_methods(scores)
    assert comp.excluded == ["U"] and list(comp.scores.index) == ["A", "B", "C"]
    assert "U" in comp.note
    assert comp.friedman_p == pytest.approx(compare_methods(SCORES).friedman_p)


def test_all_ties_is_a_note():
    tied = pd.DataFrame(80.0, index=list("abc"), columns=["d1", "d2", "d3"])
    comp = compare_methods(tied)
    assert math.isnan(comp.friedman_p) and not comp.significant and "ties" in comp.note


def _long(rows):
    return pd.DataFrame(rows, columns=["method", "dataset", "seed", "acc"])


def _seeded(reference_seed_acc, shift, noise=0.0, method="M", dataset="d1", seed_order=None, rng=None):
    rows = []
    for seed, acc in reference_seed_acc.items():
        jitter = rng.normal(0, noise) if rng is not None else 0.0
        rows.append((method, dataset, seed, acc + shift + jitter))
    return rows if seed_order is None else [rows[i] for i in seed_order]


def test_paired_test_better_on_every_seed_is_significant_and_matched_by_seed():
    rng = np.random.default_rng(0)
    ref = {s: 70.0 + 5.0 * rng.normal() for s in range(5)}  # seeds vary a lot...
    rows = [("Concat + uni CE", "d1", s, a) for s, a in ref.items()]
    rows += _seeded(ref, +2.0, noise=0.3, method="Good", rng=rng, seed_order=[4, 2, 0, 1, 3])  # ...shuffled
    rows += _seeded(ref, -2.0, noise=0.3, method="Bad", rng=rng)
    rows += _seeded(ref, 0.0, noise=2.0, method="Same", rng=rng)
    rows += [("Good", "d1", 99, 100.0)]  # a seed the reference lacks: not paired
    df = _long(rows)
    res = paired_vs_reference(df, "acc").set_index("method")
    assert res.loc["Good", "verdict"] == "better" and res.loc["Good", "p"] < 0.05 and res.loc["Good", "n"] == 5
    assert res.loc["Bad", "verdict"] == "worse" and res.loc["Bad", "p"] < 0.05
    assert res.loc["Same", "verdict"] == "n.s."
    assert res.loc["Good", "test"] == "ttest"
    # the p-value is scipy's paired t-test on seed-matched pairs (not on the unsorted rows)
    good = df[(df.method == "Good") & (df.seed != 99)].set_index("seed")["acc"].sort_index()
    expect = sps.ttest_rel(good.to_numpy(), np.array([ref[s] for s in good.index])).pvalue
    assert res.loc["Good", "p"] == pytest.approx(expect)
    assert res.loc["Good", "diff"] == pytest.approx((good - pd.Series(ref)).mean())
    # unpaired, the seed-to-seed spread (std 5) would swamp the 2-point shift
    assert sps.ttest_ind(good.to_numpy(), list(ref.values())).pvalue > 0.05
    # lower-is-better flips the verdicts
    flipped = paired_vs_reference(df, "acc", higher_is_better=False).set_index("method")
    assert flipped.loc["Good", "verdict"] == "worse" and flipped.loc["Bad", "verdict"] == "better"


def test_wilcoxon_is_chosen_with_enough_seeds():
    ref = {s: 60.0 + (s % 4) for s in range(12)}
    rows = [("R", "d1", s, a) for s, a in ref.items()] + _seeded(ref, 0.0, method="M")
    rows = [r if r[0] == "R" else (r[0], r[1], r[2], r[3] + 1.0 + 0.01 * r[2]) for r in rows]
    res = paired_vs_reference(_long(rows), "acc", reference="R")
    assert res["test"].iloc[0] == "wilcoxon" and res["verdict"].iloc[0] == "better"
    m = np.array([ref[s] + 1.0 + 0.01 * s for s in range(12)])
    assert res["p"].iloc[0] == pytest.approx(sps.wilcoxon(m, list(ref.values())).pvalue)
    forced = paired_vs_reference(_long(rows), "acc", reference="R", test="ttest")
    assert forced["test"].iloc[0] == "ttest"
    assert stats.choose_test(9) == "ttest" and stats.choose_test(10) == "wilcoxon"
    with pytest.raises(StatisticsError, match="Unknown paired test"):
        stats.choose_test(3, "sign")  # type: ignore[arg-type]


def test_paired_edge_cases():
    assert math.isnan(paired_p([1.0], [0.0]))  # one pair: no test
    assert math.isnan(paired_p([1.0, 2.0], [1.0, 2.0]))  # no difference at all
    assert paired_p([2.0, 3.0, 4.0], [1.0, 2.0, 3.0]) == 0.0  # the same gain on every seed
    with pytest.raises(StatisticsError, match="same length"):
        paired_p([1.0, 2.0], [1.0])
    rows = [("R", "d1", 0, 50.0), ("M", "d1", 0, 60.0), ("M", "d2", 0, 60.0), ("M", "d1", 1, 61.0)]
    res = paired_vs_reference(_long(rows), "acc", reference="R")
    assert len(res) == 1 and res["n"].iloc[0] == 1 and res["verdict"].iloc[0] is None  # d2: no reference
    assert paired_vs_reference(_long(rows), "acc", reference="nobody").empty
    with pytest.raises(StatisticsError, match="lacks column"):
        paired_vs_reference(_long(rows), "best_val.fused.acc")
    with pytest.raises(StatisticsError, match="lacks column"):
        score_table(_long(rows), "nope")


def test_statistics_section_markdown():
    rng = np.random.default_rng(1)
    rows = []
    for d, base in (("d1", 70.0), ("d2", 80.0), ("d3", 60.0)):
        for seed in range(4):
            b = base + rng.normal(0, 3)
            rows += [("Concat + uni CE", d, seed, b), ("Good", d, seed, b + 3 + rng.normal(0, 0.2)),
                     ("Bad", d, seed, b - 3 + rng.normal(0, 0.2)), ("Other", d, seed, b + rng.normal(0, 1))]
    df = pd.DataFrame(rows, columns=["method", "dataset", "seed", "best_val.fused.acc"])
    text = statistics_section(df, "best_val", cd_picture="lb_cd.png")
    assert text.startswith("## Statistics, rule `best_val`")
    assert "Friedman test over 4 methods × 3 settings" in text and "CD = " in text
    assert f"CD = {nemenyi_cd(4, 3):.2f}" in text
    assert "![Critical-difference diagram, rule best_val](lb_cd.png)" in text
    assert "two-sided paired t-test" in text and "† significantly better" in text
    paired = text.split("**Difference from Concat + uni CE per setting**")[1]
    good_row = next(ln for ln in paired.splitlines() if ln.startswith("| Good"))
    bad_row = next(ln for ln in paired.splitlines() if ln.startswith("| Bad"))
    assert good_row.count("†") == 3 and "‡" not in good_row
    assert bad_row.count("‡") == 3 and "†" not in bad_row
    ranks = score_table(df, "best_val.fused.acc").rank(ascending=False).mean(axis=1)
    lines = text.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("| method") and "average rank" in ln)
    assert lines[head + 2].startswith(f"| {ranks.idxmin()} ")  # best average rank first
    assert ranks.idxmin() == "Good"
    none = statistics_section(df.assign(**{"best_val.fused.acc": np.nan}), "best_val")
    assert "no statistics" in none
    missing_ref = statistics_section(df[df.method != "Concat + uni CE"], "best_val")
    assert "No paired tests: the reference method 'Concat + uni CE' has no runs" in missing_ref


def test_a_setting_most_methods_miss_is_left_out_not_the_methods():
    """A three-view setting that one of three methods refuses (a third of its scores missing)
    leaves the ranks, not the method, which misses one setting of five (a fifth). Wrong variant
    caught: always dropping methods (the rule before the second edition) ranks two methods."""
    scores = SCORES.copy()
    scores["three views"] = [90.0, np.nan, 80.0]
    comp = compare_methods(scores)
    assert comp.excluded_settings == ["three views"] and comp.excluded == []
    assert list(comp.scores.columns) == list(SCORES.columns)
    assert "three views" in comp.note
    # a method missing as large a share as the worst setting goes (ties: the method)
    one = SCORES.copy()
    one.loc["U"] = [np.nan] * len(SCORES.columns)
    assert compare_methods(one).excluded == ["U"] and compare_methods(one).excluded_settings == []


def test_settings_with_more_than_two_modalities_are_ranked_apart():
    """Three-view settings that a two-modality method refuses get their own ranks; the main
    ranks (and the CD diagram) keep every two-modality method. Wrong variants caught: one rank
    table over all settings (OGM is left out of it); the groups' order swapped (the main ranks
    would be the three-view ones)."""
    rows = []
    for setting, n_mod, methods in (("d1", 2, "ABO"), ("d2", 2, "ABO"), ("d3", 2, "ABO"), ("v3", 3, "AB")):
        for seed in (0, 1):
            for i, m in enumerate(methods):
                rows.append({"method": m, "dataset": setting, "seed": seed, "_n_modalities": n_mod,
                             "best_val.fused.acc": 80.0 + 5 * i + seed + (setting == "d2") * 10 * (m == "O")})
    df = pd.DataFrame(rows)
    groups = stats.rank_groups(df)
    assert [g for g, _ in groups] == [" with two modalities", " with more than two modalities"]
    assert sorted(stats.main_rank_runs(df)["dataset"].unique()) == ["d1", "d2", "d3"]
    md = stats.statistics_section(df, "best_val")
    assert "**Average rank over 3 settings with two modalities**" in md
    assert "**Average rank over 1 setting with more than two modalities**" in md
    first = md.split("with more than two modalities")[0]
    assert "| O " in first and "Left out" not in first
    # one group: the caption is as before
    two = df[df["_n_modalities"] == 2]
    assert stats.rank_groups(two)[0][0] == "" and "**Average rank over 3 settings**" in stats.statistics_section(two, "best_val")
