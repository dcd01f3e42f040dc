"""MBSD method plugin: both variants' pair terms by hand, their gradients (what is detached),
the pair averaging for three modalities, the step against the hand-written loss, every option
reaching the step, resume, real data, refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from method_checks import assert_resume_identical
from mmbalance.methods.mbsd import MBSD, bb_pair, distill_pair, mbsd_loss, mbsd_terms

from mmbalance.errors import MMBalanceError, UnsupportedError
from mmbalance.runner import make_trainer, run
from mmbalance.trainer import to_device

SMALL = {"epochs": 2, "n_train": 300, "n_test": 100, "dim": 16, "embed_dim": 16, "checkpoint": False}
LN3, LN4, LN15 = math.log(3.0), math.log(4.0), math.log(1.5)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest

# Hand example, two classes, y = 0 for every sample:
#   sample 0: z_a = (ln 3, 0) -> p_a = (3/4, 1/4), right; z_b = (0, ln 1.5) -> p_b = (2/5, 3/5),
#             wrong. a is stronger: g = 3/4 - 2/5 = 0.35, KL(p_a || p_b) = 3/4 ln(15/8) + 1/4 ln(5/12).
#   sample 1: z_a = (0, ln 1.5) -> (2/5, 3/5), wrong; z_b = (ln 4, 0) -> p_b = (4/5, 1/5), right.
#             b is stronger: g = 0.4, KL(p_b || p_a) = 4/5 ln 2 + 1/5 ln(1/3).
#   sample 2: z_a = (0, ln 3), z_b = (0, ln 4): both wrong, so g = 0 although q_a = 1/4 != q_b = 1/5.
# Exactly one side is right in samples 0 and 1, so "both right" would weigh nothing.
ZA = torch.tensor([[LN3, 0.0], [0.0, LN15], [0.0, LN3]])
ZB = torch.tensor([[0.0, LN15], [LN4, 0.0], [0.0, LN4]])
Y = torch.tensor([0, 0, 0])
G = torch.tensor([0.35, 0.4, 0.0])
KL0 = 0.75 * math.log(0.75 / 0.4) + 0.25 * math.log(0.25 / 0.6)
KL1 = 0.8 * math.log(2.0) + 0.2 * math.log(1.0 / 3.0)
RS = torch.tensor([(LN3**2 + LN15**2) / 2, (LN4**2 + LN15**2) / 2, (LN3 - LN4) ** 2 / 2])  # mean over C = 2


# ---- the distill variant by hand ---------------------------------------------------------------
def test_distill_pair_by_hand():
    """Wrong variants caught here: KL in the other direction (weak || strong); the weaker modality
    as the teacher; the weight only where BOTH are right; the weight on samples where neither
    is right; the alignment on probabilities."""
    kd, rs, g, a_strong = distill_pair(ZA, ZB, Y)
    torch.testing.assert_close(g, G)
    assert a_strong.tolist() == [True, False, True]
    assert kd.item() == pytest.approx((0.35 * KL0 + 0.4 * KL1) / 3, rel=1e-6)
    assert rs.item() == pytest.approx((0.35 * RS[0] + 0.4 * RS[1]).item() / 3, rel=1e-6)
    assert kd.dtype == rs.dtype == torch.float32
    kd16, rs16, *_ = distill_pair(ZA.bfloat16(), ZB.bfloat16(), Y)
    assert kd16.dtype == torch.float32 and rs16.dtype == torch.float32


def test_distill_detaches_the_teacher_and_the_weight():
    """The KD gradient reaches only the weaker side, through KL alone: on sample 0 (a teaches)
    d KD / d z_a = 0 and d KD / d z_b = g (p_b - p_a) / B. Wrong variants caught here: the teacher
    not detached; the weight g not detached (it would add a gradient through q_a, q_b)."""
    za, zb = ZA[:1].clone().requires_grad_(), ZB[:1].clone().requires_grad_()
    kd, *_ = distill_pair(za, zb, Y[:1])
    kd.backward()
    torch.testing.assert_close(za.grad, torch.zeros(1, 2))
    torch.testing.assert_close(zb.grad, 0.35 * torch.tensor([[0.4 - 0.75, 0.6 - 0.25]]))


def test_distill_alignment_pulls_both_sides():
    """RS = g (1/C) ||z_a - z_b||^2 with g detached: d RS / d z_a = 2 g (z_a - z_b) / C, and the
    opposite for z_b (no stop-gradient on either side)."""
    za, zb = ZA[:1].clone().requires_grad_(), ZB[:1].clone().requires_grad_()
    _, rs, *_ = distill_pair(za, zb, Y[:1])
    rs.backward()
    expected = 2 * 0.35 * (ZA[:1] - ZB[:1]) / 2
    torch.testing.assert_close(za.grad, expected)
    torch.testing.assert_close(zb.grad, -expected)


# ---- the BalanceBenchmark variant by hand ------------------------------------------------------
def test_bb_pair_by_hand():
    """s = max(q_a, q_b), w = min: KDb_i = gap_i * w_i (ln w_i - s_i), RS on logits / C.
    Wrong variant caught here: the bb term 'fixed' into a real KL, or log w replaced by w."""
    kd, rs, gap, _ = bb_pair(ZA, ZB, Y, rs_on_probs=False)
    torch.testing.assert_close(gap, G)
    k0 = 0.4 * (math.log(0.4) - 0.75)
    k1 = 0.4 * (math.log(0.4) - 0.8)
    assert kd.item() == pytest.approx((0.35 * k0 + 0.4 * k1) / 3, rel=1e-6)
    assert kd.item() < 0  # never a divergence: always <= 0
    assert rs.item() == pytest.approx((0.35 * RS[0] + 0.4 * RS[1]).item() / 3, rel=1e-6)
    # torch's kl_div given the probability s where a log-probability belongs computes the same
    ref = F.kl_div(torch.tensor([0.75, 0.8]), torch.tensor([0.4, 0.4]), reduction="none")
    torch.testing.assert_close(ref, torch.tensor([k0, k1]))


def test_bb_pair_keeps_the_weight_in_the_graph():
    """BalanceBenchmark writes gap, s and w into fresh tensors element by element, which keeps
    them in the graph: the strong side gets a KD gradient too. Sample 0 (a strong):
    KDb = (q_a - q_b) q_b (ln q_b - q_a), d/dq_a = q_b(ln q_b - q_a) - (q_a - q_b) q_b.
    Wrong variant caught here: the bb weight detached like distill's."""
    za, zb = ZA[:1].clone().requires_grad_(), ZB[:1].clone().requires_grad_()
    kd, *_ = bb_pair(za, zb, Y[:1], rs_on_probs=False)
    kd.backward()
    qa, qb = 0.75, 0.4
    dq_a = qb * (math.log(qb) - qa) - (qa - qb) * qb
    dqa_dz = torch.tensor([[qa * (1 - qa), -qa * (1 - qa)]])  # softmax Jacobian row of class 0
    torch.testing.assert_close(za.grad, dq_a * dqa_dz)


