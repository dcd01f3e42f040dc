"""ReconBoost plugin: the boosting/reconcilement maths, beta, the stage schedule, runs, resume."""

from __future__ import annotations

import math

import pytest
import torch
from method_checks import assert_resume_identical, epoch_metrics
from mmbalance.methods.reconboost import (
    boosting_loss,
    data_passes_through,
    ensemble_logits,
    ensemble_order,
    epoch_role,
    memory_consolidation,
    reconcilement_weights,
    rectification_loss,
    stage_lr,
    true_class_prob,
)

from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.method import Phase
from mmbalance.runner import make_trainer, run
from mmbalance.trainer import Trainer, to_device

SMALL = {"n_train": 200, "n_test": 60, "dim": 8, "embed_dim": 16, "batch_size": 40}
PASS = {"recon_epoch": "pass"}


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest


def trainer_for(fast, **overrides) -> Trainer:
    t = make_trainer("reconboost", "synthetic", {**fast, **SMALL, **overrides})
    t.setup()
    t.method.on_fit_start()
    return t


def first_batch(t: Trainer):
    return to_device(next(iter(t.loader(t.splits.train, train=False))), t.device)


def ids(params) -> set[int]:
    return {id(p) for p in params}


# --------------------------------------------------------------------------- pure maths
def test_reconcilement_weights_by_hand():
    q = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(reconcilement_weights(q, 5.0, 1.0), torch.tensor([5.0, 4.5, 4.0]))
    assert torch.allclose(reconcilement_weights(q, 1.0, 0.25), torch.tensor([1.0, 0.875, 0.75]))


def test_true_class_probability_of_the_other_learners_by_hand():
    other = torch.tensor([[math.log(3.0), 0.0]])
    assert true_class_prob(other, torch.tensor([0]), 1.0).item() == pytest.approx(0.75)
    assert true_class_prob(other, torch.tensor([1]), 1.0).item() == pytest.approx(0.25)
    # beta scales the other learners' logits before the softmax: sqrt(3) / (sqrt(3) + 1)
    assert true_class_prob(other, torch.tensor([0]), torch.tensor(0.5)).item() == pytest.approx(0.6339745962155613)
    # cold start: no other learner -> the official one-column prediction, q = 1
    assert torch.equal(true_class_prob(None, torch.tensor([0, 1, 2]), 1.0), torch.ones(3))


def test_boosting_loss_by_hand():
    """l_i = -(w1 - w2 q_i) log p_{i,y_i} / C, batch mean: C = 2, w1 = 5, w2 = 1,
    sample 0: p_y = 0.75, q = 0.5 -> 4.5 * 0.28768 / 2; sample 1: p_y = 0.5, q = 1 -> 4 * 0.69315 / 2."""
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    y, q = torch.tensor([0, 1]), torch.tensor([0.5, 1.0])
    loss, nll = boosting_loss(logits, y, q, 5.0, 1.0)
    assert loss.item() == pytest.approx(1.0167895120681987, rel=1e-6)  # opposite w2 sign: 1.4353; no 1/C: 2.0336
    assert torch.allclose(nll, torch.tensor([-math.log(0.75), math.log(2.0)]))
    # cold start (q = 1): (w1 - w2) / C * CE
    cold, _ = boosting_loss(logits, y, torch.ones(2), 5.0, 1.0)
    ce = torch.nn.functional.cross_entropy(logits, y)
    assert cold.item() == pytest.approx((4.0 / 2) * ce.item(), rel=1e-6)
    # q carries no gradient into the learner's loss
    q_req = q.clone().requires_grad_(True)
    logits_req = logits.clone().requires_grad_(True)
    loss2, _ = boosting_loss(logits_req, y, q_req, 5.0, 1.0)
    loss2.backward()
    assert q_req.grad is None and logits_req.grad is not None


def test_boosting_loss_is_the_kl_form_up_to_a_constant():
    """(1/C) [w1 CE - w2 KL(y*q || p)] = loss - (w2/C) q_y log q_y (the constant needs no gradient)."""
    torch.manual_seed(0)
    logits = torch.randn(5, 4, requires_grad=True)
    y = torch.tensor([0, 3, 1, 1, 2])
    q = torch.rand(5) * 0.9 + 0.05
    w1, w2, c = 5.0, 1.0, 4
    loss, _ = boosting_loss(logits, y, q, w1, w2)
    logp_y = torch.log_softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
    kl = q * torch.log(q) - q * logp_y
    kl_form = ((w1 * -logp_y - w2 * kl) / c).mean()
    assert loss.item() == pytest.approx((kl_form + (w2 / c) * (q * torch.log(q)).mean()).item(), rel=1e-6)
    g1 = torch.autograd.grad(loss, logits, retain_graph=True)[0]
    g2 = torch.autograd.grad(kl_form, logits)[0]
    torch.testing.assert_close(g1, g2)


