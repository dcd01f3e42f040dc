"""AUG: sustained boosting with adaptive classifier assignment (Jiang, Huang, Yang, NeurIPS 2025).

Docs page: ``the documentation's aug page``. Official code: njustkmg/NeurIPS25-AUG, ``train_CREMAD.py``
and ``model/AudioVideo.py`` at HEAD (841d079, two modalities); the three-modality rule from the
April 2025 ``train_NVGesture.py`` (966dbf5), deleted from the repository in May.

Model. Each modality m keeps its encoder feature e_m and a growing ensemble of small learners
on it: a base learner h_m^0(e) = ReLU(W e + b) and added learners h_m^j of the same form
(j = 1..J_m), all read the *encoder feature* (not the previous learner). ONE output layer
``head`` (Linear(hidden, C), the release's ``fc_out``) is shared by every learner of every
modality. Modality m's logits are

    F_m = head(h_m^0(e_m)) + sum_{j=1..J_m} head(h_m^j(e_m)),

summed in that order (each term carries the head's bias, as in the release). P_m = F_m minus
the newest learner's logits A_m = head(h_m^{J_m}(e_m)). No fused head is built; the model's
unimodal heads are never trained.

Loss of one modality (:func:`aug_loss`): CE(F_m, y) without added learners; with J_m >= 1

    CE(F_m, y) + CE(P_m, y) + mean_i (1 - c q_i) (-log softmax(A_m)_i[y_i]),
    q_i = softmax(P_m)_i[y_i] (detached),

which is exactly the release's CE(A, y) - c CE_soft(A, y * softmax(P).detach()) written as a
per-sample re-weighting (the samples the earlier ensemble already gets right weigh less: the
"residual error"); c = ``aug_residual_c`` (0.5 at HEAD, 0.2 in the April code).

Step (manual optimisation), per batch: every encoder forwards once; then for each modality in
the run's order: its learner stack (evaluated AFTER the previous modality's optimizer step,
through the head that step just moved), its loss, one backward (it reaches only that encoder,
its learners and the head), one optimizer step. So M optimizer steps per batch with one
optimizer; the head steps M times. The training confidence S_m += sum_i softmax(F_m)_i[y_i] is
accumulated from the same logits, before that modality's step, on the device.

Adaptive classifier assignment (:func:`assign_learners`), at the check epochs e = 0 and
(e + 1) % every == 0 (``every`` = E // 10 for E > 10 epochs, else 1; ``aug_check_every``):
two modalities a, b: rho = S_a / S_b; rho > lam + 0.01 gives b a learner, rho < lam - 0.01
gives a one (lam = 1.0). Three or more (the April rule): rho_m = S_m / sum_{k != m} S_k, every
modality with rho_m < lam gets one (lam = 0.4). ``aug_lam`` overrides lam.

Departures from the official code, each switchable:

* **Added learners are trained.** The release builds its optimizer once, before any learner is
  added, so the learners it appends later never step (they stay random Xavier features that
  only the head and the encoder adapt to). Here every learner a run can get is pre-allocated
  at set-up (Xavier-normal weight, zero bias, like the release's ``add_layer``) and inside the
  optimizer from the start; an inactive learner is simply not in the forward graph, so its
  gradient stays None and SGD, Adam and AdamW skip it entirely (no momentum, no weight decay:
  its parameters stay bit-identical, tested). Activation is then just ``J_m += 1``.
  ``aug_legacy_frozen_learners=true`` reproduces the release: learners are used in the forward
  but never trained (no gradient, never stepped). The learner-scale service
  (``set_lr_scale(..., 0)``) is not used: the trainer divides by the scale when it re-applies
  it, so a zero scale cannot be switched back on.
* **Activation after evaluation.** The release adds a learner after that epoch's test pass,
  so a new learner never enters the epoch's numbers; mmbalance evaluates after
  ``on_train_epoch_end``, so the decision and the activation happen in ``on_validation_end``
  (before the checkpoint: the active counts are the whole state). The check of the LAST
  epoch is skipped: its learner would never be trained nor evaluated (the release adds it and
  never uses it), but it would enter the post-training diagnostics.
* **torch >= 2 zero_grad.** The release pins torch 1.11, whose ``zero_grad`` leaves zero
  tensors: after modality m's step, its encoder and learners keep zero gradients and move
  again by momentum and weight decay in the next modality's step.
  ``aug_legacy_zero_grad=true`` emulates that; by default each step moves only its modality.
* **Learner width** ``aug_hidden`` = 256 (release: 512-d ResNet features -> 256); the
  encoders' width is the dataset's ``embed_dim``.
* **Prediction**: ``alpha F_1 + (1 - alpha) F_2`` with alpha = ``aug_merge_alpha`` = 0.4 on the
  run's FIRST modality (audio in the release and on every audio-visual dataset here, which
  list audio first); for M >= 3 the uniform 1/M (the April code: 0.33 / 0.33 / 0.34). Alpha is
  a fixed option, never tuned on test.
* **Schedule and input** (the dataset's recipe decides): the release steps its StepLR(70) at
  the START of each epoch, so its first decay falls at epoch 69 (``--set step_size=69``
  reproduces it; its second then falls at 138 instead of 139), and its CREMA-D loader tiles
  every clip to 20 s before the spectrogram.
* **The April ``w_network``** (a learned weight on each added learner's logits, removed from the
  May re-upload) is not implemented; HEAD is the reference.
* Scores accumulate the ensemble's true-class probability in fp32 on the device (the release
  loops over samples in Python); the check reads them once per epoch.

Open questions, settled: whether the paper's numbers used trained or
frozen added learners, and c = 0.2 or 0.5, cannot be told from the sources; the default trains
them (the paper's "sustained boosting" describes learners that learn) with HEAD's c = 0.5,
and both other readings are options. The number of learners is capped by the number of check
epochs (``aug_max_learners`` lowers the cap; the release has none: its ``num_layers`` key is
never read).

Refuses nothing by modality count (M >= 2; two-modality rule for M = 2, the April rule for
M >= 3). Cost: one forward of each encoder, M backward passes each through one encoder, M
optimizer steps per batch; the learners are small (d x hidden each).

Diagnostics: per step ``loss_<m>`` and ``conf_<m>`` (batch mean of softmax(F_m)[y]); per epoch
(logged after evaluation) ``ratio_<m>`` = S_m / sum_{k != m} S_k (the key diagnostic; for two
modalities ``ratio_<first>`` is the release's ratio) and ``learners_<m>``, the active counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.config import Option, Search
from mmbalance.errors import ConfigError
from mmbalance.method import Method, Prediction
from mmbalance.registry import register_method

NAME = "aug"
BAND = 0.01  # the release's dead band around lam (two modalities only)
LAM_TWO, LAM_MANY = 1.0, 0.4  # the release's lam for two modalities (CREMA-D) and three (NVGesture)

OPTIONS: dict[str, Option] = {
    # search range: around the release's 0.5
    "aug_residual_c": Option(0.5, "c of the residual term: the newest learner's CE is weighted by "
                             "1 - c * q(previous ensemble) (HEAD 0.5, April code 0.2)", min=0.0, max=1.0, search=Search(0.1, 1.0)),
    "aug_lam": Option(None, "lambda of the assignment check; default 1.0 for two modalities (ratio "
                      "S_a/S_b, band +-0.01), 0.4 for three or more (S_m / sum of the others)",
                      type=float, min=0.0, min_open=True),
    "aug_check_every": Option(None, "epochs between assignment checks (checks at epoch 0 and whenever "
                              "(e+1) % every == 0); default E // 10 for E > 10 epochs, else 1",
                              type=int, min=1),
    "aug_max_learners": Option(None, "most added learners per modality (default: one per check epoch, "
                               "i.e. no cap; the release has none)", type=int, min=0),
    "aug_merge_alpha": Option(0.4, "prediction weight of the run's first modality (two modalities; "
                              "the second gets 1 - alpha; three or more are weighted 1/M)",
                              min=0.0, max=1.0),
    "aug_hidden": Option(256, "width of every learner (Linear(d -> hidden) + ReLU), release 256", min=1),
    "aug_legacy_frozen_learners": Option(False, "as released: added learners are used but never trained "
                                         "(the release's optimizer is built before they exist)"),
    "aug_legacy_zero_grad": Option(False, "emulate torch 1.11 zero_grad: parameters stepped earlier in "
                                   "the batch get a zero-gradient step (momentum, weight decay)"),
}


# ---- pure mathematics ------------------------------------------------------------------------
def check_interval(epochs: int) -> int:
    """The release's check period: E // 10 epochs when E > 10, else every epoch."""
    return epochs // 10 if epochs > 10 else 1


