"""LFM method plugin: alignment term, schedules and HVP by hand, the step, runs, resume, refusals."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from method_checks import assert_resume_identical
from mmbalance.methods.lfm import (
    LFM,
    SecondOrderError,
    alignment,
    double_backward_failures,
    exp_alpha_al,
    fitted_alpha_ce,
    fused_ce,
    hessian_vector_mean,
    hvp_train_mode,
    infonce_pair,
    learnable_alpha_lr,
    learnable_update,
    lfm_loss,
    lr_scale_epoch_start,
    mixkl_pair,
    scheduled_alphas,
    second_order_problem,
    take_rows,
)
from torch import nn
from torch.autograd.function import once_differentiable

from mmbalance.config import assemble
from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.registry import BACKBONES, DATASETS, METHODS, Entry
from mmbalance.runner import make_trainer, run
from mmbalance.trainer import to_device

SMALL = {"epochs": 2, "n_train": 300, "n_test": 100, "dim": 16, "embed_dim": 16, "checkpoint": False}
LEARN = {"alpha_schedule": "learnable", "heldout_fraction": 0.05}

# Hand example, two classes: p = softmax([0, 0]) = (1/2, 1/2), q = softmax([ln 3, 0]) = (3/4, 1/4),
# m = (5/8, 3/8). KL(m||p) = 5/8 ln(5/4) + 3/8 ln(3/4); KL(m||q) = 5/8 ln(5/6) + 3/8 ln(3/2).
KL_MP = 5 / 8 * math.log(5 / 4) + 3 / 8 * math.log(3 / 4)  # 0.0315839
KL_MQ = 5 / 8 * math.log(5 / 6) + 3 / 8 * math.log(3 / 2)  # 0.0380984
MIXKL = 0.5 * (KL_MP + KL_MQ)  # 0.0348412
# the textbook Jensen-Shannon divergence 1/2 [KL(p||m) + KL(q||m)] is another number:
JS = 0.5 * (0.5 * math.log(4 / 5) + 0.5 * math.log(4 / 3) + 0.75 * math.log(6 / 5) + 0.25 * math.log(2 / 3))
LP = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
LQ = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest


def setup_trainer(tmp_path, **overrides):
    cfg = {**SMALL, "records": str(tmp_path / "runs"), "progress": "off", "device": "cpu", **overrides}
    trainer = make_trainer("lfm", "synthetic", cfg)
    trainer.setup()
    return trainer


def start_epoch(trainer, epoch: int) -> None:
    """What train_epoch does before its first batch."""
    method = trainer.method
    method.epoch = epoch
    trainer._step_logs = {}
    method.on_train_epoch_start(epoch)


def first_batch(trainer):
    return to_device(next(iter(trainer.loader(trainer.splits.train, train=False))), trainer.device)


# ---- the alignment term ----------------------------------------------------------------------
def test_mixkl_alignment_by_hand_is_the_reverse_mixture_kl_not_textbook_js():
    assert abs(MIXKL - JS) > 1e-3  # the two readings differ on this example
    a = mixkl_pair(LP, LQ)
    assert a.dtype == torch.float32
    assert a.item() == pytest.approx(MIXKL, abs=1e-7)
    assert mixkl_pair(LQ, LP).item() == pytest.approx(MIXKL, abs=1e-7)  # symmetric
    assert mixkl_pair(LQ, LQ).item() == pytest.approx(0.0, abs=1e-7)  # zero only when p = q


def test_mixkl_matches_the_released_kl_div_formula_value_and_gradient():
    """Released A: kl_div(log softmax, m, batchmean) both ways, m not detached."""
    g = torch.Generator().manual_seed(0)
    a0, b0 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    a1, b1 = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    mixkl_pair(a1, b1).backward()
    a2, b2 = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    p, q = F.softmax(a2, -1), F.softmax(b2, -1)
    m = 0.5 * p + 0.5 * q
    ref = 0.5 * (F.kl_div(p.log(), m, reduction="batchmean") + F.kl_div(q.log(), m, reduction="batchmean"))
    ref.backward()
    torch.testing.assert_close(mixkl_pair(a0, b0), ref.detach())
    torch.testing.assert_close(a1.grad, a2.grad)
    torch.testing.assert_close(b1.grad, b2.grad)
    # a variant with m detached has another gradient
    a3 = a0.clone().requires_grad_()
    p3, q3 = F.softmax(a3, -1), F.softmax(b0, -1)
    m3 = (0.5 * p3 + 0.5 * q3).detach()
    (0.5 * (F.kl_div(p3.log(), m3, reduction="batchmean") + F.kl_div(q3.log(), m3, reduction="batchmean"))).backward()
    assert not torch.allclose(a3.grad, a1.grad, atol=1e-4)


def test_three_modalities_average_the_pairs():
    # pairs (p, q), (p, r = p), (q, r): A = (MIXKL + 0 + MIXKL) / 3
    assert alignment([LP, LQ, LP]).item() == pytest.approx(2 * MIXKL / 3, abs=1e-7)
    assert alignment([LP, LQ]).item() == pytest.approx(MIXKL, abs=1e-7)


def test_infonce_by_hand():
    # orthonormal features, positives on the diagonal: each row's CE is log(1 + e^{-1/t})
    z = torch.eye(2) * 3.0  # normalised away
    t = 0.5
    want = math.log(1 + math.exp(-1 / t))
    assert infonce_pair(z, z, t).item() == pytest.approx(want, abs=1e-6)
    swapped = z.flip(0)  # positives now orthogonal, negatives aligned: log(1 + e^{1/t})
    assert infonce_pair(z, swapped, t).item() == pytest.approx(math.log(1 + math.exp(1 / t)), abs=1e-5)
    assert alignment([z, z], "infonce", t).item() == pytest.approx(want, abs=1e-6)


def test_fused_ce_uses_the_mean_of_the_logits_and_the_loss_its_weights():
    y = torch.tensor([0, 0])
    # mean logits = [ln3 / 2, 0]: CE = -log(sqrt3 / (sqrt3 + 1))
    want = -math.log(math.sqrt(3) / (math.sqrt(3) + 1))
    assert fused_ce([LP, LQ], y).item() == pytest.approx(want, abs=1e-6)
    sum_ce = -math.log(3 / 4)  # the sum of the logits would give this
    assert abs(want - sum_ce) > 0.05
    ce, a = torch.tensor(2.0), torch.tensor(0.5)
    assert lfm_loss(ce, a, 0.25, 0.75, 2.0).item() == pytest.approx(2 * (0.25 * 2.0 + 0.75 * 0.5))


# ---- the schedules -------------------------------------------------------------------------
def test_fitted_schedule_values_rescaling_and_clamp():
    assert fitted_alpha_ce(0) == pytest.approx(0.204623704, abs=1e-12)
    # e = 100 by hand: sum of c_i * 100^i
    e100 = 0.204623704 + 0.335472727 + 1.22989557 - 2.92947416 + 2.23835486 - 0.539717505
    assert fitted_alpha_ce(100) == pytest.approx(e100, abs=1e-9)
    for epoch, value in ((50, 0.437), (150, 0.821), (175, 0.993), (199, 0.916)):  # the released fitted schedule
        assert fitted_alpha_ce(epoch) == pytest.approx(value, abs=5e-4)
    assert fitted_alpha_ce(183, clamp=False) == pytest.approx(1.011, abs=5e-4)
    assert fitted_alpha_ce(183) == 1.0
    ce, al = scheduled_alphas("fitted", 183, 200, clamp=False)
    assert al < 0  # the official weight of the alignment goes negative there
    # rescaled to a 2-epoch run: epoch 1 is e' = 100
    assert scheduled_alphas("fitted", 1, 2) == pytest.approx((e100, 1 - e100), abs=1e-9)
    assert fitted_alpha_ce(1, 2, rescale=False) == pytest.approx(sum((0.204623704, 3.35472727e-03, 1.22989557e-04,
                                                                      -2.92947416e-06, 2.23835486e-08, -5.39717505e-11)))
    assert fitted_alpha_ce(220, rescale=False, clamp=False) == pytest.approx(0.322, abs=5e-4)  # collapses


def test_exp_schedule_by_hand():
    assert scheduled_alphas("exp", 0, 20) == pytest.approx((0.05, 0.95))  # exp(0) = 1 clipped
    assert exp_alpha_al(3) == pytest.approx(math.exp(-0.9))
    assert scheduled_alphas("exp", 5, 20) == pytest.approx((1 - math.exp(-1.5), math.exp(-1.5)))
    assert exp_alpha_al(10) == 0.05  # exp(-3) = 0.0498 clipped
    with pytest.raises(ValueError):
        scheduled_alphas("learnable", 0, 20)


def test_learnable_step_size_and_update_direction():
    assert [learnable_alpha_lr(e) for e in (0, 19, 20, 39, 40, 60)] == pytest.approx([1e-4, 1e-4, 5e-5, 5e-5, 2.5e-5, 1.25e-5])
    assert learnable_alpha_lr(45, 1e-4, 0) == 1e-4
    # alpha_al <- clip(alpha_al - lr * s): a positive s moves weight from alignment to CE
    assert learnable_update(0.95, 100.0, 1e-4) == pytest.approx((0.06, 0.94))
    assert learnable_update(0.95, 5000.0, 1e-4) == pytest.approx((0.55, 0.45))
    assert learnable_update(0.95, -1000.0, 1e-4) == pytest.approx((0.05, 0.95))  # upper clip
    assert learnable_update(0.1, 1e4, 1e-4) == pytest.approx((0.95, 0.05))  # lower clip


def test_hvp_by_hand_on_a_two_parameter_example():
    """w = (w1, w2) = (1, 2); L_cls = w1^2 w2, L_al = w1^2 / 2 + w2^3 / 3.
    g_cls = (2 w1 w2, w1^2) = (4, 1); H_cls = [[4, 2], [2, 0]], H_al = [[1, 0], [0, 4]];
    L_tot = 0.25 L_cls + 0.75 L_al: H_tot = [[1.75, 0.5], [0.5, 3]], v = H_tot g_cls = (7.5, 5)."""
    w1 = torch.tensor(1.0, requires_grad=True)
    w2 = torch.tensor(2.0, requires_grad=True)

    def losses():
        cls = w1**2 * w2
        return 0.25 * cls + 0.75 * (w1**2 / 2 + w2**3 / 3), cls

    tot, cls = losses()
    assert hessian_vector_mean(tot, cls, [w1, w2], (0,)).item() == pytest.approx(7.5)
    tot, cls = losses()
    assert hessian_vector_mean(tot, cls, [w1, w2], (0, 1)).item() == pytest.approx(6.25)
    tot, cls = losses()
    assert hessian_vector_mean(tot, cls, [w2, w1], (0,)).item() == pytest.approx(5.0)  # first tensor only


def test_lr_timing_and_hvp_mode_rules():
    assert [lr_scale_epoch_start(e, 70, 0.1) for e in (0, 68, 69, 70, 138, 139)] == pytest.approx([1, 1, 0.1, 1, 1, 0.1])
    assert [hvp_train_mode("official", e) for e in (0, 1, 5)] == [True, False, False]
    assert hvp_train_mode("eval", 0) is False and hvp_train_mode("train", 3) is True


def test_take_rows_slices_nested_batches():
    batch = {"a": torch.arange(10).view(5, 2), "t": {"ids": torch.zeros(5, 3)}, "names": list("abcde"),
             "label": torch.arange(5)}
    out = take_rows(batch, 2)
    assert out["a"].tolist() == [[0, 1], [2, 3]] and out["t"]["ids"].shape == (2, 3)
    assert out["names"] == ["a", "b"] and out["label"].tolist() == [0, 1]


# ---- the plugin on a real batch -----------------------------------------------------------
def test_step_is_the_weighted_loss_of_the_epoch(tmp_path):
    trainer = setup_trainer(tmp_path)
    method, model = trainer.method, trainer.model
    assert model.fusion is None and method.per_modality_source() == "unimodal_heads"
    start_epoch(trainer, 1)  # e' = 100 of a 2-epoch run
    e100 = 0.204623704 + 0.335472727 + 1.22989557 - 2.92947416 + 2.23835486 - 0.539717505
    assert method.alpha_ce == pytest.approx(e100) and method.alpha_al == pytest.approx(1 - e100)
    batch = first_batch(trainer)
    torch.manual_seed(0)
    loss = method.training_step(batch, 0)
    with torch.no_grad():
        feats = model.encode(batch)
        o1, o2 = model.uni_heads["m1"](feats["m1"]), model.uni_heads["m2"](feats["m2"])
        ce = F.cross_entropy((o1 + o2) / 2, batch["label"])
        p, q = F.softmax(o1, 1), F.softmax(o2, 1)
        m = (p + q) / 2
        a = 0.5 * (F.kl_div(p.log(), m, reduction="batchmean") + F.kl_div(q.log(), m, reduction="batchmean"))
    torch.testing.assert_close(loss.detach(), 2 * (e100 * ce + (1 - e100) * a))
    logs = trainer._step_logs
    assert set(logs) >= {"alpha_ce", "alpha_al", "ce", "align", "ce_m1", "ce_m2", "nonfinite"}
    torch.testing.assert_close(logs["align"][-1], a)
    # the prediction is the mean of the two trained heads' logits
    model.eval()
    pred = method.predict(batch)
    torch.testing.assert_close(pred.fused, (o1 + o2) / 2)
    torch.testing.assert_close(pred.per_modality["m2"], o2)


def test_learnable_update_is_the_hvp_on_the_first_heldout_rows(tmp_path):
    trainer = setup_trainer(tmp_path, **LEARN)
    method, model = trainer.method, trainer.model
    assert len(trainer.heldout()) == 14 and len(trainer.splits.train) == 256  # 270 train, 5 % held out
    calls = []
    original = trainer.iterate

    def spy(split, **kwargs):
        calls.append((split, kwargs["train_mode"], kwargs["grad"]))
        return original(split, **kwargs)

    trainer.iterate = spy
    params = [p for p in model.parameters() if p.requires_grad]
    assert params[0] is model.encoder_params("m1")[0]  # "the first parameter tensor"
    for epoch, train_mode in ((0, True), (1, False)):
        alpha_al = method.alpha_al
        # by hand on the same rows: L_tot = a_ce CE + a_al A (no factor 2), v = H_tot g_cls
        rows = next(iter(trainer.loader(trainer.heldout(), train=False, batch_size=64)))
        rows = to_device({k: v[:8] for k, v in rows.items()}, trainer.device)
        model.train(train_mode)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        feats = model.encode(rows)
        uni = model.unimodal_logits(feats)
        ce = F.cross_entropy((uni["m1"] + uni["m2"]) / 2, rows["label"])
        a = mixkl_pair(uni["m1"], uni["m2"])
        s = hessian_vector_mean((1 - alpha_al) * ce + alpha_al * a, ce, params, (0,)).item()
        model.load_state_dict(state)
        model.train()
        start_epoch(trainer, epoch)
        assert calls[-1] == ("heldout", train_mode, True)
        assert method.last_s == pytest.approx(s, rel=1e-4, abs=1e-9)
        want = min(0.95, max(0.05, alpha_al - 1e-4 * s))
        assert method.alpha_al == pytest.approx(want, abs=1e-12)
        assert method.alpha_ce == pytest.approx(1 - want, abs=1e-12)
        assert trainer._step_logs["hvp_rows"] == [8.0]
    assert s != 0.0


def test_state_round_trip_and_schedule_mismatch(tmp_path):
    method = LFM({"alpha_schedule": "learnable"})
    assert (method.alpha_ce, method.alpha_al) == pytest.approx((0.05, 0.95))
    method.alpha_ce, method.alpha_al, method.hvp_skipped = 0.3, 0.7, 2
    other = LFM({"alpha_schedule": "learnable"})
    other.load_state_dict(method.state_dict())
    assert (other.alpha_ce, other.alpha_al, other.hvp_skipped) == (0.3, 0.7, 2)
    with pytest.raises(ConfigError, match="alpha_schedule=learnable"):
        LFM({"alpha_schedule": "fitted"}).load_state_dict(method.state_dict())
    assert LFM({}).heldout_fraction == 0.0 and other.heldout_fraction == 0.0025  # held out only when learnable


def test_official_lr_timing_moves_the_decay_one_epoch_early(tmp_path, fast):
    base = {**fast, **SMALL, "epochs": 3, "scheduler": "step", "step_size": 2, "gamma": 0.1, "lr": 0.05,
            "limit_train_batches": 1, "limit_eval_batches": 1}
    trainer_timing = run("lfm", "synthetic", base).record["epochs"]
    early = run("lfm", "synthetic", {**base, "lr_decay_timing": "epoch_start"}).record["epochs"]
    assert [e["lr"] for e in trainer_timing] == pytest.approx([0.05, 0.05, 0.005])
    assert [e["lr"] for e in early] == pytest.approx([0.05, 0.005, 0.005])


def test_official_init_zeroes_linear_biases(tmp_path):
    framework = setup_trainer(tmp_path / "a").model
    official = setup_trainer(tmp_path / "b", weight_init="official").model
    assert torch.count_nonzero(framework.uni_heads["m1"].bias) > 0
    for m in ("m1", "m2"):
        assert torch.count_nonzero(official.uni_heads[m].bias) == 0
        linears = [mod for mod in official.encoders[m].modules() if isinstance(mod, nn.Linear)]
        assert linears and all(torch.count_nonzero(mod.bias) == 0 for mod in linears)


def test_labels_defaults_and_record_info():
    assert LFM({}).label() == "LFM"
    assert LFM({"alpha_schedule": "learnable"}).label() == "LFM (learnable)"
    assert LFM({"alpha_schedule": "exp"}).loss_scale == 1.0 and LFM({}).loss_scale == 2.0
    assert LFM({"align": "infonce", "loss_scale": 1.0}).label() == "LFM (InfoNCE t=0.1, scale=1)"
    cfg = assemble(DATASETS.get("cremad"), METHODS.get("lfm"))
    assert cfg["lr_decay_timing"] == "epoch_start" and cfg["alpha_schedule"] == "fitted"
    info = LFM({"alpha_schedule": "learnable"}).record_info()
    assert info["hvp"]["samples"] == 8 and info["inference_rule"].startswith("mean")


# ---- refusals ------------------------------------------------------------------------------
class _OnceSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _OnceNet(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, x):
        return _OnceSquare.apply(self.fc(x.flatten(1)))


class _AttnNet(nn.Module):
    """Two tokens of width 8 through scaled_dot_product_attention (fused CPU kernel by default)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.inp = nn.Linear(in_dim, 16)
        self.out = nn.Linear(16, out_dim)
        self.out_dim = out_dim

    def forward(self, x):
        h = self.inp(x.flatten(1)).view(-1, 1, 2, 8)
        return self.out(F.scaled_dot_product_attention(h, h, h).flatten(1))


