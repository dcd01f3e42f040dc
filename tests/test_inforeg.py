"""InfoReg method plugin: window score, Fisher trace, scores and beta by hand; the regulated step
on a real trainer (anchor, order, gating, every option); runs, resume, refusals.

Wrong variants each test here was checked against are named in the test's docstring.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from method_checks import assert_resume_identical
from mmbalance.methods.inforeg import (
    accumulate_fisher_,
    add_proximal_,
    anchor_modality,
    confidence_scores,
    fisher_trace,
    regulation_betas,
    traced_weights,
    window_score,
)

from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.runner import make_trainer, resolve_config, run
from mmbalance.trainer import to_device

SYN = {"epochs": 2, "n_train": 300, "n_test": 100}
STRONG_FIRST = {"strength": [2.0, 0.1]}  # synthetic with m1 clearly dominant after a few steps
WEAK_FIRST = {"strength": [0.1, 2.0]}  # and with m2 dominant

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest


# ---- the window score by hand ------------------------------------------------------------------
def test_window_score_by_hand():
    """k = (x_{e-1} - x_{e-1-W}) / sum of the last W, history padded with W zeros.

    Wrong variants caught: the window one epoch off (``padded[-W:]`` against ``padded[-W:]``,
    or against ``padded[-W-2:-2]``); no zero padding (k undefined/1 in the first W epochs);
    the relative change divided by the previous sum instead of the newest."""
    assert window_score([]) == 1.0  # epoch 0: open by definition
    assert window_score([2.0]) == pytest.approx(1.0)  # 2 / 2
    assert window_score([2.0, 2.0]) == pytest.approx(0.5)  # 2 / 4
    assert window_score([1.0, 2.0, 4.0]) == pytest.approx(4.0 / 7.0)
    assert window_score([2.0] * 10) == pytest.approx(0.1)  # flat: 1/e up to e = 10
    assert window_score([2.0] * 11) == pytest.approx(0.0)  # the padding has left the window
    # rising 1..12: newest 10 = 3..12 (75), the 10 before = 2..11 (65): k = 10/75
    assert window_score([float(i) for i in range(1, 13)]) == pytest.approx(10.0 / 75.0)
    # falling at the end: 5 x 11 then 1: newest 10 = 5*9 + 1 = 46, before 50: k = -4/46
    assert window_score([5.0] * 11 + [1.0]) == pytest.approx(-4.0 / 46.0)
    # W = 3: newest 2+3+4 = 9, before 1+2+3 = 6: k = 3/9
    assert window_score([1.0, 2.0, 3.0, 4.0], length=3) == pytest.approx(1.0 / 3.0)
    assert window_score([0.0, 0.0]) == 0.0  # nothing acquired: closed, not a division by zero


def test_window_on_a_hand_made_sequence_opens_then_closes(tmp_path):
    """A flat trace keeps the window open (k = 1/e > 0.05) through epoch 10 and closes it at
    epoch 11 (k = 0); the plugin opens a window only when k is strictly above the threshold.
    Wrong variant caught: ``k >= threshold`` instead of ``k > threshold`` (k = 0.5 exactly at
    threshold 0.5)."""
    flat = [2.0] * 12
    opened = [window_score(flat[:e]) > 0.05 for e in range(13)]
    assert opened == [True] * 11 + [False, False]
    ks = [window_score(flat[:e]) for e in range(12)]
    assert ks[:3] == [1.0, 1.0, 0.5] and ks[10] == pytest.approx(0.1) and ks[11] == pytest.approx(0.0)
    t = trainer_for(tmp_path, threshold=0.5)
    t.method.traces = {"m1": [2.0, 2.0], "m2": [2.0]}  # k = 0.5 and k = 1
    t.method.on_train_epoch_start(2)
    assert t.method._gate == {"m1": False, "m2": True}
    assert set(t.method._anchors) == {"m2"}


# ---- Fisher trace, scores, beta, proximal term by hand -----------------------------------------
def test_fisher_trace_and_accumulation_by_hand():
    """F += g*g over two steps, trace = sum over layers of the element mean.

    Wrong variants caught: |g| instead of g^2; sum of elements instead of the mean; the mean
    over all elements pooled across layers instead of a sum of per-layer means."""
    acc = [torch.zeros(2, 2), torch.zeros(3)]
    accumulate_fisher_(acc, [torch.tensor([[1.0, -1.0], [2.0, 0.0]]), torch.tensor([2.0, 0.0, 0.0])])
    accumulate_fisher_(acc, [torch.tensor([[0.0, 1.0], [1.0, 1.0]]), torch.tensor([-2.0, 1.0, 0.0])])
    torch.testing.assert_close(acc[0], torch.tensor([[1.0, 2.0], [5.0, 1.0]]))
    torch.testing.assert_close(acc[1], torch.tensor([8.0, 1.0, 0.0]))
    assert fisher_trace(acc) == pytest.approx(9.0 / 4.0 + 9.0 / 3.0)  # 2.25 + 3.0
    assert fisher_trace([]) == 0.0


def test_confidence_scores_by_hand():
    """Sum (official) and mean of the true-class softmax probability, fp32 from bf16 logits."""
    ln3, ln4 = math.log(3.0), math.log(4.0)
    a = torch.tensor([[0.0, ln3], [ln4, 0.0]])  # softmax rows (0.25, 0.75), (0.8, 0.2)
    b = torch.zeros(2, 2, dtype=torch.bfloat16)  # (0.5, 0.5)
    y = torch.tensor([1, 0])
    s = confidence_scores([a, b], y)
    assert s.dtype == torch.float32 and s.shape == (2,)
    torch.testing.assert_close(s, torch.tensor([0.75 + 0.8, 1.0]))
    torch.testing.assert_close(confidence_scores([a, b], y, "mean"), torch.tensor([0.775, 0.5]))


def test_betas_by_hand():
    """beta_u = c_u exp(tanh(S_u - second best)) on the dominant u only.

    Wrong variants caught: the weaker modality regulated (argmin); the gap to the minimum
    instead of the second best (M = 3); exp(gap) without tanh; tanh(gap) without exp; the
    November coefficient of the other modality applied to audio; a closed window of the
    dominant modality handing beta to the next one."""
    c = torch.tensor([0.95, 0.95])
    on = torch.tensor([True, True])
    torch.testing.assert_close(regulation_betas(torch.tensor([3.2, 3.0]), c, on), torch.tensor([1.1572911119, 0.0]))
    torch.testing.assert_close(regulation_betas(torch.tensor([3.0, 3.2]), c, on), torch.tensor([0.0, 1.1572911119]))
    # batch sums saturate: a gap of 10 gives c * e to 8 digits
    torch.testing.assert_close(regulation_betas(torch.tensor([40.0, 30.0]), c, on), torch.tensor([2.5823677264, 0.0]))
    # November: audio 0.95, the other 0.1
    nov = torch.tensor([0.95, 0.1])
    torch.testing.assert_close(regulation_betas(torch.tensor([3.0, 3.2]), nov, on), torch.tensor([0.0, 0.1218201170]))
    # tie: nobody; the dominant one's window closed: nobody (no hand-over to the second)
    assert regulation_betas(torch.tensor([3.0, 3.0]), c, on).abs().sum() == 0
    assert regulation_betas(torch.tensor([3.0, 3.2]), c, torch.tensor([True, False])).abs().sum() == 0
    # three modalities: the gap is to the second best (2.5 - 2.0), not to the weakest
    c3 = torch.tensor([0.95, 0.95, 0.95])
    torch.testing.assert_close(regulation_betas(torch.tensor([1.0, 2.5, 2.0]), c3, torch.tensor([True] * 3)),
                               torch.tensor([0.0, 1.5080597079, 0.0]))


def test_proximal_term_by_hand():
    """g += beta (p - p0). Wrong variants caught: a flipped sign; (p0 - p); beta applied to
    the gradient (beta * g) instead of the displacement."""
    p, p0 = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 2.5])
    g = torch.tensor([0.1, 0.1])
    add_proximal_([g], [p], [p0], torch.tensor(2.0))
    torch.testing.assert_close(g, torch.tensor([1.1, -0.9]))


def test_anchor_modality_is_audio_by_name_else_first():
    assert anchor_modality(["image", "audio"]) == "audio"
    assert anchor_modality(["zer", "mor"]) == "zer"


# ---- the regulated step on a real trainer -----------------------------------------------------
def trainer_for(tmp_path, **overrides):
    t = make_trainer("inforeg", "synthetic", {**SYN, "records": str(tmp_path / "runs"), "progress": "off",
                                              "device": "cpu", "checkpoint": False, **overrides})
    t.setup()
    t.method.on_fit_start()
    return t


def batches(t, n):
    loader = t.loader(t.splits.train, train=True, epoch=0)
    out = []
    for i, b in enumerate(loader):
        if i >= n:
            break
        out.append(to_device(b, t.device))
    return out


def plain_step(t, batch):
    """What the trainer does in automatic mode for one batch."""
    t.optimizer.zero_grad(set_to_none=True)
    loss = t.method.training_step(batch, 0)
    loss.backward()
    t.method.on_after_backward()
    t.optimizer_step(t.optimizer)


def captured_step(t, batch):
    """One step; returns (betas, grads before and after on_after_backward); the parameters the
    step started from are left in ``t.params_before``."""
    model, method = t.model, t.method
    t.optimizer.zero_grad(set_to_none=True)
    loss = method.training_step(batch, 0)
    betas = method._betas.clone()
    loss.backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    method.on_after_backward()
    after = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    t.params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t.optimizer_step(t.optimizer)
    return betas, before, after


def test_step_pulls_the_dominant_encoder_to_its_epoch_start_weights(tmp_path):
    """In epoch 1 (after a trained epoch 0), the dominant encoder's gradient gains exactly
    beta * (theta - theta at the start of epoch 1); the other encoder and every head keep their
    gradient.

    Wrong variants caught: the anchor taken once at fit start (stale by an epoch); the anchor
    refreshed every step (no pull at all); the anchor taken one epoch late (at epoch end); the
    other modality's encoder regulated; the pull applied to the fused head too."""
    t = trainer_for(tmp_path)
    m = t.method
    data = batches(t, 4)
    m.on_train_epoch_start(0)
    for b in data[:2]:
        plain_step(t, b)
    m.on_train_epoch_end(0)
    m.on_train_epoch_start(1)
    start = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    for b in data[:2]:
        plain_step(t, b)
    betas, before, after = captured_step(t, data[2])
    dominant = m.modalities[int(betas.argmax())]
    assert betas.max() > 0.95 and (betas > 0).sum() == 1
    params = t.params_before
    for name in before:
        if name.startswith(f"encoders.{dominant}."):
            expected = before[name] + betas.max() * (params[name] - start[name])
            torch.testing.assert_close(after[name], expected, rtol=1e-6, atol=1e-7)
            assert not torch.equal(after[name], before[name])
        else:
            assert torch.equal(after[name], before[name]), name