def test_beta_gradient_of_the_rectification_loss_by_hand():
    """d CE(beta s, y) / d beta = mean_i sum_c (softmax(beta s)_ic - y_ic) s_ic;
    s = [[1, 0], [0, 2]], y = [0, 0]: at beta = 1 (-1/(e+1) + 2 e^2/(1+e^2)) / 2 = 0.74633."""
    y = torch.tensor([0, 0])
    for beta0, expected in ((1.0, 0.746326367292885), (2.0, 0.9224123290268497)):
        beta = torch.tensor(beta0, requires_grad=True)
        rectification_loss(beta, [torch.tensor([[1.0, 0.0], [0.0, 2.0]])], y).backward()
        assert beta.grad.item() == pytest.approx(expected, rel=1e-6)
        # two learners whose logits add up to the same s: the same ensemble, the same gradient
        beta2 = torch.tensor(beta0, requires_grad=True)
        rectification_loss(beta2, [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])], y).backward()
        assert beta2.grad.item() == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(ensemble_logits(torch.tensor(3.0), [torch.ones(1, 2), 2 * torch.ones(1, 2)]), torch.full((1, 2), 9.0))


def test_memory_consolidation_by_hand_and_its_gradient_path():
    cur = torch.zeros(1, 2, requires_grad=True)  # p = [0.5, 0.5]
    prev = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)  # [0.75, 0.25]
    released = memory_consolidation(cur, prev, grad=False)
    assert released.item() == pytest.approx(0.0625)
    assert released.grad_fn is None  # as released: both sides detached, a no-op term
    ours = memory_consolidation(cur, prev, grad=True)
    ours.backward()
    assert cur.grad is not None and cur.grad.abs().sum() > 0 and prev.grad is None


def test_ensemble_order_cycle_and_schedules_by_hand():
    av = ["audio", "visual"]
    assert [ensemble_order(av, t) for t in (-1, 0, 1, 2, 3)] == [
        [], ["audio"], ["audio", "visual"], ["visual", "audio"], ["audio", "visual"]]
    avt = ["audio", "visual", "text"]
    assert ensemble_order(avt, 1) == ["audio", "visual"]
    assert ensemble_order(avt, 3) == ["visual", "text", "audio"]
    assert stage_lr(0.01, 29, 100, "step", 30, 0.1) == pytest.approx(0.01)
    assert stage_lr(0.01, 30, 100, "step", 30, 0.1) == pytest.approx(0.001)
    assert stage_lr(0.01, 61, 100, "step", 30, 0.1) == pytest.approx(1e-4)
    assert [stage_lr(1.0, t, 4, "cosine", 1, 1.0) for t in (0, 2, 4)] == pytest.approx([1.0, 0.5, 0.0])
    assert stage_lr(0.3, 7, 10, "none", 1, 0.1) == 0.3
    assert epoch_role(3, "stage", 1, 1) == (3, [("A", 1), ("B", 1)])
    assert epoch_role(3, "stage", 4, 0) == (3, [("A", 4)])
    assert [epoch_role(e, "pass", 2, 1) for e in range(6)] == [
        (0, [("A", 1)]), (0, [("A", 1)]), (0, [("B", 1)]), (1, [("A", 1)]), (1, [("A", 1)]), (1, [("B", 1)])]
    assert data_passes_through(9, "stage", 1, 1) == 20 and data_passes_through(9, "pass", 4, 4) == 10


