"""AGM method plugin: Shapley outputs, coefficients (official sign), running mean, gradient
scaling, clip guard, window, state, refusals and short runs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from method_checks import assert_resume_identical
from mmbalance.methods.agm import (
    AGM,
    ScaleGrad,
    agm_coefficients,
    clip_guard_,
    coalitions,
    modulated_output,
    running_mean_update,
    shapley_outputs,
    shapley_weight,
    unimodal_scores,
)

from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.runner import make_trainer, run
from mmbalance.trainer import to_device

SMALL = {"epochs": 2, "n_train": 300, "n_test": 100}
TINY = {"device": "cpu", "progress": "off", "n_train": 120, "n_test": 60, "dim": 16, "embed_dim": 16,
        "batch_size": 32, "checkpoint": False}


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest


def fs(*names: str) -> frozenset[str]:
    return frozenset(names)


def t(*v: float) -> torch.Tensor:
    return torch.tensor([list(v)])


def setup_trainer(tmp_path, **overrides):
    trainer = make_trainer("agm", "synthetic", {**TINY, "records": str(tmp_path / "runs"), **overrides})
    trainer.setup()
    trainer.method.on_fit_start()
    return trainer


def first_batch(trainer):
    return to_device(next(iter(trainer.loader(trainer.splits.train, train=False))), trainer.device)


# ---- Shapley outputs (hand-computed) -----------------------------------------------------
def test_shapley_weights():
    assert shapley_weight(0, 2) == 0.5 and shapley_weight(1, 2) == 0.5
    assert shapley_weight(0, 3) == pytest.approx(1 / 3)
    assert shapley_weight(1, 3) == pytest.approx(1 / 6)
    assert shapley_weight(2, 3) == pytest.approx(1 / 3)
    assert coalitions(["a", "b"]) == [fs(), fs("a"), fs("b"), fs("a", "b")]


def test_shapley_two_modalities_by_hand():
    # f(a,v) = 10, f(a,-) = 3, f(-,v) = 5, f(-,-) = 1 (second column: other numbers)
    values = {fs("a", "v"): t(10.0, 2.0), fs("a"): t(3.0, 1.0), fs("v"): t(5.0, -1.0), fs(): t(1.0, 4.0)}
    phi = shapley_outputs(values, ["a", "v"])
    # official: phi_a = (10 - 5)/2 + 3/2 = 4 ; phi_v = (10 - 3)/2 + 5/2 = 6 (f(empty) unused)
    torch.testing.assert_close(phi["a"], t(4.0, 2.0))
    torch.testing.assert_close(phi["v"], t(6.0, 0.0))
    torch.testing.assert_close(phi["a"] + phi["v"], values[fs("a", "v")])  # sums to f(all)
    # the official code's literal CREMA-D form: 0.5 * (total - pad_audio + pad_visual)
    torch.testing.assert_close(phi["a"], 0.5 * (values[fs("a", "v")] - values[fs("v")] + values[fs("a")]))
    ex = shapley_outputs(values, ["a", "v"], exact=True)
    torch.testing.assert_close(ex["a"], t(3.5, 0.0))
    torch.testing.assert_close(ex["v"], t(5.5, -2.0))
    torch.testing.assert_close(ex["a"] + ex["v"], values[fs("a", "v")] - values[fs()])


def test_shapley_three_modalities_by_hand():
    f = {fs("a", "b", "c"): 12.0, fs("a", "b"): 7.0, fs("a", "c"): 6.0, fs("b", "c"): 5.0,
         fs("a"): 3.0, fs("b"): 2.0, fs("c"): 1.0, fs(): 0.6}
    values = {k: t(v) for k, v in f.items()}
    phi = shapley_outputs(values, ["a", "b", "c"])
    # phi_a = (12-5)/3 + ((7-2) + (6-1))/6 + 3/3 = 5 ; phi_b = 4 ; phi_c = 3
    for m, want in (("a", 5.0), ("b", 4.0), ("c", 3.0)):
        torch.testing.assert_close(phi[m], t(want))
    torch.testing.assert_close(phi["a"] + phi["b"] + phi["c"], values[fs("a", "b", "c")])
    # URFunny_net.py's Modality_Text with a = text: (total - pad_t + pad_va)/3 + (pad_v - pad_at + pad_a - pad_vt)/6
    official_a = (f[fs("a", "b", "c")] - f[fs("b", "c")] + f[fs("a")]) / 3 + (
        f[fs("a", "c")] - f[fs("b")] + f[fs("a", "b")] - f[fs("c")]) / 6
    assert phi["a"].item() == pytest.approx(official_a)
    ex = shapley_outputs(values, ["a", "b", "c"], exact=True)
    for m, want in (("a", 4.8), ("b", 3.8), ("c", 2.8)):
        torch.testing.assert_close(ex[m], t(want))
    torch.testing.assert_close(ex["a"] + ex["b"] + ex["c"], t(12.0 - 0.6))


# ---- scores, coefficients, running mean (hand-computed) ------------------------------------
def test_unimodal_scores_by_hand():
    # logits [0, ln 3] -> p = [1/4, 3/4]
    phis = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]],
                         [[0.0, 30.0], [0.0, 30.0]]])  # (M=2, B=2, C=2)
    y = torch.tensor([1, 0])
    s = unimodal_scores(phis, y)
    assert s[0].item() == pytest.approx((-math.log(0.75) + math.log(4.0)) / 2, abs=1e-6)
    # second modality: p(y=1) ~ 1 (score ~ 0), p(y=0) = e^-30 < 1e-8 -> floored at -ln 1e-8
    assert s[1].item() == pytest.approx(18.420680743952367 / 2, abs=1e-5)
    no_floor = unimodal_scores(phis, y, prob_floor=0.0)
    assert no_floor[1].item() == pytest.approx(30.0 / 2, abs=1e-5)


def test_coefficients_two_modalities_by_hand():
    # m1 has the lower loss now (0.5 vs 1.0) while the running means are equal: m1 is damped
    k = agm_coefficients(torch.tensor([0.5, 1.0]), torch.tensor([1.0, 1.0]), alpha=1.0, cap=10.0)
    # r_1 = exp(1.0 - 0.5) = e^0.5, rbar = 1: k_1 = exp(1 - e^0.5), k_2 = exp(1 - e^-0.5)
    torch.testing.assert_close(k, torch.tensor([0.5227137589848345, 1.4821138418509994]))
    assert k[0] < 1.0 < k[1]  # official sign: the modality ahead is damped
    # unequal running means, alpha = 1.5: k = exp(1.5 (e^(1.0-0.8) - e^(0.9-0.4))), ...
    k = agm_coefficients(torch.tensor([0.4, 0.9]), torch.tensor([0.8, 1.0]), alpha=1.5, cap=10.0)
    torch.testing.assert_close(k, torch.tensor([0.5267771059291474, 1.3747888284954901]))


def test_balancebenchmark_sign_is_the_opposite_and_not_default():
    scores, running = torch.tensor([0.5, 1.0]), torch.tensor([1.0, 1.0])
    flipped = agm_coefficients(scores, running, alpha=1.0, cap=10.0, sign="balancebenchmark")
    torch.testing.assert_close(flipped, torch.tensor([1.4821138418509994, 0.5227137589848345]))
    assert flipped[0] > 1.0  # it boosts the leader
    assert AGM.options["sign"].default == "official"
    with pytest.raises(ValueError):
        agm_coefficients(scores, running, 1.0, 10.0, sign="plus")


def test_coefficients_three_modalities_by_hand():
    # r_m = exp(3/2 (0.5 - S_m)), rbar = 1, k = exp(2 (1 - r))
    k = agm_coefficients(torch.tensor([0.2, 0.5, 0.8]), torch.full((3,), 0.5), alpha=2.0, cap=7.0)
    torch.testing.assert_close(k, torch.tensor([0.32090043638771043, 1.0, 2.0642019705002097]))


def test_cap_limits_the_boost_only():
    scores, running = torch.tensor([5.0, 0.0]), torch.tensor([0.0, 5.0])
    k = agm_coefficients(scores, running, alpha=1.0, cap=10.0)
    # rbar_1 - r_1 = e^5 - e^-5 = 148.4 -> capped at 10; the damping side is not capped
    torch.testing.assert_close(k[0], torch.tensor(math.exp(10.0)))
    assert k[1].item() == pytest.approx(math.exp(math.exp(-5.0) - math.exp(5.0)), rel=1e-4)
    uncapped = agm_coefficients(scores, running, alpha=0.1, cap=None)
    assert uncapped[0].item() == pytest.approx(math.exp(0.1 * (math.exp(5) - math.exp(-5))), rel=1e-4)


def test_running_mean_by_hand():
    r = torch.zeros(2)
    seen = []
    for step, s in enumerate(([2.0, 1.0], [4.0, 1.0], [9.0, 4.0]), start=1):
        r = running_mean_update(r, torch.tensor(s), step)
        seen.append(r.tolist())
    assert seen == [[2.0, 1.0], [3.0, 1.0], [5.0, 2.0]]  # cumulative mean, never an EMA
    with pytest.raises(ValueError):
        running_mean_update(r, torch.tensor([1.0, 1.0]), 0)


# ---- gradient scaling ------------------------------------------------------------------------
def test_scale_grad_identity_forward_scaled_backward():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    out = ScaleGrad.apply(x, torch.tensor(0.25))
    assert torch.equal(out, x.detach())
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 0.25))


def test_modulation_scales_each_modality_through_its_own_shapley_output():
    """With an additive (concat) head, the features of modality m get exactly k_m times the
    plain gradient: scaling the wrong modality, or not at all, fails here."""
    a = torch.tensor([[1.0, 2.0]], requires_grad=True)
    v = torch.tensor([[-1.0, 0.5]], requires_grad=True)
    w_a, w_v, bias = torch.tensor([[1.0, 0.0], [0.5, 2.0]]), torch.tensor([[0.0, 1.0], [1.0, -1.0]]), torch.tensor([0.1, -0.2])
    ba, bv = torch.tensor([[0.3, 0.3]]), torch.tensor([[-0.2, 0.4]])  # blank features

    def f(za, zv):
        return za @ w_a.t() + zv @ w_v.t() + bias

    values = {fs("a", "v"): f(a, v), fs("a"): f(a, bv), fs("v"): f(ba, v)}
    phis = shapley_outputs(values, ["a", "v"])
    z = modulated_output(phis, torch.tensor([0.25, 3.0]), ["a", "v"])
    torch.testing.assert_close(z, f(a, v))
    y = torch.tensor([1])
    ga, gv = torch.autograd.grad(F.cross_entropy(z, y), (a, v))
    pa, pv = torch.autograd.grad(F.cross_entropy(f(a, v), y), (a, v))
    torch.testing.assert_close(ga, 0.25 * pa)
    torch.testing.assert_close(gv, 3.0 * pv)


@pytest.mark.parametrize("n_modalities,head", [(2, "concat"), (3, "concat"), (2, "sum")])
def test_model_coalitions_route_the_scaled_gradient(tmp_path, n_modalities, head):
    """On shared features (``coalitions=reuse``, so the coalitions' paths meet at the step's
    feature tensors); ``reencode`` routes the same gradient to the parameters (next test)."""
    trainer = setup_trainer(tmp_path, n_modalities=n_modalities, head=head, coalitions="reuse")
    method, model = trainer.method, trainer.model
    mods = method.modalities
    batch = first_batch(trainer)
    feats = model.encode(batch)
    values = method.coalition_logits(batch, feats)
    assert set(values) == {s for s in coalitions(mods) if s}  # no empty coalition in the official form
    phis = shapley_outputs(values, mods)
    k = torch.tensor([0.5, 2.0, 1.5][:n_modalities])
    z = modulated_output(phis, k, mods)
    torch.testing.assert_close(z, model.fuse(feats), rtol=1e-5, atol=1e-5)
    y = batch["label"]
    grads = torch.autograd.grad(F.cross_entropy(z, y), [feats[m] for m in mods], retain_graph=True)
    plain = torch.autograd.grad(F.cross_entropy(model.fuse(feats), y), [feats[m] for m in mods])
    for i in range(n_modalities):
        torch.testing.assert_close(grads[i], k[i] * plain[i], rtol=1e-5, atol=1e-7)


def test_reuse_equals_reencode_without_batchnorm_or_dropout(tmp_path):
    """Logits and the modulated loss's parameter gradients agree up to rounding on encoders
    with neither BatchNorm nor dropout (reencode, the default, is the official computation)."""
    trainer = setup_trainer(tmp_path, n_modalities=3, coalitions="reuse")
    method, model = trainer.method, trainer.model
    batch = first_batch(trainer)
    model.train()
    grads, logits = {}, {}
    k = torch.tensor([0.5, 2.0, 1.5])
    for mode in ("reuse", "reencode"):
        method.cfg["coalitions"] = mode
        model.zero_grad(set_to_none=True)
        values = method.coalition_logits(batch, model.encode(batch))
        assert model.training  # restored after the eval-mode passes
        z = modulated_output(shapley_outputs(values, method.modalities), k, method.modalities)
        F.cross_entropy(z, batch["label"]).backward()
        logits[mode] = values
        grads[mode] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert set(logits["reuse"]) == set(logits["reencode"])
    for s in logits["reuse"]:
        torch.testing.assert_close(logits["reuse"][s], logits["reencode"][s], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["reuse"], grads["reencode"], rtol=1e-4, atol=1e-6)


def test_reencode_is_the_default_and_differs_from_reuse_with_dropout(tmp_path):
    """Item 7 of issue 21: a plain "AGM" row is the official computation. With dropout, reusing
    the step's train-mode features is another method (dropout masks in every coalition)."""
    trainer = setup_trainer(tmp_path, **{"backbone.m1.dropout": 0.5})
    method, model = trainer.method, trainer.model
    assert trainer.cfg["coalitions"] == "reencode" and method.label() == "AGM"
    batch = first_batch(trainer)
    model.train()
    torch.manual_seed(0)
    feats = model.encode(batch)
    official = method.coalition_logits(batch, feats)
    with torch.no_grad():  # f({m2}) by hand: m1 blank, m2 re-encoded, whole model in eval mode
        model.eval()
        blank = model.blank_feature("m1", batch["m1"]).expand(feats["m1"].shape[0], -1)
        only2 = model.fuse({"m1": blank, "m2": model.encoders["m2"](batch["m2"])})
        only1 = model.fuse({"m1": model.encoders["m1"](batch["m1"]), "m2": model.blank_feature(
            "m2", batch["m2"]).expand(feats["m2"].shape[0], -1)})
        model.train()
    torch.testing.assert_close(official[fs("m2")], only2)
    torch.testing.assert_close(official[fs("m1")], only1)  # eval mode: no dropout mask
    method.cfg["coalitions"] = "reuse"
    reused = method.coalition_logits(batch, feats)
    assert not torch.allclose(reused[fs("m1")], only1, atol=1e-3)
    assert AGM({"coalitions": "reuse"}).label() == "AGM (reused train-mode coalitions)"


