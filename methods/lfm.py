"""LFM: dynamically learning the modality gap (Yang, Wan, Jiang, Xu, NeurIPS 2024).

Documented in the documentation's lfm page; written from the paper and
checked against ``Crema_epoch.py`` / ``Crema_epoch_learnable.py`` of
njustkmg/NeurIPS24-LFM (the official code; nothing copied).

Model: the encoders and their **separate** linear unimodal heads, no fused head
(``build_fusion`` returns None). The fused logits, for the CE and at inference, are the **mean**
of the unimodal logits (the default ``predict``); per-modality accuracy is each trained head's.

Loss per batch, with weights fixed within epoch e (``alpha_ce + alpha_al = 1``)::

    L = loss_scale * (alpha_ce(e) * CE(mean_m o_m, y) + alpha_al(e) * A)

``A`` (``align=mixkl``, as released): with p = softmax(o_a), q = softmax(o_b) and
m = (p + q) / 2, ``A = (KL(m || p) + KL(m || q)) / 2`` averaged over the batch (PyTorch's
``kl_div(log p, m)`` is KL(m || p): the "reverse" mixture divergence, not the textbook JS);
gradients flow through m. Three or more modalities: the mean over unordered pairs, each pair
with its own m (a decision). ``align=infonce`` is the paper's contrastive loss as
far as it can be reconstructed (a **guess**): symmetric InfoNCE on L2-normalised
pooled features with temperature ``infonce_temperature`` (0.1), mean over pairs.

The weights (``alpha_schedule``; all pure functions of the epoch below):

* ``fitted`` (the released default): alpha_ce is the degree-5 polynomial fitted to a learnable
  trajectory of the 200-epoch CREMA-D run, alpha_al = 1 - alpha_ce; loss_scale 2.
* ``exp`` (repository history; a guess for the paper's heuristic): alpha_al =
  clip(exp(-0.3 e), 0.05, 0.95); loss_scale 1 (that script has no factor 2). Note: its only
  use fine-tuned a CE-pretrained checkpoint; from scratch it is plain CE after ~epoch 10.
* ``learnable`` (``Crema_epoch_learnable.py``): before every epoch (epoch 0 included, before
  any training), on the first ``hvp_samples`` (8) rows of the held-out slice of *train*:
  ``L_tot = alpha_ce * CE + alpha_al * A`` (no factor 2), ``g_cls = grad CE``,
  ``v = H_tot g_cls`` (the gradient of <grad L_tot, g_cls> with g_cls held constant), ``s`` =
  mean of v over the first trainable parameter tensor (``model.parameters()`` order: the first
  encoder's stem, as the official audio conv), ``alpha_al <- clip(alpha_al - eta_e * s, 0.05,
  0.95)``, alpha_ce = 1 - alpha_al. eta_e = 1e-4 * 0.5 ** (e // 20) (the official halving at
  every positive multiple of 20). Start: CE 0.05, AL 0.95. loss_scale 2. The held-out slice is
  the trainer's (``heldout_fraction``, taken out of train once per cell; it is only carved in
  this mode). A backbone that cannot take a double backward is refused with UnsupportedError
  naming it: the failure is detected (the HVP raised, or a gradient came back without a
  graph) and attributed by running a second-order probe through each encoder alone.

Departures from the official code (each one that changes numbers is an option):

* ``log_softmax`` instead of ``log(softmax)`` in A (same value, no -inf): not an option.
* Fitted schedule: the epoch is rescaled to the official 200-epoch run, e' = e * 200 / E
  (identity at E = 200; ``fitted_rescale=false`` evaluates the polynomial at e, which collapses
  past 200 epochs), and alpha_ce is clamped to [0, 1] (``fitted_clamp=false``: the official
  alpha_al < 0 for e' = 178-188).
* Held-out samples (learnable): a stratified ``heldout_fraction`` of train (0.0025, about the
  official 16 of CREMA-D's train) carved with the trainer's fixed seed, not 16 samples drawn
  with the run seed; the HVP uses its first ``hvp_samples`` rows in a fixed order every epoch,
  as officially (the same 8 each epoch). Never test or validation data (BalanceBenchmark's port
  used a test batch).
* HVP forward mode: ``hvp_mode=official`` replicates the released script (train
  mode at epoch 0, so BatchNorm statistics move once on those rows; eval mode from epoch 1, as
  left by its ``val()``); ``eval`` / ``train`` fix one mode.
* The HVP runs in fp32 without autocast (the official code is fp32 throughout; second-order
  arithmetic in bf16 would be noise) and, with ``hvp_math_kernels=true`` (default), under the
  math attention kernel and with cuDNN off, whose fused kernels (CPU/GPU flash attention, cuDNN
  RNNs) have no double backward; values are those of the default kernels up to rounding.
  ``hvp_read=all`` averages v over every parameter instead of the first tensor only.
* A non-finite s skips that epoch's alpha update (counted in ``hvp_skipped``, logged).
* LR timing: the official script steps StepLR at the *start* of every epoch, so the first
  decay acts from epoch 69 (step 70). ``lr_decay_timing=epoch_start`` replicates it (through
  ``set_lr_scale``; StepLR only) and is the CREMA-D paper default; ``trainer`` (the default
  elsewhere) keeps the benchmark's common end-of-epoch timing.
* Initialisation: ``weight_init=official`` applies LFM's init (Kaiming-normal
  fan_out for convolutions, Xavier-normal with zero bias for linear layers, BatchNorm (1, 0)) to
  the heads and to every encoder built without loaded weights; the default ``framework`` keeps
  the backbones' own init, shared by every method of the benchmark under the same seed.
* Labels are hard (the official one-hot float targets give the same CE); autograd anomaly
  detection is off (officially on, globally); selection follows the trainer's rules (the
  official scripts pick on test).

Open questions decided here: the paper's contrastive loss is the ``infonce`` guess
(representation = pooled encoder features, temperature 0.1); its heuristic schedule is the
``exp`` guess; the bi-level algorithm is the released crude HVP rule, not the paper's
(unrecoverable) one; no per-dataset settings exist for KS, NVGesture, Sarcasm, so the common
per-dataset recipe applies and the fitted schedule is rescaled to the run length.

Cost: one forward and one backward per batch, no fused head; A costs O(B * C * pairs). The
learnable mode adds, once per epoch, one forward and one double backward on ``hvp_samples``
rows (counted in the record's ``extra_batches``; its time is inside ``train_time_s``). No host
sync per step (the weights are Python floats fixed for the epoch); the learnable update reads
one number per epoch.

Diagnostics per step: ``ce`` (the fused CE), ``align`` (A, the key diagnostic), ``ce_<m>``
(each head's CE, no graph), ``nonfinite`` (1 where the loss was not finite). Per epoch (from
the epoch-start hook): ``alpha_ce``, ``alpha_al``; learnable also ``hvp_s``, ``alpha_lr``,
``hvp_rows``, ``hvp_skipped``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.config import Option, Search
from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.method import Method
from mmbalance.registry import register_method

# The released fitted schedule: alpha_ce(e) in increasing powers of e (its alpha_al list is
# exactly the complement), fitted on the 200-epoch CREMA-D run.
FITTED_COEFFS = (2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08, -5.39717505e-11)
FITTED_EPOCHS = 200

OPTIONS: dict[str, Option] = {
    # search range: the three schedules of the release
    "alpha_schedule": Option("fitted", "weights of CE and alignment per epoch: the released fitted polynomial, "
                             "the exponential heuristic, or the learnable (HVP) rule",
                             choices=("fitted", "exp", "learnable"), search=Search(choices=('fitted', 'exp', 'learnable'))),
    "align": Option("mixkl", "alignment term: released mixture KL (mixkl) or the paper's InfoNCE (a guess)",
                    choices=("mixkl", "infonce")),
    "infonce_temperature": Option(0.1, "InfoNCE temperature (align=infonce; a guess)", min=0.0, min_open=True),
    "loss_scale": Option(None, "factor on the whole loss; default: 2 (fitted, learnable, as released), "
                         "1 (exp, as in its script)", type=float, min=0.0, min_open=True),
    "fitted_rescale": Option(True, "fitted: evaluate the polynomial at e * 200 / epochs (false: at e, official)"),
    "fitted_clamp": Option(True, "fitted: clamp alpha_ce to [0, 1] (false: official, alpha_al < 0 near e=183)"),
    # search range: around the release's 0.3; only the exp schedule reads the rate
    "exp_rate": Option(0.3, "exp: alpha_al = clip(exp(-rate * epoch))", min=0.0,
                       search=Search(0.05, 1.0, log=True, when={"alpha_schedule": ("exp",)})),
    "alpha_min": Option(0.05, "exp/learnable: lower clip of alpha_al", min=0.0, max=1.0),
    "alpha_max": Option(0.95, "exp/learnable: upper clip of alpha_al", min=0.0, max=1.0),
    "alpha_al_init": Option(0.95, "learnable: alpha_al before the update of epoch 0 (official 0.95)", min=0.0, max=1.0),
    "alpha_lr": Option(1e-4, "learnable: step size eta of the alpha update", min=0.0),
    "alpha_lr_halve_every": Option(20, "learnable: eta halves at every positive multiple of this epoch (0 = never)",
                                   min=0),
    "heldout_fraction": Option(0.0025, "learnable: share of train held out for the HVP (stratified, fixed seed)",
                               min=0.0, max=0.5, min_open=True),
    "hvp_samples": Option(8, "learnable: held-out rows the HVP uses (the first ones, fixed order)", min=1),
    "hvp_mode": Option("official", "learnable: model mode of the HVP forward: official (train at epoch 0, eval "
                       "after), eval or train", choices=("official", "eval", "train")),
    "hvp_read": Option("first_tensor", "learnable: s = mean of the HVP over the first parameter tensor (official) "
                       "or over all parameters", choices=("first_tensor", "all")),
    "hvp_math_kernels": Option(True, "learnable: run the HVP with the math attention kernel and cuDNN off (fused "
                               "kernels have no double backward)"),
    "lr_decay_timing": Option("trainer", "StepLR decay at the trainer's epoch end, or one epoch early as the "
                              "official script (steps at epoch start)", choices=("trainer", "epoch_start")),
    "weight_init": Option("framework", "backbones' own init, or LFM's official init (Kaiming fan_out conv, "
                          "Xavier linear, BN 1/0) on heads and encoders without loaded weights",
                          choices=("framework", "official")),
}

PAPER_CREMAD = {"lr_decay_timing": "epoch_start"}


# ---- the mathematics (pure functions) ------------------------------------------------------
def fitted_alpha_ce(epoch: int, total_epochs: int = FITTED_EPOCHS, rescale: bool = True, clamp: bool = True) -> float:
    """The released fitted alpha_ce at ``epoch`` (0-based): the degree-5 polynomial at
    e' = e * 200 / total_epochs (``rescale``) or at e, clamped to [0, 1] (``clamp``)."""
    e = epoch * FITTED_EPOCHS / total_epochs if rescale else float(epoch)
    value = sum(c * e**i for i, c in enumerate(FITTED_COEFFS))
    return min(1.0, max(0.0, value)) if clamp else value