@pytest.mark.parametrize("rule", ["intended", "march"])
def test_step_loss_is_the_fused_ce_plus_every_unimodal_ce(tmp_path, rule):
    """L = CE(o) + sum_m CE(z_m), written out: z_m = W_m e_m + b/2 (the fused head's blocks) by
    default, the separate unimodal heads under rule=march. Wrong variant caught: the unimodal
    CEs dropped from the loss (plain joint training with a proximal pull; every other test of
    the step only looks at the gradient the pull adds)."""
    t = trainer_for(tmp_path, rule=rule)
    t.model.eval()  # the same features in the step and in the hand computation
    t.method.on_train_epoch_start(0)
    batch = batches(t, 1)[0]
    loss = t.method.training_step(batch, 0)
    with torch.no_grad():
        feats = t.model.encode(batch)
        e1, e2, y = feats["m1"], feats["m2"], batch["label"]
        w, b = t.model.fusion.fc.weight, t.model.fusion.fc.bias
        d1 = e1.shape[1]
        fused = torch.cat([e1, e2], 1) @ w.T + b
        if rule == "march":
            z1, z2 = t.model.uni_heads["m1"](e1), t.model.uni_heads["m2"](e2)
        else:
            z1, z2 = e1 @ w[:, :d1].T + b / 2, e2 @ w[:, d1:].T + b / 2
        expected = F.cross_entropy(fused, y) + F.cross_entropy(z1, y) + F.cross_entropy(z2, y)
    assert float(F.cross_entropy(z1, y)) > 0.1 and float(F.cross_entropy(z2, y)) > 0.1
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_fisher_trace_is_of_the_regulated_gradient(tmp_path):
    """x_e = sum over the traced Conv/Linear weights of mean(sum over steps of g^2), g the
    gradient AFTER the proximal term; one trace per modality (own windows).

    Wrong variants caught: accumulation before the regulation; biases or BN parameters traced
    too; the accumulator not reset at the epoch start (epoch 1 would include epoch 0); the
    history appended twice or not at all."""
    t = trainer_for(tmp_path)
    m = t.method
    data = batches(t, 4)
    for epoch in (0, 1):
        m.on_train_epoch_start(epoch)
        sums = {mod: [torch.zeros_like(w) for w in traced_weights(t.model.encoders[mod])] for mod in m.modalities}
        for b in data:
            _, _, after = captured_step(t, b)
            for mod in m.modalities:
                names = [n for n, mo in t.model.encoders[mod].named_modules() if isinstance(mo, torch.nn.Linear)]
                for s, n in zip(sums[mod], names, strict=True):
                    s += after[f"encoders.{mod}.{n}.weight"] ** 2
        m.on_train_epoch_end(epoch)
        for mod in m.modalities:
            expected = sum(float(s.mean()) for s in sums[mod])
            assert len(m.traces[mod]) == epoch + 1
            assert m.traces[mod][-1] == pytest.approx(expected, rel=1e-5)


