"""OPM method plugin: drop rates, mask and rescale by hand, the modulated step, runs.

Each test that catches a wrong variant of the rule names the variant in its docstring.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from method_checks import assert_resume_identical
from mmbalance.methods.opm import (
    drop_mask,
    drop_probabilities,
    kept_rows_loss,
    modulate_features,
    rescale_factors,
)

from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.runner import make_trainer, resolve_config, run
from mmbalance.trainer import to_device

SYN = {"epochs": 2, "n_train": 300, "n_test": 100}
ON = {"warmup_epochs": 0}  # OPM from the first step

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest


# ---- mathematics by hand -----------------------------------------------------------------------
def test_drop_probabilities_by_hand():
    """Wrong variants caught: ``tanh(relu(ratio))`` without the ``- 1`` (both modalities get a
    rate); the rate given to the weaker modality (the inverted ratio); ``lam`` or ``q_base``
    misplaced (``q_base + lam r``); no clip at 1."""
    # s = (3, 1.5): r_1 = tanh(1) = 0.7615941560, q_1 = 0.5 (1 + 0.5 r_1) = 0.6903985390, q_2 = 0
    q = drop_probabilities(torch.tensor([3.0, 1.5]), 0.5, 0.5)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q, torch.tensor([0.6903985390, 0.0]))
    # s = (1, 4): r_2 = tanh(3) = 0.9950547537, q_2 = 0.7487636884
    torch.testing.assert_close(drop_probabilities(torch.tensor([1.0, 4.0]), 0.5, 0.5),
                               torch.tensor([0.0, 0.7487636884]))
    # q_base 0.4, lam 1: q = 0.4 (1 + tanh(1)) = 0.7046376624
    torch.testing.assert_close(drop_probabilities(torch.tensor([3.0, 1.5]), 0.4, 1.0),
                               torch.tensor([0.7046376624, 0.0]))
    # an exact tie: nobody dominates, both 0 (the jump to q_base needs s_1 > s_2)
    assert drop_probabilities(torch.tensor([2.0, 2.0]), 0.5, 0.5).tolist() == [0.0, 0.0]
    # q_base 0.9, lam 1, s = (10, 1): 0.9 (1 + tanh(9)) = 1.8 is clipped to 1
    assert drop_probabilities(torch.tensor([10.0, 1.0]), 0.9, 1.0).tolist() == [1.0, 0.0]


def test_drop_probabilities_three_modalities_compare_with_the_sum_of_the_others():
    """Wrong variant caught: the pairwise rule for M >= 3 (each score against the largest other
    one), which gives two modalities a rate for s = (2, 1, 2) -- or none, by the tie -- and
    r_1 = tanh(5/2 - 1) instead of tanh(5/3 - 1) for s = (5, 1, 2)."""
    # s = (5, 1, 2): r_1 = tanh(5/3 - 1) = 0.5827829453, q_1 = 0.6456957363
    torch.testing.assert_close(drop_probabilities(torch.tensor([5.0, 1.0, 2.0]), 0.5, 0.5),
                               torch.tensor([0.6456957363, 0.0, 0.0]))
    # s = (4, 1, 4): 4 < 1 + 4, nobody exceeds the rest
    assert drop_probabilities(torch.tensor([4.0, 1.0, 4.0]), 0.5, 0.5).tolist() == [0.0, 0.0, 0.0]


def test_rescale_factors_by_hand():
    """Wrong variants caught: theta as the plain mean of q (dimensions ignored); the global
    factor on the dropped modality only; 1 - theta not inverted; per_modality using theta."""
    q = torch.tensor([0.6, 0.0])
    # dims (8, 24): theta = 8 * 0.6 / 32 = 0.15, factor 1 / 0.85 = 1.1764705882 for both
    torch.testing.assert_close(rescale_factors(q, [8, 24], "global"), torch.tensor([1.1764705882, 1.1764705882]))
    # equal dims: theta = q/2 = 0.3, factor 1/0.7
    torch.testing.assert_close(rescale_factors(q, [512, 512], "global"), torch.full((2,), 1 / 0.7))
    torch.testing.assert_close(rescale_factors(q, [8, 24], "per_modality"), torch.tensor([2.5, 1.0]))
    assert rescale_factors(q, [8, 24], "none").tolist() == [1.0, 1.0]
    # a rate of 1 keeps nothing: factor 0, never inf
    assert rescale_factors(torch.tensor([1.0, 0.0]), [4, 4], "per_modality").tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="rescale"):
        rescale_factors(q, [8, 24], "inverted")


def test_drop_mask_by_hand():
    """Wrong variants caught: a rate q_m dropping with probability 1 - q_m (``u < 1 - q``); one
    draw per modality for the whole batch; the mask applied when the batch is not executed."""
    q = torch.tensor([0.5, 0.0])
    u = torch.tensor([[0.4, 0.99], [0.6, 0.0], [0.5, 0.2], [0.1, 0.7]])
    keep = drop_mask(q, u, torch.tensor(True))  # dropped where u >= 1 - q = 0.5; never for q = 0
    assert keep.tolist() == [[1.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0]]
    assert drop_mask(q, u, torch.tensor(False)).tolist() == [[1.0, 1.0]] * 4


def test_modulate_features_and_kept_rows_loss_by_hand():
    """Wrong variants caught: the rescale applied where the batch was not executed; rows that lost
    every modality kept in the mean (the official loop removes them, labels too)."""
    feats = {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([[5.0], [6.0]])}
    keep = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    factors = torch.tensor([1.25, 1.25])
    out = modulate_features(feats, keep, factors, torch.tensor(True))
    assert out["a"].tolist() == [[0.0, 0.0], [3.75, 5.0]] and out["b"].tolist() == [[6.25], [7.5]]
    same = modulate_features(feats, torch.ones(2, 2), factors, torch.tensor(False))
    assert all(torch.equal(same[m], feats[m]) for m in feats)
    bf = modulate_features({m: z.bfloat16() for m, z in feats.items()}, keep, factors, torch.tensor(True))
    assert bf["a"].dtype == torch.bfloat16
    # rows 0 and 2 kept, row 1 lost everything: CE of (0, ln 3) at y = 1 is ln(1 + 1/3), of
    # (ln 4, 0) at y = 0 is ln(1 + 1/4); the mean of those two, row 1 ignored
    logits = torch.tensor([[0.0, math.log(3.0)], [50.0, -50.0], [math.log(4.0), 0.0]])
    y = torch.tensor([1, 1, 0])
    rows = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    expected = (math.log(4 / 3) + math.log(5 / 4)) / 2
    assert kept_rows_loss(logits, y, rows).item() == pytest.approx(expected, rel=1e-6)
    assert kept_rows_loss(logits, y, torch.zeros(3, 2)).item() == 0.0  # nothing left: no update


# ---- the modulated step ------------------------------------------------------------------------
def step_trainer(tmp_path, **overrides):
    t = make_trainer("opm", "synthetic", {**SYN, "records": str(tmp_path / "runs"), "progress": "off",
                                          "device": "cpu", **overrides})
    t.setup()
    t.method.on_fit_start()
    return t


def one_step(t, epoch=0, seed=5):
    method, model = t.method, t.model
    method.epoch = epoch
    method.on_train_epoch_start(epoch)
    model.train()
    t._step_logs = {}
    batch = to_device(next(iter(t.loader(t.splits.train, train=False))), t.device)
    torch.manual_seed(seed)
    loss = method.training_step(batch, 0)
    return loss, batch


def hand_loss(t, batch, seed, active, q_base=0.5, lam=0.5, p_exe=0.7, rescale="global"):
    """The step's loss written out from the head's weights: scores from the concat parts with
    b/2, q by the rule, the two draws replayed, mask, rescale, fused CE on the kept rows."""
    model = t.model
    fc = model.fusion.fc
    with torch.no_grad():
        feats = model.encode(batch)
        z1, z2 = feats["m1"], feats["m2"]
        d1 = z1.shape[1]
        p1 = z1 @ fc.weight[:, :d1].t() + fc.bias / 2
        p2 = z2 @ fc.weight[:, d1:].t() + fc.bias / 2
        y = batch["label"]
        s1 = torch.softmax(p1, 1)[torch.arange(len(y)), y].sum()
        s2 = torch.softmax(p2, 1)[torch.arange(len(y)), y].sum()
        r1, r2 = math.tanh(max(s1.item() / s2.item() - 1, 0)), math.tanh(max(s2.item() / s1.item() - 1, 0))
        q = [q_base * (1 + lam * r1) if r1 > 0 else 0.0, q_base * (1 + lam * r2) if r2 > 0 else 0.0]
    torch.manual_seed(seed)
    executed = active and torch.rand(()).item() < p_exe
    if not active:
        torch.rand(())
    u = torch.rand(len(y), 2)
    keep = [(u[:, j] < 1 - q[j]).float() if executed else torch.ones(len(y)) for j in range(2)]
    theta = (d1 * q[0] + z2.shape[1] * q[1]) / (d1 + z2.shape[1])
    scale = {"global": [1 / (1 - theta)] * 2, "per_modality": [1 / (1 - q[0]), 1 / (1 - q[1])],
             "none": [1.0, 1.0]}[rescale] if executed else [1.0, 1.0]
    f1 = z1 * (keep[0] * scale[0]).unsqueeze(1)
    f2 = z2 * (keep[1] * scale[1]).unsqueeze(1)
    logits = torch.cat([f1, f2], 1) @ fc.weight.t() + fc.bias
    return F.cross_entropy(logits, y), q, executed, keep


@pytest.mark.parametrize("rescale", ["global", "per_modality", "none"])
def test_step_loss_by_hand(tmp_path, rescale):
    """Wrong variants caught: the scores from the unimodal heads or with the whole bias b; the
    global factor on the dominant modality only; the rescale option never reaching the step;
    the unimodal CEs added to the loss; the features detached before the fused head."""
    t = step_trainer(tmp_path, rescale=rescale, p_exe=1.0, **ON)
    loss, batch = one_step(t)
    expected, q, executed, keep = hand_loss(t, batch, 5, True, p_exe=1.0, rescale=rescale)
    assert executed and max(q) > 0.5 and min(q) == 0.0
    assert 0 < sum(float(k.sum()) for k in keep) < 2 * len(batch["label"])  # something was dropped
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack([t._step_logs["q_m1"][-1], t._step_logs["q_m2"][-1]]),
                               torch.tensor(q, dtype=torch.float32))
    loss.backward()  # gradient reaches both encoders through the modulated features
    assert all(p.grad is not None for p in t.model.encoder_params("m1") + t.model.encoder_params("m2"))


def test_the_rescale_choices_give_other_losses(tmp_path):
    losses = {}
    for rescale in ("global", "per_modality", "none"):
        t = step_trainer(tmp_path / rescale, rescale=rescale, p_exe=1.0, **ON)
        losses[rescale] = one_step(t)[0].item()
    assert len(set(losses.values())) == 3, losses


@pytest.mark.parametrize(("epoch", "active"), [(0, False), (1, False), (2, True), (3, True)])
def test_warmup_is_zero_based_and_exclusive(tmp_path, epoch, active):
    """``warmup_epochs = 2``: epochs 0 and 1 are plain fused training, OPM acts from epoch 2
    (official: ``warm_up = 1 if epoch <= 5`` for 6 epochs).

    Wrong variant caught: the warm-up one epoch too long (``epoch > warmup``) or too short."""
    t = step_trainer(tmp_path, warmup_epochs=2, p_exe=1.0)
    loss, batch = one_step(t, epoch)
    expected, _, executed, _ = hand_loss(t, batch, 5, active, p_exe=1.0)
    assert executed == active
    assert t._step_logs["executed"][-1].item() == float(active)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    if not active:  # exactly the plain fused CE
        with torch.no_grad():
            plain = F.cross_entropy(t.model.fuse(t.model.encode(batch)), batch["label"])
        torch.testing.assert_close(loss, plain)


def test_execution_rate_follows_p_exe(fast):
    """Wrong variant caught: the batch modulated with probability 1 - p_exe (``u >= p_exe``)."""
    res = run("opm", "synthetic", {**fast, **ON, "epochs": 1, "n_train": 1600, "batch_size": 16, "dim": 8,
                                   "embed_dim": 8, "p_exe": 0.8})
    rows = [json.loads(x) for x in (res.run_dir / "diagnostics" / "epoch_0000.jsonl").read_text().splitlines()]
    rate = sum(r["executed"] for r in rows) / len(rows)
    assert len(rows) >= 80 and 0.68 < rate < 0.92, (len(rows), rate)
    for r in rows:
        assert (r["dropped"] > 0) <= (r["executed"] == 1.0)  # nothing is dropped in a skipped batch
        assert min(r["q_m1"], r["q_m2"]) == 0.0  # only the dominant modality has a rate


def test_bf16_autocast_scores_stay_fp32(tmp_path):
    t = step_trainer(tmp_path, amp="bf16", **ON)
    batch = to_device(next(iter(t.loader(t.splits.train, train=False))), t.device)
    with t.autocast():
        feats = t.model.encode(batch)
        s = t.method.scores(feats, batch["label"])
        loss = t.method.training_step(batch, 0)
    assert feats["m1"].dtype == torch.bfloat16 and s.dtype == torch.float32
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_predict_is_the_plain_fused_head(tmp_path):
    """Wrong variant caught: the drop (or its rescale) applied at evaluation; the official
    evaluation runs the fused head on every feature."""
    t = step_trainer(tmp_path, p_exe=1.0, **ON)
    t.model.eval()
    batch = to_device(next(iter(t.loader(t.splits.test, train=False))), t.device)
    with torch.no_grad():
        pred = t.method.predict(batch)
        feats = t.model.encode(batch)
        assert torch.equal(pred.fused, t.model.fuse(feats))
        assert set(pred.per_modality) == {"m1", "m2"}


# ---- runs --------------------------------------------------------------------------------------
def test_three_modalities_drop_at_most_one(fast):
    res = run("opm", "synthetic", {**fast, **SYN, **ON, "epochs": 1, "n_modalities": 3})
    rows = [json.loads(x) for x in (res.run_dir / "diagnostics" / "epoch_0000.jsonl").read_text().splitlines()]
    assert rows and all(sum(r[f"q_m{i}"] > 0 for i in (1, 2, 3)) <= 1 for r in rows)


def test_sum_fusion_runs_and_is_labelled(fast):
    rec = run("opm", "synthetic", {**fast, **SYN, **ON, "epochs": 1, "fusion_mode": "sum"}).record
    assert rec["header"]["method_label"] == "OPM (sum fusion, warm-up 0)"
    assert "dropped" in rec["epochs"][0]["diagnostics"]


def test_resume_is_identical(tmp_path, monkeypatch):
    assert_resume_identical("opm", "synthetic", {**SYN, **ON, "epochs": 3, "progress": "off", "device": "cpu"},
                            tmp_path, monkeypatch)


def test_mfeat_trains_well_above_chance(fast, shared_data):
    """Real data: mfeat zer+mor (10 classes, chance 10 %), OPM from epoch 1."""
    res = run("opm", "mfeat", {**fast, "modalities": ["zer", "mor"], "epochs": 6, "warmup_epochs": 1})
    assert res.final["best_val"]["test"]["fused"]["acc"] > 60.0
    assert res.record["epochs"][0]["diagnostics"]["executed"] == 0.0
    assert res.record["epochs"][-1]["diagnostics"]["executed"] > 0.3


def test_avdigits_two_epochs(fast, shared_data):
    rec = run("opm", "avdigits", {**fast, "epochs": 2, "warmup_epochs": 1, "limit_train_batches": 4,
                                  "limit_eval_batches": 2}).record
    assert {"q_audio", "q_image", "executed", "dropped"} <= set(rec["epochs"][1]["diagnostics"])


# ---- labels, refusals --------------------------------------------------------------------------
def test_labels():
    def label(**o):
        cfg, _, cls = resolve_config("opm", "synthetic", o)
        return cls(cfg).label()

    assert label() == "OPM"
    assert label(q_base=0.4, rescale="per_modality") == "OPM (q_base=0.4, per-modality rescale)"
    assert label(lam=1.0, p_exe=1.0, warmup_epochs=0) == "OPM (lam=1, p_exe=1, warm-up 0)"


def test_weight_fusion_refused(fast):
    with pytest.raises(UnsupportedError, match=r"Method 'opm'.*'weight' fusion.*do not split by modality"):
        make_trainer("opm", "synthetic", {**fast, **SYN, "fusion_mode": "weight"})


def test_one_modality_refused(fast):
    with pytest.raises(UnsupportedError, match=r"Method 'opm'.*at least 2"):
        make_trainer("opm", "synthetic", {**fast, **SYN, "n_modalities": 1}).check()


def test_bad_option_values_refused(fast):
    for key, value in (("q_base", 1.5), ("p_exe", -0.1), ("lam", -1.0), ("rescale", "inverted")):
        with pytest.raises(ConfigError, match=key):
            make_trainer("opm", "synthetic", {**fast, **SYN, key: value})


@pytest.mark.gpu
def test_cell_runs_on_cuda_with_bf16(tmp_path):
    r = run("opm", "synthetic", {**SYN, **ON, "device": "cuda", "progress": "off", "records": str(tmp_path)})
    assert r.record["header"]["amp"] == "bfloat16"
    assert r.record["epochs"][-1]["diagnostics"]["executed"] > 0
    assert r.final["last"]["test"]["fused"]["acc"] > 20.0
