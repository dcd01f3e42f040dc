"""MMPareto method plugin: the Pareto weight, the combination and the rescale by hand, the step
against an official-style reference, runs, resume, three modalities and refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from method_checks import assert_resume_identical
from mmbalance.methods.mmpareto import (
    check_disjoint_groups,
    magnitude_factors,
    pareto_combine,
    pareto_weight,
)
from torch import nn

from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.runner import make_trainer, resolve_config, run
from mmbalance.trainer import to_device

SYN = {"epochs": 2, "n_train": 300, "n_test": 100}
T = torch.tensor


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest


def combine(g_mm, g_u, **kw):
    return pareto_combine([T(g) for g in g_mm], [T(g) for g in g_u], **kw)


def close(got, expected):
    torch.testing.assert_close([g.float() for g in got], [T(e, dtype=torch.float32) for e in expected])


# ---- the Pareto weight by hand -----------------------------------------------------------------
def test_weight_aligned_is_one_half():
    # |G^mm|^2 = 5, |G^u|^2 = 3, <,> = 3: cos = 3 / sqrt(15) > 0 -> plain sum
    w = pareto_weight(5.0, 3.0, 3.0)
    assert w.a.dtype == torch.float32 and w.a.dim() == 0
    torch.testing.assert_close(w.a, T(0.5))
    torch.testing.assert_close(w.cos, T(3.0 / math.sqrt(15.0)))
    assert not w.conflict and not w.denominator_guard


def test_weight_conflict_is_the_closed_form():
    # 6, 3, -3: a = (3 + 3) / (6 + 3 + 6) = 0.4, strictly inside (0, 1)
    w = pareto_weight(6.0, 3.0, -3.0)
    torch.testing.assert_close(w.a, T(0.4))
    assert w.conflict
    # exactly opposite, G^u = -3 G^mm: 5, 45, -15 -> a = 60 / 80 = 0.75 (min-norm point 0)
    torch.testing.assert_close(pareto_weight(5.0, 45.0, -15.0).a, T(0.75))


def test_orthogonal_counts_as_a_conflict():
    # cos = 0 exactly is NOT > 0: a = |G^u|^2 / (|G^mm|^2 + |G^u|^2) = 4 / 5, not 1/2
    w = pareto_weight(1.0, 4.0, 0.0)
    assert w.conflict
    torch.testing.assert_close(w.a, T(0.8))


def test_weight_boundaries_of_the_official_solver():
    torch.testing.assert_close(pareto_weight(0.0, 2.0, 0.0).a, T(0.999))  # G^mm = 0: <,> >= |G^mm|^2
    torch.testing.assert_close(pareto_weight(25.0, 0.0, 0.0).a, T(0.001))  # G^u = 0: <,> >= |G^u|^2
    torch.testing.assert_close(pareto_weight(0.0, 0.0, 0.0).a, T(0.999))  # both zero: the first test wins


def test_weight_is_not_clamped_inside_the_solver():
    # no clamp: |G^u| << |G^mm|, cos = -0.1: a = (1e-6 + 1e-4) / (1 + 1e-6 + 2e-4) < 0.001
    w = pareto_weight(1.0, 1e-6, -1e-4)
    torch.testing.assert_close(w.a, T(1.01e-4 / 1.000201), rtol=1e-5, atol=0)
    assert w.a.item() < 0.001


def test_denominator_guard():
    # |G^mm - G^u|^2 = 4e-14 + 2e-14 + 4e-14 = 1e-13 < 1e-12: a = 1/2, counted; official: 0.4
    w = pareto_weight(4e-14, 2e-14, -2e-14)
    torch.testing.assert_close(w.a, T(0.5))
    assert w.denominator_guard
    w = pareto_weight(4e-14, 2e-14, -2e-14, guards=False)
    torch.testing.assert_close(w.a, T(0.4))
    assert not w.denominator_guard


# ---- the rescale by hand -----------------------------------------------------------------------
def test_magnitude_factors_scale_up_never_down():
    factors, degenerate = magnitude_factors(T([2.0, 1.0, 3.0, 0.0]), T([1.0, 2.0, 3.0, 0.0]))
    torch.testing.assert_close(factors, T([2.0, 1.0, 1.0, 1.0]))
    assert degenerate.tolist() == [False, False, False, True]


def test_magnitude_factors_degenerate_threshold_is_relative():
    # |D| = 1e-7 next to inputs of norm 2: below 1e-12 + 1e-5 * 2, degenerate
    _, degenerate = magnitude_factors(T([1.0, 1.0]), T([1e-7, 1e-3]), scale=T([2.0, 2.0]))
    assert degenerate.tolist() == [True, False]


def test_magnitude_factors_official_arithmetic():
    factors, degenerate = magnitude_factors(T([2.0, 1.0, 0.0, 1.0]), T([1.0, 2.0, 0.0, 0.0]), guards=False)
    assert factors[:2].tolist() == [2.0, 1.0]
    assert factors[2].item() == 1.0  # 0/0 = NaN is not > 1: factor 1
    assert math.isinf(factors[3].item())  # 1/0 = inf: inf * D (the official NaN source)
    assert not degenerate.any()


# ---- the combination by hand -------------------------------------------------------------------
def test_combine_aligned_is_boosted_sum():
    # two tensors, <,> = 3 > 0: D = S = ([2, 1], [3]); factor 1; gamma = 1.5
    grads, stats = combine([[1.0, 0.0], [2.0]], [[1.0, 1.0], [1.0]])
    close(grads, [[3.0, 1.5], [4.5]])
    assert stats["conflict"].item() == 0.0 and stats["weight_mm"].item() == 0.5
    torch.testing.assert_close(stats["boost"], T(1.5))
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in stats.values())


CONFLICT_MM = [[2.0, 0.0], [1.0], [1.0]]
CONFLICT_U = [[-1.0, 1.0], [0.0], [-1.0]]
# |G^mm|^2 = 6, |G^u|^2 = 3, <,> = -3 -> a = 0.4, D = 0.8 G^mm + 1.2 G^u = ([0.4, 1.2], [0.8], [-0.4]),
# S = ([1, 1], [1], [0]). Per tensor: |S|/|D| = sqrt(2 / 1.6) = sqrt(1.25); 1 / 0.8 = 1.25; 0 / 0.4 = 0 -> 1.
R = math.sqrt(1.25)


def test_combine_conflict_per_tensor_rescale():
    grads, stats = combine(CONFLICT_MM, CONFLICT_U)
    close(grads, [[1.5 * R * 0.4, 1.5 * R * 1.2], [1.5 * 1.25 * 0.8], [1.5 * -0.4]])
    torch.testing.assert_close(stats["weight_mm"], T(0.4))
    torch.testing.assert_close(stats["cos"], T(-3.0 / math.sqrt(18.0)))
    assert stats["conflict"].item() == 1.0
    # the min-norm direction: <a G^mm + (1 - a) G^u, G^mm - G^u> = 0
    mm, u = torch.cat([T(g) for g in CONFLICT_MM]), torch.cat([T(g) for g in CONFLICT_U])
    assert abs(torch.dot(0.4 * mm + 0.6 * u, mm - u).item()) < 1e-6


def test_combine_conflict_global_rescale():
    # one factor: |S| / |D| = sqrt(3 / 2.4) = sqrt(1.25) for every tensor
    grads, _ = combine(CONFLICT_MM, CONFLICT_U, rescale="global")
    close(grads, [[1.5 * R * 0.4, 1.5 * R * 1.2], [1.5 * R * 0.8], [1.5 * R * -0.4]])


def test_combine_orthogonal_takes_the_min_norm_branch():
    # a = 0.8: D = [1.6, 0.8], S = [1, 2], |S|/|D| = sqrt(5 / 3.2) = 1.25 -> 1.5 * 1.25 * D
    grads, stats = combine([[1.0, 0.0]], [[0.0, 2.0]])
    close(grads, [[3.0, 1.5]])  # cos >= 0 taken as aligned would give [1.5, 3]
    assert stats["conflict"].item() == 1.0


def test_combine_exactly_opposite_falls_back_to_the_boosted_sum():
    # G^u = -3 G^mm: a = 0.75, D = 2 (0.75 G^mm - 0.75 G^mm) = 0 exactly; S = -2 G^mm -> gamma S
    grads, stats = combine([[1.0, -2.0]], [[-3.0, 6.0]])
    close(grads, [[-3.0, 6.0]])
    assert stats["guard_degenerate"].item() == 1.0
    # official arithmetic: |S| / |D| = inf, inf * 0 = NaN
    grads, stats = combine([[1.0, -2.0]], [[-3.0, 6.0]], guards=False)
    assert torch.isnan(grads[0]).all() and stats["guard_degenerate"].item() == 0.0


def test_combine_exactly_opposite_with_rounding_residue():
    # G^u = -2 G^mm: a = 2/3 is inexact in fp32, D is a rounding residue, not 0
    grads, stats = combine([[1.0, 2.0, 3.0]], [[-2.0, -4.0, -6.0]])
    close(grads, [[-1.5, -3.0, -4.5]])
    assert stats["guard_degenerate"].item() == 1.0
    grads, _ = combine([[1.0, 2.0, 3.0]], [[-2.0, -4.0, -6.0]], guards=False)
    assert not torch.allclose(grads[0], T([-1.5, -3.0, -4.5]))  # the residue blown up to |S|


def test_combine_zero_gradients():
    close(combine([[3.0, 4.0]], [[0.0, 0.0]])[0], [[4.5, 6.0]])  # a = 0.001, rescaled back: gamma G^mm
    close(combine([[0.0, 0.0]], [[1.0, 1.0]])[0], [[1.5, 1.5]])  # a = 0.999: gamma G^u
    grads, stats = combine([[0.0, 0.0]], [[0.0, 0.0]])
    close(grads, [[0.0, 0.0]])
    assert stats["guard_degenerate"].item() == 0.0  # S = 0 too: nothing rescued, not counted


def test_combine_nonfinite_gives_zero_update_and_counts():
    grads, stats = combine([[float("nan"), 0.0]], [[-1.0, 1.0]])
    close(grads, [[0.0, 0.0]])
    assert stats["guard_nonfinite"].item() == 1.0 and math.isnan(stats["weight_mm"].item())
    grads, stats = combine([[float("inf"), 0.0]], [[-1.0, 1.0]], guards=False)
    assert not torch.isfinite(grads[0]).all() and stats["guard_nonfinite"].item() == 1.0


def test_combine_bf16_gradients_computed_in_fp32():
    g_mm = [T(g, dtype=torch.bfloat16) for g in CONFLICT_MM]
    g_u = [T(g, dtype=torch.bfloat16) for g in CONFLICT_U]
    grads, stats = pareto_combine(g_mm, g_u)
    assert all(g.dtype == torch.float32 for g in grads) and stats["weight_mm"].dtype == torch.float32
    close(grads, [[1.5 * R * 0.4, 1.5 * R * 1.2], [1.5 * 1.25 * 0.8], [1.5 * -0.4]])


def test_combine_keeps_shapes_and_boost():
    g_mm = [torch.randn(3, 4), torch.randn(4), torch.randn(2, 2, 2)]
    g_u = [torch.randn(3, 4), torch.randn(4), torch.randn(2, 2, 2)]
    a, _ = pareto_combine(g_mm, g_u, boost=1.5)
    b, _ = pareto_combine(g_mm, g_u, boost=3.0)
    assert [g.shape for g in a] == [g.shape for g in g_mm]
    torch.testing.assert_close([2 * g for g in a], b)


# ---- the fourth backward is not needed -----------------------------------------------------------
def tiny_model():
    torch.manual_seed(0)
    enc = nn.ModuleDict({"a": nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)),
                         "b": nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))})
    heads = nn.ModuleDict({m: nn.Linear(3, 4) for m in enc})
    fused = nn.Linear(6, 4)
    x = {"a": torch.randn(8, 4), "b": torch.randn(8, 6)}
    y = torch.randint(0, 4, (8,))
    return enc, heads, fused, x, y


def test_sum_of_objective_gradients_equals_the_fourth_backward():
    enc, heads, fused, x, y = tiny_model()
    feats = {m: enc[m](x[m]) for m in enc}
    l_mm = F.cross_entropy(fused(torch.cat([feats["a"], feats["b"]], 1)), y)
    l_u = {m: F.cross_entropy(heads[m](feats[m]), y) for m in enc}
    for m in enc:
        params = list(enc[m].parameters())
        g_mm = torch.autograd.grad(l_mm, params, retain_graph=True)
        g_u = torch.autograd.grad(l_u[m], params, retain_graph=True)  # encoder-local
        g_u_full = torch.autograd.grad(l_u["a"] + l_u["b"], params, retain_graph=True)
        fourth = torch.autograd.grad(l_mm + l_u["a"] + l_u["b"], params, retain_graph=True)
        torch.testing.assert_close(g_u, g_u_full)  # the other modality's loss does not reach m
        torch.testing.assert_close([p + q for p, q in zip(g_mm, g_u, strict=True)], list(fourth))


# ---- the step inside the trainer ----------------------------------------------------------------
def step_trainer(tmp_path, dataset="synthetic", **overrides):
    t = make_trainer("mmpareto", dataset, {**SYN, "records": str(tmp_path / "runs"), "progress": "off",
                                           "device": "cpu", **overrides})
    t.setup()
    t.method.on_fit_start()
    return t


def captured_step(t, monkeypatch):
    """One training_step on the first batch; the gradients it hands to the optimizer (not stepped)."""
    seen = {}

    def capture(optimizer):
        seen.update({id(p): p.grad.clone() for g in optimizer.param_groups for p in g["params"]
                     if p.grad is not None})
        optimizer.zero_grad(set_to_none=True)

    monkeypatch.setattr(t, "optimizer_step", capture)
    t.model.train()
    batch = to_device(next(iter(t.loader(t.splits.train, train=False))), t.device)
    t._step_logs = {}
    loss = t.method.training_step(batch, 0)
    return seen, batch, loss


def official_reference(model, batch, gamma=1.5):
    """MMPareto as the official loop computes it: four backward passes, a Python cosine test,
    the solver on Python floats, S from the fourth backward, per-tensor ``if diff > 1``."""
    mods = model.modalities
    y = batch["label"]
    enc = {m: list(model.encoders[m].parameters()) for m in mods}

    def forward():
        out = model(batch)
        return F.cross_entropy(out.fused, y), {m: F.cross_entropy(out.uni[m], y) for m in mods}

    l_mm, l_u = forward()
    both = torch.autograd.grad(l_mm, [p for m in mods for p in enc[m]], retain_graph=True)
    own = {m: torch.autograd.grad(l_u[m], enc[m], retain_graph=True) for m in mods}
    total = torch.autograd.grad(l_mm + sum(l_u.values()), list(model.parameters()), allow_unused=True)
    fourth = {id(p): g for p, g in zip(model.parameters(), total, strict=True)}
    expected, k = {}, 0
    for m in mods:
        g_mm, g_u = both[k:k + len(enc[m])], own[m]
        k += len(enc[m])
        v1 = torch.cat([g.flatten() for g in g_mm]).double()
        v2 = torch.cat([g.flatten() for g in g_u]).double()
        if float(F.cosine_similarity(v1, v2, dim=0)) > 0:
            a = 0.5
        else:
            v1v1, v1v2, v2v2 = float(v1 @ v1), float(v1 @ v2), float(v2 @ v2)
            if v1v2 >= v1v1:
                a = 0.999
            elif v1v2 >= v2v2:
                a = 0.001
            else:
                a = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))
        for p, gm, gu in zip(enc[m], g_mm, g_u, strict=True):
            new = 2 * a * gm + 2 * (1 - a) * gu
            diff = float(fourth[id(p)].norm() / new.norm())
            expected[id(p)] = diff * new * gamma if diff > 1 else new * gamma
    for p in model.parameters():  # heads: the plain gradients of the fourth backward
        if id(p) not in expected and fourth[id(p)] is not None:
            expected[id(p)] = fourth[id(p)]
    return expected


@pytest.mark.parametrize("n_modalities", [2, 3])
def test_step_matches_the_official_procedure(tmp_path, monkeypatch, n_modalities):
    t = step_trainer(tmp_path, n_modalities=n_modalities)
    seen, batch, loss = captured_step(t, monkeypatch)
    expected = official_reference(t.model, batch)
    assert set(seen) == set(expected)  # encoders, fused head and every unimodal head
    for key, g in expected.items():
        torch.testing.assert_close(seen[key], g, rtol=1e-4, atol=1e-6)
    # the boost touches the encoders only: the heads' gradients are the plain ones
    head = t.model.fusion_params()[0]
    torch.testing.assert_close(seen[id(head)], expected[id(head)])
    mods = t.model.modalities
    assert {f"{k}_{m}" for k in ("cos", "conflict", "weight_mm", "boost", "loss") for m in mods} <= set(t._step_logs)
    assert loss.dim() == 0 and not loss.requires_grad


def test_step_assigns_the_combination_to_the_right_encoder(tmp_path, monkeypatch):
    """Each encoder gets pareto_combine of ITS OWN unimodal gradient (not the other modality's)."""
    t = step_trainer(tmp_path)
    seen, batch, _ = captured_step(t, monkeypatch)
    model, (m1, m2) = t.model, t.model.modalities
    out = model(batch)
    l_mm = F.cross_entropy(out.fused, batch["label"])
    l_u = {m: F.cross_entropy(out.uni[m], batch["label"]) for m in (m1, m2)}
    for m in (m1, m2):
        params = model.encoder_params(m)
        g_mm = torch.autograd.grad(l_mm, params, retain_graph=True)
        g_u = torch.autograd.grad(l_u[m], params, retain_graph=True)
        want, _ = pareto_combine(g_mm, g_u)
        torch.testing.assert_close([seen[id(p)] for p in params], want)


def test_bf16_autocast_step_keeps_fp32_gradients(tmp_path, monkeypatch):
    t = step_trainer(tmp_path, amp="bf16")
    seen, _, _ = captured_step(t, monkeypatch)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in seen.values())
    assert all(t._step_logs[f"weight_mm_{m}"][0].dtype == torch.float32 for m in t.model.modalities)


