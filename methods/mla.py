"""MLA: multimodal learning with alternating unimodal adaptation (Zhang et al., CVPR 2024).

Documented in the documentation's mla page; written from
the paper and checked against ``main.py`` / ``utils/utils.py`` of
Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation (the official code) and
BalanceBenchmark's ``MLA_trainer.py``.

Model: the dataset's encoders and ONE linear head ``h(z) = W z + b`` shared by every modality
(``model.extra["shared_head"]``); no fused head is built (``build_fusion`` returns None), the
model's unimodal heads are never trained, and the per-modality logits that evaluation reports
are the shared head on each modality's features (``per_modality_source() == "method"``).

Training (manual optimisation, official ``main.py`` ``train_epoch``): the encoders run once per batch; then, for
each modality m in turn (the run's modality order, or ``mla_order``):
``L_m = CE(h(z_m), y)``; backward (it reaches only theta_m and the head: every gradient is
None at the start of the batch and after each step); the shared head's weight gradient is
modified (``mla_gm``, below); one optimizer step. So a batch makes M optimizer steps with one
optimizer (the head's momentum buffer is shared by the modalities). h(z_m) is evaluated after
the previous sub-step's step, as in the official code; each head forward runs in its own
autocast block, so the bf16 weight cast that autocast caches is never a stale copy of a head
that a sub-step has already moved.

Gradient modification of the shared head's weight (``mla_gm``; an update counter counts the
sub-steps of the run; ``lambda = 0.1 ** (1 + i / N)`` with i the batch index in the epoch and N
the batches this epoch trains; r = the detached fp32 batch mean of the current modality's
features):

* ``owm`` (default; our reading of the paper, a **guess**, with the scalar
  denominator as a deliberate fix): before every sub-step except the first of the
  run, ``grad W <- grad W @ P``; after modality m's sub-step, ``k = P r``,
  ``P <- P - k k^T / (lambda + r^T k)``, ``P <- P / ||P||_F``. P starts as the d x d identity
  (d of the run, not the official hard-coded 512) and is never reset.
* ``none``: **as released** (official ``utils/utils.py``: the hook looks for a parameter named
  ``module.weight`` that a Linear layer does not have, so the modification never runs): plain
  alternating unimodal steps through the shared head. Label "MLA (as released)".
* ``bb_additive``: BalanceBenchmark's port, which does run: in every sub-step but the run's
  first, P is first updated with the CURRENT modality's r by the released element-wise rule
  (``P - (k k^T) / (lambda + k r)``, where ``k r`` is the d x d outer product, then the
  Frobenius normalisation), and the projected gradient is ADDED: ``grad W <- grad W + grad W @ P^T``.
* ``elementwise``: the release's rule as it would run if its name check matched: the same
  element-wise update of P with the current r, then ``grad W <- grad W @ P^T`` (replace).

**What the default ``owm`` does to the shared head in a real run.** The projection removes
from the head's weight gradient every feature direction seen before, so it keeps only a small
part of that gradient: measured as ``head_grad_kept`` (||grad W after|| / ||grad W before||,
epoch means, seed 0, each dataset's default recipe), 6-12 % in the first epoch and 0.6-1.7 %
after a few: synthetic 9.3 % in epoch 0, then 1.4-1.7 % from epoch 2 to 19; mfeat zer+mor
11.7 % falling to 0.6 % by epoch 30; mfeat fac+mor 12.1 % to 0.7 %; avdigits (bf16) 6.3 % to
0.7 % by epoch 13. The shared head therefore learns one to two orders of magnitude slower
than the recipe's rate while the encoders train at full rate: "MLA" at its defaults is MLA with
a nearly frozen shared head after its first epochs, a reconstruction of the paper, not the
released code (where the modification never runs). ``mla_gm=none``, the release, is run as its
own row in the benchmark (``benchmarks/grids/benchmark.yaml``, "MLA (as released)").

The bias gradient is never touched. All projector arithmetic is fp32 on the device (no host
sync): ``owm`` computes its update in the algebraically equal Joseph form
``(I - g r^T) P (I - r g^T) + lambda g g^T`` with ``g = k / (lambda + r^T k)`` and symmetrises
it, so P stays symmetric positive semi-definite in floating point (the plain subtraction loses
PSD by cancellation when ``r^T P r >> lambda``). NaN guard: an update of P that is not finite
(the element-wise rule can divide by ~0) is dropped (P keeps its value) and counted
(``gm_nonfinite`` per step, the run total in the method state).

Inference (official ``main.py`` ``valid``): ``o_m = h(z_m)``; ``mla_fusion=dynamic`` (default, the paper's
rule): ``o = sum_m lambda_m o_m`` with ``lambda_m = softmax_m(-H_m)`` and ``H_m`` the entropy of
softmax(o_m) -- logits are weighted, not probabilities. ``mla_entropy_scope=sample`` (default,
as BalanceBenchmark) gives one weight per sample; ``batch`` replicates the official quirk
(softmax over the BATCH axis, entropy summed over the whole batch: one weight per modality per
evaluation batch, so results depend on the evaluation batch size). ``mla_fusion=fixed``:
``o = sum_m w_m o_m`` with ``mla_fixed_weights`` (official: CREMA-D audio 0.55 / visual 0.45,
IEMOCAP audio 0.35 / visual 0.25 / text 0.4; 1/M elsewhere).

Departures from the official code:

* ``mla_gm=owm`` is the default although the release never modifies the gradient (our
  decision: "MLA" includes its gradient modification; ``none`` must also be run and reported).
* zero_grad semantics: each sub-step updates only theta_m and the head (torch >= 2,
  gradients set to None); ``mla_legacy_zero_grad=true`` emulates the pinned torch 1.8: encoders
  already stepped earlier in the same batch get a zero-gradient step (momentum and weight decay
  still move them); all gradients are None at the end of every batch either way.
* Entropies use ``log_softmax`` (the official ``log(softmax)`` gives NaN where a probability
  underflows to 0; identical numbers otherwise).
* P is d x d of the run (official: hard-coded 512, which would fail on the 768-d runs).
* The shared head keeps PyTorch's default Linear initialisation (the official CREMA-D run
  re-initialises linear layers Xavier-normal; the encoders are the dataset's).
* The train loss recorded is the mean of the M sub-step CEs (official: ``0.55 L_a + 0.45 L_v``
  for logging only; nothing trains on it).
* ``N`` of the lambda schedule is the number of batches the epoch trains (the official
  ``len(dataloader)``; they differ only under ``limit_train_batches``).

Open question, decided: the paper's exact GM formula and ordering are unknown; we
take our ``owm`` reconstruction (update P after the sub-step with that modality's mean
feature, so a modality's gradient is projected away from the feature directions seen BEFORE
it, the standard OWM order) and keep the released/BalanceBenchmark orderings as variants.

Diagnostics per step: ``loss_<m>`` (each sub-step's CE); with a GM rule also
``head_grad_kept_<m>`` (``||grad W after|| / ||grad W before||`` of that sub-step, 1 where not
modified), ``head_grad_kept`` (their mean; the key diagnostic), ``p_trace`` (trace of P after the
batch) and ``gm_nonfinite``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.config import Option, Search
from mmbalance.errors import ConfigError
from mmbalance.method import Method, Prediction
from mmbalance.registry import register_method

GM_RULES = ("owm", "none", "bb_additive", "elementwise")

OPTIONS: dict[str, Option] = {
    "mla_gm": Option(
        "owm", "gradient modification of the shared head: owm (scalar-denominator projection, P "
        "updated after each sub-step), none (as released: never runs), bb_additive "
        "(BalanceBenchmark), elementwise (the released rule made to run)", choices=GM_RULES),
    # search range: the paper's entropy-weighted inference vs its fixed-weight ablation
    "mla_fusion": Option("dynamic", "inference: entropy-weighted (dynamic) or fixed-weight sum of the "
                         "shared head's per-modality logits", choices=("dynamic", "fixed"), search=Search(choices=('dynamic', 'fixed'))),
    "mla_entropy_scope": Option("sample", "dynamic fusion weights per test sample, or per test batch "
                                "(the official quirk)", choices=("sample", "batch")),
    "mla_fixed_weights": Option(None, "fixed fusion weights {modality: w} (default 1/M)", type=dict),
    "mla_legacy_zero_grad": Option(False, "emulate torch 1.8 zero_grad: encoders stepped earlier in the "
                                   "batch get a zero-gradient step (momentum, weight decay)"),
    "mla_order": Option(None, "order of the unimodal sub-steps (comma list); default the run's "
                        "modality order (official: audio, visual, text)", type=list),
}

PAPER_WEIGHTS = {
    "cremad": {"audio": 0.55, "visual": 0.45},
    "iemocap": {"audio": 0.35, "visual": 0.25, "text": 0.4},
}


# ---- the mathematics (pure functions) ------------------------------------------------------
def gm_lambda(batch_idx: int, n_batches: int) -> float:
    """The regulariser of the projector update: ``0.1 ** (1 + i / N)`` (0.1 down to ~0.01)."""
    return 0.1 ** (1.0 + batch_idx / max(1, n_batches))


def owm_update(P: torch.Tensor, r: torch.Tensor, lam: float) -> torch.Tensor:
    """``P - k k^T / (lam + r^T k)`` with ``k = P r``, then ``/ ||.||_F``; fp32.

    Computed in the equal Joseph form ``(I - g r^T) P (I - r g^T) + lam g g^T`` with
    ``g = k / (lam + r^T k)`` (a congruence plus a PSD term, so rounding keeps P positive
    semi-definite) and symmetrised. ``P`` must be symmetric (it is, from the identity on).
    """
    P = P.float()
    r = r.float().reshape(-1)
    k = P @ r
    g = k / (lam + r @ k)
    a = P - torch.outer(g, k)  # (I - g r^T) P, as r^T P = k^T
    new = a - torch.outer(a @ r, g) + lam * torch.outer(g, g)
    new = 0.5 * (new + new.t())
    return new / torch.linalg.matrix_norm(new)


def elementwise_update(P: torch.Tensor, r: torch.Tensor, lam: float) -> torch.Tensor:
    """The released ``GSPlugin`` rule (official ``utils/utils.py``): ``k = P r^T``; ``P - (k k^T) / (lam + k r)``
    ELEMENT-WISE, ``k r`` being the d x d outer product ``k_i r_j``; then ``/ ||.||_F``; fp32."""
    P = P.float()
    r = r.float().reshape(-1)
    k = P @ r
    new = P - torch.outer(k, k) / (lam + torch.outer(k, r))
    return new / torch.linalg.matrix_norm(new)


def project_head_grad(grad: torch.Tensor, P: torch.Tensor, additive: bool = False) -> torch.Tensor:
    """``grad @ P^T`` (the projection replaces the gradient), or ``grad + grad @ P^T``
    (BalanceBenchmark's additive variant); fp32. ``grad`` is the head weight's (C, d)."""
    g = grad.float()
    proj = g @ P.float().t()
    return g + proj if additive else proj


def batch_mean_feature(z: torch.Tensor) -> torch.Tensor:
    """r: the detached fp32 batch mean (d,) of one modality's features."""
    return z.detach().float().mean(0)


def entropy(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Entropy of softmax(logits) along ``dim`` (summed over it), fp32, NaN-free."""
    logp = torch.log_softmax(logits.float(), dim=dim)
    return -(logp.exp() * logp).sum(dim)


def entropy_weights(logits: Sequence[torch.Tensor], scope: str = "sample") -> torch.Tensor:
    """The dynamic fusion weights (M, B): ``softmax_m(-H_m)``.

    ``sample``: ``H_m(i)`` of each sample's class distribution. ``batch`` (official quirk):
    softmax over the batch axis, entropy summed over the whole (B, C) array, so one weight per
    modality, repeated over the batch.
    """
    if scope == "sample":
        h = torch.stack([entropy(o, dim=1) for o in logits])  # (M, B)
        return torch.softmax(-h, dim=0)
    if scope == "batch":
        h = torch.stack([entropy(o, dim=0).sum() for o in logits])  # (M,)
        w = torch.softmax(-h, dim=0)
        return w.unsqueeze(1).expand(len(logits), logits[0].shape[0])
    raise ValueError(f"unknown entropy scope {scope!r}")


def weighted_logits(logits: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``o = sum_m w_m o_m`` (fp32); ``weights`` (M, B) per sample or (M,) fixed."""
    w = weights.float()
    if w.dim() == 1:
        w = w.unsqueeze(1).expand(len(logits), logits[0].shape[0])
    return sum(w[i].unsqueeze(1) * o.float() for i, o in enumerate(logits))


# ---- the plugin ----------------------------------------------------------------------------
@register_method("mla", "MLA: alternating unimodal steps through one shared head (CVPR 2024)")
class MLA(Method):
    name = "mla"
    description = "MLA: alternating unimodal steps through one shared head (CVPR 2024)"
    options = OPTIONS
    dataset_defaults = {ds: {"mla_fixed_weights": dict(w)} for ds, w in PAPER_WEIGHTS.items()}
    min_modalities = 2
    manual_optimization = True
    fusion = "none"  # informational: build_fusion returns None
    key_diagnostic = "head_grad_kept"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.gm = str(self._opt("mla_gm"))
        self.order: list[str] = []
        self.fixed_weights: dict[str, float] = {}
        self.P: torch.Tensor | None = None
        self.updates = 0  # sub-steps of the run (the official update counter)
        self.nonfinite: torch.Tensor | None = None  # rejected P updates, run total (device)
        self._pending_state: Mapping[str, Any] | None = None

    def _opt(self, key: str) -> Any:
        """Option value; the declared default when ``cfg`` lacks it (a method built by hand)."""
        return self.cfg.get(key, OPTIONS[key].default)

    # ---- set-up ---------------------------------------------------------------------------
    def check_modalities(self, available: Sequence[str]) -> list[str]:
        used = super().check_modalities(available)
        order = self._opt("mla_order")
        if order:
            order = [str(m) for m in order]
            if sorted(order) != sorted(used):
                raise ConfigError(
                    f"Method 'mla': mla_order={order} must list each of the run's modalities "
                    f"({', '.join(used)}) exactly once, e.g. --set mla_order={','.join(used)}."
                )
        self.order = list(order) if order else list(used)
        if self._opt("mla_fusion") == "fixed":
            self.fixed_weights = self._check_fixed_weights(used)
        return used

    def _check_fixed_weights(self, used: Sequence[str]) -> dict[str, float]:
        given = self._opt("mla_fixed_weights")
        if not given:
            return {m: 1.0 / len(used) for m in used}
        given = {str(k): v for k, v in dict(given).items()}
        missing = [m for m in used if m not in given]
        extra = [m for m in given if m not in used]
        example = "{" + ", ".join(f"{m}: {1.0 / len(used):.3g}" for m in used) + "}"
        if missing or extra:
            raise ConfigError(
                f"Method 'mla': mla_fixed_weights {given} must give one weight per modality of the "
                f"run ({', '.join(used)})"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; not in the run: {', '.join(extra)}" if extra else "")
                + f". Set them with --set 'mla_fixed_weights={example}', or use mla_fusion=dynamic."
            )
        out: dict[str, float] = {}
        for m in used:
            v = given[m]
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"Method 'mla': mla_fixed_weights[{m}] = {v!r} must be a finite number >= 0.")
            out[m] = float(v)
        if sum(out.values()) <= 0:
            raise ConfigError("Method 'mla': mla_fixed_weights are all 0; give at least one positive weight.")
        return out

    def build_fusion(self, dims: Mapping[str, int], num_classes: int) -> None:
        """No fused head: MLA's one shared head lives in ``model.extra`` (configure_model)."""
        widths = set(dims.values())
        if len(widths) != 1:
            raise ConfigError(
                f"Method 'mla' passes every modality's features through ONE shared head, so every "
                f"encoder must emit the same width, but they emit {dict(dims)}. Set a common width "
                f"with --set embed_dim=N (a projection is added) or choose backbones of equal width."
            )
        return None

    def configure_model(self, model: Any) -> None:
        widths = set(model.dims.values())
        d = widths.pop()
        model.extra["shared_head"] = nn.Linear(d, model.num_classes)
        if not self.order:
            self.order = list(model.modalities)
        dev = self.trainer.device if self.trainer is not None else torch.device("cpu")
        self.P = torch.eye(d, dtype=torch.float32, device=dev) if self.gm != "none" else None
        self.nonfinite = torch.zeros((), dtype=torch.float32, device=dev)

    def configure_optimizers(self) -> Any:
        """The dataset recipe over the encoders and the shared head (the unimodal heads are
        never trained), one named group each, so ``lrs`` show them apart."""
        assert self.trainer is not None and self.model is not None
        groups = [{"params": self.model.encoder_params(m), "name": f"encoder.{m}"} for m in self.model.modalities]
        groups.append({"params": list(self.head.parameters()), "name": "shared_head"})
        return self.trainer.default_optimizers(groups)

    @property
    def head(self) -> nn.Linear:
        assert self.model is not None
        return self.model.extra["shared_head"]

    def trains_unimodal_heads(self) -> bool:
        return False  # the model's unimodal heads are unused; the shared head is MLA's

    def per_modality_source(self) -> str:
        return "method"  # the shared head on each modality's features (predict)

    def on_fit_start(self) -> None:
        if self._pending_state is not None:
            pending, self._pending_state = self._pending_state, None
            self.load_state_dict(pending)

    # ---- training -------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        assert self.model is not None and self.optimizer is not None
        with self.autocast():
            feats = self.model.encode(batch)
        y = batch["label"]
        lam = gm_lambda(batch_idx, self.num_training_batches)
        head_w = self.head.weight
        logs: dict[str, torch.Tensor] = {}
        losses, kept = [], []
        rejected = torch.zeros((), dtype=torch.float32, device=y.device)
        for k, m in enumerate(self.order):
            with self.autocast():  # a fresh block per sub-step: no stale cached cast of the head
                logits = self.head(feats[m])
            loss = F.cross_entropy(logits.float(), y)
            self.manual_backward(loss)
            if self._opt("mla_legacy_zero_grad"):
                self._legacy_zero_grads(self.order[:k])
            if self.P is not None:
                r = batch_mean_feature(feats[m])
                ratio, bad = self._modify_head_grad(head_w, r, lam)
                kept.append(ratio)
                rejected = rejected + bad
            self.optimizer_step(self.optimizer)
            if self.P is not None and self.gm == "owm":
                rejected = rejected + self._update_P(owm_update, r, lam)
            self.updates += 1
            losses.append(loss.detach())
            logs[f"loss_{m}"] = loss.detach()
        if self.P is not None:
            for m, ratio in zip(self.order, kept, strict=True):
                logs[f"head_grad_kept_{m}"] = ratio
            logs["head_grad_kept"] = torch.stack(kept).mean()
            logs["p_trace"] = torch.diagonal(self.P).sum()
            logs["gm_nonfinite"] = rejected
            assert self.nonfinite is not None
            self.nonfinite = self.nonfinite + rejected
        self.log(**logs)
        return torch.stack(losses).mean()

    def _legacy_zero_grads(self, stepped: Sequence[str]) -> None:
        """torch 1.8 ``zero_grad``: the encoders stepped earlier in this batch hold zero
        gradients (not None), so this sub-step's SGD step still applies momentum and weight
        decay to them."""
        assert self.model is not None
        for m in stepped:
            for p in self.model.encoder_params(m):
                if p.grad is None and p.requires_grad:
                    p.grad = torch.zeros_like(p)

    def _update_P(self, rule: Any, r: torch.Tensor, lam: float) -> torch.Tensor:
        """P <- rule(P, r, lam) where finite; returns 1.0 (as a tensor) when it was rejected."""
        assert self.P is not None
        new = rule(self.P, r, lam)
        ok = torch.isfinite(new).all()
        self.P = torch.where(ok, new, self.P)
        return (~ok).float()

    @torch.no_grad()
    def _modify_head_grad(self, w: nn.Parameter, r: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The GM rule on the shared head's weight gradient for this sub-step (none on the run's
        first sub-step). Returns (||grad after|| / ||grad before||, rejected P updates)."""
        assert self.P is not None
        one = torch.ones((), dtype=torch.float32, device=r.device)
        zero = torch.zeros((), dtype=torch.float32, device=r.device)
        if self.updates == 0 or w.grad is None:
            return one, zero
        bad = zero
        if self.gm in ("bb_additive", "elementwise"):  # released order: update P with r first
            bad = self._update_P(elementwise_update, r, lam)
        norm_before = torch.linalg.vector_norm(w.grad.float())  # before the in-place copy below
        after = project_head_grad(w.grad, self.P, additive=self.gm == "bb_additive")
        ratio = torch.linalg.vector_norm(after) / norm_before.clamp_min(1e-30)
        w.grad.copy_(after.to(w.grad.dtype))
        return ratio, bad

    # ---- inference ------------------------------------------------------------------------
    def fusion_weights(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """(M, B) weights of the run's fusion rule over the modalities in ``self.order``."""
        if self._opt("mla_fusion") == "fixed":
            w = torch.tensor([self.fixed_weights[m] for m in self.order], dtype=torch.float32,
                             device=logits[0].device)
            return w.unsqueeze(1).expand(len(logits), logits[0].shape[0])
        return entropy_weights(logits, self._opt("mla_entropy_scope"))

    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> Prediction:
        assert self.model is not None
        feats = self.model.encode(batch)
        per = {m: self.head(feats[m]) for m in self.order}
        logits = [per[m] for m in self.order]
        return Prediction(weighted_logits(logits, self.fusion_weights(logits)), per)

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._pending_state is not None:
            return dict(self._pending_state)
        return {
            "order": list(self.order),
            "gm": self.gm,
            "updates": self.updates,
            "P": None if self.P is None else self.P.detach().cpu().clone(),
            "nonfinite": None if self.nonfinite is None else self.nonfinite.detach().cpu().clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if self.model is None:
            self._pending_state = state  # applied once the model exists
            return
        if list(state["order"]) != self.order or state["gm"] != self.gm:
            raise ConfigError(
                f"Method 'mla': the checkpoint was written with sub-step order {list(state['order'])} "
                f"and mla_gm={state['gm']}, but this run has {self.order} and mla_gm={self.gm}. "
                f"Resume with the same settings, or start fresh."
            )
        dev = self.trainer.device if self.trainer is not None else torch.device("cpu")
        self.updates = int(state["updates"])
        if state["P"] is not None:
            P = torch.as_tensor(state["P"]).to(dev, torch.float32)
            if self.P is not None and P.shape != self.P.shape:
                raise ConfigError(f"Method 'mla': the checkpoint's projector is {tuple(P.shape)}, this run's "
                                  f"is {tuple(self.P.shape)}. Start fresh.")
            self.P = P
        if state.get("nonfinite") is not None:
            self.nonfinite = torch.as_tensor(state["nonfinite"]).to(dev, torch.float32)

    # ---- reporting ------------------------------------------------------------------------
    def label(self) -> str:
        tags = []
        tags.append({"owm": "", "none": "as released", "bb_additive": "BB additive GM",
                     "elementwise": "element-wise GM"}[self.gm])
        if self._opt("mla_fusion") == "fixed":
            tags.append("fixed fusion")
        elif self._opt("mla_entropy_scope") == "batch":
            tags.append("batch entropy")
        if self._opt("mla_legacy_zero_grad"):
            tags.append("torch-1.8 zero_grad")
        if self._opt("mla_order"):
            tags.append("order " + ">".join(self.order))
        tags = [t for t in tags if t]
        return "MLA" if not tags else f"MLA ({', '.join(tags)})"

    def record_info(self) -> dict[str, Any]:
        gm = {
            "owm": "grad W <- grad W P (not on the run's first sub-step); P <- P - kk^T/(lambda + r^T k), "
                   "/||P||_F, after each sub-step with that modality's batch-mean feature",
            "none": "none (as released: the official hook never matches a parameter)",
            "bb_additive": "P updated element-wise with the current batch-mean feature, then "
                           "grad W <- grad W + grad W P^T (BalanceBenchmark)",
            "elementwise": "P updated element-wise with the current batch-mean feature, then "
                           "grad W <- grad W P^T (the released rule, made to run)",
        }[self.gm]
        if self._opt("mla_fusion") == "fixed":
            rule = "fixed weights " + ", ".join(f"{m} {w:.4g}" for m, w in self.fixed_weights.items())
        else:
            rule = f"entropy-weighted logits, one weight per {self._opt('mla_entropy_scope')}"
        return {
            "inference_rule": rule,
            "gradient_modification": gm,
            "substep_order": list(self.order),
            "zero_grad": "torch 1.8 (zero tensors)" if self._opt("mla_legacy_zero_grad") else "None",
            "optimizer_steps_per_batch": len(self.order),
        }
