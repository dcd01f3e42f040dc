"""The method contract: a method overrides only what it changes; the trainer owns the loop.

Hook names follow PyTorch Lightning. The trainer calls, per run::

    method.check_modalities(available)        -> modalities this method trains on
    method.build_fusion(dims, num_classes)    -> fused head(s) (or None)
    method.configure_model(model)             -> add method-owned modules to model.extra
    method.configure_optimizers()             -> (optimizer, scheduler or None), or a dict
                                                 {name: (optimizer, scheduler or None)} with
                                                 a "main" entry; all are checkpointed
    [checkpoint restored here when the run resumes; self.resumed tells]
    method.on_cell_start()                    -> once per cell, never after a resume
    method.on_fit_start()                     -> every time a process starts training
    for each epoch:
        method.on_train_epoch_start(epoch)    (self.num_training_batches is known)
        for each batch:
            automatic mode:  with autocast: loss = method.training_step(batch, i)
                             loss.backward(); method.on_after_backward(); [clip]; step
            manual mode:     method.training_step(batch, i) runs outside autocast; it wraps
                             its forward passes in ``self.autocast()``, keeps gradient
                             arithmetic in fp32, and calls self.manual_backward(loss) and
                             self.optimizer_step() as often as it needs
        method.on_train_epoch_end(epoch)
        schedulers step (per-group lr_scale multipliers are kept on top of the schedule)
        evaluation with method.predict(batch) on val and test
        method.on_validation_end(metrics)     -> sees the metrics of this epoch; a change
                                                 of learning rate here applies from the next
                                                 epoch, on top of the already-stepped schedule
    method.state_dict() / load_state_dict() go into every checkpoint.

Per-modality predictions are declared, never guessed: :meth:`Method.trains_unimodal_heads`
says whether the unimodal heads are trained, :meth:`Method.per_modality_source` where the
per-modality logits that evaluation reports come from ("unimodal_heads", "fused_parts",
"method" for a method's own rule in ``predict``, or "none"). Reporting untrained heads is
refused at set-up.

A method reaches the loop only through :class:`LoopServices` (``self.trainer``): the trainer
imports methods, never the reverse. ``self.model``, ``self.optimizer`` (the "main" one),
``self.optimizers``, ``self.epoch``, ``self.global_step``, ``self.resumed`` and
``self.num_training_batches`` are set by the trainer before the hooks that need them.
``self.log(name=value)`` records per-step diagnostics (kept as tensors, synchronised once per
epoch, so logging costs no host sync); values logged from epoch hooks are kept too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.errors import UnsupportedError
from mmbalance.heads import build_head

if TYPE_CHECKING:
    from mmbalance.model import MultimodalModel

PER_MODALITY_SOURCES = ("unimodal_heads", "fused_parts", "method", "none")


@dataclass
class Prediction:
    """What evaluation scores: fused logits and each modality's own logits."""

    fused: torch.Tensor
    per_modality: dict[str, torch.Tensor]


@dataclass
class EstimationCost:
    """Work a method does outside the main training loop (G-Blend's sub-training...), kept
    apart from the main run's optimizer steps and time so methods compare on equal terms."""

    optimizer_steps: int = 0
    batches: int = 0
    time_s: float = 0.0

    def add(self, other: EstimationCost) -> None:
        self.optimizer_steps += other.optimizer_steps
        self.batches += other.batches
        self.time_s += other.time_s

    def as_dict(self) -> dict[str, Any]:
        return {"optimizer_steps": self.optimizer_steps, "batches": self.batches, "time_s": self.time_s}


@dataclass
class Phase:
    """One part of an epoch (docs/guides/method-plugin.md, ``epoch_plan``): what it trains, how often, how.

    ``params``: the parameters it trains (the rest of the model is frozen for the phase; None =
    all). ``passes``: passes over the training data. ``step``: ``(batch, batch_idx) -> loss``
    (default: the method's ``training_step``). ``optimizer``: the name of a configured
    optimizer, or a new name with ``make_optimizer(params)`` to create one the first time
    that name is used; it lives (and is checkpointed) while some phase of each epoch names it,
    so a method gets fresh optimizer state by naming a new one (e.g. per ReconBoost stage).
    ``manual``: manual optimisation for this phase (default: the method's).
    ``rows``: the phase's pass goes over these positions of the training split instead of all
    of it, duplicates allowed (a resampled epoch: valuation's extra copies of weak samples),
    shuffled as one set; each batch keeps ``index`` (the sample's position in train) and gains
    ``row`` (its position in ``rows``). ``limit_train_batches`` still caps the pass, and
    ``num_training_batches`` is the length of this pass while it runs.
    """

    name: str = "train"
    params: Sequence[nn.Parameter] | None = None
    passes: int = 1
    step: Callable[[Mapping[str, Any], int], torch.Tensor | None] | None = None
    optimizer: str = "main"
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None
    manual: bool | None = None
    rows: Sequence[int] | None = None