# ---- runs --------------------------------------------------------------------------------------
def test_synthetic_two_epochs_records_diagnostics(fast):
    res = run("mmpareto", "synthetic", {**fast, **SYN})
    rec = res.record
    assert rec["header"]["method_label"] == "MMPareto"
    info = rec["header"]["method_info"]
    assert info["per_modality"] == "unimodal_heads" and info["trains_unimodal_heads"]
    assert info["encoder_tensors"] == {"m1": 4, "m2": 4}
    assert len(rec["epochs"]) == 2
    for e in rec["epochs"]:
        d = e["diagnostics"]
        for m in ("m1", "m2"):
            assert {f"cos_{m}", f"conflict_{m}", f"weight_mm_{m}", f"boost_{m}", f"loss_{m}",
                    f"guard_denominator_{m}", f"guard_degenerate_{m}", f"guard_nonfinite_{m}"} <= set(d)
            assert 0.0 <= d[f"conflict_{m}"] <= 1.0 and d[f"guard_nonfinite_{m}"] == 0.0
        assert {"m1", "m2"} <= set(e["val"])
        assert e["optimizer_steps"] == e["train_batches"]  # one step per batch
    rows = [json.loads(x) for x in (res.run_dir / "diagnostics" / "epoch_0001.jsonl").read_text().splitlines()]
    assert rows
    for r in rows:
        for m in ("m1", "m2"):
            assert (r[f"cos_{m}"] > 0) == (r[f"conflict_{m}"] == 0.0)
            if r[f"conflict_{m}"] == 0.0:  # plain sum, boosted by 1.5
                assert r[f"weight_mm_{m}"] == 0.5 and r[f"boost_{m}"] == pytest.approx(1.5, rel=1e-5)
            else:
                assert 0.0 < r[f"weight_mm_{m}"] < 1.0 and r[f"boost_{m}"] >= 1.5 * (1 - 1e-5)


