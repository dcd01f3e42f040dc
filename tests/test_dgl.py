"""DGL method plugin: unimodal logits and gradients by hand on a tiny model, the official
two-backward form as a reference, every option reaching the step, runs, resume, refusals.

Wrong variants each test here was checked against are named in the test's docstring.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from method_checks import assert_resume_identical
from mmbalance.methods.dgl import dgl_loss, unimodal_logits
from torch import nn

from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.heads import ConcatHead, SumHead
from mmbalance.runner import make_trainer, resolve_config, run
from mmbalance.trainer import to_device

SYN = {"epochs": 2, "n_train": 300, "n_test": 100}

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest


# ---- a tiny model with hand-set weights ----------------------------------------------------------
def tiny():
    """Encoders a: R^2 -> R^2 (A), b: R^1 -> R^1 (B); concat head W (2 x 3), bias (0.5, -0.5)."""
    enc = {"a": nn.Linear(2, 2, bias=False), "b": nn.Linear(1, 1, bias=False)}
    head = ConcatHead({"a": 2, "b": 1}, 2)
    with torch.no_grad():
        enc["a"].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        enc["b"].weight.copy_(torch.tensor([[3.0]]))
        head.fc.weight.copy_(torch.tensor([[0.5, -1.0, 0.25], [1.0, 0.5, -0.5]]))
        head.fc.bias.copy_(torch.tensor([0.5, -0.5]))
    x = {"a": torch.tensor([[1.0, 0.5]]), "b": torch.tensor([[2.0]])}
    return enc, head, x, torch.tensor([1])


def grads_of(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


def test_unimodal_logits_carry_the_full_bias_by_hand():
    """z_a = W_a e_a + b, z_b = W_b e_b + b (the official fc_out(cat(x, zeros))).

    Wrong variants caught: the fused head's parts (b/2 each); the other modality's weight
    block (z_a through W_b's columns); no bias."""
    enc, head, x, _ = tiny()
    feats = {m: enc[m](x[m]) for m in enc}  # e_a = (1, 1), e_b = (6)
    z = unimodal_logits(head, feats, detach_head=True)
    torch.testing.assert_close(z["a"], torch.tensor([[0.5 - 1.0 + 0.5, 1.0 + 0.5 - 0.5]]))  # (0, 1)
    torch.testing.assert_close(z["b"], torch.tensor([[1.5 + 0.5, -3.0 - 0.5]]))  # (2, -3.5)
    zeros = {"a": feats["a"], "b": torch.zeros_like(feats["b"])}
    torch.testing.assert_close(z["a"], head(zeros))  # the official construction


def test_gradient_flow_by_hand_on_a_tiny_model():
    """Which parameter receives which loss, with the values written out.

    With y = 1 and one sample: z_a = (0, 1), p_a = softmax = (1, e)/(1 + e), dCE/dz_a = p_a - (0, 1);
    encoder A gets alpha * W_a^T (p_a - onehot) x_a^T; B gets alpha * W_b^T (p_b - onehot) x_b;
    the head gets (p_o - onehot) [e_a; e_b]^T and bias (p_o - onehot), nothing from z_a, z_b.

    Wrong variants caught: the fused loss reaching the encoders (features not detached); the
    unimodal losses reaching the head (head not detached); alpha on the fused loss instead of
    the unimodal ones; the unimodal features detached (encoders get nothing); z_a built with
    b/2; modality b's loss reaching encoder a."""
    enc, head, x, y = tiny()
    alpha = 4.0
    feats = {m: enc[m](x[m]) for m in enc}
    loss, ce_fused, ce_uni = dgl_loss(head, feats, y, alpha)
    gA, gB, gW, gb = grads_of(loss, [enc["a"].weight, enc["b"].weight, head.fc.weight, head.fc.bias])
    onehot = torch.tensor([0.0, 1.0])
    e = torch.e
    p_a = torch.tensor([1.0, e]) / (1.0 + e)  # z_a = (0, 1)
    p_b = torch.softmax(torch.tensor([2.0, -3.5]), 0)
    W_a, W_b = head.fc.weight[:, :2].detach(), head.fc.weight[:, 2:].detach()
    d_ea = W_a.t() @ (p_a - onehot)  # (2,)
    d_eb = W_b.t() @ (p_b - onehot)  # (1,)
    torch.testing.assert_close(gA, alpha * torch.outer(d_ea, x["a"][0]))
    torch.testing.assert_close(gB, alpha * torch.outer(d_eb, x["b"][0]))
    fused_in = torch.tensor([1.0, 1.0, 6.0])
    o = head.fc.weight.detach() @ fused_in + head.fc.bias.detach()  # (.5 - 1 + 1.5 + .5, 1 + .5 - 3 - .5)
    torch.testing.assert_close(o, torch.tensor([1.5, -2.0]))
    p_o = torch.softmax(o, 0)
    torch.testing.assert_close(gW, torch.outer(p_o - onehot, fused_in))
    torch.testing.assert_close(gb, p_o - onehot)
    torch.testing.assert_close(ce_uni["a"], -torch.log(p_a[1]))
    torch.testing.assert_close(ce_fused, -torch.log(p_o[1]))
    # the separate pieces: the fused CE reaches only the head, each unimodal CE only its encoder
    fA, fB, fW = grads_of(ce_fused, [enc["a"].weight, enc["b"].weight, head.fc.weight])
    assert fA is None and fB is None and fW is not None
    uA, uB, uW, ub = grads_of(ce_uni["a"], [enc["a"].weight, enc["b"].weight, head.fc.weight, head.fc.bias])
    assert uA is not None and uB is None and uW is None and ub is None


def official_two_backward(enc, head, x, y, alpha):
    """The official step (main_dgl.py): alpha (CE_a + CE_b) backward through the live head,
    the head's gradients set to None, then CE(o) on detached features backward."""
    feats = {m: enc[m](x[m]) for m in enc}
    fused = head({m: f.detach() for m, f in feats.items()})
    zero = {m: torch.zeros_like(f) for m, f in feats.items()}
    z = {m: head({**zero, m: feats[m]}) for m in feats}
    (alpha * sum(F.cross_entropy(v, y) for v in z.values())).backward(retain_graph=True)
    for p in head.parameters():
        p.grad = None
    F.cross_entropy(fused, y).backward()
    return {n: p.grad.clone() for n, p in [*enc["a"].named_parameters(prefix="a"), *enc["b"].named_parameters(prefix="b"),
                                           *head.named_parameters(prefix="head")]}


def test_single_backward_equals_the_official_two_backward_form():
    torch.manual_seed(0)
    enc = {"a": nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)), "b": nn.Linear(2, 3)}
    head = ConcatHead({"a": 3, "b": 3}, 4)
    x = {"a": torch.randn(8, 5), "b": torch.randn(8, 2)}
    y = torch.randint(0, 4, (8,))
    ref = official_two_backward(enc, head, x, y, 3.0)
    params = [*enc["a"].named_parameters(prefix="a"), *enc["b"].named_parameters(prefix="b"),
              *head.named_parameters(prefix="head")]
    for _, p in params:
        p.grad = None
    loss, _, _ = dgl_loss(head, {m: enc[m](x[m]) for m in enc}, y, 3.0)
    loss.backward()
    for n, p in params:
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-6, atol=1e-7, msg=n)