@pytest.fixture
def test_backbones(monkeypatch):
    BACKBONES.load_plugins()
    for name, cls in (("lfm_test_once", _OnceNet), ("lfm_test_attn", _AttnNet)):
        def build(spec, out_dim, weights=None, _cls=cls, **kw):
            return _cls(math.prod(spec.shape), out_dim or 16)
        monkeypatch.setitem(BACKBONES._entries, name, Entry(name, build, "test backbone"))


def test_second_order_check_finds_a_once_differentiable_backward():
    """once_differentiable leaves an edge-less error node: autograd would prune it and return a
    silently incomplete HVP, so the graph is searched for it."""
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    for net, bad in ((_OnceNet(4, 3), True), (nn.Sequential(nn.Linear(4, 3), nn.Tanh()), False)):
        params = list(net.parameters())
        z = net(x)
        grads = torch.autograd.grad((z * z).mean(), params, create_graph=True)
        assert (second_order_problem(grads) is not None) is bad
        z = net(x)
        if bad:
            with pytest.raises(SecondOrderError, match="cannot be differentiated again"):
                hessian_vector_mean((z * z).mean(), z.mean(), params)
        else:
            assert math.isfinite(hessian_vector_mean((z * z).mean(), z.mean(), params).item())


def test_a_backbone_without_double_backward_is_refused_by_name(tmp_path, fast, test_backbones):
    cfg = {**fast, **SMALL, **LEARN, "backbone.m2.name": "lfm_test_once"}
    with pytest.raises(UnsupportedError, match=r"backbone 'lfm_test_once' of modality 'm2'") as info:
        run("lfm", "synthetic", cfg)
    assert "'m1'" not in str(info.value) and "alpha_schedule=fitted" in str(info.value)
    # the scheduled modes need no second-order gradients
    run("lfm", "synthetic", {**fast, **SMALL, "epochs": 1, "backbone.m2.name": "lfm_test_once",
                             "records": str(tmp_path / "sched")})


