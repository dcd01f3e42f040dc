"""The method contract: a method overrides only what it changes; the trainer owns the loop.

Hook names follow PyTorch Lightning. The trainer calls, per run::

    method.check_modalities(available)        -> modalities this method trains on
    method.build_fusion(dims, num_classes)    -> fused head(s) (or None)
    method.configure_model(model)             -> add method-owned modules to model.extra
    method.configure_optimizers()             -> (optimizer, scheduler or None)
    method.on_fit_start()
    for each epoch:
        method.on_train_epoch_start(epoch)
        for each batch (inside bf16 autocast on CUDA):
            automatic mode:  loss = method.training_step(batch, i); loss.backward();
                             method.on_after_backward(); [clip]; optimizer.step()
            manual mode:     method.training_step(batch, i) calls self.manual_backward(loss)
                             and self.optimizer_step() itself, as often as it needs
        method.on_train_epoch_end(epoch); scheduler.step()
        evaluation with method.predict(batch) on val and test
        method.on_validation_end(metrics)
    method.state_dict() / load_state_dict() go into every checkpoint.

``self.model``, ``self.optimizer``, ``self.epoch``, ``self.global_step`` and ``self.trainer``
are set by the trainer before the first hook. ``self.log(name=value)`` records per-step
diagnostics (kept as tensors, synchronised once per epoch, so logging costs no host sync).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.errors import UnsupportedError
from mmbalance.heads import build_head

if TYPE_CHECKING:
    from mmbalance.model import MultimodalModel
    from mmbalance.trainer import Trainer


@dataclass
class Prediction:
    """What evaluation scores: fused logits and each modality's own logits."""

    fused: torch.Tensor
    per_modality: dict[str, torch.Tensor]


class Method:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}  # method-only config keys -> default or Option
    defaults: ClassVar[dict[str, Any]] = {}  # trainer/dataset keys this method changes
    min_modalities: ClassVar[int] = 2
    max_modalities: ClassVar[int | None] = None
    manual_optimization: ClassVar[bool] = False
    fusion: ClassVar[str] = "concat"  # fused head built by the default build_fusion

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.cfg = cfg
        self.trainer: Trainer | None = None
        self.model: MultimodalModel | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.epoch = 0
        self.global_step = 0

    # ---- set-up ---------------------------------------------------------------------------
    def check_modalities(self, available: Sequence[str]) -> list[str]:
        n = len(available)
        if n < self.min_modalities or (self.max_modalities is not None and n > self.max_modalities):
            span = (
                f"exactly {self.min_modalities}"
                if self.max_modalities == self.min_modalities
                else f"at least {self.min_modalities}"
                + (f" and at most {self.max_modalities}" if self.max_modalities else "")
            )
            raise UnsupportedError(
                f"Method '{self.name}' works with {span} modalities, but the run has {n} "
                f"({', '.join(available)}). Pick modalities with --set modalities=a,b or "
                f"choose another method."
            )
        return list(available)

    def build_fusion(self, dims: Mapping[str, int], num_classes: int) -> nn.Module | None:
        """Fused head(s). Default: the naive late-fusion head named by ``fusion``."""
        kwargs = {"mode": self.cfg["weight_mode"]} if self.fusion == "weight" else {}
        return build_head(self.fusion, dims, num_classes, **kwargs)

    def configure_model(self, model: MultimodalModel) -> None:
        """Add method-owned modules to ``model.extra`` (they are then optimised and saved)."""

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, Any]:
        """Default: the dataset's optimizer and schedule over every parameter."""
        assert self.trainer is not None and self.model is not None
        return self.trainer.default_optimizers(self.model.parameters())

    # ---- loop hooks -----------------------------------------------------------------------
    def on_fit_start(self) -> None: ...

    def on_train_epoch_start(self, epoch: int) -> None: ...

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor | None:
        """Default: encode once, unimodal + fused logits, joint CE (IPRM paper, Section 3).

        The unimodal CEs are added when the ``unimodal_loss`` option is true (default true for
        methods without that option).
        """
        assert self.model is not None
        out = self.model(batch)
        y = batch["label"]
        loss = F.cross_entropy(out.fused, y)
        if self.cfg.get("unimodal_loss", True):
            for logits in out.uni.values():
                loss = loss + F.cross_entropy(logits, y)
        return loss

    def on_after_backward(self) -> None:
        """Between backward and optimizer step: gradient modulation lives here."""

    def on_train_epoch_end(self, epoch: int) -> None: ...

    def on_validation_end(self, metrics: Mapping[str, Any]) -> None: ...

    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> Prediction:
        """Default: fused logits; per modality the trained unimodal heads, or, for a method
        trained with the fused loss only, the fused head's per-modality parts."""
        assert self.model is not None
        feats = self.model.encode(batch)
        fused = self.model.fuse(feats)
        if self.cfg.get("unimodal_loss", True) or not hasattr(self.model.fusion, "parts"):
            per = self.model.unimodal_logits(feats)
        else:
            per = self.model.fusion.parts(feats)
        return Prediction(fused, per)

    # ---- services for methods -------------------------------------------------------------
    def log(self, **values: Any) -> None:
        """Record per-step diagnostics (floats or 0-d tensors)."""
        assert self.trainer is not None
        self.trainer.log_step(values)

    def manual_backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        loss.backward(**kwargs)

    def optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Step (with the trainer's gradient clipping) and zero the gradients."""
        assert self.trainer is not None
        self.trainer.optimizer_step(optimizer or self.optimizer)

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    # ---- reporting ------------------------------------------------------------------------
    def label(self) -> str:
        """Row name in leaderboards (variants add their option values)."""
        return self.name

    def record_info(self) -> dict[str, Any]:
        """Extra facts recorded with the run (e.g. which inference rule produced a number)."""
        return {}