def test_sum_head_unimodal_logits_and_isolation():
    """Sum fusion (SumFusion_DGL): z_m = fc_m(e_m) with its own bias, o = sum_m fc_m(sg(e_m)).
    Wrong variant caught: the sum head's own layer of the other modality used for z_m."""
    torch.manual_seed(1)
    head = SumHead({"a": 3, "b": 2}, 4)
    feats = {"a": torch.randn(5, 3, requires_grad=True), "b": torch.randn(5, 2, requires_grad=True)}
    z = unimodal_logits(head, feats, detach_head=True)
    torch.testing.assert_close(z["a"], head.fcs["a"](feats["a"]))
    torch.testing.assert_close(z["b"], head.fcs["b"](feats["b"]))
    loss, ce_fused, ce_uni = dgl_loss(head, feats, torch.tensor([0, 1, 2, 3, 0]), 2.0)
    g = grads_of(ce_fused, [feats["a"], *head.parameters()])
    assert g[0] is None and all(t is not None for t in g[1:])
    g = grads_of(ce_uni["b"], [feats["a"], feats["b"], *head.parameters()])
    assert g[0] is None and g[1] is not None and all(t is None for t in g[2:])


# ---- the step on a real trainer ---------------------------------------------------------------
def step_grads(tmp_path, **overrides):
    t = make_trainer("dgl", "synthetic", {**SYN, "records": str(tmp_path / "runs"), "progress": "off",
                                          "device": "cpu", "checkpoint": False, **overrides})
    t.setup()
    batch = to_device(next(iter(t.loader(t.splits.train, train=False))), t.device)
    t.optimizer.zero_grad(set_to_none=True)
    t.method.training_step(batch, 0).backward()
    return t, {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}


def test_alpha_scales_only_the_encoders_and_reaches_the_step(tmp_path):
    """Encoder gradients are proportional to alpha, the head's do not depend on it, and the
    unimodal heads get none. Wrong variants caught: alpha hard-coded; alpha applied to the fused
    CE; the model's unused unimodal heads trained."""
    _, g3 = step_grads(tmp_path / "a3", alpha=3.0)
    _, g6 = step_grads(tmp_path / "a6", alpha=6.0)
    assert set(g3) == set(g6) and not any(n.startswith("uni_heads.") for n in g3)
    for n in g3:
        if n.startswith("encoders."):
            torch.testing.assert_close(g6[n], 2.0 * g3[n], rtol=1e-5, atol=1e-8)
        else:
            assert n.startswith("fusion.") and torch.equal(g6[n], g3[n]), n