def test_fused_attention_kernel_refused_unless_math_kernels(tmp_path, fast, test_backbones):
    trainer = setup_trainer(tmp_path, **LEARN, **{"backbone.m1.name": "lfm_test_attn"})
    batch = first_batch(trainer)
    assert set(double_backward_failures(trainer.model, batch)) == {"m1"}  # detected, not assumed
    cfg = {**fast, **SMALL, **LEARN, "epochs": 1, "backbone.m1.name": "lfm_test_attn"}
    with pytest.raises(UnsupportedError, match=r"backbone 'lfm_test_attn' of modality 'm1'.*hvp_math_kernels=true"):
        run("lfm", "synthetic", {**cfg, "hvp_math_kernels": False})
    result = run("lfm", "synthetic", {**cfg, "records": str(tmp_path / "math")})  # default: math kernel
    assert math.isfinite(result.record["epochs"][0]["diagnostics"]["hvp_s"])


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(UnsupportedError, match="at least 2"):
        setup_trainer(tmp_path, modalities=["m1"])
    with pytest.raises(ConfigError, match="same width"):
        setup_trainer(tmp_path, align="infonce", embed_dim=None, **{"backbone.m1.hidden": 8})
    with pytest.raises(ConfigError, match="scheduler"):
        setup_trainer(tmp_path, lr_decay_timing="epoch_start", scheduler="cosine")
    with pytest.raises(ConfigError, match="alpha_min"):
        setup_trainer(tmp_path, alpha_min=0.9, alpha_max=0.1)
    trainer = setup_trainer(tmp_path, alpha_schedule="learnable", heldout_fraction=0.001)
    with pytest.raises(ConfigError, match="at least 2"):
        trainer.method.on_fit_start()
    with pytest.raises(ConfigError, match="alpha_schedule"):
        setup_trainer(tmp_path, alpha_schedule="bilevel")