# ---- the training step: order, window, clip guard --------------------------------------------
def _step(method, batch):
    loss = method.training_step(batch, 0)
    logs = {k: v[-1] for k, v in method.trainer._step_logs.items()}
    return loss, logs


def test_step_uses_the_running_means_before_updating_them(tmp_path):
    trainer = setup_trainer(tmp_path)
    method = trainer.method
    batch = first_batch(trainer)
    method.on_train_epoch_start(0)
    method.running = torch.tensor([1.0, 3.0])
    method.steps = 10
    loss, logs = _step(method, batch)
    scores = torch.stack([logs["score_m1"], logs["score_m2"]])
    want = agm_coefficients(scores, torch.tensor([1.0, 3.0]), method.alpha, method.cap)
    torch.testing.assert_close(torch.stack([logs["coef_m1"], logs["coef_m2"]]), want)
    torch.testing.assert_close(method.running, (torch.tensor([1.0, 3.0]) * 10 + scores) / 11)
    assert method.steps == 11
    # the loss is the CE of the (numerically unchanged) fused logits
    with torch.no_grad():
        plain = F.cross_entropy(trainer.model.fuse(trainer.model.encode(batch)), batch["label"])
    torch.testing.assert_close(loss.detach(), plain)
    # scores are the CEs of the Shapley outputs
    feats = trainer.model.encode(batch)
    phis = shapley_outputs(method.coalition_logits(batch, feats), method.modalities)
    torch.testing.assert_close(scores, unimodal_scores(torch.stack([phis["m1"], phis["m2"]]), batch["label"]))


