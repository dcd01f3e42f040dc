"""MLA method plugin: projector, projection and entropy weights by hand, the alternating step
against hand-written references, runs, resume, three modalities, refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from method_checks import assert_resume_identical
from mmbalance.methods.mla import (
    MLA,
    batch_mean_feature,
    elementwise_update,
    entropy,
    entropy_weights,
    gm_lambda,
    owm_update,
    project_head_grad,
    weighted_logits,
)

from mmbalance.config import assemble
from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.registry import DATASETS, METHODS
from mmbalance.runner import make_trainer, run
from mmbalance.trainer import to_device

SYN = {"epochs": 2, "n_train": 300, "n_test": 100}
SMALL = {**SYN, "dim": 16, "embed_dim": 16, "checkpoint": False}

# Hand example of the projector: P = I (3 x 3), r = (0, 3, 4) (|r|^2 = 25), lambda = 0.1.
# Scalar rule: P' = I - r r^T / 25.1, eigenvalues (1, 1, 0.1/25.1); ||P'||_F^2 = 2 + (1/251)^2.
R = torch.tensor([0.0, 3.0, 4.0])
OWM_P = torch.tensor([[1.0, 0.0, 0.0],
                      [0.0, 16.1 / 25.1, -12.0 / 25.1],
                      [0.0, -12.0 / 25.1, 9.1 / 25.1]]) / math.sqrt(2.0 + 1.0 / 251.0**2)
# Element-wise (released) rule: entry (i, j) - r_i r_j / (0.1 + r_i r_j).
EW = torch.tensor([[1.0, 0.0, 0.0],
                   [0.0, 1.0 - 9.0 / 9.1, -12.0 / 12.1],
                   [0.0, -12.0 / 12.1, 1.0 - 16.0 / 16.1]])
EW_P = EW / EW.norm()
# Entropy example: o_1 = (0, 0) -> p = (1/2, 1/2), H_1 = ln 2; o_2 = (ln 3, 0) -> p = (3/4, 1/4),
# exp(-H_2) = 0.75^0.75 * 0.25^0.25; lambda_1 = 0.5 / (0.5 + exp(-H_2)) = 0.46734...
EXP_MINUS_H2 = 0.75**0.75 * 0.25**0.25
LAMBDA_1 = 0.5 / (0.5 + EXP_MINUS_H2)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest


# ---- mathematics by hand -----------------------------------------------------------------------
def test_lambda_schedule_by_hand():
    assert gm_lambda(0, 10) == pytest.approx(0.1)
    assert gm_lambda(5, 10) == pytest.approx(0.1**1.5)  # 0.0316227766
    assert gm_lambda(10, 10) == pytest.approx(0.01)
    assert gm_lambda(0, 0) == pytest.approx(0.1)  # no division by zero


def test_owm_update_by_hand_symmetric_psd_and_removes_the_feature_direction():
    P = owm_update(torch.eye(3), R, 0.1)
    assert P.dtype == torch.float32
    torch.testing.assert_close(P, OWM_P)
    assert torch.equal(P, P.t())
    assert torch.linalg.eigvalsh(P.double()).min() >= 0
    assert torch.linalg.matrix_norm(P).item() == pytest.approx(1.0, abs=1e-6)
    # a head gradient along the stored direction r is removed (kept: (0.1/25.1) / ||P'||_F
    # of it), one orthogonal to r is only rescaled by 1 / ||P'||_F
    norm = math.sqrt(2.0 + 1.0 / 251.0**2)
    along = project_head_grad(R.unsqueeze(0), P)
    torch.testing.assert_close(along, R.unsqueeze(0) * (0.1 / 25.1) / norm)
    ortho = project_head_grad(torch.tensor([[1.0, 0.0, 0.0]]), P)
    torch.testing.assert_close(ortho, torch.tensor([[1.0 / norm, 0.0, 0.0]]))
    assert along.norm() / R.norm() < 0.01 * ortho.norm()


def test_owm_update_equals_the_plain_formula_from_a_non_identity_projector():
    """The Joseph form equals P - k k^T / (lambda + r^T k) (computed here in float64)."""
    P = OWM_P.double()
    r = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    k = P @ r
    plain = P - torch.outer(k, k) / (0.05 + r @ k)
    plain = plain / plain.norm()
    torch.testing.assert_close(owm_update(OWM_P, r.float(), 0.05), plain.float())


def test_owm_projector_stays_symmetric_psd_over_many_large_updates():
    gen = torch.Generator().manual_seed(0)
    P = torch.eye(8)
    for i in range(300):
        r = torch.randn(8, generator=gen) * 30.0  # r^T P r >> lambda: the cancellation regime
        P = owm_update(P, r, gm_lambda(i % 50, 50))
    assert torch.equal(P, P.t())
    eig = torch.linalg.eigvalsh(P.double())
    assert eig.min() >= -1e-7 * eig.max()
    assert torch.linalg.matrix_norm(P).item() == pytest.approx(1.0, abs=1e-5)


def test_elementwise_update_by_hand_differs_from_owm():
    P = elementwise_update(torch.eye(3), R, 0.1)
    torch.testing.assert_close(P, EW_P)
    assert not torch.allclose(P, OWM_P, atol=1e-3)  # the denominator is element-wise, not scalar


def test_projection_replace_additive_and_transpose_by_hand():
    g = torch.tensor([[2.0, 3.0]])
    P = torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # not symmetric: g P^T = (3, 0), g P = (0, 2)
    assert torch.equal(project_head_grad(g, P), torch.tensor([[3.0, 0.0]]))
    assert torch.equal(project_head_grad(g, P, additive=True), torch.tensor([[5.0, 3.0]]))
    bf16 = project_head_grad(g.bfloat16(), P)
    assert bf16.dtype == torch.float32  # gradient arithmetic in fp32


def test_entropy_weights_per_sample_by_hand():
    o1 = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    o2 = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    torch.testing.assert_close(entropy(o1), torch.full((2,), math.log(2.0)))
    torch.testing.assert_close(entropy(o2)[0], torch.tensor(-math.log(EXP_MINUS_H2)))
    w = entropy_weights([o1, o2], "sample")
    # row 0: the confident modality 2 gets MORE weight; row 1: equal entropies, 1/2 each
    torch.testing.assert_close(w, torch.tensor([[LAMBDA_1, 0.5], [1.0 - LAMBDA_1, 0.5]]))
    fused = weighted_logits([o1, o2], w)  # logits are weighted, not probabilities
    torch.testing.assert_close(fused, torch.tensor([[(1.0 - LAMBDA_1) * math.log(3.0), 0.0], [0.0, 0.0]]))
    # bf16 logits give fp32 weights; a saturated softmax gives no NaN (official log(softmax) would)
    assert entropy_weights([o1.bfloat16(), o2.bfloat16()]).dtype == torch.float32
    sharp = torch.tensor([[1000.0, 0.0]])
    w = entropy_weights([sharp, torch.zeros(1, 2)])
    assert torch.isfinite(w).all() and w[0, 0] > 0.66


def test_entropy_weights_batch_scope_official_quirk_by_hand():
    """softmax over the batch axis, entropy summed over (B, C): H_1 = 2 ln 2, H_2 = ln 2 +
    H(3/4, 1/4); one weight per modality for the whole batch, lambda_1 = 0.25 / (0.25 + 0.5 e^-H)."""
    o1 = torch.zeros(2, 2)
    o2 = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    w = entropy_weights([o1, o2], "batch")
    lam1 = 0.25 / (0.25 + 0.5 * EXP_MINUS_H2)
    torch.testing.assert_close(w, torch.tensor([[lam1, lam1], [1.0 - lam1, 1.0 - lam1]]))
    assert not torch.allclose(w, entropy_weights([o1, o2], "sample"))  # row 1 differs
    fixed = weighted_logits([o1, o2], torch.tensor([0.55, 0.45]))
    torch.testing.assert_close(fixed, 0.45 * o2)


# ---- the alternating step against hand-written references --------------------------------------
def setup_trainer(tmp_path, **overrides):
    cfg = {**SMALL, "records": str(tmp_path / "runs"), "progress": "off", "device": "cpu", **overrides}
    trainer = make_trainer("mla", "synthetic", cfg)
    trainer.setup()
    trainer.model.train()
    trainer.method.num_training_batches = len(trainer.loader(trainer.splits.train, train=True))
    trainer._step_logs = {}
    return trainer


def batches(trainer, n):
    it = iter(trainer.loader(trainer.splits.train, train=False))
    return [to_device(next(it), trainer.device) for _ in range(n)]


def reference_run(trainer, data, gm="none", legacy=False):
    """MLA written out by hand on a copy of the model: one encode, then per modality a head
    forward, CE, backward, [projection], SGD step, zero_grad; all grads deleted at batch end."""
    cfg = trainer.cfg
    model = copy.deepcopy(trainer.model)
    head = model.extra["shared_head"]
    params = [p for m in model.modalities for p in model.encoder_params(m)] + list(head.parameters())
    opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    n_batches = trainer.method.num_training_batches
    P, count = torch.eye(head.in_features), 0
    for i, batch in enumerate(data):
        feats = model.encode(batch)
        lam = gm_lambda(i, n_batches)
        for m in model.modalities:
            F.cross_entropy(head(feats[m]), batch["label"]).backward()
            if gm == "owm" and count > 0:
                head.weight.grad = head.weight.grad @ P
            opt.step()
            opt.zero_grad(set_to_none=not legacy)
            if gm == "owm":
                r = feats[m].detach().mean(0)
                k = P @ r
                P = P - torch.outer(k, k) / (lam + r @ k)
                P = P / P.norm()
            count += 1
        for p in model.parameters():
            p.grad = None
    return model, P


def assert_same_params(a, b, atol=0.0):
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=0 if atol == 0 else 1e-5, atol=atol, msg=name)


def test_as_released_is_exactly_plain_alternating_training(tmp_path):
    trainer = setup_trainer(tmp_path, mla_gm="none")
    data = batches(trainer, 2)
    ref, _ = reference_run(trainer, data, gm="none")
    steps = trainer.optimizer_steps
    for i, batch in enumerate(data):
        trainer.method.training_step(batch, i)
    assert trainer.optimizer_steps - steps == 4  # M = 2 optimizer steps per batch
    assert trainer.method.P is None and trainer.method.label() == "MLA (as released)"
    assert_same_params(trainer.model, ref)
    assert all(p.grad is None for p in trainer.model.parameters())


def test_owm_step_matches_the_hand_written_order(tmp_path):
    """First sub-step of the run unprojected; afterwards grad W <- grad W P; P updated AFTER
    each sub-step with that modality's batch mean (updating before would remove the current
    batch's own direction and fail here)."""
    trainer = setup_trainer(tmp_path)
    data = batches(trainer, 2)
    ref, ref_P = reference_run(trainer, data, gm="owm")
    for i, batch in enumerate(data):
        trainer.method.training_step(batch, i)
    assert trainer.method.updates == 4
    torch.testing.assert_close(trainer.method.P, ref_P, rtol=1e-5, atol=1e-6)
    assert_same_params(trainer.model, ref, atol=1e-6)
    # and the projection really ran: the as-released step gives another head
    plain, _ = reference_run(trainer, data, gm="none")
    assert not torch.allclose(plain.extra["shared_head"].weight, trainer.model.extra["shared_head"].weight)
    logs = trainer._step_logs
    assert logs["head_grad_kept_m1"][0].item() == 1.0  # the run's first sub-step
    assert 0.0 < logs["head_grad_kept_m2"][0].item() < 1.0
    assert logs["gm_nonfinite"][0].item() == 0.0