# ---- runs ----------------------------------------------------------------------------------
def test_two_epochs_on_synthetic_record_diagnostics(tmp_path, fast):
    result = run("lfm", "synthetic", {**fast, **SMALL})
    epochs = result.record["epochs"]
    assert len(epochs) == 2 and result.record["header"]["method_label"] == "LFM"
    assert result.record["header"]["method_info"]["per_modality"] == "unimodal_heads"
    d0, d1 = epochs[0]["diagnostics"], epochs[1]["diagnostics"]
    assert d0["alpha_ce"] == pytest.approx(0.204623704) and d1["alpha_ce"] == pytest.approx(0.539155196)
    assert d0["align"] >= 0 and d0["nonfinite"] == 0 and "ce_m1" in d0
    assert {"m1", "m2", "fused"} <= set(epochs[-1]["test"])


def test_two_epochs_on_avdigits_scheduled_and_learnable(tmp_path, fast, shared_data, monkeypatch):
    """Both modes; the decoded data of the first run is reused by the second (build once)."""
    cls = DATASETS.get("avdigits")
    original, built = cls.build, {}

    def build_once(self, cfg, modalities):
        if "splits" not in built:
            built["splits"] = original(self, cfg, modalities)
        return dataclasses.replace(built["splits"], info=dict(built["splits"].info))

    monkeypatch.setattr(cls, "build", build_once)
    base = {**fast, "epochs": 2, "limit_train_batches": 5, "limit_eval_batches": 3}
    fitted = run("lfm", "avdigits", base)
    assert fitted.record["epochs"][-1]["diagnostics"]["align"] > 0
    learn = run("lfm", "avdigits", {**base, "alpha_schedule": "learnable", "heldout_fraction": 0.01,
                                    "records": str(tmp_path / "learn")})
    e0, e1 = learn.record["epochs"]
    assert "held out for method lfm" in learn.record["header"]["dataset_info"]["heldout_rule"]
    assert e0["extra_batches"] == 1 and e0["diagnostics"]["hvp_rows"] == 8
    assert math.isfinite(e0["diagnostics"]["hvp_s"]) and math.isfinite(e1["diagnostics"]["hvp_s"])
    assert {"audio", "image", "fused"} <= set(e1["test"])