def test_avdigits_two_epochs(fast, shared_data):
    res = run("mmpareto", "avdigits", {**fast, "epochs": 2, "limit_train_batches": 5, "limit_eval_batches": 3})
    rec = res.record
    assert len(rec["epochs"]) == 2
    d = rec["epochs"][1]["diagnostics"]
    assert {"conflict_audio", "conflict_image", "weight_mm_audio", "boost_image"} <= set(d)
    assert all(n > 0 for n in rec["header"]["method_info"]["encoder_tensors"].values())


def test_resume_is_identical(tmp_path, monkeypatch):
    assert_resume_identical("mmpareto", "synthetic", {**SYN, "progress": "off", "device": "cpu"},
                            tmp_path, monkeypatch)


def test_three_modalities_run(fast):
    rec = run("mmpareto", "synthetic", {**fast, **SYN, "epochs": 1, "n_modalities": 3}).record
    d = rec["epochs"][0]["diagnostics"]
    assert {f"conflict_{m}" for m in ("m1", "m2", "m3")} <= set(d)
    assert {"m1", "m2", "m3"} <= set(rec["epochs"][0]["test"])


def test_sum_fusion_and_global_rescale_run(fast):
    rec = run("mmpareto", "synthetic", {**fast, **SYN, "epochs": 1, "fusion_mode": "sum",
                                        "rescale": "global"}).record
    assert rec["header"]["method_label"] == "MMPareto (global rescale, sum fusion)"
    assert "boost_m2" in rec["epochs"][0]["diagnostics"]


