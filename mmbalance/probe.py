"""IPRM's probe statistics: strength weights (Eq. (2)) and their EMA (Eq. (4)).

Pure tensor functions with no host synchronisation (no ``.item()``, no Python branching on
tensor values), so a training step that calls them every iteration never stalls a GPU.
Reference: the IPRM page of the mmbalance documentation (Methods > IPRM); official: github.com/njustkmg/IJCAI25-IPRM ``main_av.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: The official initial EMA weight: lambda_1 = 0.5, i.e. Eq. (4) with lambda_0 = omega_0 = 0.5.
INIT_WEIGHT = 0.5
#: Guard of the weight ratio (the documentation's IPRM page, departures; the official code has none).
GUARD_EPS = 1e-12
_WIDE = (torch.float32, torch.float64)


def kl_to_fused(uni_logits: torch.Tensor, fused_logits: torch.Tensor) -> torch.Tensor:
    """Batch-mean ``KL(p_uni || p_fused)`` at temperature 1, from log-softmax of both logits.

    The unimodal distribution comes first, as in the paper; the official code averages over
    the batch where the paper sums (the weight ratio is the same either way). Computed in at
    least float32 so bf16 autocast logits do not quantise the divergence. Returns a 0-d tensor.
    """
    dtype = torch.promote_types(uni_logits.dtype, torch.float32)
    log_p = F.log_softmax(uni_logits.to(dtype), dim=-1)
    log_q = F.log_softmax(fused_logits.to(dtype), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise log-softmax in at least float32 (bf16 autocast logits are upcast first).

    IPRM needs each unimodal log-softmax twice per step, in its cross-entropy and in its probe
    KL; computing it once here and handing it to both (``F.nll_loss`` for the CE) gives the same
    bits as ``F.cross_entropy`` and :func:`kl_to_fused`, which compute exactly this inside.
    """
    if logits.dtype not in _WIDE:
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits.log_softmax(-1)  # what F.log_softmax(logits, dim=-1) calls


def kl_pair_to_fused(log_p_first: torch.Tensor, log_p_second: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Both probe divergences at once: ``[KL(p_first || q), KL(p_second || q)]``, a ``(2,)`` tensor.

    Takes log-probabilities (:func:`log_probs`), so nothing is recomputed; each entry is the
    batch mean of the per-sample sums, as :func:`kl_to_fused` (bit for bit on CPU: each row is
    reduced alone in both layouts). One stacked pass issues 6 tensor ops instead of 10.
    """
    lp = torch.stack((log_p_first, log_p_second))
    if torch.is_grad_enabled() and (lp.requires_grad or log_q.requires_grad):
        return (lp.exp() * (lp - log_q)).sum(dim=-1).mean(dim=-1)
    p = lp.exp()  # no autograd: overwrite the fresh temporaries instead of allocating more
    return p.mul_(lp.sub_(log_q)).sum(dim=-1).mean(dim=-1)


def pair_strength_weight(d: torch.Tensor, eps: float = GUARD_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (2) from the ``(2,)`` divergences of :func:`kl_pair_to_fused`: ``(w_first, guarded)``.

    The same rule and guard as :func:`strength_weights` (equal values), in fewer ops and with
    ``(1,)``-shaped results, so a step can concatenate them into one log row. The second
    modality's weight is ``1 - w_first``.
    """
    d = d.clamp_min(0.0)
    guarded = (d < eps).all(dim=0, keepdim=True)
    ratio = d[1:] / (d.sum() + eps)
    return ratio.masked_fill(guarded, INIT_WEIGHT), guarded


def strength_weights(
    d_a: torch.Tensor, d_b: torch.Tensor, eps: float = GUARD_EPS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Instantaneous modality weights of Eq. (2) from the two probe divergences.

    ``w_a = d_b / (d_a + d_b + eps)`` and ``w_b = 1 - w_a``: the modality whose prediction is
    *closer* to the fused one (smaller KL) gets the *larger* weight, as the paper states. The
    official code divides without a guard (NaN when both KLs are 0); here both KLs below
    ``eps`` fall back to 0.5 / 0.5 and ``guarded`` (a bool tensor) says so, so the trainer can
    count departures from the official numerics. KLs are clamped at 0 first: rounding can
    make a true-zero KL slightly negative, which would push a weight outside [0, 1].
    """
    d_a = d_a.clamp_min(0.0)
    d_b = d_b.clamp_min(0.0)
    guarded = (d_a < eps) & (d_b < eps)
    ratio = d_b / (d_a + d_b + eps)
    w_a = torch.where(guarded, torch.full_like(ratio, INIT_WEIGHT), ratio)
    return w_a, 1.0 - w_a, guarded


def ema(lam_prev: torch.Tensor, omega_prev: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. (4): ``lambda_t = alpha * lambda_{t-1} + (1 - alpha) * omega_{t-1}``.

    With the official initialisation, both state tensors start at :data:`INIT_WEIGHT`, so the
    first call returns 0.5 (lambda_1 = 0.5) and later calls follow the recursion; applying the
    update at the start of step t is equivalent to the paper's "after the SGD step of t-1".
    The update is linear, so it commutes with ``w -> 1 - w``: the second modality's EMA
    never needs its own state.
    """
    return alpha * lam_prev + (1.0 - alpha) * omega_prev


def init_state(n_pairs: int = 1, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh ``(lambda, omega)`` state, one entry per modality pair, all at 0.5."""
    lam = torch.full((n_pairs,), INIT_WEIGHT, device=device)
    return lam, lam.clone()
