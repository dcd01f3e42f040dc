"""MSLR method plugin: the auto rule by hand, clipping, per-group learning rates under the
schedule, gradient multipliers, state, refusals and short runs."""

from __future__ import annotations

import copy

import pytest
import torch
from method_checks import assert_resume_identical
from mmbalance.methods.mslr import (
    accuracy_ratio,
    applied_scale,
    auto_update,
    clip_ratio,
    in_window,
)

from mmbalance.errors import ConfigError
from mmbalance.runner import make_trainer, resolve_config, run
from mmbalance.trainer import to_device

SMALL = {"epochs": 2, "n_train": 300, "n_test": 100}
LR = 0.05  # the synthetic recipe's base rate


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest


def run_previous(accs, window, lo=0.5, hi=2.0, variant="previous"):
    hist, adapt, out = [], 1.0, []
    for epoch, acc in enumerate(accs):
        hist, adapt, ratio = auto_update(hist, acc, adapt, epoch=epoch, window=window, variant=variant, lo=lo, hi=hi)
        out.append((list(hist), adapt, ratio))
    return out


# ---- pure mathematics ------------------------------------------------------------------------
def test_auto_rule_on_a_hand_written_sequence():
    """H = 3; the ratio is taken against the previous three accuracies, before appending."""
    steps = run_previous([10.0, 20.0, 30.0, 40.0, 15.0, 34.0, 100.0, 5.0], window=3)
    # epochs 0-2 only fill the history: no ratio, factor 1
    assert [s[2] for s in steps[:3]] == [None, None, None]
    assert [s[1] for s in steps[:3]] == [1.0, 1.0, 1.0]
    assert steps[2][0] == [10.0, 20.0, 30.0]
    # epoch 3: 40 / mean(10, 20, 30) = 2.0 (appending first would give 40 / 30 = 1.333)
    assert steps[3][2] == pytest.approx(2.0) and steps[3][1] == pytest.approx(2.0)
    assert steps[3][0] == [20.0, 30.0, 40.0]
    # epoch 4: 15 / 30 = 0.5, replacing 2.0 (compounding would give 1.0)
    assert steps[4][2] == pytest.approx(0.5) and steps[4][1] == pytest.approx(0.5)
    # epoch 5: 34 / mean(30, 40, 15) = 34 / (85/3) = 1.2
    assert steps[5][2] == pytest.approx(1.2) and steps[5][1] == pytest.approx(1.2)
    # epoch 6: 100 / mean(40, 15, 34) = 300/89 = 3.37 -> clipped to 2
    assert steps[6][2] == pytest.approx(300 / 89) and steps[6][1] == 2.0
    # epoch 7: 5 / mean(15, 34, 100) = 15/149 = 0.1 -> clipped to 0.5
    assert steps[7][2] == pytest.approx(15 / 149) and steps[7][1] == 0.5
    assert steps[7][0] == [34.0, 100.0, 5.0]


def test_auto_rule_without_clipping_and_amst_variant():
    unclipped = run_previous([10.0, 20.0, 30.0, 40.0, 100.0 / 3.0], window=3, lo=None, hi=None)
    assert unclipped[3][1] == pytest.approx(2.0)
    assert unclipped[4][1] == pytest.approx((100 / 3) / 30)  # not clipped: 1.111
    # AMST: append first, compound every H epochs (epoch > 0); H = 2
    amst = run_previous([10.0, 20.0, 30.0, 60.0, 45.0], window=2, variant="amst")
    assert [s[2] is None for s in amst] == [True, True, False, True, False]
    assert amst[2][0] == [20.0, 30.0] and amst[2][1] == pytest.approx(1.2)  # 30 / 25
    assert amst[3][1] == pytest.approx(1.2)
    assert amst[4][1] == pytest.approx(1.2 * 45 / 52.5)  # compounds: 1.0285714
    with pytest.raises(ValueError):
        auto_update([], 1.0, 1.0, epoch=0, window=1, variant="bogus")


def test_clipping_ratio_and_window():
    assert clip_ratio(3.0, 0.5, 2.0) == 2.0
    assert clip_ratio(0.1, 0.5, 2.0) == 0.5
    assert clip_ratio(1.3, 0.5, 2.0) == 1.3
    assert clip_ratio(7.0, None, None) == 7.0
    assert clip_ratio(0.2, 0.5, None) == 0.5
    assert accuracy_ratio(60.0, [40.0, 50.0, 60.0]) == pytest.approx(1.2)
    assert accuracy_ratio(0.0, [0.0, 0.0]) == 0.0  # mean floored, no division by zero
    with pytest.raises(ValueError):
        accuracy_ratio(1.0, [])
    assert in_window(0, 0, None) and in_window(7, 2, 7) and not in_window(8, 2, 7) and not in_window(1, 2, None)
    assert applied_scale(0.9, 2.0, True) == pytest.approx(1.8)
    assert applied_scale(0.9, 2.0, False) == 1.0


