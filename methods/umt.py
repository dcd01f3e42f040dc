"""UMT: uni-modal teachers distilled into the multimodal encoders (Du et al., ICML 2023).

Full page: ``the documentation's umt page``. Paper: "On Uni-Modal Feature Learning in Supervised
Multi-Modal Learning" (ICML 2023, arXiv 2305.01233; earlier "Improving Multi-Modal Learning with
Uni-Modal Teachers", arXiv 2106.11059). No official code was found; the only code is
BalanceBenchmark's trainer (GeWu-Lab/BalanceBenchmark, ``balancemm/trainer/UMT_trainer.py``).

Idea: joint late-fusion training under-learns each modality's own features ("modality
laziness"). UMT first trains one model per modality alone, freezes it, and then trains the
multimodal model with its fused loss plus a pull of every modality's encoder output towards its
teacher's, so the uni-modal features are kept while the fusion learns the paired ones.

Rule. Teachers T_m (encoder phi_m^T and a linear head, trained on modality m alone, frozen, in
eval mode); student encoders phi_m, concat head o; per batch of B samples::

    e_m = phi_m(x_m),   t_m = phi_m^T(x_m)   (no gradient)
    loss = CE(o(e_1..e_M), y) + lambda * sum_m MSE(e_m, t_m)

MSE is the mean over the B x d elements (the encoder output, after the backbone's projection to
``embed_dim`` where there is one: that projection is part of both encoders), in fp32.

Teachers (``umt_teachers``):

* ``train`` (default): trained in the cell, once, before epoch 0 (``on_cell_start``), each a copy
  of the freshly built student's encoder m and unimodal head m (so it starts from the student's
  own initial weights; BalanceBenchmark's came from separate runs), through the trainer's
  sub-training on the run's training split: CE of its own head, the dataset recipe's optimizer
  and learning-rate schedule over ``umt_teacher_epochs`` epochs, the epoch with the best
  validation accuracy restored (``umt_teacher_select``). Never selected on test: where the run
  validates on the test split (``val_fraction=0``), the last epoch is kept.
* ``recorded``: the final weights of the finished ``unimodal`` run of each modality with this
  run's trainer and dataset settings, seed and data, found by its configuration hash
  (``trainer.recorded_run``): its DONE marker, record and checkpoint (read with
  ``weights_only=True``) must all agree with that identity; a missing run is an error naming the
  command that trains it, never a fallback to another run. The suite keeps a run's last epoch
  only, so a recorded teacher is its last epoch, not its best-validation one.

Teachers are the method's own modules (``self.teachers``, outside ``model.extra`` so no optimizer
sees them), on the run's device, ``requires_grad`` off, always in eval mode, and saved in the
method's state: a resumed run restores them and never retrains them.

Open questions, settled:

* lambda per dataset: unknown (no paper value could be read); 10 as BalanceBenchmark
  (``scaling``), option ``umt_lambda``.
* Teacher training length: the dataset recipe's epochs (``umt_teacher_epochs``).
* The feature distilled: the encoder output the concat head reads (BalanceBenchmark's pooled
  ``encoder_result``), after the projection when ``embed_dim`` adds one.
* The guiding rule (UMT or UME by comparing the ensemble with joint training): not automated;
  both are methods (``umt``, ``ume``) and the comparison is a leaderboard.
* Student initialisation: from scratch, as BalanceBenchmark (not from the teachers).

Departures from BalanceBenchmark: teachers in eval mode (its teachers run in train mode, so their
BatchNorm statistics drift and dropout is on: noisy, moving targets); teachers trained in the
cell or found by identity (its newest-run lookup can pick a run of any seed or split); its
distillation window 0-80 covers all of its runs, so the term is always on; its hard-coded
``device_ids=[0, 1]`` and import path, which fail as released, are not needed.

Refuses: one modality (``min_modalities``); ``umt_teachers=recorded`` without the recorded runs,
or with runs whose encoders do not fit this run's. Per-modality numbers are the concat head's
parts (the unimodal heads are not trained).

Teacher features (``umt_teacher_cache``). Frozen teachers in eval mode give a training sample
the same features in every epoch, so where the training split never augments (in-memory data:
``mmbalance.data.eval_view(train) is train``) ``auto`` (the default) computes every teacher's
features over the whole training split once per process, in the split's order with the training
batch size, through the trainer's ``iterate`` (no shuffle, no augmentation) under the run's
autocast, and keeps them on the device; the step looks up its rows by the batch's ``index`` (the
sample's position in the training split, also in ``limit_train_batches`` epochs). The pass runs
in ``on_fit_start``, after the teachers are in place (trained, loaded from recorded runs, or
restored from a checkpoint), so a resumed run recomputes it and equals an uninterrupted one; it
is never checkpointed, and it is charged as estimation cost. A dataset that augments its training
reads, or cannot say that it does not, gets the per-step forward, as does ``off``. The two paths
give the same targets up to the floating-point rounding of another batch composition (on this
project's AMD EPYC CPU bit-identical in fp32 and bf16, which the option guard and the tests check
on synthetic data; other kernels, e.g. CUDA's, may differ in the last bits), so the option does
not enter a run's identity (``changes_results=False``, like ``eval_batch_size``).
``record_info`` names the path taken (``teacher_features``).

Cost: with the cache, the step costs what joint training's does plus the distillation's
arithmetic (the teachers' pass over the training split is charged as estimation, once per
process); with the per-step forward, one extra forward of every teacher encoder without autograd
per step (about 1.5x joint training per epoch on avdigits' CNNs). The teachers' training is
charged as estimation cost, apart (about ``umt_teacher_epochs`` joint epochs; none with recorded
teachers). Measured ratios: ``the documentation's umt page``.

Diagnostics per step: ``umt_ce``, ``umt_distill_<m>`` (MSE before lambda) and ``umt_distill``
(their sum; the key diagnostic); in epoch 0 also ``umt_teacher_val_<m>`` (each teacher's
validation accuracy in percent, NaN when not measured).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.config import Option
from mmbalance.data import eval_view
from mmbalance.errors import DataError, MMBalanceError, UnsupportedError
from mmbalance.method import Method
from mmbalance.registry import register_method

NAME = "umt"

OPTIONS: dict[str, Option] = {
    "umt_lambda": Option(10.0, "weight of the feature distillation (BalanceBenchmark's 10; no paper value known)", min=0.0),
    "umt_teachers": Option("train", "train: teachers trained in the cell (recipe schedule, best validation epoch); "
                           "recorded: the finished unimodal runs with this run's settings, found by identity",
                           choices=("train", "recorded")),
    "umt_teacher_epochs": Option(None, "epochs of each in-cell teacher (default: the recipe's epochs)", type=int, min=1),
    "umt_teacher_select": Option("val", "which in-cell teacher epoch is kept: best validation accuracy, or the last",
                                 choices=("val", "last")),
    "umt_teacher_cache": Option("auto", "auto: teacher features computed once per process where the training split "
                                "never augments, per-step teacher forward otherwise; off: per-step forward always",
                                choices=("auto", "off"), changes_results=False),
}


# ---- the mathematics (pure functions) ------------------------------------------------------
def distill_terms(student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per modality, the mean squared difference of student and teacher features over all
    B x d elements, in fp32; the teacher side carries no gradient."""
    return {m: F.mse_loss(student[m].float(), teacher[m].detach().float()) for m in student}