# --------------------------------------------------------------------------- the plugin's steps
def test_phase_a_trains_only_the_stage_learner_and_beta_gets_no_gradient(fast):
    t = trainer_for(fast)
    method, model = t.method, t.model
    batch = first_batch(t)
    model.train()
    loss = method._boost_step(batch, 0, stage=1)  # stage 1: m2 against the ensemble {m1}
    loss.backward()
    assert method.beta.grad is None
    assert all(p.grad is None for p in model.encoder_params("m1"))
    assert all(p.grad is not None for p in model.encoder_params("m2") + list(method.head.parameters()))
    # the loss is boosting_loss with q from the other learner at the current beta
    with torch.no_grad():
        other = method.head(model.encoders["m1"](batch["m1"]))
        q = true_class_prob(other, batch["label"], method.beta)
        expected, _ = boosting_loss(method.head(model.encoders["m2"](batch["m2"])), batch["label"], q, 5.0, 1.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_phase_b_gives_beta_the_hand_formula_gradient(fast):
    t = trainer_for(fast, recon_beta_init=1.5)
    method, model = t.method, t.model
    batch = first_batch(t)
    y = batch["label"]
    model.train()
    method._rectify_step(batch, 0, stage=1).backward()
    with torch.no_grad():
        s = sum(method.head(model.encoders[m](batch[m])) for m in ("m1", "m2"))
        p = torch.softmax(1.5 * s, 1)
        onehot = torch.nn.functional.one_hot(y, s.shape[1]).float()
        expected = ((p - onehot) * s).sum(1).mean()
    assert method.beta.grad.item() == pytest.approx(expected.item(), rel=1e-4)
    # stage 0 (cold start): the ensemble holds m1 only, m2's encoder is not even run
    model.zero_grad(set_to_none=True)
    method._rectify_step(batch, 0, stage=0).backward()
    assert all(p.grad is None for p in model.encoder_params("m2"))
    assert method.beta.grad is not None


def test_predict_is_beta_times_the_sum_of_the_learners_in_the_ensemble(fast):
    t = trainer_for(fast, recon_beta_init=2.0)
    method, model = t.method, t.model
    batch = first_batch(t)
    model.eval()
    f = {m: method.head(model.encoders[m](batch[m])).detach() for m in ("m1", "m2")}
    method.epoch = 0  # after stage 0 only m1 has been trained
    pred = method.predict(batch)
    assert set(pred.per_modality) == {"m1"}
    torch.testing.assert_close(pred.fused, 2.0 * f["m1"])
    method.epoch = 1
    pred = method.predict(batch)
    assert set(pred.per_modality) == {"m1", "m2"}
    torch.testing.assert_close(pred.fused, 2.0 * (f["m1"] + f["m2"]))
    torch.testing.assert_close(pred.per_modality["m2"], f["m2"])
    assert method.per_modality_source() == "method" and not method.trains_unimodal_heads()


def test_nan_guard_zeroes_the_gradients_of_a_non_finite_step_and_counts_it(fast):
    t = trainer_for(fast)
    method = t.method
    p = torch.nn.Parameter(torch.ones(3))
    method.phase = Phase(params=[p])
    p.grad = torch.full((3,), 2.0)
    method._last_loss = torch.tensor(1.0)
    method.on_after_backward()
    assert torch.equal(p.grad, torch.full((3,), 2.0)) and int(method._nonfinite) == 0
    method._last_loss = torch.tensor(float("nan"))
    method.on_after_backward()
    assert torch.equal(p.grad, torch.zeros(3)) and int(method._nonfinite) == 1
    assert method.state_dict()["nonfinite"] == 1


# --------------------------------------------------------------------------- the phase schedule
def test_phase_plan_trains_the_right_parameters_with_fresh_optimizers_per_stage(fast):
    t = trainer_for(fast, epochs=4, **PASS)  # budget preset: a stage = 2 epochs (A, then B)
    method, model = t.method, t.model
    enc = {m: ids(model.encoder_params(m)) for m in ("m1", "m2")}
    head, beta = ids(method.head.parameters()), {id(method.beta)}
    plans = [method.epoch_plan(e) for e in range(4)]
    assert [[(ph.name, ph.optimizer, ph.passes) for ph in plan] for plan in plans] == [
        [("boost-m1", "recon_A0", 1)], [("rectify", "recon_B0", 1)],
        [("boost-m2", "recon_A1", 1)], [("rectify", "recon_B1", 1)]]
    assert ids(plans[0][0].params) == enc["m1"] | head
    assert ids(plans[1][0].params) == enc["m1"] | head | beta  # cold start: m2 is not in the ensemble yet
    assert ids(plans[2][0].params) == enc["m2"] | head
    assert ids(plans[3][0].params) == enc["m1"] | enc["m2"] | head | beta
    assert [method.should_evaluate(e) for e in range(4)] == [False, True, False, True]

    created = []
    make = method._make_optimizer

    def recording(params, lr):
        opt = make(params, lr)
        created.append((opt, len(opt.state)))
        return opt

    method._make_optimizer = recording
    prefixes = {0: ("encoders.m1.", "extra.recon_head."), 1: ("encoders.m1.", "extra.recon_head.", "extra.recon_beta."),
                2: ("encoders.m2.", "extra.recon_head."), 3: ("encoders.", "extra.recon_head.", "extra.recon_beta.")}
    for e in range(4):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = t.train_epoch(e)
        changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
        assert changed and all(k.startswith(prefixes[e]) for k in changed), (e, changed)
        assert out["phases"][0]["optimizer_steps"] == out["phases"][0]["batches"] > 0
    assert any(k.startswith("encoders.m2.") for k in changed)  # phase B of stage 1 trains both
    # one new optimizer per phase and stage, each created with empty state, the old ones retired
    assert len(created) == 4 and all(n == 0 for _, n in created)
    assert len({id(o) for o, _ in created}) == 4
    assert {k for k in t.optimizers if k.startswith("recon_")} == {"recon_B1"}


def test_stage_epoch_runs_both_phases_and_a_stage_change_brings_fresh_state(fast):
    t = trainer_for(fast, epochs=2)
    out = t.train_epoch(0)
    assert [p["phase"] for p in out["phases"]] == ["boost-m1", "rectify"] and out["data_passes"] == 2
    a0 = t.optimizers["recon_A0"]
    head0 = next(iter(t.method.head.parameters()))
    assert "momentum_buffer" in a0.state[head0]
    t.train_epoch(1)
    assert "recon_A0" not in t.optimizers and "recon_B0" not in t.optimizers
    a1 = t.optimizers["recon_A1"]
    assert a1 is not a0 and a1.param_groups[0]["momentum"] == 0.9 and a1.param_groups[0]["weight_decay"] == 5e-4
    assert ids(p for p in a1.state) == ids(t.model.encoder_params("m2")) | ids(t.method.head.parameters())


def test_stage_learning_rate_follows_the_schedule_on_the_stage_index(fast):
    t = trainer_for(fast, epochs=8, scheduler="step", step_size=1, gamma=0.5, lr=0.04, recon_lr_b=0.1, **PASS)
    plan = t.method.epoch_plan(3)  # stage 1, phase B
    opt = t._phase_optimizer(plan[0])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5)
    opt_a = t._phase_optimizer(t.method.epoch_plan(4)[0])  # stage 2, phase A
    assert opt_a.param_groups[0]["lr"] == pytest.approx(0.04 * 0.25)


