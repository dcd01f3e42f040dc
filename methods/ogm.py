"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement (Peng et al., CVPR 2022).

Documented in the documentation's ogm page; official code GeWu-Lab/OGM-GE_CVPR2022 ``main.py``
(CVPR) and GeWu-Lab/BML_TPAMI2024 ``code/main.py`` (journal). Two modalities a, b (the run's
order; audio, visual on CREMA-D/KS). Each step:

1. one forward pass; the loss is the fused CE only (the unimodal CEs are *not* added, as in the
   official code); the per-modality logits ``z_m`` are the fused head's parts (concat: the
   weight block of m plus b/2; sum: W_m z_m + b_m), computed from detached features in fp32,
   so they cost two small matmuls and build no graph;
2. scores ``s_m = sum_i softmax(z_m)_i[y_i]`` (gather, no loop); ``rho_a = s_a / s_b``,
   ``rho_b = 1 / rho_a``; the dominant modality u gets ``k_u = 1 - tanh(alpha * rho_u)``, the
   other ``k = 1`` (Eq. 10; the official ``relu`` never acts, since rho >= 0);
3. between backward and step (``on_after_backward``), inside the inclusive 0-based epoch window
   ``[modulation_starts, modulation_ends]``, every gradient g of ``encoder_params(m)`` becomes
   ``k_m * g + N(0, (std(g) + 1e-8)^2)``, std taken on the *unscaled* gradient, noise on both
   encoders (GE; ``ge=false`` is plain OGM, scaling only).

