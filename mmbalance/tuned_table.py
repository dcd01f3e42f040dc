"""The defaults table and the tuned table side by side, for records a tuned grid wrote.

A tuned grid (``tune:`` in a grid file) gives every method x setting one Optuna study with the
same budget, then runs each study's best configuration over the grid's seeds. Which runs are a
study's defaults and which its best configuration is written into the study itself
(``<records>/studies/<name>.db``, user attributes ``defaults_cell`` and ``best_cell``: the
runs' cell keys, ``report_runs.cell_key``), as is the budget it searched with (trials asked
for, the seeds each trial trains, sampler, pruner, objective: ``tune.record_protocol``). This
module reads those records; it never guesses a run's role from its values, so a best
configuration equal to the defaults shows the defaults' runs as its tuned result, and a run
that merely happens to differ from the defaults is not called tuned.

The table: per method (the defaults' row) and setting, the defaults' mean ± sd, the tuned mean
± sd and the difference; then each method's average rank under the defaults and under tuning.
A method never tuned shows its defaults and a dash. The caption names the budget from the
studies' records and warns, naming the studies, when the budgets differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mmbalance.markup import latex_escape, md_escape

FINISHED = ("COMPLETE", "PRUNED")


@dataclass(frozen=True)
class StudyRecord:
    """What one study recorded about itself (the attributes a report needs)."""

    name: str
    method: str
    dataset: str
    defaults_cell: str
    best_cell: str
    finished: int  # complete + pruned trials
    budget: int | None
    seeds: tuple[int, ...] | None
    sampler: str | None
    pruner: str | None
    objective: str | None = None


def read_studies(records_dir: Path) -> list[StudyRecord]:
    """Every study under ``<records>/studies`` that a tuned grid linked to its runs (a study of
    ``mmbalance tune`` alone has no defaults' runs to stand beside and is left out)."""
    import optuna

    from mmbalance.tune import BEST_CELL, DEFAULTS_CELL, study_databases

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = []
    for db in study_databases(Path(records_dir)):
        try:
            study = optuna.load_study(study_name=db.stem, storage=f"sqlite:///{db.resolve()}")
        except KeyError:
            continue
        attrs = study.user_attrs
        if not attrs.get(DEFAULTS_CELL) or not attrs.get(BEST_CELL):
            continue
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
        seeds = attrs.get("seeds")
        out.append(StudyRecord(
            db.stem, str(attrs.get("method", db.stem.split("_")[0])), str(attrs.get("dataset", "")),
            str(attrs[DEFAULTS_CELL]), str(attrs[BEST_CELL]), sum(s in FINISHED for s in states),
            int(attrs["budget"]) if attrs.get("budget") is not None else None,
            tuple(int(s) for s in seeds) if isinstance(seeds, list) else None,
            attrs.get("sampler"), attrs.get("pruner"), attrs.get("objective")))
    return out


def tuned_only_cells(studies: Sequence[StudyRecord]) -> set[str]:
    """The cell keys of best configurations other than the defaults: runs that belong in the
    tuned column, not in the defaults' tables."""
    return {s.best_cell for s in studies if s.best_cell != s.defaults_cell}


def split_tuned(df: pd.DataFrame, studies: Sequence[StudyRecord]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(all runs, the defaults' runs)``: every run, with ``tuned_study`` naming the study
    whose best configuration (other than its defaults) it is, and the runs without one, which
    make the ordinary tables (the defaults' table)."""
    if df.empty or "cell" not in df:
        return df, df
    by_cell = {s.best_cell: s.name for s in studies if s.best_cell != s.defaults_cell}
    df = df.assign(tuned_study=[by_cell.get(c, "") for c in df["cell"]])
    return df, df[df["tuned_study"] == ""].reset_index(drop=True)


@dataclass
class SideBySide:
    """The table's cells as numbers, before any format: per (method, setting) the defaults'
    and tuned (mean, sd, n), and the studies that made it."""

    methods: list[str]
    datasets: list[str]
    defaults: dict[tuple[str, str], tuple[float, float, int]]
    tuned: dict[tuple[str, str], tuple[float, float, int]]
    studies: list[StudyRecord]


def _stats(values: pd.Series) -> tuple[float, float, int]:
    values = values.dropna()
    if values.empty:
        return math.nan, math.nan, 0
    return float(values.mean()), float(values.std()) if len(values) > 1 else 0.0, len(values)


def _defaults_row(defaults_df: pd.DataFrame, best: pd.DataFrame) -> str:
    """The row of the same method at its defaults on other settings: same registry name, and
    of those the one whose own settings the best runs share most (Concat + uni CE, not Concat,
    for a tuned ``unimodal_loss=true`` study); the method's label when it has no such row."""
    mine = best["_row_settings"].iloc[0] if "_row_settings" in best else {}
    same = defaults_df[defaults_df["method_name"] == best["method_name"].iloc[0]] if "method_name" in defaults_df else []
    scored = []
    for label, settings in (zip(same["method"], same["_row_settings"], strict=True) if len(same) else ()):
        if all(k in mine and mine[k] == v for k, v in settings.items()):
            scored.append((len(settings), str(label)))
    if scored:
        return max(scored)[1]
    return str(best["_label"].iloc[0] if "_label" in best else best["method_name"].iloc[0])


def side_by_side(df: pd.DataFrame, studies: Sequence[StudyRecord], column: str) -> SideBySide | None:
    """Pair each study's defaults' runs with its best configuration's runs (both by the cell
    keys the study recorded); None when no study's runs are in ``df``."""
    if column not in df or "cell" not in df:
        return None
    tuned_cells = tuned_only_cells(studies)
    defaults_df = df[~df["cell"].isin(tuned_cells)]
    defaults = {(m, d): _stats(g[column]) for (m, d), g in defaults_df.groupby(["method", "dataset"], sort=False)}
    tuned: dict[tuple[str, str], tuple[float, float, int]] = {}
    used: list[StudyRecord] = []
    for study in studies:
        home = df[df["cell"] == study.defaults_cell]
        best = df[df["cell"] == study.best_cell]
        if home.empty and best.empty:
            continue
        used.append(study)
        if home.empty:  # the defaults' runs are missing (e.g. every seed diverged): the method's own row
            key = (_defaults_row(defaults_df, best), str(best["dataset"].iloc[0]))
        else:
            key = (str(home["method"].iloc[0]), str(home["dataset"].iloc[0]))
        if not best.empty:
            tuned[key] = _stats(best[column])
    if not used:
        return None
    methods = list(dict.fromkeys([m for m, _ in defaults] + [m for m, _ in tuned]))
    datasets = sorted({d for _, d in defaults} | {d for _, d in tuned})
    return SideBySide(methods, datasets, defaults, tuned, used)


def average_ranks(means: Mapping[tuple[str, str], float], methods: Sequence[str], datasets: Sequence[str]) -> dict[str, float]:
    """Each method's rank per setting (1 = best, ties share the mean rank) among the methods
    with a value there, averaged over the settings it has a value on."""
    table = pd.DataFrame(math.nan, index=list(methods), columns=list(datasets))
    for (m, d), v in means.items():
        table.loc[m, d] = v
    ranks = table.rank(axis=0, ascending=False, method="average")
    return {m: float(ranks.loc[m].mean()) for m in methods}


def _cell(stats: tuple[float, float, int] | None, pm: str) -> str:
    if stats is None or stats[2] == 0:
        return "–"
    mean, sd, n = stats
    return f"{mean:.2f} {pm} {sd:.2f}" if n > 1 else f"{mean:.2f}"


def _delta(d: tuple[float, float, int] | None, t: tuple[float, float, int] | None) -> str:
    if not d or not t or not d[2] or not t[2]:
        return "–"
    return f"{t[0] - d[0]:+.2f}"


def budget_caption(studies: Sequence[StudyRecord]) -> str:
    """The budget, in plain text, from the studies' own records; differing budgets (trials
    finished, trials asked for, or the seeds a trial trains) are a warning naming each study."""
    finished = sorted({s.finished for s in studies})
    budgets = sorted({s.budget for s in studies if s.budget is not None})
    seeds = sorted({s.seeds for s in studies if s.seeds is not None})
    samplers = sorted({s.sampler or "not recorded" for s in studies})
    pruners = sorted({s.pruner or "pruner not recorded" for s in studies})
    objectives = sorted({s.objective or "not recorded" for s in studies})
    trials = (f"{finished[0]} finished trials per method × setting" if len(finished) == 1
              else f"{finished[0]} to {finished[-1]} finished trials per method × setting")
    asked = f" (budget {budgets[0]})" if len(budgets) == 1 else ""
    seed_text = (f"each trial trains seed(s) {', '.join(map(str, seeds[0]))}" if len(seeds) == 1
                 else "seeds per trial differ between studies")
    text = (f"Tuning budget: {trials}{asked}, {len(studies)} stud{'y' if len(studies) == 1 else 'ies'}; {seed_text}; sampler "
            f"{' / '.join(samplers)}, {' / '.join(pruners)} on each epoch's validation accuracy; objective: "
            f"{' / '.join(objectives)}; the test split is never read by the search (trials run with eval_test=false).")
    if len(finished) > 1 or len(budgets) > 1 or len(seeds) > 1:
        per = "; ".join(f"{s.name}: {s.finished} finished of {s.budget if s.budget is not None else '?'}, seeds "
                        f"{','.join(map(str, s.seeds)) if s.seeds else '?'}" for s in studies)
        text += f" WARNING: the budgets are NOT equal across methods, so this is no equal-budget comparison ({per})."
    return text


def build(table: SideBySide, style: str, esc: Callable[[Any], str]) -> tuple[pd.DataFrame, str]:
    """The table (labels escaped with ``esc``) and its caption (plain text; the caller escapes)."""
    pm = "±" if style == "markdown" else "$\\pm$"
    columns = []
    for d in table.datasets:
        columns += [f"{esc(d)}: defaults", f"{esc(d)}: tuned", f"{esc(d)}: Δ" if style == "markdown" else f"{esc(d)}: $\\Delta$"]
    columns += ["rank, defaults", "rank, tuned"]
    out = pd.DataFrame("", index=[esc(m) for m in table.methods], columns=columns)
    d_means = {k: v[0] for k, v in table.defaults.items() if v[2]}
    t_means = {k: v[0] for k, v in table.tuned.items() if v[2]}
    d_rank = average_ranks(d_means, table.methods, table.datasets)
    t_rank = average_ranks({**d_means, **t_means}, table.methods, table.datasets)
    for m in table.methods:
        row = []
        for d in table.datasets:
            dv, tv = table.defaults.get((m, d)), table.tuned.get((m, d))
            row += [_cell(dv, pm), _cell(tv, pm), _delta(dv, tv)]
        row += [f"{d_rank[m]:.2f}" if not math.isnan(d_rank[m]) else "–",
                f"{t_rank[m]:.2f}" if not math.isnan(t_rank[m]) else "–"]
        out.loc[esc(m)] = [c.replace("–", "--") for c in row] if style == "latex" else row
    return out, budget_caption(table.studies)


def caption_head(rule: str, metric: str = "accuracy") -> str:
    return (f"Defaults vs tuned: test {metric} (%) of the fused prediction, rule {rule}; mean ± sd over the grid's "
            "seeds; Δ = tuned − defaults; – where a method was not tuned (or its tuned runs are not finished). "
            "Average rank over the settings (1 = best); in the tuned ranking a method never tuned ranks by its "
            "defaults. ")


def markdown_section(df: pd.DataFrame, studies: Sequence[StudyRecord], rule: str) -> str:
    """The section, or '' when no study of the records folder has its runs in ``df``."""
    table = side_by_side(df, studies, f"{rule}.fused.acc")
    if table is None:
        return ""
    body, budget = build(table, "markdown", md_escape)
    text = body.reset_index(names="method").to_markdown(index=False, disable_numparse=True)
    return (f"## Defaults and tuned, rule `{rule}`\n\n"
            f"**{md_escape(caption_head(rule).strip())}** {md_escape(budget)}\n\n{text}\n")


def latex_section(df: pd.DataFrame, studies: Sequence[StudyRecord], rule: str) -> str:
    table = side_by_side(df, studies, f"{rule}.fused.acc")
    if table is None:
        return ""
    body, budget = build(table, "latex", latex_escape)
    t = body.reset_index(names="method")
    return t.to_latex(index=False, escape=False, caption=latex_escape(caption_head(rule) + budget),
                      label=f"tab:tuned-{rule.replace('_', '-')}", column_format="l" + "c" * (len(t.columns) - 1),
                      position="t")
