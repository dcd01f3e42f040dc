"""Many methods against one control: which of them beat it, lose to it, or match it?

With a dozen settings and thirty rows, the Friedman/Nemenyi comparison of every pair
(:mod:`mmbalance.stats`) has a critical difference too wide to separate most methods. The
question a reader asks is narrower: *is method M better than the control* (by default
``"Concat + uni CE"``, the naive fusion trained with the same unimodal losses the rebalancing
methods add)? Three answers, each a pure function of the leaderboard's long form or of its
methods x settings score table (a method's score on a setting = its mean over seeds):

1. **Per setting, over seeds** (:func:`per_setting_vs_control`): the mean paired difference of
   each method from the control, runs matched by seed, with the existing per-setting paired
   test (:func:`mmbalance.stats.paired_vs_reference`: a paired t-test below 10 seeds).
   Uncorrected: it says where a difference exceeds seed noise, setting by setting.
2. **Across settings, frequentist** (:func:`wilcoxon_vs_control`): for each method, the
   two-sided Wilcoxon signed-rank test of its per-setting scores against the control's
   (``scipy.stats.wilcoxon``; settings are the independent units, as Demšar 2006 recommends
   for two classifiers over data sets), then Holm's step-down correction over all the methods
   compared with the control (:func:`holm`), so "significant" holds for the whole family at
   level alpha. With n settings the smallest exact two-sided p is 2 / 2**n (0.00049 for 12).
3. **Across settings, Bayesian** (:func:`bayesian_vs_control`): Benavoli et al.'s Bayesian
   signed-rank test ("Time for a change", JMLR 18(77), 2017; the ``baycomp`` package's
   ``SignedRankTest``: a Dirichlet process on the per-setting differences with a prior of
   strength 0.5 at difference 0, 50,000 Monte Carlo samples with a fixed seed) with a region
   of practical equivalence (ROPE) of ``rope`` points (default **1 accuracy point**: two
   methods closer than that on a setting are practically equivalent there). For each method
   it gives P(better), P(equivalent), P(worse) than the control: the posterior probability
   that the method's Walsh averages mostly lie above the ROPE, inside it, or below it. A
   decision is taken where one probability reaches ``decide`` (0.95); otherwise the data
   cannot tell. Unlike a p-value, P(equivalent) can *support* "no practical difference".

A method is compared on the settings where both it and the control have a score (a
two-modality method is N/A on the three- and five-view settings), and the table says how
many. Too few settings is not an error: the row says so and the tests are left empty.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

from mmbalance.stats import (
    ALPHA,
    REFERENCE,
    PairedTest,
    StatisticsError,
    paired_vs_reference,
    score_table,
)

CONTROL = REFERENCE
#: Region of practical equivalence, in the score's unit (accuracy points).
ROPE = 1.0
#: Posterior probability at which the Bayesian test takes a decision (Benavoli et al. 2017).
DECIDE = 0.95
NSAMPLES = 50_000
SEED = 0
#: baycomp's prior: a pseudo-observation of this strength at difference 0.
PRIOR = 0.5
# Fewer settings than this leave the Wilcoxon test unable to reach p < 0.05 (2 / 2**5 = 0.0625).
MIN_SETTINGS = 6


# ---- 1. per setting ------------------------------------------------------------------------------
def per_setting_vs_control(
    df: pd.DataFrame, column: str, control: str = CONTROL, alpha: float = ALPHA, test: PairedTest = "auto",
    higher_is_better: bool = True,
) -> pd.DataFrame:
    """Per (method, setting): matched seeds ``n``, mean paired difference ``diff`` (method −
    control), ``p`` and ``verdict`` of the paired test over seeds (see
    :func:`mmbalance.stats.paired_vs_reference`, which this is)."""
    return paired_vs_reference(df, column, control, alpha, test, higher_is_better)


# ---- Holm ------------------------------------------------------------------------------------------
def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the input order.

    Sorted ascending, the i-th smallest (i = 0..m-1) becomes ``(m - i) * p_(i)``, made
    non-decreasing by a running maximum and capped at 1; a hypothesis is rejected at level alpha
    iff its adjusted p is below alpha. NaN p-values (no test) are left out of the family and
    stay NaN."""
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1:
        raise StatisticsError(f"holm() takes a 1-D sequence of p-values, got shape {p.shape}.")
    if np.any((p < 0) | (p > 1)):
        raise StatisticsError(f"p-values must lie in [0, 1], got {p[(p < 0) | (p > 1)].tolist()}.")
    out = np.full_like(p, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = len(idx)
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adjusted, 1.0)
    return out


