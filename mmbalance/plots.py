"""Pictures of recorded runs and leaderboards, as PNG files (matplotlib's Agg canvas).

Per run: the per-step balance diagnostics a method logged (``diagnostics/epoch_XXXX.jsonl``,
one subplot per diagnostic against the global step) and the per-epoch test accuracy of the
fused prediction and of each modality's prediction. Across runs: IPRM's alpha sensitivity
(accuracy against the EMA momentum alpha, the shape of the paper's Figure 2), the
critical-difference diagram of the methods' average ranks (scikit-posthocs), the training cost
per epoch, and the per-epoch accuracy of every method on one dataset.

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas, never through pyplot's
global state, so drawing works headless, in threads, and leaves a user's interactive backend
alone. Files are written atomically. A picture with nothing to show (a method that logs no
diagnostics, no IPRM runs with differing alpha, too few methods for a CD) is skipped: its
function returns None and ``plot_main`` says why.
"""

from __future__ import annotations

import functools
import io
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mmbalance import records
from mmbalance.config import config_hash
from mmbalance.errors import MMBalanceError
from mmbalance.metrics import SELECTION_RULES
from mmbalance.report_runs import collect_runs, dataset_label, duplicate_message, runs_frame
from mmbalance.stats import REFERENCE, RankComparison

DPI = 110
MAX_COLS = 3


class PlotError(MMBalanceError):
    """A plot target that is neither a run folder nor a records folder, or a bad plot option."""