# ---- defaults, labels, refusals ----------------------------------------------------------------
def test_defaults_and_labels():
    cfg, _, cls = resolve_config("mmpareto", "cremad", {})
    assert (cfg["boost"], cfg["rescale"], cfg["fusion_mode"], cfg["guards"]) == (1.5, "tensor", "concat", True)

    def label(**o):
        c, _, k = resolve_config("mmpareto", "synthetic", o)
        return k(c).label()

    assert label() == "MMPareto"
    assert label(boost=1.0, guards=False) == "MMPareto (gamma=1, no guards)"


def test_one_modality_refused(fast):
    with pytest.raises(UnsupportedError, match=r"Method 'mmpareto'.*at least two modalities.*1"):
        make_trainer("mmpareto", "synthetic", {**fast, **SYN, "n_modalities": 1}).check()


def test_bad_options_refused(fast):
    for bad in ({"boost": 0.0}, {"rescale": "layer"}, {"fusion_mode": "weight"}, {"guard_eps": -1.0}):
        with pytest.raises(ConfigError):
            make_trainer("mmpareto", "synthetic", {**fast, **SYN, **bad})


def test_frozen_encoder_refused(tmp_path):
    t = make_trainer("mmpareto", "synthetic", {**SYN, "records": str(tmp_path), "device": "cpu"})
    t.setup()
    for p in t.model.encoder_params("m2"):
        p.requires_grad_(False)
    with pytest.raises(UnsupportedError, match=r"Method 'mmpareto'.*encoder of m2 has no trainable"):
        t.method.on_fit_start()


