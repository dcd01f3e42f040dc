"""CML plugin: the chain, the confidences, the sign rules and the regulariser by hand, the
step, every option reaching it, resume, real data, refusals."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from method_checks import assert_resume_identical
from mmbalance.methods.cml import (
    OPTIONS,
    calibration_penalty,
    chain_masks,
    cml_loss,
    confidences,
    link_weights,
    removal_positions,
    subset_logits,
)
from torch import nn

from mmbalance.engine.runtime import epoch_seed, seed_everything
from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.heads import ConcatHead, SumHead
from mmbalance.runner import make_trainer, resolve_config, run
from mmbalance.trainer import to_device

SYN = {"epochs": 2, "n_train": 300, "n_test": 100}

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest


# ---- the chain ---------------------------------------------------------------------------------
def test_chain_masks_are_nested_by_hand():
    """Wrong variants caught here: a chain that removes only the k-th modality of the order
    instead of every one up to it (not nested: ``pos == k - 1`` dropped alone); the keep mask
    inverted (``pos < k``); an off-by-one chain that starts with a removal (``pos > k``)."""
    pos = torch.tensor([[1, 0, 2], [2, 1, 0]])  # row 0 drops m1 then m0; row 1 drops m2 then m1
    keep = chain_masks(pos)
    assert keep.shape == (3, 2, 3) and keep.dtype == torch.bool
    T, F_ = True, False
    assert keep.tolist() == [
        [[T, T, T], [T, T, T]],  # S_0: everything
        [[T, F_, T], [T, T, F_]],  # S_1: the first removal gone
        [[F_, F_, T], [T, F_, F_]],  # S_2: one modality left, nested in S_1
    ]


def test_removal_positions_per_sample_and_per_epoch():
    """Each row is a permutation; per sample every order occurs; per epoch one order for all.

    Wrong variant caught: one order drawn for the whole batch under ``order=per_sample``."""
    g = torch.Generator().manual_seed(0)
    pos = removal_positions(600, 3, "per_sample", generator=g)
    assert torch.equal(pos.sort(dim=1).values, torch.arange(3).expand(600, 3))
    assert len({tuple(r) for r in pos.tolist()}) == 6  # all 3! orders
    counts = torch.bincount(pos[:, 0], minlength=3).float() / 600  # who goes first: uniform
    assert torch.all((counts - 1 / 3).abs() < 0.07)
    epoch = torch.tensor([2, 0, 1])
    same = removal_positions(5, 3, "per_epoch", epoch_order=epoch)
    assert torch.equal(same, epoch.expand(5, 3))
    with pytest.raises(ValueError, match="epoch_order"):
        removal_positions(5, 3, "per_epoch")


# ---- confidences and the sign rules ------------------------------------------------------------
def test_confidence_is_the_max_probability_in_fp32():
    """Wrong variants caught: the true-class probability instead of the max; the max
    log-probability returned without its exponential."""
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(4.0), 0.0]], dtype=torch.bfloat16)
    conf, pred = confidences(logits)
    assert conf.dtype == torch.float32
    torch.testing.assert_close(conf, torch.tensor([0.75, 0.8]), atol=4e-3, rtol=0)
    assert pred.tolist() == [1, 0]


# the four cases of a link, y = 0: (larger set right, subset right), (R, wrong), (W, R), (W, W)
PRED_BIG = torch.tensor([0, 0, 1, 2])
PRED_SMALL = torch.tensor([0, 1, 0, 1])
Y4 = torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize(("sign", "w", "both_wrong"), [
    ("cpm", [1, 1, 0, 1], None),  # only wrong -> right may raise confidence
    ("bb_trick1", [1, 0, 1, 1], None),  # BalanceBenchmark: only right -> wrong may
    ("miwae", [1, 1, 0, 0], [0, 0, 0, 1]),  # larger set right; trick 2 when both wrong
    ("none", [1, 1, 1, 1], None),
])
def test_link_weights_by_hand(sign, w, both_wrong):
    """Wrong variants caught: the CPM rule with the roles of the two sets swapped (that is
    bb_trick1's mask); MIWAE's trick 1 on the subset's correctness instead of the larger set's."""
    got, got2 = link_weights(PRED_BIG, PRED_SMALL, Y4, sign)
    assert got.dtype == torch.float32 and got.tolist() == w
    assert (got2.tolist() if got2 is not None else None) == both_wrong


# ---- the regulariser on a hand-made chain ------------------------------------------------------
# five samples, y = 0; link 0 -> 1 cases: R->R rise .2, R->W rise .2, W->R rise .4, W->W rise .3,
# R->R fall .5
CONF = torch.tensor([[0.6, 0.7, 0.5, 0.4, 0.9],
                     [0.8, 0.9, 0.9, 0.7, 0.4]])
PRED = torch.tensor([[0, 0, 1, 2, 0],
                     [0, 1, 0, 1, 0]])
Y5 = torch.zeros(5, dtype=torch.long)


@pytest.mark.parametrize(("sign", "hinge", "reduction", "eps", "expected"), [
    ("cpm", "per_sample", "sum", 0.0, 0.2 + 0.2 + 0.3),
    ("cpm", "per_sample", "mean", 0.0, (0.2 + 0.2 + 0.3) / 5),
    ("cpm", "batch_sum", "sum", 0.0, 0.2 + 0.2 + 0.3 - 0.5),
    ("cpm", "per_sample", "sum", 0.25, 0.3 - 0.25),
    ("cpm", "batch_sum", "sum", 0.02, 0.2 + 0.2 + 0.3 - 0.5 - 5 * 0.02),
    ("bb_trick1", "per_sample", "sum", 0.0, 0.2 + 0.4 + 0.3),
    ("miwae", "per_sample", "sum", 0.0, 0.2 + 0.2 + 0.3),  # trick 1 (.2 + .2) + trick 2 (.3)
    ("miwae", "batch_sum", "sum", 0.0, 0.3),  # trick 1's link sum is .2 + .2 - .5 < 0: only trick 2
    ("none", "per_sample", "sum", 0.0, 0.2 + 0.2 + 0.4 + 0.3),
    ("none", "batch_sum", "sum", 0.0, 0.2 + 0.2 + 0.4 + 0.3 - 0.5),
    ("none", "batch_sum", "mean", 0.0, (0.2 + 0.2 + 0.4 + 0.3 - 0.5) / 5),
])
def test_penalty_by_hand(sign, hinge, reduction, eps, expected):
    """Wrong variants caught: the rise with its sign flipped (``c_k - c_{k+1}``); the margin
    added instead of subtracted; the mean dividing by the chain length too; the batch-sum hinge
    per sample (or the per-sample hinge on the sum); trick 2 left out of MIWAE."""
    pen = calibration_penalty(CONF, PRED, Y5, sign, eps, hinge, reduction)
    assert pen.reg.dim() == 0 and pen.reg.dtype == torch.float32
    torch.testing.assert_close(pen.reg, torch.tensor(max(expected, 0.0)))
    torch.testing.assert_close(pen.rise, torch.tensor(4 / 5))


def test_penalty_sums_adjacent_links_of_a_three_set_chain():
    """Wrong variants caught: each subset compared with the full set instead of with the set
    before it (link 1 would give .4 + .2); only the first link counted."""
    conf = torch.tensor([[0.5, 0.6], [0.7, 0.5], [0.9, 0.8]])
    pred = torch.zeros(3, 2, dtype=torch.long)
    pen = calibration_penalty(conf, pred, torch.zeros(2, dtype=torch.long), "cpm")
    torch.testing.assert_close(pen.reg, torch.tensor(0.2 + (0.2 + 0.3)))
    torch.testing.assert_close(pen.rise, torch.tensor(3 / 4))


@pytest.mark.parametrize(("sign", "grad_big", "grad_small"), [
    ("cpm", [-1, -1, 0, -1, 0], [1, 1, 0, 1, 0]),
    ("miwae", [-1, -1, 0, 0, 0], [1, 1, 0, 1, 0]),  # trick 2 pushes only the subset down
])
def test_penalty_gradients_by_hand(sign, grad_big, grad_small):
    """Wrong variants caught: the larger set's confidence detached in the first term (no push
    up on c_k); trick 2 without its stop-gradient; the masks built with gradient (they are
    products with boolean tensors, so a mask that carried one would change nothing here, but a
    mask taken from a differentiable soft rule would)."""
    conf = CONF.clone().requires_grad_(True)
    calibration_penalty(conf, PRED, Y5, sign).reg.backward()
    torch.testing.assert_close(conf.grad, torch.tensor([grad_big, grad_small], dtype=torch.float32))


def test_cml_loss_by_hand():
    """Two sets, three samples. Full / subset probabilities: a (.25,.75)->(.2,.8) y=1 right->right,
    rise .05; b (.8,.2)->(.5,.5) y=0 right->right, fall .3; c (.75,.25)->(.4,.6) y=1 wrong->right,
    fall .15 (true-class rise .35).

    Wrong variants caught: CE on the full set only while ``ce_on_subsets`` is on; the CE summed
    over the chain instead of averaged; lam not applied; the true-class probability as the
    confidence (c would add .35 under sign none)."""
    ln = math.log
    logits = torch.tensor([
        [[0.0, ln(3)], [ln(4), 0.0], [ln(3), 0.0]],
        [[0.0, ln(4)], [0.0, 0.0], [0.0, ln(1.5)]],
    ])
    y = torch.tensor([1, 0, 1])
    ce_full = -(ln(0.75) + ln(0.8) + ln(0.25)) / 3
    ce_sub = -(ln(0.8) + ln(0.5) + ln(0.6)) / 3
    out = cml_loss(logits, y, lam=0.1)
    torch.testing.assert_close(out.ce, torch.tensor((ce_full + ce_sub) / 2))
    torch.testing.assert_close(out.reg, torch.tensor(0.05))
    torch.testing.assert_close(out.loss, torch.tensor((ce_full + ce_sub) / 2 + 0.1 * 0.05))
    only = cml_loss(logits, y, lam=2.0, sign="none", ce_on_subsets=False)
    torch.testing.assert_close(only.ce, torch.tensor(ce_full))
    torch.testing.assert_close(only.reg, torch.tensor(0.05))  # c falls in max confidence
    torch.testing.assert_close(only.loss, torch.tensor(ce_full + 2.0 * 0.05))


# ---- removing a modality from the fused head ---------------------------------------------------
def _concat_head():
    head = ConcatHead({"a": 2, "b": 1}, 2)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]))
        head.fc.bias.copy_(torch.tensor([0.5, -1.0]))
    return head


def test_concat_zero_feature_is_balancebenchmarks_bias_restore():
    """Full logits (7.5, -2); without b: BalanceBenchmark's out - part_b + bias/2 = (1.5, 1); the
    part of a alone, bias share b/2 only: (1.25, 1.5).

    Wrong variants caught: the bias share not restored (drop_part used for concat's default);
    the wrong modality removed (the keep mask's columns swapped)."""
    head = _concat_head()
    feats = {"a": torch.tensor([[1.0, 2.0], [1.0, 2.0]]), "b": torch.tensor([[3.0], [3.0]])}
    keep = torch.tensor([[True, True], [True, False]])  # row 0 keeps both, row 1 only a
    out = subset_logits(head, feats, keep, "zero_feature")
    torch.testing.assert_close(out, torch.tensor([[7.5, -2.0], [1.5, 1.0]]))
    parts = head.parts(feats)
    torch.testing.assert_close(out[1], head(feats)[1] - parts["b"][1] + head.fc.bias / 2)
    dropped = subset_logits(head, feats, keep, "drop_part")
    torch.testing.assert_close(dropped, torch.tensor([[7.5, -2.0], [1.25, 1.5]]))


def test_sum_removal_drops_the_part_with_its_bias():
    """Wrong variant caught: the sum head's removed modality keeping its bias under drop_part."""
    head = SumHead({"a": 1, "b": 1}, 2)
    with torch.no_grad():
        head.fcs["a"].weight.copy_(torch.tensor([[1.0], [2.0]]))
        head.fcs["a"].bias.copy_(torch.tensor([0.1, 0.2]))
        head.fcs["b"].weight.copy_(torch.tensor([[-1.0], [3.0]]))
        head.fcs["b"].bias.copy_(torch.tensor([1.0, -1.0]))
    feats = {"a": torch.tensor([[2.0]]), "b": torch.tensor([[1.0]])}
    only_a = torch.tensor([[True, False]])
    torch.testing.assert_close(subset_logits(head, feats, only_a, "drop_part"), torch.tensor([[2.1, 4.2]]))
    torch.testing.assert_close(subset_logits(head, feats, only_a, "zero_feature"), torch.tensor([[3.1, 3.2]]))


# ---- the step inside a trainer -----------------------------------------------------------------
def step_trainer(tmp_path, dataset="synthetic", **overrides):
    base = {**SYN, "records": str(tmp_path / "runs"), "progress": "off", "device": "cpu"}
    if dataset != "synthetic":
        base = {"records": str(tmp_path / "runs"), "progress": "off", "device": "cpu"}
    t = make_trainer("cml", dataset, {**base, **overrides})
    t.setup()
    t.method.on_fit_start()
    return t


def first_batch(t, index=0):
    for i, batch in enumerate(t.loader(t.splits.train, train=False)):
        if i == index:
            return to_device(batch, t.device)
    raise IndexError(index)


def step(t, batch, epoch=0, seed=0):
    """One training step's loss and gradients from a fixed RNG state (epoch hook included)."""
    t.model.train()
    t.method.epoch = epoch
    seed_everything(epoch_seed(seed, epoch))
    t.method.on_train_epoch_start(epoch)
    t.model.zero_grad(set_to_none=True)
    with t.autocast():
        loss = t.method.training_step(batch, 0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_step_is_the_pure_loss_on_the_drawn_chain(tmp_path):
    """The step's loss equals cml_loss on the chain the same RNG state draws, with the full set
    the plain fused head; the unimodal heads get no gradient.

    Wrong variants caught: the step building its chain from another modality order than the
    batch's features (keep columns not in the model's modality order, e.g. reversed); the
    batched chain's sets shifted by one, so that set 0 is not the full set."""
    t = step_trainer(tmp_path, n_modalities=3)
    batch = first_batch(t)
    loss, grads = step(t, batch)
    assert not any(n.startswith("uni_heads.") for n in grads)
    seed_everything(epoch_seed(0, 0))
    t.model.zero_grad(set_to_none=True)
    with torch.no_grad():
        feats = t.model.encode(batch)
        keep = chain_masks(removal_positions(len(batch["label"]), 3))
        chain = [t.model.fuse(feats)]
        for k in (1, 2):
            chain.append(t.model.fuse({m: f * keep[k][:, j : j + 1] for j, (m, f) in enumerate(feats.items())}))
        expected = cml_loss(torch.stack(chain), batch["label"]).loss
    torch.testing.assert_close(loss, expected)


def test_per_epoch_order_is_one_order_for_the_whole_epoch(tmp_path, monkeypatch):
    """Wrong variants caught: the per-epoch order redrawn at every batch; the per-sample order
    shared by the rows of a batch."""
    seen = []

    def spy(self, feats, keep):
        seen.append(keep.clone())
        return original(self, feats, keep)

    from mmbalance.methods.cml import CML
    original = CML.chain_logits
    monkeypatch.setattr(CML, "chain_logits", spy)
    t = step_trainer(tmp_path, n_modalities=3, order="per_epoch")
    b0, b1 = first_batch(t, 0), first_batch(t, 1)
    step(t, b0)
    t.method.training_step(b1, 1)  # same epoch, no new draw
    assert torch.equal(seen[0][:, :1].expand_as(seen[0]), seen[0])  # one order for all rows
    assert torch.equal(seen[0][:, 0], seen[1][:, 0])  # and for the next batch
    orders = set()
    for epoch in range(12):  # a new draw every epoch
        step(t, b0, epoch=epoch)
        orders.add(tuple(seen[-1][:, 0].sum(0).tolist()))
    assert len(orders) > 1
    seen.clear()
    t2 = step_trainer(tmp_path / "b", n_modalities=3)
    step(t2, b0)
    assert len({tuple(seen[0][:, i].sum(0).tolist()) for i in range(seen[0].shape[1])}) > 1


NON_DEFAULT = {
    "lam": 0.7, "sign": ["miwae", "bb_trick1", "none"], "hinge": "batch_sum", "reduction": "mean",
    "order": "per_epoch", "eps": 0.02, "ce_on_subsets": False, "fusion_mode": ["sum", "weight"],
    "removal": ["zero_feature", "drop_part"],
}


def test_every_option_changes_the_step(tmp_path):
    """Each declared option, set to each non-default value, changes the loss or a gradient of
    one step on the same batch and RNG state.

    Wrong variants caught: an option read but not passed on (e.g. ``eps``, ``hinge`` or
    ``reduction`` dropped from the call to ``cml_loss``); ``removal`` resolved to ``auto`` and
    ignored; ``fusion_mode`` not reaching ``build_fusion``."""
    assert set(NON_DEFAULT) == set(OPTIONS)
    base = step_trainer(tmp_path / "base", n_modalities=3)
    batch = first_batch(base)
    state = base.model.state_dict()
    loss0, g0 = step(base, batch)
    for key, values in NON_DEFAULT.items():
        for value in values if isinstance(values, list) else [values]:
            if key == "removal" and value == "zero_feature":
                t = step_trainer(tmp_path / f"{key}-{value}", n_modalities=3, fusion_mode="sum", removal=value)
                ref = step_trainer(tmp_path / f"{key}-{value}-ref", n_modalities=3, fusion_mode="sum")
                ref_loss, ref_g = step(ref, batch)
            else:
                with pytest.warns(UserWarning) if value == "weight" else contextlib.nullcontext():
                    t = step_trainer(tmp_path / f"{key}-{value}", n_modalities=3, **{key: value})
                ref_loss, ref_g = loss0, g0
            if key not in ("fusion_mode", "removal") or value == "drop_part":
                t.model.load_state_dict(state)  # same head as the base: same start
            loss, g = step(t, batch)
            differs = not torch.equal(loss, ref_loss) or g.keys() != ref_g.keys() or any(
                not torch.equal(g[n], ref_g[n]) for n in g)
            assert differs, f"{key}={value} changed nothing in the step"


def test_bf16_autocast_step_is_fp32_and_finite(tmp_path):
    t = step_trainer(tmp_path, amp="bf16")
    batch = first_batch(t)
    with t.autocast():
        feats = t.model.encode(batch)
        keep = chain_masks(removal_positions(len(batch["label"]), 2))
        chain = t.method.chain_logits(feats, keep)
    assert feats["m1"].dtype == torch.bfloat16 and chain.dtype == torch.float32
    loss, grads = step(t, batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_predict_reports_each_modality_alone_through_the_fused_head(tmp_path):
    """Wrong variant caught: modality m reported from another modality's single set."""
    t = step_trainer(tmp_path, n_modalities=3)
    batch = first_batch(t)
    t.model.eval()
    pred = t.method.predict(batch)
    feats = t.model.encode(batch)
    torch.testing.assert_close(pred.fused, t.model.fuse(feats))
    assert t.method.per_modality_source() == "method"
    for j, m in enumerate(t.model.modalities):
        alone = {k: (f if i == j else torch.zeros_like(f)) for i, (k, f) in enumerate(feats.items())}
        torch.testing.assert_close(pred.per_modality[m], t.model.fuse(alone))


# ---- runs --------------------------------------------------------------------------------------
def test_synthetic_run_records_diagnostics(fast):
    res = run("cml", "synthetic", {**fast, **SYN})
    rec = res.record
    assert rec["header"]["method_label"] == "CML"
    info = rec["header"]["method_info"]
    assert info["per_modality"] == "method" and not info["trains_unimodal_heads"]
    assert info["removal"] == "zero_feature" and "CPM" in info["sign"]
    for e in rec["epochs"]:
        d = e["diagnostics"]
        assert {"conf_rise", "penalised", "cml_reg", "cml_ce"} <= set(d)
        assert 0.0 <= d["penalised"] <= d["conf_rise"] <= 1.0
        assert {"m1", "m2"} <= set(e["test"])


def test_three_modalities_and_balancebenchmark_settings_run(fast):
    rec = run("cml", "synthetic", {**fast, **SYN, "epochs": 1, "n_modalities": 3, "sign": "none",
                                   "hinge": "batch_sum", "order": "per_epoch"}).record
    assert rec["header"]["method_label"] == "CML (sign none, batch-sum hinge, order per epoch)"
    assert {"m1", "m2", "m3"} <= set(rec["epochs"][0]["test"])


def test_mfeat_trains_well_above_chance(fast, shared_data):
    """Ten classes (chance 10 %): five epochs on mfeat zer+mor reach well above it."""
    res = run("cml", "mfeat", {**fast, "modalities": ["zer", "mor"], "epochs": 5,
                               "data_root": str(shared_data)})
    assert res.final["best_val"]["test"]["fused"]["acc"] > 60.0


def test_avdigits_two_short_epochs(fast, shared_data):
    rec = run("cml", "avdigits", {**fast, "epochs": 2, "limit_train_batches": 4, "limit_eval_batches": 2,
                                  "data_root": str(shared_data)}).record
    assert len(rec["epochs"]) == 2 and "conf_rise" in rec["epochs"][1]["diagnostics"]


@pytest.mark.parametrize("extra", [{}, {"order": "per_epoch", "sign": "miwae"}])
def test_resume_is_identical(tmp_path, monkeypatch, extra):
    """Wrong variant caught: the per-epoch order drawn once at fit start (a resumed process
    draws another one)."""
    assert_resume_identical("cml", "synthetic", {**SYN, "progress": "off", "device": "cpu", **extra},
                            tmp_path, monkeypatch)


@pytest.mark.gpu
def test_cuda_bf16_cell(tmp_path):
    r = run("cml", "synthetic", {"n_train": 600, "n_test": 200, "epochs": 2, "progress": "off",
                                 "device": "cuda", "records": str(tmp_path), "n_modalities": 3})
    assert r.record["header"]["amp"] == "bfloat16"
    assert r.final["last"]["test"]["fused"]["acc"] > 20.0
    assert r.record["epochs"][-1]["diagnostics"]["conf_rise"] >= 0.0


# ---- labels, refusals --------------------------------------------------------------------------
def test_labels():
    def label(**o):
        cfg, _, cls = resolve_config("cml", "synthetic", o)
        return cls(cfg).label()

    assert label() == "CML"
    assert label(fusion_mode="sum") == "CML (sum fusion)"  # drop_part is sum's default removal
    assert label(lam=0.5, eps=0.1, reduction="mean") == "CML (lam=0.5, mean over samples, eps=0.1)"
    assert label(fusion_mode="sum", removal="zero_feature") == "CML (sum fusion, zero feature)"
    assert label(ce_on_subsets=False, removal="drop_part") == "CML (fused CE only, drop part)"


def test_one_modality_refused(fast):
    with pytest.raises(UnsupportedError, match=r"Method 'cml'.*at least 2"):
        make_trainer("cml", "synthetic", {**fast, **SYN, "modalities": ["m1"]}).check()


def test_weight_fusion_drop_part_refused_and_weight_warned(fast, tmp_path):
    with pytest.raises(UnsupportedError, match=r"Method 'cml'.*drop_part.*no additive parts"):
        make_trainer("cml", "synthetic", {**fast, **SYN, "fusion_mode": "weight", "removal": "drop_part"})
    with pytest.warns(UserWarning, match="coordinate weights"):
        step_trainer(tmp_path, fusion_mode="weight")


def test_bad_option_values_refused(fast):
    for bad in ({"lam": -0.1}, {"eps": -1.0}, {"sign": "both"}, {"order": "per_batch"}):
        with pytest.raises(ConfigError):
            make_trainer("cml", "synthetic", {**fast, **SYN, **bad})


def test_pure_functions_refuse_unknown_rules():
    with pytest.raises(ValueError, match="sign"):
        link_weights(PRED_BIG, PRED_SMALL, Y4, "trick3")
    with pytest.raises(ValueError, match="hinge"):
        calibration_penalty(CONF, PRED, Y5, hinge="batch")
    with pytest.raises(ValueError, match="removal"):
        subset_logits(nn.Identity(), {"a": torch.zeros(1, 1)}, torch.ones(1, 1, dtype=torch.bool), "blank")