def test_closed_window_switches_the_regulation_off(tmp_path):
    """With m1's history flat for 11 epochs (k = 0) and m2's short (k = 1/3), the own-window rule
    regulates m2 but never m1; with the releases' anchor trace m1's closed window closes m2's
    too. Wrong variants caught: the window read from the wrong modality's trace; the gate
    ignored; the gate taken from the previous epoch's k."""
    t = trainer_for(tmp_path)
    t.method.traces = {"m1": [2.0] * 11, "m2": [2.0] * 3}
    t.method.on_train_epoch_start(11)
    assert t.method._gate == {"m1": False, "m2": True}
    assert "m1" not in t.method._anchors
    t2 = trainer_for(tmp_path / "b", trace_source="anchor")
    t2.method.traces = {"m1": [2.0] * 11}
    t2.method.on_train_epoch_start(11)
    assert t2.method._gate == {"m1": False, "m2": False}
    batch = batches(t2, 1)[0]
    betas, before, after = captured_step(t2, batch)
    assert betas.abs().sum() == 0
    assert all(torch.equal(before[n], after[n]) for n in before)


def betas_after_steps(tmp_path, steps=5, traces=None, epoch=0, **overrides):
    """Betas of the last of ``steps`` steps, and the encoder gradients it ended with."""
    t = trainer_for(tmp_path, **overrides)
    if traces is not None:
        t.method.traces = traces
    t.method.on_train_epoch_start(epoch)
    data = batches(t, steps)
    for b in data[:-1]:
        plain_step(t, b)
    betas, _, after = captured_step(t, data[-1])
    return t, betas, after