def check_epochs(epochs: int, every: int) -> list[int]:
    """0-based epochs whose end runs the assignment check: 0 and every (e + 1) % every == 0,
    except the last epoch (its learner would never be trained or evaluated)."""
    return [e for e in range(max(0, epochs - 1)) if e == 0 or (e + 1) % every == 0]


def ensemble_ratios(scores: Mapping[str, float]) -> dict[str, float]:
    """rho_m = S_m / sum_{k != m} S_k (for two modalities rho_a = S_a / S_b, the release's)."""
    total = sum(scores.values())
    return {m: (s / (total - s) if total - s > 0 else math.inf) for m, s in scores.items()}


def assign_learners(scores: Mapping[str, float], lam: float | None = None, band: float = BAND) -> list[str]:
    """The modalities that get one more learner from the epoch's confidence sums S_m.

    Two modalities (HEAD): rho = S_a / S_b; rho > lam + band -> the second, rho < lam - band ->
    the first, otherwise none. Three or more (April): every m with S_m / sum_{k != m} S_k < lam.
    ``lam`` defaults to 1.0 / 0.4 respectively.
    """
    names = list(scores)
    ratios = ensemble_ratios(scores)
    if len(names) == 2:
        lam = LAM_TWO if lam is None else lam
        a, b = names
        if ratios[a] > lam + band:
            return [b]
        if ratios[a] < lam - band:
            return [a]
        return []
    lam = LAM_MANY if lam is None else lam
    return [m for m in names if ratios[m] < lam]