def test_three_modalities_with_both_alignment_terms(tmp_path, fast):
    cfg = {**fast, **SMALL, "n_modalities": 3, "epochs": 1}
    result = run("lfm", "synthetic", {**cfg, **LEARN})
    assert {"m1", "m2", "m3", "fused"} <= set(result.record["epochs"][0]["test"])
    result = run("lfm", "synthetic", {**cfg, "align": "infonce", "records": str(tmp_path / "nce")})
    assert result.record["epochs"][0]["diagnostics"]["align"] > 0


def test_resume_is_identical_scheduled(tmp_path, fast, monkeypatch):
    overrides = {**fast, **SMALL, "epochs": 3, "checkpoint": True}
    assert_resume_identical("lfm", "synthetic", overrides, tmp_path, monkeypatch, kill_epoch=1, kill_batch=2)


def test_resume_is_identical_learnable(tmp_path, fast, monkeypatch):
    overrides = {**fast, **SMALL, **LEARN, "epochs": 3, "checkpoint": True}
    assert_resume_identical("lfm", "synthetic", overrides, tmp_path, monkeypatch, kill_epoch=2, kill_batch=1)


# ---- wrong variants that earlier tests let pass (issue 21) -----------------------------------
def step_loss_by_hand(trainer, batch, alpha_ce, alpha_al):
    model = trainer.model
    with torch.no_grad():
        uni = model.unimodal_logits(model.encode(batch))
        ce = F.cross_entropy((uni["m1"] + uni["m2"]) / 2, batch["label"])
        return (2 * (alpha_ce * ce + alpha_al * mixkl_pair(uni["m1"], uni["m2"]))).item()