No option adds unimodal CEs: neither official repository trains on them (both compute the
unimodal losses for logging only; the journal code's weighted sum is commented out), and the
reference (3.3) says they are not added. The unimodal heads are therefore never trained, and
per-modality accuracy comes from the fused head's parts (``per_modality_source``).

Cost: no extra forward or backward pass. Everything stays on the device: scores, ratio and
coefficients are 0-d tensors, so no step syncs with the host (the official code calls
``.item()`` on every std and compares Python floats). Per step the extras are the two parts
matmuls, one stacked softmax/gather, about a dozen scalar ops, one std per modulated tensor,
one normal draw per modality (split over its tensors) and foreach kernels for the scaling and
the addition. The method is stateless across steps (nothing to checkpoint); the GE noise comes
from torch's global RNG, which the trainer re-seeds every epoch, so a resumed run is identical.

Departures from the official code (GeWu-Lab/OGM-GE_CVPR2022 ``main.py``):

* **Which tensors are modulated.** Official: 4-D gradients (2-D conv kernels) of parameters
  whose second name token contains ``audio``/``visual``. Here: every parameter of
  ``encoder_params(m)`` (conv kernels, BN affine, biases, linear layers and any projection the
  encoder holds; never the fused or unimodal heads). This changes numbers on conv encoders;
  ``conv4d_only=true`` restores the official filter. That filter modulates NOTHING for MLP,
  transformer or 3-D-conv (5-D kernel) encoders (the documentation's ogm page), e.g. both
  encoders of ``synthetic`` and the image MLP of ``avdigits``; a warning says so at fit start.
* **Degenerate scores.** Scores are floored at the smallest positive float32 before the
  ratio, so a zero score gives a huge ratio (k = 0) instead of the official inf/NaN, and two
  zero scores count as a tie. Unreachable in practice; no effect otherwise.
* **One-element gradients.** The unbiased std of one number is undefined (NaN in torch; the
  official code would put NaN noise into the gradient). Rule here: its std is 0, so its noise
  has std 1e-8 (the official epsilon alone). Such tensors are not 4-D, so the official filter
  never meets them.
* **Exact tie** ``s_a == s_b``: the CVPR code damps the first modality (audio, its ``else``
  branch), the journal code (BML_TPAMI2024) the second (visual): option ``tie`` (default
  "first"; "second" in the KS defaults, which come from the journal code).
* **Journal warm-up.** The journal code skips modulation while ``epoch <= 5`` inside its window
  0-60; that is the window 6-60 here (the Kinetics-Sounds defaults).
* **Evaluation parts.** For sum fusion the official validation adds b_m/2 to each part
  (training uses b_m); here per-modality accuracy always uses the training parts (cosmetic).
* **Noise draws.** One N(0, 1) draw per modality covers all its tensors (split in parameter
  order), then each piece is scaled by its tensor's std; the official code draws per tensor.
  Same distribution, another random stream.
* **Diagnostics** log the *applied* coefficients (1 outside the window), the official
  tensorboard the computed ones; ``ratio`` (= s_a / s_b, first modality over second) is logged
  at every step.

The journal OGM (Wei, Hu, Du, Wen, TPAMI 2024; GeWu-Lab/BML_TPAMI2024 ``code/main.py``,
the documentation's ogm page "The journal variant") is this rule with other settings, not another
method: the same coefficient ``1 - tanh(alpha * relu(rho))`` and GE noise, ties damping the
second modality (``tie=second``), no modulation while ``epoch <= 5`` inside its 0-60 window
(``modulation_starts=6 modulation_ends=60``) and the 4-D filter (``conv4d_only=true``); the
Kinetics-Sounds defaults carry the first three. Where it differs is its extra switch
``--use_OGM_plus``, option ``ogm_plus`` here: the *weaker* modality's gradient is multiplied by a
fixed ``plus_boost`` (4 in the code) and the dominant one is left at 1, so nothing is damped.
The tie rule decides which modality counts as dominant exactly as for the damping (journal: at
``s_a == s_b`` the first modality is boosted). With GE the noise std is still that of the
unscaled gradient (the code computes ``std`` before reassigning the gradient), so boosting
enlarges the signal, not the noise. ``alpha`` has no effect under ``ogm_plus``.

Not supported (clear refusals): three or more modalities (the official rule is a ratio of two
scores; the IPRM paper reports OGM-GE as N/A on trimodal sets) and ``weight`` fusion, whose
logits come from one shared head on a weighted feature sum and do not split by modality.
Under Adam/AdamW a constant per-tensor gradient factor is largely normalised away
(the documentation's ogm page); the method warns when an adaptive optimizer is configured.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.config import Option, Search
from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.heads import build_head
from mmbalance.method import Method
from mmbalance.registry import register_method

NAME = "ogm"
NOISE_EPS = 1e-8  # the official code's epsilon on the noise std
TINY = torch.finfo(torch.float32).tiny

OPTIONS: dict[str, Option] = {
    # search range: around the official 0.8 (CVPR main.py, journal train_ogm.sh)
    "alpha": Option(0.8, "alpha of Eq. 10, k = 1 - tanh(alpha * rho) on the dominant modality "
                    "(README: 0.8 CREMA-D, 0.1 VGGSound; journal KS 0.8)", type=float, min=0, search=Search(0.1, 1.5)),
    "ge": Option(True, "generalisation enhancement: add N(0, std(g)^2) noise to both encoders' "
                 "gradients (OGM-GE); false = plain OGM, scaling only"),
    "modulation_starts": Option(0, "first epoch (0-based, inclusive) of the modulation window", min=0),
    "modulation_ends": Option(50, "last epoch (0-based, inclusive) of the modulation window", min=0),
    "fusion_mode": Option("concat", "fused head whose per-modality parts give the scores: concat "
                          "(W block + b/2) or sum (W_m z_m + b_m); weight is refused",
                          choices=("concat", "sum", "weight")),
    "conv4d_only": Option(False, "official filter: modulate only 4-D gradients (2-D conv kernels) "
                          "of each encoder; modulates nothing for MLP/transformer/3-D-conv encoders"),
    "tie": Option("first", "at an exact score tie damp the first modality (CVPR code) or the "
                  "second (journal code)", choices=("first", "second")),
    "ogm_plus": Option(False, "journal OGM+ (BML_TPAMI2024 --use_OGM_plus): multiply the weaker "
                       "modality's gradient by plus_boost and leave the dominant one at 1 (no damping)"),
    "plus_boost": Option(4.0, "the weaker modality's gradient factor under ogm_plus (journal code: 4)",
                         type=float, min=0, min_open=True),
}


# ---- pure mathematics (no trainer state) -------------------------------------------------------
def true_class_scores(parts: Mapping[str, torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
    """``s_m = sum_i softmax(z_m)_i[y_i]`` per modality, in fp32, as 0-d tensors.

    All modalities in one stacked softmax and one gather: no loop over samples or modalities.
    """
    names = list(parts)
    z = torch.stack([parts[m] for m in names]).float()  # (M, B, C)
    index = y.long().view(1, -1, 1).expand(len(names), -1, 1)
    s = torch.softmax(z, dim=2).gather(2, index).sum(dim=(1, 2))
    return dict(zip(names, s.unbind(0), strict=True))


def ogm_coefficients(
    score_a: torch.Tensor, score_b: torch.Tensor, alpha: float, tie: str = "first"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 10 for two modalities: ``(k_a, k_b, rho_a)`` as fp32 tensors.

    ``rho_a = s_a / s_b``; the modality with the larger score gets ``1 - tanh(alpha * rho)``
    with its own ratio (> 1), the other 1. At ``s_a == s_b`` the ``tie`` modality ("first" = a,
    the CVPR code; "second" = b, the journal code) is damped by ``1 - tanh(alpha)``. Scores are
    floored at the smallest positive float32, so no input gives NaN.
    """
    if tie not in ("first", "second"):
        raise ValueError(f"tie must be 'first' or 'second', got {tie!r}")
    s_a = torch.as_tensor(score_a, dtype=torch.float32).clamp_min(TINY)
    s_b = torch.as_tensor(score_b, dtype=torch.float32, device=s_a.device).clamp_min(TINY)
    rho_a = s_a / s_b
    damp_a = s_a >= s_b if tie == "first" else s_a > s_b
    rho_dominant = torch.where(damp_a, rho_a, s_b / s_a)
    k = 1.0 - torch.tanh(alpha * rho_dominant)
    return torch.where(damp_a, k, 1.0), torch.where(damp_a, 1.0, k), rho_a


def ogm_plus_coefficients(
    score_a: torch.Tensor, score_b: torch.Tensor, boost: float, tie: str = "first"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The journal's OGM+ rule for two modalities: ``(k_a, k_b, rho_a)`` as fp32 tensors.

    The dominant modality (the one :func:`ogm_coefficients` would damp, the same ``tie`` rule)
    keeps ``k = 1``; the other gets the constant ``boost``. The journal code writes it as
    ``ratio_1 > 1`` -> ``(1, 4)`` else ``(4, 1)``, i.e. ``tie="second"``.
    """
    if tie not in ("first", "second"):
        raise ValueError(f"tie must be 'first' or 'second', got {tie!r}")
    s_a = torch.as_tensor(score_a, dtype=torch.float32).clamp_min(TINY)
    s_b = torch.as_tensor(score_b, dtype=torch.float32, device=s_a.device).clamp_min(TINY)
    rho_a = s_a / s_b
    dominant_a = s_a >= s_b if tie == "first" else s_a > s_b
    one = torch.ones_like(rho_a)
    k = torch.full_like(rho_a, float(boost))
    return torch.where(dominant_a, one, k), torch.where(dominant_a, k, one), rho_a


def noise_stds(grads: Sequence[torch.Tensor], eps: float = NOISE_EPS) -> torch.Tensor:
    """The GE noise std of every gradient in ``grads``: its unbiased std plus ``eps`` (official),
    as one fp32 vector on the gradients' device (no host sync).

    A one-element (or empty) gradient has no unbiased std (torch gives NaN and warns); its std
    is taken as 0, so its noise has std ``eps``. The rule depends on shapes only, never on a
    value read back from the device.
    """
    stds = [g.detach().float().std() if g.numel() > 1 else g.new_zeros((), dtype=torch.float32)
            for g in grads]
    return torch.stack(stds).add_(eps)


def noise_std(grad: torch.Tensor, eps: float = NOISE_EPS) -> torch.Tensor:
    """:func:`noise_stds` of one gradient, a 0-d tensor."""
    return noise_stds([grad], eps)[0]


def modulate_(
    grads: Sequence[torch.Tensor],
    coeff: torch.Tensor | float,
    noise: bool,
    eps: float = NOISE_EPS,
    generator: torch.Generator | None = None,
) -> None:
    """In place, ``g <- coeff * g (+ N(0, noise_std(g)^2))`` for every tensor of ``grads``.

    The noise std comes from the unscaled gradient (official, issue #5). One normal draw covers
    all tensors and the scalings and the addition are foreach kernels, so only the std costs a
    kernel per tensor. The arithmetic runs in fp32; a lower-precision gradient gets the result
    copied back. Temporary memory: one flat copy of ``grads`` (the draw).
    """
    if not grads:
        return
    work = [g if g.dtype == torch.float32 else g.float() for g in grads]
    draws: list[torch.Tensor] = []
    if noise:
        numels = [g.numel() for g in work]
        scales = noise_stds(work, eps).unbind(0)  # computed before any scaling
        draw = torch.randn(sum(numels), dtype=torch.float32, device=work[0].device, generator=generator)
        draws = [d.view_as(g) for d, g in zip(draw.split(numels), work, strict=True)]
        torch._foreach_mul_(draws, scales)
    torch._foreach_mul_(work, coeff)
    if draws:
        torch._foreach_add_(work, draws)
    for w, g in zip(work, grads, strict=True):
        if w is not g:
            g.copy_(w)


def select_params(params: Sequence[nn.Parameter], conv4d_only: bool) -> list[nn.Parameter]:
    """The encoder tensors OGM modulates: all of them, or only 4-D ones (official filter)."""
    return [p for p in params if p.requires_grad and (not conv4d_only or p.dim() == 4)]


# ---- the plugin --------------------------------------------------------------------------------
@register_method(NAME, "OGM-GE: on-the-fly gradient modulation + generalisation noise (CVPR 2022)")
class OGM(Method):
    name = NAME
    aliases = ("ogm_ge", "ogm-ge")  # the paper's name: suggests ogm, not the closer-spelled ogr_gb
    description = "OGM-GE: on-the-fly gradient modulation + generalisation noise (CVPR 2022)"
    fusion = "concat"  # the default; the run's head is chosen by the fusion_mode option
    options = OPTIONS
    min_modalities = 2
    max_modalities = 2
    key_diagnostic = "ratio"
    dataset_defaults = {
        # CVPR README and main.py defaults: alpha 0.8 on CREMA-D, window 0-50 (of 100 epochs).
        "cremad": {"alpha": 0.8, "modulation_starts": 0, "modulation_ends": 50},
        # Journal repo (BML_TPAMI2024) train_ogm.sh: alpha 0.8, window 0-60 with no modulation
        # while epoch <= 5, i.e. 6-60; its tie rule damps the second modality.
        "ksounds": {"alpha": 0.8, "modulation_starts": 6, "modulation_ends": 60, "tie": "second"},
    }

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        mode = self._opt("fusion_mode")
        if mode == "weight":
            raise UnsupportedError(
                "Method 'ogm' needs per-modality logits that add up to the fused logits (the fused "
                "head's parts), but 'weight' fusion feeds a weighted sum of the features into one "
                "shared head, so its logits do not split by modality and the scores s_a, s_b are "
                "undefined. Use --set fusion_mode=concat (official) or fusion_mode=sum."
            )
        if mode not in ("concat", "sum"):
            raise ConfigError(f"Method 'ogm': fusion_mode must be concat or sum, got {mode!r}.")
        starts, ends = int(self._opt("modulation_starts")), int(self._opt("modulation_ends"))
        if starts > ends:
            raise ConfigError(
                f"Method 'ogm': the modulation window is empty (modulation_starts={starts} > "
                f"modulation_ends={ends}; both are 0-based and inclusive), so nothing would be "
                f"modulated. Use the plain '{mode}' method for unmodulated training, or fix the window."
            )
        self.fusion = mode  # instance value: what this run's head is
        self.alpha = float(self._opt("alpha"))
        self.ge = bool(self._opt("ge"))
        self.starts, self.ends = starts, ends
        self.conv4d_only = bool(self._opt("conv4d_only"))
        self.tie = str(self._opt("tie"))
        self.plus = bool(self._opt("ogm_plus"))
        self.boost = float(self._opt("plus_boost"))
        self.modalities: list[str] = []
        self._params: dict[str, list[nn.Parameter]] = {}
        self._coeffs: dict[str, torch.Tensor] | None = None
        self._active = False

    def _opt(self, key: str) -> Any:
        """Option value; the declared default when ``cfg`` lacks it (a method built by hand)."""
        return self.cfg.get(key, OPTIONS[key].default)

    # ---- declarations / set-up ------------------------------------------------------------
    def check_modalities(self, available: Sequence[str]) -> list[str]:
        if len(available) != 2:
            raise UnsupportedError(
                f"Method 'ogm' (OGM-GE) compares two modalities by the ratio of their scores "
                f"s_a / s_b, a rule defined for exactly two (the official code; the IPRM paper "
                f"reports OGM-GE as N/A on trimodal sets), but the run has {len(available)} "
                f"({', '.join(available)}). Pick two with --set modalities=a,b or choose a "
                f"method that supports {len(available)} modalities."
            )
        self.modalities = list(available)
        return self.modalities

    def build_fusion(self, dims: Mapping[str, int], num_classes: int) -> nn.Module:
        self.modalities = list(dims)
        return build_head(self.fusion, dims, num_classes)

    def trains_unimodal_heads(self) -> bool:
        return False  # one fused CE; the unimodal heads are never trained

    def per_modality_source(self) -> str:
        return "fused_parts"  # the same parts the scores come from

    def _select(self) -> dict[str, list[nn.Parameter]]:
        """The modulated tensors per modality, chosen once the model exists."""
        if not self._params and self.model is not None:
            self.modalities = list(self.model.modalities)
            self._params = {m: select_params(self.model.encoder_params(m), self.conv4d_only)
                            for m in self.modalities}
        return self._params

    def on_fit_start(self) -> None:
        assert self.model is not None
        self._params = {}
        self._select()
        empty = [m for m, ps in self._params.items() if not ps]
        if empty:
            why = ("conv4d_only=true keeps only 4-D (2-D conv kernel) gradients, and the encoder of "
                   f"{', '.join(empty)} has none" if self.conv4d_only
                   else f"the encoder of {', '.join(empty)} has no trainable parameters")
            warnings.warn(f"Method 'ogm': {why}, so OGM-GE modulates nothing there.", stacklevel=2)
        if str(self.cfg.get("optimizer", "sgd")).lower() in ("adam", "adamw"):
            warnings.warn(
                f"Method 'ogm' scales gradients; under {self.cfg['optimizer']} a constant per-tensor "
                f"factor is largely normalised away (the documentation's ogm page). The official runs use SGD.",
                stacklevel=2,
            )

    def on_train_epoch_start(self, epoch: int) -> None:
        self._active = self.starts <= epoch <= self.ends
        self._coeffs = None

    # ---- training -------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        assert self.model is not None
        model = self.model
        feats = model.encode(batch)
        y = batch["label"]
        loss = F.cross_entropy(model.fuse(feats), y)
        with torch.no_grad():
            scores = self.scores(feats, y)
            a, b = self.modalities
            if self.plus:
                k_a, k_b, ratio = ogm_plus_coefficients(scores[a], scores[b], self.boost, self.tie)
            else:
                k_a, k_b, ratio = ogm_coefficients(scores[a], scores[b], self.alpha, self.tie)
        self._coeffs = {a: k_a, b: k_b}
        if self.trainer is not None:
            one = torch.ones_like(k_a)
            self.log(ratio=ratio, **{f"coeff_{m}": (k if self._active else one)
                                     for m, k in self._coeffs.items()})
        return loss

    @torch.no_grad()
    def scores(self, feats: Mapping[str, torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The two scores from the fused head's parts, in fp32 even under bf16 autocast."""
        assert self.model is not None
        device = next(iter(feats.values())).device
        detached = {m: f.detach().float() for m, f in feats.items()}
        if torch.is_autocast_enabled(device.type):
            with torch.autocast(device_type=device.type, enabled=False):
                parts = self.model.fusion.parts(detached)
        else:
            parts = self.model.fusion.parts(detached)
        return true_class_scores(parts, y)

    def on_after_backward(self) -> None:
        if not self._active or self._coeffs is None:
            return
        for m in self.modalities:
            grads = [p.grad for p in self._params.get(m, ()) if p.grad is not None]
            modulate_(grads, self._coeffs[m], noise=self.ge)
        self._coeffs = None

    # ---- reporting ------------------------------------------------------------------------
    def _paper_values(self) -> dict[str, Any]:
        base = {k: o.default for k, o in OPTIONS.items()}
        return {**base, **self.dataset_defaults.get(str(self.cfg.get("dataset")), {})}

    def label(self) -> str:
        """'OGM-GE' (or 'OGM' without noise) at the paper's values; each change adds a tag."""
        paper = self._paper_values()
        tags = []
        if self.fusion != "concat":
            tags.append(f"{self.fusion} fusion")
        if abs(self.alpha - float(paper["alpha"])) > 1e-12:
            tags.append(f"alpha={self.alpha:g}")
        if (self.starts, self.ends) != (paper["modulation_starts"], paper["modulation_ends"]):
            tags.append(f"window {self.starts}-{self.ends}")
        if self.conv4d_only:
            tags.append("4-D kernels only")
        if self.tie != paper["tie"]:
            tags.append(f"tie damps {self.tie}")
        if self.plus:
            tags.append(f"journal OGM+ boost {self.boost:g}")
        head = "OGM-GE" if self.ge else "OGM"
        return head if not tags else f"{head} ({', '.join(tags)})"

    def record_info(self) -> dict[str, Any]:
        a, b = (self.modalities + ["?", "?"])[:2]
        return {
            "ratio": f"score({a}) / score({b}), scores from the fused head's parts",
            "modulated_tensors": {m: len(ps) for m, ps in self._select().items()},
            "modulated_params": "4-D encoder gradients (official filter)" if self.conv4d_only
            else "every encoder parameter",
            "window": [self.starts, self.ends],
            "noise": "GE (std of the unscaled gradient + 1e-8)" if self.ge else "none (OGM)",
            "coefficient": (f"journal OGM+: weaker modality x{self.boost:g}, dominant x1" if self.plus
                            else "1 - tanh(alpha * rho) on the dominant modality"),
        }