# --------------------------------------------------------------------------- runs
def test_two_epochs_on_synthetic_record_phases_budgets_and_diagnostics(fast):
    rec = run("reconboost", "synthetic", {**fast, "epochs": 2, "n_train": 300, "n_test": 100}).record
    assert rec["header"]["method_label"] == "ReconBoost"
    assert rec["header"]["method_info"]["per_modality"] == "method"
    info = rec["header"]["method_info"]["reconboost"]
    assert info["cycle"] == ["m1", "m2"] and info["data_passes_total"] == 4
    e0, e1 = rec["epochs"]
    assert [p["phase"] for p in e0["phases"]] == ["boost-m1", "rectify"]
    assert [p["phase"] for p in e1["phases"]] == ["boost-m2", "rectify"]
    assert e0["data_passes"] == e1["data_passes"] == 2
    d0, d1 = e0["diagnostics"], e1["diagnostics"]
    assert d0["recon_q_true"] == 1.0 and d0["recon_weight"] == 4.0  # cold start: q = 1
    assert 0.0 < d1["recon_q_true"] < 1.0
    assert d1["budget_data_passes"] == 4.0 and d1["budget_optimizer_steps"] == e0["optimizer_steps"] + e1["optimizer_steps"]
    assert d1["recon_nonfinite_total"] == 0.0 and math.isfinite(d1["recon_beta"])
    assert set(e0["val"]) >= {"fused", "m1"} and "m2" not in e0["val"]  # m2 joins at stage 1
    assert {"m1", "m2"} <= set(e1["val"])


def test_two_epochs_on_avdigits(fast, shared_data):
    rec = run("reconboost", "avdigits", {**fast, "epochs": 2, "limit_train_batches": 3, "limit_eval_batches": 2,
                                         "recon_mc": "replicate_forward"}).record
    e0, e1 = rec["epochs"]
    assert [p["phase"] for p in e1["phases"]] == ["boost-image", "rectify"]
    assert all(p["batches"] == 3 for e in (e0, e1) for p in e["phases"])
    assert "recon_mc_loss" in e1["diagnostics"] and "recon_mc_loss" not in e0["diagnostics"]  # from stage 1 on
    assert {"audio", "image"} <= set(e1["test"])
    assert rec["header"]["method_label"] == "ReconBoost (mc=replicate_forward)"