def test_bb_zero_probability_gives_a_finite_gradient():
    """A true-class probability that underflows to 0 (the clamp of log w at 1e-8): finite value
    and gradient, where kl_div's would be 0/0 = NaN."""
    za = torch.tensor([[-200.0, 0.0]], requires_grad=True)
    zb = torch.tensor([[LN3, 0.0]], requires_grad=True)
    kd, rs, gap, _ = bb_pair(za, zb, torch.tensor([0]), rs_on_probs=False)
    (kd + rs).backward()
    assert torch.isfinite(kd) and torch.isfinite(za.grad).all() and torch.isfinite(zb.grad).all()


def test_three_modalities_average_the_pairs_and_bb_aligns_probabilities():
    """Three modalities: every term is the mean over the pairs (a, b), (a, c), (b, c). distill
    aligns logits for any M; bb aligns probabilities when M = 3 (logits when M = 2). Wrong
    variants caught here: pairs summed instead of averaged; bb aligning logits for three."""
    zc = torch.zeros(3, 2)
    parts = [ZA, ZB, zc]
    pairs = [(ZA, ZB), (ZA, zc), (ZB, zc)]
    t = mbsd_terms(parts, Y, "distill")
    want = [distill_pair(a, b, Y) for a, b in pairs]
    assert t["kd"].item() == pytest.approx(sum(w[0].item() for w in want) / 3)
    assert t["rs"].item() == pytest.approx(sum(w[1].item() for w in want) / 3)
    tb = mbsd_terms(parts, Y, "bb")
    wantb = [bb_pair(a, b, Y, rs_on_probs=True) for a, b in pairs]
    assert tb["rs"].item() == pytest.approx(sum(w[1].item() for w in wantb) / 3)
    # pair (a, b) aligned on probabilities: sample 0 (3/4 - 2/5)^2 * 2 / 2, sample 1 (2/5 - 4/5)^2
    rs_ab = (0.35 * 0.35**2 + 0.4 * 0.4**2) / 3
    assert wantb[0][1].item() == pytest.approx(rs_ab, rel=1e-6)
    two = mbsd_terms([ZA, ZB], Y, "bb")
    assert two["rs"].item() == pytest.approx(bb_pair(ZA, ZB, Y, rs_on_probs=False)[1].item())


