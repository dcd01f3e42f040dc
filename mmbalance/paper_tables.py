"""The benchmark report in the shapes of the IPRM paper's tables, generated from recorded runs.

Table 1: IPRM against each modality trained alone and the naive fusions (accuracy).
Table 2: IPRM against the rebalancing methods (accuracy, MAP, macro-F1).
Table 3: IPRM's ablations (accuracy).
Table 4: cost: training seconds per epoch, the ratio to joint training (Concat), and the peak
memory of an epoch (the accelerator's peak allocation on a GPU, the process's peak resident
set on a CPU).
Then the statistics across settings (average ranks, Friedman, Nemenyi CD, paired tests against
Concat + unimodal CEs) over the methods of Tables 1 and 2 that ran on every setting, the
imbalance diagnostics, and the pictures (CD diagram, cost chart, IPRM's alpha sensitivity).

Rows are chosen by method label; a method with no run is left out of its table rather than
shown empty, and the header says how many runs the report read and what they were trained
with (recipe per setting, numerics, per-dataset method values, wall time of the records).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from mmbalance import records
from mmbalance.errors import MMBalanceError
from mmbalance.leaderboard import (
    METRIC_NAMES,
    _seed_note,
    context_note,
    diagnostics_section,
    load_runs,
    markdown_table,
    pivot,
    runs_frame,
    warn_skipped,
)
from mmbalance.metrics import RULE_CAPTIONS
from mmbalance.stats import REFERENCE, compare_methods, score_table, statistics_section

JOINT = "Concat"  # joint training: the reference of the cost ratios
NAIVE = ("Concat", "Sum", "Weight", "Concat + uni CE")
REBALANCING = ("OGR-GB", "MSLR", "OGM-GE", "PMR", "AGM", "MMPareto", "ReconBoost", "MLA", "LFM")
IPRM = "IPRM"
ABLATIONS = ("IPRM (L-Mixup)", "IPRM (w/o EMA)", "IPRM (One-Pass)", "IPRM (unpaired)")
# the recipe keys shown per setting in the header
RECIPE_KEYS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "scheduler", "embed_dim")


def _unimodal(labels: Iterable[str]) -> list[str]:
    return sorted(label for label in labels if label.startswith("Unimodal ("))


def _rows(df: pd.DataFrame, wanted: Sequence[str]) -> pd.DataFrame:
    present = [m for m in wanted if m in set(df["method"])]
    sub = df[df["method"].isin(present)].copy()
    sub["_order"] = sub["method"].map({m: i for i, m in enumerate(present)})
    return sub.sort_values(["_order", "dataset", "seed"]).drop(columns="_order")


def table_accuracy(df: pd.DataFrame, methods: Sequence[str], rule: str, caption: str) -> str:
    sub = _rows(df, methods)
    if sub.empty:
        return ""
    table, seeds = pivot(sub, f"{rule}.fused.acc")
    return markdown_table(table, f"{caption} Test accuracy (%), {RULE_CAPTIONS[rule]} (rule `{rule}`); "
                                 f"mean ± std over seeds, {_seed_note(seeds)}; best in bold, second underlined.")


def table_metrics(df: pd.DataFrame, methods: Sequence[str], rule: str, caption: str) -> str:
    """One column per (setting, metric): the paper's accuracy / MAP / macro-F1 layout."""
    sub = _rows(df, methods)
    if sub.empty:
        return ""
    parts, seeds = {}, {}
    for metric in METRIC_NAMES:
        col = f"{rule}.fused.{metric}"
        if col in sub and not sub[col].isna().all():
            parts[metric], seeds = pivot(sub, col)
    settings = list(next(iter(parts.values())).columns)
    table = pd.DataFrame(index=next(iter(parts.values())).index)
    for setting in settings:
        for metric, part in parts.items():
            table[f"{setting}<br>{METRIC_NAMES[metric]}"] = part[setting]
    return markdown_table(table, f"{caption} Test accuracy, MAP and macro-F1 (%), {RULE_CAPTIONS[rule]} "
                                 f"(rule `{rule}`); mean ± std over seeds, {_seed_note(seeds)}; best in "
                                 f"bold, second underlined per column.")


def _mean(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.mean()) if len(values) else float("nan")


