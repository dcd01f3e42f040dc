"""OGR-GB: Gradient-Blending (Wang, Tran, Feiszli, CVPR 2020), "What makes training multi-modal
classification networks hard?".

Documented in the documentation's ogr_gb page
(ΔG/ΔO² with sum normalisation). Heads k ∈ {m_1..m_M, fused}: the model's unimodal
linear head on each pooled embedding e_m, and the fused head (concat by default). Training loss

    L_blend = sum_k w_k * CE(z_k, y)                        (one encoder pass per step)

with the weights w estimated from overfitting-to-generalisation ratios on the held-out slice
of train (``heldout_fraction``, carved once per cell by the trainer, kept apart from
validation). One estimation, from the current state of the run's model:

1. L^T_0, L^V_0 per head: mean per-sample CE in eval mode, L^T on the training split (its first
   ``train_loss_fraction`` of batches, in file order, so every measurement of a run uses the
   same samples), L^V on the held-out slice; one pass each, every head at once;
2. sub-training on deep copies (``trainer.sub_train``, on the training split, for
   ``super_epoch`` epochs): each unimodal sub-network (encoder_m + unimodal head m, CE of that
   head only; the other encoders are not run) and the multimodal network (every encoder + the
   fused head, fused CE only);
3. L^T_1, L^V_1 per head on the trained copies, the same samples as in 1;
4. ``ΔG = L^V_0 - L^V_1``, ``ΔO = (L^V_1 - L^T_1) - (L^V_0 - L^T_0)``,
   ``w~_k = ΔG_k / max(ΔO_k², floor_k)``, ``w = w~ / sum(w~)`` (:func:`blend_weights`, pure),
   with ``floor_k`` the larger of ``min_delta_o_sq`` and the sampling variance of head k's
   measured ΔO (:func:`delta_o_noise_sq`, from the per-sample losses of 1 and 3); a head with
   ``ΔG ≤ 0`` keeps its current weight (``dg_rule``, below).

``mode=offline``: one estimation from the initial weights in ``on_cell_start``; the run then
trains from those same initial weights with the fixed w. ``mode=online`` (default, the
suite's choice): an estimation at the start of every super-epoch
(``epoch % super_epoch == 0``, in ``on_train_epoch_start``), from the current model. The run's
model, its optimizer and the global RNG streams are untouched by an estimation (copies, and
the RNG state is restored afterwards), so the main loop draws what it would draw without one.

Edge cases and the defaults that keep a modality from being locked out (issue 21, item 8). Run
at its earlier defaults (``max(ΔG, 0)``, ``ΔO²`` floored at 1e-4 only), ``mmbalance run --method
ogr_gb --dataset mfeat --set modalities=zer,mor --epochs 10`` gave the weights zer 0.009, mor
0.953, fused 0.038 at seed 0: mor's measured ΔO was -0.0004, so its ΔO² sat on the 1e-4 floor
and its weight was 100 times the others'; the zer head then hardly trained (15-17 % test
accuracy, 10 classes) and the fused head learnt at 4 % of its rate (fused test accuracy 43.75,
33.75 and 74.5 % at seeds 0-2). Each choice checked against G-Blend and its reimplementations:

* **One estimation at epoch 0, from the untrained model** (with ``super_epoch`` = 10 and 10
  epochs): what the paper's offline G-Blend and every online reimplementation do (MultiBench
  ``gb_estimate`` before each block of ``gb_epoch`` epochs, BalanceBenchmark at ``epoch %
  super_epoch == 0``, both from epoch 0). Kept.
* **ΔG ≤ 0** (the held-out loss did not fall over the window): ``max(ΔG, 0)``, the earlier
  default (``dg_rule=zero``), gave such a head weight 0. A head with weight 0 does not train,
  so the next estimation starts it from the same parameters and can switch it off again, for
  the whole run. Neither reimplementation does that: both take ``|ΔG|`` (MultiBench
  ``abs(g / (oi * oi))`` with ``g = L^V_1 - L^V_0``, BalanceBenchmark ``abs(g / o**2)``), which
  rewards the rise: on ``synthetic`` with a pure-noise m2 (``strength=[1.5, 0]``,
  ``n_train=120``, ``super_epoch=5``) m2's held-out loss rose (ΔG = -0.088) and ``|ΔG|`` gave it
  0.81 of the weight. The paper's weight is proportional to the gain, so a non-positive
  measured gain is no evidence for any weight; default ``dg_rule=keep``: such a head keeps its
  current weight (uniform 1/(M+1) at the first estimation) and the heads that did generalise
  share the rest in proportion to ``ΔG / ΔO²``. The same applies to a non-finite estimate (a
  diverged sub-training). ``dg_rule=abs`` is the reimplementations' ``|ΔG|``.
* **The ΔO² floor**: ``w ∝ ΔG / ΔO²`` stands for the paper's ``<∇L*, v_k> / σ_k²``, ΔO² being
  the estimate of the head's gradient noise. The formula itself gives a head whose ΔO is near 0
  nearly all the weight (MultiBench's delta form has no floor; its default non-delta form floors
  a negative gap at 1e-4, i.e. a squared gap of 1e-8; BalanceBenchmark avoids it only by summing
  batch losses over a train loader many times longer than the validation one, so its ΔO is
  dominated by the fall of the training loss). But ΔO is measured on a finite held-out slice
  (116 samples for mfeat) and cannot be resolved below its own standard error: mor's -0.0004
  had a standard error of 0.106. ``delta_o_floor=noise`` (default) floors each head's ΔO² at
  the larger of ``min_delta_o_sq`` and the sampling variance of its measured ΔO
  (:func:`delta_o_noise_sq`: the variances of the paired per-sample loss changes over the
  held-out and the train samples, each divided by its count); ``delta_o_floor=fixed`` is the
  earlier ``min_delta_o_sq`` alone. With both defaults the same run estimates zer 0.223, mor
  0.211, fused 0.566 at seed 0 (mor's floor 0.011), and the last epoch's fused test accuracy
  is 76.75, 76.5 and 79.25 % at seeds 0-2 (zer head 42.5, 48.25, 38.5 %; mor head 46.5, 52,
  56 %) where the earlier defaults gave 43.75, 33.75 and 74.5 % and concat gives 79.5, 80 and
  82.5 % (10 epochs, CPU).
* ``delta_o_rule=clamp`` clamps ΔO itself from below at the floor's square root before
  squaring, so any ΔO ≤ 0 (a head that generalises at least as fast as it fits) gets the largest
  weight the floor allows; ``square`` (default) squares it, as the paper.
* non-finite losses (a diverged sub-training): raw weight 0 (kept weight under ``dg_rule=keep``).
* every raw weight 0: the previous weights are kept (uniform 1/(M+1) before the first
  estimation), and the diagnostic ``fallback`` is 1.
* ``max_weight < 1`` caps any single weight (a safeguard, e.g.
  ≤ 0.9), the excess going to the other heads in proportion to their weights (equally, if they
  all have 0). Off by default (1.0): the formula as written.

A head with weight 0 (``dg_rule=zero``) is not trained during that
super-epoch; its per-modality accuracy is then that of a head frozen since the previous
estimation.

Cost: a training step is one forward of every encoder, M + 1 linear heads and M + 1 CEs
(the plain joint step plus M small heads). The estimation's sub-training is counted by the
trainer as estimation cost (``record["final"]["estimation_cost"]``, per epoch
``estimation_cost``) and excluded from ``train_time_s``; the estimation's measurement passes
and copies are charged to the same counter (batches and time, no optimizer steps).

Departures from the official code (facebookresearch/VMZ consumes precomputed weights only and
never computes them; BalanceBenchmark, MultiBench and PMR's ``OGR_model`` are the
reimplementations read for it):

* **Fused head**: the suite's linear concat head (``fusion_mode=sum``: one linear head per
  modality, summed), as for every method here; VMZ's is concat -> FC-ReLU-FC-ReLU-FC.
* **Held-out data**: a fixed 8 % slice of train (MultiBench's ``v_rate = 0.08``), never the
  validation or test split (BalanceBenchmark measures L^V on its validation loader).
* **Losses**: per-sample means in eval mode on fixed samples, measured before and after the
  estimation window (BalanceBenchmark sums batch losses, takes L^T from the training-mode losses
  of the estimation epochs and its "before" after the first estimation epoch).
  MultiBench's default ``delta=False`` (final losses instead of deltas) is not
  offered.
* **Unimodal estimates** train encoder_m + unimodal head m (the paper), not the fused head with
  the other modalities zeroed (BalanceBenchmark). With ``unimodal_estimation=auto`` (default) the
  M unimodal sub-networks train together in one sub-training on one copy with the loss
  ``sum_m CE_m``: their parameters are disjoint, so for any per-parameter optimizer (SGD, Adam,
  AdamW) this is the same computation as M separate runs on the same batches, at one data pass;
  with ``grad_clip`` set the global-norm clip would couple them, so ``auto`` then runs them
  separately (``separate`` always does; ``joint`` forces the shared run).
* **Estimation optimizer**: ``fresh`` (default) = the dataset recipe's optimizer at its base
  learning rate, no momentum history, as BalanceBenchmark (reloads its temporary optimizer's
  initial state) and MultiBench (new optimizer per estimate); ``copy`` = a copy of the run's
  optimizer state (momentum, current scheduled rate). The rate is constant during sub-training.
* **Inference**: the fused head (``inference=fused``, the paper's). PMR's
  ``OGR_model.forward`` always returns ``(out_f + out_a + out_v) / 3``:
  ``inference=mean`` averages the M + 1 heads' logits at evaluation (training always uses the
  blended loss over the separate heads). Per-modality accuracy: the trained unimodal heads.
* MultiBench's extra fused-head fine-tuning (``finetune_epoch``) is not implemented.

No published per-dataset values exist for the suite's datasets (the weights are
computed); ``super_epoch=10`` (BalanceBenchmark) is the default everywhere.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.config import Option, Search
from mmbalance.errors import ConfigError
from mmbalance.heads import build_head
from mmbalance.method import EstimationCost, Method, Prediction
from mmbalance.registry import register_method

NAME = "ogr_gb"
FUSED = "fused"
HELDOUT_FRACTION = 0.08  # MultiBench's v_rate
TAG = "ogr_gb"

OPTIONS: dict[str, Option] = {
    "mode": Option("online", "online: re-estimate the blend weights every super_epoch epochs from the "
                   "current model; offline: once from the initial weights", choices=("online", "offline")),
    # search range: BalanceBenchmark 10, MultiBench 20 epochs per estimate
    "super_epoch": Option(10, "epochs per estimate; also the length of each estimation's sub-training "
                          "(BalanceBenchmark 10, MultiBench 20)", type=int, min=1, search=Search(2, 20)),
    "estimation_optimizer": Option("fresh", "optimizer of the sub-training: fresh (dataset recipe at "
                                   "the base rate) or copy (the run's optimizer state and current rate)",
                                   choices=("fresh", "copy")),
    "unimodal_estimation": Option("auto", "train the M unimodal sub-networks in one shared sub-training "
                                  "(joint; exact without grad_clip), one each (separate), or joint "
                                  "unless grad_clip is set (auto)", choices=("auto", "joint", "separate")),
    "train_loss_fraction": Option(1.0, "share of the training batches (first ones, in file order) on "
                                  "which L^T is measured", type=float, min=0, max=1, min_open=True),
    "min_delta_o_sq": Option(1e-4, "floor on ΔO² in w = ΔG / ΔO² (guards ΔO -> 0)", type=float,
                             min=0, min_open=True),
    "delta_o_floor": Option("noise", "floor of ΔO²: noise = the larger of min_delta_o_sq and the sampling "
                            "variance of the measured ΔO (its squared standard error), fixed = "
                            "min_delta_o_sq only (the earlier default)", choices=("noise", "fixed")),
    "delta_o_rule": Option("square", "ΔO <= 0: square = ΔO enters squared (reference), clamp = ΔO "
                           "clamped below at the floor's square root (largest weight)",
                           choices=("square", "clamp")),
    "dg_rule": Option("keep", "a head whose held-out loss did not fall (ΔG <= 0): keep its current weight "
                      "(uniform at the first estimate), abs = |ΔG| as MultiBench and BalanceBenchmark, zero = "
                      "weight 0 (the earlier default; can switch a head off for the whole run)",
                      choices=("keep", "abs", "zero")),
    "max_weight": Option(1.0, "cap on any single blend weight (1 = no cap; e.g. 0.9)",
                         type=float, min=0, max=1, min_open=True),
    "fusion_mode": Option("concat", "fused head: concat (W [e_1; ...; e_M] + b) or sum (sum_m W_m e_m + b_m)",
                          choices=("concat", "sum")),
    "inference": Option("fused", "evaluation logits: the fused head (fused) or the mean of the M + 1 "
                        "heads (mean, PMR's OGR_model)", choices=("fused", "mean")),
}


# ---- pure mathematics (no trainer state) -------------------------------------------------------
def generalisation_and_overfitting(
    lt0: float, lv0: float, lt1: float, lv1: float
) -> tuple[float, float]:
    """``(ΔG, ΔO)`` of one head over an estimation window (the paper's definitions).

    ``ΔG = L^V_0 - L^V_1`` (positive when the held-out loss falls), ``ΔO = O_1 - O_0`` with
    ``O = L^V - L^T`` (positive when the train/held-out gap grows).
    """
    return lv0 - lv1, (lv1 - lt1) - (lv0 - lt0)


def delta_o_noise_sq(
    t0: torch.Tensor, t1: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor
) -> torch.Tensor:
    """The sampling variance of each head's measured ΔO from its per-sample losses.

    ``t0``/``t1`` (heads, N_T) are the train losses of the same samples before and after the
    window, ``v0``/``v1`` (heads, N_V) the held-out ones. ``ΔO = mean(v1 - v0) - mean(t1 - t0)``
    is a difference of two means of paired per-sample changes over independent samples, so its
    variance is ``var(v1 - v0) / N_V + var(t1 - t0) / N_T`` (unbiased variances; 0 for a single
    sample). Returns (heads,) in fp32.
    """

    def mean_variance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = (b.float() - a.float())
        n = d.shape[1]
        return d.var(dim=1) / n if n > 1 else torch.zeros(d.shape[0], device=d.device)

    return mean_variance(v0, v1) + mean_variance(t0, t1)


def raw_blend_weight(
    dg: float, do: float, *, min_delta_o_sq: float = 1e-4, delta_o_rule: str = "square", dg_rule: str = "zero"
) -> float:
    """The unnormalised weight ``ΔG / ΔO²`` with the documented edge-case rules.

    ``ΔG ≤ 0`` -> 0 (``dg_rule=abs``: ``|ΔG|``; ``keep`` is applied by :func:`blend_weights`,
    which gives such a head its previous weight); ``ΔO²`` floored at ``min_delta_o_sq``
    (``square``), or ΔO clamped below at ``sqrt(min_delta_o_sq)`` first (``clamp``); a
    non-finite ΔG or ΔO -> 0.
    """
    if not (math.isfinite(dg) and math.isfinite(do)):
        return 0.0
    if dg_rule not in ("keep", "abs", "zero"):
        raise ValueError(f"dg_rule must be 'keep', 'abs' or 'zero', got {dg_rule!r}")
    gain = abs(dg) if dg_rule == "abs" else max(dg, 0.0)
    if gain == 0.0:
        return 0.0
    if delta_o_rule == "square":
        denom = max(do * do, min_delta_o_sq)
    elif delta_o_rule == "clamp":
        denom = max(do, math.sqrt(min_delta_o_sq)) ** 2
    else:
        raise ValueError(f"delta_o_rule must be 'square' or 'clamp', got {delta_o_rule!r}")
    return gain / denom


def cap_weights(weights: Sequence[float], cap: float) -> list[float]:
    """Cap every weight of a normalised vector at ``cap``; the excess goes to the uncapped
    weights in proportion to their values (equally when they are all 0). ``cap >= 1``: no-op."""
    w = [float(x) for x in weights]
    if cap >= 1.0:
        return w
    k = len(w)
    if cap * k < 1.0 - 1e-12:
        raise ValueError(f"a cap of {cap} cannot hold {k} weights summing to 1 (needs cap >= 1/{k})")
    fixed: set[int] = set()
    while True:
        over = [i for i in range(k) if i not in fixed and w[i] > cap]
        if not over:
            return w
        for i in over:
            fixed.add(i)
            w[i] = cap
        free = [i for i in range(k) if i not in fixed]
        if not free:
            return w
        rest = 1.0 - cap * len(fixed)
        total = sum(w[i] for i in free)
        for i in free:
            w[i] = w[i] * rest / total if total > 0 else rest / len(free)


@dataclass
class BlendResult:
    """One estimation: the new weights and what they came from (all per head, in head order)."""

    weights: list[float]
    raw: list[float]
    dg: list[float]
    do: list[float]
    fallback: bool
    losses: dict[str, list[float]] = field(default_factory=dict)  # LT0, LV0, LT1, LV1
    floors: list[float] = field(default_factory=list)  # the ΔO² floor each head had


def blend_weights(
    lt0: Sequence[float],
    lv0: Sequence[float],
    lt1: Sequence[float],
    lv1: Sequence[float],
    *,
    previous: Sequence[float] | None = None,
    min_delta_o_sq: float = 1e-4,
    delta_o_rule: str = "square",
    dg_rule: str = "zero",
    max_weight: float = 1.0,
    noise_sq: Sequence[float] | None = None,
) -> BlendResult:
    """G-Blend weights from each head's train (L^T) and held-out (L^V) losses at the start (0)
    and the end (1) of the estimation window: ``w_k ∝ ΔG_k / ΔO_k²``, normalised to sum 1,
    then capped at ``max_weight``. When every raw weight is 0 the ``previous`` weights are kept
    (uniform when there are none) and ``fallback`` is True. ``dg_rule=keep``: a head whose raw
    weight is 0 (ΔG ≤ 0, or a non-finite estimate) keeps its previous weight and the others
    share the rest in proportion to their raw weights.

    ``noise_sq`` (one per head, optional): the sampling variance of each measured ΔO; head k's
    ΔO² is then floored at ``max(min_delta_o_sq, noise_sq[k])`` (:func:`delta_o_noise_sq`)."""
    n = len(lt0)
    if not (len(lv0) == len(lt1) == len(lv1) == n) or n == 0:
        raise ValueError("lt0, lv0, lt1, lv1 need one loss per head, the same heads")
    if noise_sq is not None and len(noise_sq) != n:
        raise ValueError("noise_sq needs one variance per head")
    floors = [max(min_delta_o_sq, float(v)) if noise_sq is not None and math.isfinite(float(v))
              else min_delta_o_sq for v in (noise_sq if noise_sq is not None else [0.0] * n)]
    dgs, dos, raw = [], [], []
    for a, b, c, d, floor in zip(lt0, lv0, lt1, lv1, floors, strict=True):
        dg, do = generalisation_and_overfitting(float(a), float(b), float(c), float(d))
        dgs.append(dg)
        dos.append(do)
        raw.append(raw_blend_weight(dg, do, min_delta_o_sq=floor, delta_o_rule=delta_o_rule, dg_rule=dg_rule))
    total = sum(raw)
    base = [float(x) for x in previous] if previous is not None else [1.0 / n] * n
    if total > 0 and math.isfinite(total):
        kept = [r == 0.0 for r in raw] if dg_rule == "keep" else [False] * n
        rest = 1.0 - sum(b for b, k in zip(base, kept, strict=True) if k)
        weights = cap_weights([b if k else rest * r / total for b, k, r in zip(base, kept, raw, strict=True)],
                              max_weight)
        fallback = False
    else:
        weights = base
        fallback = True
    losses = {"LT0": [float(x) for x in lt0], "LV0": [float(x) for x in lv0],
              "LT1": [float(x) for x in lt1], "LV1": [float(x) for x in lv1]}
    return BlendResult(weights, raw, dgs, dos, fallback, losses, floors)


def blended_loss(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k * L_k`` in fp32 (``losses``, ``weights``: (K,) tensors)."""
    return (weights.float() * losses.float()).sum()


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Run a block without disturbing Python's, NumPy's, torch's CPU (and CUDA) RNG streams."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


# ---- the plugin --------------------------------------------------------------------------------
@register_method(NAME, "OGR-GB: Gradient-Blending, loss weights from overfitting-to-generalisation ratios (CVPR 2020)")
class OGRGB(Method):
    name = NAME
    description = "OGR-GB: Gradient-Blending, loss weights from overfitting-to-generalisation ratios (CVPR 2020)"
    options = OPTIONS
    fusion = "concat"  # informational: build_fusion follows fusion_mode
    heldout_fraction = HELDOUT_FRACTION
    key_diagnostic = "w_fused"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.heads: list[str] = []
        self.weights: list[float] = []
        self.estimations: list[dict[str, Any]] = []
        self._w_tensor: torch.Tensor | None = None
        self._pending: dict[str, Any] | None = None  # offline estimation, logged at epoch 0

    def _opt(self, key: str) -> Any:
        """Option value; the declared default when ``cfg`` lacks it (a method built by hand)."""
        return self.cfg.get(key, OPTIONS[key].default)

    # ---- declarations / set-up ----------------------------------------------------------------
    def trains_unimodal_heads(self) -> bool:
        return True  # every unimodal head carries a blended CE term

    def per_modality_source(self) -> str:
        return "unimodal_heads"

    def check_modalities(self, available: Sequence[str]) -> list[str]:
        used = super().check_modalities(available)
        cap = float(self._opt("max_weight"))
        k = len(used) + 1
        if cap * k < 1.0 - 1e-12:
            raise ConfigError(
                f"Method '{NAME}': max_weight={cap:g} cannot hold {k} blend weights (the "
                f"{len(used)} unimodal heads and the fused head) that sum to 1; it must be at "
                f"least 1/{k} = {1.0 / k:.4g}. Raise it or use max_weight=1 (no cap)."
            )
        self.heads = [*used, FUSED]
        self.weights = [1.0 / k] * k
        return used

    def build_fusion(self, dims: Mapping[str, int], num_classes: int) -> nn.Module:
        return build_head(self._opt("fusion_mode"), dims, num_classes)

    @property
    def modalities(self) -> list[str]:
        return self.heads[:-1]

    # ---- estimation ---------------------------------------------------------------------------
    def _head_logits(self, net: nn.Module, batch: Mapping[str, Any], heads: Sequence[str]) -> dict[str, torch.Tensor]:
        """Logits of ``heads`` on ``net``, running only the encoders they need."""
        need = self.modalities if FUSED in heads else [h for h in heads if h != FUSED]
        feats = {m: net.encoders[m](batch[m]) for m in need}
        out = {h: net.uni_heads[h](feats[h]) for h in heads if h != FUSED}
        if FUSED in heads:
            out[FUSED] = net.fuse(feats)
        return out

    @torch.no_grad()
    def _measure(self, net: nn.Module, heads: Sequence[str], split: str) -> tuple[list[float], int]:
        """Mean per-sample CE of each head of ``net`` on ``split`` in eval mode (one pass, one
        host sync). Train: its first ``train_loss_fraction`` of batches, in file order."""
        means, _, batches = self._measure_samples(net, heads, split)
        return means, batches

    @torch.no_grad()
    def _measure_samples(self, net: nn.Module, heads: Sequence[str], split: str
                         ) -> tuple[list[float], torch.Tensor, int]:
        """:meth:`_measure` plus the per-sample losses (heads, N) on the device, for the
        sampling noise of ΔO (the same samples, in the same order, at every measurement)."""
        assert self.trainer is not None
        fraction = float(self._opt("train_loss_fraction")) if split == "train" else None
        was = net.training
        net.eval()
        sums: torch.Tensor | None = None
        samples: list[torch.Tensor] = []
        count, batches = 0, 0
        try:
            for batch in self.trainer.iterate(split, fraction=fraction, shuffle=False, tag=f"{TAG}-measure"):
                y = batch["label"]
                with self.trainer.autocast():
                    logits = self._head_logits(net, batch, heads)
                ce = torch.stack([F.cross_entropy(logits[h].float(), y, reduction="sum") for h in heads])
                samples.append(torch.stack([F.cross_entropy(logits[h].float(), y, reduction="none") for h in heads]))
                sums = ce if sums is None else sums + ce
                count += int(y.shape[0])
                batches += 1
        finally:
            net.train(was)
        if sums is None or count == 0:
            raise ConfigError(f"Method '{NAME}': the {split} split gave no batch to measure the losses on.")
        return (sums / count).tolist(), torch.cat(samples, dim=1), batches

    def _sub_optimizer(self, net: nn.Module) -> torch.optim.Optimizer | None:
        """None (sub_train's fresh recipe optimizer) or a copy of the run's optimizer on ``net``."""
        if self._opt("estimation_optimizer") == "fresh":
            return None
        assert self.trainer is not None and self.optimizer is not None
        opt = self.trainer.default_optimizers(list(net.parameters()))[0]
        opt.load_state_dict(copy.deepcopy(self.optimizer.state_dict()))
        return opt

    def _joint_unimodal(self) -> bool:
        how = self._opt("unimodal_estimation")
        return how == "joint" or (how == "auto" and not self.cfg.get("grad_clip"))

    def _sub_networks(self) -> list[list[str]]:
        """The head groups trained together on one copy: the unimodal heads (one group, or one
        each), then the fused head."""
        uni = [self.modalities] if self._joint_unimodal() else [[m] for m in self.modalities]
        return [*uni, [FUSED]]

    def _train_copy(self, heads: Sequence[str]) -> tuple[nn.Module, EstimationCost]:
        """A deep copy of the run's model whose sub-network(s) for ``heads`` trained for
        ``super_epoch`` epochs on the training split."""
        assert self.trainer is not None and self.model is not None
        net = copy.deepcopy(self.model)
        if FUSED in heads:
            params = [p for m in self.modalities for p in net.encoder_params(m)] + net.fusion_params()
        else:
            params = [p for m in heads for p in net.encoder_params(m) + net.uni_head_params(m)]
        heads = list(heads)

        def loss_fn(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
            logits = self._head_logits(model, batch, heads)
            y = batch["label"]
            return sum(F.cross_entropy(logits[h].float(), y) for h in heads)

        cost = self.trainer.sub_train(net, params, loss_fn, "train", int(self._opt("super_epoch")),
                                      optimizer=self._sub_optimizer(net), tag=f"{TAG}-sub-uni"
                                      if FUSED not in heads else f"{TAG}-sub-fused")
        return net, cost

    def estimate(self) -> BlendResult:
        """One G-Blend estimation from the run's current model (which it leaves untouched)."""
        assert self.trainer is not None and self.model is not None
        t0 = time.perf_counter()
        sub_time, batches = 0.0, 0
        with preserved_rng(self.trainer.device):
            lt0, per_t0, n1 = self._measure_samples(self.model, self.heads, "train")
            lv0, per_v0, n2 = self._measure_samples(self.model, self.heads, "heldout")
            batches += n1 + n2
            lt1 = dict.fromkeys(self.heads, 0.0)
            lv1 = dict.fromkeys(self.heads, 0.0)
            per_t1, per_v1 = torch.empty_like(per_t0), torch.empty_like(per_v0)
            for group in self._sub_networks():
                net, cost = self._train_copy(group)
                sub_time += cost.time_s
                rows = [self.heads.index(h) for h in group]
                for split, out, per in (("train", lt1, per_t1), ("heldout", lv1, per_v1)):
                    values, samples, n = self._measure_samples(net, group, split)
                    batches += n
                    out.update(zip(group, values, strict=True))
                    per[rows] = samples
                del net
        noise = delta_o_noise_sq(per_t0, per_t1, per_v0, per_v1).tolist() if self._opt("delta_o_floor") == "noise" else None
        result = blend_weights(
            lt0, lv0, [lt1[h] for h in self.heads], [lv1[h] for h in self.heads],
            previous=self.weights,
            min_delta_o_sq=float(self._opt("min_delta_o_sq")),
            delta_o_rule=self._opt("delta_o_rule"),
            dg_rule=self._opt("dg_rule"),
            max_weight=float(self._opt("max_weight")),
            noise_sq=noise,
        )
        self._set_weights(result.weights)
        self.estimations.append({"epoch": self.epoch, "heads": list(self.heads), "weights": list(result.weights),
                                 "raw": result.raw, "dG": result.dg, "dO": result.do, "dO2_floor": result.floors,
                                 "fallback": result.fallback, **result.losses})
        if self.trainer.device.type == "cuda":
            torch.cuda.synchronize(self.trainer.device)
        self._charge(batches, time.perf_counter() - t0 - sub_time)
        return result

    def _charge(self, batches: int, time_s: float) -> None:
        """Count the measurement passes and copies as estimation cost (the contract has no
        service for it: sub_train charges only its own steps; see the report)."""
        cost = getattr(self.trainer, "estimation_cost", None)
        if isinstance(cost, EstimationCost):
            cost.add(EstimationCost(optimizer_steps=0, batches=batches, time_s=max(0.0, time_s)))

    def _set_weights(self, weights: Sequence[float]) -> None:
        self.weights = [float(w) for w in weights]
        device = self.trainer.device if self.trainer is not None else torch.device("cpu")
        self._w_tensor = torch.tensor(self.weights, dtype=torch.float32, device=device)

    def _is_estimation_epoch(self, epoch: int) -> bool:
        return self._opt("mode") == "online" and epoch % int(self._opt("super_epoch")) == 0

    # ---- loop hooks ---------------------------------------------------------------------------
    def on_cell_start(self) -> None:
        if self._opt("mode") == "offline":
            self.estimate()
            self._pending = self.estimations[-1]

    def on_fit_start(self) -> None:
        assert self.trainer is not None
        self.trainer.heldout()  # the held-out slice exists (raises a clear error otherwise)
        self._set_weights(self.weights)

    def on_train_epoch_start(self, epoch: int) -> None:
        estimated = None
        if self._is_estimation_epoch(epoch):
            self.estimate()
            estimated = self.estimations[-1]
        elif self._pending is not None:
            estimated = self._pending
        self._pending = None
        values: dict[str, float] = {f"w_{h}": w for h, w in zip(self.heads, self.weights, strict=True)}
        values["estimated"] = 1.0 if estimated is not None else 0.0
        if estimated is not None:
            for key in ("raw", "dG", "dO", "dO2_floor", "LT0", "LV0", "LT1", "LV1"):
                if key in estimated:  # dO2_floor: absent from checkpoints written before it
                    values.update({f"{key}_{h}": float(v) for h, v in zip(self.heads, estimated[key], strict=True)})
            values["fallback"] = 1.0 if estimated["fallback"] else 0.0
        self.log(**values)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        assert self.model is not None
        out = self.model(batch)
        y = batch["label"]
        logits = [out.uni[m] for m in self.modalities] + [out.fused]
        losses = torch.stack([F.cross_entropy(z.float(), y) for z in logits])
        if self._w_tensor is None or self._w_tensor.device != losses.device:
            self._w_tensor = torch.tensor(self.weights, dtype=torch.float32, device=losses.device)
        if self.trainer is not None:
            detached = losses.detach()
            self.log(**{f"loss_{h}": detached[i] for i, h in enumerate(self.heads)})
        return blended_loss(losses, self._w_tensor)

    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> Prediction:
        assert self.model is not None
        feats = self.model.encode(batch)
        uni = self.model.unimodal_logits(feats)
        fused = self.model.fuse(feats)
        if self._opt("inference") == "mean":
            fused = (fused + sum(uni.values())) / (len(uni) + 1)
        return Prediction(fused, uni)

    # ---- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"heads": list(self.heads), "weights": list(self.weights),
                "estimations": copy.deepcopy(self.estimations)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if self.heads and list(state["heads"]) != self.heads:
            raise ConfigError(
                f"Method '{NAME}': the checkpoint holds blend weights for the heads "
                f"{list(state['heads'])}, but this run has {self.heads}. Resume with the same "
                f"modalities, or start fresh."
            )
        self.heads = list(state["heads"])
        self.estimations = copy.deepcopy(list(state["estimations"]))
        self._set_weights(state["weights"])

    # ---- reporting ----------------------------------------------------------------------------
    def label(self) -> str:
        tags = []
        if self._opt("mode") == "offline":
            tags.append("offline")
        if int(self._opt("super_epoch")) != OPTIONS["super_epoch"].default:
            tags.append(f"n={int(self._opt('super_epoch'))}")
        if self._opt("estimation_optimizer") == "copy":
            tags.append("copied optimizer")
        if float(self._opt("train_loss_fraction")) != 1.0:
            tags.append(f"L^T on {float(self._opt('train_loss_fraction')):g} of train")
        if self._opt("delta_o_rule") == "clamp":
            tags.append("ΔO clamped")
        if float(self._opt("min_delta_o_sq")) != OPTIONS["min_delta_o_sq"].default:
            tags.append(f"ΔO² >= {float(self._opt('min_delta_o_sq')):g}")
        if self._opt("dg_rule") != "keep":
            tags.append({"abs": "|ΔG|", "zero": "max(ΔG, 0)"}[self._opt("dg_rule")])
        if self._opt("delta_o_floor") == "fixed":
            tags.append("fixed ΔO² floor")
        if float(self._opt("max_weight")) < 1.0:
            tags.append(f"cap {float(self._opt('max_weight')):g}")
        if self._opt("fusion_mode") != "concat":
            tags.append(f"{self._opt('fusion_mode')} fusion")
        if self._opt("inference") == "mean":
            tags.append("mean of heads")
        return "OGR-GB" if not tags else f"OGR-GB ({', '.join(tags)})"

    def record_info(self) -> dict[str, Any]:
        return {
            "heads": list(self.heads),
            "mode": self._opt("mode"),
            "super_epoch": int(self._opt("super_epoch")),
            "heldout_fraction": self.heldout_fraction,
            "estimation_optimizer": self._opt("estimation_optimizer"),
            "unimodal_estimation": "joint" if self._joint_unimodal() else "separate",
            "edge_rules": (
                f"ΔG<=0 -> {dict(keep='previous weight', abs='|ΔG|', zero='0')[self._opt('dg_rule')]}; "
                f"ΔO² floored at "
                f"{float(self._opt('min_delta_o_sq')):g}"
                f"{' or the sampling variance of ΔO' if self._opt('delta_o_floor') == 'noise' else ''} "
                f"({self._opt('delta_o_rule')}); all 0 -> previous weights"
            ),
            "inference_rule": ("fused head" if self._opt("inference") == "fused"
                               else "mean of the fused and unimodal heads' logits"),
        }