def test_every_option_reaches_the_step(tmp_path):
    """Each option, set away from its default, changes the betas or the gradients of a step.

    Wrong variants caught: any option read but not used (score_reduction ignored, W hard-coded
    to 10, threshold hard-coded, beta_other never applied, trace_source ignored); the November
    coefficients swapped (audio 0.1, the other 0.95); the weaker modality regulated."""
    def run_(name, **o):
        return betas_after_steps(tmp_path / name, **{**STRONG_FIRST, **o})[1:]

    base_betas, base_grads = run_("base")
    assert base_betas[0] > 0 and base_betas[1] == 0  # m1 dominates and its window is open
    assert not torch.equal(run_("scale", beta_scale=0.5)[0], base_betas)
    assert not torch.equal(run_("mean", score_reduction="mean")[0], base_betas)
    flat5 = {"m1": [2.0] * 5, "m2": [2.0] * 5}  # k = 0.2 with W = 10, 0 with W = 3
    b10 = run_("w10", traces=flat5, epoch=5)[0]
    assert b10[0] > 0 and run_("w3", traces=flat5, epoch=5, window_epochs=3)[0].abs().sum() == 0
    assert run_("thr", traces=flat5, epoch=5, threshold=0.25)[0].abs().sum() == 0
    # m2 dominant: november's other coefficient, march's dead branch, the trace source
    nov = run_("nov", rule="november", **WEAK_FIRST)[0]
    assert nov[1] > 0 and nov[1] < 0.1 * math.e + 1e-6
    assert not torch.equal(run_("nov2", rule="november", beta_other=0.3, **WEAK_FIRST)[0], nov)
    assert run_("march", rule="march", **WEAK_FIRST)[0].abs().sum() == 0
    m1_closed = {"m1": [2.0] * 11, "m2": [2.0] * 3}
    own = run_("own", traces=m1_closed, epoch=11, **WEAK_FIRST)[0]
    assert own[1] > 0
    assert run_("anchor", traces=m1_closed, epoch=11, trace_source="anchor", **WEAK_FIRST)[0].abs().sum() == 0


