"""Leaderboards generated from recorded runs (never edited by hand).

One long-form table (a row per finished run: method label, dataset label, seed, metrics under
every selection rule, cost) is written as CSV; markdown tables are pivoted from it: method rows
x dataset columns, mean +- std over seeds, best in bold and second underlined per column, and a
caption naming the selection rule and the seed count. A damaged record (cut, or DONE without
its final row) is left out with a DamagedRecordWarning naming it and counted in the report.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from mmbalance import records
from mmbalance.config import config_hash
from mmbalance.errors import MMBalanceError
from mmbalance.metrics import RULE_CAPTIONS, SELECTION_RULES
from mmbalance.stats import REFERENCE, compare_methods, score_table, statistics_section

METRIC_NAMES = {"acc": "accuracy", "map": "MAP", "f1": "macro-F1"}


def dataset_label(header: dict[str, Any]) -> str:
    cfg = header["config"]
    label = cfg["dataset"]
    if cfg.get("modalities"):
        label += f" [{'+'.join(cfg['modalities'])}]"
    return label


class DamagedRecordWarning(UserWarning):
    """A run folder whose record cannot be trusted was left out of a leaderboard."""


class LeaderboardFiles(tuple):
    """``(md_path, csv_path)`` as before, plus ``.skipped``: the damaged records left out, as
    (run folder, reason) pairs, and ``.pictures``: the PNG files written beside the markdown,
    so callers that unpack two paths keep working."""

    skipped: list[tuple[Path, str]]
    pictures: list[Path]

    def __new__(
        cls, md: Path, csv: Path, skipped: Sequence[tuple[Path, str]] = (), pictures: Sequence[Path] = ()
    ) -> LeaderboardFiles:
        self = super().__new__(cls, (md, csv))
        self.skipped = list(skipped)
        self.pictures = list(pictures)
        return self


def _run_row(rec: dict[str, Any], run_dir: Path, root: Path | None) -> dict[str, Any]:
    """One long-form row of a finished record (KeyError/TypeError/... when a field is missing)."""
    header = rec["header"]
    epochs = rec["epochs"]
    row: dict[str, Any] = {
        "method": header["method_label"],
        "method_name": header["config"]["method"],
        "dataset": dataset_label(header),
        "seed": header["config"]["seed"],
        "epochs": len(epochs),
        "device": header["device"],
        "config_hash": header["config_hash"],
        "cell": config_hash({k: v for k, v in header["config"].items() if k != "seed"},
                            data=header.get("data_fingerprint")),
        "_config": header["config"],
        "run_dir": str(run_dir.relative_to(root)) if root else str(run_dir),
        "epoch_time_s": sum(e["train_time_s"] for e in epochs) / max(1, len(epochs)),
        # the largest per-epoch peak: accelerator allocation on CUDA, resident set on a CPU
        "peak_mem_mb": max((e["peak_mem_mb"] for e in epochs if e.get("peak_mem_mb") is not None), default=None),
        "peak_mem_kind": next((e["peak_mem_kind"] for e in epochs if e.get("peak_mem_kind")), None),
        "protocol": header["config"].get("protocol", "honest"),
        "random_init": ", ".join(sorted(
            f"{m} ({w.get('backbone')})" for m, w in (header.get("weights") or {}).items()
            if w.get("weights") == "random" and w.get("pretrained_in_papers"))),
    }
    diag = rec["final"].get("diagnostics") or _diagnostics_file(run_dir)
    for m, probe in (diag.get("probe") or {}).items():
        row[f"probe.{m}"] = probe.get("probe_acc") if isinstance(probe, Mapping) else None
    for m, phi in (diag.get("shapley") or {}).items():
        row[f"shapley.{m}"] = phi
    if diag.get("imbalance_degree") is not None:
        row["imbalance_degree"] = diag["imbalance_degree"]
    for rule, chosen in rec["final"]["selection"].items():
        row[f"{rule}.epoch"] = chosen["epoch"]
        for part, metrics in chosen["test"].items():
            if isinstance(metrics, dict):
                for metric, value in metrics.items():
                    row[f"{rule}.{part}.{metric}"] = value
    return row


def _diagnostics_file(run_dir: Path) -> dict[str, Any]:
    """Diagnostics computed after the run by `mmbalance probe` (plain JSON), if any."""
    path = Path(run_dir) / "diagnostics.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(records.read_bytes_nofollow(path))  # never through a planted link
    except (OSError, ValueError, records.RecordError):
        return {}
    return data if isinstance(data, dict) else {}


def load_runs(
    record_dirs: Iterable[Path], root: Path | None = None
) -> tuple[list[dict[str, Any]], list[tuple[Path, str]]]:
    """Finished records, and the damaged ones with the reason.

    A folder without DONE is a run in progress (or killed, to be resumed): not counted, not
    reported. A DONE folder whose record is unreadable, cut, lacks its final row, or lacks a
    field the leaderboard needs is damaged: it is returned in the second list, never silently
    dropped, because a leaderboard quietly missing a seed looks exactly like a complete one."""
    good: list[dict[str, Any]] = []
    skipped: list[tuple[Path, str]] = []
    for run_dir in record_dirs:
        run_dir = Path(run_dir)
        if not (run_dir / records.DONE).exists():
            continue
        try:
            rec = records.load_record(run_dir)
            rec["_row"] = _run_row(rec, run_dir, root)
        except records.RecordError as exc:
            skipped.append((run_dir, str(exc)))
            continue
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            skipped.append((run_dir, f"record '{run_dir / records.RECORD}' lacks a field the leaderboard "
                                     f"needs ({type(exc).__name__}: {exc}); it is damaged or from an "
                                     f"incompatible version. {records.FRESH_HINT} '{run_dir}'."))
            continue
        good.append(rec)
    return good, skipped


def collect_runs(records_dir: Path) -> tuple[list[dict[str, Any]], list[tuple[Path, str]]]:
    """Every finished record under ``records_dir`` and every damaged one (folder, reason)."""
    return load_runs(records.find_runs(records_dir), Path(records_dir))


def warn_skipped(skipped: Iterable[tuple[Path, str]]) -> None:
    """One DamagedRecordWarning per damaged record, naming it."""
    for path, reason in skipped:
        warnings.warn(f"skipped damaged record {path}: {reason}", DamagedRecordWarning, stacklevel=3)


def runs_frame(recs: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Long form from records that went through load_runs/collect_runs."""
    rows = [rec["_row"] for rec in recs]
    df = pd.DataFrame(rows)
    if not df.empty:
        df = disambiguate(df)
    return df.drop(columns=["_config"]) if "_config" in df else df


