"""Leaderboards generated from recorded runs (never edited by hand).

One long-form table (a row per finished run: method label, dataset label, seed, metrics under
every selection rule, cost) is written as CSV; markdown tables are pivoted from it: method rows
x dataset columns, mean +- std over seeds, best in bold and second underlined per column, and a
caption naming the selection rule and the seed count. Runs are read and grouped by
``mmbalance.report_runs`` (a row is one method with one result-relevant configuration, a
column one data set); this module only lays them out. A damaged record (cut, DONE without its
final row, a metric that is not a number) is left out with a DamagedRecordWarning naming it
and counted in the report; a run found in two folders is counted once with a
DuplicateRunWarning naming both. Labels are escaped for each format (``mmbalance.markup``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from mmbalance import records, tuned_table
from mmbalance.errors import MMBalanceError
from mmbalance.markup import latex_escape, md_code, md_escape
from mmbalance.metrics import RULE_CAPTIONS, SELECTION_RULES
from mmbalance.report_runs import (  # noqa: F401 - re-exported: callers import them from here
    DamagedRecordWarning,
    DuplicateRunWarning,
    LoadedRuns,
    collect_runs,
    dataset_label,
    duplicate_message,
    load_runs,
    public_columns,
    runs_frame,
    runs_table,
    settings_notes,
    warn_duplicates,
    warn_skipped,
)
from mmbalance.stats import (
    REFERENCE,
    compare_methods,
    main_rank_runs,
    score_table,
    statistics_section,
)

METRIC_NAMES = {"acc": "accuracy", "map": "MAP", "f1": "macro-F1"}


class LeaderboardFiles(tuple):
    """``(md_path, csv_path)`` as before, plus ``.skipped``: the damaged records left out, as
    (run folder, reason) pairs, ``.duplicates``: (kept folder, copy) pairs of a run found
    twice, and ``.pictures``: the PNG files written beside the markdown, so callers that
    unpack two paths keep working."""

    skipped: list[tuple[Path, str]]
    duplicates: list[tuple[Path, Path]]
    pictures: list[Path]

    def __new__(
        cls, md: Path, csv: Path, skipped: Sequence[tuple[Path, str]] = (), pictures: Sequence[Path] = (),
        duplicates: Sequence[tuple[Path, Path]] = (),
    ) -> LeaderboardFiles:
        self = super().__new__(cls, (md, csv))
        self.skipped = list(skipped)
        self.duplicates = list(duplicates)
        self.pictures = list(pictures)
        return self


def _fmt(mean: float, std: float, finite: int, runs: int, n_max: int, pm: str = "±") -> str:
    """'mean ± std' over the finite values of a cell's ``runs`` runs; the count shows when it is
    not the column's usual one, and every NaN is counted in the cell (a NaN never removes a
    seed silently)."""
    if finite == 0:
        return f"NaN (n={runs})"
    text = f"{mean:.2f} {pm} {std:.2f}" if finite > 1 else f"{mean:.2f}"
    if finite < runs:
        return text + f" (n={finite} of {runs}, {runs - finite} NaN)"
    return text + (f" (n={runs})" if runs != n_max else "")


# How the best and second-best cells are marked, and how ± is written, per output format.
STYLES: dict[str, tuple[str, str, str]] = {
    "markdown": ("**{}**", "<u>{}</u>", "±"),
    "latex": ("\\textbf{{{}}}", "\\underline{{{}}}", "$\\pm$"),
}

_FUSED_METRIC = re.compile(r"^(?P<rule>[a-z_]+)\.fused\.[A-Za-z0-9_]+$")


def _has_result(df: pd.DataFrame, column: str) -> pd.Series:
    """Which runs have a result in ``column``: for a fused metric, every run whose record has
    that selection rule (its value may be NaN, and is then shown as such); otherwise the runs
    with a value (a method without per-modality heads has no per-modality accuracy)."""
    match = _FUSED_METRIC.match(column)
    if match and f"{match['rule']}.epoch" in df:
        return df[f"{match['rule']}.epoch"].notna()
    return df[column].notna()


def pivot(
    df: pd.DataFrame, column: str, higher_is_better: bool = True, style: str = "markdown"
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Method x dataset table of 'mean ± std' strings, best bold and second underlined.

    Labels stay as they are (the renderers escape them); a cell counts every run that has a
    result, NaN included (shown as ``n=2 of 3, 1 NaN``, or ``NaN (n=3)``), and ranks on the
    mean of the finite values."""
    best, second, pm = STYLES[style]
    methods = list(dict.fromkeys(df["method"]))
    datasets = sorted(dict.fromkeys(df["dataset"]))
    table = pd.DataFrame("", index=methods, columns=datasets)
    values = df[_has_result(df, column)]
    seeds: dict[str, int] = {}
    if values.empty:
        return table, seeds
    grouped = (values.groupby(["method", "dataset"])[column]
               .agg(mean="mean", std="std", finite="count", runs="size").reset_index())
    grouped["std"] = grouped["std"].fillna(0.0)
    for ds in datasets:
        sub = grouped[grouped["dataset"] == ds]
        if sub.empty:
            continue
        n_max = int(sub["runs"].max())
        seeds[ds] = n_max
        ranks = sorted(set(sub["mean"].dropna().round(2)), reverse=higher_is_better)
        for _, r in sub.iterrows():
            text = _fmt(r["mean"], r["std"], int(r["finite"]), int(r["runs"]), n_max, pm)
            if not math.isnan(r["mean"]):
                val = round(r["mean"], 2)
                if ranks and val == ranks[0]:
                    text = best.format(text)
                elif len(ranks) > 1 and val == ranks[1]:
                    text = second.format(text)
            table.loc[r["method"], ds] = text
    return table, seeds