def table_cost(df: pd.DataFrame, methods: Sequence[str]) -> str:
    """Seconds per training epoch, ratio to joint training on the same setting, peak memory."""
    sub = _rows(df, methods)
    if sub.empty:
        return ""
    settings = sorted(dict.fromkeys(sub["dataset"]))
    table = pd.DataFrame("", index=list(dict.fromkeys(sub["method"])), columns=settings)
    for setting in settings:
        here = sub[sub["dataset"] == setting]
        joint = _mean(here[here["method"] == JOINT]["epoch_time_s"])
        for method, runs in here.groupby("method", sort=False):
            secs = _mean(runs["epoch_time_s"])
            ratio = f"{secs / joint:.2f}×" if joint == joint and joint > 0 else "–"
            mem = _mean(runs["peak_mem_mb"]) if "peak_mem_mb" in runs else float("nan")
            table.loc[method, setting] = f"{secs:.2f} s · {ratio} · " + ("–" if math.isnan(mem) else f"{mem:.0f} MB")
    kinds = sorted({k for k in sub.get("peak_mem_kind", pd.Series(dtype=str)).dropna()})
    memory = {"cuda_max_allocated": "the accelerator's peak allocation in the epoch",
              "rss_peak_epoch": "the process's peak resident set in the epoch (Linux VmHWM, reset at each "
                                "epoch start; it includes the Python and PyTorch runtime, about 0.8 GB here)",
              "rss_peak_process": "the process's lifetime peak resident set"}
    devices = ", ".join(sorted(set(map(str, sub["device"]))))
    caption = (
        f"**Table 4. Cost.** Per setting: training seconds per epoch (mean over epochs and seeds; the "
        f"method's own estimation passes included, evaluation excluded) · the ratio to joint training "
        f"({JOINT}) on the same setting · peak memory, the largest over epochs, mean over seeds: "
        + "; ".join(memory.get(k, k) for k in kinds or ["–"])
        + f". Device: {devices}; the cells of a grid ran two at a time, one thread each, so compare "
        f"ratios rather than absolute seconds."
    )
    return markdown_table(table, caption)


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


def _recipes(recs: Sequence[Mapping[str, Any]]) -> list[str]:
    from mmbalance.leaderboard import dataset_label

    seen: dict[str, str] = {}
    for rec in recs:
        cfg = rec["header"]["config"]
        label = dataset_label(rec["header"])
        if label in seen:
            continue
        used = set(rec["header"].get("modalities") or [])
        backbones = ", ".join(f"{m}: {v.get('name', '?')}" for m, v in sorted((cfg.get("backbone") or {}).items())
                              if isinstance(v, Mapping) and (not used or m in used))
        parts = [f"{k} {cfg[k]}" for k in RECIPE_KEYS if k in cfg]
        if cfg.get("eval_batch_size"):  # unset: twice batch_size
            parts.append(f"eval_batch_size {cfg['eval_batch_size']}")
        seen[label] = f"`{label}`: " + ", ".join(parts) + (f"; encoders {backbones}" if backbones else "")
    return [seen[k] for k in sorted(seen)]


def _numerics(recs: Sequence[Mapping[str, Any]]) -> str:
    combos = sorted({(str(r["header"]["config"].get("amp")), str(r["header"]["config"].get("memory_format", "contiguous")),
                      _device_label(r["header"])) for r in recs})
    return "; ".join(f"amp={a}, memory_format={m} on {d}" for a, m, d in combos)


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
    return "; ".join(found) if found else "none (every method runs with its own defaults on every setting here)"


def header_section(recs: Sequence[Mapping[str, Any]], df: pd.DataFrame, root: Path, grid: str | None) -> str:
    lines = [f"Read {len(recs)} finished runs from `{root}`" + (f" (grid `{grid}`)" if grid else "") + "."]
    times = wall_time(recs, root)
    if times:
        busy, span, n = times
        lines.append(f"Wall time of the records ({n} runs): {busy / 60:.1f} min with at least one run running "
                     f"(the union of the runs' start-to-finish intervals, so pauses between interrupted and "
                     f"resumed grid runs do not count); {span / 60:.1f} min from the first start to the last finish.")
    lines.append("Numerics: " + _numerics(recs) + ".")
    lines.append("Per-dataset method values: " + _per_dataset_values(recs) + ".")
    lines.append("Recipes (each dataset's default, no per-cell tuning): " + "; ".join(_recipes(recs)) + ".")
    note = context_note(df).strip()
    if note:
        lines.append(note)
    return "\n".join(f"- {line}" for line in lines) + "\n"