def runs_table(record_dirs: Iterable[Path], root: Path | None = None) -> pd.DataFrame:
    """Long form: one row per finished run, one column per (rule, metric) and per modality.
    Damaged records are left out with one DamagedRecordWarning each."""
    recs, skipped = load_runs(record_dirs, root)
    warn_skipped(skipped)
    return runs_frame(recs)


def disambiguate(df: pd.DataFrame) -> pd.DataFrame:
    """Runs that share a method label and dataset but differ in configuration (other than the
    seed) must not be averaged together: their labels get the differing settings appended."""
    df = df.copy()
    for (_, _), sub in df.groupby(["method", "dataset"]):
        cells = sub.drop_duplicates("cell")
        if len(cells) < 2:
            continue
        configs = [c for c in cells["_config"]]
        keys = sorted(k for k in set().union(*configs)
                      if k != "seed" and len({repr(c.get(k)) for c in configs}) > 1)
        for idx, row in sub.iterrows():
            extra = ", ".join(f"{k}={row['_config'].get(k)}" for k in keys)
            df.at[idx, "method"] = f"{row['method']} ({extra})"
    return df


def _fmt(mean: float, std: float, n: int, n_max: int, pm: str = "±") -> str:
    if math.isnan(mean):
        return "–"
    text = f"{mean:.2f} {pm} {std:.2f}" if n > 1 else f"{mean:.2f}"
    return text + (f" (n={n})" if n != n_max else "")


# How the best and second-best cells are marked, and how ± is written, per output format.
STYLES: dict[str, tuple[str, str, str]] = {
    "markdown": ("**{}**", "<u>{}</u>", "±"),
    "latex": ("\\textbf{{{}}}", "\\underline{{{}}}", "$\\pm$"),
}