def _seed_note(seeds: dict[str, int], esc=md_escape) -> str:
    counts = sorted(set(seeds.values()))
    if len(counts) == 1:
        return f"{counts[0]} seed{'s' if counts[0] != 1 else ''} per cell"
    return "seeds per dataset: " + ", ".join(f"{esc(d)} {n}" for d, n in seeds.items())


def context_note(df: pd.DataFrame, esc=md_escape) -> str:
    """What a reader must know to compare with the papers: the protocol and random inits."""
    notes = []
    if "protocol" in df:
        protocols = sorted(set(df["protocol"].fillna("honest")))
        notes.append("Protocol " + " and ".join(esc(p) for p in protocols) + (
            " (paper: all of train, epoch selected on test, fp32)" if "paper" in protocols else
            " (validation carved from train)"))
    if "random_init" in df:
        rand = sorted({r for r in df["random_init"].fillna("") if r})
        if rand:
            notes.append("Random init of encoders the papers start pretrained: " + "; ".join(esc(r) for r in rand))
    return (" " + ". ".join(notes) + ".") if notes else ""


def _plain(text: object) -> str:
    return str(text)


def latex_table(table: pd.DataFrame, caption: str, label: str, *, first: str = "method") -> str:
    """One booktabs table: row and column labels escaped, cells as given (already in LaTeX,
    from ``pivot(..., style="latex")``), ``caption`` plain text (escaped here)."""
    t = table.copy()
    t.index = [latex_escape(i) for i in t.index]
    t.columns = [latex_escape(c) for c in t.columns]
    t = t.reset_index(names=first)
    return t.to_latex(index=False, escape=False, caption=latex_escape(caption), label=label,
                      column_format="l" + "c" * (len(t.columns) - 1), position="t")


def latex_tables(df: pd.DataFrame, rules: Sequence[str], title: str) -> str:
    """Every fused-metric table as LaTeX through pandas' writer: booktabs rules, best in bold,
    second underlined, mean $\\pm$ std, the caption naming the rule and the seed count."""
    parts = [f"% {latex_escape(title)}: generated by `mmbalance leaderboard --format latex` from recorded runs.",
             "% Needs \\usepackage{booktabs}."]
    for rule in rules:
        for metric, name in METRIC_NAMES.items():
            col = f"{rule}.fused.{metric}"
            if col not in df or not _has_result(df, col).any():
                continue
            table, seeds = pivot(df, col, style="latex")
            caption = (f"Test {name} (%) of the fused prediction, {RULE_CAPTIONS[rule]} (rule {rule}); mean ± std "
                       f"over seeds, {_seed_note(seeds, _plain)}; best in bold, second underlined."
                       + context_note(df, _plain))
            parts.append(latex_table(table, caption, f"tab:{metric}-{rule.replace('_', '-')}"))
    return "\n".join(parts) + "\n"


