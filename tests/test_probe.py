"""IPRM's probe statistics: KL to the fused prediction, strength weights (Eq. 2), EMA (Eq. 4)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from mmbalance.probe import INIT_WEIGHT, ema, init_state, kl_to_fused, strength_weights

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