def test_march_rule_trains_unimodal_heads_and_regulates_audio_only(tmp_path):
    """The March code: unimodal CEs and scores from separate heads, only the first (audio)
    modality regulated, threshold 0.04. Wrong variants caught: March scores from the fused
    parts; its dead elif 'fixed' (the other modality regulated)."""
    t, betas, after = betas_after_steps(tmp_path, rule="march", **STRONG_FIRST)
    m = t.method
    assert m.threshold == 0.04 and m.regulated() == ["m1"] and m.per_modality_source() == "unimodal_heads"
    assert any(n.startswith("uni_heads.m1.") for n in after) and any(n.startswith("uni_heads.m2.") for n in after)
    assert betas[0] > 0 and betas[1] == 0
    batch = batches(t, 1)[0]
    with torch.no_grad():
        feats = t.model.encode(batch)
        heads = confidence_scores([t.model.uni_heads[k](feats[k]) for k in m.modalities], batch["label"])
        parts = t.model.fusion.parts(feats)
        from_parts = confidence_scores([parts[k] for k in m.modalities], batch["label"])
    m.training_step(batch, 0)
    logged = torch.stack([t._step_logs[f"score_{k}"][-1] for k in m.modalities])
    torch.testing.assert_close(logged, heads)
    assert not torch.allclose(logged, from_parts)
    torch.testing.assert_close(m._betas, regulation_betas(heads, torch.tensor([0.95, 0.0]), m._gate_tensor))


def test_bf16_autocast_keeps_scores_and_betas_fp32(tmp_path):
    """Under bf16 autocast the scores come from fp32 parts of the detached features. Wrong
    variant caught: scores from the bf16 training logits (rounded to 3 significant digits)."""
    t = trainer_for(tmp_path, amp="bf16")
    t.method.on_train_epoch_start(0)
    batch = batches(t, 1)[0]
    with t.autocast():
        loss = t.method.training_step(batch, 0)
        feats = t.model.encode(batch)
    assert t.method._betas.dtype == torch.float32 and feats["m1"].dtype == torch.bfloat16
    parts = t.model.fusion.parts({m: f.detach().float() for m, f in feats.items()})
    expected = confidence_scores([parts["m1"], parts["m2"]], batch["label"])
    logged = torch.stack([t._step_logs["score_m1"][-1], t._step_logs["score_m2"][-1]])
    torch.testing.assert_close(logged, expected)  # fp32 parts, not the bf16 training logits
    loss.backward()
    t.method.on_after_backward()
    assert all(torch.isfinite(p.grad).all() for p in t.model.parameters() if p.grad is not None)