def markdown_table(table: pd.DataFrame, caption: str, *, escape_columns: bool = True, first: str = "method") -> str:
    """A caption and a markdown table; row labels (and column labels unless the caller built
    them in markdown) are escaped, cells are written as given (numbers and our own markup)."""
    t = table.copy()
    t.index = [md_escape(i) for i in t.index]
    if escape_columns:
        t.columns = [md_escape(c) for c in t.columns]
    body = t.reset_index(names=first).to_markdown(index=False, disable_numparse=True)
    return f"{caption}\n\n{body}\n"


def _picture(alt: str, file: str) -> str:
    """A markdown image with a link relative to the markdown file (both in one folder)."""
    return f"![{alt}]({quote(file)})\n"


def header_notes(
    skipped: Sequence[tuple[Path, str]] = (), duplicates: Sequence[tuple[Path, Path]] = (),
) -> str:
    """What the header line says about runs not counted: damaged records, copies of a run."""
    note = ""
    if skipped:  # in the header line, so a reader of the table knows runs are missing from it
        note += f" {len(skipped)} damaged record(s) skipped: " + ", ".join(md_code(p) for p, _ in skipped) + "."
    if duplicates:
        note += (f" {len(duplicates)} run folder(s) held a run already read from another folder, counted "
                 "once: " + "; ".join(f"{md_code(c)} (a copy of {md_code(k)})" for k, c in duplicates) + ".")
    return note


def settings_line(df: pd.DataFrame) -> str:
    """One markdown line naming every setting the runs changed from their defaults."""
    notes = settings_notes(df)
    if not notes:
        return ""
    parts = [f"{kind}: {md_code(text)}" if label is None else f"{kind} {md_escape(label)}: {md_code(text)}"
             for kind, label, text in notes]
    return "Settings that differ from each method's defaults on its dataset: " + "; ".join(parts) + "."


def build_report(
    df: pd.DataFrame, rules: Sequence[str], title: str, skipped: Sequence[tuple[Path, str]] = (), *,
    statistics: bool = True, reference: str = REFERENCE, pictures: Mapping[str, str] | None = None,
    duplicates: Sequence[tuple[Path, Path]] = (), tuned: str = "",
) -> str:
    """The markdown report: per rule the fused accuracy/MAP/F1 tables and the per-modality table;
    then (``statistics``) the Statistics section for the first rule (average ranks, Friedman,
    Nemenyi CD, paired tests against ``reference``); then the cost table. ``tuned``: the
    defaults vs tuned section (``tuned_table``), after the first rule's tables. ``pictures`` maps
    'cd' and 'cost' to PNG file names beside the markdown, embedded where they belong."""
    pictures = dict(pictures or {})
    note = "Generated by `mmbalance leaderboard` from recorded runs; do not edit by hand."
    note += header_notes(skipped, duplicates)
    parts = [f"# {md_escape(title)}\n", note + "\n"]
    settings = settings_line(df)
    if settings:
        parts.append(settings + "\n")
    for rule in rules:
        for metric, name in METRIC_NAMES.items():
            col = f"{rule}.fused.{metric}"
            if col not in df or not _has_result(df, col).any():
                continue
            table, seeds = pivot(df, col)
            caption = (
                f"**Test {name} (%) of the fused prediction, {RULE_CAPTIONS[rule]}** (rule `{rule}`); "
                f"mean ± std over seeds, {_seed_note(seeds)}; best in bold, second underlined."
                + context_note(df)
            )
            parts.append(f"## {name}, rule `{rule}`\n\n" + markdown_table(table, caption))
        if rule == rules[0] and tuned:
            parts.append(tuned)
        per_mod = _per_modality(df, rule)
        if per_mod:
            parts.append(per_mod)
    diag = diagnostics_section(df)
    if diag:
        parts.append(diag)
    if statistics and rules:
        cd = pictures.get("cd")
        parts.append(statistics_section(df, rules[0], reference, cd_picture=quote(cd) if cd else None))
    parts.append(_cost_table(df))
    if pictures.get("cost"):
        parts.append(_picture("Training time per epoch", pictures["cost"]))
    return "\n".join(parts)


