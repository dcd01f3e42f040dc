"""Two tables about modalities that a leaderboard's accuracies cannot show, built from records.

1. **Where the weights went** (:func:`weights_vs_strength`): every rebalancing method that
   weights modalities logs its per-modality weight at each step (IPRM's ω, OGM-GE's and AGM's
   gradient coefficients, MSLR's learning-rate factors, PMR's prototype-loss weight,
   OGR-GB's blending weights: :data:`WEIGHT_RULES`); the record keeps each epoch's mean. A
   run's weight of modality m is the mean over all its training steps (epoch means weighted
   by the epoch's batches). Per (setting, method) the table names the modality that got the
   larger mean weight and the modality that is stronger *alone*: from the setting's
   ``unimodal`` runs (mean test accuracy over seeds under the chosen selection rule), or, where
   the setting has none, from the run's own linear probes of its frozen encoders (its final
   diagnostics). It then says whether the larger weight went to the strong or the weak
   modality. What "larger weight" does differs by method (a fusion weight, a gradient
   multiplier, a learning rate, a loss weight); the ``weight`` column names it.
2. **What losing a modality costs** (:func:`missing_modality_robustness`): the trained
   model's test accuracy with one modality absent (its encoder sees a blank input), read from
   the absent-modality evaluations of the Shapley diagnostics (``coalitions`` in the record's
   final diagnostics: the fused accuracy with only the coalition's modalities present). Those
   evaluate the model at the end of training (the diagnostics run after the last epoch), so
   ``all`` here is the last epoch's fused test accuracy, not the best-validation epoch's.

Both take a list of folded records (``mmbalance.records.load_record``; :func:`load_records`
reads a records folder) or the per-run frame :func:`run_frame` makes from them, and return
long-form DataFrames; :func:`weights_markdown` and :func:`robustness_markdown` pivot them.
Labels follow the leaderboard: the method's label, and the dataset name with its modalities
in brackets where the run's config names them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmbalance import records as records_mod
from mmbalance.errors import MMBalanceError
from mmbalance.markup import md_escape


@dataclass(frozen=True)
class WeightRule:
    """How one method logs its per-modality weight: ``key`` with ``{m}`` for the modality (a
    logged key ``<key>@<pair>`` also counts, averaged over the pairs), and what it weights."""

    key: str
    weight: str


WEIGHT_RULES: dict[str, WeightRule] = {
    "iprm": WeightRule("omega_{m}", "IPRM ω (fusion weight, Eq. 2)"),
    "ogm": WeightRule("coeff_{m}", "OGM-GE gradient coefficient"),
    "agm": WeightRule("coef_{m}", "AGM gradient coefficient"),
    "mslr": WeightRule("lr_mult_{m}", "MSLR learning-rate factor"),
    "pmr": WeightRule("coef_{m}", "PMR prototype-CE weight"),
    "ogr_gb": WeightRule("w_{m}", "OGR-GB blending weight"),
}
UNIMODAL = "unimodal"
RULE = "best_val"
# Two weights (or accuracies) closer than this are a tie: no modality is named.
TIE = 1e-9


class TableError(MMBalanceError):
    """Bad input to an imbalance table (not records, no runs, an unknown selection rule)."""


# ---- records -> one row per run ---------------------------------------------------------------
def load_records(root: str | Path) -> list[dict[str, Any]]:
    """Every finished run's folded record under ``root`` (runs without DONE are skipped)."""
    out = []
    for run_dir in records_mod.find_runs(Path(root)):
        if (run_dir / records_mod.DONE).exists():
            out.append(records_mod.load_record(run_dir))
    return out


def setting_label(header: Mapping[str, Any]) -> str:
    """The leaderboard's column label: dataset, with ``[a+b]`` where the config names modalities."""
    cfg = header["config"]
    mods = cfg.get("modalities")
    return f"{cfg['dataset']} [{'+'.join(mods)}]" if mods else str(cfg["dataset"])