def test_three_modalities_cycle_in_the_declared_order(fast):
    rec = run("reconboost", "synthetic", {**fast, **SMALL, "n_modalities": 3, "epochs": 3}).record
    assert [e["phases"][0]["phase"] for e in rec["epochs"]] == ["boost-m1", "boost-m2", "boost-m3"]
    assert {"m1", "m2", "m3"} <= set(rec["epochs"][-1]["test"])
    assert "m3" not in rec["epochs"][1]["test"]


def test_pass_epochs_evaluate_only_at_stage_ends(fast):
    rec = run("reconboost", "synthetic", {**fast, **SMALL, **PASS, "epochs": 4}).record
    assert [e["val"] is None for e in rec["epochs"]] == [True, False, True, False]
    assert {r["epoch"] for r in rec["final"]["selection"].values()} <= {1, 3}


def test_resume_mid_stage_is_identical(fast, tmp_path, monkeypatch):
    """Stage = 3 epochs (A, A, B); killed in epoch 1, inside phase A of stage 0, whose optimizer
    (momentum from epoch 0) and the method's counters must come back from the checkpoint."""
    overrides = {**fast, **SMALL, **PASS, "recon_epochs_a": 2, "epochs": 3}
    assert_resume_identical("reconboost", "synthetic", overrides, tmp_path, monkeypatch, kill_epoch=1)


def test_resume_without_the_stage_optimizer_would_differ(fast, tmp_path, monkeypatch):
    """The control for the test above: dropping the saved stage optimizer changes the record."""
    overrides = {**fast, **SMALL, **PASS, "recon_epochs_a": 2, "epochs": 3}
    full = run("reconboost", "synthetic", {**overrides, "records": str(tmp_path / "full")})
    original_restore, original_limited = Trainer._restore, Trainer._limited

    def forgetful(self, state):
        out = original_restore(self, state)
        self._pending_optimizer_states = {}
        return out

    def dying(self, loader, limit):
        for i, batch in original_limited(self, loader, limit):
            if self.method.epoch == 1 and i == 2:
                raise KeyboardInterrupt
            yield i, batch

    killed = {**overrides, "records": str(tmp_path / "killed")}
    monkeypatch.setattr(Trainer, "_limited", dying)
    with pytest.raises(KeyboardInterrupt):
        run("reconboost", "synthetic", killed)
    monkeypatch.setattr(Trainer, "_limited", original_limited)
    monkeypatch.setattr(Trainer, "_restore", forgetful)
    resumed = run("reconboost", "synthetic", killed)
    assert epoch_metrics(resumed.record) != epoch_metrics(full.record)


# --------------------------------------------------------------------------- refusals and options
def test_refusals(fast):
    with pytest.raises(UnsupportedError, match="at least 2"):
        make_trainer("reconboost", "synthetic", {**fast, **SMALL, "modalities": ["m1"]}).check()
    with pytest.raises(ConfigError, match="same width"):
        make_trainer("reconboost", "synthetic", {**fast, **SMALL, "embed_dim": None, "backbone.m2.hidden": 8}).setup()
    with pytest.raises(ConfigError, match="not a multiple"):
        make_trainer("reconboost", "synthetic", {**fast, **SMALL, **PASS, "epochs": 3})
    with pytest.raises(UnsupportedError, match="warm"):
        make_trainer("reconboost", "synthetic", {**fast, **SMALL, "recon_warm_start": "unimodal"})
    with pytest.raises(ConfigError, match="recon_epochs_a"):
        make_trainer("reconboost", "synthetic", {**fast, **SMALL, "recon_epochs_a": 0})
    with pytest.raises(ConfigError, match="recon_mc"):
        make_trainer("reconboost", "synthetic", {**fast, **SMALL, "recon_mc": "maybe"})