def test_each_substep_moves_only_its_encoder_and_the_head(tmp_path):
    trainer = setup_trainer(tmp_path, mla_gm="none")
    model, method = trainer.model, trainer.method
    head = {id(p) for p in model.extra["shared_head"].parameters()}
    seen = []
    original = trainer.optimizer_step

    def spy(opt):
        seen.append({id(p) for p in model.parameters() if p.grad is not None})
        original(opt)

    trainer.optimizer_step = spy
    method.training_step(batches(trainer, 1)[0], 0)
    assert seen == [{id(p) for p in model.encoder_params(m)} | head for m in ("m1", "m2")]


def test_legacy_zero_grad_emulates_torch_1_8(tmp_path):
    trainer = setup_trainer(tmp_path, mla_gm="none", mla_legacy_zero_grad=True)
    data = batches(trainer, 2)
    ref, _ = reference_run(trainer, data, gm="none", legacy=True)
    modern, _ = reference_run(trainer, data, gm="none", legacy=False)
    for i, batch in enumerate(data):
        trainer.method.training_step(batch, i)
    assert_same_params(trainer.model, ref)
    # m1's encoder got the zero-gradient momentum / weight-decay step in m2's sub-step
    m1 = trainer.model.encoder_params("m1")[0]
    assert not torch.equal(m1, modern.encoder_params("m1")[0])
    assert all(p.grad is None for p in trainer.model.parameters())


