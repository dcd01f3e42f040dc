"""MMPareto: Pareto integration of the multimodal and unimodal gradients (Wei and Hu, ICML 2024).

Documented in the documentation's mmpareto page. The model is the
"uniform baseline" (the documentation's concat page): a fused head (Concat by default) plus a separate linear head per
modality, losses ``L_mm = CE(o, y)`` and ``L_m = CE(o_m, y)``. Only the encoders' gradients change.
Per batch (manual optimisation, one optimizer step):

1. one forward pass (under the run's autocast); the losses are taken on fp32 logits;
2. per-objective gradients with ``torch.autograd.grad`` on explicit parameter groups (never found
   by name): ``grad(L_mm, [every encoder, fused head])`` with the graph kept, then for each
   modality ``grad(L_m, [encoder m, head m])`` (this pass only runs through encoder m);
3. per encoder m, in fp32 on the device (:func:`pareto_combine`): flatten ``G^mm`` and ``G^u``;
   ``cos = <G^mm, G^u> / (|G^mm| |G^u|)``; if ``cos > 0`` (strictly) ``a = 1/2``, else ``a`` is the
   official two-vector min-norm solver (:func:`pareto_weight`): 0.999 when
   ``<G^mm,G^u> >= |G^mm|^2`` (tested first), 0.001 when ``<G^mm,G^u> >= |G^u|^2``, otherwise the
   exact closed form ``(|G^u|^2 - <G^mm,G^u>) / |G^mm - G^u|^2`` (no clamp, as the official solver);
   ``D = 2 (a G^mm + (1 - a) G^u)``; per parameter tensor t, ``S_t = G^mm_t + G^u_t`` and the
   gradient becomes ``gamma * max(1, |S_t| / |D_t|) * D_t`` (:func:`magnitude_factors`; scaled up
   to at least the uniform-sum norm, never down), ``gamma = boost = 1.5``;
4. the fused head keeps ``grad L_mm``, head m keeps ``grad L_m`` (never scaled); one optimizer step
   (with the trainer's clipping, if configured).

Cost: one forward, one full backward (``L_mm``) and one encoder-local backward per modality, about
2x a plain backward; no fourth backward. The combination is a fixed number of kernels per encoder
whatever its tensor count (two flat copies, three dot products, per-tensor norms with
``_foreach_norm``, ``torch.where`` for every branch), and nothing is read back to the host: the
cosine test, the solver's cases and the guards are tensor selects, and the diagnostics are 0-d
tensors (the official code syncs on ``.item()``, a Python ``if`` on the cosine and CPU dot
products every step). Extra memory: about five flat fp32 copies of one encoder's gradient.
Measured on CPU (avdigits, one thread, per training step, min of 8 rounds): 1.54x joint training
(concat + unimodal CEs, one backward), against the 1.8x target; not yet measured on a GPU.

Diagnostics per step and modality m: ``cos_m``, ``conflict_m`` (1 when cos <= 0, so the epoch mean
is the conflict rate), ``weight_mm_m`` (a), ``boost_m`` (``|final| / |S|``: 1.5 without conflict),
the guard counters ``guard_denominator_m``, ``guard_degenerate_m`` (tensors), ``guard_nonfinite_m``,
and the losses ``loss_mm``, ``loss_m``.

Departures from the official code (GeWu-Lab/MMPareto_ICML2024 ``code/MMPareto.py``,
``code/min_norm_solvers.py``):

* **Parameter groups.** Official: parameters whose name tokens contain ``audio``/``visual`` and
  not ``head``. Here ``model.encoder_params(m)`` (every trainable tensor of encoder m, including
  any projection it holds); fused and unimodal heads are never combined. Same tensors on the
  official model; names are never matched.
* **No fourth backward.** Official: ``S_t`` is the gradient of a fourth backward of
  ``L_mm + sum_m L_m``; since ``L_k`` (k != m) does not reach encoder m, ``S_t = G^mm_t + G^u_t``
  (a decision; a test checks the two agree), and the heads' gradients are the
  per-objective ones. Equal up to float rounding.
* **Unimodal gradients** come from ``grad(L_m, encoder m + head m)`` (encoder-local) instead of a
  full ``L_m.backward()``: same values, less work.
* **Solver on the device.** Same closed form and boundary order; the dot products are fp32 on the
  device (official: fp32 sums moved to the CPU, each counted twice through its ``concat`` entry,
  which the scale-invariant solver ignores). No Python branch reads a tensor.
* **Guards** (a decision; ``guards=false`` restores the official arithmetic,
  NaNs included). (a) ``a = 1/2`` when the closed form's denominator ``|G^mm - G^u|^2`` is below
  ``guard_eps`` (reachable only when both gradients vanish). (b) A tensor whose ``|D_t|`` is
  below ``guard_eps + 1e-5 (|G^mm_t| + |G^u_t|)`` (exactly opposite gradients: the min-norm point
  is 0) gets ``gamma * S_t``; official: ``inf * 0 = NaN``, or the rounding residue of ``D_t``
  blown up to ``|S_t|``. The relative part of that threshold is ours (an absolute 1e-12 misses
  the fp32 residue of an exact cancellation). (c) Non-finite per-objective gradients of an
  encoder: that encoder gets a zero gradient this step (official: NaN goes into the weights; the
  trainer still reports a diverged epoch through its loss). Each firing is counted. The cosine
  divides by ``max(|G^mm| |G^u|, 1e-8)`` as ``F.cosine_similarity`` does in both modes.
* **Fusion.** Concat (official) by default; ``fusion_mode=sum`` is offered, the maintainers say
  the method does not depend on the fusion type (MMP#3).
* **Schedule and selection** follow the suite (common per-dataset table, a decision;
  the official CREMA-D script creates a StepLR it never steps) and its selection rules.
* **Three or more modalities** (a decision): each encoder still faces two objectives,
  its own ``L_m`` and ``L_mm``, and the rule is applied per encoder, as the third-party
  three-modality fork and BalanceBenchmark do.

Open questions, decided: the magnitude rescale is **per tensor** by default (what
the official code does; ``rescale=global`` uses one factor per encoder, the paper's "common
direction plus enhanced magnitude" reading), and ``boost`` (gamma) is 1.5 on every dataset (the
only value any source gives).

Refused: one modality (there is no multimodal objective), encoders that share parameters (more
than two objectives on one tensor would need the general solver), an encoder without trainable
parameters (nothing to combine), and distributed runs (the per-objective gradients would have to
be all-reduced before the cosine). Gradient accumulation is undefined for this per-step rule;
the trainer offers none. The method keeps no state across steps (nothing to checkpoint).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.config import Option
from mmbalance.errors import UnsupportedError
from mmbalance.heads import build_head
from mmbalance.method import Method
from mmbalance.registry import register_method

NAME = "mmpareto"
DESCRIPTION = "MMPareto: Pareto integration of multimodal and unimodal gradients (ICML 2024)"
BOOST = 1.5  # the official gamma
SOLVER_HIGH, SOLVER_LOW = 0.999, 0.001  # the official solver's boundary answers
COS_EPS = 1e-8  # F.cosine_similarity's epsilon
GUARD_EPS = 1e-12  # the documentation's mmpareto page, departures
DEGENERATE_REL = 1e-5  # |D_t| this small relative to its inputs is an exact cancellation

OPTIONS: dict[str, Option] = {
    "boost": Option(BOOST, "gamma: the encoders' combined gradient is multiplied by it (official 1.5)",
                    type=float, min=0, min_open=True),
    "rescale": Option("tensor", "magnitude rescale max(1, |S|/|D|) per parameter tensor (official code) "
                      "or one factor per encoder (global)", choices=("tensor", "global")),
    "fusion_mode": Option("concat", "fused head: concat (official) or sum (MMP#3: fusion-agnostic)",
                          choices=("concat", "sum")),
    "guards": Option(True, "NaN guards (tiny denominator, degenerate D_t, non-finite gradients), each "
                     "counted; false = the official arithmetic, NaNs included"),
    "guard_eps": Option(GUARD_EPS, "absolute threshold of the guards (the documentation's mmpareto page)", type=float, min=0),
}


# ---- pure mathematics (no trainer state) -------------------------------------------------------
class ParetoWeight(NamedTuple):
    """The combination weight of one encoder: ``a`` on the multimodal gradient, ``1 - a`` on the
    unimodal one, with the cosine, the conflict flag and whether the denominator guard fired."""

    a: torch.Tensor
    cos: torch.Tensor
    conflict: torch.Tensor
    denominator_guard: torch.Tensor


def pareto_weight(
    nmm2: Any, nu2: Any, dot: Any, guards: bool = True, eps: float = GUARD_EPS
) -> ParetoWeight:
    """``a`` from ``|G^mm|^2``, ``|G^u|^2`` and ``<G^mm, G^u>`` (fp32 0-d tensors, no host sync).

    ``cos > 0`` (strictly): ``a = 1/2``. Otherwise the official solver, in its order: 0.999 if
    ``dot >= |G^mm|^2``, else 0.001 if ``dot >= |G^u|^2``, else the exact closed form
    ``(|G^u|^2 - dot) / (|G^mm|^2 + |G^u|^2 - 2 dot)``. With ``guards`` a closed-form denominator
    below ``eps`` gives ``a = 1/2`` (counted in ``denominator_guard``).
    """
    nmm2 = torch.as_tensor(nmm2, dtype=torch.float32)
    nu2 = torch.as_tensor(nu2, dtype=torch.float32, device=nmm2.device)
    dot = torch.as_tensor(dot, dtype=torch.float32, device=nmm2.device)
    cos = dot / (nmm2.sqrt() * nu2.sqrt()).clamp_min(COS_EPS)
    conflict = ~(cos > 0)  # NaN counts as a conflict, as the official ``if cos > 0`` does
    high = dot >= nmm2
    low = (dot >= nu2) & ~high
    denom = nmm2 + nu2 - 2.0 * dot
    if guards:
        tiny = conflict & ~high & ~low & (denom < eps)
        closed = torch.where(tiny, 0.5, (nu2 - dot) / torch.where(tiny, 1.0, denom))
    else:
        tiny = torch.zeros_like(conflict)
        closed = (nu2 - dot) / denom
    solver = torch.where(high, SOLVER_HIGH, torch.where(low, SOLVER_LOW, closed))
    a = torch.where(conflict, solver, 0.5)
    return ParetoWeight(a, cos, conflict, tiny)


def magnitude_factors(
    s_norms: torch.Tensor, d_norms: torch.Tensor, scale: torch.Tensor | None = None,
    guards: bool = True, eps: float = GUARD_EPS, rel: float = DEGENERATE_REL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rescale ``max(1, |S| / |D|)`` per entry, and where ``D`` is degenerate.

    With ``guards``, ``|D| <= eps + rel * scale`` (``scale = |G^mm| + |G^u|`` of the same tensor)
    is degenerate: its factor is 1 and the caller uses ``S`` instead of ``D``. Without, the
    official rule: ``|S|/|D|`` if it is > 1, else 1 (a NaN ratio gives 1, an infinite one stays).
    """
    s_norms = s_norms.float()
    d_norms = d_norms.float()
    if not guards:
        ratio = s_norms / d_norms
        return torch.where(ratio > 1, ratio, 1.0), torch.zeros_like(d_norms, dtype=torch.bool)
    limit = eps if scale is None else eps + rel * scale.float()
    degenerate = d_norms <= limit
    ratio = s_norms / torch.where(degenerate, 1.0, d_norms)
    return torch.where(degenerate, 1.0, ratio.clamp_min(1.0)), degenerate


