"""Recorded runs as the rows of a report: read, checked, counted once, and grouped.

Every report (the generic leaderboard, the paper layout, the pictures) reads runs through this
module, so they all agree on what a table cell is: runs that computed the same thing, seeds
apart. A row is a method with one result-relevant configuration, a column one data set: the
dataset, the fingerprint of the data it read, and its own settings. Which settings are
result-relevant is what the options declare (``Option.changes_results``), the same
declarations the run identity (the run folder's hash) is made from; a setting declared
``changes_results=False`` (progress, logging, paths, file-reading switches) never splits a row.

The settings of a run are compared with the defaults of its method on its dataset (the config
``mmbalance config`` prints for them). A trainer setting that takes one value in every column
(``epochs: 10`` on one dataset of a grid, ``amp: bf16`` everywhere) belongs to the columns and
is named in the report's settings note; one that differs within a column splits the rows. A
label gets a setting appended only where two rows would otherwise share it, and only the
settings that differ from the defaults; each column is named by its dataset (for a dataset
that declares a ``name`` option, such as ``features``, that name or its data folder's name)
and, where two columns would share a name, by what tells them apart.

The same run found in two folders (a backup copy under the records folder, records merged from
two machines: the same identity hash and seed) counts once, and the pair is reported.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mmbalance import records
from mmbalance.config import (
    assemble,
    config_hash,
    declared_options,
    flatten_backbone,
    identity,
    registered_plugins,
)
from mmbalance.errors import MMBalanceError

_MISSING = "\x00missing"  # the canonical value of a setting a run does not have (or has at its default)


class DamagedRecordWarning(UserWarning):
    """A run folder whose record cannot be trusted was left out of a report."""


class DuplicateRunWarning(UserWarning):
    """The same run (identity hash and seed) was found in two folders and counted once."""


class LoadedRuns(tuple):
    """``(good, skipped)`` as before, plus ``.duplicates``: (kept folder, copy) pairs of the
    same run found twice, the copy left out."""

    duplicates: list[tuple[Path, Path]]

    def __new__(
        cls, good: list[dict[str, Any]], skipped: list[tuple[Path, str]],
        duplicates: Sequence[tuple[Path, Path]] = (),
    ) -> LoadedRuns:
        self = super().__new__(cls, (good, skipped))
        self.duplicates = list(duplicates)
        return self


# ---- values --------------------------------------------------------------------------------------
def canon(value: Any) -> str:
    """One text per value, so that equal settings compare equal across records (tuples and
    lists alike, key order ignored)."""
    return json.dumps(value, sort_keys=True, default=str)


def format_value(value: Any) -> str:
    """A setting's value as a label shows it: ``true``, ``0.1``, ``fac,mor``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, Mapping):
        return canon(value)
    return str(value)


