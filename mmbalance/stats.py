"""Statistics across settings: are the differences in a leaderboard more than seed noise?

Two questions, answered with maintained libraries (scipy, scikit-posthocs), never re-derived:

1. *Across settings* (a setting is one dataset column of the leaderboard; a method's score on it
   is its mean test accuracy over seeds under one selection rule): every method's average rank,
   Friedman's test of "all methods rank alike" (``scipy.stats.friedmanchisquare``), the pairwise
   Nemenyi post-hoc p-values (``scikit_posthocs.posthoc_nemenyi_friedman``) and the Nemenyi
   critical difference (CD), the procedure of Demšar (JMLR 7, 2006). Two methods whose average
   ranks differ by more than CD differ significantly at level alpha.
2. *Within one setting*: which methods differ from a reference method (by default
   ``"Concat + uni CE"``, the naive fusion trained with the same unimodal losses) by more than
   seed noise: a paired test over seeds, runs matched by seed (same seed = same initialisation
   and data order, so the seed-to-seed variation cancels in the difference).

Too few methods or settings for a test is not an error: the result carries a ``note`` saying
what is missing, and the numbers that can be computed (ranks) are still given.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats as sps

from mmbalance.errors import MMBalanceError
from mmbalance.markup import md_escape

REFERENCE = "Concat + uni CE"
ALPHA = 0.05
# Below this many matched seeds the Wilcoxon signed-rank test cannot reach small p-values (its
# smallest two-sided p is 2 / 2**n: 0.0625 for n = 5), so the paired t-test is used instead.
WILCOXON_MIN_N = 10
TEST_NAMES = {"ttest": "two-sided paired t-test", "wilcoxon": "two-sided Wilcoxon signed-rank test"}
BETTER, WORSE = "†", "‡"
# Demšar (2006) recommends Friedman's chi-square approximation for N > 10 settings and k > 5
# methods; below 5 settings we say the p-value is only indicative.
FEW_SETTINGS = 5

PairedTest = Literal["auto", "ttest", "wilcoxon"]


class StatisticsError(MMBalanceError):
    """Bad input to a statistics function (a missing column, an unknown test)."""


# ---- across settings ---------------------------------------------------------------------------
def score_table(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """Methods x settings table of the mean of ``column`` over seeds (NaN where a method has no
    run on a setting). ``df`` is the leaderboard's long form (one row per run, with ``method``,
    ``dataset`` and ``column``). Seeds are averaged first so that a setting with more seeds does
    not weigh more in the ranks."""
    missing = [c for c in ("method", "dataset", column) if c not in df]
    if missing:
        raise StatisticsError(
            f"The runs table lacks column(s) {missing}; pass the long form from "
            f"mmbalance.leaderboard.runs_table / runs_frame and a column such as 'best_val.fused.acc'."
        )
    methods = list(dict.fromkeys(df["method"]))
    settings = sorted(dict.fromkeys(df["dataset"]))
    means = df.groupby(["method", "dataset"])[column].mean().unstack("dataset")
    return means.reindex(index=methods, columns=settings).astype(float)


def rank_table(scores: pd.DataFrame, higher_is_better: bool = True) -> pd.DataFrame:
    """Rank of each method (row) within each setting (column): 1 = best; tied methods share the
    average of the ranks they span (Demšar's convention, which keeps the ranks of a setting
    summing to k(k+1)/2). NaN scores get no rank."""
    return scores.rank(axis=0, method="average", ascending=not higher_is_better)


def nemenyi_cd(k: int, n: int, alpha: float = ALPHA) -> float:
    """Nemenyi critical difference for ``k`` methods ranked on ``n`` settings.

    CD = q_alpha * sqrt(k (k + 1) / (6 n)) with q_alpha the (1 - alpha) quantile of the
    studentized range of k means with infinite degrees of freedom, divided by sqrt(2) (Demšar
    2006, Section 3.2.2). It is the exact inverse of the Nemenyi p-value that scikit-posthocs
    computes (``posthoc_nemenyi_friedman``: sf of |R_i - R_j| / sqrt(k(k+1)/(6n)) * sqrt(2)), so
    a pair of methods is significant by that p-value iff its rank difference exceeds CD."""
    if k < 2 or n < 1:
        raise StatisticsError(f"The Nemenyi critical difference needs k >= 2 methods and n >= 1 settings (got k={k}, n={n}).")
    if not 0.0 < alpha < 1.0:
        raise StatisticsError(f"alpha must lie in (0, 1), got {alpha}.")
    q = float(sps.studentized_range.ppf(1.0 - alpha, k, np.inf)) / math.sqrt(2.0)
    return q * math.sqrt(k * (k + 1) / (6.0 * n))


@dataclass(frozen=True)
class RankComparison:
    """Everything the leaderboard's Statistics section reports about ranks across settings.

    ``scores``/``ranks`` are the complete block used (methods present on every setting);
    ``excluded`` names the methods left out because they miss a setting. Tests that could not
    be run are None, with the reason in ``note``."""

    scores: pd.DataFrame
    ranks: pd.DataFrame
    average_ranks: pd.Series
    alpha: float
    excluded: list[str] = field(default_factory=list)
    excluded_settings: list[str] = field(default_factory=list)
    friedman_statistic: float | None = None
    friedman_p: float | None = None
    cd: float | None = None
    nemenyi_p: pd.DataFrame | None = None
    note: str | None = None

    @property
    def n_methods(self) -> int:
        return len(self.scores.index)

    @property
    def n_settings(self) -> int:
        return len(self.scores.columns)

    @property
    def significant(self) -> bool:
        """Friedman rejects 'all methods rank alike' at level alpha."""
        return self.friedman_p is not None and not math.isnan(self.friedman_p) and self.friedman_p < self.alpha


def complete_block(scores: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The largest complete block found greedily: while a score is missing, drop the setting
    (column) or the method (row) with the largest share of missing scores, the method on ties.
    Returns the block and the settings dropped, in order."""
    block, dropped = scores, []
    while len(block.index) and len(block.columns) and block.isna().to_numpy().any():
        row_share = block.isna().mean(axis=1)
        col_share = block.isna().mean(axis=0)
        if col_share.max() > row_share.max():
            col = col_share.idxmax()
            dropped.append(str(col))
            block = block.drop(columns=[col])
        else:
            block = block.drop(index=[row_share.idxmax()])
    return block, dropped