@pytest.mark.parametrize("rescale", [True, False])
def test_fitted_rescale_reaches_the_step(tmp_path, rescale):
    """Wrong variant caught: ``fitted_rescale`` not reaching the step (the polynomial always
    evaluated at e * 200 / epochs, or always at e). Epoch 50 of a 100-epoch run is e' = 100
    rescaled, e = 50 not."""
    trainer = setup_trainer(tmp_path, epochs=100, fitted_rescale=rescale)
    start_epoch(trainer, 50)
    want = fitted_alpha_ce(100 if rescale else 50)
    assert trainer.method.alpha_ce == pytest.approx(want, abs=1e-12)
    assert abs(fitted_alpha_ce(100) - fitted_alpha_ce(50)) > 0.1
    batch = first_batch(trainer)
    loss = trainer.method.training_step(batch, 0).item()
    assert loss == pytest.approx(step_loss_by_hand(trainer, batch, want, 1 - want), rel=1e-5)


@pytest.mark.parametrize("clamp", [True, False])
def test_fitted_clamp_reaches_the_step(tmp_path, clamp):
    """Wrong variant caught: ``fitted_clamp`` not reaching the step. At epoch 183 of 200 the
    released polynomial gives alpha_ce = 1.011 > 1 (alpha_al < 0): clamped to 1, or kept."""
    trainer = setup_trainer(tmp_path, epochs=200, fitted_clamp=clamp)
    start_epoch(trainer, 183)
    raw = fitted_alpha_ce(183, clamp=False)
    want = 1.0 if clamp else raw
    assert raw > 1.01 and trainer.method.alpha_ce == pytest.approx(want, abs=1e-12)
    batch = first_batch(trainer)
    loss = trainer.method.training_step(batch, 0).item()
    assert loss == pytest.approx(step_loss_by_hand(trainer, batch, want, 1 - want), rel=1e-5)