def test_presets_labels_and_dataset_values(fast):
    official = trainer_for(fast, recon_preset="official").method
    assert (official.passes_a, official.passes_b) == (4, 4) and official.label() == "ReconBoost (official 4+4)"
    plan = official.epoch_plan(0)
    assert [(p.name, p.passes) for p in plan] == [("boost-m1", 4), ("rectify", 4)]
    custom = trainer_for(fast, recon_epochs_b=0, recon_w2=0.5).method
    assert [p.name for p in custom.epoch_plan(0)] == ["boost-m1"] and custom.label() == "ReconBoost (E=1+0, w=5/0.5)"
    from mmbalance.runner import resolve_config

    cfg, _, _ = resolve_config("reconboost", "cremad")
    assert (cfg["recon_w1"], cfg["recon_w2"], cfg["recon_head"]) == (5.0, 1.0, "mlp")
    cfg, _, _ = resolve_config("reconboost", "iemocap")
    assert (cfg["recon_w1"], cfg["recon_w2"], cfg["recon_head"]) == (1.0, 0.25, "linear")


# --------------------------------------------------------------------------- wrong variants (issue 21)
def sharpen(method):
    """Scale the shared head so the learners' logits are far from uniform (at initialisation
    q is about 1/C whatever the ensemble, which would hide what q is made of)."""
    with torch.no_grad():
        for p in method.head.parameters():
            p.mul_(20.0)


def boost_loss_by_hand(method, model, batch, learner, others, beta, train_mode=True):
    """Phase A loss written out: q from ``beta * sum`` of the OTHER learners' logits."""
    y = batch["label"]
    with torch.no_grad():
        was = model.training
        model.train(train_mode)
        other = sum(method.head(model.encoders[k](batch[k])) for k in others)
        model.train(was)
        q = torch.softmax(beta * other, dim=1).gather(1, y[:, None]).squeeze(1)
        loss, _ = boosting_loss(method.head(model.encoders[learner](batch[learner])), y, q, 5.0, 1.0)
    return loss.item()


def test_q_takes_beta_times_the_other_learners(fast):
    """Wrong variant caught: beta dropped from q (q = softmax(sum_{k != m} f_k) instead of
    softmax(beta * sum_{k != m} f_k)); invisible at the default beta = 1."""
    t = trainer_for(fast, recon_beta_init=2.5)
    method, model = t.method, t.model
    sharpen(method)
    batch = first_batch(t)
    model.train()
    loss = method._boost_step(batch, 0, stage=1).item()
    assert loss == pytest.approx(boost_loss_by_hand(method, model, batch, "m2", ["m1"], 2.5), rel=1e-6)
    assert loss != pytest.approx(boost_loss_by_hand(method, model, batch, "m2", ["m1"], 1.0), rel=1e-4)


def test_q_leaves_out_the_current_learner_from_stage_two_on(fast):
    """Wrong variant caught: the current learner's own logits in q at stage >= 2, when it is
    already in the ensemble (stage 2 trains m1 again against the ensemble {m1, m2}: q must come
    from m2 alone)."""
    t = trainer_for(fast, epochs=3)
    method, model = t.method, t.model
    sharpen(method)
    batch = first_batch(t)
    model.train()
    assert method.members_after(1) == ["m1", "m2"]
    loss = method._boost_step(batch, 0, stage=2).item()
    assert loss == pytest.approx(boost_loss_by_hand(method, model, batch, "m1", ["m2"], 1.0), rel=1e-6)
    assert loss != pytest.approx(boost_loss_by_hand(method, model, batch, "m1", ["m1", "m2"], 1.0), rel=1e-4)


def test_other_learners_run_in_train_mode(fast):
    """Wrong variant caught: the frozen other learners of phase A run in eval mode (the official
    code leaves them in train mode: dropout on, BatchNorm batch statistics). With dropout on m1's
    encoder, q must be the train-mode one under the same random draws."""
    t = trainer_for(fast, **{"backbone.m1.dropout": 0.5})
    method, model = t.method, t.model
    sharpen(method)
    batch = first_batch(t)
    model.train()
    torch.manual_seed(7)
    loss = method._boost_step(batch, 0, stage=1).item()
    assert model.training
    torch.manual_seed(7)
    assert loss == pytest.approx(boost_loss_by_hand(method, model, batch, "m2", ["m1"], 1.0), rel=1e-6)
    evaluated = boost_loss_by_hand(method, model, batch, "m2", ["m1"], 1.0, train_mode=False)
    assert loss != pytest.approx(evaluated, rel=1e-4)
    # the option that asks for eval mode gets it
    t2 = trainer_for(fast, recon_frozen_eval_mode=True, **{"backbone.m1.dropout": 0.5})
    t2.model.load_state_dict(model.state_dict())
    t2.model.train()
    assert t2.method._boost_step(batch, 0, stage=1).item() == pytest.approx(evaluated, rel=1e-6)