def aug_loss(full: torch.Tensor, prev: torch.Tensor | None, new: torch.Tensor | None, y: torch.Tensor,
             c: float) -> torch.Tensor:
    """One modality's loss in fp32 (see the module docstring): CE(F, y) without added learners;
    else CE(F, y) + CE(P, y) + mean_i (1 - c q_i) (-log softmax(A)_i[y_i]), q = softmax(P)[y]
    detached."""
    full = full.float()
    loss = F.cross_entropy(full, y)
    if new is None:
        return loss
    assert prev is not None
    prev, new = prev.float(), new.float()
    q = torch.softmax(prev.detach(), dim=1).gather(1, y.view(-1, 1)).squeeze(1)
    nll = F.cross_entropy(new, y, reduction="none")
    return loss + F.cross_entropy(prev, y) + ((1.0 - c * q) * nll).mean()


def confidence_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_i softmax(logits)_i[y_i], fp32, detached (the release's training score)."""
    return torch.softmax(logits.detach().float(), dim=1).gather(1, y.view(-1, 1)).sum()


# ---- the learners ----------------------------------------------------------------------------
def _xavier(*modules: nn.Module) -> None:
    """The release's ``weight_init`` / ``add_layer``: Xavier-normal weights, zero biases."""
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                nn.init.xavier_normal_(layer.weight)
                nn.init.zeros_(layer.bias)


class LearnerStacks(nn.Module):
    """Base learner per modality, pre-allocated added learners, one shared output layer."""

    def __init__(self, dims: Mapping[str, int], num_classes: int, hidden: int, slots: int) -> None:
        super().__init__()
        self.base = nn.ModuleDict({m: nn.Linear(d, hidden) for m, d in dims.items()})
        self.head = nn.Linear(hidden, num_classes)
        _xavier(self.base, self.head)
        # built and drawn last: the base learners and the head start the same whatever the
        # number of slots
        self.added = nn.ModuleDict({m: nn.ModuleList([nn.Linear(d, hidden) for _ in range(slots)])
                                    for m, d in dims.items()})
        _xavier(self.added)

    def logits(self, m: str, e: torch.Tensor, active: int) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                      torch.Tensor | None]:
        """(F, P, A) of modality m with its first ``active`` added learners (P, A None at 0)."""
        full = self.head(F.relu(self.base[m](e)))
        prev, new = None, None
        for j in range(active):
            new = self.head(F.relu(self.added[m][j](e)))
            prev = full
            full = full + new
        return full, prev, new