def test_teacher_shares_by_hand():
    """Of the two weighted samples a teaches one and b one; sample 2 has no weight."""
    t = mbsd_terms([ZA, ZB], Y, "distill")
    assert [s.item() for s in t["teacher"]] == pytest.approx([1 / 3, 1 / 3])
    assert t["gap"].item() == pytest.approx(0.75 / 3)


@pytest.mark.parametrize("variant", ["distill", "bb"])
def test_teacher_shares_name_the_stronger_modality(variant):
    """Sample 0 twice (a right and stronger: a teaches) and sample 2 (no weight): a teaches in 2
    of its 3 slots, b in none. Wrong variant caught: the shares swapped (the weaker modality
    reported as the teacher), which the symmetric example above cannot tell."""
    idx = torch.tensor([0, 0, 2])
    t = mbsd_terms([ZA[idx], ZB[idx]], Y[idx], variant)
    assert [s.item() for s in t["teacher"]] == pytest.approx([2 / 3, 0.0])


def test_mbsd_loss_by_hand():
    fused = torch.zeros(3, 2)
    loss, terms = mbsd_loss(fused, [ZA, ZB], Y, "distill", kd_weight=2.0, rs_weight=0.5)
    ce = F.cross_entropy(fused, Y) + F.cross_entropy(ZA, Y) + F.cross_entropy(ZB, Y)
    torch.testing.assert_close(loss, ce + 2.0 * terms["kd"] + 0.5 * terms["rs"])


# ---- the step ----------------------------------------------------------------------------------
def setup_trainer(tmp_path, **overrides):
    cfg = {**SMALL, "records": str(tmp_path / "runs"), "progress": "off", "device": "cpu", **overrides}
    trainer = make_trainer("mbsd", "synthetic", cfg)
    trainer.setup()
    trainer.model.train()
    trainer._step_logs = {}
    return trainer


def first_batch(trainer):
    return to_device(next(iter(trainer.loader(trainer.splits.train, train=False))), trainer.device)


def hand_step_loss(model, batch, variant="distill", kd=1.0, rs=1.0):
    """The step written out: concat head blocks W_m e_m + b/2 as the parts, fused = W [e1; e2] + b."""
    w, b = model.fusion.fc.weight, model.fusion.fc.bias
    e1, e2 = model.encoders["m1"](batch["m1"]), model.encoders["m2"](batch["m2"])
    d1 = e1.shape[1]
    z1, z2 = e1 @ w[:, :d1].t() + b / 2, e2 @ w[:, d1:].t() + b / 2
    fused = torch.cat([e1, e2], 1) @ w.t() + b
    y = batch["label"]
    pair = distill_pair if variant == "distill" else (lambda a, c, yy: bb_pair(a, c, yy, rs_on_probs=False))
    k, r, *_ = pair(z1, z2, y)
    return F.cross_entropy(fused, y) + F.cross_entropy(z1, y) + F.cross_entropy(z2, y) + kd * k + rs * r


@pytest.mark.parametrize("variant", ["distill", "bb"])
def test_step_equals_the_hand_written_loss_and_gradients(tmp_path, variant):
    """Wrong variant caught here: the unimodal CEs on the model's separate unimodal heads instead
    of the fused head's parts (the heads would get gradients, the losses would differ)."""
    t = setup_trainer(tmp_path, mbsd_variant=variant, mbsd_kd_weight=1.5, mbsd_rs_weight=0.5)
    model = t.model
    batch = first_batch(t)
    loss = t.method.training_step(batch, 0)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    ref = hand_step_loss(model, batch, variant, 1.5, 0.5)
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(loss, ref)
    assert got.keys() == want.keys()
    assert not any(n.startswith("uni_heads") for n in got)
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)
    logs = t._step_logs
    assert {"kd", "rs", "gap", "teacher_m1", "teacher_m2"} <= set(logs)