def format_settings(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in sorted(settings.items()))


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def _flat(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config with its backbone table as ``backbone.<modality>.<field>`` keys."""
    out = {k: v for k, v in cfg.items() if k != "backbone"}
    backbone = cfg.get("backbone")
    if isinstance(backbone, Mapping):
        out.update(flatten_backbone({"backbone": backbone}))
    elif backbone is not None:
        out["backbone"] = backbone
    return out


def _defaults(method: str, dataset: str, protocol: str) -> dict[str, Any] | None:
    """The config a run of ``method`` on ``dataset`` has when nothing is set (its paper values
    on that dataset and the chosen protocol included), flat; None when either plugin is not
    installed here."""
    dataset_cls, method_cls = registered_plugins({"method": method, "dataset": dataset})
    if dataset_cls is None or method_cls is None:
        return None
    return _assembled(dataset_cls, method_cls, protocol)


@functools.lru_cache(maxsize=256)
def _assembled(dataset_cls: Any, method_cls: Any, protocol: str) -> dict[str, Any] | None:
    try:
        return _flat(assemble(dataset_cls, method_cls, overrides={"protocol": protocol}))
    except MMBalanceError:
        return None


def _owner(key: str, declared: Mapping[str, tuple[Any, str]], dataset_known: bool, method_known: bool) -> str:
    """trainer | dataset | method: who declares ``key`` (a backbone key is the trainer's). A key
    nobody here declares is the dataset's only when the dataset plugin is the one missing;
    otherwise (an option a method no longer has, or both plugins missing) it stays with the
    row, so it can split a method's row but never its data set's column."""
    base = key.split(".", 1)[0]
    if base in declared:
        return declared[base][1]
    return "dataset" if not dataset_known and method_known else "method"


def data_name(header: Mapping[str, Any]) -> str | None:
    """For a dataset that declares a ``name`` option (``features``): that name, or the name of
    the data folder the run read; None for other datasets."""
    cfg = header.get("config") or {}
    info = header.get("dataset_info")
    dataset_cls, _ = registered_plugins(cfg)
    declares = "name" in (getattr(dataset_cls, "options", None) or {}) if dataset_cls is not None else "name" in cfg
    if not declares:
        return None
    if cfg.get("name"):
        return str(cfg["name"])
    root = (info.get("root") if isinstance(info, Mapping) else None) or cfg.get("data_root")
    return Path(str(root)).name if root else None


def dataset_label(header: Mapping[str, Any]) -> str:
    """The data set of one run as a report names it: the dataset, its data name where it has
    one ('features:my-data'), and the modalities it used ('mfeat [fac+mor]')."""
    cfg = header["config"]
    label = str(cfg["dataset"])
    name = data_name(header)
    if name:
        label += f":{name}"
    if cfg.get("modalities"):
        label += f" [{'+'.join(map(str, cfg['modalities']))}]"
    return label


# ---- one run -------------------------------------------------------------------------------------
def cell_key(cfg: Mapping[str, Any], fingerprint: Mapping[str, Any] | None) -> str:
    """What a run computes, seed apart: the runs of one table cell share it. A tuned grid
    records the defaults' and the best configuration's key in each study, so a report finds
    a study's runs by what the study recorded, never by comparing values."""
    return config_hash({k: v for k, v in cfg.items() if k != "seed"}, data=fingerprint)


def _grouping(header: Mapping[str, Any]) -> dict[str, Any]:
    """The keys a run is grouped by: its column (dataset, data fingerprint, dataset settings,
    modalities), its settings that differ from its method's defaults on its dataset, which of
    them are the method's own, and its identity hash (seed included) for finding copies."""
    cfg = header["config"]
    dataset_cls, method_cls = registered_plugins(cfg)
    declared = declared_options(dataset_cls, method_cls)
    fingerprint = header.get("data_fingerprint") or {}
    relevant = _flat(identity(cfg, dataset_cls, method_cls))
    for key in ("method", "dataset", "seed"):
        relevant.pop(key, None)
    defaults = _defaults(cfg["method"], cfg["dataset"], str(cfg.get("protocol", "honest"))) or {}
    column: dict[str, Any] = {}
    column_settings: dict[str, Any] = {}
    diff: dict[str, Any] = {}
    method_keys: set[str] = set()
    for key, value in relevant.items():
        owner = _owner(key, declared, dataset_cls is not None, method_cls is not None)
        differs = canon(value) != canon(defaults.get(key, _MISSING))
        if owner == "dataset" or key == "modalities":
            column[key] = value
            if differs and key != "modalities":
                column_settings[key] = value
        elif differs:
            diff[key] = value
            if owner == "method":
                method_keys.add(key)
    # amp=auto trains in bf16 or fp32 by the hardware: the precision it resolved to tells runs apart
    precision = _precision(header) if cfg.get("amp", "auto") == "auto" else ""
    return {
        "_precision": precision,
        "_col_key": canon([cfg["dataset"], fingerprint, column]),
        "_col_base": dataset_label(header),
        "_col_settings": column_settings,
        "_fingerprint": canon(fingerprint) if fingerprint else "",
        "_n_modalities": len(column.get("modalities") or ()),
        "_diff": diff,
        "_method_keys": frozenset(method_keys),
        "_identity": config_hash(cfg, data=fingerprint, dataset_cls=dataset_cls, method_cls=method_cls) + precision,
    }


def _precision(header: Mapping[str, Any]) -> str:
    """``bf16`` or ``fp32``: what a run's autocast resolved to (records from before it was
    resolved on CPUs trained in fp32 there and in bf16 on CUDA, and say so in ``amp``)."""
    amp = header.get("amp")
    if amp is None:
        amp = "bfloat16" if str(header.get("device", "")).startswith("cuda") else "none"
    return "bf16" if amp == "bfloat16" else "fp32"


def _run_row(rec: dict[str, Any], run_dir: Path, root: Path | None) -> dict[str, Any]:
    """One long-form row of a finished record (KeyError/TypeError/... when a field is missing)."""
    header = rec["header"]
    epochs = rec["epochs"]
    cfg = header["config"]
    row: dict[str, Any] = {
        "method": header["method_label"],
        "method_name": cfg["method"],
        "dataset": dataset_label(header),
        "dataset_name": cfg["dataset"],
        "seed": cfg["seed"],
        "epochs": len(epochs),
        "device": header["device"],
        "config_hash": header["config_hash"],
        "cell": cell_key(cfg, header.get("data_fingerprint")),
        "run_dir": str(run_dir.relative_to(root)) if root else str(run_dir),
        "epoch_time_s": sum(e["train_time_s"] for e in epochs) / max(1, len(epochs)),
        # the largest per-epoch peak: accelerator allocation on CUDA, resident set on a CPU
        "peak_mem_mb": max((e["peak_mem_mb"] for e in epochs if e.get("peak_mem_mb") is not None), default=None),
        "peak_mem_kind": next((e["peak_mem_kind"] for e in epochs if e.get("peak_mem_kind")), None),
        "protocol": cfg.get("protocol", "honest"),
        "random_init": ", ".join(sorted(
            f"{m} ({w.get('backbone')})" for m, w in (header.get("weights") or {}).items()
            if w.get("weights") == "random" and w.get("pretrained_in_papers"))),
        "_label": header["method_label"],
        "_run_path": str(run_dir),
        **_grouping(header),
    }
    # the diagnostics are an extra: a malformed table is left out, not the run
    diag = rec["final"].get("diagnostics") or _diagnostics_file(run_dir)
    probes, shapley = diag.get("probe"), diag.get("shapley")
    for m, probe in (probes.items() if isinstance(probes, Mapping) else ()):
        value = probe.get("probe_acc") if isinstance(probe, Mapping) else None
        row[f"probe.{m}"] = float(value) if records.is_number(value) else None
    for m, phi in (shapley.items() if isinstance(shapley, Mapping) else ()):
        row[f"shapley.{m}"] = float(phi) if records.is_number(phi) else None
    if records.is_number(diag.get("imbalance_degree")):
        row["imbalance_degree"] = diag["imbalance_degree"]
    for rule, chosen in rec["final"]["selection"].items():
        row[f"{rule}.epoch"] = chosen["epoch"]
        for part, metrics in chosen["test"].items():
            if isinstance(metrics, dict):
                for metric, value in metrics.items():
                    row[f"{rule}.{part}.{metric}"] = float(value)
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


# ---- many runs -----------------------------------------------------------------------------------
def load_runs(record_dirs: Iterable[Path], root: Path | None = None) -> LoadedRuns:
    """Finished records, the damaged ones with the reason, and (``.duplicates``) the copies.

    A folder without DONE is a run in progress (or killed, to be resumed): not counted, not
    reported. A DONE folder whose record is unreadable, cut, lacks its final row, or has a
    field a report reads missing or of the wrong type (``records.record_problem``: a metric
    that is not a number, a selection rule without its epoch, no selection at all) is damaged:
    it is returned in the second list, never silently dropped, because a leaderboard quietly
    missing a seed looks exactly like a complete one. A run whose identity hash and seed were
    already read from another folder is a copy: counted once (the shallower, then
    alphabetically first folder is kept) and returned in ``.duplicates``."""
    good: list[dict[str, Any]] = []
    skipped: list[tuple[Path, str]] = []
    duplicates: list[tuple[Path, Path]] = []
    seen: dict[tuple[str, Any], Path] = {}
    dirs = sorted((Path(d) for d in record_dirs), key=lambda p: (len(p.parts), str(p)))
    for run_dir in dirs:
        if not records.is_done(run_dir):
            continue
        try:
            rec = records.load_record(run_dir)
            if rec.get("header", {}).get("config", {}).get("eval_test") is False:
                continue  # a tuning trial: it has no test metrics and is no benchmark result
            records.check_record(rec)
            rec["_row"] = _run_row(rec, run_dir, root)
        except records.RecordError as exc:
            skipped.append((run_dir, str(exc)))
            continue
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            skipped.append((run_dir, f"record '{run_dir / records.RECORD}' lacks a field the leaderboard "
                                     f"needs ({type(exc).__name__}: {exc}); it is damaged or from an "
                                     f"incompatible version. {records.FRESH_HINT} '{run_dir}'."))
            continue
        key = (rec["_row"]["_identity"], rec["_row"]["seed"])
        if key in seen:
            duplicates.append((seen[key], run_dir))
            continue
        seen[key] = run_dir
        good.append(rec)
    return LoadedRuns(good, sorted(skipped), duplicates)


def collect_runs(records_dir: Path) -> LoadedRuns:
    """Every finished record under ``records_dir``, every damaged one (folder, reason), and
    the copies counted once (``.duplicates``)."""
    return load_runs(records.find_runs(records_dir), Path(records_dir))


def warn_skipped(skipped: Iterable[tuple[Path, str]]) -> None:
    """One DamagedRecordWarning per damaged record, naming it."""
    for path, reason in skipped:
        warnings.warn(f"skipped damaged record {path}: {reason}", DamagedRecordWarning, stacklevel=3)


def duplicate_message(kept: Path, copy: Path) -> str:
    return (f"run folders {kept} and {copy} hold the same run (same identity hash and seed); "
            f"counted once, from {kept}")


def warn_duplicates(duplicates: Iterable[tuple[Path, Path]]) -> None:
    """One DuplicateRunWarning per copy, naming both folders."""
    for kept, copy in duplicates:
        warnings.warn(duplicate_message(kept, copy), DuplicateRunWarning, stacklevel=3)


def _distinct_labels(
    base: Mapping[str, str], settings: Mapping[str, Mapping[str, Any]], last_resort: Callable[[str], str],
) -> dict[str, str]:
    """Labels for groups (key -> base label, key -> its non-default settings) that no two
    groups share: where several groups have one base label, each gets the settings in which
    they differ appended, those it does not have at their default; a label still shared (the
    groups differ only in what ``settings`` leave out, e.g. their data) gets
    ``last_resort(key)`` appended."""
    by_label: dict[str, list[str]] = defaultdict(list)
    for key, label in base.items():
        by_label[label].append(key)
    out: dict[str, str] = {}
    for label, keys in by_label.items():
        if len(keys) == 1:
            out[keys[0]] = label
            continue
        names = sorted(set().union(*(settings[k] for k in keys)))
        differing = [n for n in names if len({canon(settings[k].get(n, _MISSING)) for k in keys}) > 1]
        for key in keys:
            tags = {n: settings[key][n] for n in differing if n in settings[key]}
            out[key] = f"{label} ({format_settings(tags)})" if tags else label
    counts: dict[str, int] = defaultdict(int)
    for label in out.values():
        counts[label] += 1
    return {k: (f"{lab} {last_resort(k)}" if counts[lab] > 1 else lab) for k, lab in out.items()}


def group_rows(rows: list[dict[str, Any]]) -> None:
    """Give each run its row and column (in place): ``method`` and ``dataset`` become labels
    that identify one group each, so every consumer grouping by them (pivots, ranks, paired
    tests, pictures) averages only runs that computed the same thing.

    A trainer setting is a column setting when it takes one value within every column (it
    then only describes the column); otherwise it is a row setting, so that a method run with
    the same settings on several data sets stays one row. A method's own options are always
    row settings."""
    if not rows:
        return
    columns: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        columns[r["_col_key"]].append(r)
    candidates = {k for r in rows for k in r["_diff"] if k not in r["_method_keys"]}
    column_wide = {k for k in candidates
                   if all(len({canon(r["_diff"].get(k, _MISSING)) for r in rs}) == 1 for rs in columns.values())}
    for r in rows:
        r["_row_settings"] = {k: v for k, v in r["_diff"].items() if k not in column_wide}
        r["_column_settings"] = {**r["_col_settings"], **{k: v for k, v in r["_diff"].items() if k in column_wide}}
        r["_row_key"] = canon([r["method_name"], r["_row_settings"], r["_precision"]])
    # rows: the method's label, told apart by settings (amp=auto's resolved precision included)
    # only where two would share it
    row_base = {r["_row_key"]: r["_label"] for r in reversed(rows)}  # the first run's label wins
    row_settings = {r["_row_key"]: {**r["_row_settings"], **({"precision": r["_precision"]} if r["_precision"] else {})}
                    for r in rows}
    row_labels = _distinct_labels(row_base, row_settings, lambda key: f"[{_short_hash(key)}]")
    # columns: the dataset's label, told apart by settings, then by the data they read
    col_base = {r["_col_key"]: r["_col_base"] for r in reversed(rows)}  # a name given to the data: the first
    col_settings = {r["_col_key"]: r["_column_settings"] for r in rows}
    fingerprints = {r["_col_key"]: r["_fingerprint"] for r in rows}
    labels = _distinct_labels(col_base, col_settings,
                              lambda key: f"(data {_short_hash(fingerprints[key] or key)})")
    for r in rows:
        r["method"] = row_labels[r["_row_key"]]
        r["dataset"] = labels[r["_col_key"]]
        r["row_settings"] = format_settings(r["_row_settings"])
        r["column_settings"] = format_settings(r["_column_settings"])
        r["data"] = _short_hash(r["_fingerprint"]) if r["_fingerprint"] else ""


def runs_frame(recs: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Long form from records that went through load_runs/collect_runs: one row per run, its
    row and column labels from ``group_rows``. Columns starting with '_' are for the reports'
    own use (``public_columns`` leaves them out of the CSV)."""
    rows = [dict(rec["_row"]) for rec in recs]
    group_rows(rows)
    return pd.DataFrame(rows)


def public_columns(df: pd.DataFrame) -> pd.DataFrame:
    """The long form without the private ('_') columns: what the CSV holds."""
    return df[[c for c in df.columns if not str(c).startswith("_")]]


def runs_table(record_dirs: Iterable[Path], root: Path | None = None) -> pd.DataFrame:
    """Long form: one row per finished run, one column per (rule, metric) and per modality.
    Damaged records are left out with one DamagedRecordWarning each, copies of a run with a
    DuplicateRunWarning."""
    loaded = load_runs(record_dirs, root)
    recs, skipped = loaded
    warn_skipped(skipped)
    warn_duplicates(loaded.duplicates)
    return public_columns(runs_frame(recs))


def settings_notes(df: pd.DataFrame) -> list[tuple[str, str | None, str]]:
    """What the runs set away from their defaults, for a report's header: ``(kind, label,
    settings)`` with kind 'every run' (label None), 'column' or 'row'. Labels and settings are
    plain text: the caller escapes them for its format."""
    if df.empty or "_column_settings" not in df:
        return []
    columns = dict(zip(df["dataset"], df["_column_settings"], strict=True))
    common: set[tuple[str, str]] | None = None
    for s in columns.values():
        items = {(k, canon(v)) for k, v in s.items()}
        common = items if common is None else common & items
    common_keys = {k for k, _ in common or set()}
    notes: list[tuple[str, str | None, str]] = []
    if common_keys:
        first = next(iter(columns.values()))
        notes.append(("every run", None, format_settings({k: first[k] for k in common_keys})))
    for label in sorted(columns):
        own = {k: v for k, v in columns[label].items() if k not in common_keys}
        if own:
            notes.append(("column", label, format_settings(own)))
    for label, own in dict(zip(df["method"], df["_row_settings"], strict=True)).items():
        if own:
            notes.append(("row", label, format_settings(own)))
    return notes


__all__ = [
    "DamagedRecordWarning", "DuplicateRunWarning", "LoadedRuns", "cell_key", "collect_runs",
    "dataset_label", "duplicate_message", "format_settings", "group_rows", "load_runs", "public_columns",
    "runs_frame", "runs_table", "settings_notes", "warn_duplicates", "warn_skipped",
]
