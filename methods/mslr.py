"""MSLR: modality-specific learning rates for additive late fusion (Yao & Mihalcea, Findings
ACL 2022). Documented in the documentation's mslr page.

Additive late fusion ``z = sum_m z_m`` (the sum head; ``z_m = W_m e_m + b_m`` is modality m's
branch). Every modality gets its own optimizer param group ``"modality.<m>"`` = its encoder and
its branch head, so its learning rate can differ from the others'. The rate of group m is

    lr_m(epoch) = scheduled_lr(epoch) * lr_mult[m] * adapt_m

where ``scheduled_lr`` is the dataset recipe's schedule (StepLR / cosine, stepped by the
trainer), ``lr_mult[m]`` the per-modality initial multiplier (``lr_m_init = lr * lr_mult[m]``)
and ``adapt_m`` the automatic factor:

* ``rule=fixed`` ("keep"): ``adapt_m = 1``, each modality keeps its own multiplier;
* ``rule=auto`` (default, the rule the later papers use as the MSLR baseline): after every
  validation, with ``hist_m`` the FIFO of modality m's last H validation accuracies (of its
  branch logits, the sum head's part m), ``r = acc_m / mean(hist_m)`` is computed *before*
  ``acc_m`` is appended, only once ``len(hist_m) == H``; ``adapt_m = clip(r)`` replaces the
  previous factor (non-compounding: the new rate is ``lr_m_init * r``, as the AGM repository). The first H
  epochs only fill the history.

The multiplier is applied through ``trainer.set_lr_scale`` in ``on_validation_end``, so it takes
effect from the next epoch, on top of the already-stepped schedule, and never compounds with
it. The accuracy history and the factors are method state (checkpointed).

No official code exists; mmbalance follows two reimplementations (lihong2303/AGM ``run/*_main.py``
method MSLR, and CXianRen/AMST ``code/baseline/mslr3_new.py``). Departures from them, each
switchable where it changes numbers:

* Real learning rates (the paper, AMST) instead of the AGM repo's gradient multipliers on one
  global rate: under SGD they differ in weight decay (not scaled by a gradient multiplier) and
  in how the momentum buffer carries a factor change; under Adam a constant gradient
  multiplier is largely normalised away. ``apply_as=grad`` multiplies the group's gradients
  after backward instead, as the AGM repo does.
* Validation accuracy, never test: the AGM repo adapts on test accuracy; here ``rule=auto``
  refuses a run whose validation split is the test split (``val_fraction=0``).
* Each modality's own branch accuracy: the AGM repo's CREMA-D ``test()`` counts the audio hit
  under the visual condition, so its MSLR adapts the audio rate on visual accuracy.
  That bug is not reproduced.
* The ratio is clipped to ``[ratio_min, ratio_max]`` = [0.5, 2] (our default against a
  near-chance early history); neither reimplementation clips: ``ratio_min=null ratio_max=null``.
* ``auto_variant=amst`` is AMST's reading instead: the accuracy is appended first (mean over the
  last H *including* the current one), and the factor compounds (``adapt *= r``) only when
  ``epoch % H == 0 and epoch > 0`` (0-based epochs here).
* Groups: encoder + branch head, as the AGM repo (``audio_net`` + ``audio_cls``);
  ``head_in_group=false`` leaves the branch heads at the base rate, as AMST (its ``fusion_lr``).
* Training starts from scratch, as in both reimplementations; the paper initialises each branch
  from a separately fine-tuned unimodal model (not offered: it needs M prior unimodal runs).
* ``modulation_start`` / ``modulation_end`` gate the multipliers as the AGM repo's window does
  (outside it every group trains at the scheduled rate); the history is kept throughout.
* The unimodal heads ``model.uni_heads`` are trained by nothing here and are left out of the
  optimizer; per-modality accuracy comes from the sum head's parts.

The per-modality multipliers have no published values for our datasets; ``dataset_defaults``
carries the AGM repo's CREMA-D initial coefficients (audio 0.9, visual 1.1), from that repo, not
from the paper. Cost: none per step in ``apply_as=lr`` (one fused multiply per group and step in
``apply_as=grad``), i.e. the cost of joint sum-fusion training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mmbalance.config import Option, Search
from mmbalance.errors import ConfigError, MMBalanceError
from mmbalance.heads import SumHead
from mmbalance.method import Method
from mmbalance.registry import register_method

EPS = 1e-12  # floor of the history mean (an all-wrong history would divide by zero)
DEFAULT_H = 5
DEFAULT_CLIP = (0.5, 2.0)
GROUP_PREFIX = "modality."
SHARED_GROUP = "shared"

OPTIONS: dict[str, Option] = {
    # search range: the paper's two rules (adapt / keep)
    "rule": Option("auto", "auto: adapt each modality's rate from its validation accuracy history; "
                   "fixed: keep each modality's multiplier (the paper's 'keep')", choices=("auto", "fixed"), search=Search(choices=('auto', 'fixed'))),
    "lr_mult": Option({}, "per-modality initial multiplier of the base lr, e.g. "
                      "--set 'lr_mult={audio: 0.9, visual: 1.1}'; missing modalities get 1", type=dict),
    "history": Option(DEFAULT_H, "H: validation accuracies kept per modality (auto rule)", min=1),
    "ratio_min": Option(DEFAULT_CLIP[0], "lower clip of the auto ratio; null = no clip",
                        type=float, min=0, min_open=True),
    "ratio_max": Option(DEFAULT_CLIP[1], "upper clip of the auto ratio; null = no clip",
                        type=float, min=0, min_open=True),
    "auto_variant": Option(
        "previous", "previous: ratio against the previous H accuracies, recomputed every epoch, "
        "non-compounding (AGM repo); amst: mean including the current one, compounding, "
        "every H epochs (CXianRen/AMST)", choices=("previous", "amst")),
    "apply_as": Option("lr", "lr: per-group learning rates (paper, AMST); grad: multiply each group's "
                       "gradients after backward (AGM repo)", choices=("lr", "grad")),
    "head_in_group": Option(True, "the branch head trains at its modality's rate (AGM repo); false = at "
                            "the base rate in group 'shared' (AMST)"),
    "modulation_start": Option(0, "first epoch (0-based) trained with the multipliers", min=0),
    "modulation_end": Option(None, "last epoch trained with the multipliers (inclusive); null = all",
                             type=int, min=0),
}


# ---- pure mathematics ------------------------------------------------------------------------
def clip_ratio(r: float, lo: float | None, hi: float | None) -> float:
    """``r`` clipped to ``[lo, hi]``; a bound of None is open."""
    if lo is not None:
        r = max(r, lo)
    if hi is not None:
        r = min(r, hi)
    return r


def accuracy_ratio(acc: float, history: Sequence[float], eps: float = EPS) -> float:
    """``acc / mean(history)`` (the mean floored at ``eps``)."""
    if not history:
        raise ValueError("accuracy_ratio needs a non-empty history")
    return float(acc) / max(sum(history) / len(history), eps)


def auto_update(
    history: Sequence[float],
    acc: float,
    adapt: float,
    *,
    epoch: int,
    window: int,
    variant: str = "previous",
    lo: float | None = DEFAULT_CLIP[0],
    hi: float | None = DEFAULT_CLIP[1],
) -> tuple[list[float], float, float | None]:
    """One modality's auto-rule update after the validation of ``epoch``.

    Returns ``(new_history, new_adapt, raw_ratio)``; ``raw_ratio`` (before clipping) is None when
    no update happened.

    ``previous``: when the history already holds ``window`` values, ``adapt = clip(acc /
    mean(history))`` (replacing the previous factor); then ``acc`` is appended (FIFO of length
    ``window``). ``amst``: ``acc`` is appended first; when ``epoch % window == 0`` and
    ``epoch > 0``, ``adapt = adapt * clip(acc / mean(history))`` (compounding).
    """
    hist = [float(a) for a in history]
    if variant == "previous":
        ratio = accuracy_ratio(acc, hist) if len(hist) == window else None
        if ratio is not None:
            adapt = clip_ratio(ratio, lo, hi)
        hist = (hist + [float(acc)])[-window:]
        return hist, float(adapt), ratio
    if variant == "amst":
        hist = (hist + [float(acc)])[-window:]
        ratio = accuracy_ratio(acc, hist) if epoch > 0 and epoch % window == 0 else None
        if ratio is not None:
            adapt = adapt * clip_ratio(ratio, lo, hi)
        return hist, float(adapt), ratio
    raise ValueError(f"unknown auto variant {variant!r}")


def in_window(epoch: int, start: int, end: int | None) -> bool:
    """Whether ``epoch`` lies in the inclusive window ``[start, end]`` (end None = open)."""
    return epoch >= start and (end is None or epoch <= end)


def applied_scale(mult: float, adapt: float, active: bool) -> float:
    """The factor on the scheduled rate of one modality's group: ``mult * adapt`` inside the
    window, 1 outside it."""
    return float(mult) * float(adapt) if active else 1.0


# ---- the plugin ------------------------------------------------------------------------------
@register_method("mslr", "MSLR: modality-specific learning rates, fixed or adapted from validation accuracy")
class MSLR(Method):
    name = "mslr"
    description = "MSLR: modality-specific learning rates, fixed or adapted from validation accuracy"
    fusion = "sum"
    options = OPTIONS
    dataset_defaults = {"cremad": {"lr_mult": {"audio": 0.9, "visual": 1.1}}}  # AGM repo, not the paper

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        lo, hi = self._opt("ratio_min"), self._opt("ratio_max")
        if lo is not None and hi is not None and float(lo) > float(hi):
            raise ConfigError(
                f"Method 'mslr': ratio_min ({lo}) is above ratio_max ({hi}); the auto ratio is "
                f"clipped to [ratio_min, ratio_max]. Fix one of them."
            )
        self.lo = None if lo is None else float(lo)
        self.hi = None if hi is None else float(hi)
        start, end = int(self._opt("modulation_start")), self._opt("modulation_end")
        if end is not None and int(end) < start:
            raise ConfigError(
                f"Method 'mslr': modulation_end ({end}) is before modulation_start ({start}); the "
                f"window [start, end] is inclusive. Fix one of them, or set modulation_end=null."
            )
        self.start, self.end = start, (None if end is None else int(end))
        raw = self._opt("lr_mult") or {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"Method 'mslr': lr_mult must map modality -> multiplier, got {raw!r}.")
        mult: dict[str, float] = {}
        for m, v in raw.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0 or v != v:
                raise ConfigError(
                    f"Method 'mslr': lr_mult.{m} must be a positive number, got {v!r}. E.g. "
                    f"--set 'lr_mult={{{m}: 0.5}}'."
                )
            mult[str(m)] = float(v)
        self.lr_mult_cfg = mult
        self.modalities: list[str] = []
        self.mult: dict[str, float] = {}
        self.history: dict[str, list[float]] = {}
        self.adapt: dict[str, float] = {}
        self.applied: dict[str, float] = {}
        self.group_params: dict[str, list[torch.nn.Parameter]] = {}

    def _opt(self, key: str) -> Any:
        """Option value; the declared default when ``cfg`` lacks it (a method built by hand)."""
        return self.cfg.get(key, OPTIONS[key].default)

    @property
    def auto(self) -> bool:
        return self._opt("rule") == "auto"

    # ---- set-up ---------------------------------------------------------------------------
    def check_modalities(self, available: Sequence[str]) -> list[str]:
        used = super().check_modalities(available)
        unknown = sorted(set(self.lr_mult_cfg) - set(used))
        if unknown:
            raise ConfigError(
                f"Method 'mslr': lr_mult names modality {', '.join(unknown)}, which this run does "
                f"not train (it has {', '.join(used)}). Fix the keys of lr_mult."
            )
        self.modalities = list(used)
        self.mult = {m: self.lr_mult_cfg.get(m, 1.0) for m in used}
        self.history = {m: [] for m in used}
        self.adapt = {m: 1.0 for m in used}
        return used

    def configure_optimizers(self) -> Any:
        """One param group "modality.<m>" per modality (encoder m + its branch head), plus
        "shared" for any other trained parameter; the recipe's optimizer and schedule."""
        assert self.trainer is not None and self.model is not None
        if self.auto and self.trainer.val_is_test:
            raise ConfigError(
                "Method 'mslr' with rule=auto adapts each modality's learning rate from its "
                "validation accuracy, but this run validates on the test split (val_fraction=0, "
                "or the dataset has no validation split): adapting on the test set is not "
                "allowed. Set val_fraction > 0 (e.g. --set val_fraction=0.1) or use rule=fixed."
            )
        fusion = self.model.fusion
        if not isinstance(fusion, SumHead):
            raise MMBalanceError(f"method mslr needs the sum head (additive late fusion), got {type(fusion).__name__}.")
        if not self.modalities:  # built by hand, without check_modalities
            self.check_modalities(self.model.modalities)
        with_head = bool(self._opt("head_in_group"))
        groups: list[dict[str, Any]] = []
        covered: set[int] = set()
        for m in self.modalities:
            params = self.model.encoder_params(m) + (list(fusion.fcs[m].parameters()) if with_head else [])
            self.group_params[m] = params
            covered.update(id(p) for p in params)
            groups.append({"params": params, "name": f"{GROUP_PREFIX}{m}"})
        shared = [p for p in self.model.fusion_params() + list(self.model.extra.parameters()) if id(p) not in covered]
        if shared:
            groups.append({"params": shared, "name": SHARED_GROUP})
        optimizer, scheduler = self.trainer.default_optimizers(groups)
        self._apply(optimizer, epoch_to_train=0)
        return optimizer, scheduler

    def _apply(self, optimizer: torch.optim.Optimizer, epoch_to_train: int) -> None:
        """Set each modality's factor for the epoch ``epoch_to_train``."""
        assert self.trainer is not None
        active = in_window(epoch_to_train, self.start, self.end)
        for m in self.modalities:
            scale = applied_scale(self.mult[m], self.adapt[m], active)
            self.applied[m] = scale
            if self._opt("apply_as") == "lr":
                self.trainer.set_lr_scale(optimizer, f"{GROUP_PREFIX}{m}", scale)

    # ---- loop hooks -----------------------------------------------------------------------
    def on_train_epoch_start(self, epoch: int) -> None:
        if self.trainer is None:
            return
        self.log(**{f"lr_mult_{m}": self.applied[m] for m in self.modalities})

    def on_after_backward(self) -> None:
        """``apply_as=grad`` only: multiply each modality group's gradients by its factor."""
        if self._opt("apply_as") != "grad":
            return
        for m, scale in self.applied.items():
            if scale == 1.0:
                continue
            grads = [p.grad for p in self.group_params[m] if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, scale)

    def on_validation_end(self, metrics: Mapping[str, Any]) -> None:
        epoch = int(metrics["epoch"])
        if self.auto:
            self._auto_step(metrics, epoch)
        if self.optimizer is not None:  # the factor of the next epoch (window included)
            self._apply(self.optimizer, epoch_to_train=epoch + 1)

    def _auto_step(self, metrics: Mapping[str, Any], epoch: int) -> None:
        val = metrics["val"]
        missing = [m for m in self.modalities if m not in val or "acc" not in val[m]]
        if missing:
            raise MMBalanceError(
                f"method mslr: validation reported no per-modality accuracy for {missing}; the "
                f"auto rule needs each branch's accuracy (per_modality_source={self.per_modality_source()})."
            )
        logs: dict[str, float] = {}
        for m in self.modalities:
            self.history[m], self.adapt[m], ratio = auto_update(
                self.history[m], float(val[m]["acc"]), self.adapt[m], epoch=epoch,
                window=int(self._opt("history")), variant=self._opt("auto_variant"), lo=self.lo, hi=self.hi,
            )
            if ratio is not None:
                logs[f"acc_ratio_{m}"] = ratio
                logs[f"lr_adapt_{m}"] = self.adapt[m]
        if logs and self.trainer is not None:
            self.log(**logs)

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "modalities": list(self.modalities),
            "history": {m: list(h) for m, h in self.history.items()},
            "adapt": dict(self.adapt),
            "applied": dict(self.applied),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if list(state["modalities"]) != self.modalities:
            raise ConfigError(
                f"Method 'mslr': the checkpoint holds accuracy histories for modalities "
                f"{list(state['modalities'])}, but this run has {self.modalities}. Resume with the "
                f"same modalities, or start fresh."
            )
        self.history = {m: [float(a) for a in state["history"][m]] for m in self.modalities}
        self.adapt = {m: float(state["adapt"][m]) for m in self.modalities}
        self.applied = {m: float(state["applied"][m]) for m in self.modalities}

    # ---- reporting ------------------------------------------------------------------------
    def label(self) -> str:
        tags = []
        if not self.auto:
            tags.append("fixed")
        else:
            if self._opt("auto_variant") == "amst":
                tags.append("AMST compounding")
            if int(self._opt("history")) != DEFAULT_H:
                tags.append(f"H={int(self._opt('history'))}")
            if (self.lo, self.hi) != DEFAULT_CLIP:
                tags.append(f"clip [{self.lo if self.lo is not None else '-inf'}, "
                            f"{self.hi if self.hi is not None else 'inf'}]")
        tags += [f"{m} x{v:g}" for m, v in self.lr_mult_cfg.items() if v != 1.0]
        if self._opt("apply_as") == "grad":
            tags.append("grad multipliers")
        if not self._opt("head_in_group"):
            tags.append("heads at base lr")
        if self.start != 0 or self.end is not None:
            tags.append(f"epochs {self.start}-{'' if self.end is None else self.end}")
        return "MSLR" if not tags else f"MSLR ({', '.join(tags)})"

    def record_info(self) -> dict[str, Any]:
        return {
            "rule": self._opt("rule"),
            "lr_mult": dict(self.mult),
            "param_groups": [f"{GROUP_PREFIX}{m}" for m in self.modalities],
            "group_members": "encoder + branch head" if self._opt("head_in_group") else "encoder",
            "apply_as": self._opt("apply_as"),
            "accuracy_source": "validation accuracy of each modality's sum-head part (branch logits)",
            "auto_variant": self._opt("auto_variant") if self.auto else None,
        }