# ---- set-up ----------------------------------------------------------------------------------
def setup_trainer(tmp_path, **overrides):
    trainer = make_trainer("mslr", "synthetic", {**SMALL, "device": "cpu", "progress": "off",
                                                  "records": str(tmp_path / "runs"), **overrides})
    trainer.setup()
    return trainer


def ids(params):
    return {id(p) for p in params}


def test_param_groups_are_encoder_plus_branch_head(tmp_path):
    trainer = setup_trainer(tmp_path, lr_mult={"m1": 0.5, "m2": 3.0})
    model, opt = trainer.model, trainer.optimizer
    groups = {g["name"]: g for g in opt.param_groups}
    assert list(groups) == ["modality.m1", "modality.m2"]
    for m, mult in (("m1", 0.5), ("m2", 3.0)):
        want = ids(model.encoder_params(m)) | ids(model.fusion.fcs[m].parameters())
        assert ids(groups[f"modality.{m}"]["params"]) == want
        assert groups[f"modality.{m}"]["lr"] == pytest.approx(LR * mult)
    optimised = set().union(*(ids(g["params"]) for g in opt.param_groups))
    assert not optimised & ids(model.uni_heads.parameters())  # untrained heads left out
    assert trainer.method.per_modality_source() == "fused_parts"
    # heads at the base rate (AMST): a 'shared' group holds the branch heads
    amst = setup_trainer(tmp_path, head_in_group=False, lr_mult={"m1": 0.5})
    groups = {g["name"]: g for g in amst.optimizer.param_groups}
    assert list(groups) == ["modality.m1", "modality.m2", "shared"]
    assert ids(groups["modality.m1"]["params"]) == ids(amst.model.encoder_params("m1"))
    assert ids(groups["shared"]["params"]) == ids(amst.model.fusion_params())
    assert groups["shared"]["lr"] == LR and groups["modality.m1"]["lr"] == pytest.approx(LR / 2)
    assert amst.method.label() == "MSLR (m1 x0.5, heads at base lr)"


def test_grad_mode_scales_each_group_gradient(tmp_path):
    """apply_as=grad (AGM repo): lr untouched, group m's gradients times its factor."""
    trainer = setup_trainer(tmp_path, apply_as="grad", lr_mult={"m1": 0.25}, head_in_group=False)
    method, model = trainer.method, trainer.model
    assert all(g["lr"] == LR for g in trainer.optimizer.param_groups)
    batch = to_device(next(iter(trainer.loader(trainer.splits.train, train=False))), trainer.device)
    method.training_step(batch, 0).backward()
    plain = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}
    method.on_after_backward()
    scaled = ids(model.encoder_params("m1"))
    for p in model.parameters():
        if p.grad is not None:
            factor = 0.25 if id(p) in scaled else 1.0  # m2 and the heads are untouched
            torch.testing.assert_close(p.grad, plain[id(p)] * factor)


def test_state_round_trip_and_mismatch(tmp_path):
    trainer = setup_trainer(tmp_path)
    method = trainer.method
    method.history = {"m1": [10.0, 20.0], "m2": [30.0]}
    method.adapt = {"m1": 1.5, "m2": 0.7}
    state = copy.deepcopy(method.state_dict())
    fresh = setup_trainer(tmp_path)
    fresh.method.load_state_dict(state)
    assert fresh.method.history == method.history and fresh.method.adapt == method.adapt
    other = setup_trainer(tmp_path, n_modalities=3)
    with pytest.raises(ConfigError, match="same modalities"):
        other.method.load_state_dict(state)