def _per_modality(df: pd.DataFrame, rule: str) -> str:
    rows = []
    prefix = f"{rule}."
    for _, r in df.iterrows():
        for col, value in r.items():
            if isinstance(col, str) and col.startswith(prefix) and col.endswith(".acc"):
                part = col[len(prefix) : -len(".acc")]
                if part != "fused" and not (isinstance(value, float) and math.isnan(value)):
                    rows.append({"method": r["method"], "dataset": f"{r['dataset']} · {part}", "value": value})
    if not rows:
        return ""
    long = pd.DataFrame(rows)
    table, seeds = pivot(long, "value")
    caption = (
        f"**Per-modality test accuracy (%)** (each modality's own head; for methods trained with the "
        f"fused loss only, the fused head's per-modality part), rule `{rule}`; {_seed_note(seeds)}."
    )
    return f"## Per-modality accuracy, rule `{rule}`\n\n" + markdown_table(table, caption)


def _diagnostic_long(df: pd.DataFrame, prefix: str) -> pd.DataFrame:
    rows = []
    for _, r in df.iterrows():
        for col, value in r.items():
            if isinstance(col, str) and col.startswith(prefix) and value == value and value is not None:
                rows.append({"method": r["method"], "dataset": f"{r['dataset']} · {col[len(prefix):]}",
                             "value": float(value)})
    return pd.DataFrame(rows)


def diagnostics_section(df: pd.DataFrame) -> str:
    """The imbalance diagnostics recorded at the end of every run: a linear probe of each frozen
    encoder (compare a method's row with the Unimodal row: the same encoder trained alone) and
    each modality's Shapley contribution to the fused accuracy."""
    parts = []
    probe = _diagnostic_long(df, "probe.")
    if not probe.empty:
        table, seeds = pivot(probe, "value")
        parts.append(markdown_table(table, (
            "**Linear probe of each frozen encoder (test accuracy, %)**: scikit-learn logistic regression "
            "on the encoder's train-split features after training; an under-trained encoder scores low. "
            f"The Unimodal rows are the same encoder trained alone; {_seed_note(seeds)}.")))
    shap = _diagnostic_long(df, "shapley.")
    if not shap.empty:
        table, seeds = pivot(shap, "value")
        parts.append(markdown_table(table, (
            "**Shapley contribution of each modality to the fused test accuracy (points)**, from "
            "evaluations with absent (blank) modalities; the contributions sum to the fused accuracy "
            f"minus the all-absent accuracy; {_seed_note(seeds)}.")))
    return ("## Imbalance diagnostics\n\n" + "\n".join(parts)) if parts else ""


def _cost_table(df: pd.DataFrame) -> str:
    grouped = df.groupby(["method", "dataset"])["epoch_time_s"].mean().reset_index()
    lines = []
    for ds, sub in grouped.groupby("dataset"):
        base = sub[sub["method"] == "Concat"]["epoch_time_s"]
        base_t = float(base.iloc[0]) if len(base) else float("nan")
        for _, r in sub.iterrows():
            ratio = r["epoch_time_s"] / base_t if base_t == base_t and base_t > 0 else float("nan")
            lines.append({"method": md_escape(r["method"]), "dataset": md_escape(ds),
                          "s / epoch": f"{r['epoch_time_s']:.2f}",
                          "ratio to Concat": "–" if math.isnan(ratio) else f"{ratio:.2f}"})
    devices = ", ".join(md_escape(d) for d in sorted(set(map(str, df["device"]))))
    caption = f"**Training time per epoch** (mean over seeds; device: {devices}). Compare within one device only."
    return ("## Cost\n\n" + caption + "\n\n" + pd.DataFrame(lines).to_markdown(index=False, disable_numparse=True)
            + "\n")


def _relative(path: Path, root: Path) -> Path:
    return path.relative_to(root) if path.is_relative_to(root) else path