def test_variants_modify_the_head_gradient_as_specified(tmp_path):
    """bb_additive and elementwise update P with the CURRENT batch mean first (element-wise
    rule), then add / replace; checked on the second sub-step of the run."""
    for gm, additive in (("bb_additive", True), ("elementwise", False)):
        trainer = setup_trainer(tmp_path / gm, mla_gm=gm)
        method, head = trainer.method, trainer.model.extra["shared_head"]
        batch = batches(trainer, 1)[0]
        method.updates = 1  # past the run's first sub-step
        d = head.in_features
        P0 = torch.eye(d) + 0.05 * torch.randn(d, d, generator=torch.Generator().manual_seed(0))
        method.P = P0.clone()  # not symmetric: P^T vs P matters
        feats = trainer.model.encode(batch)
        F.cross_entropy(head(feats["m1"]), batch["label"]).backward()
        raw = head.weight.grad.clone()
        method._modify_head_grad(head.weight, batch_mean_feature(feats["m1"]), 0.1)
        P = elementwise_update(P0, batch_mean_feature(feats["m1"]), 0.1)
        assert not torch.allclose(P, P.t(), atol=1e-4)
        torch.testing.assert_close(method.P, P)
        torch.testing.assert_close(head.weight.grad, raw + raw @ P.t() if additive else raw @ P.t())


