"""Classification metrics (scikit-learn's, ported to the bit where its per-call validation was
the cost), and the named model-selection rules.

MAP is the lab protocol of LFM/IPRM (njustkmg/NeurIPS24-LFM ``Crema_epoch.py``): one-vs-rest average precision per
class on softmax scores, averaged without weights over the classes present in the labels.
Macro-F1 averages over the same classes, so a class absent from a split (a small val split,
test-only classes) counts in neither rather than as an F1 of 0 in one of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

SELECTION_RULES = ("last", "best_val", "best_test")
RULE_CAPTIONS = {
    "last": "test metrics at the last epoch",
    "best_val": "test metrics at the epoch of best validation accuracy",
    "best_test": "test metrics at the epoch of best test accuracy (the papers' protocol: "
    "selection on the test set, optimistic)",
}


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy, MAP and macro-F1 (all in %) of ``logits`` (N, K) against ``labels`` (N,)."""
    scores = torch.softmax(logits.float(), dim=1).numpy()
    y = labels.numpy()
    pred = scores.argmax(1)
    present = [k for k in range(num_classes) if (y == k).any()]
    ap = [average_precision(y == k, scores[:, k]) for k in present]
    return {
        "acc": 100.0 * float(np.mean(y == pred)),  # scikit-learn's accuracy_score, the same mean
        "map": 100.0 * float(np.mean(ap)) if ap else float("nan"),
        "f1": 100.0 * macro_f1(y, pred, present, num_classes) if present else float("nan"),
    }


def macro_f1(y: np.ndarray, pred: np.ndarray, labels: Sequence[int], num_classes: int) -> float:
    """scikit-learn's ``f1_score(y, pred, labels=labels, average="macro", zero_division=0)``:
    its ``2 tp / (true + predicted)`` per label in float64 and its NaN-aware mean, so equal to
    the bit (tests compare them), without the validation that cost 4 ms a call."""
    idx = np.asarray(labels, dtype=np.int64)
    tp = np.bincount(y[y == pred], minlength=num_classes)[idx].astype(np.float64)
    true = np.bincount(y, minlength=num_classes)[idx].astype(np.float64)
    predicted = np.bincount(pred, minlength=num_classes)[idx].astype(np.float64)
    denom = true + predicted
    zero = denom == 0
    f = (2.0 * tp) / np.where(zero, 1.0, denom)
    f[zero] = 0.0
    return float(np.nanmean(f))


def average_precision(positive: np.ndarray, score: np.ndarray) -> float:
    """scikit-learn's ``average_precision_score(positive, score)``, the same operations in the
    same order (equal to the bit; tests compare them), without its per-call input validation,
    which made the metrics most of an evaluation of small data (30 calls per epoch)."""
    order = np.argsort(score, kind="stable")[::-1]  # descending; ties collapse below
    s, t = score[order], positive[order].astype(np.float64)
    thresholds = np.r_[np.nonzero(np.diff(s))[0], t.size - 1]
    tps = np.cumsum(t, dtype=np.float64)[thresholds]
    fps = 1 + thresholds.astype(np.float64) - tps
    ps = tps + fps
    precision = np.where(ps != 0, np.divide(tps, ps, out=np.zeros_like(tps), where=ps != 0), 0.0)
    recall = tps / tps[-1]
    precision = np.concatenate((precision[::-1], [1.0]))
    recall = np.concatenate((recall[::-1], [0.0]))
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def select_epoch(history: Sequence[dict[str, Any]], rule: str) -> dict[str, Any] | None:
    """The epoch entry chosen by ``rule``; ties go to the first epoch reaching the maximum."""
    history = [e for e in history if e.get("val") is not None]  # epochs the method evaluated
    if not history:
        return None
    if rule == "last":
        return history[-1]
    split = {"best_val": "val", "best_test": "test"}[rule]
    history = [e for e in history if e.get(split) is not None]  # no test under eval_test=false
    if not history:
        return None
    best = None
    for entry in history:
        acc = entry[split]["fused"]["acc"]
        if best is None or acc > best[split]["fused"]["acc"]:
            best = entry
    return best


def final_metrics(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Test (and val) metrics under every selection rule, labelled with its epoch."""
    out: dict[str, Any] = {}
    for rule in SELECTION_RULES:
        entry = select_epoch(history, rule)
        if entry is not None:
            out[rule] = {"epoch": entry["epoch"], "test": entry["test"], "val": entry["val"]}
    return out
