"""Imbalance diagnostics of a trained run: linear probes of the frozen encoders, and each
modality's Shapley contribution to the fused accuracy.

Two questions a leaderboard number cannot answer:

* **How much does each encoder know?** A linear probe (:func:`linear_probe`): the frozen
  encoder's features of the train split (eval mode, no gradient, through ``model.encode``),
  standardised with train statistics, a scikit-learn ``LogisticRegression`` (C = 1.0, lbfgs,
  fixed ``random_state``), scored on the test split. An under-trained encoder (the weak
  modality joint training leaves behind) probes low even where its trained head hides it; an
  encoder that learned nothing probes at the majority-class baseline
  (``probe_baseline_acc``: always predicting the train split's most frequent class), which is
  exactly what a constant feature gets.
* **How much does the fused prediction rely on each modality?** Shapley values over absent-
  modality evaluations (:func:`shapley_diagnostics`): for every coalition S of the run's
  modalities, ``v(S)`` is the fused test accuracy when the modalities outside S are *absent*
  (their encoder sees a blank input, ``model.encode(batch, drop=...)``), computed with the
  method's own ``predict`` so each method's fusion rule (IPRM's logit sum, AGM's...) is the
  one scored. ``phi_m = sum_{S without m} |S|! (M-|S|-1)! / M! (v(S+m) - v(S))``; the values
  sum to ``v(all) - v(none)`` (:func:`shapley_values`).

``imbalance_degree`` is ``max_m phi_m - min_m phi_m`` in accuracy points: 0 when every
modality contributes the same, large when one modality carries the fused accuracy alone. It
is an absolute gap, not a ratio (a ratio explodes when the weak modality's phi is near 0 or
negative); ``shapley_share`` gives each ``phi_m / (v(all) - v(none))`` for a normalised view.

Entry point: :func:`compute_diagnostics` on an :class:`EvalView` (a model, its modalities,
the method's ``predict`` and batches of a split); the trainer hands one out at the end of a run.
Diagnosing a recorded run folder (rebuild it, restore its checkpoint) is one layer up, in
:mod:`mmbalance.diagnose`, so this module never imports the trainer.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmbalance import records
from mmbalance.errors import MMBalanceError, UnsupportedError
from mmbalance.metrics import classification_metrics

if TYPE_CHECKING:
    from mmbalance.model import MultimodalModel

DIAGNOSTICS_FILE = "diagnostics.json"
#: Logistic-regression settings of the probe: inverse L2 strength, iteration cap, seed.
PROBE_C = 1.0
PROBE_MAX_ITER = 2000
PROBE_SEED = 0
#: BLAS threads of the probe's fit, pinned: lbfgs stops at a tolerance, so the float bits of
#: its small matrix products move its end point, and OpenBLAS's default (one thread per core)
#: made a probe's accuracy depend on the machine (by 1-2 test samples of 300 on AV-digits,
#: measured). One thread is also the fast choice for these small products: 6.7x faster on
#: AV-digits' 2430x128 probe here (1.19 s -> 0.18 s), more beside another grid worker.
PROBE_BLAS_THREADS = 1
IMBALANCE_RULE = "max_m phi_m - min_m phi_m, in accuracy points (0 = every modality contributes the same)"
_MISSING = object()


class DiagnosticsError(MMBalanceError):
    """Diagnostics cannot be computed for this run (no checkpoint, not a run folder...)."""


# ---- pure math ---------------------------------------------------------------------------------
def coalition_key(coalition: Iterable[str]) -> str:
    """Name of a coalition in the output: its modalities sorted and joined by '+', or 'none'."""
    names = sorted(coalition)
    return "+".join(names) if names else "none"


def all_coalitions(modalities: Sequence[str]) -> list[frozenset[str]]:
    """Every subset of ``modalities`` (2^M of them), smallest first."""
    mods = list(modalities)
    return [frozenset(c) for r in range(len(mods) + 1) for c in itertools.combinations(mods, r)]


def shapley_weight(size: int, n: int) -> float:
    """``|S|! (n-|S|-1)! / n!``: the share of the n! arrival orders in which exactly the
    coalition S (of ``size`` players) precedes a given player, so each marginal gain is
    averaged over orders, not over subsets."""
    return math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)


def shapley_values(values: Mapping[frozenset[str], float], modalities: Sequence[str]) -> dict[str, float]:
    """Exact Shapley value of every modality from the value ``values[S]`` of every coalition.

    ``phi_m = sum_{S subset of M without m} shapley_weight(|S|, M) (v(S + m) - v(S))``. The
    values sum to ``v(M) - v(empty)`` (efficiency), a modality that never changes the value
    gets 0 (dummy), and two interchangeable modalities get the same value (symmetry): the
    only split of the fused gain over the all-absent baseline with these three properties.
    Needs all 2^M coalitions (frozensets of modality names); a missing one is an error.
    """
    mods = list(modalities)
    if len(set(mods)) != len(mods) or not mods:
        raise DiagnosticsError(f"Shapley values need distinct modality names, got {mods}.")
    wanted = all_coalitions(mods)
    missing = [coalition_key(s) for s in wanted if s not in values]
    if missing:
        raise DiagnosticsError(
            f"Shapley values over {mods} need the value of every coalition; missing: {', '.join(missing)}."
        )
    n = len(mods)
    phi: dict[str, float] = {}
    for m in mods:
        others = [o for o in mods if o != m]
        total = 0.0
        for r in range(n):
            w = shapley_weight(r, n)
            for c in itertools.combinations(others, r):
                s = frozenset(c)
                total += w * (float(values[s | {m}]) - float(values[s]))
        phi[m] = total
    return phi


def imbalance_degree(phi: Mapping[str, float]) -> float:
    """``max phi - min phi`` (accuracy points): how unequal the modalities' contributions to
    the fused accuracy are. An absolute gap rather than a ratio, so it stays finite when the
    weak modality contributes nothing (or hurts)."""
    if not phi:
        raise DiagnosticsError("imbalance degree of no modality")
    return float(max(phi.values()) - min(phi.values()))


def shapley_share(phi: Mapping[str, float]) -> dict[str, float | None]:
    """``phi_m / sum(phi)``: each modality's share of the fused gain over the all-absent
    baseline (None when that gain is 0, where a share means nothing)."""
    total = float(sum(phi.values()))
    return {m: (float(v) / total if abs(total) > 1e-12 else None) for m, v in phi.items()}


def majority_accuracy(train_y: np.ndarray, test_y: np.ndarray) -> float:
    """Test accuracy (%) of always predicting the train split's most frequent class (ties to
    the smallest label): the chance level a probe on an uninformative feature reaches."""
    train_y = np.asarray(train_y)
    test_y = np.asarray(test_y)
    classes, counts = np.unique(train_y, return_counts=True)
    top = classes[np.argmax(counts)]
    return 100.0 * float(np.mean(test_y == top)) if len(test_y) else float("nan")


def probe_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    C: float = PROBE_C,
    max_iter: int = PROBE_MAX_ITER,
    seed: int = PROBE_SEED,
) -> dict[str, Any]:
    """Fit a standardised logistic-regression probe on (train_x, train_y); accuracy in %.

    Standardisation uses train statistics only (a test statistic would leak); a constant
    feature keeps scale 1 (scikit-learn's rule), so it carries no information rather than
    dividing by zero. Returns ``probe_acc`` (test), ``probe_train_acc`` and whether lbfgs
    converged within ``max_iter``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    train_x = np.asarray(train_x, dtype=np.float64).reshape(len(train_x), -1)
    test_x = np.asarray(test_x, dtype=np.float64).reshape(len(test_x), -1)
    train_y = np.asarray(train_y)
    test_y = np.asarray(test_y)
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise DiagnosticsError("probe: features and labels differ in length.")
    if not len(train_y) or not len(test_y):
        raise DiagnosticsError("probe: the train or test split is empty.")
    for name, x in (("train", train_x), ("test", test_x)):
        if not np.isfinite(x).all():
            raise DiagnosticsError(
                f"probe: the encoder's {name} features contain NaN or infinity (a diverged model?); "
                f"a linear probe cannot be fitted."
            )
    if len(np.unique(train_y)) < 2:
        raise DiagnosticsError("probe: the train split holds a single class; a classifier cannot be fitted.")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=PROBE_BLAS_THREADS):
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(train_x, train_y)
        test_pred, train_pred = clf.predict(test_x), clf.predict(train_x)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return {
        "probe_acc": 100.0 * float(np.mean(test_pred == test_y)),
        "probe_train_acc": 100.0 * float(np.mean(train_pred == train_y)),
        "probe_converged": converged,
    }