def test_bf16_autocast_step_keeps_fp32_projector_and_gradients(tmp_path):
    trainer = setup_trainer(tmp_path, amp="bf16")  # CPU bf16 autocast, for the test
    method = trainer.method
    data = batches(trainer, 2)
    for i, batch in enumerate(data):
        loss = method.training_step(batch, i)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert method.P.dtype == torch.float32 and torch.isfinite(method.P).all()
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    with trainer.autocast():
        pred = method.predict(data[0])
    assert pred.fused.dtype == torch.float32 and torch.isfinite(pred.fused).all()


def test_predict_uses_the_shared_head_and_entropy_weights(tmp_path):
    trainer = setup_trainer(tmp_path)
    trainer.model.eval()
    batch = batches(trainer, 1)[0]
    pred = trainer.method.predict(batch)
    head = trainer.model.extra["shared_head"]
    feats = trainer.model.encode(batch)
    o = [head(feats[m]) for m in ("m1", "m2")]
    torch.testing.assert_close(pred.per_modality["m1"], o[0])
    torch.testing.assert_close(pred.per_modality["m2"], o[1])
    torch.testing.assert_close(pred.fused, weighted_logits(o, entropy_weights(o, "sample")))
    fixed = setup_trainer(tmp_path / "f", mla_fusion="fixed", mla_fixed_weights={"m1": 0.7, "m2": 0.3})
    fixed.model.load_state_dict(trainer.model.state_dict())
    fixed.model.eval()
    torch.testing.assert_close(fixed.method.predict(batch).fused, 0.7 * o[0] + 0.3 * o[1])