def exp_alpha_al(epoch: int, rate: float = 0.3, lo: float = 0.05, hi: float = 0.95) -> float:
    """The exponential heuristic: alpha_al = clip(exp(-rate * epoch), lo, hi)."""
    return min(hi, max(lo, math.exp(-rate * epoch)))


def learnable_alpha_lr(epoch: int, base: float = 1e-4, halve_every: int = 20) -> float:
    """Step size of the alpha update at ``epoch``: halved at every positive multiple of
    ``halve_every`` (before that epoch's update), i.e. base * 0.5 ** (epoch // halve_every)."""
    return base if halve_every <= 0 else base * 0.5 ** (epoch // halve_every)


def learnable_update(alpha_al: float, s: float, lr: float, lo: float = 0.05, hi: float = 0.95) -> tuple[float, float]:
    """One learnable step: alpha_al <- clip(alpha_al - lr * s, lo, hi); returns (alpha_ce, alpha_al)."""
    new = min(hi, max(lo, alpha_al - lr * s))
    return 1.0 - new, new


def scheduled_alphas(
    schedule: str,
    epoch: int,
    total_epochs: int,
    *,
    rescale: bool = True,
    clamp: bool = True,
    rate: float = 0.3,
    lo: float = 0.05,
    hi: float = 0.95,
) -> tuple[float, float]:
    """(alpha_ce, alpha_al) of the ``fitted`` or ``exp`` schedule at ``epoch``."""
    if schedule == "fitted":
        ce = fitted_alpha_ce(epoch, total_epochs, rescale, clamp)
        return ce, 1.0 - ce
    if schedule == "exp":
        al = exp_alpha_al(epoch, rate, lo, hi)
        return 1.0 - al, al
    raise ValueError(f"schedule {schedule!r} is not a pure function of the epoch")


def default_loss_scale(schedule: str) -> float:
    """2 for the released scripts (fitted, learnable), 1 for the exponential one."""
    return 1.0 if schedule == "exp" else 2.0


def mixkl_pair(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """The released alignment of one pair: (KL(m || p) + KL(m || q)) / 2, m = (p + q) / 2,
    batch mean, in fp32 from log-softmax (gradients flow through m too)."""
    lp = torch.log_softmax(logits_p.float(), dim=1)
    lq = torch.log_softmax(logits_q.float(), dim=1)
    log_m = torch.logsumexp(torch.stack((lp, lq)), dim=0) - math.log(2.0)
    m = log_m.exp()
    kl_mp = (m * (log_m - lp)).sum(1)
    kl_mq = (m * (log_m - lq)).sum(1)
    return 0.5 * (kl_mp + kl_mq).mean()


def infonce_pair(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE of one pair on L2-normalised features: sample i's other modality is
    its positive, the other samples' are its negatives, both directions averaged."""
    a = F.normalize(z_a.float(), dim=1)
    b = F.normalize(z_b.float(), dim=1)
    sim = a @ b.t() / temperature
    target = torch.arange(sim.shape[0], device=sim.device)
    return 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target))


def alignment(tensors: Sequence[torch.Tensor], kind: str = "mixkl", temperature: float = 0.1) -> torch.Tensor:
    """A over the modalities: the pair term averaged over unordered pairs (logits for mixkl,
    features for infonce)."""
    pair = mixkl_pair if kind == "mixkl" else (lambda a, b: infonce_pair(a, b, temperature))
    terms = [pair(a, b) for a, b in itertools.combinations(tensors, 2)]
    return terms[0] if len(terms) == 1 else torch.stack(terms).mean()


def fused_ce(logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """CE of the mean of the unimodal logits (LFM's fused prediction), in fp32."""
    return F.cross_entropy(torch.stack([lg.float() for lg in logits]).mean(0), labels)


def lfm_loss(ce: torch.Tensor, align: torch.Tensor, alpha_ce: float, alpha_al: float, scale: float = 2.0) -> torch.Tensor:
    """L = scale * (alpha_ce * CE + alpha_al * A)."""
    return scale * (alpha_ce * ce + alpha_al * align)


class SecondOrderError(RuntimeError):
    """A gradient that cannot be differentiated again (found before it silently drops terms)."""


# autograd nodes that stand for a backward that cannot be differentiated: once_differentiable
# custom functions (torch::autograd::Error, with no edges, so autograd would silently prune
# them and drop their terms) and missing derivative formulas (torch::autograd::NotImplemented)
ERROR_NODE_MARKERS = ("autograd::Error", "autograd::NotImplemented")


def second_order_problem(grads: Sequence[torch.Tensor | None]) -> str | None:
    """Why the first-order ``grads`` (taken with create_graph=True) cannot be differentiated
    again, or None: a gradient without a graph, or an error node anywhere in their graph."""
    stack = []
    for g in grads:
        if g is None:
            continue
        if not g.requires_grad:
            return "a parameter gradient comes back without a graph (its backward is not differentiable)"
        stack.append(g.grad_fn)
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = node.name()
        if any(marker in name for marker in ERROR_NODE_MARKERS):
            return f"its backward holds a node that cannot be differentiated again ({name})"
        stack.extend(fn for fn, _ in node.next_functions)
    return None


def hessian_vector_mean(
    loss_total: torch.Tensor,
    loss_cls: torch.Tensor,
    params: Sequence[torch.Tensor],
    read: Sequence[int] = (0,),
) -> torch.Tensor:
    """s = mean of v over ``params[read]``, v = H_total g_cls: the gradient of
    <grad L_total, g_cls> with g_cls = grad L_cls held constant (the learnable update's signal).

    Raises RuntimeError (SecondOrderError when found before the double backward) when some
    part of the graph cannot take a double backward. Unused parameters count as zero.
    """
    params = list(params)
    g_total = torch.autograd.grad(loss_total, params, create_graph=True, allow_unused=True)
    problem = second_order_problem(g_total)
    if problem is not None:
        raise SecondOrderError(problem)
    g_cls = torch.autograd.grad(loss_cls, params, retain_graph=True, allow_unused=True)
    outs, vecs = [], []
    for gt, gc in zip(g_total, g_cls, strict=True):
        if gt is None:
            continue
        outs.append(gt)
        vecs.append(torch.zeros_like(gt) if gc is None else gc.detach())
    targets = [params[i] for i in read]
    if not outs:
        return torch.zeros((), device=targets[0].device)
    v = torch.autograd.grad(outs, targets, grad_outputs=vecs, allow_unused=True)
    flat = torch.cat([(torch.zeros_like(p) if vi is None else vi).float().reshape(-1) for p, vi in zip(targets, v, strict=True)])
    return flat.mean()


def hvp_train_mode(mode: str, epoch: int) -> bool:
    """Model mode of the HVP forward: the official script is in train mode at epoch 0 and in
    eval mode afterwards (left so by its validation)."""
    if mode == "official":
        return epoch == 0
    return mode == "train"


def lr_scale_epoch_start(epoch: int, step_size: int, gamma: float) -> float:
    """Factor that moves StepLR's decay one epoch early (official: stepped at epoch start):
    the rate of epoch e becomes lr0 * gamma ** ((e + 1) // step_size)."""
    return gamma ** ((epoch + 1) // step_size - epoch // step_size)


def take_rows(batch: Any, n: int, size: int | None = None) -> Any:
    """The first ``n`` samples of a (nested) batch: tensors along dim 0, and lists/tuples
    whose length is the batch size (per-sample lists); other containers recursively."""
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, Mapping):
        if size is None and isinstance(batch.get("label"), torch.Tensor):
            size = len(batch["label"])
        return {k: take_rows(v, n, size) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        if size is not None and len(batch) == size and not any(isinstance(v, torch.Tensor) for v in batch):
            return type(batch)(batch[:n])
        return type(batch)(take_rows(v, n, size) for v in batch)
    return batch


def double_backward_failures(model: Any, batch: Mapping[str, Any]) -> dict[str, str]:
    """Run a second-order probe through each encoder alone; returns {modality: why} for
    those that cannot take a double backward (an error, a gradient without a graph, or an
    error node in the gradient's graph)."""
    failures: dict[str, str] = {}
    for m, enc in model.encoders.items():
        params = [p for p in enc.parameters() if p.requires_grad]
        if not params:
            continue
        try:
            z = enc(batch[m]).float()
            grads = torch.autograd.grad((z * z).mean(), params, create_graph=True, allow_unused=True)
            problem = second_order_problem(grads)
            if problem is not None:
                failures[m] = problem
                continue
            used = [g for g in grads if g is not None]
            torch.autograd.grad(used, params, grad_outputs=[g.detach() for g in used], allow_unused=True)
        except RuntimeError as exc:
            failures[m] = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return failures


def official_init(module: nn.Module) -> None:
    """LFM's initialisation (the official code's): Kaiming-normal (fan_out, relu) conv weights, Xavier-normal
    linear weights with zero bias, BatchNorm weight 1 and bias 0."""
    for mod in module.modules():
        if isinstance(mod, nn.Linear):
            nn.init.xavier_normal_(mod.weight)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.affine:
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)


# ---- the plugin ----------------------------------------------------------------------------
@register_method("lfm", "LFM: scheduled mix of mean-logit CE and cross-modal alignment (NeurIPS 2024)")
class LFM(Method):
    name = "lfm"
    description = "LFM: scheduled mix of mean-logit CE and cross-modal alignment (NeurIPS 2024)"
    fusion = "mean_logits"  # informational: build_fusion returns None
    options = OPTIONS
    dataset_defaults = {"cremad": dict(PAPER_CREMAD)}
    min_modalities = 2
    key_diagnostic = "align"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.schedule = str(self._opt("alpha_schedule"))
        self.align_kind = str(self._opt("align"))
        self.temperature = float(self._opt("infonce_temperature"))
        scale = self._opt("loss_scale")
        self.loss_scale = default_loss_scale(self.schedule) if scale is None else float(scale)
        self.lo, self.hi = float(self._opt("alpha_min")), float(self._opt("alpha_max"))
        if self.lo > self.hi:
            raise ConfigError(
                f"Method 'lfm': alpha_min ({self.lo:g}) is above alpha_max ({self.hi:g}); they clip "
                f"alpha_al, e.g. --set alpha_min=0.05 alpha_max=0.95."
            )
        if self._opt("lr_decay_timing") == "epoch_start" and self.cfg.get("scheduler", "step") != "step":
            raise ConfigError(
                f"Method 'lfm': lr_decay_timing=epoch_start moves StepLR's decay one epoch early (the "
                f"official script), but this run's scheduler is '{self.cfg.get('scheduler')}'. Use "
                f"--set scheduler=step or lr_decay_timing=trainer."
            )
        # the held-out slice of train exists only for the learnable rule (the trainer reads this)
        self.heldout_fraction = float(self._opt("heldout_fraction")) if self.schedule == "learnable" else 0.0
        self.modalities: list[str] = []
        if self.schedule == "learnable":
            self.alpha_al = float(self._opt("alpha_al_init"))
            self.alpha_ce = 1.0 - self.alpha_al
        else:  # the epoch-0 weights until the first epoch hook sets them
            self.alpha_ce, self.alpha_al = self._scheduled(0)
        self.alpha_lr = float(self._opt("alpha_lr"))
        self.hvp_skipped = 0
        self.last_s: float | None = None
        self.alpha_epoch: int | None = None  # the epoch whose weights alpha_* hold

    def _opt(self, key: str) -> Any:
        """Option value; the declared default when ``cfg`` lacks it (a method built by hand)."""
        return self.cfg.get(key, OPTIONS[key].default)

    # ---- declarations and set-up ----------------------------------------------------------
    def trains_unimodal_heads(self) -> bool:
        return True  # the CE on the mean of the unimodal logits trains every head

    def check_modalities(self, available: Sequence[str]) -> list[str]:
        used = super().check_modalities(available)
        self.modalities = used
        return used

    def build_fusion(self, dims: Mapping[str, int], num_classes: int) -> None:
        """No fused head: the fused logits are the mean of the unimodal heads' logits."""
        self.modalities = list(dims)
        if self.align_kind == "infonce" and len(set(dims.values())) != 1:
            raise ConfigError(
                f"Method 'lfm': align=infonce compares the modalities' features, so every encoder "
                f"must emit the same width, but they emit {dict(dims)}. Set --set embed_dim=N or "
                f"use align=mixkl (on the logits)."
            )
        return None

    def configure_model(self, model: Any) -> None:
        if self._opt("weight_init") != "official":
            return
        table = self.cfg.get("backbone") or {}
        for m in model.modalities:
            entry = table.get(m) or {}
            if not (isinstance(entry, Mapping) and entry.get("weights")):
                official_init(model.encoders[m])
            official_init(model.uni_heads[m])

    def on_fit_start(self) -> None:
        if self.schedule != "learnable":
            return
        assert self.trainer is not None
        n = len(self.trainer.heldout())
        if n < 2:
            raise ConfigError(
                f"Method 'lfm' (alpha_schedule=learnable) holds out heldout_fraction="
                f"{self.heldout_fraction:g} of train for its Hessian-vector product, which is {n} "
                f"sample(s) here; it needs at least 2 (official: 8 of 16). Raise --set heldout_fraction=..."
            )

    # ---- the weights of each epoch --------------------------------------------------------
    def on_train_epoch_start(self, epoch: int) -> None:
        assert self.trainer is not None
        if self._opt("lr_decay_timing") == "epoch_start":
            scale = lr_scale_epoch_start(epoch, int(self.cfg["step_size"]), float(self.cfg["gamma"]))
            for i in range(len(self.optimizer.param_groups)):
                self.trainer.set_lr_scale(self.optimizer, i, scale)
        if self.schedule == "learnable":
            self._learnable_step(epoch)
        else:
            self.alpha_ce, self.alpha_al = self._scheduled(epoch)
        self.alpha_epoch = epoch
        self.log(alpha_ce=self.alpha_ce, alpha_al=self.alpha_al)

    def _scheduled(self, epoch: int) -> tuple[float, float]:
        return scheduled_alphas(
            self.schedule, epoch, int(self.cfg.get("epochs") or FITTED_EPOCHS),
            rescale=bool(self._opt("fitted_rescale")), clamp=bool(self._opt("fitted_clamp")),
            rate=float(self._opt("exp_rate")), lo=self.lo, hi=self.hi,
        )

    def _learnable_step(self, epoch: int) -> None:
        """The official per-epoch update from the HVP on the held-out rows."""
        assert self.trainer is not None and self.model is not None
        lr = learnable_alpha_lr(epoch, self.alpha_lr, int(self._opt("alpha_lr_halve_every")))
        s, rows = None, 0
        for batch in self.trainer.iterate("heldout", batches=1, grad=True, shuffle=False, tag="lfm_hvp",
                                          train_mode=hvp_train_mode(str(self._opt("hvp_mode")), epoch)):
            batch = take_rows(batch, int(self._opt("hvp_samples")))
            rows = len(batch["label"])
            with self._second_order_kernels():
                s = self._hvp(batch)
        value = float(s) if s is not None else math.nan  # one host sync per epoch
        if math.isfinite(value):
            self.alpha_ce, self.alpha_al = learnable_update(self.alpha_al, value, lr, self.lo, self.hi)
        else:
            self.hvp_skipped += 1
        self.last_s = value
        self.log(hvp_s=value, alpha_lr=lr, hvp_rows=float(rows), hvp_skipped=float(self.hvp_skipped))

    def _second_order_kernels(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        if self._opt("hvp_math_kernels"):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        return stack

    def _losses(self, feats: Mapping[str, torch.Tensor], uni: Mapping[str, torch.Tensor],
                y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = [uni[m] for m in self.modalities]
        ce = fused_ce(logits, y)
        source = logits if self.align_kind == "mixkl" else [feats[m] for m in self.modalities]
        return ce, alignment(source, self.align_kind, self.temperature)

    def _hvp(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """s on ``batch`` in fp32 (no autocast); a backbone without a double backward is refused."""
        assert self.model is not None
        params = [p for p in self.model.parameters() if p.requires_grad]
        read = range(len(params)) if self._opt("hvp_read") == "all" else (0,)
        try:
            feats = self.model.encode(batch)
            ce, align = self._losses(feats, self.model.unimodal_logits(feats), batch["label"])
            return hessian_vector_mean(self.alpha_ce * ce + self.alpha_al * align, ce, params, read)
        except RuntimeError as exc:
            failures = double_backward_failures(self.model, batch)
            if not failures and not isinstance(exc, SecondOrderError):
                raise
            where = ("; ".join(f"backbone '{self._backbone_name(m)}' of modality '{m}' ({why})"
                               for m, why in failures.items())
                     or f"the model outside its encoders ({exc})")
            hint = "" if self._opt("hvp_math_kernels") else " (or try --set hvp_math_kernels=true)"
            raise UnsupportedError(
                f"Method 'lfm' with alpha_schedule=learnable needs second-order gradients (a "
                f"Hessian-vector product each epoch), but a double backward is impossible through "
                f"{where}. Use alpha_schedule=fitted or exp, or another backbone{hint}."
            ) from exc

    def _backbone_name(self, m: str) -> str:
        entry = (self.cfg.get("backbone") or {}).get(m)
        name = entry.get("name") if isinstance(entry, Mapping) else entry
        assert self.model is not None
        return str(name or type(self.model.encoders[m]).__name__)

    # ---- training -------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        assert self.model is not None
        feats = self.model.encode(batch)
        uni = self.model.unimodal_logits(feats)
        y = batch["label"]
        ce, align = self._losses(feats, uni, y)
        loss = lfm_loss(ce, align, self.alpha_ce, self.alpha_al, self.loss_scale)
        with torch.no_grad():
            per = {f"ce_{m}": F.cross_entropy(uni[m].float(), y) for m in self.modalities}
            self.log(ce=ce.detach(), align=align.detach(), nonfinite=(~torch.isfinite(loss)).float(), **per)
        return loss

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule,
            "alpha_ce": self.alpha_ce,
            "alpha_al": self.alpha_al,
            "alpha_epoch": self.alpha_epoch,
            "hvp_skipped": self.hvp_skipped,
            "last_s": self.last_s,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if state.get("schedule") != self.schedule:
            raise ConfigError(
                f"Method 'lfm': the checkpoint was written with alpha_schedule={state.get('schedule')}, "
                f"this run has {self.schedule}. Resume with the same schedule, or start fresh."
            )
        self.alpha_ce = float(state["alpha_ce"])
        self.alpha_al = float(state["alpha_al"])
        self.alpha_epoch = state.get("alpha_epoch")
        self.hvp_skipped = int(state.get("hvp_skipped", 0))
        self.last_s = state.get("last_s")

    # ---- reporting ------------------------------------------------------------------------
    def label(self) -> str:
        tags = []
        if self.schedule != "fitted":
            tags.append(self.schedule)
        if self.align_kind != "mixkl":
            tags.append(f"InfoNCE t={self.temperature:g}")
        if abs(self.loss_scale - default_loss_scale(self.schedule)) > 1e-12:
            tags.append(f"scale={self.loss_scale:g}")
        if self.schedule == "fitted" and not self._opt("fitted_rescale"):
            tags.append("unrescaled")
        if self.schedule == "fitted" and not self._opt("fitted_clamp"):
            tags.append("unclamped")
        if self._opt("weight_init") == "official":
            tags.append("official init")
        return "LFM" if not tags else f"LFM ({', '.join(tags)})"

    def record_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "inference_rule": "mean of the unimodal heads' logits",
            "alpha_schedule": self.schedule,
            "align": self.align_kind,
            "loss_scale": self.loss_scale,
            "lr_decay_timing": self._opt("lr_decay_timing"),
            "weight_init": self._opt("weight_init"),
        }
        if self.schedule == "learnable":
            info["hvp"] = {
                "heldout_fraction": self.heldout_fraction,
                "samples": int(self._opt("hvp_samples")),
                "mode": self._opt("hvp_mode"),
                "read": self._opt("hvp_read"),
                "math_kernels": bool(self._opt("hvp_math_kernels")),
                "precision": "fp32",
            }
        return info