def test_window_reset_and_keep(tmp_path):
    trainer = setup_trainer(tmp_path, modulation_start=1, modulation_end=2)
    method = trainer.method
    batch = first_batch(trainer)
    method.on_train_epoch_start(0)  # before the window: scales 1
    _, logs = _step(method, batch)
    assert logs["coef_m1"].item() == 1.0 and logs["coef_m2"].item() == 1.0
    method.on_train_epoch_start(1)
    method.running = torch.tensor([1.0, 3.0])  # a history unlike this batch
    _, logs = _step(method, batch)
    inside = torch.stack([logs["coef_m1"], logs["coef_m2"]])
    assert not torch.equal(inside, torch.ones(2))
    method.on_train_epoch_start(3)  # after the window, reset (default)
    _, logs = _step(method, batch)
    assert logs["coef_m1"].item() == 1.0
    method.cfg["after_window"] = "keep"  # official: the hooks keep the last scales
    _, logs = _step(method, batch)
    torch.testing.assert_close(torch.stack([logs["coef_m1"], logs["coef_m2"]]), inside)


def test_clip_guard_by_hand():
    def make():
        head = torch.tensor([[2.0, 0.0]])
        other = torch.tensor([3.0, 4.0])
        return head, other

    head, other = make()
    fired = clip_guard_([head], [head, other], 1.0)
    assert bool(fired)
    coef = 1.0 / (math.sqrt(29.0) + 1e-6)  # total norm sqrt(4 + 9 + 16)
    torch.testing.assert_close(other, torch.tensor([3.0, 4.0]) * coef)
    torch.testing.assert_close(head, torch.tensor([[2.0, 0.0]]) * coef)
    # same as torch's clip_grad_norm_ on the same gradients
    ps = [torch.nn.Parameter(torch.zeros(1, 2)), torch.nn.Parameter(torch.zeros(2))]
    for p, g in zip(ps, make(), strict=True):
        p.grad = g
    torch.nn.utils.clip_grad_norm_(ps, 1.0)
    torch.testing.assert_close(ps[1].grad, other)
    # inside [-1, 1]: untouched even if the global norm is large
    head, other = torch.tensor([[0.5, -0.9]]), torch.tensor([30.0, 40.0])
    assert not bool(clip_guard_([head], [head, other], 1.0))
    torch.testing.assert_close(other, torch.tensor([30.0, 40.0]))
    # a large negative entry fires the official rule but not MOSEI's "max > t and min < t"
    head, other = torch.tensor([[-3.0, 0.5]]), torch.tensor([3.0, 4.0])
    assert not bool(clip_guard_([head], [head, other], 1.0, rule="max_only"))
    assert bool(clip_guard_([head], [head, other], 1.0, rule="abs"))