# ---- runs ----------------------------------------------------------------------------------
def test_two_epochs_on_synthetic_record_diagnostics_and_keep_P_psd(fast):
    trainer = make_trainer("mla", "synthetic", {**fast, **SYN})
    rec = trainer.fit()
    header, epochs = rec["header"], rec["epochs"]
    assert header["method_label"] == "MLA"
    assert header["method_info"]["per_modality"] == "method"
    assert not header["method_info"]["trains_unimodal_heads"]
    for e in epochs:
        assert e["optimizer_steps"] == 2 * e["train_batches"]
        assert set(e["lrs"]) == {"main/encoder.m1", "main/encoder.m2", "main/shared_head"}
        d = e["diagnostics"]
        for key in ("loss_m1", "loss_m2", "head_grad_kept_m1", "head_grad_kept_m2", "head_grad_kept",
                    "p_trace", "gm_nonfinite"):
            assert math.isfinite(d[key]), key
        assert 0.0 < d["head_grad_kept"] < 1.0 and d["gm_nonfinite"] == 0.0
        assert {"m1", "m2", "fused"} <= set(e["test"])
    P = trainer.method.P
    assert torch.equal(P, P.t()) and torch.linalg.eigvalsh(P.double()).min() >= -1e-7
    assert torch.linalg.matrix_norm(P).item() == pytest.approx(1.0, abs=1e-5)
    assert trainer.method.updates == 2 * sum(e["train_batches"] for e in epochs)


def test_two_epochs_on_avdigits(fast, shared_data):
    rec = run("mla", "avdigits", {**fast, "epochs": 2, "limit_train_batches": 5, "limit_eval_batches": 3}).record
    for e in rec["epochs"]:
        assert e["optimizer_steps"] == 10
        assert {"loss_audio", "loss_image", "head_grad_kept", "p_trace"} <= set(e["diagnostics"])
        assert math.isfinite(e["train_loss"])
        assert {"audio", "image", "fused"} <= set(e["test"])


def test_resume_is_identical_with_the_projector_in_the_state(fast, tmp_path, monkeypatch):
    assert_resume_identical("mla", "synthetic", {**fast, **SYN, "epochs": 3}, tmp_path, monkeypatch)


def test_state_round_trip(tmp_path):
    a = setup_trainer(tmp_path / "a")
    a.method.training_step(batches(a, 1)[0], 0)
    state = a.method.state_dict()
    assert state["updates"] == 2 and state["P"].shape == (16, 16)
    b = setup_trainer(tmp_path / "b")
    b.method.load_state_dict(state)
    assert b.method.updates == 2 and torch.equal(b.method.P, a.method.P)
    c = setup_trainer(tmp_path / "c", mla_gm="bb_additive")
    with pytest.raises(ConfigError, match="checkpoint"):
        c.method.load_state_dict(state)


def test_three_modalities(fast):
    rec = run("mla", "synthetic", {**fast, **SYN, "n_modalities": 3, "mla_fusion": "fixed"}).record
    assert rec["header"]["modalities"] == ["m1", "m2", "m3"]
    assert rec["header"]["method_info"]["inference_rule"] == "fixed weights m1 0.3333, m2 0.3333, m3 0.3333"
    for e in rec["epochs"]:
        assert e["optimizer_steps"] == 3 * e["train_batches"]
        assert {"loss_m3", "head_grad_kept_m3"} <= set(e["diagnostics"])
        assert {"m1", "m2", "m3"} <= set(e["test"])


