"""Feature-level fusion operators (pure tensor functions, no trainer state).

The centrepiece is IPRM's geodesic multimodal mixup (GMM, Eq. (1) of the IPRM paper): a
spherical linear interpolation ("slerp") between the L2-normalised features of two modalities,
``GMM(x, y; lam) = sin(lam*theta)/sin(theta) * xbar + sin((1-lam)*theta)/sin(theta) * ybar``
with ``theta = arccos(<xbar, ybar>)`` per row. ``lam`` is the weight of the FIRST argument:
``lam = 1`` returns ``xbar``, ``lam = 0`` returns ``ybar``.

Kept free of any model or method so it can be unit-tested against hand-computed values and
reused by other methods (reference: iprm.md section 3).
"""

from __future__ import annotations

import torch

Weight = float | torch.Tensor

# Constants of the two numerical modes (iprm.md section 3).
OFFICIAL_SIN_EPS = 1e-8  # added unconditionally to sin(theta) by the official code
SAFE_NORM_EPS = 1e-12  # lower bound of the row norm in safe mode
SAFE_CLAMP = 1e-7  # safe mode clamps c to [-1 + SAFE_CLAMP, 1 - SAFE_CLAMP]
SAFE_SIN_MIN = 1e-6  # safe mode mixes linearly where sin(theta) is below this


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """At least float32: arccos/sin of bf16 (autocast) features would lose the geometry."""
    return torch.promote_types(t.dtype, torch.float32)


def _as_weight(lam: Weight, like: torch.Tensor) -> torch.Tensor:
    """A float or tensor weight as a detached tensor on ``like``'s device and dtype.

    The weights are data-dependent statistics (probe KLs, an EMA), never learnt: IPRM passes
    no gradient through them, so they are detached here whatever the caller hands in.
    """
    if isinstance(lam, torch.Tensor):
        return lam.detach().to(device=like.device, dtype=like.dtype)
    return torch.tensor(float(lam), device=like.device, dtype=like.dtype)


def l2_normalize(z: torch.Tensor, safe: bool = False) -> torch.Tensor:
    """Row-wise ``z / ||z||``. Official: no eps (an all-zero row gives NaN); safe: eps-bounded."""
    z = z.to(_compute_dtype(z))
    norm = z.norm(dim=-1, keepdim=True)
    if safe:
        norm = norm.clamp_min(SAFE_NORM_EPS)
    return z / norm


def gmm(z_a: torch.Tensor, z_b: torch.Tensor, lam_a: Weight, safe: bool = False) -> torch.Tensor:
    """Geodesic multimodal mixup of two feature batches (IPRM Eq. (1)), row by row.

    Args:
        z_a, z_b: ``(B, d)`` features of the first and second modality (any scale; rows are
            L2-normalised inside, so only the fused branch ever sees normalised features).
        lam_a: weight of ``z_a``: a Python float or a 0-d tensor (also anything broadcasting
            to ``(B, 1)``); no gradient flows through it. ``lam_b = 1 - lam_a``.
        safe: choose the numerical mode (below). The default replicates the official code.

    Returns:
        ``(B, d)`` fused features in at least float32, unit norm up to the mode's epsilons.

    The two modes, side by side (c = <xbar, ybar>, theta = arccos c):

    ============================  ==============================  ==============================
    step                          official (``safe=False``)       safe (``safe=True``)
    ============================  ==============================  ==============================
    row norm                      ``z / ||z||`` (zero row: NaN)   ``z / max(||z||, 1e-12)``
    inner product c               clamped to ``[-1, 1]``          clamped to ``[-1+1e-7, 1-1e-7]``
    denominator s                 ``sin(theta) + 1e-8`` always    ``sin(theta)``
    theta = 0 exactly             zero vector (``0 / 1e-8``)      ``lam*xbar + (1-lam)*ybar``
    0 < theta small               smooth, tends to linear mix     linear mix if sin(theta)<1e-6
    c = +-1 gradient              arccos' is infinite: inf/NaN    finite (clamped c)
    ============================  ==============================  ==============================

    In safe mode the clamp alone keeps ``theta >= ~4.5e-4`` (float32 and float64), so the
    linear fallback is a backstop that the clamp normally makes unreachable; both give the
    same point there to ~1e-8.

    Orthogonal inputs (theta = pi/2) give ``sin(lam*pi/2) xbar + cos(lam*pi/2) ybar`` in both
    modes (up to the 1e-8 of the official denominator).
    """
    x = l2_normalize(z_a, safe)
    y = l2_normalize(z_b, safe).to(x.dtype)
    lam = _as_weight(lam_a, x)
    if lam.dim() == 1:
        lam = lam.unsqueeze(-1)
    c = (x * y).sum(dim=-1, keepdim=True)
    bound = 1.0 - SAFE_CLAMP if safe else 1.0
    c = c.clamp(-bound, bound)
    theta = torch.arccos(c)
    if not safe:
        s = torch.sin(theta) + OFFICIAL_SIN_EPS
        return torch.sin(lam * theta) / s * x + torch.sin((1.0 - lam) * theta) / s * y
    sin_t = torch.sin(theta)
    tiny = sin_t < SAFE_SIN_MIN
    # "double where": the discarded slerp branch must not see a ~0 denominator either, or
    # its NaN/inf gradient would leak through torch.where's backward (0 * inf = NaN).
    s = torch.where(tiny, torch.ones_like(sin_t), sin_t)
    slerp = torch.sin(lam * theta) / s * x + torch.sin((1.0 - lam) * theta) / s * y
    linear = lam * x + (1.0 - lam) * y
    return torch.where(tiny, linear, slerp)


def linear_mix(z_a: torch.Tensor, z_b: torch.Tensor, lam_a: Weight, safe: bool = False) -> torch.Tensor:
    """L-Mixup (IPRM ablation, iprm.md section 8): ``lam*xbar + (1-lam)*ybar``.

    Same L2-normalised inputs and weight convention as :func:`gmm`, so swapping the two is the
    only change in the ablation; the result is not re-normalised (a chord, not an arc).
    """
    x = l2_normalize(z_a, safe)
    y = l2_normalize(z_b, safe).to(x.dtype)
    lam = _as_weight(lam_a, x)
    if lam.dim() == 1:
        lam = lam.unsqueeze(-1)
    return lam * x + (1.0 - lam) * y


MIXERS = {"gmm": gmm, "linear": linear_mix}