def test_shared_encoder_parameters_refused():
    shared = nn.Parameter(torch.zeros(2))
    with pytest.raises(UnsupportedError, match=r"Method 'mmpareto'.*'encoder.a' and 'encoder.b'.*general"):
        check_disjoint_groups({"encoder.a": [shared], "encoder.b": [nn.Parameter(torch.zeros(1)), shared]})
    check_disjoint_groups({"encoder.a": [nn.Parameter(torch.zeros(1))], "encoder.b": [shared]})


def test_distributed_refused(tmp_path, monkeypatch):
    t = make_trainer("mmpareto", "synthetic", {**SYN, "records": str(tmp_path), "device": "cpu"})
    t.setup()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    with pytest.raises(UnsupportedError, match=r"Method 'mmpareto'.*all-reduced"):
        t.method.on_fit_start()


# ---- wrong variants that earlier tests let pass (issue 21) -------------------------------------
def force_conflict(model):
    """Turn each unimodal head against the fused head's block of its modality (plus a fixed
    perturbation, so the conflict is partial), so L_m and L_mm pull the encoder apart (cos < 0,
    a far from 1/2): only then do the solver and the rescale act."""
    fc = model.fusion.fc
    gen = torch.Generator().manual_seed(0)
    start = 0
    with torch.no_grad():
        for m in model.modalities:
            d = model.dims[m]
            w = model.uni_heads[m].weight
            w.copy_(-3.0 * fc.weight[:, start:start + d] + 0.5 * torch.randn(w.shape, generator=gen))
            start += d


