"""The benchmark report in the shapes of the IPRM paper's tables, generated from recorded runs.

Table 1: IPRM against each modality trained alone and the naive fusions (accuracy).
Table 2: IPRM against the rebalancing methods (accuracy, MAP, macro-F1): every method that is
not unimodal training, a naive fusion or IPRM, third-party plugins included.
Table 3: IPRM's ablations and its other variants (accuracy).
Table 4: cost: training seconds per epoch, the ratio to joint training (Concat), and the peak
memory of an epoch (the accelerator's peak allocation on a GPU, the process's peak resident
set on a CPU).
Then IPRM's sensitivity to alpha (its runs that differ from IPRM only in alpha, as a table and
a picture), the statistics across settings (average ranks, Friedman, Nemenyi CD, paired tests
against Concat + unimodal CEs) over the methods of Tables 1 and 2 that ran on every setting,
the imbalance diagnostics, and the pictures (CD diagram, cost chart).

Rows are the leaderboard's rows (``mmbalance.report_runs``: one method with one
result-relevant configuration) and are placed by the method that made them and the settings
that set them apart, never by matching label text, so a renamed or a new method cannot vanish.
A row that no table shows, and a picture that cannot be drawn, is named in a LeftOutWarning
and in the report's header. The header also says how many runs the report read and what they
were trained with (recipe per setting, numerics, per-dataset method values, wall time of the
records). ``latex=True`` writes the same tables as booktabs LaTeX.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from mmbalance import records, tuned_table
from mmbalance.errors import MMBalanceError
from mmbalance.imbalance_tables import (
    TableError,
    missing_modality_robustness,
    robustness_markdown,
    weights_markdown,
    weights_vs_strength,
)
from mmbalance.leaderboard import (
    METRIC_NAMES,
    _has_result,
    _seed_note,
    context_note,
    diagnostics_section,
    header_notes,
    latex_table,
    markdown_table,
    pivot,
    settings_line,
)
from mmbalance.markup import latex_escape, markdown_to_plain, md_code, md_escape
from mmbalance.metrics import RULE_CAPTIONS
from mmbalance.report_runs import (
    load_runs,
    public_columns,
    runs_frame,
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
from mmbalance.stats_control import compare_with_control, control_markdown

JOINT = "Concat"  # joint training: the reference of the cost ratios
NAIVE = ("Concat", "Sum", "Weight", "Concat + uni CE")  # the order of the naive rows
REBALANCING = ("OGR-GB", "MSLR", "OGM-GE", "PMR", "AGM", "MMPareto", "ReconBoost", "MLA", "LFM")  # their order
IPRM = "IPRM"
ABLATIONS = ("IPRM (L-Mixup)", "IPRM (w/o EMA)", "IPRM (One-Pass)", "IPRM (unpaired)")
# which table a row goes to is decided by the method that made it
UNIMODAL_METHODS = ("unimodal",)
NAIVE_METHODS = ("concat", "sum", "weight")
IPRM_METHOD = "iprm"
# the recipe keys shown per setting in the header
RECIPE_KEYS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "scheduler", "embed_dim")


class LeftOutWarning(UserWarning):
    """A row of the runs that no table of the paper layout shows, or a picture not drawn."""


@dataclass
class Placement:
    """The rows (labels) of each part of the paper layout, in the order they are shown."""

    unimodal: list[str] = field(default_factory=list)
    naive: list[str] = field(default_factory=list)
    rebalancing: list[str] = field(default_factory=list)  # any method other than the above and IPRM
    iprm: list[str] = field(default_factory=list)  # IPRM at its defaults
    variants: list[str] = field(default_factory=list)  # IPRM's ablations and other variants
    alpha: list[str] = field(default_factory=list)  # IPRM differing from its defaults in alpha only

    @property
    def joint(self) -> list[str]:
        return [JOINT] if JOINT in self.naive else []

    def table1(self) -> list[str]:
        return [*self.unimodal, *self.naive, *self.iprm]

    def table2(self) -> list[str]:
        return [*self.joint, *self.rebalancing, *self.iprm]

    def table3(self) -> list[str]:
        return [*self.joint, *self.iprm, *self.variants] if self.variants else []

    def alpha_table(self) -> list[str]:
        return [*self.iprm, *self.alpha] if self.alpha else []

    def compared(self) -> list[str]:
        """The rows of the statistics across settings: Tables 1 and 2 without unimodal rows."""
        return [*self.naive, *self.rebalancing, *self.iprm]

    def cost(self) -> list[str]:
        return [*self.unimodal, *self.naive, *self.rebalancing, *self.iprm, *self.variants]


def _ordered(labels: Iterable[str], first: Sequence[str]) -> list[str]:
    labels = set(labels)
    return [x for x in first if x in labels] + sorted(labels - set(first))


def place_rows(df: pd.DataFrame) -> Placement:
    """Every row of ``df`` in its part of the layout, by the method that made it
    (``method_name``) and the settings that set it apart (``_row_settings``)."""
    rows = df.drop_duplicates("method")
    settings = dict(zip(rows["method"], rows["_row_settings"], strict=True))
    by_method = dict(zip(rows["method"], rows["method_name"], strict=True))
    out = Placement()
    iprm_rows = [m for m, name in by_method.items() if name == IPRM_METHOD]
    out.unimodal = sorted(m for m, name in by_method.items() if name in UNIMODAL_METHODS)
    out.naive = _ordered((m for m, name in by_method.items() if name in NAIVE_METHODS), NAIVE)
    out.rebalancing = _ordered((m for m, name in by_method.items()
                                if name not in (*UNIMODAL_METHODS, *NAIVE_METHODS, IPRM_METHOD)), REBALANCING)
    out.iprm = _ordered((m for m in iprm_rows if not settings[m]), [IPRM])
    out.alpha = sorted((m for m in iprm_rows if settings[m] and set(settings[m]) <= {"alpha"}),
                       key=lambda m: (float(settings[m]["alpha"]), m))
    out.variants = _ordered((m for m in iprm_rows if m not in out.iprm and m not in out.alpha), ABLATIONS)
    return out


def _rows(df: pd.DataFrame, wanted: Sequence[str]) -> pd.DataFrame:
    present = [m for m in wanted if m in set(df["method"])]
    sub = df[df["method"].isin(present)].copy()
    sub["_order"] = sub["method"].map({m: i for i, m in enumerate(present)})
    return sub.sort_values(["_order", "dataset", "seed"]).drop(columns="_order")


@dataclass
class PaperTable:
    """One table of the layout in both formats: the heading, the markdown caption, and the
    cells per style ('markdown', 'latex'; labels as recorded, escaped when rendered)."""

    heading: str
    caption: str
    cells: dict[str, pd.DataFrame]
    label: str
    split_columns: bool = False  # columns are (setting, metric) pairs
    plain_caption: str = ""  # the caption as plain text (labels unescaped), for LaTeX

    def shown_rows(self) -> set[str]:
        """The rows with at least one filled cell."""
        table = self.cells["markdown"]
        return {m for m in table.index if (table.loc[m] != "").any()}

    def markdown(self) -> str:
        table = self.cells["markdown"]
        if self.split_columns:
            table = table.copy()
            table.columns = [f"{md_escape(s)}<br>{METRIC_NAMES[m]}" for s, m in table.columns]
        return markdown_table(table, self.caption, escape_columns=not self.split_columns)

    def latex(self) -> str:
        table = self.cells["latex"]
        if self.split_columns:
            table = table.copy()
            table.columns = [f"{s} {METRIC_NAMES[m]}" for s, m in table.columns]
        return latex_table(table, markdown_to_plain(self.plain_caption or self.caption), f"tab:{self.label}")


def table_accuracy(df: pd.DataFrame, methods: Sequence[str], rule: str, caption: str, label: str) -> PaperTable | None:
    sub = _rows(df, methods)
    if sub.empty:
        return None
    cells = {}
    for style in ("markdown", "latex"):
        cells[style], seeds = pivot(sub, f"{rule}.fused.acc", style=style)
    def caption_for(esc: Callable[[Any], str]) -> str:
        return (f"{caption} Test accuracy (%), {RULE_CAPTIONS[rule]} (rule `{rule}`); mean ± std over seeds, "
                f"{_seed_note(seeds, esc)}; best in bold, second underlined.")

    return PaperTable("", caption_for(md_escape), cells, label, plain_caption=caption_for(str))


def table_metrics(df: pd.DataFrame, methods: Sequence[str], rule: str, caption: str, label: str) -> PaperTable | None:
    """One column per (setting, metric): the paper's accuracy / MAP / macro-F1 layout."""
    sub = _rows(df, methods)
    metrics = [m for m in METRIC_NAMES if f"{rule}.fused.{m}" in sub and _has_result(sub, f"{rule}.fused.{m}").any()]
    if sub.empty or not metrics:
        return None
    cells, seeds = {}, {}
    for style in ("markdown", "latex"):
        parts = {}
        for metric in metrics:
            parts[metric], seeds = pivot(sub, f"{rule}.fused.{metric}", style=style)
        first = parts[metrics[0]]
        table = pd.DataFrame(index=first.index)
        for setting in first.columns:
            for metric in metrics:
                table[(setting, metric)] = parts[metric][setting]
        cells[style] = table
    def caption_for(esc: Callable[[Any], str]) -> str:
        return (f"{caption} Test accuracy, MAP and macro-F1 (%), {RULE_CAPTIONS[rule]} (rule `{rule}`); mean ± "
                f"std over seeds, {_seed_note(seeds, esc)}; best in bold, second underlined per column.")

    return PaperTable("", caption_for(md_escape), cells, label, split_columns=True, plain_caption=caption_for(str))