# ---- runs --------------------------------------------------------------------------------------
def test_synthetic_run_records_diagnostics_and_info(fast):
    rec = run("inforeg", "synthetic", {**fast, **SYN}).record
    assert rec["header"]["method_label"] == "InfoReg"
    info = rec["header"]["method_info"]
    assert info["per_modality"] == "fused_parts" and info["window_trace"] == {"m1": "m1", "m2": "m2"}
    d0, d1 = rec["epochs"][0]["diagnostics"], rec["epochs"][1]["diagnostics"]
    assert d0["window_k_m1"] == 1.0 and d1["window_k_m1"] == 1.0  # k = x0 / x0 at epoch 1
    assert {"beta", "beta_m1", "beta_m2", "fisher_trace_m1", "fisher_trace_m2"} <= set(d1)
    assert 0.95 <= d1["beta"] <= 0.95 * math.e + 1e-6


def test_avdigits_keys_the_release_coefficients_by_modality_name(fast, shared_data):
    res = run("inforeg", "avdigits", {**fast, "epochs": 2, "limit_train_batches": 4, "limit_eval_batches": 2,
                                      "rule": "november"})
    info = res.record["header"]["method_info"]
    assert info["anchor_modality"].startswith("audio") and info["coefficients"] == {"audio": 0.95, "image": 0.1}
    assert info["window_trace"] == {"audio": "audio", "image": "audio"}
    assert "fisher_trace_audio" in res.record["epochs"][1]["diagnostics"]


def test_mfeat_trains_well_above_chance(fast, shared_data):
    r = run("inforeg", "mfeat", {**fast, "modalities": ["zer", "mor"], "epochs": 6})
    assert r.final["best_val"]["test"]["fused"]["acc"] > 60.0  # 10 classes: chance 10 %


def test_resume_is_identical(tmp_path, monkeypatch):
    """Killed in epoch 2, the resumed run needs the two traces of epochs 0 and 1 (k at epoch 2 is
    x1 / (x0 + x1), not the k = 1 of an empty history). Wrong variant caught: the trace history
    left out of state_dict (or not loaded)."""
    assert_resume_identical("inforeg", "synthetic", {**SYN, "epochs": 3, "progress": "off", "device": "cpu"},
                            tmp_path, monkeypatch, kill_epoch=2)


@pytest.mark.gpu
def test_runs_on_cuda_with_bf16(tmp_path):
    r = run("inforeg", "synthetic", {**SYN, "records": str(tmp_path), "progress": "off", "device": "cuda"})
    assert r.record["header"]["amp"] == "bfloat16"
    assert r.final["last"]["test"]["fused"]["acc"] > 20.0


# ---- labels, refusals -------------------------------------------------------------------------
def label(**o):
    cfg, _, cls = resolve_config("inforeg", "synthetic", o)
    return cls(cfg).label()


def test_labels_name_every_variant():
    assert label() == "InfoReg"
    assert label(rule="march") == "InfoReg (Mar 2025 code)"
    assert label(rule="november", beta_other=0.2) == "InfoReg (Nov 2025 code, c_other=0.2)"
    assert label(score_reduction="mean", threshold=0.1, window_epochs=5) == "InfoReg (threshold=0.1, W=5, mean scores)"
    assert label(rule="march", threshold=0.04) == "InfoReg (Mar 2025 code)"  # the rule's own value
    assert label(trace_source="anchor") == "InfoReg (anchor trace)"


def test_three_modalities_intended_runs_released_rules_refused(fast):
    rec = run("inforeg", "synthetic", {**fast, **SYN, "epochs": 1, "n_modalities": 3}).record
    assert {"beta_m1", "beta_m2", "beta_m3"} <= set(rec["epochs"][0]["diagnostics"])
    with pytest.raises(UnsupportedError, match=r"Method 'inforeg' with rule=november.*3 modalities"):
        make_trainer("inforeg", "synthetic", {**fast, **SYN, "n_modalities": 3, "rule": "november"}).check()


def test_bad_options_refused(fast):
    with pytest.raises(ConfigError):
        make_trainer("inforeg", "synthetic", {**fast, "rule": "paper"})
    with pytest.raises(ConfigError):
        make_trainer("inforeg", "synthetic", {**fast, "window_epochs": 0})
    with pytest.raises(ConfigError):
        make_trainer("inforeg", "synthetic", {**fast, "beta_scale": -1.0})