def test_rescale_option_reaches_the_step(tmp_path, monkeypatch):
    """Wrong variant caught: ``rescale`` not reaching the step (the per-tensor rule used
    whatever the option says). Under a conflict, the step's encoder gradients are
    pareto_combine with the run's rescale, and the two rescales give other gradients."""
    seen = {}
    for rescale in ("tensor", "global"):
        t = step_trainer(tmp_path / rescale, rescale=rescale)
        force_conflict(t.model)
        grads, batch, _ = captured_step(t, monkeypatch)
        out = t.model(batch)
        y = batch["label"]
        l_mm = F.cross_entropy(out.fused, y)
        for m in t.model.modalities:
            params = t.model.encoder_params(m)
            g_mm = torch.autograd.grad(l_mm, params, retain_graph=True)
            g_u = torch.autograd.grad(F.cross_entropy(out.uni[m], y), params, retain_graph=True)
            want, stats = pareto_combine(g_mm, g_u, rescale=rescale)
            assert stats["conflict"].item() == 1.0
            torch.testing.assert_close([grads[id(p)] for p in params], want, rtol=1e-5, atol=1e-7)
            seen[rescale, m] = torch.cat([g.flatten() for g in want])
    for m in ("m1", "m2"):
        assert not torch.allclose(seen["tensor", m], seen["global", m], rtol=1e-2, atol=1e-4)