def _mean(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.mean()) if len(values) else float("nan")


def table_cost(df: pd.DataFrame, methods: Sequence[str]) -> PaperTable | None:
    """Seconds per training epoch, ratio to joint training on the same setting, peak memory."""
    sub = _rows(df, methods)
    if sub.empty:
        return None
    settings = sorted(dict.fromkeys(sub["dataset"]))
    rows = list(dict.fromkeys(sub["method"]))
    cells = {style: pd.DataFrame("", index=rows, columns=settings) for style in ("markdown", "latex")}
    for setting in settings:
        here = sub[sub["dataset"] == setting]
        joint = _mean(here[here["method"] == JOINT]["epoch_time_s"])
        for method, runs in here.groupby("method", sort=False):
            secs = _mean(runs["epoch_time_s"])
            ratio = f"{secs / joint:.2f}×" if joint == joint and joint > 0 else "–"
            mem = _mean(runs["peak_mem_mb"]) if "peak_mem_mb" in runs else float("nan")
            text = f"{secs:.2f} s · {ratio} · " + ("–" if math.isnan(mem) else f"{mem:.0f} MB")
            cells["markdown"].loc[method, setting] = text
            cells["latex"].loc[method, setting] = latex_escape(text)
    kinds = sorted({k for k in sub.get("peak_mem_kind", pd.Series(dtype=str)).dropna()})
    memory = {"cuda_max_allocated": "the accelerator's peak allocation in the epoch",
              "rss_peak_epoch": "the process's peak resident set in the epoch (Linux VmHWM, reset at each "
                                "epoch start; it includes the Python and PyTorch runtime, about 0.8 GB here)",
              "rss_peak_process": "the process's lifetime peak resident set"}

    def caption_for(esc: Callable[[Any], str]) -> str:
        devices = ", ".join(esc(d) for d in sorted(set(map(str, sub["device"]))))
        return (
            f"**Table 4. Cost.** Per setting: training seconds per epoch (mean over epochs and seeds; the "
            f"method's own estimation passes included, evaluation excluded) · the ratio to joint training "
            f"({JOINT}) on the same setting · peak memory, the largest over epochs, mean over seeds: "
            + "; ".join(memory.get(k, esc(k)) for k in kinds or ["–"])
            + f". Device: {devices}; the cells of a grid ran two at a time, one thread each, so compare "
            f"ratios rather than absolute seconds."
        )

    return PaperTable("", caption_for(md_escape), cells, "cost", plain_caption=caption_for(str))