# ---- figure plumbing --------------------------------------------------------------------------
def _literal_text(draw: Callable[..., Any]) -> Callable[..., Any]:
    """Draw with every text literal: labels come from records (a plugin's label, a data
    name), and matplotlib would read '$...$' in them as math, failing on an unknown command."""

    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return wrapper


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    """Render ``fig`` to PNG and write it atomically (a crash never leaves half a picture)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.1)
    path = Path(path)
    records.atomic_write_bytes(path, buf.getvalue())
    return path


def _grid(n: int) -> tuple[int, int]:
    cols = min(MAX_COLS, n)
    return math.ceil(n / cols), cols


def slug(text: str) -> str:
    """A file-name-safe form of a setting or rule label ('mfeat [fac+mor]' -> 'mfeat_fac+mor')."""
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.+-]", "_", text)).strip("_") or "x"


# ---- one run ----------------------------------------------------------------------------------
def step_diagnostics(run_dir: Path) -> pd.DataFrame:
    """Every per-step diagnostic of a run, one row per logged step: ``epoch``, ``step`` (within
    the epoch), ``global_step`` (steps of all earlier epochs counted first, so resumed or
    phase-split epochs line up on one axis) and one column per diagnostic. Empty when the
    method logged none. Damaged files raise RecordError naming them."""
    folder = Path(run_dir) / records.DIAGNOSTICS
    files = sorted(folder.glob("epoch_*.jsonl")) if folder.is_dir() else []
    frames = []
    offset = 0
    for path in files:
        match = re.fullmatch(r"epoch_(\d+)\.jsonl", path.name)
        if not match:
            continue
        rows = records.read_jsonl(path)
        if not rows:
            continue
        frame = pd.DataFrame(rows)
        if "step" not in frame:
            frame["step"] = np.arange(len(frame))
        frame["epoch"] = int(match.group(1))
        frame["global_step"] = offset + np.arange(len(frame))
        offset += len(frame)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["epoch", "step", "global_step"])
    out = pd.concat(frames, ignore_index=True)
    for col in out.columns:
        if col not in ("epoch", "step", "global_step"):
            out[col] = pd.to_numeric(out[col], errors="coerce")
    return out


def diagnostic_columns(frame: pd.DataFrame) -> list[str]:
    """The diagnostic columns of a ``step_diagnostics`` frame (all but the step bookkeeping)."""
    return [c for c in frame.columns if c not in ("epoch", "step", "global_step")]


@_literal_text
def plot_step_diagnostics(run_dir: Path, out: Path) -> Path | None:
    """One subplot per logged diagnostic against the global step; dotted lines mark epoch
    starts. None when the run logged no diagnostics (e.g. the naive fusions)."""
    frame = step_diagnostics(run_dir)
    cols = diagnostic_columns(frame)
    if frame.empty or not cols:
        return None
    rows, ncols = _grid(len(cols))
    fig = _figure(4.0 * ncols, 2.4 * rows)
    axes = fig.subplots(rows, ncols, squeeze=False, sharex=True)
    starts = frame.groupby("epoch")["global_step"].min().to_numpy()[1:]
    for i, col in enumerate(cols):
        ax = axes[i // ncols][i % ncols]
        ax.plot(frame["global_step"], frame[col], lw=0.9)
        for s in starts if len(starts) <= 60 else []:
            ax.axvline(s - 0.5, color="0.6", lw=0.7, ls=":", zorder=0)
        ax.set_title(col, fontsize=9)
        ax.grid(alpha=0.3)
    for j in range(len(cols), rows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    for c in range(ncols):  # the lowest drawn subplot of each column carries the step axis
        last = max(r for r in range(rows) if r * ncols + c < len(cols))
        axes[last][c].tick_params(labelbottom=True)
        axes[last][c].set_xlabel("global step")
    fig.suptitle(f"Per-step diagnostics: {_run_title(run_dir)}", fontsize=10)
    return save_png(fig, out)


def _run_title(run_dir: Path) -> str:
    try:
        header = records.load_record(run_dir)["header"]
        cfg = header.get("config", {})
        return f"{header.get('method_label', cfg.get('method', '?'))} on {dataset_label(header)}, seed {cfg.get('seed', '?')}"
    except (records.RecordError, KeyError, TypeError):
        return Path(run_dir).name


def epoch_accuracy(rec: Mapping[str, Any], split: str = "test") -> pd.DataFrame:
    """Per-epoch accuracy (%) of the fused prediction and of each modality's prediction, index =
    epoch (0-based, as recorded). Epochs a method did not evaluate (mid-stage) are left out."""
    if split not in ("test", "val"):
        raise PlotError(f"split must be 'test' or 'val', got '{split}'.")
    rows = {}
    for entry in rec.get("epochs", []):
        metrics = entry.get(split)
        if not isinstance(metrics, dict):
            continue
        row = {part: m["acc"] for part, m in metrics.items() if isinstance(m, dict) and "acc" in m}
        if row:
            rows[int(entry["epoch"])] = row
    frame = pd.DataFrame.from_dict(rows, orient="index").sort_index()
    if "fused" in frame:
        frame = frame[["fused", *[c for c in frame.columns if c != "fused"]]]
    return frame


@_literal_text
def plot_epoch_accuracy(run_dir: Path, out: Path, split: str = "test") -> Path | None:
    """Per-epoch test accuracy of the fused and of each modality's prediction of one run; the
    epoch ``best_val`` selects is marked. None when no epoch was evaluated."""
    rec = records.load_record(run_dir)
    frame = epoch_accuracy(rec, split)
    if frame.empty:
        return None
    fig = _figure(6.0, 3.6)
    ax = fig.subplots()
    x = frame.index.to_numpy() + 1
    for part in frame.columns:
        style = {"lw": 2.0, "color": "k"} if part == "fused" else {"lw": 1.2}
        ax.plot(x, frame[part], marker="o", ms=3, label=part, **style)
    chosen = ((rec.get("final") or {}).get("selection") or {}).get("best_val")
    if chosen:
        ax.axvline(chosen["epoch"] + 1, color="0.5", ls="--", lw=0.8, label="best_val epoch")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{split} accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{split.capitalize()} accuracy per epoch: {_run_title(run_dir)}", fontsize=10)
    return save_png(fig, out)


# ---- across runs ------------------------------------------------------------------------------
def _labelled(recs: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The leaderboard long form of ``recs`` (labels disambiguated as in the tables), with the
    record itself in column ``_rec`` (runs_frame keeps the records' order)."""
    df = runs_frame(recs)
    if not df.empty:
        df["_rec"] = list(recs)
    return df


def _score(rec: Mapping[str, Any], rule: str) -> float:
    try:
        return float(rec["final"]["selection"][rule]["test"]["fused"]["acc"])
    except (KeyError, TypeError):
        return float("nan")


_ALPHA_TAG = re.compile(r"^(alpha=.*|w/o EMA)$")


def _strip_alpha(label: str) -> str:
    """'IPRM (L-Mixup, alpha=0.5)' -> 'IPRM (L-Mixup)'; 'IPRM (w/o EMA)' -> 'IPRM'."""
    def keep(match: re.Match[str]) -> str:
        tags = [t for t in match.group(1).split(", ") if not _ALPHA_TAG.match(t)]
        return f" ({', '.join(tags)})" if tags else ""

    return re.sub(r" \(([^()]*)\)", keep, label)