def write_pictures(df: pd.DataFrame, out_dir: Path, name: str, rule: str, statistics: bool = True) -> dict[str, Path]:
    """Draw the leaderboard's pictures beside its markdown: ``<name>_cd.png`` (critical-difference
    diagram for ``rule``, when a Friedman/Nemenyi analysis is possible and ``statistics``) and
    ``<name>_cost.png``. A picture that cannot be drawn this time is removed if an older one is
    there, so the folder never shows a diagram the markdown no longer describes."""
    from mmbalance import plots  # matplotlib is imported only when pictures are wanted

    files = {"cd": Path(out_dir) / f"{name}_cd.png", "cost": Path(out_dir) / f"{name}_cost.png"}
    drawn: dict[str, Path | None] = {"cd": None, "cost": None}
    col = f"{rule}.fused.acc"
    if statistics and col in df and not df[col].isna().all():
        drawn["cd"] = plots.plot_critical_difference(compare_methods(score_table(main_rank_runs(df), col)), files["cd"], rule)
    drawn["cost"] = plots.plot_cost(df, files["cost"])
    for key, path in files.items():
        if drawn[key] is None:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise records.RecordsIOError(f"Cannot remove the stale picture '{path}': {exc}.") from exc
    return {k: p for k, p in drawn.items() if p is not None}


def write_leaderboard(
    records_dir: Path, out_dir: Path, name: str = "leaderboard", rules: Sequence[str] = ("best_val", "best_test", "last"),
    title: str | None = None, *, pictures: bool = True, statistics: bool = True, reference: str = REFERENCE,
    latex: bool = False,
) -> LeaderboardFiles:
    """Read every finished run under ``records_dir`` and write ``<name>.md`` and ``<name>.csv``.

    With ``statistics`` the report has a Statistics section for the first rule (average ranks,
    Friedman p, Nemenyi CD, paired tests over seeds against ``reference``); with ``pictures``
    the CD diagram and the cost chart are drawn beside the markdown as ``<name>_cd.png`` and
    ``<name>_cost.png`` and embedded in it (relative links). Damaged records are skipped with
    one DamagedRecordWarning each and counted in the report's header line, copies of a run
    counted once with one DuplicateRunWarning each and named there too; the returned
    ``(md_path, csv_path)`` carries them as ``.skipped`` and ``.duplicates`` and the pictures
    as ``.pictures``."""
    unknown = [r for r in rules if r not in SELECTION_RULES]
    if unknown:
        raise MMBalanceError(f"Unknown selection rule(s) {unknown}; choose from {', '.join(SELECTION_RULES)}.")
    root = Path(records_dir)
    dirs = records.find_runs(root)
    loaded = load_runs(dirs, root)
    recs, skipped = loaded
    warn_skipped(skipped)
    warn_duplicates(loaded.duplicates)
    df = runs_frame(recs)
    if df.empty:
        damaged = f", {len(skipped)} damaged (see the warnings)" if skipped else ""
        raise MMBalanceError(
            f"No finished runs under '{records_dir}' ({len(dirs)} run directories, none done and "
            f"intact{damaged}). "
            f"Run cells with 'mmbalance run' or 'mmbalance grid', or point --records at the right folder."
        )
    df = df.sort_values(["dataset", "method", "seed"]).reset_index(drop=True)
    studies = tuned_table.read_studies(root)
    df, defaults = tuned_table.split_tuned(df, studies)
    records.ensure_dir(out_dir)
    md_path, csv_path = out_dir / f"{name}.md", out_dir / f"{name}.csv"
    records.atomic_write_text(csv_path, public_columns(df).to_csv(index=False))
    shown = [(_relative(p, root), why) for p, why in skipped]
    copies = [(_relative(k, root), _relative(c, root)) for k, c in loaded.duplicates]
    drawn = write_pictures(defaults, out_dir, name, rules[0], statistics) if pictures and rules else {}
    tuned = tuned_table.markdown_section(df, studies, rules[0]) if rules else ""
    report = build_report(defaults, rules, title or name, shown, statistics=statistics, reference=reference,
                          pictures={k: p.name for k, p in drawn.items()}, duplicates=copies, tuned=tuned)
    records.atomic_write_text(md_path, report)
    files = LeaderboardFiles(md_path, csv_path, skipped, list(drawn.values()), loaded.duplicates)
    files.latex = []
    if latex:
        tex_path = out_dir / f"{name}.tex"
        tex = latex_tables(defaults, rules, title or name)
        if rules:
            tex += tuned_table.latex_section(df, studies, rules[0])
        records.atomic_write_text(tex_path, tex)
        files.latex.append(tex_path)
    return files