def test_hvp_read_all_reaches_the_update(tmp_path):
    """Wrong variant caught: ``hvp_read`` not reaching the learnable update (s always the mean
    over the first parameter tensor): with ``all``, s is the mean of H_tot g_cls over every
    trainable parameter."""
    trainer = setup_trainer(tmp_path, **LEARN, hvp_read="all")
    method, model = trainer.method, trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    rows = next(iter(trainer.loader(trainer.heldout(), train=False, batch_size=64)))
    rows = to_device({k: v[:8] for k, v in rows.items()}, trainer.device)
    model.train(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    s = {}
    for name, read in (("all", range(len(params))), ("first", (0,))):
        feats = model.encode(rows)
        uni = model.unimodal_logits(feats)
        ce = F.cross_entropy((uni["m1"] + uni["m2"]) / 2, rows["label"])
        total = 0.05 * ce + 0.95 * mixkl_pair(uni["m1"], uni["m2"])
        s[name] = hessian_vector_mean(total, ce, params, read).item()
    model.load_state_dict(state)
    model.train()
    start_epoch(trainer, 1)  # eval-mode HVP (official mode from epoch 1)
    assert method.last_s == pytest.approx(s["all"], rel=1e-4, abs=1e-9)
    assert s["all"] != pytest.approx(s["first"], rel=1e-2)