def alpha_sensitivity(recs: Sequence[dict[str, Any]], rule: str = "best_val") -> pd.DataFrame:
    """IPRM runs that differ only in alpha (and seed): one row per run with ``setting`` (the
    run's leaderboard column, so two data sets are never one panel), ``variant`` (the label
    without its alpha tag), ``alpha`` (the effective EMA momentum: 0 for 'w/o EMA'), ``seed``
    and ``acc`` under ``rule``. Only variants with at least two distinct alphas on a setting
    are kept; empty when there are none."""
    cols = ["setting", "variant", "alpha", "seed", "acc"]
    frame = _labelled(recs)
    rows = []
    for setting, rec in zip(frame.get("dataset", []), frame.get("_rec", []), strict=True):
        header = rec["header"]
        cfg = header.get("config", {})
        if cfg.get("method") != "iprm":
            continue
        alpha = (header.get("method_info") or {}).get("alpha", cfg.get("alpha"))
        if alpha is None:
            continue
        if cfg.get("ema") is False:
            alpha = 0.0
        key = config_hash({k: v for k, v in cfg.items() if k not in ("seed", "alpha", "ema")},
                          data=header.get("data_fingerprint"))
        rows.append({"setting": setting, "variant": _strip_alpha(header.get("method_label", "IPRM")),
                     "key": key, "alpha": float(alpha), "seed": cfg.get("seed"), "acc": _score(rec, rule)})
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows).dropna(subset=["acc"])
    alphas = df.groupby(["setting", "key"])["alpha"].transform("nunique")
    df = df[alphas >= 2]
    # two configurations with the same label on a setting: tell them apart by their hash
    labels = df.groupby(["setting", "variant"])["key"].transform("nunique")
    df.loc[labels > 1, "variant"] = df["variant"] + " [" + df["key"].str[:6] + "]"
    return df[cols].sort_values(["setting", "variant", "alpha", "seed"]).reset_index(drop=True)