def test_fusion_mode_reaches_the_step(tmp_path):
    """Wrong variant caught: fusion_mode read but the concat head always built."""
    t, g = step_grads(tmp_path, fusion_mode="sum")
    assert isinstance(t.model.fusion, SumHead) and any(n.startswith("fusion.fcs.") for n in g)


def test_predict_reports_full_bias_unimodal_logits(tmp_path):
    """Per-modality accuracy comes from z_m with the full bias, not the b/M parts.
    Wrong variant caught: predict using fusion.parts."""
    t, _ = step_grads(tmp_path)
    batch = to_device(next(iter(t.loader(t.splits.test, train=False))), t.device)
    pred = t.method.predict(batch)
    feats = t.model.encode(batch)
    parts = t.model.fusion.parts(feats)
    bias = t.model.fusion.fc.bias
    for m in ("m1", "m2"):
        torch.testing.assert_close(pred.per_modality[m], parts[m] + bias / 2)
    torch.testing.assert_close(pred.fused, t.model.fuse(feats))


def test_defaults_clip_40_and_alpha_per_dataset():
    """grad_clip 40 (official) and the scripts' alpha: CREMA-D 4, Kinetics-Sounds 3, else 3.
    Wrong variants caught: the clip default missing; KS and CREMA-D values swapped."""
    for dataset, alpha in (("cremad", 4.0), ("ksounds", 3.0), ("synthetic", 3.0), ("mfeat", 3.0)):
        cfg, _, cls = resolve_config("dgl", dataset, {})
        assert cfg["alpha"] == alpha and cfg["grad_clip"] == 40.0
        assert cls(cfg).label() == "DGL"
    cfg, _, cls = resolve_config("dgl", "cremad", {"alpha": 5.0, "grad_clip": None, "fusion_mode": "sum"})
    assert cls(cfg).label() == "DGL (alpha=5, sum fusion, no clip)"


def test_clip_acts_on_the_combined_gradient(tmp_path, monkeypatch):
    """The trainer clips encoders (alpha-scaled) and head together at 40, as the official
    clip_grad_norm_(model.parameters(), 40)."""
    seen = {}
    original = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        seen["n"] = sum(1 for p in params if p.grad is not None)
        seen["max"] = max_norm
        return original(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    t, g = step_grads(tmp_path)
    t.optimizer_step(t.optimizer)
    assert seen == {"n": len(g), "max": 40.0}


# ---- runs --------------------------------------------------------------------------------------
def test_synthetic_run_records_diagnostics(fast):
    """The record declares what trained: z_m from the fused head's blocks, the model's unimodal
    heads untrained. Wrong variant caught: trains_unimodal_heads() returning True (the step
    never touches those heads, but the record would say they were trained)."""
    rec = run("dgl", "synthetic", {**fast, **SYN}).record
    h = rec["header"]
    assert h["method_label"] == "DGL" and h["method_info"]["per_modality"] == "method"
    assert h["method_info"]["trains_unimodal_heads"] is False
    d = rec["epochs"][1]["diagnostics"]
    assert {"ce_fused", "ce_m1", "ce_m2"} <= set(d)
    assert {"m1", "m2"} <= set(rec["epochs"][1]["test"])


def test_three_modalities_run(fast):
    rec = run("dgl", "synthetic", {**fast, **SYN, "epochs": 1, "n_modalities": 3}).record
    assert {"ce_m1", "ce_m2", "ce_m3"} <= set(rec["epochs"][0]["diagnostics"])


def test_mfeat_trains_well_above_chance(fast, shared_data):
    r = run("dgl", "mfeat", {**fast, "modalities": ["zer", "mor"], "epochs": 6})
    assert r.final["best_val"]["test"]["fused"]["acc"] > 60.0  # 10 classes: chance 10 %


def test_avdigits_runs(fast, shared_data):
    rec = run("dgl", "avdigits", {**fast, "epochs": 2, "limit_train_batches": 4, "limit_eval_batches": 2}).record
    assert {"ce_audio", "ce_image"} <= set(rec["epochs"][1]["diagnostics"])


def test_resume_is_identical(tmp_path, monkeypatch):
    assert_resume_identical("dgl", "synthetic", {**SYN, "progress": "off", "device": "cpu"}, tmp_path, monkeypatch)


@pytest.mark.gpu
def test_runs_on_cuda_with_bf16(tmp_path):
    r = run("dgl", "synthetic", {**SYN, "records": str(tmp_path), "progress": "off", "device": "cuda"})
    assert r.record["header"]["amp"] == "bfloat16"
    assert r.final["last"]["test"]["fused"]["acc"] > 20.0


# ---- refusals ---------------------------------------------------------------------------------
def test_weight_fusion_refused(fast):
    with pytest.raises(UnsupportedError, match=r"Method 'dgl'.*'weight' fusion.*no block per modality"):
        make_trainer("dgl", "synthetic", {**fast, "fusion_mode": "weight"})


def test_bad_alpha_refused(fast):
    with pytest.raises(ConfigError):
        make_trainer("dgl", "synthetic", {**fast, "alpha": 0.0})
