"""OGM-GE method plugin: scores, coefficients and noise by hand, the modulated step, runs."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from method_checks import assert_resume_identical
from mmbalance.methods.ogm import (
    NOISE_EPS,
    modulate_,
    noise_std,
    noise_stds,
    ogm_coefficients,
    select_params,
    true_class_scores,
)
from torch import nn

from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.runner import make_trainer, resolve_config, run
from mmbalance.trainer import to_device

SYN = {"epochs": 2, "n_train": 300, "n_test": 100}


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest


# ---- mathematics by hand -----------------------------------------------------------------------
def test_true_class_scores_by_hand():
    ln3, ln4 = math.log(3.0), math.log(4.0)
    parts = {
        "a": torch.tensor([[0.0, ln3], [ln4, 0.0]]),  # softmax rows (0.25, 0.75), (0.8, 0.2)
        "b": torch.zeros(2, 2, dtype=torch.bfloat16),  # (0.5, 0.5) twice
    }
    y = torch.tensor([1, 0])
    s = true_class_scores(parts, y)
    assert s["a"].dim() == 0 and s["a"].dtype == torch.float32
    assert s["b"].dtype == torch.float32  # fp32 even from bf16 logits
    torch.testing.assert_close(s["a"], torch.tensor(0.75 + 0.8))
    torch.testing.assert_close(s["b"], torch.tensor(1.0))


def test_coefficients_by_hand():
    # s_a = 3, s_b = 1.5, alpha 0.8: rho_a = 2, k_a = 1 - tanh(1.6) = 0.0783314456, k_b = 1
    k_a, k_b, rho = ogm_coefficients(torch.tensor(3.0), torch.tensor(1.5), 0.8)
    assert isinstance(k_a, torch.Tensor) and k_a.dim() == 0 and not k_a.requires_grad
    torch.testing.assert_close(k_a, torch.tensor(0.0783314456))
    torch.testing.assert_close(k_b, torch.tensor(1.0))
    torch.testing.assert_close(rho, torch.tensor(2.0))
    # s_a = 1, s_b = 4, alpha 0.1: rho_b = 4, k_b = 1 - tanh(0.4) = 0.6200510377, k_a = 1
    k_a, k_b, rho = ogm_coefficients(torch.tensor(1.0), torch.tensor(4.0), 0.1)
    torch.testing.assert_close(k_a, torch.tensor(1.0))
    torch.testing.assert_close(k_b, torch.tensor(0.6200510377))
    torch.testing.assert_close(rho, torch.tensor(0.25))


def test_tie_rule_by_hand():
    # exact tie: 1 - tanh(0.8) = 0.3359632297 on the first modality (CVPR) or the second (journal)
    k_a, k_b, rho = ogm_coefficients(torch.tensor(2.0), torch.tensor(2.0), 0.8, tie="first")
    torch.testing.assert_close((k_a, k_b, rho), (torch.tensor(0.3359632297), torch.tensor(1.0), torch.tensor(1.0)))
    k_a, k_b, _ = ogm_coefficients(torch.tensor(2.0), torch.tensor(2.0), 0.8, tie="second")
    torch.testing.assert_close((k_a, k_b), (torch.tensor(1.0), torch.tensor(0.3359632297)))


def test_degenerate_scores_never_nan():
    k_a, k_b, rho = ogm_coefficients(torch.tensor(1.0), torch.tensor(0.0), 0.8)
    assert (k_a.item(), k_b.item()) == (0.0, 1.0) and math.isfinite(rho.item())
    k_a, k_b, rho = ogm_coefficients(torch.tensor(0.0), torch.tensor(0.0), 0.8)  # a tie
    torch.testing.assert_close((k_a, k_b, rho), (torch.tensor(0.3359632297), torch.tensor(1.0), torch.tensor(1.0)))


def test_noise_std_by_hand():
    # unbiased std of (1, 2, 3, 4) = sqrt(5/3) = 1.2909944487; plus the official 1e-8
    sd = noise_std(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert sd.dim() == 0 and sd.dtype == torch.float32
    torch.testing.assert_close(sd, torch.tensor(1.2909944487 + 1e-8))
    # rule for a one-element gradient (no unbiased std): std 0, so the noise std is the epsilon
    assert noise_std(torch.tensor([5.0])).item() == pytest.approx(NOISE_EPS, rel=1e-6)
    assert noise_std(torch.tensor(5.0)).item() == pytest.approx(NOISE_EPS, rel=1e-6)


def test_noise_stds_of_several_tensors_match_torch_std():
    grads = [torch.randn(3, 4, 2, 2), torch.tensor([7.0]), torch.randn(5), torch.randn(2, 3)]
    sds = noise_stds(grads)
    assert sds.shape == (4,) and sds.dtype == torch.float32
    expected = torch.stack([grads[0].std(), torch.tensor(0.0), grads[2].std(), grads[3].std()]) + NOISE_EPS
    torch.testing.assert_close(sds, expected)


def test_modulate_several_tensors_uses_one_draw_split_in_order():
    a, b = torch.randn(4, 3), torch.randn(5)
    ref_a, ref_b = a.clone(), b.clone()
    modulate_([a, b], torch.tensor(0.5), noise=True, generator=torch.Generator().manual_seed(3))
    draw = torch.randn(17, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, 0.5 * ref_a + draw[:12].view(4, 3) * (ref_a.std() + NOISE_EPS))
    torch.testing.assert_close(b, 0.5 * ref_b + draw[12:] * (ref_b.std() + NOISE_EPS))


def test_modulate_scales_exactly_without_noise():
    g = torch.tensor([1.0, -2.0, 4.0])
    modulate_([g], torch.tensor(0.25), noise=False)
    assert torch.equal(g, torch.tensor([0.25, -0.5, 1.0]))


def test_modulate_noise_is_the_unscaled_std():
    """g' = k g + sd(g) * eps: the residual's std is the UNscaled gradient's (3), not k * 3."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(200_000, generator=gen) * 3.0 + 1.0
    before = g.clone()
    modulate_([g], torch.tensor(0.1), noise=True, generator=torch.Generator().manual_seed(1))
    residual = g - 0.1 * before
    assert residual.std().item() == pytest.approx(before.std().item(), rel=0.02)
    assert abs(residual.mean().item()) < 0.05
    # and it is exactly k g + (std + 1e-8) * N(0, 1) from the given generator
    draw = torch.randn(before.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(g, before * 0.1 + draw * (before.std() + NOISE_EPS))


def test_one_element_parameter_gets_no_nan():
    p = nn.Parameter(torch.tensor([2.0]))
    s = nn.Parameter(torch.tensor(3.0))
    p.grad, s.grad = torch.tensor([5.0]), torch.tensor(-1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on std with <= 0 degrees of freedom
        modulate_([p.grad, s.grad], torch.tensor(0.5), noise=True)
    assert torch.isfinite(p.grad).all() and torch.isfinite(s.grad).all()
    assert p.grad.item() == pytest.approx(2.5, abs=1e-6)
    assert s.grad.item() == pytest.approx(-0.5, abs=1e-6)


def test_bf16_gradient_is_modulated_in_fp32():
    g = torch.tensor([1.0, 3.0], dtype=torch.bfloat16)
    modulate_([g], torch.tensor(0.5), noise=False)
    assert g.dtype == torch.bfloat16 and torch.equal(g, torch.tensor([0.5, 1.5], dtype=torch.bfloat16))


def test_select_params_official_filter():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    conv_weight = net[0].weight
    assert [id(p) for p in select_params(list(net.parameters()), True)] == [id(conv_weight)]
    assert len(select_params(list(net.parameters()), False)) == 6


# ---- the modulated training step ---------------------------------------------------------------
def step_trainer(tmp_path, **overrides):
    t = make_trainer("ogm", "synthetic", {**SYN, "records": str(tmp_path / "runs"), "progress": "off",
                                          "device": "cpu", **overrides})
    t.setup()
    t.method.on_fit_start()
    return t


def one_step(t, epoch=0):
    """Forward + backward of one batch; returns the grads before and after on_after_backward."""
    method, model = t.method, t.model
    method.epoch = epoch
    method.on_train_epoch_start(epoch)
    model.train()
    batch = to_device(next(iter(t.loader(t.splits.train, train=False))), t.device)
    t.optimizer.zero_grad(set_to_none=True)
    loss = method.training_step(batch, 0)
    coeffs = dict(method._coeffs)
    loss.backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    method.on_after_backward()
    after = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return coeffs, before, after, batch


def test_step_scales_the_dominant_encoder_only(tmp_path):
    t = step_trainer(tmp_path, ge=False)
    coeffs, before, after, batch = one_step(t)
    # the coefficients are Eq. 10 on the fused head's parts of this batch
    with torch.no_grad():
        parts = t.model.fusion.parts(t.model.encode(batch))
    s = true_class_scores(parts, batch["label"])
    k1, k2, _ = ogm_coefficients(s["m1"], s["m2"], 0.8)
    torch.testing.assert_close((coeffs["m1"], coeffs["m2"]), (k1, k2))
    dominant = "m1" if s["m1"] >= s["m2"] else "m2"
    assert coeffs[dominant].item() < 1.0
    assert all(coeffs[m].item() == 1.0 for m in coeffs if m != dominant)
    for name in before:
        if name.startswith(f"encoders.{dominant}."):
            torch.testing.assert_close(after[name], before[name] * coeffs[dominant])
            assert not torch.equal(after[name], before[name])
        else:  # the other encoder, the fused head: untouched
            assert torch.equal(after[name], before[name]), name


def test_step_with_ge_noises_both_encoders_scales_only_the_dominant(tmp_path):
    t = step_trainer(tmp_path)
    coeffs, before, after, _ = one_step(t)
    changed = {n.split(".")[1] for n in before if n.startswith("encoders.") and not torch.equal(before[n], after[n])}
    assert changed == {"m1", "m2"}
    assert all(torch.equal(before[n], after[n]) for n in before if not n.startswith("encoders."))
    assert all(torch.isfinite(g).all() for g in after.values())
    assert not any(n.startswith("uni_heads.") for n in before)  # the unimodal heads get no loss
    for name in before:  # big tensors: residual = noise of the unscaled std, after k * g
        if name.startswith("encoders.") and before[name].numel() >= 2000:
            k = coeffs[name.split(".")[1]]
            residual = after[name] - k * before[name]
            assert residual.std().item() == pytest.approx(before[name].std().item(), rel=0.1), name


def test_bf16_autocast_scores_stay_fp32(tmp_path):
    t = step_trainer(tmp_path, amp="bf16")
    batch = to_device(next(iter(t.loader(t.splits.train, train=False))), t.device)
    with t.autocast():
        feats = t.model.encode(batch)
        scores = t.method.scores(feats, batch["label"])
    assert feats["m1"].dtype == torch.bfloat16
    assert all(s.dtype == torch.float32 for s in scores.values())
    parts = t.model.fusion.parts({m: f.float() for m, f in feats.items()})
    torch.testing.assert_close(scores, true_class_scores(parts, batch["label"]))


def test_adaptive_optimizer_warns(tmp_path):
    with pytest.warns(UserWarning, match="normalised away"):
        step_trainer(tmp_path, optimizer="adamw")


@pytest.mark.parametrize(("epoch", "modulated"), [(0, False), (1, True), (2, True), (3, False)])
def test_window_is_inclusive_and_zero_based(tmp_path, epoch, modulated):
    t = step_trainer(tmp_path, modulation_starts=1, modulation_ends=2)
    _, before, after, _ = one_step(t, epoch)
    enc = [n for n in before if n.startswith("encoders.")]
    assert any(not torch.equal(before[n], after[n]) for n in enc) == modulated


def test_official_4d_filter_modulates_nothing_on_mlp_encoders(tmp_path):
    with pytest.warns(UserWarning, match="modulates nothing"):
        t = step_trainer(tmp_path, conv4d_only=True)
    _, before, after, _ = one_step(t)
    assert all(torch.equal(before[n], after[n]) for n in before)


# ---- runs --------------------------------------------------------------------------------------
def test_synthetic_two_epochs_records_diagnostics(fast):
    res = run("ogm", "synthetic", {**fast, **SYN})
    rec = res.record
    assert rec["header"]["method_label"] == "OGM-GE"
    info = rec["header"]["method_info"]
    assert info["per_modality"] == "fused_parts" and not info["trains_unimodal_heads"]
    assert info["modulated_tensors"] == {"m1": 4, "m2": 4}  # MLP: 2 linear layers per encoder
    for e in rec["epochs"]:
        assert {"ratio", "coeff_m1", "coeff_m2"} <= set(e["diagnostics"])
        assert {"m1", "m2"} <= set(e["val"])  # per-modality accuracy from the parts
    rows = [json.loads(x) for x in (res.run_dir / "diagnostics" / "epoch_0001.jsonl").read_text().splitlines()]
    assert rows
    for r in rows:  # per step: Eq. 10 from the logged ratio, on the dominant modality only
        rho = r["ratio"]
        if rho >= 1:
            assert r["coeff_m1"] == pytest.approx(1 - math.tanh(0.8 * rho), abs=1e-5) and r["coeff_m2"] == 1.0
        else:
            assert r["coeff_m2"] == pytest.approx(1 - math.tanh(0.8 / rho), abs=1e-5) and r["coeff_m1"] == 1.0


def test_sum_fusion_and_plain_ogm_run(fast):
    rec = run("ogm", "synthetic", {**fast, **SYN, "epochs": 1, "fusion_mode": "sum", "ge": False}).record
    assert rec["header"]["method_label"] == "OGM (sum fusion)"
    assert "ratio" in rec["epochs"][0]["diagnostics"]


def test_avdigits_two_epochs(fast, shared_data):
    res = run("ogm", "avdigits", {**fast, "epochs": 2, "limit_train_batches": 5, "limit_eval_batches": 3})
    rec = res.record
    assert len(rec["epochs"]) == 2
    assert {"ratio", "coeff_audio", "coeff_image"} <= set(rec["epochs"][1]["diagnostics"])
    assert all(rec["header"]["method_info"]["modulated_tensors"][m] > 0 for m in ("audio", "image"))


def test_avdigits_official_filter_keeps_the_audio_conv_kernels_only(fast, shared_data):
    t = make_trainer("ogm", "avdigits", {**fast, "conv4d_only": True})
    t.setup()
    with pytest.warns(UserWarning, match="image has none"):
        t.method.on_fit_start()
    kept = t.method._params
    assert kept["image"] == [] and kept["audio"] and all(p.dim() == 4 for p in kept["audio"])
    assert len(kept["audio"]) == sum(1 for p in t.model.encoder_params("audio") if p.dim() == 4)


def test_resume_is_identical(tmp_path, monkeypatch):
    assert_resume_identical("ogm", "synthetic", {**SYN, "progress": "off", "device": "cpu"}, tmp_path, monkeypatch)


# ---- defaults, labels, refusals ----------------------------------------------------------------
def test_paper_defaults_per_dataset():
    cfg, _, _ = resolve_config("ogm", "ksounds", {})
    assert (cfg["alpha"], cfg["modulation_starts"], cfg["modulation_ends"], cfg["tie"]) == (0.8, 6, 60, "second")
    cfg, _, _ = resolve_config("ogm", "cremad", {})
    assert (cfg["alpha"], cfg["modulation_starts"], cfg["modulation_ends"], cfg["tie"]) == (0.8, 0, 50, "first")


def test_labels():
    def label(**o):
        cfg, _, cls = resolve_config("ogm", "synthetic", o)
        return cls(cfg).label()

    assert label() == "OGM-GE"
    assert label(ge=False, alpha=0.3) == "OGM (alpha=0.3)"
    assert label(conv4d_only=True, modulation_ends=10) == "OGM-GE (window 0-10, 4-D kernels only)"


def test_three_modalities_refused(fast):
    with pytest.raises(UnsupportedError, match=r"Method 'ogm'.*exactly two.*3"):
        make_trainer("ogm", "synthetic", {**fast, **SYN, "n_modalities": 3}).check()


def test_weight_fusion_refused(fast):
    with pytest.raises(UnsupportedError, match=r"Method 'ogm'.*'weight' fusion.*do not split by modality"):
        make_trainer("ogm", "synthetic", {**fast, **SYN, "fusion_mode": "weight"})


def test_empty_window_refused(fast):
    with pytest.raises(ConfigError, match=r"Method 'ogm'.*window is empty"):
        make_trainer("ogm", "synthetic", {**fast, **SYN, "modulation_starts": 5, "modulation_ends": 4})


def test_bad_option_values_refused(fast):
    with pytest.raises(ConfigError):
        make_trainer("ogm", "synthetic", {**fast, **SYN, "alpha": -0.1})
    with pytest.raises(ConfigError):
        make_trainer("ogm", "synthetic", {**fast, **SYN, "tie": "both"})


# ---- wrong variants that earlier tests let pass (issue 21) -------------------------------------
@pytest.mark.parametrize(("epoch", "inside"), [(0, False), (1, True), (2, True), (3, False)])
def test_logged_coefficients_are_the_applied_ones(tmp_path, epoch, inside):
    """Wrong variant caught: the computed coefficient logged outside the window, where the
    gradients are not modulated (the diagnostics must say what was applied: 1 there)."""
    t = step_trainer(tmp_path, ge=False, modulation_starts=1, modulation_ends=2)
    t._step_logs = {}
    coeffs, before, after, _ = one_step(t, epoch)
    logged = {m: t._step_logs[f"coeff_{m}"][-1] for m in ("m1", "m2")}
    assert min(c.item() for c in coeffs.values()) < 1.0  # a modality is dominant in this batch
    if inside:
        torch.testing.assert_close(logged, coeffs)
    else:
        assert all(v.item() == 1.0 for v in logged.values())
        assert all(torch.equal(before[n], after[n]) for n in before)


def test_concat_scores_use_half_the_bias_per_modality_by_hand(tmp_path):
    """Wrong variant caught: the concat head's per-modality parts with the whole bias b instead
    of b/2 each (the official ``weight_size`` split: ``W_a a + b/2``, ``W_v v + b/2``). The parts
    are written out here from the head's weight and bias, not taken from ``fusion.parts``."""
    t = step_trainer(tmp_path, ge=False)
    fc = t.model.fusion.fc
    with torch.no_grad():  # a bias large enough that b and b/2 give clearly other scores
        fc.bias.copy_(torch.linspace(-3.0, 3.0, fc.bias.numel()))
    method, model = t.method, t.model
    batch = to_device(next(iter(t.loader(t.splits.train, train=False))), t.device)
    model.train()
    method.on_train_epoch_start(0)
    method.training_step(batch, 0)
    with torch.no_grad():
        feats = model.encode(batch)
        d1 = feats["m1"].shape[1]
        w1, w2 = fc.weight[:, :d1], fc.weight[:, d1:]
        half = {"m1": feats["m1"] @ w1.t() + fc.bias / 2, "m2": feats["m2"] @ w2.t() + fc.bias / 2}
        whole = {"m1": feats["m1"] @ w1.t() + fc.bias, "m2": feats["m2"] @ w2.t() + fc.bias}
    y = batch["label"]
    for parts, right in ((half, True), (whole, False)):
        s = true_class_scores(parts, y)
        k1, k2, _ = ogm_coefficients(s["m1"], s["m2"], 0.8)
        got = (method._coeffs["m1"], method._coeffs["m2"])
        if right:
            torch.testing.assert_close(got, (k1, k2), rtol=1e-5, atol=1e-6)
        else:
            assert not torch.allclose(torch.stack(got), torch.stack((k1, k2)), rtol=1e-3, atol=1e-4)