def compare_methods(scores: pd.DataFrame, alpha: float = ALPHA, higher_is_better: bool = True) -> RankComparison:
    """Average ranks, Friedman test and Nemenyi post-hoc of methods (rows) over settings (columns).

    Friedman's test needs a complete block: every method scored on every setting. Until it is
    complete, the method or the setting with the largest share of missing scores is left out
    (and named), a method on ties: a method run on only some datasets (a unimodal baseline, a
    three-modality variant) should not remove a whole dataset from everyone's comparison, but a
    setting that many methods do not apply to (three or five views, which two-modality methods
    refuse) should not remove those methods from the ranks either. The Friedman test needs at
    least 3 methods and 2 settings (scipy refuses fewer methods; one setting is no replication);
    the ranks are returned whenever there are 2 methods and 1 setting."""
    if not 0.0 < alpha < 1.0:
        raise StatisticsError(f"alpha must lie in (0, 1), got {alpha}.")
    scores = scores.astype(float)
    complete, excluded_settings = complete_block(scores)
    excluded = [str(m) for m in scores.index if m not in complete.index]
    ranks = rank_table(complete, higher_is_better)
    average = ranks.mean(axis=1).sort_values(kind="stable")
    k, n = complete.shape
    base = {"scores": complete, "ranks": ranks, "average_ranks": average, "alpha": alpha, "excluded": excluded,
            "excluded_settings": excluded_settings}
    left_out = f"; left out (no score on every setting): {', '.join(excluded)}" if excluded else ""
    if excluded_settings:
        left_out += f"; settings left out (scored for too few methods): {', '.join(excluded_settings)}"
    if k < 3 or n < 2:
        need = []
        if k < 3:
            need.append(f"at least 3 methods scored on every setting (here {k})")
        if n < 2:
            need.append(f"at least 2 settings (here {n})")
        note = f"No Friedman test or critical difference: it needs {' and '.join(need)}{left_out}."
        return RankComparison(**base, note=note)

    import scikit_posthocs as sp  # imported here: it pulls in seaborn and statsmodels (~2 s)

    blocks = complete.T  # rows = settings (blocks), columns = methods (groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all ties: scipy divides by zero, gives nan
        result = sps.friedmanchisquare(*[blocks[m].to_numpy() for m in blocks.columns])
    stat, p = float(result.statistic), float(result.pvalue)
    nemenyi = sp.posthoc_nemenyi_friedman(blocks.to_numpy())
    nemenyi.index = nemenyi.columns = list(blocks.columns)
    notes = []
    if math.isnan(p):
        notes.append("Every method ties on every setting: Friedman's test is undefined (no differences to test).")
    elif n < FEW_SETTINGS:
        notes.append(f"With only {n} settings the Friedman p-value (a chi-square approximation) is indicative only.")
    if excluded_settings:
        notes.append(f"Settings left out of the ranks (a larger share of the methods has no score there than "
                     f"any ranked method misses of the settings): {', '.join(excluded_settings)}.")
    if excluded:
        notes.append(f"Left out of the ranks (no score on every setting): {', '.join(excluded)}.")
    return RankComparison(
        **base, friedman_statistic=stat, friedman_p=p, cd=nemenyi_cd(k, n, alpha), nemenyi_p=nemenyi,
        note=" ".join(notes) or None,
    )