def test_clip_guard_in_the_loop(tmp_path):
    trainer = setup_trainer(tmp_path, clip_threshold=1e-4)
    method, model = trainer.method, trainer.model
    batch = first_batch(trainer)
    method.on_train_epoch_start(0)
    method.training_step(batch, 0).backward()
    method.on_after_backward()
    assert trainer._step_logs["clip_fired"][-1].item() == 1.0
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert norm.item() == pytest.approx(1e-4, rel=1e-3)


# ---- evaluation, state, refusals -----------------------------------------------------------
def test_predict_reports_shapley_outputs(tmp_path):
    trainer = setup_trainer(tmp_path)
    method, model = trainer.method, trainer.model
    assert method.per_modality_source() == "method"
    batch = first_batch(trainer)
    model.eval()
    pred = method.predict(batch)
    feats = model.encode(batch)
    with torch.no_grad():
        blank = {m: model.blank_feature(m, batch[m]).expand_as(feats[m]) for m in ("m1", "m2")}
        full = model.fuse(feats)
        only1 = model.fuse({"m1": feats["m1"], "m2": blank["m2"]})
        only2 = model.fuse({"m1": blank["m1"], "m2": feats["m2"]})
    torch.testing.assert_close(pred.fused, full)
    torch.testing.assert_close(pred.per_modality["m1"], 0.5 * (full - only2 + only1))
    torch.testing.assert_close(pred.per_modality["m2"], 0.5 * (full - only1 + only2))
    trainer2 = setup_trainer(tmp_path / "parts", per_modality="fused_parts")
    assert trainer2.method.per_modality_source() == "fused_parts"