@register_method(NAME, "AUG: sustained boosting with adaptive classifier assignment (NeurIPS 2025)")
class AUG(Method):
    name = NAME
    description = "AUG: sustained boosting with adaptive classifier assignment (NeurIPS 2025)"
    options = OPTIONS
    min_modalities = 2
    manual_optimization = True
    fusion = "none"  # informational: build_fusion returns None
    key_diagnostic = "ratio_"
    dataset_defaults = {
        # train_CREMAD.py at HEAD (c = 0.5) and train_KS.py of April 2025 (c = 0.2); lam 1.0, alpha 0.4
        "cremad": {"aug_residual_c": 0.5},
        "ksounds": {"aug_residual_c": 0.2},
        "nvgesture": {"aug_residual_c": 0.2},
    }

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.order: list[str] = []
        self.active: dict[str, int] = {}
        self.slots = 0
        self.checks: list[int] = []
        self._scores: dict[str, torch.Tensor] = {}

    def _opt(self, key: str) -> Any:
        """Option value; the declared default when ``cfg`` lacks it (a method built by hand)."""
        return self.cfg.get(key, OPTIONS[key].default)

    # ---- set-up ---------------------------------------------------------------------------
    def build_fusion(self, dims: Mapping[str, int], num_classes: int) -> None:
        """No fused head: the learner stacks and their shared head live in ``model.extra``."""
        self.order = list(dims)
        return None

    def configure_model(self, model: Any) -> None:
        epochs = int(self.cfg.get("epochs", 1))
        every = self._opt("aug_check_every") or check_interval(epochs)
        self.checks = check_epochs(epochs, int(every))
        cap = self._opt("aug_max_learners")
        self.slots = len(self.checks) if cap is None else min(int(cap), len(self.checks))
        self.order = list(model.modalities)
        self.active = {m: 0 for m in self.order}
        stacks = LearnerStacks(model.dims, model.num_classes, int(self._opt("aug_hidden")), self.slots)
        if self._opt("aug_legacy_frozen_learners"):
            stacks.added.requires_grad_(False)  # used, never trained (as released)
        model.extra["aug"] = stacks

    @property
    def stacks(self) -> LearnerStacks:
        assert self.model is not None
        return self.model.extra["aug"]

    def configure_optimizers(self) -> Any:
        """The dataset recipe over the encoders, base learners, head and (unless frozen) every
        pre-allocated learner; the model's unimodal heads are not trained."""
        assert self.trainer is not None and self.model is not None
        groups = [{"params": self.model.encoder_params(m), "name": f"encoder.{m}"} for m in self.order]
        groups.append({"params": list(self.stacks.base.parameters()) + list(self.stacks.head.parameters()),
                       "name": "aug.base_and_head"})
        learners = [p for p in self.stacks.added.parameters() if p.requires_grad]
        if learners:
            groups.append({"params": learners, "name": "aug.learners"})
        return self.trainer.default_optimizers(groups)

    def trains_unimodal_heads(self) -> bool:
        return False

    def per_modality_source(self) -> str:
        return "method"  # F_m of each modality's learner ensemble (predict)

    def weights(self) -> dict[str, float]:
        if len(self.order) == 2:
            alpha = float(self._opt("aug_merge_alpha"))
            return {self.order[0]: alpha, self.order[1]: 1.0 - alpha}
        return {m: 1.0 / len(self.order) for m in self.order}

    # ---- training -------------------------------------------------------------------------
    def on_train_epoch_start(self, epoch: int) -> None:
        self._scores = {}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        assert self.model is not None and self.optimizer is not None
        with self.autocast():
            feats = self.model.encode(batch)
        y = batch["label"]
        c = float(self._opt("aug_residual_c"))
        legacy = bool(self._opt("aug_legacy_zero_grad"))
        stepped: dict[int, nn.Parameter] = {}  # stepped earlier in this batch (legacy mode)
        losses, logs = [], {}
        for m in self.order:
            with self.autocast():  # a fresh block per sub-step: no stale cached cast of the head
                full, prev, new = self.stacks.logits(m, feats[m], self.active[m])
            loss = aug_loss(full, prev, new, y, c)
            s = confidence_sum(full, y)
            self._scores[m] = self._scores[m] + s if m in self._scores else s
            self.manual_backward(loss)
            if legacy:
                self._legacy_zero_grads(stepped)
            self.optimizer_step(self.optimizer)
            losses.append(loss.detach())
            logs[f"loss_{m}"] = loss.detach()
            logs[f"conf_{m}"] = s / y.shape[0]
        for p in self.model.parameters():  # the release deletes every gradient at the batch end
            p.grad = None
        self.log(**logs)
        return torch.stack(losses).mean()

    def _legacy_zero_grads(self, stepped: dict[int, nn.Parameter]) -> None:
        """torch 1.11 ``zero_grad`` zeroes gradients in place: what an earlier sub-step of this
        batch stepped holds a zero gradient (not None), so this step moves it again by momentum
        and weight decay. Records what this step will move for the next sub-step."""
        assert self.optimizer is not None
        for p in stepped.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    stepped.setdefault(id(p), p)

    def on_validation_end(self, metrics: Mapping[str, Any]) -> None:
        """The assignment check, after the epoch's evaluation (the release's order)."""
        epoch = int(metrics.get("epoch", self.epoch))
        if not self._scores or len(self._scores) != len(self.order):
            return
        scores = {m: float(self._scores[m]) for m in self.order}  # one sync per epoch
        ratios = ensemble_ratios(scores)
        if epoch in self.checks:
            for m in assign_learners(scores, self._opt("aug_lam")):
                if self.active[m] < self.slots:
                    self.active[m] += 1
        self.log(**{f"ratio_{m}": float(r) for m, r in ratios.items()},
                 **{f"learners_{m}": float(self.active[m]) for m in self.order})

    # ---- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> Prediction:
        assert self.model is not None
        feats = self.model.encode(batch)
        per = {m: self.stacks.logits(m, feats[m], self.active[m])[0] for m in self.order}
        w = self.weights()
        fused = sum(w[m] * per[m].float() for m in self.order)
        return Prediction(fused, per)

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"active": dict(self.active), "order": list(self.order)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        active = {str(k): int(v) for k, v in dict(state["active"]).items()}
        if list(state["order"]) != self.order or any(v > self.slots for v in active.values()):
            raise ConfigError(
                f"Method 'aug': the checkpoint holds learners {active} for modalities "
                f"{list(state['order'])}, but this run has {self.order} with {self.slots} learner "
                f"slots each. Resume with the same settings, or start fresh (--fresh)."
            )
        self.active = active

    # ---- reporting ------------------------------------------------------------------------
    def _paper_values(self) -> dict[str, Any]:
        base = {k: o.default for k, o in OPTIONS.items()}
        return {**base, **self.dataset_defaults.get(str(self.cfg.get("dataset")), {})}

    def label(self) -> str:
        paper = self._paper_values()
        tags = []
        if self._opt("aug_legacy_frozen_learners"):
            tags.append("frozen learners, as released")
        if self._opt("aug_legacy_zero_grad"):
            tags.append("torch-1.11 zero_grad")
        for key, short in (("aug_residual_c", "c"), ("aug_lam", "lam"), ("aug_check_every", "every"),
                           ("aug_max_learners", "max learners"), ("aug_merge_alpha", "alpha"),
                           ("aug_hidden", "hidden")):
            if self._opt(key) != paper[key]:
                tags.append(f"{short}={self._opt(key):g}")
        return "AUG" if not tags else f"AUG ({', '.join(tags)})"

    def record_info(self) -> dict[str, Any]:
        return {
            "inference_rule": "fixed weights " + ", ".join(f"{m} {w:.4g}" for m, w in self.weights().items())
            + " on each modality's ensemble logits",
            "check_epochs": list(self.checks),
            "learner_slots": self.slots,
            "added_learners": "frozen (as released)" if self._opt("aug_legacy_frozen_learners") else "trained",
            "substep_order": list(self.order),
            "zero_grad": "torch 1.11 (zero tensors)" if self._opt("aug_legacy_zero_grad") else "None",
        }