# ---- absent modalities -------------------------------------------------------------------------
class _EncodeCalls:
    """How often the wrapped ``encode`` ran (a predict that bypasses it cannot blank anything)."""

    def __init__(self) -> None:
        self.calls = 0


@contextlib.contextmanager
def absent_modalities(model: MultimodalModel, drop: Iterable[str]) -> Iterator[_EncodeCalls]:
    """Within the block, every ``model.encode(batch, drop=d)`` also drops ``drop``.

    The method's own ``predict`` (and ``model(batch)``, which calls ``self.encode``) then sees
    those modalities absent: their encoder gets a blank input (see ``MultimodalModel.encode``).
    Done by shadowing ``encode`` (and ``encoder_inputs``) on the instance and restoring it afterwards, so methods need
    no absent-modality code. Yields a counter of the wrapped calls.
    """
    dropped = frozenset(drop)
    unknown = dropped - set(model.modalities)
    if unknown:
        raise DiagnosticsError(f"cannot mark {sorted(unknown)} absent: the model has {model.modalities}.")
    counter = _EncodeCalls()
    previous = {name: model.__dict__.get(name, _MISSING) for name in _SHADOWED}

    def shadow(inner: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(batch: Mapping[str, Any], drop: Iterable[str] = ()) -> Any:
            counter.calls += 1
            return inner(batch, drop=set(drop) | dropped)

        return wrapped

    for name in _SHADOWED:
        setattr(model, name, shadow(getattr(model, name)))
    try:
        yield counter
    finally:
        for name, before in previous.items():
            if before is _MISSING:
                delattr(model, name)
            else:
                setattr(model, name, before)


# The model's ways into its encoders: ``encode`` (features), and ``encoder_inputs`` for methods
# that run the encoders themselves (a staged forward such as Greedy's MMTM layers).
_SHADOWED = ("encode", "encoder_inputs")


@contextlib.contextmanager
def _eval_no_grad(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the block; the model's mode is restored afterwards."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


@dataclass
class EvalView:
    """What the diagnostics need of a run, and nothing more: the model, its modalities, the
    method's ``predict`` and ordered batches of a split already on the device.

    The trainer hands one out (:meth:`mmbalance.engine.loop.Trainer.eval_view`); the
    diagnostics never see the trainer, its optimizers or its loop. ``batches(split, limit)``
    yields at most ``limit`` evaluation-size batches of ``split`` ("train" or "test") in a
    fixed order; ``train_limit`` / ``eval_limit`` are the run's smoke-test batch limits.
    """

    model: MultimodalModel
    modalities: list[str]
    predict: Callable[[Mapping[str, Any]], Any]
    batches: Callable[[str, int | None], Iterable[Mapping[str, Any]]]
    autocast: Callable[[], contextlib.AbstractContextManager]
    num_classes: int
    method_name: str = "method"
    train_limit: int | None = None
    eval_limit: int | None = None


def coalition_accuracy(view: EvalView, present: Iterable[str], split: str = "test") -> float:
    """Fused accuracy (%) of the method's ``predict`` on ``split`` with only ``present``
    modalities present (the others blanked); batches limited as in evaluation."""
    model = view.model
    drop = frozenset(view.modalities) - frozenset(present)
    fused, labels = [], []
    with _eval_no_grad(model):
        for batch in view.batches(split, view.eval_limit):
            with absent_modalities(model, drop) as counter, view.autocast():
                pred = view.predict(batch)
            if drop and counter.calls == 0:
                raise UnsupportedError(
                    f"Method '{view.method_name}': its predict() does not go through "
                    f"model.encode(), so modalities cannot be made absent for the Shapley "
                    f"diagnostics. Encode through self.model.encode(batch) in predict() (or take the "
                    f"encoders' inputs from self.model.encoder_inputs(batch))."
                )
            fused.append(pred.fused.float().cpu())
            labels.append(batch["label"].cpu())
    if not labels:
        raise DiagnosticsError(f"the {split} split is empty; nothing to evaluate.")
    return classification_metrics(torch.cat(fused), torch.cat(labels), view.num_classes)["acc"]


def shapley_diagnostics(view: EvalView, split: str = "test") -> dict[str, Any]:
    """Every coalition's fused accuracy, the modalities' Shapley values and the imbalance
    degree (see the module docstring). 2^M passes over ``split``."""
    mods = list(view.modalities)
    values = {s: coalition_accuracy(view, s, split) for s in all_coalitions(mods)}
    phi = shapley_values(values, mods)
    full, empty = values[frozenset(mods)], values[frozenset()]
    return {
        "shapley": phi,
        "shapley_share": shapley_share(phi),
        "coalitions": {coalition_key(s): v for s, v in values.items()},
        "fused_acc": full,
        "absent_acc": empty,
        "imbalance_degree": imbalance_degree(phi),
        "imbalance_rule": IMBALANCE_RULE,
    }


# ---- linear probes -----------------------------------------------------------------------------
def encode_split(view: EvalView, split: str, limit: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every modality's frozen features (float32, eval mode, no grad) of ``split`` in order,
    and the labels. ``limit``: at most that many (evaluation-size) batches."""
    model = view.model
    feats: dict[str, list[np.ndarray]] = {m: [] for m in view.modalities}
    labels: list[np.ndarray] = []
    with _eval_no_grad(model):
        for batch in view.batches(split, limit):
            with view.autocast():
                out = model.encode(batch)
            for m in feats:
                f = out[m].float()
                feats[m].append(f.reshape(f.shape[0], -1).cpu().numpy())
            labels.append(batch["label"].cpu().numpy())
    if not labels:
        raise DiagnosticsError(f"the {split} split is empty; nothing to probe.")
    return {m: np.concatenate(v) for m, v in feats.items()}, np.concatenate(labels)


def linear_probe(
    view: EvalView, C: float = PROBE_C, max_iter: int = PROBE_MAX_ITER, seed: int = PROBE_SEED
) -> dict[str, Any]:
    """Linear-probe accuracy of every frozen encoder: fitted on the train split (at most
    ``limit_train_batches`` evaluation-size batches when that smoke-test limit is set), scored
    on the test split (``limit_eval_batches`` likewise)."""
    train_x, train_y = encode_split(view, "train", view.train_limit)
    test_x, test_y = encode_split(view, "test", view.eval_limit)
    probe = {m: probe_accuracy(train_x[m], train_y, test_x[m], test_y, C=C, max_iter=max_iter, seed=seed)
             for m in view.modalities}
    return {
        "probe": probe,
        "probe_baseline_acc": majority_accuracy(train_y, test_y),
        "probe_settings": {"model": "LogisticRegression (lbfgs, L2)", "C": C, "max_iter": max_iter,
                           "random_state": seed, "blas_threads": PROBE_BLAS_THREADS,
                           "standardize": "train statistics",
                           "fit_split": "train", "score_split": "test"},
        "n_train": int(len(train_y)),
        "n_test": int(len(test_y)),
    }


# ---- entry points ------------------------------------------------------------------------------
def compute_diagnostics(view: EvalView) -> dict[str, Any]:
    """Linear probes and Shapley contributions of the view's current model.

    No gradient, eval mode for the passes; the model's train/eval mode is restored. A run
    whose modalities cannot be blanked (token inputs without a ``blank_input``, a predict that
    bypasses ``model.encode``) still gets its probes; ``shapley`` is then None and
    ``shapley_unavailable`` says why, so the end of a long run is never lost to a diagnostic.
    """
    was = view.model.training
    try:
        out: dict[str, Any] = {"modalities": list(view.modalities), "split": "test"}
        out.update(linear_probe(view))
        try:
            out.update(shapley_diagnostics(view))
        except UnsupportedError as exc:
            out.update(shapley=None, shapley_share=None, coalitions=None, fused_acc=None, absent_acc=None,
                       imbalance_degree=None, imbalance_rule=IMBALANCE_RULE, shapley_unavailable=str(exc))
        return out
    finally:
        view.model.train(was)


def write_diagnostics(run_dir: Path, diagnostics: Mapping[str, Any]) -> Path:
    """Write ``run_dir/diagnostics.json`` atomically; returns its path."""
    path = Path(run_dir) / DIAGNOSTICS_FILE
    records.atomic_write_text(path, json.dumps(diagnostics, indent=2, sort_keys=False) + "\n")
    return path


def format_table(diag: Mapping[str, Any]) -> str:
    """The diagnostics as a small table: per modality probe accuracy, Shapley value and share."""
    from tabulate import tabulate

    def num(v: Any, fmt: str = "{:.2f}") -> str:
        return "–" if v is None else fmt.format(v)

    shapley = diag.get("shapley") or {}
    share = diag.get("shapley_share") or {}
    rows = [[m, num(diag["probe"][m]["probe_acc"]), num(shapley.get(m)), num(share.get(m), "{:.0%}")]
            for m in diag["modalities"]]
    lines = [tabulate(rows, headers=["modality", "probe acc", "Shapley (acc pts)", "share"])]
    lines.append(f"probe baseline (majority class): {diag['probe_baseline_acc']:.2f}")
    if diag.get("shapley") is None:
        lines.append(f"Shapley values unavailable: {diag.get('shapley_unavailable')}")
    else:
        lines.append(f"fused acc {diag['fused_acc']:.2f}, all modalities absent {diag['absent_acc']:.2f}; "
                     f"imbalance degree {diag['imbalance_degree']:.2f} ({diag['imbalance_rule']})")
        lines.append("coalitions: " + ", ".join(f"{k} {v:.2f}" for k, v in diag["coalitions"].items()))
    return "\n".join(lines)
