"""Every option a method declares reaches what the run computes, or says it does not.

For every registered method (built-ins and plugins alike) and every option it declares, a short
run with the option at its default and one with another valid value must differ: in the trained
parameters, the per-step diagnostics, the evaluation or the prediction on a fixed batch. An
option whose value can change no number declares ``Option(..., changes_results=False)``, and
the guard then checks that it indeed changes nothing: the same parameters, evaluation and
prediction, and the same value of every diagnostic both runs log (a logging option, such as
valuation's ``value_in_warmup``, may add diagnostics of its own, never alter one). An option that acts only in some
situations (an epoch past a window, a BatchNorm or dropout encoder, three modalities, a
learnable schedule) gets a row in ``CASES`` naming the value and the situation; an option
without an automatic alternative (no choices, a None, dict or list default) must have one. A
method added later is covered automatically, or fails here until its options are declared.

This is the general guard of issue 21 (item 6) against wrong variants of the kind "the option
never reaches the step": each case below fails when its option is ignored (the run at the
other value then equals the default run).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from staged_nets import StagedMLP

from mmbalance.config import as_option
from mmbalance.engine.services import _column
from mmbalance.errors import MMBalanceError
from mmbalance.registry import BACKBONES, METHODS, Entry
from mmbalance.runner import make_trainer
from mmbalance.trainer import to_device

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest

# The smallest runs that still train: synthetic data, two epochs of two batches, one batch of
# evaluation. Every case runs in this setting plus its situation.
BASE: dict[str, Any] = {
    "device": "cpu", "progress": "off", "checkpoint": False, "diagnostics": False, "log_epochs": False,
    "n_train": 200, "n_test": 40, "dim": 8, "embed_dim": 8, "batch_size": 32, "epochs": 2,
    "limit_train_batches": 2, "limit_eval_batches": 1,
}


@dataclass(frozen=True)
class Situation:
    """Where an option acts: extra settings, the epochs to run (in order), and an optional
    change to the set-up model before training (``prepare(trainer)``)."""

    set: Mapping[str, Any] = field(default_factory=dict)
    epochs: tuple[int, ...] = (0, 1)
    prepare: Callable[[Any], None] | None = None
    dataset: str = "synthetic"

    def key(self) -> str:
        return repr((sorted(self.set.items()), self.epochs, getattr(self.prepare, "__name__", None), self.dataset))


@dataclass(frozen=True)
class Case:
    """Another value of an option and the situation in which it must change the result.
    ``refused``: that value is refused at set-up (a documented choice that is not available),
    which is a different outcome too, and must come with a clear error."""

    value: Any
    situation: Situation = Situation()
    refused: bool = False
    why: str = ""
    against: Any = None  # compare with this value instead of the default (see its row's why)


DEFAULT = Situation()


def threshold_between_extremes(trainer: Any) -> None:
    """Set the AGM clip threshold t between the largest entry and the magnitude of the most
    negative entry of the first step's fused-head weight gradient (50 classes, uniform
    predictions and ReLU features make the negative entries the larger ones): then the
    official rule (max > t or min < -t) fires and MOSEI's mistyped one (max > t and min < t)
    does not."""
    t, model = trainer, trainer.model
    batch = to_device(next(iter(t.loader(t.splits.train, train=True, epoch=0))), t.device)
    weight = model.fusion.fc.weight
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(batch).fused, batch["label"]), [weight])
    top, bottom = grad.max().item(), -grad.min().item()
    assert bottom > top > 0, (top, bottom)
    t.cfg["clip_threshold"] = t.method.cfg["clip_threshold"] = (top + bottom) / 2


def twin_modalities(trainer: Any) -> None:
    """Make m2 an exact copy of m1 (data, encoder, fused-head block): OGM-GE's two scores then
    tie exactly at the first step, where the tie rule decides which encoder is damped."""
    for split in (trainer.splits.train, trainer.splits.val, trainer.splits.test):
        split.tensors["m2"] = split.tensors["m1"]
    model = trainer.model
    model.encoders["m2"].load_state_dict(model.encoders["m1"].state_dict())
    fc = model.fusion.fc
    d = model.dims["m1"]
    with torch.no_grad():
        fc.weight[:, d:] = fc.weight[:, :d]


def tiny_conflicting_m2(trainer: Any) -> None:
    """Turn m2's unimodal head against its fused-head block and shrink both to 1e-8, so the two
    gradients of m2's encoder conflict and |G^mm - G^u|^2 falls below MMPareto's guard_eps:
    only then does the denominator guard act."""
    model = trainer.model
    fc = model.fusion.fc
    d = model.dims["m1"]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        block = fc.weight[:, d:]
        block.mul_(1e-8)
        u = model.uni_heads["m2"].weight
        u.copy_(-3.0 * block + 1e-8 * torch.randn(u.shape, generator=gen))



class ShiftedTrainReads:
    """Train-side data whose training reads add a fixed per-row shift and whose evaluation
    view is the clean data: a stand-in for a media dataset's random crops and flips, so that
    which pipeline a pass reads shows in synthetic runs (the shift is a function of the row,
    so it draws from no RNG)."""

    def __init__(self, base: Any) -> None:
        self.base, self.labels = base, base.labels

    def __len__(self) -> int:
        return len(self.base)

    def get_batch(self, idx: Any) -> dict[str, Any]:
        batch = self.base.get_batch(idx)
        rows = torch.as_tensor(idx, dtype=torch.float32).reshape(-1, 1)
        for m in ("m1", "m2"):
            x = batch[m]
            batch[m] = x + 3.0 * torch.sin(rows * 1.7 + torch.arange(x.shape[1], dtype=x.dtype))
        return batch

    def eval_view(self) -> Any:
        return self.base


def augmenting_train_pipeline(trainer: Any) -> None:
    """Give train (and the held-out slice, where the run carved one) a training pipeline that
    differs from their evaluation view (in-memory synthetic data has none: its views agree)."""
    trainer.splits.train = ShiftedTrainReads(trainer.splits.train)
    if getattr(trainer, "_heldout", None) is not None:
        trainer._heldout = ShiftedTrainReads(trainer._heldout)


class GuardAttnNet(torch.nn.Module):
    """A small encoder through scaled_dot_product_attention, whose fused CPU kernel has no double
    backward (LFM's learnable rule needs one: hvp_math_kernels=false is then refused)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(in_dim, 16)
        self.out = torch.nn.Linear(16, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.flatten(1)).view(-1, 1, 2, 8)
        return self.out(torch.nn.functional.scaled_dot_product_attention(h, h, h).flatten(1))


GUARD_BACKBONES = {"guard_attn": GuardAttnNet, "guard_staged": StagedMLP}

# Situations shared by several rows.
LFM_LEARN = {"alpha_schedule": "learnable", "heldout_fraction": 0.1}
MSLR_SCALED = {"lr_mult": {"m1": 0.5}}  # a multiplier that is not 1, so where and how it acts shows
MSLR_AUTO = Situation({"history": 1}, epochs=(0, 1, 2, 3))  # the auto rule adapts from epoch 1 on
OGR_TWO_ESTIMATES = Situation({"super_epoch": 1})  # epoch 1 re-estimates from a trained model
OGR_NOISY_M2 = Situation({"n_train": 240, "strength": [1.5, 0.0], "super_epoch": 5, "limit_train_batches": None})
IPRM_LONGER = Situation({"limit_train_batches": 6})
IPRM_THREE = Situation({"n_modalities": 3})
GREEDY_STAGED = Situation({"backbone.m1.name": "guard_staged", "backbone.m2.name": "guard_staged"})
GREEDY_UNLOCKED = Situation({"greedy_warmup_epochs": 0})
AUG_ASSIGNS = Situation({"aug_lam": 0.5})  # two epochs' confidences sit inside lam 1's band: no learner
INFOREG_NOVEMBER = {"rule": "november"}
# m2 dominates (strong m2); at epoch 2 with W = 1 m1's window score is 0.26 and m2's 0.12-0.15,
# so a threshold of 0.2 leaves m2's window open when read on m1's trace and closed on its own
INFOREG_SPLIT_WINDOWS = Situation({"strength": [0.3, 1.5], "window_epochs": 1, "epochs": 3, "threshold": 0.2},
                                  epochs=(0, 1, 2))
VALUATION_NOW = Situation({"warmup": 0}, epochs=(0,))  # the default warm-up (5) outlasts a short run
VALUATION_MODALITY = Situation({"warmup": 0, "level": "modality"}, epochs=(0,))
RL_RESET = Situation({"reinit_epoch": 1}, epochs=(0, 1, 2))  # ReLearning resets after epoch 1
OPM_ON = Situation({"warmup_epochs": 0})  # OPM's default warm-up (6 epochs) covers a short run

# (method, option) -> the cases to check, when the automatic alternative does not show the
# option (or does not exist). Each row says why the situation is needed.
CASES: dict[tuple[str, str], list[Case]] = {
    # ---- AGM -------------------------------------------------------------------------------
    ("agm", "cap"): [Case(0.0, why="rbar - r rarely exceeds 10 in two epochs; a cap of 0 acts at once")],
    ("agm", "modulation_end"): [Case(0, why="default null (whole run); ending at 0 frees epoch 1")],
    ("agm", "after_window"): [Case("keep", Situation({"modulation_end": 0}),
                                   why="acts only after the window's end")],
    ("agm", "coalitions"): [Case("reuse", Situation({"backbone.m1.dropout": 0.5}),
                                 why="same numbers without BatchNorm or dropout")],
    ("agm", "prob_floor"): [Case(0.5, why="a true-class probability below 1e-8 is rare")],
    ("agm", "clip_threshold"): [Case(1e-4, why="the default 1 rarely fires on a tiny head")],
    ("agm", "clip_rule"): [Case("max_only", Situation({"num_classes": 50}, epochs=(0,),
                                                      prepare=threshold_between_extremes),
                                why="differs only when max <= t < -min for the fused-head gradient")],
    # ---- Greedy ----------------------------------------------------------------------------
    ("greedy", "greedy_mode"): [Case("random", GREEDY_UNLOCKED, why="the warm-up epoch has regular steps in both modes")],
    ("greedy", "greedy_epsilon"): [Case(10.0, GREEDY_UNLOCKED, why="windows open only after the warm-up")],
    ("greedy", "greedy_window"): [Case(1, Situation({"greedy_warmup_epochs": 0, "limit_train_batches": 4}),
                                       why="windows open only after the warm-up; 2 of 4 steps differ")],
    ("greedy", "greedy_warmup_epochs"): [Case(0)],
    ("greedy", "greedy_stages"): [Case(2, GREEDY_STAGED, why="stages count only with staged encoders")],
    ("greedy", "greedy_fusion_point"): [
        Case("embedding", GREEDY_STAGED, why="MLP encoders take the embedding-level fallback under auto too"),
        Case("staged", refused=True, why="MLP encoders cannot be split: refused instead of the fallback")],
    ("greedy", "greedy_legacy_running_avg"): [
        Case(True, Situation({"greedy_warmup_epochs": 0, "greedy_epsilon": 0.0, "limit_train_batches": 4}),
             why="the averages act only in re-balancing steps caring for m2")],
    ("greedy", "greedy_legacy_eval"): [Case(True)],
    # ---- AMCo ------------------------------------------------------------------------------
    ("amco", "amco_sigma"): [Case(0.99, why="default null (1/M); no share passes 0.99, so nothing is ever masked")],
    # ---- AUG -------------------------------------------------------------------------------
    ("aug", "aug_residual_c"): [Case(1.0, AUG_ASSIGNS, why="weights the newest learner's CE: needs a learner")],
    ("aug", "aug_lam"): [Case(0.5, why="default null (1.0): rho ~ 0.99 is inside 1's band, not 0.5's")],
    ("aug", "aug_check_every"): [Case(3, Situation({**AUG_ASSIGNS.set, "epochs": 3}, epochs=(0, 1, 2)),
                                      why="default null (every epoch); epoch 0 is always a check, 3 skips epoch 1's")],
    ("aug", "aug_max_learners"): [Case(0, AUG_ASSIGNS, why="default null (no cap); caps only a learner assigned")],
    ("aug", "aug_legacy_frozen_learners"): [Case(True, AUG_ASSIGNS, why="freezes added learners: needs one")],
    # ---- CGGM ------------------------------------------------------------------------------
    ("cggm", "cggm_b_max"): [Case(0.1, why="default null (off); B sums to M - 1 = 1, so a cap of 0.1 always clamps")],
    # ---- DGL -------------------------------------------------------------------------------
    ("dgl", "fusion_mode"): [Case("sum"), Case("weight", refused=True,
                                               why="weight fusion has no block per modality: refused")],
    # ---- InfoReg ---------------------------------------------------------------------------
    ("inforeg", "beta_other"): [Case(0.2, Situation({**INFOREG_NOVEMBER, "strength": [0.3, 1.5]}),
                                     why="rule=november only, when the non-anchor m2 dominates (a strong m2)")],
    ("inforeg", "threshold"): [Case(1.0, why="default null (0.05); k = 1 at epochs 0 and 1, so only 1 closes the window")],
    ("inforeg", "window_epochs"): [Case(1, Situation({"epochs": 3, "threshold": 0.2}, epochs=(0, 1, 2)),
                                        why="any W >= e gives k = x_{e-1} / sum x (0.5 at epoch 2), W = 1 gives 0.05: open and closed at 0.2")],
    ("inforeg", "trace_source"): [
        Case("anchor", INFOREG_SPLIT_WINDOWS, why="m2's window open on m1's trace, closed on its own, at epoch 2"),
        Case("own", Situation({**INFOREG_SPLIT_WINDOWS.set, **INFOREG_NOVEMBER}, INFOREG_SPLIT_WINDOWS.epochs),
             why="own is the intended rule's default, anchor november's; the windows then differ at epoch 2")],
    # ---- Valuation -------------------------------------------------------------------------
    ("valuation", "level"): [Case("modality", VALUATION_NOW, why="resamples from epoch warmup on")],
    ("valuation", "warmup"): [Case(1, why="the default 5 outlasts a two-epoch run; 1 resamples epoch 1")],
    ("valuation", "value"): [Case("correct", VALUATION_NOW, why="resamples from epoch warmup on")],
    ("valuation", "drop"): [Case("input", VALUATION_NOW, why="resamples from epoch warmup on")],
    ("valuation", "valuation_augment"): [
        Case(False, Situation({"warmup": 0}, epochs=(0,), prepare=augmenting_train_pipeline),
             why="in-memory data never augments; only an augmenting training pipeline shows it")],
    ("valuation", "part_ratio"): [Case(0.4, VALUATION_MODALITY, why="level=modality only (refused otherwise)")],
    ("valuation", "alpha"): [Case(2.0, VALUATION_MODALITY, why="level=modality only (refused otherwise)")],
    ("valuation", "func"): [Case(f, Situation({**VALUATION_MODALITY.set, "alpha": 4.0}, VALUATION_MODALITY.epochs),
                                 why="level=modality only; tanh x ~ x: alpha 4 makes floor(N diff) differ")
                            for f in ("tanh", "square")],
    # ---- CML -------------------------------------------------------------------------------
    ("cml", "sign"): [Case("miwae"), Case("bb_trick1"),
                      Case("none", Situation({"num_classes": 2}),
                           why="differs from cpm only where a removal turns a wrong prediction right "
                               "and raises the confidence: rare in two steps of 10 classes")],
    ("cml", "removal"): [Case("drop_part"),
                         Case("zero_feature", Situation({"fusion_mode": "sum"}),
                              why="auto is zero_feature for concat; sum's auto is drop_part")],
    # ---- IPRM ------------------------------------------------------------------------------
    ("iprm", "alpha"): [Case(0.3, IPRM_LONGER, why="lambda moves away from 0.5 only after a few steps")],
    ("iprm", "fixed_weight"): [Case(0.3, why="default null (the probe decides)")],
    ("iprm", "pair_mode"): [Case("single_cls", IPRM_THREE, why="three or more modalities only")],
    ("iprm", "replicate_official_head_bug"): [Case(True, IPRM_THREE, why="three modalities only")],
    # ---- LFM -------------------------------------------------------------------------------
    ("lfm", "alpha_schedule"): [Case("exp"), Case("learnable", Situation({"heldout_fraction": 0.1}),
                                                  why="the learnable rule needs a held-out slice of 2+ rows")],
    ("lfm", "infonce_temperature"): [Case(0.2, Situation({"align": "infonce"}), why="align=infonce only")],
    ("lfm", "loss_scale"): [Case(1.0, why="default null (2 for the fitted schedule)")],
    ("lfm", "fitted_clamp"): [Case(False, Situation({"epochs": 200}, epochs=(183,)),
                                   why="the released polynomial leaves [0, 1] only near epoch 183 of 200")],
    ("lfm", "exp_rate"): [Case(0.6, Situation({"alpha_schedule": "exp"}), why="alpha_schedule=exp only")],
    ("lfm", "alpha_min"): [Case(0.1, Situation({"alpha_schedule": "exp", "epochs": 20}, epochs=(10,)),
                                why="exp(-0.3 e) falls below 0.1 from epoch 8")],
    ("lfm", "alpha_max"): [Case(0.5, Situation({"alpha_schedule": "exp"}), why="exp(0) = 1 is clipped")],
    ("lfm", "alpha_al_init"): [Case(0.5, Situation(LFM_LEARN), why="learnable rule only")],
    ("lfm", "alpha_lr"): [Case(1.0, Situation(LFM_LEARN), why="learnable rule only")],
    ("lfm", "alpha_lr_halve_every"): [Case(40, Situation({**LFM_LEARN, "alpha_lr": 1.0, "epochs": 40}, epochs=(20,)),
                                           why="halves at epoch 20 with the default 20, not with 40")],
    ("lfm", "heldout_fraction"): [Case(0.2, Situation(LFM_LEARN), why="learnable rule only (other rows)")],
    ("lfm", "hvp_samples"): [Case(4, Situation(LFM_LEARN), why="learnable rule only")],
    ("lfm", "hvp_mode"): [Case(mode, Situation({**LFM_LEARN, "backbone.m1.dropout": 0.5}),
                               why="learnable rule with dropout: the mode of the HVP forward shows")
                          for mode in ("eval", "train")],
    ("lfm", "hvp_read"): [Case("all", Situation(LFM_LEARN), why="learnable rule only")],
    ("lfm", "hvp_math_kernels"): [Case(False, Situation({**LFM_LEARN, "backbone.m1.name": "guard_attn"}),
                                       refused=True,
                                       why="only a fused attention kernel shows it: without the math "
                                           "kernel it has no double backward, and is refused")],
    ("lfm", "lr_decay_timing"): [Case("epoch_start", Situation({"step_size": 1}),
                                      why="moves StepLR's decay one epoch early: visible from epoch 0 with step_size 1")],
    # ---- MLA -------------------------------------------------------------------------------
    ("mla", "mla_fixed_weights"): [Case({"m1": 0.7, "m2": 0.3}, Situation({"mla_fusion": "fixed"}),
                                        why="default null (1/M); read by mla_fusion=fixed only")],
    ("mla", "mla_order"): [Case(["m2", "m1"], why="default null (the run's modality order)")],
    # ---- MMPareto ----------------------------------------------------------------------------
    ("mmpareto", "guards"): [Case(False, Situation(prepare=tiny_conflicting_m2),
                                  why="the guards act only on vanishing or cancelling gradients")],
    ("mmpareto", "guard_eps"): [Case(1e-30, Situation(prepare=tiny_conflicting_m2),
                                     why="the threshold of the guards, which act only on tiny gradients")],
    # ---- MSLR ------------------------------------------------------------------------------
    ("mslr", "rule"): [Case("fixed", MSLR_AUTO, why="the auto rule adapts only once H accuracies exist")],
    ("mslr", "lr_mult"): [Case({"m1": 0.5}, why="default {} (every multiplier 1)")],
    ("mslr", "history"): [Case(2, MSLR_AUTO, why="H decides from which epoch the rule adapts")],
    ("mslr", "ratio_min"): [Case(1.5, MSLR_AUTO, why="clips only ratios below it")],
    ("mslr", "ratio_max"): [Case(0.6, MSLR_AUTO, why="clips only ratios above it")],
    ("mslr", "auto_variant"): [Case("amst", MSLR_AUTO, why="the auto rule's variants differ once it adapts")],
    ("mslr", "apply_as"): [Case("grad", Situation(MSLR_SCALED), why="a multiplier of 1 scales nothing")],
    ("mslr", "head_in_group"): [Case(False, Situation(MSLR_SCALED), why="a multiplier of 1 scales nothing")],
    ("mslr", "modulation_start"): [Case(1, Situation(MSLR_SCALED), why="a multiplier of 1 scales nothing")],
    ("mslr", "modulation_end"): [Case(0, Situation(MSLR_SCALED), why="default null; a multiplier of 1 scales nothing")],
    # ---- OGM-GE ----------------------------------------------------------------------------
    ("ogm", "modulation_ends"): [Case(0, why="the default window 0-50 covers a short run; 0-0 frees epoch 1")],
    ("ogm", "fusion_mode"): [Case("sum"), Case("weight", refused=True,
                                               why="weight fusion does not split by modality: refused")],
    ("ogm", "tie"): [Case("second", Situation(prepare=twin_modalities),
                          why="acts only at an exact tie of the two scores")],
    ("ogm", "plus_boost"): [Case(2.0, Situation({"ogm_plus": True}), why="the factor of ogm_plus=true only")],
    # ---- OPM -------------------------------------------------------------------------------
    ("opm", "warmup_epochs"): [Case(1, why="the default warm-up of 6 epochs covers a short run")],
    ("opm", "q_base"): [Case(0.25, OPM_ON, why="the drop acts only after the warm-up")],
    ("opm", "lam"): [Case(1.0, OPM_ON, why="the drop acts only after the warm-up")],
    ("opm", "p_exe"): [Case(0.0, OPM_ON, why="the drop acts only after the warm-up; 0 never drops")],
    ("opm", "rescale"): [Case(r, OPM_ON, why="the drop acts only after the warm-up")
                         for r in ("per_modality", "none")],
    ("opm", "fusion_mode"): [Case("sum"), Case("weight", refused=True,
                                               why="weight fusion does not split by modality: refused")],
    # ---- OGR-GB ----------------------------------------------------------------------------
    ("ogr_gb", "mode"): [Case("offline", OGR_TWO_ESTIMATES,
                              why="online and offline both estimate from the initial model first")],
    ("ogr_gb", "estimation_optimizer"): [Case("copy", OGR_TWO_ESTIMATES,
                                              why="the run's optimizer has no state before epoch 1")],
    ("ogr_gb", "unimodal_estimation"): [
        Case("joint", Situation({"grad_clip": 0.01}),
             why="auto is joint without grad_clip, separate with it; joint is exact without a clip"),
        Case("separate", Situation({"grad_clip": 0.01}), against="joint",
             why="separate equals auto by design (auto picks the exact form); it differs from joint "
                 "under a global clip")],
    ("ogr_gb", "min_delta_o_sq"): [Case(10.0, why="below the measured ΔO² and its noise it never acts")],
    ("ogr_gb", "delta_o_rule"): [Case("clamp", Situation({**OGR_NOISY_M2.set, "delta_o_floor": "fixed",
                                                          "min_delta_o_sq": 1e-12}),
                                      why="differs only for a head whose ΔO < 0")],
    ("ogr_gb", "dg_rule"): [Case(rule, OGR_NOISY_M2, why="acts only for a head whose held-out loss rose")
                            for rule in ("abs", "zero")],
    ("ogr_gb", "max_weight"): [Case(0.34, why="caps only a weight above it")],
    # ---- PMR -------------------------------------------------------------------------------
    ("pmr", "momentum_coef"): [Case(0.5, Situation(epochs=(0, 1, 2)), why="the EMA acts from epoch 2 on")],
    ("pmr", "modulation_end"): [Case(0, why="the default window 0-70 covers a short run")],
    ("pmr", "proto_fraction"): [Case(1.0, why="floor(0.2 x 2 batches) is 1 batch, as floor(0.1 x 2)")],
    # ---- ReconBoost -------------------------------------------------------------------------
    ("reconboost", "recon_epochs_a"): [Case(2, why="default null (the preset's 1)")],
    ("reconboost", "recon_epochs_b"): [Case(0, why="default null (the preset's 1)")],
    ("reconboost", "recon_alpha"): [Case(1.0, Situation({"recon_mc": "grad"}),
                                         why="weights the memory term, off by default")],
    ("reconboost", "recon_frozen_eval_mode"): [Case(True, Situation({"backbone.m1.dropout": 0.5}),
                                                    why="the mode shows only with dropout or BatchNorm")],
    ("reconboost", "recon_lr_a"): [Case(0.01, why="default null (the run's lr)")],
    ("reconboost", "recon_lr_b"): [Case(0.01, why="default null (the run's lr)")],
    ("reconboost", "recon_warm_start"): [Case("unimodal", refused=True,
                                              why="needs another run's checkpoints: not available, refused")],
    # ---- ReLearning ---------------------------------------------------------------------------
    ("relearning", "reinit_epoch"): [Case(2, Situation(epochs=(0, 1, 2)),
                                          why="auto is period 1 in a 2-epoch run (a reset after epoch 1); "
                                              "2 resets after epoch 2"),
                                     Case(20, Situation({"epochs": 20}, epochs=(0, 1, 2, 3, 4, 5)),
                                          why="auto is period 4 in a 20-epoch run (a reset after epoch 4); "
                                              "the official 20 unscaled never fires there")],
    ("relearning", "reinit_num"): [Case(0, RL_RESET, why="0 resets nothing where the schedule resets once")],
    ("relearning", "move_lambda"): [Case(6.0, RL_RESET, why="lambda acts only in a reset")],
    ("relearning", "kmeans_n_init"): [Case(10, RL_RESET, why="k-means runs only in a diagnosis")],
    ("relearning", "diagnosis_augment"): [Case(True, Situation({"reinit_epoch": 1}, epochs=(0, 1, 2),
                                                              prepare=augmenting_train_pipeline),
                                               why="acts in a diagnosis on data whose training reads "
                                                   "augment (synthetic data reads the same either way)")],
    # ---- unimodal --------------------------------------------------------------------------
    ("umt", "umt_teachers"): [Case("recorded", refused=True,
                                   why="needs finished unimodal runs of this identity: none here, refused")],
    ("umt", "umt_teacher_epochs"): [Case(1, why="default null (the recipe's epochs)")],
    ("unimodal", "modality"): [Case("m2", why="default null (the dataset's first modality)")],
}


def auto_alternatives(default: Any, option: Any) -> list[Any] | None:
    """Other valid values of an option when they follow from its declaration: every other
    choice, the other boolean, or a nearby in-range number. None when they do not."""
    if option.choices is not None:
        return [c for c in option.choices if c != default]
    if isinstance(default, bool):
        return [not default]
    if isinstance(default, int | float) and not isinstance(default, bool):
        for candidate in (default * 2 if default else 1, default / 2 if default else 0.5, default + 1):
            if isinstance(default, int) and not float(candidate).is_integer():
                continue
            value = type(default)(candidate)
            if value == default:
                continue
            lo_ok = option.min is None or (value > option.min if option.min_open else value >= option.min)
            hi_ok = option.max is None or (value < option.max if option.max_open else value <= option.max)
            if lo_ok and hi_ok:
                return [value]
    return None


def cases() -> Iterable[Any]:
    METHODS.load_plugins()
    for name in sorted(METHODS.names()):
        cls = METHODS.get(name)
        for key, raw in cls.options.items():
            option = as_option(raw)
            declared = CASES.get((name, key))
            if declared is None:
                values = auto_alternatives(option.default, option)
                declared = [Case(v) for v in values] if values else [None]
            for case in declared:
                label = f"{name}-{key}" + ("" if case is None else f"={case.value!r}")
                yield pytest.param(name, key, case, id=label)


@dataclass
class Outcome:
    """What a short run computed: parameters, per-step diagnostics, evaluations, prediction."""

    params: dict[str, torch.Tensor]
    logs: list[dict[str, list[float]]]
    evals: list[Any]
    prediction: dict[str, torch.Tensor]

    def differences(self, other: Outcome, logged_only: bool = False) -> list[str]:
        """What differs. ``logged_only``: compare the diagnostics both runs log, so that a
        logging option (``changes_results=False``) may add or leave out diagnostics of its own
        but never change the value of one."""
        out = []
        if not same_tensors(self.params, other.params):
            out.append("parameters")
        logs, other_logs = self.logs, other.logs
        if logged_only and len(logs) == len(other_logs):
            pairs = list(zip(self.logs, other.logs, strict=True))
            logs = [{k: v for k, v in a.items() if k in b} for a, b in pairs]
            other_logs = [{k: v for k, v in b.items() if k in a} for a, b in pairs]
        if not same(logs, other_logs):
            out.append("diagnostics")
        if not same(self.evals, other.evals):
            out.append("evaluation")
        if not same_tensors(self.prediction, other.prediction):
            out.append("prediction")
        return out


def same_tensors(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """Bit-for-bit equal tensors under the same names, NaN equal to NaN."""
    if a.keys() != b.keys():
        return False
    for k, x in a.items():
        y = b[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if not torch.equal(x, y) and not (x.is_floating_point() and torch.equal(x.isnan(), y.isnan())
                                         and torch.equal(x.nan_to_num(0.0), y.nan_to_num(0.0))):
            return False
    return True


def same(a: Any, b: Any) -> bool:
    """Equality that treats NaN as equal to NaN (diagnostics log NaN on purpose)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def short_run(root: Any, method: str, settings: Mapping[str, Any], situation: Situation) -> Outcome:
    """The trainer's loop (set-up, cell and fit hooks, epochs with their evaluation), cut short."""
    cfg = {**BASE, "records": str(root), **situation.set, **settings}
    t = make_trainer(method, situation.dataset, cfg)
    t.setup()
    if situation.prepare is not None:
        situation.prepare(t)
    m = t.method
    m.resumed = False
    m.on_cell_start()
    m.on_fit_start()
    logs, evals = [], []
    for epoch in situation.epochs:
        t.train_epoch(epoch)
        logs.append({k: _column(v) for k, v in t._step_logs.items()})
        val = t.evaluate(t.splits.val)
        m.on_validation_end({"val": val, "test": val, "epoch": epoch})
        evals.append(val)
    params = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
    t.model.eval()
    batch = to_device(next(iter(t.loader(t.splits.test, train=False))), t.device)
    with torch.no_grad():
        pred = m.predict(batch)
    prediction = {"fused": pred.fused.float(), **{f"per.{k}": v.float() for k, v in pred.per_modality.items()}}
    return Outcome(params, logs, evals, prediction)


_defaults: dict[tuple[str, str], Outcome] = {}


def default_outcome(root: Any, method: str, situation: Situation) -> Outcome:
    key = (method, situation.key())
    if key not in _defaults:
        _defaults[key] = short_run(root / "default", method, {}, situation)
    return _defaults[key]


def register_guard_backbones(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test backbones a situation may name (``backbone.<m>.name``), for this test only."""
    BACKBONES.load_plugins()
    for name, cls in GUARD_BACKBONES.items():
        def build(spec, out_dim, weights=None, _cls=cls, **kwargs):
            return _cls(math.prod(spec.shape), out_dim or 16)
        monkeypatch.setitem(BACKBONES._entries, name, Entry(name, build, "test backbone of the option guard"))


@pytest.mark.parametrize(("method", "key", "case"), list(cases()))
def test_every_option_changes_the_result_or_says_it_does_not(tmp_path_factory, monkeypatch, method, key, case):
    """Wrong variants caught, one row each: the option's read replaced by its default (amco_sigma;
    AUG's c, lam, check_every, max_learners, frozen learners; cggm_b_max; DGL's fusion_mode,
    whose weight refusal then never fires; InfoReg's beta_other, threshold, window_epochs,
    trace_source; valuation's level, warmup, value, drop, valuation_augment, part_ratio, alpha,
    func) and valuation's warm-up one epoch late (``epoch <= warmup``)."""
    option = as_option(METHODS.get(method).options[key])
    if case is None:
        pytest.fail(
            f"Method '{method}' declares option '{key}' (default {option.default!r}) with no automatic "
            f"alternative value: add a row ('{method}', '{key}') to CASES in {__file__} with another "
            f"valid value and the situation in which it changes the result, or declare the option "
            f"with changes_results=False if no value can change a number."
        )
    root = tmp_path_factory.mktemp(f"{method}-{key}")
    register_guard_backbones(monkeypatch)
    if case.refused:
        with pytest.raises(MMBalanceError, match=method):
            short_run(root, method, {key: case.value}, case.situation)
        return
    if case.against is not None:
        base = short_run(root / "against", method, {key: case.against}, case.situation)
    else:
        base = default_outcome(tmp_path_factory.getbasetemp() / "defaults", method, case.situation)
    other = short_run(root, method, {key: case.value}, case.situation)
    changed = other.differences(base, logged_only=not option.changes_results)
    if option.changes_results:
        assert changed, (
            f"Method '{method}': option {key}={case.value!r} computes exactly what "
            f"{key}={case.against if case.against is not None else option.default!r} computes in this "
            f"situation ({case.situation}). Either the option "
            f"never reaches the step (a bug), or it acts only elsewhere: add a situation to CASES "
            f"in {__file__}, or declare changes_results=False if it can change no number."
        )
    else:
        assert not changed, (
            f"Method '{method}': option {key} is declared changes_results=False, but {key}="
            f"{case.value!r} changed the {', '.join(changed)}."
        )


def test_a_logging_option_may_add_diagnostics_but_not_change_one():
    """The check of ``changes_results=False`` options ignores diagnostics only one run logs,
    and still catches any value that differs. Wrong variant caught: comparing no diagnostics
    at all under ``logged_only``."""
    params = {"w": torch.zeros(2)}
    pred = {"fused": torch.zeros(1, 2)}
    base = Outcome(params, [{"loss": [1.0, 0.5]}], [{"acc": 10.0}], pred)
    added = Outcome(params, [{"loss": [1.0, 0.5], "phi_m1": [0.3]}], [{"acc": 10.0}], pred)
    altered = Outcome(params, [{"loss": [1.0, 0.4], "phi_m1": [0.3]}], [{"acc": 10.0}], pred)
    assert added.differences(base) == ["diagnostics"]
    assert added.differences(base, logged_only=True) == []
    assert altered.differences(base, logged_only=True) == ["diagnostics"]
    assert Outcome({"w": torch.ones(2)}, base.logs, base.evals, pred).differences(base, logged_only=True) == ["parameters"]


def test_the_short_run_is_deterministic(tmp_path):
    """The guard compares runs bit for bit: the same settings twice give the same outcome."""
    for method in ("concat", "agm"):
        a = short_run(tmp_path / "a", method, {}, DEFAULT)
        b = short_run(tmp_path / "b", method, {}, DEFAULT)
        assert not a.differences(b), method


def test_a_method_added_later_is_covered_or_fails_until_declared(monkeypatch):
    """The guard's cases come from the registry at collection time: a new method's options get
    their automatic alternatives, and an option without one yields the case that fails with
    the instruction to declare it."""
    from mmbalance.config import Option
    from mmbalance.method import Method

    class LaterMethod(Method):
        name = "guard_later"
        options = {"knob": Option(None, "a string setting", type=str), "flag": Option(False, "a switch"),
                   "mode": Option("a", "a choice", choices=("a", "b", "c")), "rate": Option(0.5, "a number", max=1)}

    METHODS.load_plugins()
    monkeypatch.setitem(METHODS._entries, "guard_later", Entry("guard_later", LaterMethod, "later"))
    got = {}
    for param in cases():
        method, key, case = param.values
        if method == "guard_later":
            got.setdefault(key, []).append(None if case is None else case.value)
    assert got == {"knob": [None], "flag": [True], "mode": ["b", "c"], "rate": [1.0]}