def test_state_round_trip_and_refusal():
    a = AGM({})
    a.modalities = ["m1", "m2"]
    a.running, a.last_coef, a.steps = torch.tensor([1.5, 2.5]), torch.tensor([0.9, 1.1]), 7
    state = a.state_dict()
    b = AGM({})
    b.modalities = ["m1", "m2"]
    b.load_state_dict(state)
    assert torch.equal(b.running, a.running) and torch.equal(b.last_coef, a.last_coef) and b.steps == 7
    c = AGM({})
    c.modalities = ["m1", "m3"]
    with pytest.raises(ConfigError, match="modalities"):
        c.load_state_dict(state)


def test_refusals(tmp_path, fast):
    with pytest.raises(UnsupportedError, match="agm"):
        make_trainer("agm", "synthetic", {**fast, "modalities": ["m1"]}).check()
    with pytest.raises(ConfigError, match="modulation_end"):
        make_trainer("agm", "synthetic", {**fast, "modulation_start": 3, "modulation_end": 1})
    with pytest.raises(ConfigError, match="sign"):
        make_trainer("agm", "synthetic", {**fast, "sign": "reversed"})
    with pytest.raises(ConfigError, match="alpha"):
        make_trainer("agm", "synthetic", {**fast, "alpha": -1.0})
    with pytest.warns(UserWarning, match="adam"):
        make_trainer("agm", "synthetic", {**fast, "optimizer": "adamw"})