@pytest.mark.parametrize("key,value", [("mbsd_variant", "bb"), ("mbsd_kd_weight", 0.3), ("mbsd_rs_weight", 2.0)])
def test_every_option_reaches_the_step(tmp_path, key, value):
    """Each declared option changes the step's loss and gradients (an option that never reaches
    the step is a wrong variant)."""
    assert key in MBSD.options
    out = []
    for opts in ({}, {key: value}):
        t = setup_trainer(tmp_path / str(len(out)), **opts)
        loss = t.method.training_step(first_batch(t), 0)
        loss.backward()
        enc = torch.cat([p.grad.flatten() for p in t.model.encoder_params("m2")])
        out.append((loss.detach(), enc))
    assert not torch.equal(out[0][0], out[1][0])
    assert not torch.equal(out[0][1], out[1][1])


# ---- runs --------------------------------------------------------------------------------------
def test_synthetic_records_diagnostics_and_label(fast):
    rec = run("mbsd", "synthetic", {**fast, **SMALL}).record
    diag = rec["epochs"][-1]["diagnostics"]
    assert {"kd", "rs", "gap", "teacher_m1", "teacher_m2"} <= set(diag)
    assert diag["kd"] >= 0 and 0 <= diag["gap"] <= 1
    assert rec["header"]["method_label"] == "MBSD"
    assert rec["header"]["method_info"]["per_modality"] == "fused_parts"


def test_resume_is_identical(tmp_path, monkeypatch):
    assert_resume_identical("mbsd", "synthetic", {**SMALL, "epochs": 3, "checkpoint": True, "progress": "off",
                                                  "device": "cpu"}, tmp_path, monkeypatch)


def test_mfeat_trains_well_above_chance(fast, shared_data):
    """Real data: mfeat zer+mor (10 classes, chance 10 %), a few epochs."""
    res = run("mbsd", "mfeat", {**fast, "modalities": ["zer", "mor"], "epochs": 6, "diagnostics": False})
    assert res.record["final"]["selection"]["best_val"]["test"]["fused"]["acc"] > 60.0


@pytest.mark.parametrize("variant", ["distill", "bb"])
def test_three_modalities_run(fast, variant):
    rec = run("mbsd", "synthetic", {**fast, **SMALL, "epochs": 1, "n_modalities": 3, "mbsd_variant": variant}).record
    assert {"teacher_m1", "teacher_m2", "teacher_m3"} <= set(rec["epochs"][-1]["diagnostics"])


def test_labels():
    assert MBSD({}).label() == "MBSD"
    assert MBSD({"mbsd_variant": "bb"}).label() == "MBSD (BB loss)"
    assert MBSD({"mbsd_kd_weight": 0.5, "mbsd_rs_weight": 0.0}).label() == "MBSD (kd=0.5, rs=0)"


def test_refusals(fast):
    with pytest.raises(UnsupportedError, match="two and three modalities"):
        make_trainer("mbsd", "synthetic", {**fast, "n_modalities": 4, "mbsd_variant": "bb"}).check()
    make_trainer("mbsd", "synthetic", {**fast, "n_modalities": 4}).check()  # distill: any M
    with pytest.raises(MMBalanceError, match="at least 2"):
        make_trainer("mbsd", "synthetic", {**fast, "modalities": ["m1"]}).check()
    with pytest.raises(MMBalanceError, match="mbsd_kd_weight"):
        make_trainer("mbsd", "synthetic", {**fast, "mbsd_kd_weight": -1})


@pytest.mark.gpu
def test_cuda_bf16_cell(tmp_path):
    res = run("mbsd", "synthetic", {"epochs": 2, "n_train": 600, "n_test": 200, "device": "cuda",
                                    "records": str(tmp_path), "progress": "off"})
    assert res.record["header"]["amp"] == "bfloat16"
    assert res.record["final"]["selection"]["last"]["test"]["fused"]["acc"] > 20.0
