"""IPRM's probe statistics: KL to the fused prediction, strength weights (Eq. 2), EMA (Eq. 4)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from mmbalance.probe import (
    INIT_WEIGHT,
    ema,
    init_state,
    kl_pair_to_fused,
    kl_to_fused,
    log_probs,
    pair_strength_weight,
    strength_weights,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def kl_float64(uni: torch.Tensor, fused: torch.Tensor) -> float:
    """Reference: per-sample sum_k p_k log(p_k / q_k) with plain softmax, then the mean."""
    total = 0.0
    for u_row, f_row in zip(uni.double().tolist(), fused.double().tolist(), strict=True):
        zu = sum(math.exp(v) for v in u_row)
        zf = sum(math.exp(v) for v in f_row)
        p = [math.exp(v) / zu for v in u_row]
        q = [math.exp(v) / zf for v in f_row]
        total += sum(pk * math.log(pk / qk) for pk, qk in zip(p, q, strict=True))
    return total / len(uni)


def test_kl_matches_float64_reference_and_direction():
    g = torch.Generator().manual_seed(1)
    uni = torch.randn(7, 5, generator=g) * 2
    fused = torch.randn(7, 5, generator=g)
    kl = kl_to_fused(uni, fused)
    assert kl.dim() == 0
    assert kl.item() == pytest.approx(kl_float64(uni, fused), rel=1e-5)
    # KL is asymmetric: the unimodal distribution must be the first argument
    assert kl.item() != pytest.approx(kl_float64(fused, uni), rel=1e-3)
    # same as torch's kl_div with batchmean (target = unimodal)
    ref = F.kl_div(F.log_softmax(fused, 1), F.log_softmax(uni, 1), log_target=True, reduction="batchmean")
    torch.testing.assert_close(kl, ref)


def test_kl_is_zero_for_identical_predictions_and_shift_invariant():
    logits = torch.randn(4, 3)
    assert kl_to_fused(logits, logits + 5.0).abs().item() < 1e-6


def test_kl_of_bf16_logits_is_float32():
    uni, fused = torch.randn(3, 4), torch.randn(3, 4)
    assert kl_to_fused(uni.bfloat16(), fused.bfloat16()).dtype == torch.float32


def test_weights_hand_values_and_sum_to_one():
    w_a, w_b, guarded = strength_weights(torch.tensor(0.1), torch.tensor(0.3))
    assert w_a.item() == pytest.approx(0.75)
    assert w_b.item() == pytest.approx(0.25)
    assert (w_a + w_b).item() == pytest.approx(1.0, abs=1e-7)
    assert guarded.dtype == torch.bool and not guarded.item()


def test_modality_closer_to_fused_gets_larger_weight():
    fused = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.5, 0.0]])
    close = fused + 0.1 * torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]])
    far = torch.tensor([[-1.0, 2.0, 0.0], [2.0, -1.0, 1.0]])
    d_close, d_far = kl_to_fused(close, fused), kl_to_fused(far, fused)
    w_close, w_far, _ = strength_weights(d_close, d_far)
    assert w_close.item() > 0.9 and w_far.item() < 0.1
    w_far2, w_close2, _ = strength_weights(d_far, d_close)  # argument order follows the pair
    torch.testing.assert_close(w_close2, w_close)
    torch.testing.assert_close(w_far2, w_far)


def test_zero_denominator_guard():
    zero = torch.tensor(0.0)
    w_a, w_b, guarded = strength_weights(zero, zero)
    assert w_a.item() == 0.5 and w_b.item() == 0.5 and guarded.item()
    # one KL at zero is not guarded: that modality already equals the fusion -> all weight
    w_a, w_b, guarded = strength_weights(zero, torch.tensor(0.2))
    assert w_a.item() == pytest.approx(1.0) and w_b.item() == pytest.approx(0.0, abs=1e-7)
    assert not guarded.item()
    # rounding noise below zero never pushes a weight outside [0, 1]
    w_a, _, _ = strength_weights(torch.tensor(-1e-9), torch.tensor(0.2))
    assert 0.0 <= w_a.item() <= 1.0


def test_pure_functions_need_no_host_sync():
    """On the meta device any .item()/bool() on a tensor raises: the ops stay on-device."""
    uni = torch.empty(4, 3, device="meta")
    fused = torch.empty(4, 3, device="meta")
    d = kl_to_fused(uni, fused)
    w_a, w_b, guarded = strength_weights(d, d)
    lam = ema(w_a, w_b, 0.8)
    assert lam.device.type == "meta" and guarded.device.type == "meta"
    lp = log_probs(uni)
    d2 = kl_pair_to_fused(lp, lp, log_probs(fused))
    w, g = pair_strength_weight(d2)
    assert d2.shape == (2,) and w.device.type == "meta" and g.device.type == "meta"


def test_ema_follows_eq4_from_official_init():
    alpha = 0.8
    lam, omega = init_state()
    assert lam.tolist() == [INIT_WEIGHT] and omega.tolist() == [INIT_WEIGHT]
    omegas = [0.7, 0.2, 0.9]
    # hand-computed: lambda_1 = 0.5; 0.8*0.5+0.2*0.7 = 0.54; 0.8*0.54+0.2*0.2 = 0.472;
    # 0.8*0.472+0.2*0.9 = 0.5576
    expect = [0.5, 0.54, 0.472, 0.5576]
    got = []
    for step in range(4):
        lam = ema(lam, omega, alpha)
        got.append(lam.item())
        if step < len(omegas):
            omega = torch.tensor([omegas[step]])
    assert got == pytest.approx(expect, abs=1e-6)


def test_ema_alpha_zero_and_one():
    lam, omega = torch.tensor(0.3), torch.tensor(0.9)
    assert ema(lam, omega, 0.0).item() == pytest.approx(0.9)
    assert ema(lam, omega, 1.0).item() == pytest.approx(0.3)
    # linear, so it commutes with w -> 1 - w (the second modality needs no state)
    assert ema(1 - lam, 1 - omega, 0.7).item() == pytest.approx(1 - ema(lam, omega, 0.7).item())


def test_log_probs_is_the_log_softmax_inside_cross_entropy():
    """One log-softmax shared by the CE (through nll_loss) and the probe KL gives the bits that
    F.cross_entropy and kl_to_fused compute, forward and backward."""
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(9, 6, generator=g) * 3).requires_grad_()
    y = torch.randint(0, 6, (9,), generator=g)
    lp = log_probs(logits)
    assert torch.equal(lp, F.log_softmax(logits, dim=-1))
    loss = F.nll_loss(lp, y)
    loss.backward()
    grad = logits.grad.clone()
    logits.grad = None
    ref = F.cross_entropy(logits, y)
    ref.backward()
    assert torch.equal(loss, ref) and torch.equal(grad, logits.grad)
    assert log_probs(logits.detach().bfloat16()).dtype == torch.float32


def test_pair_kl_equals_the_two_single_kls_bit_for_bit():
    g = torch.Generator().manual_seed(2)
    for b, k in ((1, 2), (7, 5), (64, 10), (300, 31)):
        ua, ub, q = (torch.randn(b, k, generator=g) * s for s in (3.0, 2.0, 1.0))
        la, lb, lq = log_probs(ua), log_probs(ub), log_probs(q)
        d = kl_pair_to_fused(la, lb, lq)
        assert d.shape == (2,)
        assert torch.equal(d[0], kl_to_fused(ua, q)) and torch.equal(d[1], kl_to_fused(ub, q))
        assert d[0].item() == pytest.approx(kl_float64(ua, q), rel=1e-4, abs=1e-6)
    # the inputs are read, never overwritten (the in-place ops touch fresh temporaries only)
    copies = [t.clone() for t in (la, lb, lq)]
    kl_pair_to_fused(la, lb, lq)
    assert all(torch.equal(a, b) for a, b in zip(copies, (la, lb, lq), strict=True))


def test_pair_kl_stays_differentiable_when_asked():
    g = torch.Generator().manual_seed(3)
    ua = torch.randn(5, 4, generator=g, requires_grad=True)
    q = torch.randn(5, 4, generator=g)
    d = kl_pair_to_fused(log_probs(ua), log_probs(q), log_probs(q))
    d[0].backward()
    assert ua.grad is not None and torch.isfinite(ua.grad).all()
    assert d[1].abs().item() < 1e-6  # the second is q against itself


@pytest.mark.parametrize(
    ("d_a", "d_b"),
    [(0.1, 0.3), (0.3, 0.1), (0.0, 0.2), (0.2, 0.0), (0.0, 0.0), (-1e-9, 0.2), (1e-13, 3e-13), (5e-3, 5e-3)],
)
def test_pair_weight_equals_the_scalar_rule(d_a, d_b):
    w, guarded = pair_strength_weight(torch.tensor([d_a, d_b]))
    w0, _, g0 = strength_weights(torch.tensor(d_a), torch.tensor(d_b))
    assert w.shape == (1,) and guarded.shape == (1,) and guarded.dtype == torch.bool
    assert torch.equal(w[0], w0) and guarded.item() == g0.item()
    assert 0.0 <= w.item() <= 1.0


def test_pair_weight_hand_values_and_direction():
    w, guarded = pair_strength_weight(torch.tensor([0.1, 0.3]))
    assert w.item() == pytest.approx(0.75) and not guarded.item()  # the first is closer
    w, guarded = pair_strength_weight(torch.tensor([0.0, 0.0]))
    assert w.item() == INIT_WEIGHT and guarded.item()