# ---- refusals --------------------------------------------------------------------------------
def test_auto_rule_refuses_to_adapt_on_the_test_set(tmp_path):
    with pytest.raises(ConfigError, match="adapting on the test set is not allowed"):
        setup_trainer(tmp_path, val_fraction=0)
    assert setup_trainer(tmp_path, val_fraction=0, rule="fixed").val_is_test  # fixed needs no validation


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"lr_mult": {"m3": 2.0}}, "does not train"),
        ({"lr_mult": {"m1": 0.0}}, "positive number"),
        ({"lr_mult": {"m1": -1.0}}, "positive number"),
        ({"lr_mult": {"m1": "x"}}, "positive number"),
        ({"ratio_min": 3.0, "ratio_max": 2.0}, "ratio_min"),
        ({"modulation_start": 5, "modulation_end": 2}, "modulation_end"),
    ],
)
def test_bad_options_are_refused(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        setup_trainer(tmp_path, **overrides)


@pytest.mark.parametrize(
    ("overrides", "label"),
    [
        ({}, "MSLR"),
        ({"rule": "fixed", "lr_mult": {"m2": 2}}, "MSLR (fixed, m2 x2)"),
        ({"auto_variant": "amst", "history": 3}, "MSLR (AMST compounding, H=3)"),
        ({"ratio_min": None, "ratio_max": None}, "MSLR (clip [-inf, inf])"),
        ({"apply_as": "grad", "modulation_start": 2}, "MSLR (grad multipliers, epochs 2-)"),
    ],
)
def test_labels(overrides, label):
    assert make_trainer("mslr", "synthetic", {**SMALL, **overrides}).method.label() == label


def test_cremad_default_multipliers_from_the_agm_repo():
    cfg, _, _ = resolve_config("mslr", "cremad")
    assert cfg["lr_mult"] == {"audio": 0.9, "visual": 1.1}
    assert resolve_config("mslr", "synthetic")[0]["lr_mult"] == {}


# ---- runs ------------------------------------------------------------------------------------
def test_auto_lrs_follow_schedule_times_multiplier(fast):
    """StepLR(2, 0.5), H = 1: epoch i trains at LR * 0.5^floor(i/2) * lr_mult[m] *
    clip(acc_{i-1} / acc_{i-2}) (the update after epoch i-1 applies from epoch i)."""
    mult = {"m1": 0.5, "m2": 1.5}
    lo, hi = 0.8, 1.6
    result = run("mslr", "synthetic", {**SMALL, **fast, "epochs": 4, "history": 1, "step_size": 2, "gamma": 0.5,
                                       "lr_mult": mult, "ratio_min": lo, "ratio_max": hi})
    epochs = result.record["epochs"]
    clipped = 0
    for i, e in enumerate(epochs):
        assert set(e["lrs"]) == {"main/modality.m1", "main/modality.m2"}
        scheduled = LR * 0.5 ** (i // 2)
        for m in ("m1", "m2"):
            if i > 0:
                raw = e["val"][m]["acc"] / epochs[i - 1]["val"][m]["acc"]
                clipped += raw != min(max(raw, lo), hi)
                assert e["diagnostics"][f"acc_ratio_{m}"] == pytest.approx(raw, rel=1e-6)
            want_in_force = mult[m] * (1.0 if i < 2 else min(max(
                epochs[i - 1]["val"][m]["acc"] / epochs[i - 2]["val"][m]["acc"], lo), hi))
            assert e["lrs"][f"main/modality.{m}"] == pytest.approx(scheduled * want_in_force, rel=1e-9), (i, m)
            assert e["diagnostics"][f"lr_mult_{m}"] == pytest.approx(want_in_force, rel=1e-6)
    assert "acc_ratio_m1" not in epochs[0]["diagnostics"]
    assert clipped  # the clip acted at least once in this run
    assert result.record["header"]["method_label"] == "MSLR (H=1, clip [0.8, 1.6], m1 x0.5, m2 x1.5)"


def test_fixed_rule_with_window_on_the_test_split(fast):
    """Fixed multipliers inside the window [1, 2] only; val = test is fine without adaptation."""
    mult = {"m1": 2.0, "m2": 0.25}
    result = run("mslr", "synthetic", {**SMALL, **fast, "epochs": 4, "rule": "fixed", "val_fraction": 0,
                                       "step_size": 2, "gamma": 0.5, "lr_mult": mult,
                                       "modulation_start": 1, "modulation_end": 2})
    assert result.record["header"]["dataset_info"]["val_is_test"]
    for i, e in enumerate(result.record["epochs"]):
        active = 1 <= i <= 2  # the recorded rate is the one epoch i trained at
        for m in ("m1", "m2"):
            want = LR * 0.5 ** (i // 2) * (mult[m] if active else 1.0)
            assert e["lrs"][f"main/modality.{m}"] == pytest.approx(want, rel=1e-9), (i, m)
            assert e["diagnostics"][f"lr_mult_{m}"] == (mult[m] if 1 <= i <= 2 else 1.0)


def test_unit_multipliers_train_exactly_like_sum_fusion(fast):
    mine = run("mslr", "synthetic", {**SMALL, **fast, "rule": "fixed"}).record["epochs"]
    ref = run("sum", "synthetic", {**SMALL, **fast}).record["epochs"]
    for a, b in zip(mine, ref, strict=True):
        assert a["train_loss"] == b["train_loss"]
        assert a["val"] == b["val"] and a["test"] == b["test"]


def test_three_modalities(fast):
    result = run("mslr", "synthetic", {**SMALL, **fast, "n_modalities": 3, "history": 1})
    last = result.record["epochs"][-1]
    assert set(last["lrs"]) == {f"main/modality.m{i}" for i in (1, 2, 3)}
    assert {f"acc_ratio_m{i}" for i in (1, 2, 3)} <= set(last["diagnostics"])


def test_avdigits_two_epochs(fast, shared_data):
    result = run("mslr", "avdigits", {**fast, "epochs": 2, "limit_train_batches": 5, "limit_eval_batches": 3,
                                      "history": 1})
    last = result.record["epochs"][-1]
    assert set(last["lrs"]) == {"main/modality.audio", "main/modality.image"}
    assert {"lr_mult_audio", "lr_mult_image", "acc_ratio_audio", "acc_ratio_image"} <= set(last["diagnostics"])
    assert all(torch.isfinite(torch.tensor(v)) for v in last["diagnostics"].values())


def test_resume_is_identical(tmp_path, monkeypatch):
    """H = 1: the epoch after the kill needs the restored history to compute its ratio."""
    overrides = {**SMALL, "epochs": 3, "history": 1, "ratio_min": 0.1, "ratio_max": 10.0,
                 "device": "cpu", "progress": "off"}
    assert_resume_identical("mslr", "synthetic", overrides, tmp_path, monkeypatch)


# ---- wrong variants that earlier tests let pass (issue 21) -----------------------------------
def test_history_keeps_filling_outside_the_window(tmp_path):
    """Wrong variant caught: the accuracy history frozen outside the modulation window (only
    updated while the multipliers act). The history is kept throughout (AGM repo), so the
    first epoch of a late window already adapts from the H accuracies before it."""
    trainer = setup_trainer(tmp_path, history=2, modulation_start=2, modulation_end=3)
    method = trainer.method
    accs = [(40.0, 20.0), (50.0, 25.0), (90.0, 20.0), (45.0, 30.0), (45.0, 60.0)]
    for epoch, (a1, a2) in enumerate(accs):
        method.on_validation_end({"epoch": epoch, "val": {"m1": {"acc": a1}, "m2": {"acc": a2}}})
        if epoch == 1:  # before the window: the history filled, the rates untouched
            assert method.history == {"m1": [40.0, 50.0], "m2": [20.0, 25.0]}
            assert all(g["lr"] == LR for g in trainer.optimizer.param_groups)
        if epoch == 2:  # 90 / mean(40, 50) = 2 and 20 / 22.5, in force from epoch 3 (in the window)
            assert method.adapt["m1"] == pytest.approx(2.0)
            assert method.adapt["m2"] == pytest.approx(20.0 / 22.5)
            groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
            assert groups["modality.m1"] == pytest.approx(2.0 * LR)
    # after the window (epoch 4 trains at the base rate), the history still moves
    assert method.history == {"m1": [45.0, 45.0], "m2": [30.0, 60.0]}
    assert all(g["lr"] == LR for g in trainer.optimizer.param_groups)


def test_grad_mode_scales_the_branch_heads_with_their_encoders(tmp_path):
    """Wrong variant caught: ``apply_as=grad`` multiplying only the encoders' gradients, not the
    branch heads that share the modality's group (head_in_group=true, the default and the AGM
    repo's ``audio_net`` + ``audio_cls``)."""
    trainer = setup_trainer(tmp_path, apply_as="grad", lr_mult={"m1": 0.25, "m2": 3.0}, rule="fixed")
    method, model = trainer.method, trainer.model
    batch = to_device(next(iter(trainer.loader(trainer.splits.train, train=False))), trainer.device)
    method.training_step(batch, 0).backward()
    plain = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}
    method.on_after_backward()
    for m, factor in (("m1", 0.25), ("m2", 3.0)):
        head = list(model.fusion.fcs[m].parameters())
        assert head and all(p.grad is not None for p in head)
        for p in model.encoder_params(m) + head:
            torch.testing.assert_close(p.grad, plain[id(p)] * factor)
