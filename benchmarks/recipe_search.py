"""Choose a dataset's training recipe from validation accuracy only, and measure each view alone.

The procedure the feature-set plugins' recipes come from (their docstrings quote its output):

1. **Batch size** by rule, not by search: 64, or for a small training split the largest power
   of two at most a tenth of the training samples left after the validation carve-out
   (at least 16), so an epoch has about ten or more optimizer steps.
2. **Epochs and learning rate**: Concat (fused cross-entropy only) on the dataset's default
   modalities, under the honest protocol (validation carved from train with the plugin's
   ``val_fraction`` and fixed ``split_seed``; the test split is never read for the choice),
   SGD with momentum 0.9 and a cosine schedule to zero over the run, for every candidate
   (epochs E, learning rate) and every seed. A run's score is its validation accuracy at its
   last epoch (the model the schedule ends on). The recipe is the candidate with the **fewest
   epochs** whose mean score over the seeds is within ``max(tol, standard error of the best
   candidate)`` of the best mean (``tol`` = 1 accuracy point, the region of practical
   equivalence of the benchmark's Bayesian test, :mod:`mmbalance.stats_control`); among equally short ones the higher mean. In words: the
   epoch count where Concat's validation accuracy stops improving by more than seed noise.
   Where that choice lies on the edge of the grid, the grid is widened once in that direction
   (half or twice the learning rate, half or twice the epochs, at least 5) and the choice is
   made again over all candidates.
3. **Each view alone**: the ``unimodal`` method on every view with the chosen recipe, the same
   seeds, validation accuracy at the last epoch: the evidence for which view is strongest.

Every number here is a validation accuracy (%), from runs recorded in a temporary folder
(deleted afterwards unless ``--records`` is given). Run it from the repository root::

    python benchmarks/recipe_search.py landsat                # search + views, writes
                                                              # benchmarks/recipes/landsat.json
    python benchmarks/recipe_search.py landsat --views-only --set epochs=30 lr=0.01

It trains on one thread per process; on a shared 2-core machine run one dataset at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

EPOCHS = (10, 20, 40, 80)
LRS = (0.01, 0.05)
SEEDS = (0, 1, 2)
TOL = 1.0  # accuracy points not worth more epochs: the benchmark's region of practical equivalence
OUT = Path(__file__).resolve().parent / "recipes"
QUIET = {"diagnostics": False, "checkpoint": False, "progress": "off", "log_epochs": False, "device": "cpu"}


# ---- pure rules ------------------------------------------------------------------------------
def batch_size_rule(n_train: int, cap: int = 64, floor: int = 16) -> int:
    """64, or the largest power of two <= n_train / 10 (at least ``floor``) for small splits."""
    size = cap
    while size > floor and size * 10 > n_train:
        size //= 2
    return size


def summarise(scores: Sequence[float]) -> dict[str, float]:
    """Mean, sample std and standard error of the mean of one candidate's per-seed scores."""
    a = np.asarray(scores, dtype=float)
    std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    return {"mean": float(a.mean()), "std": std, "se": std / math.sqrt(len(a)) if len(a) else float("nan")}


def choose(candidates: Sequence[Mapping[str, Any]], tol: float = TOL) -> dict[str, Any]:
    """The candidate with the fewest epochs whose mean is within ``max(tol, se_best)`` of the
    best mean (ties in epochs: the higher mean). Each candidate: epochs, lr, mean, se."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    best = max(candidates, key=lambda c: c["mean"])
    margin = max(tol, best["se"])
    good = [c for c in candidates if c["mean"] >= best["mean"] - margin]
    chosen = min(good, key=lambda c: (c["epochs"], -c["mean"]))
    return {**chosen, "best_mean": best["mean"], "best": {"epochs": best["epochs"], "lr": best["lr"]},
            "margin": margin}


# ---- runs ------------------------------------------------------------------------------------
def _run(method: str, dataset: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    from mmbalance.runner import run

    return run(method, dataset, {**QUIET, **overrides}).record


def last_val_acc(record: Mapping[str, Any]) -> float:
    return float(record["epochs"][-1]["val"]["fused"]["acc"])


def train_size(dataset: str, overrides: Mapping[str, Any]) -> tuple[int, list[str], list[str], float]:
    """Training samples after the validation carve-out, default and available modalities, and
    the validation fraction, as the plugin builds them."""
    from mmbalance.runner import resolve_config

    cfg, ds_cls, _ = resolve_config("concat", dataset, dict(overrides))
    ds = ds_cls()
    mods = cfg.get("modalities") or ds.default_modalities(cfg)
    splits = ds.build(cfg, mods)
    return len(splits.train), list(mods), ds.available_modalities(cfg), float(cfg["val_fraction"])


def extend(chosen: Mapping[str, Any], epochs: Sequence[int], lrs: Sequence[float],
           min_epochs: int = 5) -> tuple[list[int], list[float]]:
    """The grid, widened once where the chosen candidate sits on its edge: half the smallest
    or twice the largest learning rate, half the fewest epochs (not below ``min_epochs``) or
    twice the most."""
    e, lr = list(epochs), list(lrs)
    if chosen["lr"] == max(lrs):
        lr.append(max(lrs) * 2)
    elif chosen["lr"] == min(lrs):
        lr.append(min(lrs) / 2)
    if chosen["epochs"] == min(epochs) and min(epochs) // 2 >= min_epochs:
        e.append(min(epochs) // 2)
    elif chosen["epochs"] == max(epochs):
        e.append(max(epochs) * 2)
    return sorted(e), sorted(lr)


def _grid(dataset: str, base: Mapping[str, Any], epochs: Sequence[int], lrs: Sequence[float],
          seeds: Sequence[int], known: dict[tuple[int, float], dict[str, Any]]) -> list[dict[str, Any]]:
    """Every (epochs, lr) candidate's per-seed scores; ``known`` ones (same seeds) are reused."""
    out = []
    for e in epochs:
        for lr in lrs:
            c = known.get((e, lr))
            if c is None or c.get("seeds", list(seeds)) != list(seeds):
                scores = [last_val_acc(_run("concat", dataset, {**base, "epochs": e, "lr": lr, "seed": s})) for s in seeds]
                c = {"epochs": e, "lr": lr, "seeds": list(seeds), "scores": scores, **summarise(scores)}
                print(f"  concat E={e:3d} lr={lr:<6g} val {c['mean']:.2f} ± {c['std']:.2f}  {scores}", flush=True)
            known[(e, lr)] = c
            out.append(c)
    return out