def _parse_time(text: Any) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(str(text))
    except ValueError:
        return None


def busy_seconds(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals: the time at least one was open."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def wall_time(recs: Sequence[Mapping[str, Any]], root: Path) -> tuple[float, float, int] | None:
    """How long the records took to produce: (seconds with at least one run running, seconds
    from the first start to the last finish, number of runs).

    A run's running interval is its last segment's start to its DONE marker; the first
    figure is their union, so a pause between an interrupted and a resumed grid does not
    count, nor does a cell rerun later (the work of a resumed run's earlier segments, whose
    end is not recorded, does not count either). The span counts everything."""
    intervals, starts = [], []
    for rec in recs:
        segs = [_parse_time(seg.get("started")) for seg in
                rec["header"].get("segments") or [{"started": rec["header"].get("started")}]]
        segs = [t for t in segs if t]
        try:
            done = json.loads((root / rec["_row"]["run_dir"] / records.DONE).read_text())
            end = _parse_time(done.get("finished"))
        except (OSError, ValueError, TypeError):
            end = None
        if segs:
            starts.append(min(segs))
        if segs and end:
            intervals.append((max(segs).timestamp(), end.timestamp()))
    if not intervals:
        return None
    span = max(e for _, e in intervals) - min(t.timestamp() for t in starts)
    return busy_seconds(intervals), span, len(recs)


def _recipes(recs: Sequence[Mapping[str, Any]], columns: Mapping[str, str]) -> list[str]:
    """Per leaderboard column (``columns``: run folder -> column label), the recipe of its
    first run."""
    seen: dict[str, str] = {}
    for rec in recs:
        cfg = rec["header"]["config"]
        label = columns.get(str(rec.get("run_dir")), str(cfg.get("dataset")))
        if label in seen:
            continue
        used = set(rec["header"].get("modalities") or [])
        backbones = ", ".join(f"{m}: {v.get('name', '?')}" for m, v in sorted((cfg.get("backbone") or {}).items())
                              if isinstance(v, Mapping) and (not used or m in used))
        parts = [f"{k} {cfg[k]}" for k in RECIPE_KEYS if k in cfg]
        if cfg.get("eval_batch_size"):  # unset: twice batch_size
            parts.append(f"eval_batch_size {cfg['eval_batch_size']}")
        seen[label] = (md_code(label) + ": " + md_escape(", ".join(parts))
                       + (f"; encoders {md_escape(backbones)}" if backbones else ""))
    return [seen[k] for k in sorted(seen)]


def _numerics(recs: Sequence[Mapping[str, Any]]) -> str:
    combos = sorted({(_amp_label(r["header"]), str(r["header"]["config"].get("memory_format", "contiguous")),
                      _device_label(r["header"])) for r in recs})
    return md_escape("; ".join(f"amp={a}, memory_format={m} on {d}" for a, m, d in combos))


def _amp_label(header: Mapping[str, Any]) -> str:
    """The amp setting, and for ``auto`` the precision it resolved to on that machine."""
    amp = str(header["config"].get("amp"))
    if amp != "auto" or header.get("amp") is None:
        return amp
    return f"auto ({'bf16' if header['amp'] == 'bfloat16' else 'fp32'})"


def _device_label(header: Mapping[str, Any]) -> str:
    """The device, and on a CPU the kernels that set the rounding (records since they are kept)."""
    device = str(header.get("device"))
    kernels = records.cpu_kernels_label(header.get("cpu_kernels")) if device == "cpu" else None
    return f"{device} ({kernels} kernels)" if kernels else device


def _per_dataset_values(recs: Sequence[Mapping[str, Any]]) -> str:
    """What a method sets per dataset (its paper values), from the registry, for the cells here."""
    from mmbalance.registry import DATASETS, METHODS

    found = []
    for method, dataset in sorted({(r["header"]["config"]["method"], r["header"]["config"]["dataset"]) for r in recs}):
        try:
            m_cls, d_cls = METHODS.get(method), DATASETS.get(dataset)
        except MMBalanceError:
            continue
        values = {**getattr(m_cls, "dataset_defaults", {}).get(dataset, {}), **d_cls.method_defaults.get(method, {})}
        if values:
            found.append(f"{method} on {dataset}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    return md_escape("; ".join(found)) if found else "none (every method runs with its own defaults on every setting here)"


def header_section(
    recs: Sequence[Mapping[str, Any]], df: pd.DataFrame, root: Path, grid: str | None,
    left_out: Sequence[tuple[str, str]] = (), not_drawn: Sequence[tuple[str, str]] = (),
) -> str:
    lines = [f"Read {len(recs)} finished runs from {md_code(root)}" + (f" (grid {md_code(grid)})" if grid else "") + "."]
    if left_out:  # first: a reader must know what the tables do not show
        lines.append("Left out of Tables 1-3: " + "; ".join(f"{md_escape(m)} ({md_escape(why)})" for m, why in left_out) + ".")
    if not_drawn:
        lines.append("Pictures not drawn: " + "; ".join(f"{what} ({md_escape(why.rstrip('.'))})"
                                                        for what, why in not_drawn) + ".")
    times = wall_time(recs, root)
    if times:
        busy, span, n = times
        lines.append(f"Wall time of the records ({n} runs): {busy / 60:.1f} min with at least one run running "
                     f"(the union of the runs' start-to-finish intervals, so pauses between interrupted and "
                     f"resumed grid runs do not count); {span / 60:.1f} min from the first start to the last finish.")
    lines.append("Numerics: " + _numerics(recs) + ".")
    lines.append("Per-dataset method values: " + _per_dataset_values(recs) + ".")
    columns = dict(zip(df["_run_path"], df["dataset"], strict=True)) if "_run_path" in df else {}
    lines.append("Recipes (each dataset's default, no per-cell tuning): " + "; ".join(_recipes(recs, columns)) + ".")
    settings = settings_line(df)
    if settings:
        lines.append(settings)
    note = context_note(df).strip()
    if note:
        lines.append(note)
    return "\n".join(f"- {line}" for line in lines) + "\n"


def build_tables(df: pd.DataFrame, rule: str, place: Placement) -> dict[str, PaperTable]:
    """Tables 1-4 and the alpha table of the layout (those with rows), in the order shown."""
    specs = [
        ("1", "## Table 1. IPRM against unimodal training and the naive fusions", table_accuracy, place.table1(),
         "**Table 1.** Each modality trained alone (Unimodal rows, on the settings that have that modality), "
         "the naive fusions and IPRM."),
        ("2", "## Table 2. IPRM against the rebalancing methods", table_metrics, place.table2(),
         f"**Table 2.** Joint training ({JOINT}), the rebalancing methods at their paper defaults (and every "
         "other method that is not unimodal training or a naive fusion, plugins included), and IPRM."),
        ("3", "## Table 3. IPRM's ablations", table_accuracy, place.table3(),
         "**Table 3.** IPRM and the IPRM paper's ablations: linear instead of geodesic mixup, no EMA "
         "(α = 0), one fused pass at the EMA weight, unpaired sampling; and its other variants."),
        ("alpha", "## IPRM's sensitivity to α (the shape of the paper's Figure 2)", table_accuracy,
         place.alpha_table(), "**IPRM's sensitivity to α.** IPRM at its defaults and its runs that differ from "
         "them in α only."),
    ]
    out: dict[str, PaperTable] = {}
    for key, heading, make, rows, caption in specs:
        table = make(df, rows, rule, caption, f"paper-{key}-{rule.replace('_', '-')}") if rows else None
        if table is not None:
            table.heading = heading
            out[key] = table
    cost = table_cost(df, place.cost())
    if cost is not None:
        cost.heading = "## Table 4. Cost"
        out["4"] = cost
    return out


def left_out_rows(df: pd.DataFrame, tables: Mapping[str, PaperTable], rule: str) -> list[tuple[str, str]]:
    """Rows no result table (1-3, alpha) shows, with the reason."""
    shown = set().union(*(t.shown_rows() for k, t in tables.items() if k != "4"))
    out = []
    for method in dict.fromkeys(df["method"]):
        if method in shown:
            continue
        runs = df[df["method"] == method]
        has = _has_result(runs, f"{rule}.fused.acc") if f"{rule}.fused.acc" in runs else pd.Series(False, runs.index)
        why = (f"no run of it has a result under rule {rule}" if not has.any()
               else "no table of the paper layout takes its method")
        out.append((method, why))
    return out


def build_benchmark_report(
    recs: Sequence[Mapping[str, Any]], df: pd.DataFrame, root: Path, title: str, rule: str = "best_val",
    pictures: Mapping[str, str] | None = None, grid: str | None = None,
    skipped: Sequence[tuple[Path, str]] = (), *, duplicates: Sequence[tuple[Path, Path]] = (),
    not_drawn: Sequence[tuple[str, str]] = (), tables: Mapping[str, PaperTable] | None = None, tuned: str = "",
) -> str:
    pictures = dict(pictures or {})
    place = place_rows(df)
    tables = build_tables(df, rule, place) if tables is None else tables
    left_out = left_out_rows(df, tables, rule)
    note = "Generated by `mmbalance leaderboard --layout paper` from recorded runs; do not edit by hand."
    note += header_notes(skipped, duplicates)
    parts = [f"# {md_escape(title)}\n", note + "\n", header_section(recs, df, root, grid, left_out, not_drawn)]
    for key in ("1", "2", "3", "4"):
        if key in tables:
            parts.append(f"{tables[key].heading}\n\n{tables[key].markdown()}")
        if key == "4" and pictures.get("cost"):
            parts.append(f"![Training time per epoch]({quote(pictures['cost'])})\n")
    if tuned:  # the defaults' tables above, the tuned table beside them
        parts.append(tuned)
    if "alpha" in tables or pictures.get("alpha"):
        alpha = tables.get("alpha")
        parts.append(alpha.heading + "\n\n" + alpha.markdown() if alpha else
                     "## IPRM's sensitivity to α (the shape of the paper's Figure 2)\n")
        if pictures.get("alpha"):
            parts.append(f"![IPRM alpha sensitivity]({quote(pictures['alpha'])})\n")
    main = _rows(df, place.compared())
    if not main.empty:
        parts.append(statistics_section(main, rule, REFERENCE, cd_picture=quote(pictures["cd"]) if pictures.get("cd") else None))
        parts.append(control_section(main, rule))
    diag = diagnostics_section(_rows(df, [*place.unimodal, *place.compared()]))
    if diag:
        parts.append(diag)
    parts.append(imbalance_section(recs, rule))
    return "\n".join(p for p in parts if p)


def control_section(df: pd.DataFrame, rule: str, control: str = REFERENCE) -> str:
    """Every method against the control across settings: Wilcoxon signed-rank with Holm's
    correction and Benavoli's Bayesian signed-rank test with its region of practical
    equivalence (many methods on few settings: the Nemenyi CD alone cannot tell them apart)."""
    column = f"{rule}.fused.acc"
    if column not in df or df[column].isna().all() or control not in set(df["method"]):
        return ""
    comp = compare_with_control(df, column, control)
    return f"### Every method against {md_escape(control)}, across settings\n\n{control_markdown(comp)}"


def imbalance_section(recs: Sequence[Mapping[str, Any]], rule: str) -> str:
    """Which modality each weighting method favoured against which is stronger alone, and each
    trained model's accuracy with a modality absent, from the records the report counts
    (copies and damaged records already left out)."""
    full = list(recs)  # folded records, as load_runs kept them
    if not full:
        return ""
    try:
        weights = weights_markdown(weights_vs_strength(full, rule))
        robust = robustness_markdown(missing_modality_robustness(full, rule))
    except TableError as exc:  # e.g. records that lack the selection rule: said, not a crash
        return f"## What the imbalance diagnostics show\n\nNot shown: {md_escape(str(exc))}\n"
    return ("## What the imbalance diagnostics show\n\n" + weights
            + "\n## Missing-modality robustness\n\n" + robust)


def latex_benchmark(tables: Mapping[str, PaperTable], title: str) -> str:
    """The layout's tables as booktabs LaTeX (the same cells as the markdown)."""
    parts = [f"% {latex_escape(title)}: generated by `mmbalance leaderboard --layout paper --format latex` from "
             "recorded runs.", "% Needs \\usepackage{booktabs}."]
    for key in ("1", "2", "3", "4", "alpha"):
        if key in tables:
            parts.append(tables[key].latex())
    return "\n".join(parts) + "\n"


def _draw(df: pd.DataFrame, recs: Sequence[dict[str, Any]], place: Placement, out_dir: Path, name: str,
          rule: str) -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """The pictures, and for each one not drawn although it had rows to show, why."""
    from mmbalance import plots

    main = _rows(df, place.compared())
    col = f"{rule}.fused.acc"
    targets = {"cd": Path(out_dir) / f"{name}_cd.png", "cost": Path(out_dir) / f"{name}_cost.png",
               "alpha": Path(out_dir) / f"{name}_alpha.png"}
    made: dict[str, Path | None] = {"cd": None, "cost": None, "alpha": None}
    not_drawn: list[tuple[str, str]] = []
    if main.empty or col not in main or main[col].isna().all():
        if not main.empty:
            not_drawn.append(("the critical-difference diagram", f"no test accuracy under rule {rule}"))
    else:
        comparison = compare_methods(score_table(main_rank_runs(main), col))
        made["cd"] = plots.plot_critical_difference(comparison, targets["cd"], rule)
        if made["cd"] is None:
            not_drawn.append(("the critical-difference diagram", comparison.note or "nothing to compare"))
    made["cost"] = plots.plot_cost(main, targets["cost"])
    if made["cost"] is None and not main.empty:
        not_drawn.append(("the cost chart", "no run records its training time"))
    made["alpha"] = plots.plot_alpha_sensitivity(recs, targets["alpha"], rule)
    if made["alpha"] is None and place.alpha:
        not_drawn.append(("the α-sensitivity picture", "no IPRM variant has two α values with results"))
    for key, path in made.items():
        if path is None:
            targets[key].unlink(missing_ok=True)  # never leave a picture the report no longer shows
    return {k: p for k, p in made.items() if p is not None}, not_drawn


def write_benchmark(
    records_dir: Path, out_dir: Path, name: str = "benchmark", title: str | None = None, rule: str = "best_val",
    pictures: bool = True, grid: str | None = None, latex: bool = False,
) -> list[Path]:
    """Write ``<name>.md`` (Tables 1-4, alpha sensitivity, statistics, diagnostics),
    ``<name>.csv`` (the long form), with ``latex`` ``<name>.tex`` (the tables as booktabs
    LaTeX) and, with ``pictures``, ``<name>_cd.png``, ``<name>_cost.png`` and
    ``<name>_alpha.png``. Damaged records and copies of a run are warned about and named in
    the header, as is every row no table shows and every picture that could not be drawn
    (LeftOutWarning)."""
    root = Path(records_dir)
    loaded = load_runs(records.find_runs(root), root)
    recs, skipped = loaded
    warn_skipped(skipped)
    warn_duplicates(loaded.duplicates)
    df = runs_frame(recs)
    if df.empty:
        raise MMBalanceError(f"No finished runs under '{records_dir}'; run the grid first "
                             f"(mmbalance grid benchmarks/grids/benchmark.yaml --jobs 2).")
    df = df.sort_values(["dataset", "method", "seed"]).reset_index(drop=True)
    studies = tuned_table.read_studies(root)
    every, df = tuned_table.split_tuned(df, studies)  # the layout's tables are the defaults' table
    records.ensure_dir(out_dir)
    md, csv = Path(out_dir) / f"{name}.md", Path(out_dir) / f"{name}.csv"
    records.atomic_write_text(csv, public_columns(every).to_csv(index=False))
    written = [md, csv]
    place = place_rows(df)
    tables = build_tables(df, rule, place)
    drawn, not_drawn = _draw(df, recs, place, out_dir, name, rule) if pictures else ({}, [])
    written += list(drawn.values())
    for method, why in left_out_rows(df, tables, rule):
        warnings.warn(f"row '{method}' is in no table of the paper layout: {why}", LeftOutWarning, stacklevel=2)
    for what, why in not_drawn:
        warnings.warn(f"{what} was not drawn: {why.rstrip('.')}", LeftOutWarning, stacklevel=2)
    relative = [(p.relative_to(root) if p.is_relative_to(root) else p, why) for p, why in skipped]
    copies = [tuple(p.relative_to(root) if p.is_relative_to(root) else p for p in pair) for pair in loaded.duplicates]
    report = build_benchmark_report(recs, df, root, title or name, rule, {k: p.name for k, p in drawn.items()}, grid,
                                    relative, duplicates=copies, not_drawn=not_drawn, tables=tables,
                                    tuned=tuned_table.markdown_section(every, studies, rule))
    records.atomic_write_text(md, report)
    if latex:
        tex = Path(out_dir) / f"{name}.tex"
        records.atomic_write_text(tex, latex_benchmark(tables, title or name)
                                  + tuned_table.latex_section(every, studies, rule))
        written.append(tex)
    return written