def test_paper_defaults_and_label():
    assert AGM.dataset_defaults["cremad"]["alpha"] == 1.5
    assert AGM({}).label() == "AGM"
    assert "BalanceBenchmark sign" in AGM({"sign": "balancebenchmark"}).label()
    assert AGM({"dataset": "cremad", "alpha": 1.5}).label() == "AGM"


# ---- runs ------------------------------------------------------------------------------------
def test_synthetic_two_epochs_records_diagnostics(fast):
    res = run("agm", "synthetic", {**fast, **SMALL})
    epochs = res.record["epochs"]
    assert len(epochs) == 2
    diag = epochs[-1]["diagnostics"]
    for key in ("coef_m1", "coef_m2", "shapley_m1", "shapley_m2", "score_m1", "concept_m1", "clip_fired"):
        assert key in diag and math.isfinite(diag[key])
    assert "m1" in epochs[-1]["val"] and "m2" in epochs[-1]["val"]
    # m1 is the strong modality of synthetic: the official sign damps it, boosts m2
    assert diag["coef_m1"] < 1.0 < diag["coef_m2"]
    flipped = run("agm", "synthetic", {**fast, **SMALL, "sign": "balancebenchmark"})
    fd = flipped.record["epochs"][-1]["diagnostics"]
    assert fd["coef_m1"] > 1.0 > fd["coef_m2"]