def search(dataset: str, base: Mapping[str, Any], epochs: Sequence[int], lrs: Sequence[float],
           seeds: Sequence[int], tol: float, known: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The grid, the choice, and one widening of the grid where the choice is on its edge.
    ``known``: candidates of an earlier run of this search (reused, the runs are deterministic)."""
    cache = {(int(c["epochs"]), float(c["lr"])): dict(c) for c in known}
    first = choose(_grid(dataset, base, epochs, lrs, seeds, cache), tol)
    wide_e, wide_lr = extend(first, epochs, lrs)
    candidates = _grid(dataset, base, wide_e, wide_lr, seeds, cache)
    return {"grid": {"epochs": wide_e, "lrs": wide_lr}, "first_choice": {"epochs": first["epochs"], "lr": first["lr"]},
            "candidates": candidates, "chosen": choose(candidates, tol)}


def views_alone(dataset: str, base: Mapping[str, Any], views: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
    out = {}
    for v in views:
        run_on = {**base, "modalities": list(views), "modality": v}
        scores = [last_val_acc(_run("unimodal", dataset, {**run_on, "seed": s})) for s in seeds]
        out[v] = {"scores": scores, **summarise(scores)}
        print(f"  unimodal {v:10s} val {out[v]['mean']:.2f} ± {out[v]['std']:.2f}  {scores}", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset")
    p.add_argument("--epochs", default=",".join(map(str, EPOCHS)), help="candidate epoch counts")
    p.add_argument("--lrs", default=",".join(map(str, LRS)), help="candidate learning rates")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--tol", type=float, default=TOL, help="accuracy points not worth more epochs")
    p.add_argument("--views-only", action="store_true", help="skip the search: views alone under --set")
    p.add_argument("--set", nargs="*", default=[], help="key=value overrides (e.g. modalities, amp)")
    p.add_argument("--records", help="keep the runs here (default: a temporary folder, deleted)")
    p.add_argument("--reuse", help="a result JSON of this search whose candidates need no rerun")
    p.add_argument("--out", help=f"result JSON (default {OUT}/<dataset>.json; '-' to skip)")
    args = p.parse_args(argv)

    import torch

    from mmbalance.config import parse_overrides

    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    records = Path(args.records) if args.records else Path(tempfile.mkdtemp(prefix="recipe_"))
    base: dict[str, Any] = {**parse_overrides(args.set), "records": str(records)}
    start = time.perf_counter()
    try:
        n_train, mods, views, val_fraction = train_size(args.dataset, base)
        base.setdefault("batch_size", batch_size_rule(n_train))
        result: dict[str, Any] = {
            "dataset": args.dataset, "modalities": mods, "n_train": n_train, "val_fraction": val_fraction,
            "batch_size": base["batch_size"], "seeds": seeds, "score": "validation accuracy (%) at the last epoch",
            "overrides": {k: v for k, v in base.items() if k != "records"},
        }
        print(f"{args.dataset}: {n_train} training samples after the carve-out, batch {base['batch_size']}, "
              f"modalities {mods}", flush=True)
        if not args.views_only:
            known = []
            if args.reuse and Path(args.reuse).is_file():
                known = json.loads(Path(args.reuse).read_text(encoding="utf-8")).get("candidates", [])
            found = search(args.dataset, base, [int(e) for e in args.epochs.split(",")],
                           [float(x) for x in args.lrs.split(",")], seeds, args.tol, known)
            result.update(found, tol=args.tol)
            chosen = found["chosen"]
            base.update(epochs=chosen["epochs"], lr=chosen["lr"])
            print(f"  chosen: E={chosen['epochs']} lr={chosen['lr']:g} (val {chosen['mean']:.2f}; best "
                  f"{chosen['best_mean']:.2f} at E={chosen['best']['epochs']} lr={chosen['best']['lr']:g})", flush=True)
        result["views_alone"] = views_alone(args.dataset, base, views, seeds)
        result["views_recipe"] = {k: base.get(k) for k in ("epochs", "lr", "batch_size")}
        result["wall_s"] = round(time.perf_counter() - start, 1)
    finally:
        if not args.records:
            shutil.rmtree(records, ignore_errors=True)
    if args.out != "-":
        out = Path(args.out) if args.out else OUT / f"{args.dataset}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