@_literal_text
def plot_alpha_sensitivity(
    recs: Sequence[dict[str, Any]], out: Path, rule: str = "best_val", reference: str = REFERENCE
) -> Path | None:
    """Test accuracy (mean ± std over seeds) against alpha, one panel per setting, one line per
    IPRM variant; the reference method's mean on that setting as a dashed line, where run.
    None when no IPRM variant was run with two or more alphas."""
    data = alpha_sensitivity(recs, rule)
    if data.empty:
        return None
    ref = _labelled(recs)
    col = f"{rule}.fused.acc"
    settings = list(dict.fromkeys(data["setting"]))
    rows, ncols = _grid(len(settings))
    fig = _figure(4.2 * ncols, 3.2 * rows)
    axes = fig.subplots(rows, ncols, squeeze=False)
    for i, setting in enumerate(settings):
        ax = axes[i // ncols][i % ncols]
        sub = data[data["setting"] == setting]
        for variant, part in sub.groupby("variant", sort=False):
            agg = part.groupby("alpha")["acc"].agg(["mean", "std"]).fillna(0.0)
            ax.errorbar(agg.index, agg["mean"], yerr=agg["std"], marker="o", ms=4, capsize=3, label=variant)
        if col in ref:
            base = ref[(ref["method"] == reference) & (ref["dataset"] == setting)][col].dropna()
            if len(base):
                ax.axhline(base.mean(), color="0.4", ls="--", lw=1.0, label=f"{reference} (mean)")
        ax.set_title(setting, fontsize=10)
        ax.set_xlabel("α (EMA momentum of the probing weight)")
        ax.set_ylabel(f"test accuracy (%), rule {rule}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for j in range(len(settings), rows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    fig.suptitle("IPRM: sensitivity to α (mean ± std over seeds)", fontsize=11)
    return save_png(fig, out)


@_literal_text
def plot_critical_difference(comparison: RankComparison, out: Path, rule: str | None = None) -> Path | None:
    """Critical-difference diagram (Demšar 2006) of ``comparison``: average ranks on an axis (1 =
    best, left), methods whose Nemenyi p-value is >= alpha joined by a bar (scikit-posthocs'
    ``critical_difference_diagram``), and the CD drawn to scale above the axis. None when there
    was no Friedman/Nemenyi analysis (fewer than 3 methods or 2 settings)."""
    if comparison.cd is None or comparison.nemenyi_p is None:
        return None
    import scikit_posthocs as sp  # heavy import (seaborn, statsmodels), only when drawing

    k = comparison.n_methods
    longest = max(len(str(m)) for m in comparison.average_ranks.index)
    fig = _figure(max(6.0, 2.0 + 0.13 * longest * 2), 1.4 + 0.32 * (k + 1) / 2 + 0.25 * k / 3)
    ax = fig.subplots()
    sp.critical_difference_diagram(
        comparison.average_ranks, comparison.nemenyi_p, ax=ax, alpha=comparison.alpha,
        label_fmt_left="{label} ({rank:.2f})", label_fmt_right="({rank:.2f}) {label}",
        label_props={"fontsize": 8},
    )
    lo, hi = 1.0, float(k)
    ax.set_xlim(lo - 0.15, hi + 0.15)
    ax.set_xticks(np.arange(1, k + 1) if k <= 20 else np.linspace(1, k, 11).round(1))
    y0, y1 = ax.get_ylim()
    top = y1 + 1.2
    start = lo
    ax.plot([start, start + comparison.cd], [top, top], color="k", lw=1.5)
    for x in (start, start + comparison.cd):
        ax.plot([x, x], [top - 0.15, top + 0.15], color="k", lw=1.5)
    ax.text(start + comparison.cd / 2, top + 0.25, f"CD = {comparison.cd:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(y0, top + 1.0)
    p = comparison.friedman_p
    ptxt = "n/a" if p is None or math.isnan(p) else f"{p:.2g}"
    ax.set_title(
        f"Average ranks over {comparison.n_settings} settings{f', rule {rule}' if rule else ''}: "
        f"Friedman p = {ptxt}; Nemenyi α = {comparison.alpha:g}",
        fontsize=9, pad=18,
    )
    return save_png(fig, out)


@_literal_text
def plot_cost(df: pd.DataFrame, out: Path) -> Path | None:
    """Training seconds per epoch (mean ± std over seeds), one panel per dataset, a bar per
    method. None when no run records its training time. Compare within one device only."""
    if df.empty or "epoch_time_s" not in df or df["epoch_time_s"].isna().all():
        return None
    settings = sorted(dict.fromkeys(df["dataset"]))
    methods = list(dict.fromkeys(df["method"]))
    rows, ncols = _grid(len(settings))
    fig = _figure(4.2 * ncols, (0.9 + 0.28 * len(methods)) * rows)
    axes = fig.subplots(rows, ncols, squeeze=False)
    for i, setting in enumerate(settings):
        ax = axes[i // ncols][i % ncols]
        agg = df[df["dataset"] == setting].groupby("method")["epoch_time_s"].agg(["mean", "std"])
        agg = agg.reindex([m for m in methods if m in agg.index]).fillna(0.0)
        y = np.arange(len(agg))
        xerr = np.vstack([np.minimum(agg["std"], agg["mean"]), agg["std"]])  # no bar below 0 s
        ax.barh(y, agg["mean"], xerr=xerr, color="tab:blue", alpha=0.8, capsize=2)
        ax.set_yticks(y, labels=list(agg.index), fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("s / epoch")
        ax.set_title(setting, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    for j in range(len(settings), rows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    devices = ", ".join(sorted(set(map(str, df.get("device", pd.Series(dtype=str)).dropna()))))
    fig.suptitle(f"Training time per epoch (mean ± std over seeds; device: {devices or '?'})", fontsize=10)
    return save_png(fig, out)


@_literal_text
def plot_methods_epoch_accuracy(
    recs: Sequence[dict[str, Any]], setting: str, out: Path, split: str = "test"
) -> Path | None:
    """Per-epoch fused test accuracy of every method on one dataset (a leaderboard column):
    mean over seeds, shaded ± std. None when no run of that setting was evaluated."""
    df = _labelled(recs)
    if df.empty:
        return None
    sub = df[df["dataset"] == setting]
    fig = _figure(6.5, 4.0)
    ax = fig.subplots()
    drawn = 0
    for method, part in sub.groupby("method", sort=False):
        curves = [epoch_accuracy(rec, split).get("fused") for rec in part["_rec"]]
        curves = [c for c in curves if c is not None and len(c)]
        if not curves:
            continue
        table = pd.concat(curves, axis=1)
        mean, std = table.mean(axis=1), table.std(axis=1).fillna(0.0)
        x = mean.index.to_numpy() + 1
        (line,) = ax.plot(x, mean, marker="o", ms=2.5, lw=1.2, label=f"{method} (n={len(curves)})")
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)
        drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"fused {split} accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"{setting}: fused {split} accuracy per epoch (mean ± std over seeds)", fontsize=10)
    return save_png(fig, out)


# ---- the command ------------------------------------------------------------------------------
def plot_run(run_dir: Path, out: Path) -> list[tuple[str, Path | None, str]]:
    """Pictures of one run: (what, path or None, why skipped)."""
    rec = records.load_record(run_dir)
    method = rec["header"].get("method_label", "this method")
    return [
        ("per-step diagnostics", plot_step_diagnostics(run_dir, out / "diagnostics.png"),
         f"{method} logged no per-step diagnostics (no {records.DIAGNOSTICS}/epoch_*.jsonl)"),
        ("per-epoch accuracy", plot_epoch_accuracy(run_dir, out / "accuracy.png"), "no epoch was evaluated yet"),
    ]


def plot_records(
    recs: Sequence[dict[str, Any]], out: Path, rule: str = "best_val", reference: str = REFERENCE
) -> list[tuple[str, Path | None, str]]:
    """Pictures of a records folder: CD diagram, cost, alpha sensitivity, per-epoch accuracy of
    every method on each dataset. (what, path or None, why skipped)."""
    from mmbalance.stats import compare_methods, main_rank_runs, score_table

    if rule not in SELECTION_RULES:
        raise PlotError(f"Unknown selection rule '{rule}'; choose from {', '.join(SELECTION_RULES)}.")
    df = _labelled(recs)
    col = f"{rule}.fused.acc"
    made: list[tuple[str, Path | None, str]] = []
    if col in df and not df[col].isna().all():
        comp = compare_methods(score_table(main_rank_runs(df), col))
        made.append(("critical-difference diagram", plot_critical_difference(comp, out / f"cd_{rule}.png", rule),
                     comp.note or "nothing to compare"))
    else:
        made.append(("critical-difference diagram", None, f"no run has a test accuracy under rule {rule}"))
    made.append(("cost per epoch", plot_cost(df, out / "cost.png"), "no run records its training time"))
    made.append(("IPRM alpha sensitivity", plot_alpha_sensitivity(recs, out / "alpha_sensitivity.png", rule, reference),
                 "no IPRM variant was run with two or more alpha values on one dataset"))
    for setting in sorted(dict.fromkeys(df["dataset"])):
        made.append((f"per-epoch accuracy on {setting}",
                     plot_methods_epoch_accuracy(recs, setting, out / f"accuracy_{slug(setting)}.png"),
                     "no run of it was evaluated"))
    return made


def plot_main(target: str, out: str | None = None, rule: str = "best_val") -> int:
    """``mmbalance plot RUN_DIR|RECORDS_DIR [--out DIR]``: draw the pictures and list them.

    A RUN_DIR (a folder holding record.jsonl, finished or still training) gets its per-step
    diagnostics and per-epoch accuracy; a RECORDS_DIR (run folders below it) gets the
    critical-difference diagram, the cost chart, IPRM's alpha sensitivity and one per-epoch
    accuracy figure per dataset. Default output: ``<target>/plots``. Returns 0; raises
    PlotError when the target is neither, or when nothing at all could be drawn."""
    path = Path(target)
    if not path.exists():
        raise PlotError(f"'{target}' does not exist; pass a run folder (holding {records.RECORD}) or a records folder.")
    dest = Path(out) if out else path / "plots"
    if (path / records.RECORD).is_file():
        if out is None:  # writing into the run folder: never through a link planted there
            records.check_run_folder(path, itself=False)
        records.ensure_dir(dest)
        made = plot_run(path, dest)
    else:
        from mmbalance.tune import study_databases, study_pictures

        loaded = collect_runs(path)
        recs, skipped = loaded
        for run_dir, reason in skipped:
            print(f"warning: skipped damaged record {run_dir}: {reason}", file=sys.stderr)
        for kept, copy in loaded.duplicates:
            print(f"warning: {duplicate_message(kept, copy)}", file=sys.stderr)
        studies = study_databases(path)  # a tuned records folder: its studies' pictures too
        if not recs and not studies:
            raise PlotError(
                f"'{target}' is neither a run folder (no {records.RECORD} in it) nor a records folder with "
                f"finished runs ({len(skipped)} damaged) or studies. Point it at a folder written by "
                f"'mmbalance run', 'mmbalance grid' or 'mmbalance tune'."
            )
        records.ensure_dir(dest)
        made = plot_records(recs, dest, rule) if recs else []
        made += study_pictures(path, dest) if studies else []
    drawn = [p for _, p, _ in made if p is not None]
    for what, p, why in made:
        print(f"wrote {p} ({what})" if p is not None else f"skipped {what}: {why}")
    if not drawn:
        raise PlotError(f"Nothing to draw for '{target}': " + "; ".join(why for _, _, why in made) + ".")
    return 0