def test_fusion_mode_option_reaches_the_step(tmp_path, monkeypatch):
    """Wrong variant caught: ``fusion_mode`` not reaching the model (a concat head built
    whatever the option says): with sum the fused loss is CE(sum_m (W_m e_m + b_m))."""
    from mmbalance.heads import SumHead

    t = step_trainer(tmp_path, fusion_mode="sum")
    assert isinstance(t.model.fusion, SumHead)
    _, batch, _ = captured_step(t, monkeypatch)
    feats = t.model.encode(batch)
    fcs = t.model.fusion.fcs
    by_hand = F.cross_entropy(sum(fcs[m](feats[m]) for m in ("m1", "m2")), batch["label"])
    torch.testing.assert_close(t._step_logs["loss_mm"][-1], by_hand.detach())


@pytest.mark.parametrize(("delta", "degenerate"), [(1.5e-5, True), (3e-5, False)])
def test_degenerate_threshold_at_its_boundary(delta, degenerate):
    """Wrong variants caught: another degenerate-D threshold (a relative factor other than
    1e-5, a purely absolute threshold, or a scale taken from |S| instead of |G^mm| + |G^u|).
    G^mm = (1, 0), G^u = (-1, delta): a = 1/2 in fp32, D = (0, delta), |D| = delta, S = (0, delta),
    |G^mm| + |G^u| = 2: degenerate iff delta <= 1e-12 + 1e-5 * 2 = 2e-5."""
    grads, stats = combine([[1.0, 0.0]], [[-1.0, delta]])
    assert stats["weight_mm"].item() == 0.5 and stats["conflict"].item() == 1.0
    assert stats["guard_degenerate"].item() == (1.0 if degenerate else 0.0)
    close(grads, [[0.0, 1.5 * delta]])  # gamma S or gamma D: the same vector here
