"""OGR-GB (Gradient-Blending) plugin: the blend weights from hand-made loss tables and their
edge cases, the estimation on copies (model, optimizer and RNG untouched; sub-networks), the
blended loss, online/offline runs with their estimation cost, resume, three modalities and
the refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from method_checks import assert_resume_identical
from mmbalance.methods.ogr_gb import (
    FUSED,
    blend_weights,
    blended_loss,
    cap_weights,
    delta_o_noise_sq,
    generalisation_and_overfitting,
    raw_blend_weight,
)

from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.runner import make_trainer, run

SMALL = {"epochs": 2, "n_train": 300, "n_test": 100}
FLOOR = 1e-4


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest


# ---- pure mathematics ------------------------------------------------------------------------
# heads (a, v, fused); losses at the start (0) and the end (1) of the estimation window
TABLE = {
    "lt0": [2.0, 2.0, 2.0],
    "lv0": [2.1, 2.0, 2.2],
    "lt1": [1.5, 1.0, 0.6],
    "lv1": [1.8, 1.9, 1.2],
}


def test_delta_g_and_delta_o_by_hand():
    # ΔG = 2.1 - 1.8 = 0.3; O_0 = 2.1 - 2.0 = 0.1, O_1 = 1.8 - 1.5 = 0.3, ΔO = 0.2
    dg, do = generalisation_and_overfitting(2.0, 2.1, 1.5, 1.8)
    assert dg == pytest.approx(0.3) and do == pytest.approx(0.2)
    # held-out loss rose: ΔG < 0; gap shrank: ΔO < 0
    dg, do = generalisation_and_overfitting(1.0, 1.5, 0.9, 1.2)
    assert dg == pytest.approx(0.3) and do == pytest.approx(0.3 - 0.5)


def test_weights_from_a_hand_made_table():
    """ΔG = (0.3, 0.1, 1.0), ΔO = (0.2, 0.9, 0.4); raw = ΔG/ΔO² = (7.5, 10/81, 6.25);
    sum = (607.5 + 10 + 506.25) / 81 = 1123.75 / 81."""
    res = blend_weights(**TABLE)
    assert res.dg == pytest.approx([0.3, 0.1, 1.0])
    assert res.do == pytest.approx([0.2, 0.9, 0.4])
    assert res.raw == pytest.approx([7.5, 10 / 81, 6.25])
    assert res.weights == pytest.approx([607.5 / 1123.75, 10 / 1123.75, 506.25 / 1123.75])
    assert res.weights == pytest.approx([0.5406006674, 0.0088987764, 0.4505005562])
    assert sum(res.weights) == pytest.approx(1.0) and not res.fallback
    assert res.losses["LV1"] == TABLE["lv1"]


def test_wrong_variants_give_other_weights():
    right = blend_weights(**TABLE).weights
    # OGR itself (|ΔO/ΔG|) instead of ΔG/ΔO²: a head that overfits would be favoured
    ogr = [abs(do / dg) for dg, do in zip([0.3, 0.1, 1.0], [0.2, 0.9, 0.4], strict=True)]
    assert [o / sum(ogr) for o in ogr] != pytest.approx(right, abs=1e-3)
    # ΔG/ΔO (no square): 1.5, 0.111, 2.5 -> the fused head would lead; the right rule puts a first
    assert right[0] > right[2]
    nosq = [1.5, 1 / 9, 2.5]
    assert [x / sum(nosq) for x in nosq] != pytest.approx(right, abs=1e-3)
    # train and held-out losses swapped: ΔG = L^T_0 - L^T_1 = (0.5, 1.0, 1.4), ΔO negated
    swapped = blend_weights(TABLE["lv0"], TABLE["lt0"], TABLE["lv1"], TABLE["lt1"])
    assert swapped.raw == pytest.approx([12.5, 100 / 81, 8.75])
    assert swapped.weights != pytest.approx(right, abs=1e-2)
    # start and end swapped: every ΔG < 0 -> fallback to the previous weights
    reverse = blend_weights(TABLE["lt1"], TABLE["lv1"], TABLE["lt0"], TABLE["lv0"], previous=[0.1, 0.2, 0.7])
    assert reverse.fallback and reverse.weights == [0.1, 0.2, 0.7]


# heads: a (held-out loss rose), b (ΔO = 0), fused (ΔO < 0)
EDGE = {
    "lt0": [2.0, 2.0, 2.0],
    "lv0": [2.0, 2.25, 2.5],
    "lt1": [1.0, 1.75, 1.5],
    "lv1": [2.5, 2.0, 1.7],
}


def test_edge_cases_reference_rule():
    """a: ΔG = -0.5 -> 0. b: ΔG = 0.25, ΔO = 0 -> 0.25 / 1e-4 = 2500. fused: ΔG = 0.8,
    ΔO = 0.2 - 0.5 = -0.3, squared: 0.8 / 0.09 = 80/9."""
    res = blend_weights(**EDGE, min_delta_o_sq=FLOOR)
    assert res.dg == pytest.approx([-0.5, 0.25, 0.8]) and res.do == pytest.approx([1.5, 0.0, -0.3])
    assert res.raw == pytest.approx([0.0, 2500.0, 80 / 9])
    total = 2500 + 80 / 9
    assert res.weights == pytest.approx([0.0, 2500 / total, (80 / 9) / total])
    assert raw_blend_weight(0.0, 0.3) == 0.0  # no generalisation, no weight


def test_edge_cases_variants():
    # clamp: ΔO <= 0 -> ΔO = sqrt(1e-4) = 0.01 -> b 0.25/1e-4 = 2500, fused 0.8/1e-4 = 8000
    clamp = blend_weights(**EDGE, min_delta_o_sq=FLOOR, delta_o_rule="clamp")
    assert clamp.raw == pytest.approx([0.0, 2500.0, 8000.0])
    assert clamp.weights == pytest.approx([0.0, 2500 / 10500, 8000 / 10500])
    # BalanceBenchmark's |ΔG|: the head whose held-out loss rose gets 0.5 / 1.5² = 2/9
    absdg = blend_weights(**EDGE, min_delta_o_sq=FLOOR, dg_rule="abs")
    assert absdg.raw[0] == pytest.approx(2 / 9)
    # a larger floor: ΔO² >= 0.01 -> b 25
    assert blend_weights(**EDGE, min_delta_o_sq=0.01).raw[1] == pytest.approx(25.0)
    # the cap: [0, 2500/10500, 8000/10500] capped at 0.7 -> the excess goes to b (a has 0)
    capped = blend_weights(**EDGE, min_delta_o_sq=FLOOR, delta_o_rule="clamp", max_weight=0.7)
    assert capped.weights == pytest.approx([0.0, 0.3, 0.7])
    with pytest.raises(ValueError):
        raw_blend_weight(0.1, 0.1, delta_o_rule="bogus")


def test_non_finite_losses_and_fallbacks():
    assert raw_blend_weight(float("nan"), 0.1) == 0.0
    assert raw_blend_weight(0.1, float("inf")) == 0.0
    diverged = blend_weights([2.0, 2.0], [2.0, 2.0], [float("nan"), 1.5], [float("nan"), 1.8])
    assert diverged.raw[0] == 0.0 and diverged.weights == pytest.approx([0.0, 1.0])
    # nobody generalised: the previous weights are kept; uniform when there are none
    flat = blend_weights([1.0] * 3, [1.0] * 3, [0.5] * 3, [1.0] * 3)
    assert flat.fallback and flat.weights == pytest.approx([1 / 3] * 3)
    kept = blend_weights([1.0] * 3, [1.0] * 3, [0.5] * 3, [1.2] * 3, previous=[0.5, 0.25, 0.25])
    assert kept.fallback and kept.weights == [0.5, 0.25, 0.25]
    with pytest.raises(ValueError):
        blend_weights([1.0], [1.0, 2.0], [1.0], [1.0])


def test_cap_weights_by_hand():
    assert cap_weights([0.95, 0.05, 0.0], 0.9) == pytest.approx([0.9, 0.1, 0.0])
    # a capped at 0.4, its excess 0.2 shared 1:3 -> b 0.15, c 0.45; c > 0.4 is capped in a
    # second pass and b gets the rest, 1 - 0.8 = 0.2
    assert cap_weights([0.6, 0.1, 0.3], 0.4) == pytest.approx([0.4, 0.2, 0.4])
    assert cap_weights([1.0, 0.0, 0.0], 0.5) == pytest.approx([0.5, 0.25, 0.25])
    assert cap_weights([0.7, 0.3], 1.0) == [0.7, 0.3]
    with pytest.raises(ValueError):
        cap_weights([0.5, 0.25, 0.25], 0.3)


def test_blended_loss_by_hand():
    losses = torch.tensor([2.0, 1.0, 4.0], dtype=torch.bfloat16)
    weights = torch.tensor([0.25, 0.5, 0.25])
    out = blended_loss(losses, weights)
    assert out.dtype == torch.float32 and out.item() == pytest.approx(0.5 + 0.5 + 1.0)


# ---- the estimation on a set-up trainer -----------------------------------------------------------
def setup_trainer(tmp_path, **overrides):
    t = make_trainer("ogr_gb", "synthetic", {**SMALL, "device": "cpu", "progress": "off",
                                              "records": str(tmp_path / "runs"), "super_epoch": 1, **overrides})
    t.setup()
    return t


def full_batch(t, split):
    ds = t.heldout() if split == "heldout" else getattr(t.splits, split)
    return next(iter(t.loader(ds, train=False, batch_size=len(ds))))


def test_estimation_measures_the_right_losses_and_leaves_the_run_untouched(tmp_path):
    t = setup_trainer(tmp_path, **{"backbone.m1.dropout": 0.3})  # sub-training draws dropout masks
    method, model = t.method, t.model
    assert method.heads == ["m1", "m2", FUSED] and len(t.heldout()) == 22  # ceil(8 % of 270)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    res = method.estimate()
    assert torch.equal(torch.get_rng_state(), rng)  # the main loop's draws are not disturbed
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k
    assert not t.optimizer.state  # the run's optimizer never stepped
    # L^V_0 by hand: one full-batch eval pass over the held-out slice
    batch = full_batch(t, "heldout")
    model.eval()
    with torch.no_grad():
        out = model(batch)
    y = batch["label"]
    by_hand = [F.cross_entropy(out.uni["m1"], y).item(), F.cross_entropy(out.uni["m2"], y).item(),
               F.cross_entropy(out.fused, y).item()]
    assert res.losses["LV0"] == pytest.approx(by_hand, rel=1e-5)
    # the weights are the pure function of the recorded losses; training moved L^T
    again = blend_weights(res.losses["LT0"], res.losses["LV0"], res.losses["LT1"], res.losses["LV1"],
                          noise_sq=res.floors, dg_rule="keep")
    assert res.weights == pytest.approx(again.weights) and sum(res.weights) == pytest.approx(1.0)
    assert all(a > b for a, b in zip(res.losses["LT0"], res.losses["LT1"], strict=True))
    assert method.weights == res.weights and method.estimations[-1]["weights"] == res.weights
    n = len(t.loader(t.splits.train, train=True))
    assert t.estimation_cost.optimizer_steps == 2 * n  # one unimodal copy + one fused copy
    # + 3 measurements (before, each copy after), each n train batches + 1 held-out batch
    assert t.estimation_cost.batches == 2 * n + 3 * (n + 1)


def test_sub_networks_train_only_their_own_parameters(tmp_path):
    t = setup_trainer(tmp_path)
    model = t.model
    start = dict(model.named_parameters())
    for heads, allowed in ((["m1", "m2"], ("encoders.", "uni_heads.")), ([FUSED], ("encoders.", "fusion."))):
        net, cost = t.method._train_copy(heads)
        changed = {k for k, p in net.named_parameters() if not torch.equal(p, start[k])}
        assert changed and all(k.startswith(allowed) for k in changed), (heads, changed)
        assert {k.split(".")[0] for k in changed} == {a.rstrip(".") for a in allowed}
        assert all(p.requires_grad for p in net.parameters())
        assert cost.optimizer_steps == len(t.loader(t.splits.train, train=True))
    one, _ = t.method._train_copy(["m1"])
    changed = {k for k, p in one.named_parameters() if not torch.equal(p, start[k])}
    assert changed and all(k.startswith(("encoders.m1.", "uni_heads.m1.")) for k in changed)


def test_measurement_is_an_eval_mode_per_sample_mean(tmp_path):
    """On a copy with dropout (the run's own model is put in eval mode by iterate)."""
    import copy

    t = setup_trainer(tmp_path, **{"backbone.m1.dropout": 0.5, "backbone.m2.dropout": 0.5})
    net = copy.deepcopy(t.model).train()
    values, n = t.method._measure(net, t.method.heads, "heldout")
    assert n == 1 and net.training  # its mode is restored
    batch = full_batch(t, "heldout")
    net.eval()
    with torch.no_grad():
        out = net(batch)
    y = batch["label"]
    want = [F.cross_entropy(out.uni["m1"], y), F.cross_entropy(out.uni["m2"], y), F.cross_entropy(out.fused, y)]
    assert values == pytest.approx([w.item() for w in want], rel=1e-5)
    only_m2, _ = t.method._measure(net.train(), ["m2"], "heldout")  # one head, its encoder only
    assert only_m2 == pytest.approx([want[1].item()], rel=1e-5)


def test_joint_unimodal_sub_training_equals_separate_runs(tmp_path):
    joint = setup_trainer(tmp_path / "a", unimodal_estimation="joint").method.estimate()
    separate_t = setup_trainer(tmp_path / "b", unimodal_estimation="separate")
    separate = separate_t.method.estimate()
    assert separate_t.method._sub_networks() == [["m1"], ["m2"], [FUSED]]
    for key in ("LT1", "LV1"):
        assert joint.losses[key] == pytest.approx(separate.losses[key], rel=1e-6, abs=1e-7)
    assert joint.weights == pytest.approx(separate.weights, rel=1e-5)
    clipped = setup_trainer(tmp_path / "c", grad_clip=1.0).method
    assert clipped._sub_networks() == [["m1"], ["m2"], [FUSED]]  # auto: separate under a global clip


def test_copied_estimation_optimizer(tmp_path):
    t = setup_trainer(tmp_path, estimation_optimizer="copy")
    method, model = t.method, t.model
    batch = next(t.iterate("train", batches=1, train_mode=True))
    method.training_step(batch, 0).backward()
    t.optimizer_step(t.optimizer)  # momentum buffers now exist
    t.optimizer.param_groups[0]["lr"] = 0.0123  # as a schedule would have set it
    import copy

    net = copy.deepcopy(model)
    opt = method._sub_optimizer(net)
    assert opt.param_groups[0]["lr"] == 0.0123
    mine = list(net.parameters())
    for i, p in enumerate(model.parameters()):
        a, b = t.optimizer.state[p]["momentum_buffer"], opt.state[mine[i]]["momentum_buffer"]
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()  # a copy, never an alias
    saved = {id(p): s["momentum_buffer"].clone() for p, s in t.optimizer.state.items()}
    method.estimate()
    for p, s in t.optimizer.state.items():
        assert torch.equal(s["momentum_buffer"], saved[id(p)])
    assert setup_trainer(tmp_path / "f").method._sub_optimizer(net) is None  # fresh: sub_train's recipe


def test_training_step_is_the_blended_loss(tmp_path):
    t = setup_trainer(tmp_path)
    method, model = t.method, t.model
    method._set_weights([0.2, 0.3, 0.5])
    batch = next(t.iterate("train", batches=1))
    loss = method.training_step(batch, 0)
    out = model(batch)
    y = batch["label"]
    parts = [F.cross_entropy(out.uni["m1"], y), F.cross_entropy(out.uni["m2"], y), F.cross_entropy(out.fused, y)]
    assert loss.item() == pytest.approx(sum(w * p.item() for w, p in zip([0.2, 0.3, 0.5], parts, strict=True)), rel=1e-6)
    swapped = 0.5 * parts[0].item() + 0.3 * parts[1].item() + 0.2 * parts[2].item()
    assert loss.item() != pytest.approx(swapped, rel=1e-4)  # the weights sit on their own heads


def test_inference_rules(tmp_path):
    batch = None
    for rule in ("fused", "mean"):
        t = setup_trainer(tmp_path / rule, inference=rule)
        batch = batch or full_batch(t, "test")
        pred = t.method.predict(batch)
        out = t.model(batch)
        want = out.fused if rule == "fused" else (out.fused + out.uni["m1"] + out.uni["m2"]) / 3
        assert torch.allclose(pred.fused, want, atol=1e-6)
        assert set(pred.per_modality) == {"m1", "m2"}
        assert torch.allclose(pred.per_modality["m2"], out.uni["m2"])


def test_train_loss_fraction_measures_the_first_batches(tmp_path):
    t = setup_trainer(tmp_path, train_loss_fraction=0.5)
    _, n = t.method._measure(t.model, t.method.heads, "train")
    assert n == 2 == math.floor(0.5 * len(t.loader(t.splits.train, train=True)))


# ---- runs ------------------------------------------------------------------------------------
def test_online_run_estimates_every_super_epoch(fast):
    rec = run("ogr_gb", "synthetic", {**fast, **SMALL, "epochs": 3, "super_epoch": 2}).record
    epochs = rec["epochs"]
    steps = [e["estimation_cost"]["optimizer_steps"] for e in epochs]
    n = epochs[0]["optimizer_steps"]
    assert steps == [2 * 2 * n, 0, 2 * 2 * n]  # two copies x two epochs at epochs 0 and 2
    assert rec["final"]["estimation_cost"]["optimizer_steps"] == sum(steps) > 0
    assert all(e["optimizer_steps"] == n == e["train_batches"] for e in epochs)  # sub-steps kept apart
    diag = [e["diagnostics"] for e in epochs]
    assert [d["estimated"] for d in diag] == [1.0, 0.0, 1.0]
    for d in diag:
        assert sum(d[f"w_{h}"] for h in ("m1", "m2", "fused")) == pytest.approx(1.0)
        assert {"loss_m1", "loss_m2", "loss_fused"} <= set(d)
    assert diag[1]["w_m2"] == diag[0]["w_m2"] and "dG_m2" in diag[0] and "dG_m2" not in diag[1]
    assert diag[2]["w_m2"] != diag[0]["w_m2"]
    assert all(e["train_time_s"] >= 0 for e in epochs)
    info = rec["header"]["method_info"]
    assert info["per_modality"] == "unimodal_heads" and info["trains_unimodal_heads"]
    assert info["heads"] == ["m1", "m2", "fused"] and rec["header"]["method_label"] == "OGR-GB (n=2)"
    assert "held out for method ogr_gb" in rec["header"]["dataset_info"]["heldout_rule"]


def test_offline_run_estimates_once_before_training(fast):
    rec = run("ogr_gb", "synthetic", {**fast, **SMALL, "mode": "offline", "super_epoch": 1}).record
    epochs = rec["epochs"]
    assert [e["estimation_cost"]["optimizer_steps"] for e in epochs] == [0, 0]  # before epoch 0
    assert rec["final"]["estimation_cost"]["optimizer_steps"] == 2 * epochs[0]["optimizer_steps"]
    diag = [e["diagnostics"] for e in epochs]
    assert [d["estimated"] for d in diag] == [1.0, 0.0] and "LV1_fused" in diag[0]
    assert diag[0]["w_fused"] == diag[1]["w_fused"] and diag[0]["fallback"] == 0.0
    assert rec["header"]["method_label"] == "OGR-GB (offline, n=1)"
    # estimated from the initial weights: what an estimation on a freshly set-up model gives
    fresh = setup_trainer(Path(fast["records"]) / "fresh", mode="offline").method.estimate()
    assert [diag[0][f"w_{h}"] for h in ("m1", "m2", "fused")] == pytest.approx(fresh.weights, rel=1e-6)


def test_avdigits_two_epochs(fast, shared_data):
    rec = run("ogr_gb", "avdigits", {**fast, "epochs": 2, "super_epoch": 1, "limit_train_batches": 3,
                                      "limit_eval_batches": 2}).record
    assert len(rec["epochs"]) == 2
    assert rec["final"]["estimation_cost"]["optimizer_steps"] == 2 * 2 * 3
    diag = rec["epochs"][1]["diagnostics"]
    assert sum(diag[f"w_{h}"] for h in ("audio", "image", "fused")) == pytest.approx(1.0)
    assert {"audio", "image"} <= set(rec["epochs"][1]["val"])


@pytest.mark.parametrize("super_epoch", [1, 2])
def test_resume_is_identical(fast, tmp_path, monkeypatch, super_epoch):
    """Killed in epoch 1: with n = 1 an estimation epoch (the resumed run re-estimates the
    same), with n = 2 not (the weights come back from the checkpoint)."""
    assert_resume_identical("ogr_gb", "synthetic", {**fast, **SMALL, "super_epoch": super_epoch}, tmp_path, monkeypatch)


def test_three_modalities(fast):
    rec = run("ogr_gb", "synthetic", {**fast, **SMALL, "epochs": 1, "n_modalities": 3, "super_epoch": 1,
                                      "max_weight": 0.3}).record
    diag = rec["epochs"][0]["diagnostics"]
    weights = [diag[f"w_{h}"] for h in ("m1", "m2", "m3", "fused")]
    assert sum(weights) == pytest.approx(1.0) and max(weights) <= 0.3 + 1e-6
    assert rec["header"]["method_info"]["heads"] == ["m1", "m2", "m3", "fused"]


def test_sum_fusion_runs(fast):
    rec = run("ogr_gb", "synthetic", {**fast, **SMALL, "epochs": 1, "fusion_mode": "sum", "mode": "offline",
                                      "super_epoch": 1}).record
    assert rec["header"]["method_label"] == "OGR-GB (offline, n=1, sum fusion)"


# ---- refusals --------------------------------------------------------------------------------
def test_one_modality_refused(fast):
    with pytest.raises(UnsupportedError, match="at least 2"):
        make_trainer("ogr_gb", "synthetic", {**fast, **SMALL, "modalities": ["m1"]}).check()


def test_infeasible_cap_refused(fast):
    with pytest.raises(ConfigError, match="max_weight"):
        make_trainer("ogr_gb", "synthetic", {**fast, **SMALL, "max_weight": 0.3}).check()


@pytest.mark.parametrize("bad", [{"fusion_mode": "weight"}, {"super_epoch": 0}, {"train_loss_fraction": 0.0},
                                 {"min_delta_o_sq": 0.0}, {"mode": "both"}, {"max_weight": 1.5}])
def test_bad_option_values_refused(fast, bad):
    with pytest.raises(ConfigError):
        make_trainer("ogr_gb", "synthetic", {**fast, **SMALL, **bad})


def test_checkpoint_of_other_heads_refused(tmp_path):
    method = setup_trainer(tmp_path).method
    with pytest.raises(ConfigError, match="heads"):
        method.load_state_dict({"heads": ["m1", "m2", "m3", "fused"], "weights": [0.25] * 4, "estimations": []})
    method.load_state_dict({"heads": ["m1", "m2", "fused"], "weights": [0.1, 0.2, 0.7], "estimations": []})
    assert method.weights == [0.1, 0.2, 0.7] and method._w_tensor.tolist() == pytest.approx([0.1, 0.2, 0.7])


def test_bf16_autocast_keeps_the_losses_in_fp32(tmp_path):
    """CPU bf16 autocast (as on CUDA): the blended loss and the measured losses are fp32."""
    t = setup_trainer(tmp_path, amp="bf16")
    batch = next(t.iterate("train", batches=1))
    with t.autocast():
        loss = t.method.training_step(batch, 0)
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    res = t.method.estimate()
    assert all(math.isfinite(x) for x in res.losses["LV1"]) and sum(res.weights) == pytest.approx(1.0)


# ---- issue 21: wrong variants, and the defaults that kept a modality locked out (items 6, 8) ----
def test_delta_o_noise_by_hand():
    """ΔO = mean(v1 - v0) - mean(t1 - t0) over paired samples: its variance is
    var(v1 - v0) / N_V + var(t1 - t0) / N_T (unbiased variances)."""
    t0 = torch.tensor([[2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    t1 = torch.tensor([[1.0, 1.5, 0.5, 1.0], [1.0, 1.0, 1.0, 1.0]])  # changes -1, -0.5, -1.5, -1
    v0 = torch.tensor([[2.0, 2.0], [3.0, 1.0]])
    v1 = torch.tensor([[1.0, 2.0], [3.0, 1.0]])  # changes -1, 0 | 0, 0
    noise = delta_o_noise_sq(t0, t1, v0, v1)
    # head 0: var(-1, 0) = 0.5, / 2 = 0.25; var(-1, -0.5, -1.5, -1) = 1/6, / 4 = 1/24
    assert noise.tolist() == pytest.approx([0.25 + 1 / 24, 0.0])


def test_noise_floor_by_hand():
    """Head b has ΔO = 0: the fixed floor gives it ΔG / 1e-4 = 2500; a noise variance of 0.01
    floors its ΔO² there instead (0.25 / 0.01 = 25); head a's ΔO² = 2.25 is above its noise."""
    fixed = blend_weights(**EDGE, min_delta_o_sq=FLOOR)
    noisy = blend_weights(**EDGE, min_delta_o_sq=FLOOR, noise_sq=[0.5, 0.01, 1e-6])
    assert fixed.raw[1] == pytest.approx(2500.0) and noisy.raw[1] == pytest.approx(25.0)
    assert noisy.floors == pytest.approx([0.5, 0.01, FLOOR])
    assert noisy.raw[2] == pytest.approx(0.8 / 0.09)  # ΔO² = 0.09 above its floor
    with pytest.raises(ValueError):
        blend_weights(**EDGE, noise_sq=[0.1])


def test_keep_rule_by_hand():
    """dg_rule=keep: head a (ΔG = -0.5) keeps its previous weight, b and fused share the rest
    in proportion to ΔG / ΔO²; zero switches a off; abs gives it |ΔG| / ΔO² = 0.5 / 2.25."""
    keep = blend_weights(**EDGE, min_delta_o_sq=FLOOR, dg_rule="keep", previous=[0.2, 0.3, 0.5])
    rest = 0.8 / (2500 + 80 / 9)
    assert keep.weights == pytest.approx([0.2, 2500 * rest, 80 / 9 * rest]) and not keep.fallback
    first = blend_weights(**EDGE, min_delta_o_sq=FLOOR, dg_rule="keep")  # uniform before any estimate
    assert first.weights[0] == pytest.approx(1 / 3)
    zero = blend_weights(**EDGE, min_delta_o_sq=FLOOR, dg_rule="zero", previous=[0.2, 0.3, 0.5])
    assert zero.weights[0] == 0.0
    assert blend_weights(**EDGE, min_delta_o_sq=FLOOR, dg_rule="abs").raw[0] == pytest.approx(0.5 / 2.25)
    with pytest.raises(ValueError):
        raw_blend_weight(0.1, 0.1, dg_rule="max")


def test_estimation_losses_and_noise_by_hand_on_the_trained_copies(tmp_path, monkeypatch):
    """Wrong variant caught: the post-training train and held-out losses swapped (L^T_1 <->
    L^V_1). L^T_1 is measured here by hand on the trained copies over the whole training split
    (train_loss_fraction = 1), L^V_1 over the held-out slice; the ΔO² floors are the noise of
    the per-sample changes, by hand (above the fixed 1e-4 after three epochs of sub-training)."""
    t = setup_trainer(tmp_path, super_epoch=3)
    method, model = t.method, t.model
    copies = []
    original = type(method)._train_copy

    def keep_copy(self, heads):
        net, cost = original(self, heads)
        copies.append((list(heads), net))
        return net, cost

    monkeypatch.setattr(type(method), "_train_copy", keep_copy)
    res = method.estimate()
    train, held = full_batch(t, "train"), full_batch(t, "heldout")

    def per_sample(net, batch):
        net.eval()
        with torch.no_grad():
            out = net(batch)
        net.train()
        y = batch["label"]
        return {"m1": F.cross_entropy(out.uni["m1"], y, reduction="none"),
                "m2": F.cross_entropy(out.uni["m2"], y, reduction="none"),
                FUSED: F.cross_entropy(out.fused, y, reduction="none")}

    before = {"T": per_sample(model, train), "V": per_sample(model, held)}
    after = {}
    for heads, net in copies:
        for split, batch in (("T", train), ("V", held)):
            losses = per_sample(net, batch)
            after.setdefault(split, {}).update({h: losses[h] for h in heads})
    heads = ["m1", "m2", FUSED]
    assert res.losses["LT1"] == pytest.approx([after["T"][h].mean().item() for h in heads], rel=1e-5)
    assert res.losses["LV1"] == pytest.approx([after["V"][h].mean().item() for h in heads], rel=1e-5)
    assert res.losses["LV1"] != pytest.approx(res.losses["LT1"], rel=1e-2)
    noises = []
    for k, h in enumerate(heads):
        d_t, d_v = after["T"][h] - before["T"][h], after["V"][h] - before["V"][h]
        noises.append((d_v.var() / len(d_v) + d_t.var() / len(d_t)).item())
        assert res.floors[k] == pytest.approx(max(FLOOR, noises[k]), rel=1e-4)
    assert min(noises) > 5 * FLOOR  # every floor is the noise, not the fixed 1e-4


def test_estimated_weights_reach_the_loss(tmp_path):
    """Wrong variant caught: the estimated weights not reaching the loss (recorded and logged,
    while the step keeps the weights of before the estimation). The step after an estimation is
    sum_k w_k CE_k with the new, non-uniform w."""
    t = setup_trainer(tmp_path)
    method, model = t.method, t.model
    method.on_fit_start()
    method.epoch = 0
    t._step_logs = {}
    method.on_train_epoch_start(0)  # super_epoch = 1: an estimation epoch
    w = method.estimations[-1]["weights"]
    assert w != pytest.approx([1 / 3] * 3, abs=1e-2)
    assert [t._step_logs[f"w_{h}"][-1] for h in ("m1", "m2", FUSED)] == pytest.approx(w)
    batch = next(t.iterate("train", batches=1))
    loss = method.training_step(batch, 0)
    with torch.no_grad():
        out = model(batch)
    y = batch["label"]
    parts = [F.cross_entropy(out.uni["m1"], y), F.cross_entropy(out.uni["m2"], y), F.cross_entropy(out.fused, y)]
    assert loss.item() == pytest.approx(sum(a * b.item() for a, b in zip(w, parts, strict=True)), rel=1e-6)


NOISY_M2 = {"n_train": 120, "n_test": 100, "strength": [1.5, 0.0], "super_epoch": 5, "mode": "offline"}


@pytest.mark.parametrize("rule", ["keep", "zero"])
def test_a_head_without_generalisation_at_the_first_estimate_still_trains(tmp_path, rule):
    """Item 8 of issue 21: m2 carries no signal; trained alone from the initial weights for
    super_epoch = 5 epochs its held-out loss rises (ΔG < 0 at the first estimate). With the
    default dg_rule=keep it keeps its uniform weight and its head and encoder train; the earlier
    rule (zero) gave it weight 0: no gradient reaches its head for the whole (offline) run, which
    only shrinks under weight decay."""
    t = make_trainer("ogr_gb", "synthetic", {"device": "cpu", "progress": "off", "epochs": 2,
                                              "records": str(tmp_path / "runs"), "dg_rule": rule, **NOISY_M2})
    t.setup()
    method, model = t.method, t.model
    method.on_cell_start()
    method.on_fit_start()
    est = method.estimations[-1]
    assert est["dG"][1] < 0 and est["raw"][1] == 0.0
    before = model.uni_heads["m2"].weight.detach().clone()
    encoder = [p.detach().clone() for p in model.encoder_params("m2")]
    t.train_epoch(0)
    after = model.uni_heads["m2"].weight.detach()
    shrunk = torch.allclose(after, before * (after.norm() / before.norm()), rtol=0, atol=1e-7)
    if rule == "keep":
        assert method.weights[1] == pytest.approx(1 / 3) and not shrunk
    else:
        assert method.weights[1] == 0.0 and shrunk
    assert any(not torch.equal(a, b) for a, b in zip(encoder, model.encoder_params("m2"), strict=True))