def pivot(
    df: pd.DataFrame, column: str, higher_is_better: bool = True, style: str = "markdown"
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Method x dataset table of 'mean ± std' strings, best bold and second underlined."""
    best, second, pm = STYLES[style]
    grouped = df.groupby(["method", "dataset"])[column].agg(["mean", "std", "count"]).reset_index()
    grouped["std"] = grouped["std"].fillna(0.0)
    methods = list(dict.fromkeys(df["method"]))
    datasets = sorted(dict.fromkeys(df["dataset"]))
    table = pd.DataFrame("", index=methods, columns=datasets)
    seeds: dict[str, int] = {}
    for ds in datasets:
        sub = grouped[grouped["dataset"] == ds].dropna(subset=["mean"])
        if sub.empty:
            continue
        n_max = int(sub["count"].max())
        seeds[ds] = n_max
        order = sub.sort_values("mean", ascending=not higher_is_better)["mean"].round(2).tolist()
        ranks = sorted(set(order), reverse=higher_is_better)
        for _, r in sub.iterrows():
            text = _fmt(r["mean"], r["std"], int(r["count"]), n_max, pm)
            val = round(r["mean"], 2)
            if ranks and val == ranks[0]:
                text = best.format(text)
            elif len(ranks) > 1 and val == ranks[1]:
                text = second.format(text)
            table.loc[r["method"], ds] = text
    return table, seeds


def _seed_note(seeds: dict[str, int]) -> str:
    counts = sorted(set(seeds.values()))
    if len(counts) == 1:
        return f"{counts[0]} seed{'s' if counts[0] != 1 else ''} per cell"
    return "seeds per dataset: " + ", ".join(f"{d} {n}" for d, n in seeds.items())


def context_note(df: pd.DataFrame) -> str:
    """What a reader must know to compare with the papers: the protocol and random inits."""
    notes = []
    if "protocol" in df:
        protocols = sorted(set(df["protocol"].fillna("honest")))
        notes.append("Protocol " + " and ".join(protocols) + (
            " (paper: all of train, epoch selected on test, fp32)" if "paper" in protocols else
            " (validation carved from train)"))
    if "random_init" in df:
        rand = sorted({r for r in df["random_init"].fillna("") if r})
        if rand:
            notes.append("Random init of encoders the papers start pretrained: " + "; ".join(rand))
    return (" " + ". ".join(notes) + ".") if notes else ""


def latex_escape(text: str) -> str:
    for a, b in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#"),
                 ("$", "\\$"), ("{", "\\{"), ("}", "\\}"), ("~", "\\textasciitilde{}"), ("^", "\\^{}")):
        text = text.replace(a, b)
    return text


def latex_tables(df: pd.DataFrame, rules: Sequence[str], title: str) -> str:
    """Every fused-metric table as LaTeX through pandas' writer: booktabs rules, best in bold,
    second underlined, mean $\\pm$ std, the caption naming the rule and the seed count."""
    parts = [f"% {title}: generated by `mmbalance leaderboard --format latex` from recorded runs.",
             "% Needs \\usepackage{booktabs}."]
    for rule in rules:
        for metric, name in METRIC_NAMES.items():
            col = f"{rule}.fused.{metric}"
            if col not in df or df[col].isna().all():
                continue
            table, seeds = pivot(df, col, style="latex")
            table.index = [latex_escape(str(i)) for i in table.index]
            table.columns = [latex_escape(str(c)) for c in table.columns]
            table = table.reset_index(names="method")
            caption = latex_escape(
                f"Test {name} (%) of the fused prediction, {RULE_CAPTIONS[rule]} (rule {rule}); mean ± std "
                f"over seeds, {_seed_note(seeds)}; best in bold, second underlined." + context_note(df)
            ).replace("±", "$\\pm$")
            parts.append(table.to_latex(index=False, escape=False, caption=caption, label=f"tab:{metric}-{rule.replace('_', '-')}",
                                        column_format="l" + "c" * (len(table.columns) - 1), position="t"))
    return "\n".join(parts) + "\n"


def markdown_table(table: pd.DataFrame, caption: str) -> str:
    body = table.reset_index(names="method").to_markdown(index=False)
    return f"{caption}\n\n{body}\n"


def _picture(alt: str, file: str) -> str:
    """A markdown image with a link relative to the markdown file (both in one folder)."""
    return f"![{alt}]({quote(file)})\n"


def build_report(
    df: pd.DataFrame, rules: Sequence[str], title: str, skipped: Sequence[tuple[Path, str]] = (), *,
    statistics: bool = True, reference: str = REFERENCE, pictures: Mapping[str, str] | None = None,
) -> str:
    """The markdown report: per rule the fused accuracy/MAP/F1 tables and the per-modality table;
    then (``statistics``) the Statistics section for the first rule (average ranks, Friedman,
    Nemenyi CD, paired tests against ``reference``); then the cost table. ``pictures`` maps
    'cd' and 'cost' to PNG file names beside the markdown, embedded where they belong."""
    pictures = dict(pictures or {})
    note = "Generated by `mmbalance leaderboard` from recorded runs; do not edit by hand."
    if skipped:  # in the header line, so a reader of the table knows runs are missing from it
        note += f" {len(skipped)} damaged record(s) skipped: " + ", ".join(f"`{p}`" for p, _ in skipped) + "."
    parts = [f"# {title}\n", note + "\n"]
    for rule in rules:
        for metric, name in METRIC_NAMES.items():
            col = f"{rule}.fused.{metric}"
            if col not in df or df[col].isna().all():
                continue
            table, seeds = pivot(df, col)
            caption = (
                f"**Test {name} (%) of the fused prediction, {RULE_CAPTIONS[rule]}** (rule `{rule}`); "
                f"mean ± std over seeds, {_seed_note(seeds)}; best in bold, second underlined."
                + context_note(df)
            )
            parts.append(f"## {name}, rule `{rule}`\n\n" + markdown_table(table, caption))
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
            lines.append({"method": r["method"], "dataset": ds, "s / epoch": round(r["epoch_time_s"], 2),
                          "ratio to Concat": "–" if math.isnan(ratio) else f"{ratio:.2f}"})
    devices = ", ".join(sorted(set(df["device"])))
    caption = f"**Training time per epoch** (mean over seeds; device: {devices}). Compare within one device only."
    return "## Cost\n\n" + caption + "\n\n" + pd.DataFrame(lines).to_markdown(index=False) + "\n"


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
        drawn["cd"] = plots.plot_critical_difference(compare_methods(score_table(df, col)), files["cd"], rule)
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
    one DamagedRecordWarning each and counted in the report's header line; the returned
    ``(md_path, csv_path)`` carries them as ``.skipped`` and the pictures as ``.pictures``."""
    unknown = [r for r in rules if r not in SELECTION_RULES]
    if unknown:
        raise MMBalanceError(f"Unknown selection rule(s) {unknown}; choose from {', '.join(SELECTION_RULES)}.")
    root = Path(records_dir)
    dirs = records.find_runs(root)
    recs, skipped = load_runs(dirs, root)
    warn_skipped(skipped)
    df = runs_frame(recs)
    if df.empty:
        damaged = f", {len(skipped)} damaged (see the warnings)" if skipped else ""
        raise MMBalanceError(
            f"No finished runs under '{records_dir}' ({len(dirs)} run directories, none done and "
            f"intact{damaged}). "
            f"Run cells with 'mmbalance run' or 'mmbalance grid', or point --records at the right folder."
        )
    df = df.sort_values(["dataset", "method", "seed"]).reset_index(drop=True)
    records.ensure_dir(out_dir)
    md_path, csv_path = out_dir / f"{name}.md", out_dir / f"{name}.csv"
    records.atomic_write_text(csv_path, df.to_csv(index=False))
    shown = [(p.relative_to(root) if p.is_relative_to(root) else p, why) for p, why in skipped]
    drawn = write_pictures(df, out_dir, name, rules[0], statistics) if pictures and rules else {}
    report = build_report(df, rules, title or name, shown, statistics=statistics, reference=reference,
                          pictures={k: p.name for k, p in drawn.items()})
    records.atomic_write_text(md_path, report)
    files = LeaderboardFiles(md_path, csv_path, skipped, list(drawn.values()))
    files.latex = []
    if latex:
        tex_path = out_dir / f"{name}.tex"
        records.atomic_write_text(tex_path, latex_tables(df, rules, title or name))
        files.latex.append(tex_path)
    return files