class LoopServices(Protocol):
    """The narrow interface a method uses to reach the training loop (the trainer)."""

    device: torch.device
    modalities: list[str]
    val_is_test: bool

    def default_optimizers(self, params: Any) -> tuple[torch.optim.Optimizer, Any]:
        """The dataset recipe's optimizer and schedule over ``params`` (tensors or groups)."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA (per ``amp``), a no-op elsewhere: wrap forward passes only."""

    def log_step(self, values: Mapping[str, Any]) -> None: ...

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None: ...

    def iterate(
        self,
        split: str,
        *,
        batches: int | None = None,
        fraction: float | None = None,
        grad: bool = False,
        train_mode: bool = False,
        shuffle: bool | None = None,
        tag: str = "pass",
        rows: Sequence[int] | None = None,
        augment: bool | None = None,
    ) -> Iterator[Mapping[str, Any]]:
        """Batches of a split outside the main loop (see :meth:`Trainer.iterate`)."""

    def estimation(self) -> contextlib.AbstractContextManager:
        """Charge the block's time and passes to the method's estimation cost."""

    def heldout(self) -> Any:
        """The held-out slice of train carved once per cell (see ``heldout_fraction``)."""

    def sub_train(
        self,
        model: nn.Module,
        params: Sequence[nn.Parameter],
        loss_fn: Callable[[Any, Mapping[str, Any]], torch.Tensor],
        split: str,
        epochs: int,
        optimizer: torch.optim.Optimizer | None = None,
        tag: str = "sub",
        *,
        schedule: bool = False,
        select_on: str | None = None,
        score_fn: Callable[[Any, Mapping[str, Any]], torch.Tensor] | None = None,
    ) -> EstimationCost:
        """Train ``params`` of ``model`` (usually a copy) for ``epochs`` on ``split``;
        ``schedule`` steps the recipe's schedule per sub-epoch, ``select_on="val"`` restores
        the epoch with the best mean ``score_fn(model, batch)`` (per-sample scores). The
        returned cost then also holds ``scores`` and ``best_epoch``."""

    def recorded_run(self, method: str, overrides: Mapping[str, Any]) -> Any:
        """A finished recorded run of ``method`` with this run's trainer and dataset settings
        plus ``overrides``, found by identity (``run_dir``, ``record``, ``model_state``), or a
        clear error; never a run of other data or settings."""

    def set_lr_scale(self, optimizer: torch.optim.Optimizer, group: int | str, scale: float) -> None:
        """Multiply one param group's scheduled learning rate by ``scale`` (not compounding)."""


