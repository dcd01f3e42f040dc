"""Geodesic multimodal mixup (IPRM Eq. (1)) against hand values and a float64 rotation formula."""

from __future__ import annotations

import math
import os

import pytest
import torch

from mmbalance.fusion import gmm, l2_normalize, linear_mix

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def slerp_by_rotation(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """Independent float64 reference: walk (1 - lam) * theta from xbar towards ybar.

    Uses the orthonormal basis (u, v) of the plane of xbar and ybar instead of the sin-ratio
    formula, so agreement is a real check of the implementation.
    """
    x = x.double() / x.double().norm(dim=1, keepdim=True)
    y = y.double() / y.double().norm(dim=1, keepdim=True)
    c = (x * y).sum(1, keepdim=True).clamp(-1, 1)
    theta = torch.arccos(c)
    v = y - c * x
    v = v / v.norm(dim=1, keepdim=True)
    phi = (1 - lam) * theta
    return torch.cos(phi) * x + torch.sin(phi) * v


@pytest.fixture
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 12, generator=g) * 3, torch.randn(16, 12, generator=g) + 0.5


@pytest.mark.parametrize("safe", [False, True])
def test_endpoints_return_normalised_inputs(pair, safe):
    x, y = pair
    torch.testing.assert_close(gmm(x, y, 1.0, safe=safe), l2_normalize(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(gmm(x, y, 0.0, safe=safe), l2_normalize(y), atol=1e-6, rtol=0)


@pytest.mark.parametrize("safe", [False, True])
@pytest.mark.parametrize("lam", [0.1, 0.5, 0.73])
def test_matches_float64_rotation_and_unit_norm(pair, safe, lam):
    x, y = pair
    out = gmm(x, y, lam, safe=safe)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), slerp_by_rotation(x, y, lam), atol=2e-6, rtol=0)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(len(x)), atol=1e-6, rtol=0)


def test_weight_is_on_first_argument_and_swap_symmetry(pair):
    x, y = pair
    out = gmm(x, y, 0.8)
    # closer to xbar than to ybar when lam_a = 0.8
    cos_x = (out * l2_normalize(x)).sum(1)
    cos_y = (out * l2_normalize(y)).sum(1)
    assert bool((cos_x > cos_y).all())
    torch.testing.assert_close(out, gmm(y, x, 0.2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("safe", [False, True])
def test_orthogonal_inputs(safe):
    x = torch.tensor([[2.0, 0.0, 0.0]])
    y = torch.tensor([[0.0, 5.0, 0.0]])
    lam = 0.3
    expect = torch.tensor([[math.sin(lam * math.pi / 2), math.cos(lam * math.pi / 2), 0.0]])
    torch.testing.assert_close(gmm(x, y, lam, safe=safe), expect, atol=1e-6, rtol=0)


def test_theta_exactly_zero_official_gives_zero_vector():
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    y = torch.tensor([[3.0, 0.0, 0.0, 0.0]])  # same direction: c == 1 exactly
    out = gmm(x, y, 0.3)
    assert torch.equal(out, torch.zeros_like(out))


def test_theta_exactly_zero_safe_gives_normalised_input():
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    y = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(gmm(x, y, 0.3, safe=True), x, atol=1e-6, rtol=0)


def test_theta_near_zero_tends_to_linear_mix():
    x = torch.tensor([[1.0, 2.0, -1.0, 0.5]], dtype=torch.float64)
    y = x + 1e-4 * torch.tensor([[0.3, -0.2, 0.1, 0.4]], dtype=torch.float64)
    lam = 0.3
    lin = linear_mix(x, y, lam)
    safe = gmm(x, y, lam, safe=True)
    torch.testing.assert_close(safe, lin, atol=1e-6, rtol=0)
    torch.testing.assert_close(safe.norm(dim=1), torch.ones(1, dtype=torch.float64))
    # official: the same limit, shrunk by sin(theta) / (sin(theta) + 1e-8) -- the constant
    # matters once theta is within a few orders of magnitude of 1e-8
    theta = torch.arccos((l2_normalize(x) * l2_normalize(y)).sum(1, keepdim=True))
    shrink = torch.sin(theta) / (torch.sin(theta) + 1e-8)
    assert 1e-6 < theta.item() < 1e-3
    torch.testing.assert_close(gmm(x, y, lam), lin * shrink, atol=1e-7, rtol=0)


def test_safe_mode_gradients_are_finite_in_degenerate_cases():
    cases = [
        (torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[2.0, 0.0, 0.0]])),  # theta = 0
        (torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[-2.0, 0.0, 0.0]])),  # theta = pi
        (torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])),  # dead features
        (torch.randn(4, 3), torch.randn(4, 3)),
    ]
    for a, b in cases:
        a = a.clone().requires_grad_(True)
        b = b.clone().requires_grad_(True)
        out = gmm(a, b, 0.4, safe=True)
        assert torch.isfinite(out).all()
        (out * torch.arange(1.0, 4.0)).sum().backward()
        assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_safe_mode_nearly_collinear_equals_linear_mix():
    # below the clamp the slerp coefficients equal lam and 1 - lam to ~1e-8, so the safe
    # output is the linear mix whichever branch the where() picks
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 1e-9]], dtype=torch.float64)
    out = gmm(x, y, 0.25, safe=True)
    torch.testing.assert_close(out, linear_mix(x, y, 0.25), atol=1e-7, rtol=0)


def test_weight_tensor_carries_no_gradient(pair):
    x, y = (t.clone().requires_grad_(True) for t in pair)
    lam = torch.tensor(0.6, requires_grad=True)
    out = gmm(x, y, lam)
    out.sum().backward()
    assert lam.grad is None
    assert x.grad is not None and y.grad is not None
    torch.testing.assert_close(gmm(pair[0], pair[1], torch.tensor(0.6)), gmm(pair[0], pair[1], 0.6))


def test_low_precision_inputs_are_computed_in_float32(pair):
    x, y = pair
    out = gmm(x.bfloat16(), y.bfloat16(), 0.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, gmm(x, y, 0.5), atol=2e-2, rtol=0)


def test_linear_mix_hand_values():
    x = torch.tensor([[3.0, 4.0]])  # -> (0.6, 0.8)
    y = torch.tensor([[0.0, 2.0]])  # -> (0.0, 1.0)
    out = linear_mix(x, y, 0.25)
    torch.testing.assert_close(out, torch.tensor([[0.15, 0.2 + 0.75]]))
    torch.testing.assert_close(linear_mix(x, y, 1.0), torch.tensor([[0.6, 0.8]]))
