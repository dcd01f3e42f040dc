"""Geodesic multimodal mixup (IPRM Eq. (1)) against hand values and a float64 rotation formula."""

from __future__ import annotations

import math
import os

import pytest
import torch

from mmbalance.fusion import (
    OFFICIAL_SIN_EPS,
    gmm,
    l2_normalize,
    linear_at,
    linear_mix,
    normalized_pair,
    slerp_at,
    sphere_geometry,
)

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


def gmm_in_one_expression(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """The official formula as one expression (docs/methods/iprm.md), the way it was computed before the
    geometry was split out: normalise, clamp, arccos, the 1e-8 denominator, the two sines."""
    xb = x / x.norm(dim=-1, keepdim=True)
    yb = y / y.norm(dim=-1, keepdim=True)
    theta = torch.arccos((xb * yb).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0))
    s = torch.sin(theta) + OFFICIAL_SIN_EPS
    w = torch.tensor(lam)
    return torch.sin(w * theta) / s * xb + torch.sin((1.0 - w) * theta) / s * yb


def test_one_geometry_mixed_at_two_weights_equals_two_full_gmm_passes_bit_for_bit(pair):
    """IPRM prepares a pair once and mixes it at the probe weight and at the rebalance weight:
    both mixes, and the gradients through the shared geometry, equal the one-expression
    formula computed twice from scratch, to the last bit."""
    x0, y0 = (t.relu() + 0.05 for t in pair)  # post-ReLU features, as the encoders emit
    lams = (0.37, 0.61)
    xs, ys = x0.clone().requires_grad_(), y0.clone().requires_grad_()
    geom = sphere_geometry(xs, ys)
    with torch.no_grad():
        probe = slerp_at(geom, torch.tensor(lams[0]))
    shared = slerp_at(geom, torch.tensor([lams[1]]))  # a (1,) weight, as the plugin's state
    g = torch.randn_like(shared)
    (shared * g).sum().backward()
    xr, yr = x0.clone().requires_grad_(), y0.clone().requires_grad_()
    ref = gmm_in_one_expression(xr, yr, lams[1])
    (ref * g).sum().backward()
    assert torch.equal(probe, gmm_in_one_expression(x0, y0, lams[0]))
    assert torch.equal(shared, ref)
    assert torch.equal(xs.grad, xr.grad) and torch.equal(ys.grad, yr.grad)
    assert not probe.requires_grad  # the probe half built no graph


@pytest.mark.parametrize("safe", [False, True])
def test_prepared_mixes_leave_the_geometry_unchanged(pair, safe):
    x, y = pair
    geom = sphere_geometry(x, y, safe)
    before = [t.clone() for t in geom if t is not None]
    first = slerp_at(geom, 0.2)
    slerp_at(geom, 0.9)
    linear_at(geom, 0.4)
    assert all(torch.equal(a, b) for a, b in zip(before, [t for t in geom if t is not None], strict=True))
    assert torch.equal(first, slerp_at(geom, 0.2))
    torch.testing.assert_close(first.double(), slerp_by_rotation(x, y, 0.2), atol=2e-6, rtol=0)


def test_weight_shapes_scalar_single_element_and_per_row(pair):
    x, y = pair
    geom = sphere_geometry(x, y)
    at_scalar = slerp_at(geom, 0.3)
    assert torch.equal(slerp_at(geom, torch.tensor(0.3)), at_scalar)
    assert torch.equal(slerp_at(geom, torch.tensor([0.3])), at_scalar)  # (1,) broadcasts as is
    per_row = torch.linspace(0.1, 0.9, len(x))
    rows = slerp_at(geom, per_row)  # (B,) becomes a column: one weight per sample
    for i in (0, 7, len(x) - 1):
        torch.testing.assert_close(rows[i], gmm(x[i : i + 1], y[i : i + 1], float(per_row[i]))[0], atol=1e-6, rtol=0)


def test_linear_parts_equal_linear_mix_and_need_no_angle(pair):
    x, y = pair
    geom = normalized_pair(x, y)
    assert geom.theta is None and geom.s is None
    assert torch.equal(linear_at(geom, 0.25), linear_mix(x, y, 0.25))
    torch.testing.assert_close(linear_at(geom, 0.25), 0.25 * l2_normalize(x) + 0.75 * l2_normalize(y))
    with pytest.raises(AssertionError, match="sphere_geometry"):
        slerp_at(geom, 0.5)


def test_prepared_geometry_keeps_the_degenerate_cases():
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    y = torch.tensor([[3.0, 0.0, 0.0, 0.0]])  # theta = 0 exactly
    assert torch.equal(slerp_at(sphere_geometry(x, y), 0.3), torch.zeros_like(x))
    torch.testing.assert_close(slerp_at(sphere_geometry(x, y, safe=True), 0.3), x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("safe", [False, True])
def test_prepare_and_mix_need_no_host_sync(safe):
    """On the meta device any .item()/bool() on a tensor raises: GMM stays on-device."""
    x, y = torch.empty(4, 3, device="meta"), torch.empty(4, 3, device="meta")
    geom = sphere_geometry(x, y, safe)
    out = slerp_at(geom, torch.empty(1, device="meta"))
    assert out.device.type == "meta" and out.shape == (4, 3)