class Method:
    name: ClassVar[str] = ""
    # Other names the method is known by (its paper's, e.g. "ogm_ge"): a mistyped or aliased
    # --method then suggests this one. Suggested only, never resolved (see mmbalance.registry).
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}  # method-only config keys -> default or Option
    defaults: ClassVar[dict[str, Any]] = {}  # trainer/dataset keys this method changes
    # The paper's option values per dataset, {dataset: {key: value}}; a dataset plugin's own
    # method_defaults win over these. Shown in `mmbalance config` and leaderboard captions.
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    min_modalities: ClassVar[int] = 2
    max_modalities: ClassVar[int | None] = None
    manual_optimization: ClassVar[bool] = False
    fusion: ClassVar[str] = "concat"  # fused head built by the default build_fusion
    # Share of train held out once per cell for the method's own measurements (G-Blend's
    # generalisation losses, LFM); 0 = none. The trainer trains on the rest.
    heldout_fraction: ClassVar[float] = 0.0
    # The name of the per-step diagnostic shown in the one-line epoch summary, if any.
    key_diagnostic: ClassVar[str | None] = None

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.cfg = cfg
        self.trainer: LoopServices | None = None
        self.model: MultimodalModel | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.epoch = 0
        self.global_step = 0
        self.resumed = False
        self.num_training_batches = 0
        self.phase: Phase | None = None
        self.phase_optimizer: torch.optim.Optimizer | None = None

    # ---- declarations ---------------------------------------------------------------------
    def trains_unimodal_heads(self) -> bool:
        """Whether training puts a loss on the unimodal heads (default: no)."""
        return False

    def per_modality_source(self) -> str:
        """Where the per-modality logits evaluation reports come from: the trained unimodal
        heads, the fused head's per-modality parts, the method's own ``predict`` ("method"),
        or nowhere ("none")."""
        if self.trains_unimodal_heads():
            return "unimodal_heads"
        if self.model is not None and hasattr(self.model.fusion, "parts"):
            return "fused_parts"
        return "none"

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

    def configure_optimizers(self) -> Any:
        """Default: the dataset's optimizer and schedule over every parameter.

        Return ``(optimizer, scheduler | None)`` or ``{name: (optimizer, scheduler | None)}``
        (one of them named "main"); param groups may carry a "name" (e.g. "encoder.audio").
        """
        assert self.trainer is not None and self.model is not None
        return self.trainer.default_optimizers(self.model.parameters())

    # ---- loop hooks -----------------------------------------------------------------------
    def on_cell_start(self) -> None:
        """Once per cell before epoch 0 (offline estimation, warm starts); never after a
        resume, whose checkpoint already holds what this did."""

    def on_fit_start(self) -> None:
        """Every time a process starts or resumes training (after the checkpoint load)."""

    def on_train_epoch_start(self, epoch: int) -> None: ...

    def epoch_plan(self, epoch: int) -> list[Phase] | None:
        """The phases of this epoch (after ``on_train_epoch_start``); None = one joint pass
        with ``training_step`` and the main optimizer. Inside a phase, ``self.phase`` and
        ``self.phase_optimizer`` name what runs."""
        return None

    def should_evaluate(self, epoch: int) -> bool:
        """Whether to evaluate after this epoch (default: always). A method whose epochs are
        parts of a larger unit (a ReconBoost stage) evaluates only at its end, so selection
        never picks a model from the middle of a stage; the last epoch is always evaluated."""
        return True

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor | None:
        """Default: encode once, fused CE, plus the unimodal CEs when the method trains its
        unimodal heads (the IPRM paper's Section 3 joint loss)."""
        assert self.model is not None
        out = self.model(batch)
        y = batch["label"]
        loss = F.cross_entropy(out.fused, y)
        if self.trains_unimodal_heads():
            for logits in out.uni.values():
                loss = loss + F.cross_entropy(logits, y)
        return loss

    def on_after_backward(self) -> None:
        """Between backward and optimizer step: gradient modulation lives here."""

    def on_train_epoch_end(self, epoch: int) -> None: ...

    def on_validation_end(self, metrics: Mapping[str, Any]) -> None: ...

    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> Prediction:
        """Default: fused logits, and per modality what :meth:`per_modality_source` says.

        Without a fused head the prediction is the mean of the trained unimodal heads' logits
        (late fusion of the unimodal models, LFM's rule); a method without either must define
        its own ``predict``.
        """
        assert self.model is not None
        feats = self.model.encode(batch)
        source = self.per_modality_source()
        if source == "unimodal_heads":
            per = self.model.unimodal_logits(feats)
        elif source == "fused_parts":
            per = self.model.fusion.parts(feats)
        else:
            per = {}
        if self.model.fusion is not None:
            return Prediction(self.model.fuse(feats), per)
        if source != "unimodal_heads" or not per:
            raise UnsupportedError(
                f"Method '{self.name}' builds no fused head and trains no unimodal heads, so it "
                f"must define predict() with its own fusion rule."
            )
        return Prediction(torch.stack(list(per.values())).mean(0), per)

    # ---- services for methods -------------------------------------------------------------
    def log(self, **values: Any) -> None:
        """Record per-step diagnostics (floats or 0-d tensors)."""
        assert self.trainer is not None
        self.trainer.log_step(values)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's mixed precision, for forward passes in manual optimisation."""
        assert self.trainer is not None
        return self.trainer.autocast()

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