# ---- within one setting: paired tests against a reference --------------------------------------
def choose_test(n: int, test: PairedTest = "auto") -> str:
    """'ttest' or 'wilcoxon' for ``n`` matched seeds. 'auto' takes Wilcoxon's signed-rank test
    (no normality assumption) once n >= WILCOXON_MIN_N, where it can reach p < 0.05 with room to
    spare, and the paired t-test below that."""
    if test not in ("auto", "ttest", "wilcoxon"):
        raise StatisticsError(f"Unknown paired test '{test}'; choose auto, ttest or wilcoxon.")
    if test != "auto":
        return test
    return "wilcoxon" if n >= WILCOXON_MIN_N else "ttest"


def paired_p(a: Sequence[float], b: Sequence[float], test: str = "ttest") -> float:
    """Two-sided p-value of a paired test of ``a`` against ``b`` (same order = matched seeds).

    NaN when the test is undefined: fewer than 2 pairs, or every difference zero (no evidence
    of any difference). Every difference equal and non-zero gives p = 0 under the t-test (zero
    variance): the methods differ by the same amount on every seed."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise StatisticsError(f"Paired samples must have the same length (got {x.shape} and {y.shape}).")
    if len(x) < 2 or np.all(x == y):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zero variance: scipy warns, returns p=0
        if test == "ttest":
            return float(sps.ttest_rel(x, y).pvalue)
        if test == "wilcoxon":
            return float(sps.wilcoxon(x, y, alternative="two-sided").pvalue)
    raise StatisticsError(f"Unknown paired test '{test}'; choose ttest or wilcoxon.")


def paired_vs_reference(
    df: pd.DataFrame,
    column: str,
    reference: str = REFERENCE,
    alpha: float = ALPHA,
    test: PairedTest = "auto",
    higher_is_better: bool = True,
) -> pd.DataFrame:
    """Per setting, each method against ``reference`` over seeds matched by seed.

    One row per (method, setting) where both have runs: ``n`` (matched seeds), ``diff`` (mean of
    method minus reference, in the column's unit), ``p``, ``test`` and ``verdict``: 'better' or
    'worse' when p < alpha (by the sign of diff, flipped if lower is better), 'n.s.' otherwise,
    None when untestable (n < 2). Several runs of one (method, setting, seed) are averaged.
    With test='auto' one test is chosen for the whole table, from the smallest n, so that one
    caption can name it. Empty when the reference has no runs."""
    if not 0.0 < alpha < 1.0:
        raise StatisticsError(f"alpha must lie in (0, 1), got {alpha}.")
    missing = [c for c in ("method", "dataset", "seed", column) if c not in df]
    if missing:
        raise StatisticsError(f"The runs table lacks column(s) {missing} needed for paired tests over seeds.")
    cols = ["method", "setting", "n", "diff", "p", "test", "verdict"]
    per_seed = df.dropna(subset=[column]).groupby(["method", "dataset", "seed"])[column].mean()
    if reference not in per_seed.index.get_level_values("method"):
        return pd.DataFrame(columns=cols)
    ref_all = per_seed.xs(reference, level="method")  # index: (dataset, seed)
    ref_settings = set(ref_all.index.get_level_values("dataset"))
    pairs = []
    for (method, setting), sub in per_seed.groupby(level=["method", "dataset"], sort=False):
        if method == reference or setting not in ref_settings:
            continue
        ref = ref_all.xs(setting, level="dataset")
        mine = sub.droplevel(["method", "dataset"])
        seeds = sorted(set(mine.index) & set(ref.index))
        pairs.append((method, setting, mine.loc[seeds].to_numpy(), ref.loc[seeds].to_numpy()))
    order = {m: i for i, m in enumerate(dict.fromkeys(df["method"]))}
    pairs.sort(key=lambda t: (order.get(t[0], len(order)), t[1]))
    testable = [len(a) for *_, a, _ in pairs if len(a) >= 2]
    chosen = choose_test(min(testable) if testable else 0, test)
    rows = []
    for method, setting, a, b in pairs:
        n = len(a)
        diff = float(np.mean(a - b)) if n else float("nan")
        p = paired_p(a, b, chosen) if n >= 2 else float("nan")
        if n < 2:
            verdict = None
        elif not math.isnan(p) and p < alpha:
            verdict = "better" if (diff > 0) == higher_is_better else "worse"
        else:
            verdict = "n.s."
        rows.append({"method": method, "setting": setting, "n": n, "diff": diff, "p": p, "test": chosen,
                     "verdict": verdict})
    return pd.DataFrame(rows, columns=cols)


def marker(verdict: str | None) -> str:
    """The leaderboard's mark for a paired-test verdict: † better, ‡ worse, nothing otherwise."""
    return {"better": BETTER, "worse": WORSE}.get(verdict or "", "")


# ---- markdown ------------------------------------------------------------------------------------
def _p(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "–"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def statistics_section(
    df: pd.DataFrame,
    rule: str,
    reference: str = REFERENCE,
    alpha: float = ALPHA,
    test: PairedTest = "auto",
    cd_picture: str | None = None,
) -> str:
    """The leaderboard's "Statistics" section for selection ``rule`` (markdown): the average
    ranks table with Friedman's p and the CD in its caption (and the CD diagram, a relative
    link, when ``cd_picture`` is given), then the paired tests against ``reference``."""
    column = f"{rule}.fused.acc"
    parts = [f"## Statistics, rule `{rule}`\n"]
    if column not in df or df[column].isna().all():
        return parts[0] + f"\nNo test accuracy under rule `{rule}` in these runs: no statistics.\n"
    for i, (group, sub) in enumerate(rank_groups(df)):
        comp = compare_methods(score_table(sub, column), alpha)
        parts.append(ranks_markdown(comp, rule, group))
        if cd_picture and i == 0:
            parts.append(f"![Critical-difference diagram, rule {rule}]({cd_picture})\n")
    parts.append(paired_markdown(paired_vs_reference(df, column, reference, alpha, test), reference, rule, alpha))
    return "\n".join(parts)


def rank_groups(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The runs split into the groups ranked apart: settings with two modalities first, then
    those with more (which methods for two modalities refuse), so a three-view setting never
    removes the two-modality methods from the main ranks. ``[("", df)]`` when there is one group
    (or no modality count, e.g. a runs table from before it was kept)."""
    if "_n_modalities" not in df or df["_n_modalities"].nunique() < 2:
        return [("", df)]
    counts = df["_n_modalities"].fillna(0).astype(int)
    groups = [(" with two modalities", df[counts <= 2])]
    if (counts > 2).any():
        groups.append((" with more than two modalities", df[counts > 2]))
    return [(name, sub) for name, sub in groups if not sub.empty]


def main_rank_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The runs of the main ranks (and of the critical-difference diagram): the first group."""
    return rank_groups(df)[0][1]


def ranks_markdown(comp: RankComparison, rule: str, group: str = "") -> str:
    """Average-ranks table (one rank column per setting, then the average), caption first;
    ``group`` qualifies the settings (" with two modalities")."""
    k, n = comp.n_methods, comp.n_settings
    if k == 0 or n == 0:
        return f"No method is scored on every setting{group}; no ranks. {md_escape(comp.note or '')}\n"
    table = comp.ranks.loc[comp.average_ranks.index].copy()
    table = table.map(lambda r: f"{r:g}")
    table["average rank"] = [f"{comp.average_ranks[m]:.2f}" for m in table.index]
    caption = (
        f"**Average rank over {n} setting{'s' if n != 1 else ''}{group}** (rank 1 = best mean test accuracy "
        f"over seeds, rule `{rule}`; ties share the average rank)."
    )
    if comp.friedman_p is not None:
        caption += (
            f" Friedman test over {k} methods × {n} settings: χ² = {comp.friedman_statistic:.2f}, "
            f"p = {_p(comp.friedman_p)} ({'significant' if comp.significant else 'not significant'} at "
            f"α = {comp.alpha:g}). Nemenyi critical difference CD = {comp.cd:.2f} at α = {comp.alpha:g}: "
            f"two methods whose average ranks differ by more than CD differ significantly."
        )
    if comp.note:
        caption += f" {md_escape(comp.note)}"
    return f"{caption}\n\n{_markdown(table)}\n"


def paired_markdown(paired: pd.DataFrame, reference: str, rule: str, alpha: float = ALPHA) -> str:
    """Method x setting table of mean differences from the reference, with † / ‡ markers."""
    if paired.empty:
        return (f"No paired tests: the reference method '{md_escape(reference)}' has no runs here (or shares no "
                f"setting with another method).\n")
    settings = sorted(dict.fromkeys(paired["setting"]))
    methods = list(dict.fromkeys(paired["method"]))
    table = pd.DataFrame("", index=methods, columns=settings)
    n_max = int(paired["n"].max())
    for _, r in paired.iterrows():
        if r["n"] == 0:
            text = "no common seed"
        else:
            text = f"{r['diff']:+.2f}{marker(r['verdict'])}"
            if r["verdict"] is not None:
                text += " (identical)" if math.isnan(r["p"]) else f" (p={_p(r['p'])})"
            if r["n"] != n_max:
                text += f" (n={r['n']})"
        table.loc[r["method"], r["setting"]] = text
    test = TEST_NAMES[str(paired["test"].iloc[0])]
    reference = md_escape(reference)
    caption = (
        f"**Difference from {reference} per setting** (mean over seeds of method − reference test "
        f"accuracy, percentage points; runs matched by seed; rule `{rule}`; {n_max} matched seeds "
        f"unless noted). {BETTER} significantly better, {WORSE} significantly worse than {reference} "
        f"at p < {alpha:g} by a {test} over the matched seeds (per setting, not corrected for "
        f"multiple comparisons); unmarked: within seed noise; identical: the same accuracy on every seed. "
        f"Fewer than 2 matched seeds: no test."
    )
    return f"{caption}\n\n{_markdown(table)}\n"


def _markdown(table: pd.DataFrame) -> str:
    """A method x setting table as markdown, its labels escaped (they come from records)."""
    t = table.copy()
    t.index = [md_escape(i) for i in t.index]
    t.columns = [md_escape(c) for c in t.columns]
    return t.reset_index(names="method").to_markdown(index=False, disable_numparse=True)