def test_three_modalities_run(fast):
    res = run("agm", "synthetic", {**fast, "epochs": 1, "n_train": 200, "n_test": 60, "n_modalities": 3,
                                   "coalitions": "reencode", "shapley": "exact"})
    diag = res.record["epochs"][-1]["diagnostics"]
    assert all(math.isfinite(diag[f"coef_m{i}"]) for i in (1, 2, 3))
    assert all(f"m{i}" in res.record["epochs"][-1]["val"] for i in (1, 2, 3))


def test_avdigits_two_epochs(fast, shared_data):
    res = run("agm", "avdigits", {**fast, "epochs": 2, "limit_train_batches": 5, "limit_eval_batches": 3})
    diag = res.record["epochs"][-1]["diagnostics"]
    assert math.isfinite(diag["coef_audio"]) and math.isfinite(diag["shapley_image"])
    assert "audio" in res.record["epochs"][-1]["val"]


def test_resume_identical(tmp_path, monkeypatch):
    overrides = {"progress": "off", "device": "cpu", "epochs": 3, "n_train": 240, "n_test": 60, "batch_size": 32}
    assert_resume_identical("agm", "synthetic", overrides, tmp_path, monkeypatch)


# ---- wrong variants that earlier tests let pass (issue 21) ---------------------------------
@pytest.mark.parametrize(("epoch", "inside"), [(0, False), (1, True), (2, True), (3, False)])
def test_window_includes_both_ends(tmp_path, epoch, inside):
    """Wrong variant caught: the window's last epoch excluded (``epoch < end``) or its first
    (``start < epoch``): modulation_start=1, modulation_end=2 sets the scales in epochs 1 and 2."""
    trainer = setup_trainer(tmp_path, modulation_start=1, modulation_end=2)
    method = trainer.method
    method.on_train_epoch_start(epoch)
    method.running = torch.tensor([1.0, 3.0])  # a history unlike this batch: k far from 1
    method.steps = 10
    _, logs = _step(method, first_batch(trainer))
    coef = torch.stack([logs["coef_m1"], logs["coef_m2"]])
    if inside:
        scores = torch.stack([logs["score_m1"], logs["score_m2"]])
        want = agm_coefficients(scores, torch.tensor([1.0, 3.0]), method.alpha, method.cap)
        torch.testing.assert_close(coef, want)
        assert (coef - 1.0).abs().max() > 0.1
    else:
        assert torch.equal(coef, torch.ones(2))


@pytest.mark.parametrize("epoch", [0, 3])
def test_running_mean_moves_outside_the_window(tmp_path, epoch):
    """Wrong variant caught: the running means (and the step count) frozen outside the window;
    the official code updates them at every step, so the concept the window starts from holds
    the whole history."""
    trainer = setup_trainer(tmp_path, modulation_start=1, modulation_end=2)
    method = trainer.method
    method.on_train_epoch_start(epoch)
    method.running = torch.tensor([1.0, 3.0])
    method.steps = 10
    _, logs = _step(method, first_batch(trainer))
    scores = torch.stack([logs["score_m1"], logs["score_m2"]])
    assert method.steps == 11
    torch.testing.assert_close(method.running, (torch.tensor([1.0, 3.0]) * 10 + scores) / 11)
    torch.testing.assert_close(torch.stack([logs["concept_m1"], logs["concept_m2"]]), method.running)