# ---- paired scores across settings -------------------------------------------------------------------
def _check_control(scores: pd.DataFrame, control: str) -> None:
    if control not in scores.index:
        raise StatisticsError(
            f"The control method '{control}' has no scores (methods here: {', '.join(map(str, scores.index))}). "
            f"Pass control=<one of them>, or add the control's runs."
        )


def _pairs(scores: pd.DataFrame, control: str) -> list[tuple[str, list[str], np.ndarray, np.ndarray]]:
    """(method, settings, method scores, control scores) on the settings both have scores on."""
    _check_control(scores, control)
    ref = scores.loc[control].astype(float)
    out = []
    for method in scores.index:
        if method == control:
            continue
        mine = scores.loc[method].astype(float)
        both = [s for s in scores.columns if not (math.isnan(mine[s]) or math.isnan(ref[s]))]
        out.append((str(method), both, mine[both].to_numpy(), ref[both].to_numpy()))
    return out


def wilcoxon_vs_control(
    scores: pd.DataFrame, control: str = CONTROL, alpha: float = ALPHA, higher_is_better: bool = True
) -> pd.DataFrame:
    """Each method against ``control`` over settings (rows of ``scores`` = methods, columns =
    settings, values = mean over seeds): the two-sided Wilcoxon signed-rank test, then Holm's
    correction over all the methods tested.

    Columns: ``method``, ``n`` (settings compared), ``mean_diff`` and ``median_diff`` (method −
    control), ``wins``/``ties``/``losses`` (settings where the method is better / equal / worse),
    ``statistic``, ``p``, ``p_holm`` and ``verdict`` ('better' / 'worse' when ``p_holm <
    alpha``, by the side with the larger signed-rank sum, 'n.s.' otherwise, 'identical' when every
    difference is 0, None below 2 settings). Zero differences are dropped before ranking
    (Wilcoxon's own treatment, scipy's ``zero_method='wilcox'``); a method identical to the
    control on every setting counts in the Holm family with p = 1."""
    if not 0.0 < alpha < 1.0:
        raise StatisticsError(f"alpha must lie in (0, 1), got {alpha}.")
    rows = []
    for method, settings, a, b in _pairs(scores, control):
        d = (a - b) if higher_is_better else (b - a)
        n = len(settings)
        row = {"method": method, "n": n, "mean_diff": float(np.mean(a - b)) if n else math.nan,
               "median_diff": float(np.median(a - b)) if n else math.nan,
               "wins": int(np.sum(d > 0)), "ties": int(np.sum(d == 0)), "losses": int(np.sum(d < 0)),
               "statistic": math.nan, "p": math.nan}
        row["rank_sum_better"], row["rank_sum_worse"] = signed_rank_sums(d)
        if n >= 2 and np.all(d == 0):
            row["p"] = 1.0
        elif n >= 2:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # scipy: few samples, normal approx.
                res = sps.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided")
            row["statistic"], row["p"] = float(res.statistic), float(res.pvalue)
        rows.append(row)
    cols = ["method", "n", "mean_diff", "median_diff", "wins", "ties", "losses", "statistic", "p", "p_holm", "verdict"]
    table = pd.DataFrame(rows, columns=cols[:-2] + ["rank_sum_better", "rank_sum_worse"])
    table["p_holm"] = holm(table["p"].to_numpy()) if len(table) else []
    verdicts = []
    for _, r in table.iterrows():
        if r["n"] < 2 or math.isnan(r["p"]):
            verdicts.append(None)
        elif r["wins"] == 0 and r["losses"] == 0:
            verdicts.append("identical")
        elif r["p_holm"] < alpha:
            verdicts.append("better" if r["rank_sum_better"] > r["rank_sum_worse"] else "worse")
        else:
            verdicts.append("n.s.")
    table["verdict"] = verdicts
    return table[cols]