def build_benchmark_report(
    recs: Sequence[Mapping[str, Any]], df: pd.DataFrame, root: Path, title: str, rule: str = "best_val",
    pictures: Mapping[str, str] | None = None, grid: str | None = None, skipped: int = 0,
) -> str:
    pictures = dict(pictures or {})
    labels = set(df["method"])
    uni = _unimodal(labels)
    note = "Generated by `mmbalance leaderboard --layout paper` from recorded runs; do not edit by hand."
    if skipped:
        note += f" {skipped} damaged record(s) skipped (see the command's warnings)."
    parts = [f"# {title}\n", note + "\n", header_section(recs, df, root, grid)]
    parts.append("## Table 1. IPRM against unimodal training and the naive fusions\n\n" + table_accuracy(
        df, [*uni, *NAIVE, IPRM], rule, "**Table 1.** Each modality trained alone (Unimodal rows, on the "
        "settings that have that modality), the naive fusions and IPRM."))
    parts.append("## Table 2. IPRM against the rebalancing methods\n\n" + table_metrics(
        df, [JOINT, *REBALANCING, IPRM], rule, f"**Table 2.** Joint training ({JOINT}), the nine rebalancing "
        "methods at their paper defaults, and IPRM."))
    ablation = table_accuracy(df, [JOINT, IPRM, *ABLATIONS], rule, "**Table 3.** IPRM and its ablations "
                              "(docs/methods/iprm.md): linear instead of geodesic mixup, no EMA (α = 0), one fused "
                              "pass at the EMA weight, unpaired sampling.")
    if ablation:
        parts.append("## Table 3. IPRM's ablations\n\n" + ablation)
    if pictures.get("alpha"):
        parts.append("### IPRM's sensitivity to α (the shape of the paper's Figure 2)\n\n"
                     f"![IPRM alpha sensitivity]({quote(pictures['alpha'])})\n")
    parts.append("## Table 4. Cost\n\n" + table_cost(df, [*uni, *NAIVE, *REBALANCING, IPRM, *ABLATIONS]))
    if pictures.get("cost"):
        parts.append(f"![Training time per epoch]({quote(pictures['cost'])})\n")
    main = _rows(df, [*NAIVE, *REBALANCING, IPRM])
    if not main.empty:
        parts.append(statistics_section(main, rule, REFERENCE, cd_picture=quote(pictures["cd"]) if pictures.get("cd") else None))
    diag = diagnostics_section(_rows(df, [*uni, *NAIVE, *REBALANCING, IPRM]))
    if diag:
        parts.append(diag)
    return "\n".join(p for p in parts if p)


def write_benchmark(
    records_dir: Path, out_dir: Path, name: str = "benchmark", title: str | None = None, rule: str = "best_val",
    pictures: bool = True, grid: str | None = None,
) -> list[Path]:
    """Write ``<name>.md`` (Tables 1-4, statistics, diagnostics), ``<name>.csv`` (the long form)
    and, with ``pictures``, ``<name>_cd.png``, ``<name>_cost.png`` and ``<name>_alpha.png``."""
    root = Path(records_dir)
    recs, skipped = load_runs(records.find_runs(root), root)
    warn_skipped(skipped)
    df = runs_frame(recs)
    if df.empty:
        raise MMBalanceError(f"No finished runs under '{records_dir}'; run the grid first "
                             f"(mmbalance grid benchmarks/grids/benchmark.yaml --jobs 2).")
    df = df.sort_values(["dataset", "method", "seed"]).reset_index(drop=True)
    records.ensure_dir(out_dir)
    md, csv = Path(out_dir) / f"{name}.md", Path(out_dir) / f"{name}.csv"
    records.atomic_write_text(csv, df.to_csv(index=False))
    written = [md, csv]
    drawn: dict[str, str] = {}
    if pictures:
        from mmbalance import plots

        main = _rows(df, [*NAIVE, *REBALANCING, IPRM])
        col = f"{rule}.fused.acc"
        targets = {"cd": Path(out_dir) / f"{name}_cd.png", "cost": Path(out_dir) / f"{name}_cost.png",
                   "alpha": Path(out_dir) / f"{name}_alpha.png"}
        made = {
            "cd": plots.plot_critical_difference(compare_methods(score_table(main, col)), targets["cd"], rule)
            if not main.empty else None,
            "cost": plots.plot_cost(_rows(df, [*NAIVE, *REBALANCING, IPRM]), targets["cost"]),
            "alpha": plots.plot_alpha_sensitivity(recs, targets["alpha"], rule),
        }
        for key, path in made.items():
            if path is None:
                targets[key].unlink(missing_ok=True)  # never leave a picture the report no longer shows
            else:
                drawn[key] = path.name
                written.append(path)
    report = build_benchmark_report(recs, df, root, title or name, rule, drawn, grid, len(skipped))
    records.atomic_write_text(md, report)
    return written