def pareto_combine(
    g_mm: Sequence[torch.Tensor],
    g_u: Sequence[torch.Tensor],
    boost: float = BOOST,
    rescale: str = "tensor",
    guards: bool = True,
    eps: float = GUARD_EPS,
    lengths: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """MMPareto's gradient for one encoder from its two per-objective gradients (lists of
    tensors in parameter order). Returns the new fp32 gradients (views of one flat buffer) and
    0-d diagnostics. ``lengths`` (the tensors' numels on the device) may be passed to save a
    host-to-device copy per call.
    """
    if rescale not in ("tensor", "global"):
        raise ValueError(f"rescale must be 'tensor' or 'global', got {rescale!r}")
    if len(g_mm) != len(g_u) or not g_mm:
        raise ValueError("pareto_combine needs two equally long, non-empty lists of gradients")
    shapes = [g.shape for g in g_mm]
    numels = [g.numel() for g in g_mm]
    flat_mm = torch.cat([g.detach().reshape(-1).float() for g in g_mm])
    flat_u = torch.cat([g.detach().reshape(-1).float() for g in g_u])
    nmm2, nu2, dot = flat_mm @ flat_mm, flat_u @ flat_u, flat_mm @ flat_u
    finite = torch.isfinite(nmm2) & torch.isfinite(nu2) & torch.isfinite(dot)
    if guards:  # a finite weight even when the inputs are not (their update is zeroed below)
        zero = torch.zeros_like(nmm2)
        w = pareto_weight(torch.where(finite, nmm2, zero), torch.where(finite, nu2, zero),
                          torch.where(finite, dot, zero), guards=True, eps=eps)
        nan = torch.full_like(nmm2, torch.nan)  # no weight, cosine or conflict to report
        w = w._replace(cos=torch.where(finite, w.cos, nan), conflict=w.conflict & finite)
    else:
        w = pareto_weight(nmm2, nu2, dot, guards=False)
    a = w.a
    s = flat_mm + flat_u
    d = flat_mm * (2.0 * a) + flat_u * (2.0 * (1.0 - a))
    if rescale == "tensor":
        s_norms = torch.stack(torch._foreach_norm(list(s.split(numels))))
        d_norms = torch.stack(torch._foreach_norm(list(d.split(numels))))
        scale = (torch.stack(torch._foreach_norm(list(flat_mm.split(numels))))
                 + torch.stack(torch._foreach_norm(list(flat_u.split(numels)))))
    else:
        s_norms, d_norms = s.norm().reshape(1), d.norm().reshape(1)
        scale = (nmm2.sqrt() + nu2.sqrt()).reshape(1)
    factors, degenerate = magnitude_factors(s_norms, d_norms, scale, guards=guards, eps=eps)
    if rescale == "tensor" and len(numels) > 1:
        if lengths is None:
            lengths = torch.tensor(numels, device=flat_mm.device)
        n = flat_mm.numel()
        factor_el = torch.repeat_interleave(factors, lengths, output_size=n)
        degenerate_el = torch.repeat_interleave(degenerate, lengths, output_size=n)
    else:
        factor_el, degenerate_el = factors, degenerate
    out = torch.where(degenerate_el, s, d * factor_el) * boost
    if guards:
        out = torch.where(finite, out, 0.0)
    grads = [part.view(shape) for part, shape in zip(out.split(numels), shapes, strict=True)]
    s_total = s.norm()
    stats = {
        "cos": w.cos,
        "conflict": torch.where(finite, w.conflict.float(), torch.nan),
        "weight_mm": torch.where(finite, a, torch.nan),
        "boost": out.norm() / s_total.clamp_min(torch.finfo(torch.float32).tiny),
        "guard_denominator": w.denominator_guard.float(),
        "guard_degenerate": (degenerate & (s_norms > eps)).sum().float(),
        "guard_nonfinite": (~finite).float(),
    }
    return grads, stats


def check_disjoint_groups(groups: Mapping[str, Sequence[nn.Parameter]]) -> None:
    """Refuse a parameter that sits in two groups (e.g. encoders sharing a layer)."""
    owner: dict[int, str] = {}
    for name, params in groups.items():
        for p in params:
            other = owner.setdefault(id(p), name)
            if other != name:
                raise UnsupportedError(
                    f"Method '{NAME}' combines two gradients (its modality's and the multimodal "
                    f"one) per encoder, but a parameter of shape {tuple(p.shape)} belongs to both "
                    f"'{other}' and '{name}': shared parameters face more than two objectives and "
                    f"would need the general min-norm solver. Use separate encoders."
                )


def _trainable(params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in params if p.requires_grad]


# ---- the plugin --------------------------------------------------------------------------------
@register_method(NAME, DESCRIPTION)
class MMPareto(Method):
    name = NAME
    description = DESCRIPTION
    options = OPTIONS
    fusion = "concat"  # the default; the run's head is chosen by fusion_mode
    manual_optimization = True
    min_modalities = 2
    max_modalities = None
    key_diagnostic = "conflict_"
    # The official CREMA-D run (the only dataset with settings in any source): gamma 1.5.
    dataset_defaults = {"cremad": {"boost": BOOST}}

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.boost = float(self._opt("boost"))
        self.rescale = str(self._opt("rescale"))
        self.fusion = str(self._opt("fusion_mode"))
        self.guards = bool(self._opt("guards"))
        self.guard_eps = float(self._opt("guard_eps"))
        self.modalities: list[str] = []
        self._enc: dict[str, list[nn.Parameter]] = {}
        self._heads: dict[str, list[nn.Parameter]] = {}
        self._fusion: list[nn.Parameter] = []
        self._lengths: dict[str, torch.Tensor] = {}

    def _opt(self, key: str) -> Any:
        """Option value; the declared default when ``cfg`` lacks it (a method built by hand)."""
        return self.cfg.get(key, OPTIONS[key].default)

    # ---- declarations / set-up ------------------------------------------------------------
    def check_modalities(self, available: Sequence[str]) -> list[str]:
        if len(available) < 2:
            raise UnsupportedError(
                f"Method '{NAME}' balances the multimodal loss against each modality's own loss, "
                f"which needs at least two modalities, but the run has {len(available)} "
                f"({', '.join(available)}). Use --set modalities=a,b, or the 'unimodal' method "
                f"for one modality."
            )
        self.modalities = list(available)
        return self.modalities

    def build_fusion(self, dims: Mapping[str, int], num_classes: int) -> nn.Module:
        self.modalities = list(dims)
        return build_head(self.fusion, dims, num_classes)

    def trains_unimodal_heads(self) -> bool:
        return True  # L_m trains head m; per-modality accuracy comes from these heads

    def _collect(self) -> None:
        """The parameter groups (trainable tensors only), taken from the model's registry."""
        assert self.model is not None
        model = self.model
        self.modalities = list(model.modalities)
        self._enc = {m: _trainable(model.encoder_params(m)) for m in self.modalities}
        self._heads = {m: _trainable(model.uni_head_params(m)) for m in self.modalities}
        self._fusion = _trainable(model.fusion_params())

    def on_fit_start(self) -> None:
        assert self.model is not None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raise UnsupportedError(
                f"Method '{NAME}' compares per-objective gradients, which under distributed "
                f"training would have to be all-reduced before the cosine; it runs on one device "
                f"only."
            )
        self._collect()
        empty = [m for m, ps in self._enc.items() if not ps]
        if empty:
            raise UnsupportedError(
                f"Method '{NAME}' combines gradients on the encoders' parameters, but the encoder "
                f"of {', '.join(empty)} has no trainable parameters. Unfreeze it or use the "
                f"'concat' method with unimodal_loss=true."
            )
        check_disjoint_groups({**{f"encoder.{m}": ps for m, ps in self._enc.items()},
                               **{f"uni_head.{m}": ps for m, ps in self._heads.items()},
                               "fusion": self._fusion})
        self._lengths = {
            m: torch.tensor([p.numel() for p in ps], device=ps[0].device) for m, ps in self._enc.items()
        }

    # ---- training -------------------------------------------------------------------------
    def losses(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One forward pass: ``L_mm`` and every ``L_m``, on fp32 logits."""
        assert self.model is not None
        y = batch["label"]
        with self.autocast():
            feats = self.model.encode(batch)
            fused = self.model.fuse(feats)
            uni = self.model.unimodal_logits(feats)
        loss_mm = F.cross_entropy(fused.float(), y)
        return loss_mm, {m: F.cross_entropy(uni[m].float(), y) for m in self.modalities}

    def combined_grads(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Set ``.grad`` of the encoders (MMPareto), the fused head (``L_mm``) and the unimodal
        heads (``L_m``); return the total loss and the step's diagnostics."""
        loss_mm, loss_u = self.losses(batch)
        enc_all = [p for m in self.modalities for p in self._enc[m]]
        grads = torch.autograd.grad(loss_mm, enc_all + self._fusion, retain_graph=True,
                                    allow_unused=True, materialize_grads=True)
        g_mm: dict[str, list[torch.Tensor]] = {}
        k = 0
        for m in self.modalities:
            g_mm[m] = list(grads[k:k + len(self._enc[m])])
            k += len(self._enc[m])
        for p, g in zip(self._fusion, grads[k:], strict=True):
            p.grad = g
        logs: dict[str, torch.Tensor] = {"loss_mm": loss_mm.detach()}
        last = len(self.modalities) - 1
        for i, m in enumerate(self.modalities):
            n_enc = len(self._enc[m])
            gu = torch.autograd.grad(loss_u[m], self._enc[m] + self._heads[m], retain_graph=i < last,
                                     allow_unused=True, materialize_grads=True)
            for p, g in zip(self._heads[m], gu[n_enc:], strict=True):
                p.grad = g
            new, stats = pareto_combine(g_mm[m], gu[:n_enc], boost=self.boost, rescale=self.rescale,
                                        guards=self.guards, eps=self.guard_eps, lengths=self._lengths[m])
            for p, g in zip(self._enc[m], new, strict=True):
                p.grad = g if g.dtype == p.dtype else g.to(p.dtype)
            logs[f"loss_{m}"] = loss_u[m].detach()
            logs.update({f"{key}_{m}": v for key, v in stats.items()})
        total = loss_mm.detach() + sum(v.detach() for v in loss_u.values())
        return total, logs

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        total, logs = self.combined_grads(batch)
        self.log(**logs)
        self.optimizer_step(self.phase_optimizer or self.optimizer)
        return total

    # ---- reporting ------------------------------------------------------------------------
    def label(self) -> str:
        tags = []
        if abs(self.boost - BOOST) > 1e-12:
            tags.append(f"gamma={self.boost:g}")
        if self.rescale != "tensor":
            tags.append(f"{self.rescale} rescale")
        if self.fusion != "concat":
            tags.append(f"{self.fusion} fusion")
        if not self.guards:
            tags.append("no guards")
        return "MMPareto" if not tags else f"MMPareto ({', '.join(tags)})"

    def record_info(self) -> dict[str, Any]:
        if not self._enc and self.model is not None:
            self._collect()
        return {
            "gradient_rule": "per encoder: cos>0 -> 1/2 each, else the min-norm weight; "
                             "gamma * max(1, |S|/|D|) * D",
            "rescale": "per parameter tensor (official)" if self.rescale == "tensor" else "one factor per encoder",
            "boost": self.boost,
            "guards": self.guards,
            "encoder_tensors": {m: len(ps) for m, ps in self._enc.items()},
            "backward_passes": f"1 full (L_mm) + {len(self.modalities)} encoder-local (L_m)",
        }