def test_paper_values_and_labels():
    cfg = assemble(DATASETS.get("cremad"), METHODS.get("mla"))
    assert cfg["mla_fixed_weights"] == {"audio": 0.55, "visual": 0.45}
    assert cfg["mla_gm"] == "owm" and cfg["mla_fusion"] == "dynamic"
    cfg = assemble(DATASETS.get("iemocap"), METHODS.get("mla"))
    assert cfg["mla_fixed_weights"] == {"audio": 0.35, "visual": 0.25, "text": 0.4}
    assert MLA({"mla_gm": "bb_additive", "mla_entropy_scope": "batch"}).label() == "MLA (BB additive GM, batch entropy)"


# ---- refusals ------------------------------------------------------------------------------
def test_refusals(fast, tmp_path):
    base = {**fast, **SMALL}
    with pytest.raises(ConfigError, match="same width"):  # one shared head needs equal d
        make_trainer("mla", "synthetic", {**base, "embed_dim": None, "backbone.m2.hidden": 32}).setup()
    with pytest.raises(UnsupportedError, match="at least 2"):
        make_trainer("mla", "synthetic", {**base, "n_modalities": 1}).check()
    with pytest.raises(ConfigError, match="mla_order"):
        make_trainer("mla", "synthetic", {**base, "mla_order": ["m1", "m1"]}).check()
    with pytest.raises(ConfigError, match="missing m2"):
        make_trainer("mla", "synthetic", {**base, "mla_fusion": "fixed", "mla_fixed_weights": {"m1": 1.0}}).check()
    with pytest.raises(ConfigError, match="not in the run: m3"):
        make_trainer("mla", "synthetic", {**base, "mla_fusion": "fixed",
                                          "mla_fixed_weights": {"m1": 0.5, "m2": 0.3, "m3": 0.2}}).check()
    with pytest.raises(ConfigError, match=">= 0"):
        make_trainer("mla", "synthetic", {**base, "mla_fusion": "fixed",
                                          "mla_fixed_weights": {"m1": -1.0, "m2": 2.0}}).check()
    with pytest.raises(ConfigError, match="all 0"):
        make_trainer("mla", "synthetic", {**base, "mla_fusion": "fixed",
                                          "mla_fixed_weights": {"m1": 0, "m2": 0}}).check()
    with pytest.raises(ConfigError, match="allowed values"):
        make_trainer("mla", "synthetic", {**base, "mla_gm": "owm2"})
    # the dynamic default never trips over the paper's 3-modality weights on 2 modalities
    make_trainer("mla", "synthetic", {**base, "mla_fixed_weights": {"m1": 1.0}}).check()


# ---- wrong variants that earlier tests let pass (issue 21) -----------------------------------
def test_default_fusion_weights_are_per_sample_written_out(tmp_path):
    """Wrong variant caught: batch-scope entropy weights as the default (the official quirk: one
    weight per modality per evaluation batch). The default prediction is written out here from
    the entropies of each sample's class distribution, without ``entropy_weights``, and its
    weights vary across the samples of one batch."""
    trainer = setup_trainer(tmp_path)
    assert trainer.cfg["mla_entropy_scope"] == "sample"
    model = trainer.model
    with torch.no_grad():  # a trained-looking head: confident on some samples, not others
        model.extra["shared_head"].weight.mul_(30.0)
    model.eval()
    batch = batches(trainer, 1)[0]
    pred = trainer.method.predict(batch)
    with torch.no_grad():
        feats = model.encode(batch)
        o = [model.extra["shared_head"](feats[m]) for m in ("m1", "m2")]
        neg_h = [(F.softmax(x, 1) * F.log_softmax(x, 1)).sum(1) for x in o]  # -H_m per sample
        w1 = neg_h[0].exp() / (neg_h[0].exp() + neg_h[1].exp())
    torch.testing.assert_close(pred.fused, w1[:, None] * o[0] + (1 - w1)[:, None] * o[1])
    assert w1.max() - w1.min() > 0.1  # one weight per sample, not one per batch