def signed_rank_sums(d: Sequence[float]) -> tuple[float, float]:
    """Wilcoxon's rank sums (R+, R-) of the non-zero differences ``d`` (oriented so that positive
    = the method is better): ranks of ``|d|``, ties averaged. The side with the larger sum is
    the direction of a significant test."""
    d = np.asarray(d, dtype=float)
    d = d[d != 0]
    if not len(d):
        return 0.0, 0.0
    ranks = sps.rankdata(np.abs(d))
    return float(ranks[d > 0].sum()), float(ranks[d < 0].sum())


def bayesian_signed_rank(
    method: Sequence[float], control: Sequence[float], rope: float = ROPE, nsamples: int = NSAMPLES,
    seed: int = SEED,
) -> tuple[float, float, float]:
    """(P(method better), P(equivalent), P(method worse)) from Benavoli's Bayesian signed-rank
    test on paired per-setting scores (higher = better), with ``baycomp.SignedRankTest``: the
    share of ``nsamples`` posterior draws (Dirichlet weights over the differences and the prior
    point 0, seeded) in which 'above the ROPE', 'inside' or 'below' is the most probable."""
    if not rope > 0:
        raise StatisticsError(
            f"The Bayesian signed-rank test needs a region of practical equivalence rope > 0 (in the "
            f"score's unit, e.g. 1.0 accuracy point), got {rope}."
        )
    x, y = np.asarray(control, dtype=float), np.asarray(method, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise StatisticsError(f"Paired per-setting scores must be two 1-D arrays of one length (got {x.shape} and {y.shape}).")
    if len(x) == 0:
        raise StatisticsError("The Bayesian signed-rank test needs at least one setting scored by both methods.")
    from baycomp import SignedRankTest

    # baycomp orders (left, rope, right) by y - x: right = y (the method) above x (the control)
    posterior = SignedRankTest(x, y, rope, prior=PRIOR, nsamples=nsamples, random_state=seed)
    worse, equal, better = (float(v) for v in posterior.probs(with_rope=True))
    return better, equal, worse


def bayesian_vs_control(
    scores: pd.DataFrame, control: str = CONTROL, rope: float = ROPE, decide: float = DECIDE,
    nsamples: int = NSAMPLES, seed: int = SEED, higher_is_better: bool = True,
) -> pd.DataFrame:
    """Each method against ``control`` by the Bayesian signed-rank test over settings.

    Columns: ``method``, ``n`` (settings compared), ``p_better``, ``p_equivalent``,
    ``p_worse`` and ``decision``: 'better' / 'equivalent' / 'worse' where that probability is
    at least ``decide``, 'undecided' otherwise, None below 2 settings (the posterior is then
    mostly the prior). ``rope`` is in the score's unit (accuracy points)."""
    if not 0.5 < decide <= 1.0:
        raise StatisticsError(f"decide must lie in (0.5, 1], got {decide}.")
    rows = []
    for method, settings, a, b in _pairs(scores, control):
        row = {"method": method, "n": len(settings), "p_better": math.nan, "p_equivalent": math.nan,
               "p_worse": math.nan, "decision": None}
        if len(settings) >= 2:
            mine, ref = (a, b) if higher_is_better else (-a, -b)
            better, equal, worse = bayesian_signed_rank(mine, ref, rope, nsamples, seed)
            row.update(p_better=better, p_equivalent=equal, p_worse=worse)
            row["decision"] = next((name for name, p in (("better", better), ("equivalent", equal), ("worse", worse))
                                    if p >= decide), "undecided")
        rows.append(row)
    return pd.DataFrame(rows, columns=["method", "n", "p_better", "p_equivalent", "p_worse", "decision"])


# ---- all three, from the long form --------------------------------------------------------------------
@dataclass(frozen=True)
class ControlComparison:
    """The three answers for one score column, and the settings they were computed on."""

    control: str
    column: str
    per_setting: pd.DataFrame
    wilcoxon: pd.DataFrame
    bayes: pd.DataFrame
    scores: pd.DataFrame
    alpha: float
    rope: float
    decide: float
    note: str | None = None


def compare_with_control(
    df: pd.DataFrame, column: str = "best_val.fused.acc", control: str = CONTROL, alpha: float = ALPHA,
    rope: float = ROPE, decide: float = DECIDE, test: PairedTest = "auto", nsamples: int = NSAMPLES,
    seed: int = SEED, higher_is_better: bool = True,
) -> ControlComparison:
    """Per-setting paired tests, Wilcoxon-Holm and the Bayesian signed-rank test of every
    method against ``control``, from the leaderboard's long form (one row per run with
    ``method``, ``dataset``, ``seed`` and ``column``, as ``mmbalance.leaderboard.runs_frame``
    makes it)."""
    scores = score_table(df, column)
    _check_control(scores, control)
    n = int(scores.loc[control].notna().sum())
    note = None
    if n < MIN_SETTINGS:
        note = (f"The control is scored on {n} settings; below {MIN_SETTINGS} the Wilcoxon test cannot reach "
                f"p < 0.05 and the Bayesian posterior stays close to its prior.")
    return ControlComparison(
        control=control, column=column,
        per_setting=per_setting_vs_control(df, column, control, alpha, test, higher_is_better),
        wilcoxon=wilcoxon_vs_control(scores, control, alpha, higher_is_better),
        bayes=bayesian_vs_control(scores, control, rope, decide, nsamples, seed, higher_is_better),
        scores=scores, alpha=alpha, rope=rope, decide=decide, note=note,
    )


def _p(p: float) -> str:
    if p is None or math.isnan(p):
        return "–"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def control_markdown(comp: ControlComparison) -> str:
    """One markdown table: per method, settings compared, wins/ties/losses, the mean difference,
    Wilcoxon p with Holm's adjustment and verdict, and the Bayesian P(better / equivalent /
    worse) with its decision; the caption says how to read it."""
    if comp.wilcoxon.empty:
        return f"No method besides the control '{comp.control}' has scores.\n"
    merged = comp.wilcoxon.merge(comp.bayes, on=["method", "n"], how="left")
    table = pd.DataFrame({
        "method": merged["method"],
        "settings": merged["n"],
        "wins/ties/losses": [f"{w}/{t}/{lo}" for w, t, lo in zip(merged["wins"], merged["ties"], merged["losses"], strict=True)],
        "mean diff": [f"{d:+.2f}" if not math.isnan(d) else "–" for d in merged["mean_diff"]],
        "Wilcoxon p": [_p(p) for p in merged["p"]],
        "Holm p": [_p(p) for p in merged["p_holm"]],
        "Wilcoxon-Holm": [v if isinstance(v, str) else "–" for v in merged["verdict"]],
        "P(better)": [f"{p:.3f}" if not math.isnan(p) else "–" for p in merged["p_better"]],
        "P(equiv.)": [f"{p:.3f}" if not math.isnan(p) else "–" for p in merged["p_equivalent"]],
        "P(worse)": [f"{p:.3f}" if not math.isnan(p) else "–" for p in merged["p_worse"]],
        "Bayesian": [v if isinstance(v, str) else "–" for v in merged["decision"]],
    })
    caption = (
        f"**Against the control {comp.control}** (score: `{comp.column}`, mean over seeds per setting; "
        f"a method is compared on the settings both are scored on). Wilcoxon: two-sided signed-rank test "
        f"over settings, p adjusted by Holm's step-down method over the {len(merged)} methods; better / "
        f"worse at adjusted p < {comp.alpha:g}. Bayesian: Benavoli et al.'s (2017) signed-rank test with a "
        f"region of practical equivalence of ±{comp.rope:g} points (prior strength {PRIOR:g} at 0, "
        f"Monte Carlo with a fixed seed); a decision where a probability reaches {comp.decide:g}. "
        f"'equivalent' is evidence of no practical difference; 'n.s.' and 'undecided' are only the "
        f"absence of evidence."
    )
    if comp.note:
        caption += f" {comp.note}"
    return f"{caption}\n\n{table.to_markdown(index=False)}\n"