def run_weights(record: Mapping[str, Any], rule: WeightRule, modalities: Sequence[str]) -> dict[str, float]:
    """Each modality's weight over the whole run: the mean of the epochs' logged means, weighted
    by their training batches (= the mean over all steps). Modalities never logged are left out."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for epoch in record.get("epochs") or []:
        diag = epoch.get("diagnostics") or {}
        n = float(epoch.get("train_batches") or 1)
        for m in modalities:
            base = rule.key.format(m=m)
            vals = [float(v) for k, v in diag.items()
                    if (k == base or k.startswith(base + "@")) and isinstance(v, (int, float)) and not math.isnan(v)]
            if vals:
                sums[m] = sums.get(m, 0.0) + n * float(np.mean(vals))
                counts[m] = counts.get(m, 0.0) + n
    return {m: sums[m] / counts[m] for m in sums}


def run_frame(recs: Iterable[Mapping[str, Any]], rule: str = RULE,
              rules: Mapping[str, WeightRule] = WEIGHT_RULES) -> pd.DataFrame:
    """One row per finished run: ``method`` (label), ``method_name``, ``setting``, ``dataset``,
    ``seed``, ``cell`` (its config without the seed), ``modalities``, ``unimodal`` (the trained
    modality of a unimodal run), ``acc`` (fused test accuracy under ``rule``), ``weight_rule``
    and ``weight.<m>``, ``probe.<m>`` and ``coalition.<key>`` (None where the run has none)."""
    from mmbalance.config import config_hash

    rows = []
    for rec in recs:
        if not isinstance(rec, Mapping) or "header" not in rec:
            raise TableError("Expected folded records (dicts with 'header', 'epochs', 'final'), e.g. from "
                             "mmbalance.imbalance_tables.load_records(folder).")
        final = rec.get("final")
        if not final:  # unfinished run
            continue
        header = rec["header"]
        cfg = header["config"]
        selection = final.get("selection") or {}
        if rule not in selection:
            raise TableError(f"Selection rule '{rule}' is not in the record of {rec.get('run_dir', '?')} "
                             f"(it has {', '.join(selection)}).")
        mods = list(header.get("modalities") or cfg.get("modalities") or [])
        row: dict[str, Any] = {
            "method": header.get("method_label", cfg["method"]),
            "method_name": cfg["method"],
            "setting": setting_label(header),
            "dataset": cfg["dataset"],
            "seed": cfg.get("seed"),
            "cell": config_hash({k: v for k, v in cfg.items() if k != "seed"}, data=header.get("data_fingerprint")),
            "modalities": mods,
            "unimodal": (cfg.get("modality") or (mods[0] if mods else None)) if cfg["method"] == UNIMODAL else None,
            "acc": selection[rule]["test"]["fused"]["acc"],
            "weight_rule": None,
            "_config": cfg,
        }
        wr = rules.get(cfg["method"])
        if wr is not None and len(mods) >= 2:
            row["weight_rule"] = wr.weight
            for m, w in run_weights(rec, wr, mods).items():
                row[f"weight.{m}"] = w
        diag = final.get("diagnostics") or {}
        for m, probe in (diag.get("probe") or {}).items():
            row[f"probe.{m}"] = probe.get("probe_acc") if isinstance(probe, Mapping) else None
        if diag.get("coalitions"):
            for key, value in diag["coalitions"].items():
                row[f"coalition.{key}"] = value
        elif len(mods) >= 2 and diag:
            row["coalitions_unavailable"] = diag.get("shapley_unavailable", "no absent-modality evaluation recorded")
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    return _disambiguate(df).drop(columns="_config")


def _disambiguate(df: pd.DataFrame) -> pd.DataFrame:
    """Runs sharing a method label and setting but not a configuration are not averaged
    together: their labels get the differing settings appended (as the leaderboard does)."""
    df = df.copy()
    for _, sub in df.groupby(["method", "setting"]):
        cells = sub.drop_duplicates("cell")
        if len(cells) < 2:
            continue
        configs = list(cells["_config"])
        keys = sorted(k for k in set().union(*configs) if k != "seed" and len({repr(c.get(k)) for c in configs}) > 1)
        for idx, row in sub.iterrows():
            extra = ", ".join(f"{k}={row['_config'].get(k)}" for k in keys)
            df.at[idx, "method"] = f"{row['method']} ({extra})"
    return df


def _frame(data: pd.DataFrame | Iterable[Mapping[str, Any]], rule: str) -> pd.DataFrame:
    df = data if isinstance(data, pd.DataFrame) else run_frame(data, rule)
    if df.empty:
        raise TableError("No finished runs to tabulate.")
    return df


def _argmax(values: Mapping[str, float]) -> str | None:
    """The key with the largest value; None on a tie for the top or when empty."""
    items = sorted(((v, k) for k, v in values.items() if v is not None and not math.isnan(v)), reverse=True)
    if not items or (len(items) > 1 and items[0][0] - items[1][0] <= TIE):
        return None
    return items[0][1]


# ---- table 1: the larger weight against the stronger modality ---------------------------------------
def unimodal_strength(df: pd.DataFrame) -> dict[tuple[str, str], dict[str, float]]:
    """(key, kind) -> modality -> mean accuracy of its unimodal runs over seeds; key is the
    setting label (kind 'setting') and the dataset name (kind 'dataset', used when a setting
    has no unimodal runs of its own, e.g. a three-view setting beside pair settings)."""
    uni = df[df["method_name"] == UNIMODAL].dropna(subset=["unimodal"])
    out: dict[tuple[str, str], dict[str, float]] = {}
    for kind, col in (("setting", "setting"), ("dataset", "dataset")):
        for (key, m), sub in uni.groupby([col, "unimodal"]):
            out.setdefault((str(key), kind), {})[str(m)] = float(sub["acc"].mean())
    return out


def weights_vs_strength(
    data: pd.DataFrame | Iterable[Mapping[str, Any]], rule: str = RULE, strength: str = "auto"
) -> pd.DataFrame:
    """Per (setting, weighting method): which modality got the larger weight, which is stronger
    alone, and whether the two agree.

    ``strength``: 'unimodal' (the setting's unimodal runs, else the same dataset's), 'probe'
    (each run's linear probes, averaged over seeds), or 'auto' (unimodal runs where they exist,
    else probes). Columns: ``setting``, ``method``, ``weight`` (what is weighted), ``n``
    (runs), ``weights`` (modality -> mean weight over runs), ``larger`` (the modality with the
    larger mean weight), ``seeds_agree`` (share of runs whose own larger weight is ``larger``),
    ``strength`` (modality -> accuracy alone), ``stronger``, ``source``, and ``to`` ('stronger'
    when the larger weight went to the stronger modality, 'weaker' when to a weaker one, None
    on a tie or without a strength)."""
    if strength not in ("auto", "unimodal", "probe"):
        raise TableError(f"strength must be auto, unimodal or probe, got '{strength}'.")
    df = _frame(data, rule)
    alone = unimodal_strength(df)
    weighted = df[df["weight_rule"].notna()] if "weight_rule" in df else df.iloc[0:0]
    rows = []
    for (setting, method), sub in weighted.groupby(["setting", "method"], sort=False):
        mods = list(sub["modalities"].iloc[0])
        cols = [f"weight.{m}" for m in mods if f"weight.{m}" in sub]
        means = {c[len("weight."):]: float(sub[c].mean()) for c in cols if sub[c].notna().any()}
        larger = _argmax(means)
        per_run = [_argmax({m: r[f"weight.{m}"] for m in means if not pd.isna(r.get(f"weight.{m}"))})
                   for _, r in sub.iterrows()]
        agree = float(np.mean([p == larger for p in per_run])) if larger is not None else math.nan
        acc, source = {}, None
        if strength in ("auto", "unimodal"):
            dataset = str(sub["dataset"].iloc[0])
            for key, kind in ((setting, "setting"), (dataset, "dataset")):
                found = {m: a for m, a in alone.get((key, kind), {}).items() if m in mods}
                if set(found) == set(mods):
                    acc, source = found, "unimodal runs"
                    break
        if not acc and strength in ("auto", "probe"):
            probes = {m: float(sub[f"probe.{m}"].mean()) for m in mods if f"probe.{m}" in sub and sub[f"probe.{m}"].notna().any()}
            if set(probes) == set(mods):
                acc, source = probes, "linear probes of the run"
        stronger = _argmax(acc) if acc else None
        to = None if larger is None or stronger is None else ("stronger" if larger == stronger else "weaker")
        rows.append({"setting": setting, "method": method, "weight": sub["weight_rule"].iloc[0], "n": len(sub),
                     "weights": means, "larger": larger, "seeds_agree": agree, "strength": acc,
                     "stronger": stronger, "source": source, "to": to})
    return pd.DataFrame(rows, columns=["setting", "method", "weight", "n", "weights", "larger", "seeds_agree",
                                       "strength", "stronger", "source", "to"])


def weights_markdown(table: pd.DataFrame) -> str:
    """Methods x settings: the modality that got the larger weight, marked ▲ when it is the
    stronger one alone and ▽ when it is a weaker one, with the share of seeds that agree."""
    if table.empty:
        return "No run of a weighting method logged per-modality weights.\n"
    settings = list(dict.fromkeys(table["setting"]))
    labels = {m: w for m, w in zip(table["method"], table["weight"], strict=True)}
    grid = pd.DataFrame("", index=list(labels), columns=settings)
    for _, r in table.iterrows():
        if r["larger"] is None or pd.isna(r["larger"]):
            text = "tie"
        else:
            mark = {"stronger": " ▲", "weaker": " ▽"}.get(r["to"] or "", "")
            text = f"{r['larger']}{mark}"
            if not math.isnan(r["seeds_agree"]) and r["seeds_agree"] < 1:
                text += f" ({r['seeds_agree'] * r['n']:.0f}/{r['n']})"
        grid.loc[r["method"], r["setting"]] = text
    grid = grid.map(md_escape)
    grid.insert(0, "weight", [md_escape(labels[m]) for m in grid.index])
    grid.index = [md_escape(m) for m in grid.index]
    grid.columns = [md_escape(c) for c in grid.columns]
    sources = sorted({s for s in table["source"] if s})
    caption = (
        "**Which modality the rebalancing weights favour** (mean of the logged per-modality weight over all "
        "training steps and seeds; the modality named got the larger one). ▲: it is the modality that is "
        "stronger alone; ▽: a weaker one; (k/n): only k of n seeds favour it. Strength alone from "
        f"{' or '.join(sources) if sources else 'nothing recorded'}."
    )
    return f"{caption}\n\n{grid.reset_index(names='method').to_markdown(index=False)}\n"


# ---- table 2: accuracy with a modality absent -----------------------------------------------------
def _key(mods: Iterable[str]) -> str:
    names = sorted(mods)
    return "+".join(names) if names else "none"


def missing_modality_robustness(data: pd.DataFrame | Iterable[Mapping[str, Any]], rule: str = RULE) -> pd.DataFrame:
    """Per (setting, method, absent modality): the trained model's test accuracy with that
    modality blanked (``absent`` = the modality, or 'none' for the full model), mean and std over
    seeds, ``n`` runs, and ``drop`` = full − absent (points, mean over seeds of the paired
    drop). Runs with one modality are left out; a method whose predictions cannot blank a
    modality gets one row with ``absent`` = None and the reason in ``note``."""
    df = _frame(data, rule)
    multi = df[df["modalities"].map(len) >= 2]
    rows = []
    for (setting, method), sub in multi.groupby(["setting", "method"], sort=False):
        mods = list(sub["modalities"].iloc[0])
        full_col = f"coalition.{_key(mods)}"
        if full_col not in sub or sub[full_col].isna().all():
            note = next((n for n in sub.get("coalitions_unavailable", pd.Series(dtype=object)).dropna()), None)
            rows.append({"setting": setting, "method": method, "absent": None, "n": len(sub), "acc": math.nan,
                         "std": math.nan, "drop": math.nan,
                         "note": note or "no absent-modality evaluation recorded (diagnostics off?)"})
            continue
        ok = sub[sub[full_col].notna()]
        full = ok[full_col].astype(float).to_numpy()
        rows.append({"setting": setting, "method": method, "absent": "none", "n": len(ok), "acc": float(full.mean()),
                     "std": float(full.std(ddof=1)) if len(ok) > 1 else math.nan, "drop": 0.0, "note": None})
        for m in mods:
            col = f"coalition.{_key([x for x in mods if x != m])}"
            vals = ok[col].astype(float).to_numpy()
            rows.append({"setting": setting, "method": method, "absent": m, "n": len(ok), "acc": float(vals.mean()),
                         "std": float(vals.std(ddof=1)) if len(ok) > 1 else math.nan,
                         "drop": float(np.mean(full - vals)), "note": None})
    return pd.DataFrame(rows, columns=["setting", "method", "absent", "n", "acc", "std", "drop", "note"])


def robustness_markdown(table: pd.DataFrame) -> str:
    """One table per setting: methods x (all modalities, each one absent), mean ± std over seeds
    with the drop from the full model in brackets."""
    if table.empty:
        return "No multimodal runs to evaluate with a modality absent.\n"
    parts = [
        "**Test accuracy with a modality absent** (its encoder sees a blank input; the model at the end of "
        "training, the method's own prediction rule; mean ± std over seeds, the drop from all modalities "
        "present in brackets). From the absent-modality evaluations of the Shapley diagnostics.\n"
    ]
    for setting, sub in table.groupby("setting", sort=False):
        absent = [a for a in dict.fromkeys(sub["absent"]) if a not in (None, "none") and not pd.isna(a)]
        cols = ["all"] + [f"no {a}" for a in absent]
        grid = pd.DataFrame("", index=list(dict.fromkeys(sub["method"])), columns=cols)
        for _, r in sub.iterrows():
            if r["absent"] is None or pd.isna(r["absent"]):
                grid.loc[r["method"], "all"] = f"N/A: {r['note']}"
                continue
            cell = f"{r['acc']:.2f}" + (f" ± {r['std']:.2f}" if not math.isnan(r["std"]) else "")
            if r["absent"] != "none":
                cell += f" ({-r['drop']:+.2f})"
            grid.loc[r["method"], "all" if r["absent"] == "none" else f"no {r['absent']}"] = cell
        grid.index = [md_escape(m) for m in grid.index]
        grid.columns = [md_escape(c) for c in grid.columns]
        grid = grid.map(md_escape)
        parts.append(f"*{md_escape(setting)}*\n\n{grid.reset_index(names='method').to_markdown(index=False)}\n")
    return "\n".join(parts)