def umt_loss(fused: torch.Tensor, y: torch.Tensor, student: Mapping[str, torch.Tensor],
             teacher: Mapping[str, torch.Tensor], lam: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``CE(o, y) + lam * sum_m MSE(e_m, t_m)``; returns the loss, the CE and the MSE terms."""
    ce = F.cross_entropy(fused.float(), y)
    terms = distill_terms(student, teacher)
    return ce + lam * torch.stack(list(terms.values())).sum(), ce, terms


class Teacher(nn.Module):
    """One modality's model: its encoder and linear head."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: Any) -> torch.Tensor:
        return self.head(self.encoder(x))


# ---- the plugin ----------------------------------------------------------------------------
@register_method(NAME, "UMT: frozen uni-modal teachers' features distilled into the multimodal encoders")
class UMT(Method):
    name = NAME
    description = "UMT: frozen uni-modal teachers' features distilled into the multimodal encoders"
    options = OPTIONS
    fusion = "concat"
    min_modalities = 2
    key_diagnostic = "umt_distill"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.lam = float(self._opt("umt_lambda"))
        self.source = str(self._opt("umt_teachers"))
        self.select = str(self._opt("umt_teacher_select"))
        self.teachers = nn.ModuleDict()
        self.teacher_info: dict[str, Any] = {}
        # every teacher's features of every training row (by its index in the split); built in
        # on_fit_start, dropped whenever the teachers are replaced, never checkpointed
        self.teacher_features: dict[str, torch.Tensor] | None = None

    def _opt(self, key: str) -> Any:
        """Option value; the declared default when ``cfg`` lacks it (a method built by hand)."""
        return self.cfg.get(key, OPTIONS[key].default)

    def teacher_epochs(self) -> int:
        value = self._opt("umt_teacher_epochs")
        return int(value if value is not None else self.cfg.get("epochs", 1))

    def per_modality_source(self) -> str:
        return "fused_parts"

    # ---- teachers ----------------------------------------------------------------------------
    def _blank_teacher(self, m: str) -> Teacher:
        """A teacher module shaped like the student's branch m (weights overwritten later)."""
        assert self.model is not None
        return Teacher(copy.deepcopy(self.model.encoders[m]), copy.deepcopy(self.model.uni_heads[m]))

    def _freeze(self) -> None:
        assert self.trainer is not None
        self.teachers.to(self.trainer.device)
        self.teachers.requires_grad_(False)
        self.teachers.eval()

    def on_cell_start(self) -> None:
        assert self.trainer is not None and self.model is not None
        self.teacher_features = None
        self.teachers = nn.ModuleDict()
        for m in self.model.modalities:
            self.teachers[m] = self._recorded_teacher(m) if self.source == "recorded" else self._trained_teacher(m)
        self._freeze()

    def _trained_teacher(self, m: str) -> Teacher:
        assert self.trainer is not None
        teacher = self._blank_teacher(m)

        def loss_fn(net: Teacher, batch: Mapping[str, Any]) -> torch.Tensor:
            return F.cross_entropy(net(batch[m]).float(), batch["label"])

        def right(net: Teacher, batch: Mapping[str, Any]) -> torch.Tensor:
            return (net(batch[m]).argmax(1) == batch["label"]).float()

        select = "val" if self.select == "val" and not self.trainer.val_is_test else None
        epochs = self.teacher_epochs()
        cost = self.trainer.sub_train(teacher, list(teacher.parameters()), loss_fn, "train", epochs,
                                      tag=f"umt_teacher/{m}", schedule=True, select_on=select,
                                      score_fn=right if select else None)
        scores = list(getattr(cost, "scores", []))
        best = getattr(cost, "best_epoch", None)
        self.teacher_info[m] = {
            "source": "trained in the cell", "epochs": epochs, "optimizer_steps": cost.optimizer_steps,
            "selected_epoch": best if best is not None else epochs - 1,
            "selection": "best val accuracy" if select else ("last epoch (val is test)" if self.select == "val" else "last epoch"),
            "val_acc": 100.0 * scores[best] if best is not None else float("nan"),
        }
        return teacher

    def _recorded_teacher(self, m: str) -> Teacher:
        assert self.trainer is not None
        try:
            found = self.trainer.recorded_run("unimodal", {"modality": m})
        except MMBalanceError as exc:
            raise MMBalanceError(f"Method 'umt' (umt_teachers=recorded) needs the teacher of modality '{m}': {exc}") from exc
        teacher = self._blank_teacher(m)
        state = found.model_state
        try:
            teacher.encoder.load_state_dict({k[len(f"encoders.{m}."):]: v for k, v in state.items()
                                             if k.startswith(f"encoders.{m}.")})
            teacher.head.load_state_dict({k[len(f"uni_heads.{m}."):]: v for k, v in state.items()
                                          if k.startswith(f"uni_heads.{m}.")})
        except RuntimeError as exc:
            raise UnsupportedError(
                f"Method 'umt': the recorded unimodal run '{found.run_dir}' has an encoder of modality '{m}' "
                f"that does not fit this run's ({exc}); the teacher must have the student's backbone and "
                f"embed_dim. Use umt_teachers=train."
            ) from exc
        best = (found.record.get("final") or {}).get("selection", {}).get("best_val", {})
        self.teacher_info[m] = {"source": "recorded", "run": found.run_dir.name, "config_hash": found.config_hash,
                                "selected_epoch": len(found.record["epochs"]) - 1, "selection": "last epoch (recorded run)",
                                "val_acc": float((best.get("val") or {}).get(m, {}).get("acc", float("nan")))}
        return teacher

    # ---- the teachers' features, once per process ------------------------------------------------
    def feature_plan(self) -> tuple[bool, str]:
        """Whether the teachers' features are cached (and why): only where the option allows it
        and the training split reads every row the same way in every epoch."""
        if self._opt("umt_teacher_cache") == "off":
            return False, "per-step teacher forward (umt_teacher_cache=off)"
        splits = getattr(self.trainer, "splits", None)
        if splits is None:
            return False, "per-step teacher forward (no training split known yet)"
        train = splits.train
        try:
            never_augments = eval_view(train) is train
        except DataError:
            never_augments = False
        if not never_augments:
            return False, "per-step teacher forward (the training split augments, or cannot say it does not)"
        return True, ("cached: every teacher's features over the training split, computed once per process "
                      "after the teachers are in place, looked up by the batch's index")

    def on_fit_start(self) -> None:
        self.teacher_features = None
        if self.feature_plan()[0]:
            self.teacher_features = self._teacher_features()

    def _teacher_features(self) -> dict[str, torch.Tensor]:
        """Each teacher's encoder output for every training row, in eval mode under the run's
        autocast, scattered to the row's index; charged as estimation cost."""
        assert self.trainer is not None and self.model is not None
        self.teachers.eval()
        n = len(self.trainer.splits.train)
        out: dict[str, torch.Tensor] = {}
        with self.trainer.estimation(), torch.no_grad(), self.autocast():
            for batch in self.trainer.iterate("train", rows=range(n), shuffle=False, augment=False,
                                              tag="umt_teacher_features"):
                index = batch["index"]
                for m in self.model.modalities:
                    f = self.teachers[m].encoder(batch[m])
                    if m not in out:
                        out[m] = torch.zeros((n, *f.shape[1:]), dtype=f.dtype, device=f.device)
                    out[m][index] = f
        return out

    # ---- the step ------------------------------------------------------------------------------
    def on_train_epoch_start(self, epoch: int) -> None:
        if epoch == 0 and self.teacher_info:
            self.log(**{f"umt_teacher_val_{m}": float(info["val_acc"]) for m, info in self.teacher_info.items()})

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        assert self.model is not None
        model = self.model
        feats = model.encode(batch)
        if self.teacher_features is not None:
            index = batch["index"]
            targets = {m: self.teacher_features[m][index] for m in model.modalities}
        else:
            with torch.no_grad():
                targets = {m: self.teachers[m].encoder(batch[m]) for m in model.modalities}
        loss, ce, terms = umt_loss(model.fuse(feats), batch["label"], feats, targets, self.lam)
        if self.trainer is not None:
            total = torch.stack(list(terms.values())).sum().detach()
            self.log(umt_ce=ce.detach(), umt_distill=total, **{f"umt_distill_{m}": t.detach() for m, t in terms.items()})
        return loss

    # ---- state and reporting -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"teachers": {k: v.detach().clone() for k, v in self.teachers.state_dict().items()},
                "modalities": list(self.teachers.keys()), "info": copy.deepcopy(self.teacher_info)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.teacher_features = None  # the features of other teachers: rebuilt in on_fit_start
        self.teachers = nn.ModuleDict({m: self._blank_teacher(m) for m in state["modalities"]})
        self.teachers.load_state_dict(state["teachers"])
        self.teacher_info = copy.deepcopy(dict(state["info"]))
        self._freeze()

    def label(self) -> str:
        tags = []
        if self.lam != OPTIONS["umt_lambda"].default:
            tags.append(f"lambda={self.lam:g}")
        if self.source == "recorded":
            tags.append("recorded teachers")
        if self._opt("umt_teacher_epochs") is not None:
            tags.append(f"teacher epochs={self._opt('umt_teacher_epochs')}")
        if self.select != "val":
            tags.append("last-epoch teachers")
        return "UMT" if not tags else f"UMT ({', '.join(tags)})"

    def record_info(self) -> dict[str, Any]:
        return {"distillation": "lambda * sum_m MSE(e_m, t_m), encoder outputs, teachers frozen in eval mode",
                "lambda": self.lam, "teachers": self.source,
                "teacher_training": ("in the cell: recipe optimizer and schedule, "
                                     f"{self.teacher_epochs()} epochs, {self.select} selection")
                if self.source == "train" else "final weights of the recorded unimodal runs of this identity",
                "teacher_cost": "charged as estimation cost",
                "teacher_features": self.feature_plan()[1]}
