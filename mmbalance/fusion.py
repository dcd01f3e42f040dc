"""Feature-level fusion operators (pure tensor functions, no trainer state).

The centrepiece is IPRM's geodesic multimodal mixup (GMM, Eq. (1) of the IPRM paper): a
spherical linear interpolation ("slerp") between the L2-normalised features of two modalities,
``GMM(x, y; lam) = sin(lam*theta)/sin(theta) * xbar + sin((1-lam)*theta)/sin(theta) * ybar``
with ``theta = arccos(<xbar, ybar>)`` per row. ``lam`` is the weight of the FIRST argument:
``lam = 1`` returns ``xbar``, ``lam = 0`` returns ``ybar``.

Kept free of any model or method so it can be unit-tested against hand-computed values and
reused by other methods (the IPRM page of the documentation; official: njustkmg/IJCAI25-IPRM ``main_av.py`` ``slerp``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

Weight = float | torch.Tensor

# Constants of the two numerical modes (the IPRM docs page, its departures table).
OFFICIAL_SIN_EPS = 1e-8  # added unconditionally to sin(theta) by the official code
SAFE_NORM_EPS = 1e-12  # lower bound of the row norm in safe mode
SAFE_CLAMP = 1e-7  # safe mode clamps c to [-1 + SAFE_CLAMP, 1 - SAFE_CLAMP]
SAFE_SIN_MIN = 1e-6  # safe mode mixes linearly where sin(theta) is below this


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """At least float32: arccos/sin of bf16 (autocast) features would lose the geometry."""
    if t.dtype in _WIDE:  # the common case, without a call into torch
        return t.dtype
    return torch.promote_types(t.dtype, torch.float32)


_WIDE = (torch.float32, torch.float64)


def _as_weight(lam: Weight, like: torch.Tensor) -> torch.Tensor:
    """A float or tensor weight as a detached tensor on ``like``'s device and dtype.

    The weights are data-dependent statistics (probe KLs, an EMA), never learnt: IPRM passes
    no gradient through them, so they are detached here whatever the caller hands in.
    """
    if isinstance(lam, torch.Tensor):
        if not lam.requires_grad and lam.dtype == like.dtype and lam.get_device() == like.get_device():
            return lam  # already what the mix needs (IPRM's per-step weights): no extra ops
        return lam.detach().to(device=like.device, dtype=like.dtype)
    return torch.tensor(float(lam), device=like.device, dtype=like.dtype)


def l2_normalize(z: torch.Tensor, safe: bool = False) -> torch.Tensor:
    """Row-wise ``z / ||z||``. Official: no eps (an all-zero row gives NaN); safe: eps-bounded."""
    dtype = _compute_dtype(z)
    if z.dtype != dtype:
        z = z.to(dtype)
    norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True)  # what z.norm(dim=-1) calls
    if safe:
        norm = norm.clamp_min(SAFE_NORM_EPS)
    return z / norm


class PairGeometry(NamedTuple):
    """What every mix of one feature pair shares, whatever the weight: computed once per step.

    IPRM mixes the same pair twice per step (the probe at lambda_t, the rebalanced pass at
    omega_t); only the weight differs, so the row normalisation, the angle and the official
    denominator are computed once (with autograd, for the rebalanced pass) and the probe reads
    them under ``no_grad``. ``theta``/``s``/``tiny`` are None for the linear mix (L-Mixup).
    """

    x: torch.Tensor  # xbar: (B, d) L2-normalised first features
    y: torch.Tensor  # ybar: (B, d) L2-normalised second features
    theta: torch.Tensor | None = None  # (B, 1) arccos of the clamped cosine
    s: torch.Tensor | None = None  # (B, 1) denominator: sin(theta) + 1e-8 (official) or sin(theta) (safe)
    tiny: torch.Tensor | None = None  # (B, 1) bool, safe mode only: sin(theta) < 1e-6


def normalized_pair(z_a: torch.Tensor, z_b: torch.Tensor, safe: bool = False) -> PairGeometry:
    """The two row-normalised batches (all the linear mix needs), in at least float32."""
    x = l2_normalize(z_a, safe)
    y = l2_normalize(z_b, safe)
    return PairGeometry(x, y if y.dtype == x.dtype else y.to(x.dtype))


def sphere_geometry(z_a: torch.Tensor, z_b: torch.Tensor, safe: bool = False) -> PairGeometry:
    """Normalised rows, angle and denominator of a pair: the weight-independent half of GMM."""
    pair = normalized_pair(z_a, z_b, safe)
    x, y = pair.x, pair.y
    c = (x * y).sum(dim=-1, keepdim=True)
    bound = 1.0 - SAFE_CLAMP if safe else 1.0
    theta = torch.acos(c.clamp(-bound, bound))
    if not safe:
        return PairGeometry(x, y, theta, torch.sin(theta) + OFFICIAL_SIN_EPS)
    sin_t = torch.sin(theta)
    tiny = sin_t < SAFE_SIN_MIN
    # "double where": the discarded slerp branch must not see a ~0 denominator either, or
    # its NaN/inf gradient would leak through torch.where's backward (0 * inf = NaN).
    return PairGeometry(x, y, theta, torch.where(tiny, torch.ones_like(sin_t), sin_t), tiny)


def _weight_column(lam: Weight, like: torch.Tensor) -> torch.Tensor:
    """The weight as a tensor broadcasting over ``(B, 1)``: a per-row ``(B,)`` weight becomes a
    column; scalars and single-element ``(1,)`` weights broadcast as they are."""
    lam = _as_weight(lam, like)
    return lam.unsqueeze(-1) if lam.dim() == 1 and lam.shape[0] != 1 else lam


def slerp_at(geom: PairGeometry, lam_a: Weight) -> torch.Tensor:
    """The GMM output of a prepared pair at weight ``lam_a`` (the weight-dependent half)."""
    x, y, theta, s = geom.x, geom.y, geom.theta, geom.s
    assert theta is not None and s is not None, "slerp_at needs sphere_geometry, not normalized_pair"
    lam = _weight_column(lam_a, x)
    if geom.tiny is None and not torch.is_grad_enabled():  # a probe: same ops, fewer buffers
        out = torch.mul(lam, theta).sin_().div_(s).mul(x)
        return out.add_(torch.mul(torch.rsub(lam, 1.0), theta).sin_().div_(s).mul(y))
    slerp = torch.sin(lam * theta) / s * x + torch.sin(torch.rsub(lam, 1.0) * theta) / s * y
    if geom.tiny is None:
        return slerp
    return torch.where(geom.tiny, lam * x + (1.0 - lam) * y, slerp)


def linear_at(geom: PairGeometry, lam_a: Weight) -> torch.Tensor:
    """The L-Mixup output of a prepared pair at weight ``lam_a``: ``lam*xbar + (1-lam)*ybar``."""
    lam = _weight_column(lam_a, geom.x)
    return lam * geom.x + (1.0 - lam) * geom.y


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

    Equal, bit for bit, to ``slerp_at(sphere_geometry(z_a, z_b, safe), lam_a)``: a caller that
    mixes one pair at several weights prepares the geometry once.
    """
    return slerp_at(sphere_geometry(z_a, z_b, safe), lam_a)


def linear_mix(z_a: torch.Tensor, z_b: torch.Tensor, lam_a: Weight, safe: bool = False) -> torch.Tensor:
    """L-Mixup (an IPRM ablation, on its docs page): ``lam*xbar + (1-lam)*ybar``.

    Same L2-normalised inputs and weight convention as :func:`gmm`, so swapping the two is the
    only change in the ablation; the result is not re-normalised (a chord, not an arc). Equal,
    bit for bit, to ``linear_at(normalized_pair(z_a, z_b, safe), lam_a)``.
    """
    return linear_at(normalized_pair(z_a, z_b, safe), lam_a)


MIXERS = {"gmm": gmm, "linear": linear_mix}
#: The same two mixers split into (prepare the pair once, mix it at a weight).
MIXER_PARTS = {"gmm": (sphere_geometry, slerp_at), "linear": (normalized_pair, linear_at)}
