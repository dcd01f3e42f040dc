"""PMR method plugin: prototypes, EMA rule, PCE and coefficients by hand, the step, runs, resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from method_checks import assert_resume_identical
from mmbalance.methods.pmr import (
    PMR,
    class_sums,
    in_window,
    pce_and_score,
    prototype_logits,
    prototype_pass_batches,
    rebalance_coefficients,
    update_prototypes,
)

from mmbalance.config import assemble
from mmbalance.errors import ConfigError, MMBalanceError, UnsupportedError
from mmbalance.heads import SumHead
from mmbalance.registry import DATASETS, METHODS
from mmbalance.runner import make_trainer, run
from mmbalance.trainer import to_device

SMALL = {"epochs": 2, "n_train": 300, "n_test": 100, "dim": 16, "embed_dim": 16, "checkpoint": False}

# Hand example (2-d features, 2 classes): e = [[0,0],[3,4]], prototypes [[0,0],[3,0]], y = [0,1].
# Distances [[0,3],[5,4]] -> q = [[0,-3],[-5,-4]]; true-class probabilities
# 1/(1+e^-3) = 0.95257 and 1/(1+e^-1) = 0.73106: score 1.6836327054524383,
# PCE = (log(1+e^-3) + log(1+e^-1)) / 2 = 0.1809245195459824.
E = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
P = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
Y = torch.tensor([0, 1])
SCORE = 1.6836327054524383
PCE = 0.1809245195459824


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest


def setup_trainer(tmp_path, **overrides):
    cfg = {**SMALL, "records": str(tmp_path / "runs"), "progress": "off", "device": "cpu", **overrides}
    trainer = make_trainer("pmr", "synthetic", cfg)
    trainer.setup()
    return trainer


def start_epoch(trainer, epoch: int) -> None:
    """What train_epoch does before its first batch."""
    method = trainer.method
    method.epoch = epoch
    method.num_training_batches = len(trainer.loader(trainer.splits.train, train=True))
    trainer._step_logs = {}
    method.on_train_epoch_start(epoch)


def first_batch(trainer):
    return to_device(next(iter(trainer.loader(trainer.splits.train, train=False))), trainer.device)


# ---- pure mathematics --------------------------------------------------------------------
def test_prototypes_by_hand_with_an_absent_and_a_never_seen_class():
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, -1.0]])
    labels = torch.tensor([0, 0, 2])
    sums, counts = class_sums(feats, labels, 4)
    assert torch.equal(sums, torch.tensor([[4.0, 6.0], [0.0, 0.0], [5.0, -1.0], [0.0, 0.0]]))
    assert torch.equal(counts, torch.tensor([2.0, 0.0, 1.0, 0.0]))
    old = torch.tensor([[9.0, 9.0], [7.0, 7.0], [0.0, 0.0], [0.0, 0.0]])
    seen = torch.tensor([True, True, False, False])
    protos, now_seen = update_prototypes(old, seen, sums, counts, epoch=0, momentum=0.0)
    # class 0: mean; class 1 absent: keeps its old prototype; class 2: first time, its mean;
    # class 3 never seen: still no prototype
    assert torch.equal(protos, torch.tensor([[2.0, 3.0], [7.0, 7.0], [5.0, -1.0], [0.0, 0.0]]))
    assert now_seen.tolist() == [True, True, True, False]
    # absent classes also skip the EMA step (epoch 2, mu = 0.5): class 1 stays exactly [7, 7]
    protos2, _ = update_prototypes(old, seen, sums, counts, epoch=2, momentum=0.5)
    assert torch.equal(protos2, torch.tensor([[5.5, 6.0], [7.0, 7.0], [5.0, -1.0], [0.0, 0.0]]))


def test_ema_rule_at_epochs_0_1_2():
    """As the official code: unsmoothed in epochs 0 and 1, (1 - mu) new + mu old from epoch 2 on; a class
    appearing for the first time at epoch 2 takes its mean (there is nothing to smooth with)."""
    old = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    seen = torch.tensor([True, False])
    sums = torch.tensor([[6.0, 10.0], [4.0, 4.0]])  # class means [3, 5] and [4, 4]
    counts = torch.tensor([2.0, 1.0])
    expected = {
        0: [[3.0, 5.0], [4.0, 4.0]],
        1: [[3.0, 5.0], [4.0, 4.0]],
        2: [[2.5, 4.0], [4.0, 4.0]],  # 0.75 * [3, 5] + 0.25 * [1, 1]
    }
    for epoch, want in expected.items():
        protos, now_seen = update_prototypes(old, seen, sums, counts, epoch=epoch, momentum=0.25)
        assert torch.equal(protos, torch.tensor(want)), epoch
        assert now_seen.tolist() == [True, True]
    # mu = 1 keeps the old prototype from epoch 2 on
    assert torch.equal(update_prototypes(old, seen, sums, counts, 2, 1.0)[0][0], torch.tensor([1.0, 1.0]))


def test_prototype_logits_pce_and_score_by_hand():
    q = prototype_logits(E, P)
    torch.testing.assert_close(q, torch.tensor([[0.0, -3.0], [-5.0, -4.0]]))
    pce, score = pce_and_score(q, Y)
    assert pce.item() == pytest.approx(PCE, abs=1e-6)
    assert score.item() == pytest.approx(SCORE, abs=1e-6)
    assert not score.requires_grad
    # the temperature divides the distances: T = 0.5 doubles q
    torch.testing.assert_close(prototype_logits(E, P, temperature=0.5), 2 * q)
    # same as the official definitions written out (softmax sum, mean CE)
    probs = torch.softmax(q, 1)[torch.arange(2), Y]
    assert score.item() == pytest.approx(probs.sum().item(), abs=1e-6)
    assert pce.item() == pytest.approx(F.cross_entropy(q, Y).item(), abs=1e-6)


def test_class_without_prototype_is_masked_out_of_pce_and_score():
    protos = torch.cat([P, torch.tensor([[9.0, 9.0]])])
    seen = torch.tensor([True, True, False])
    feats = torch.cat([E, torch.tensor([[1.0, 1.0]])]).requires_grad_(True)
    labels = torch.tensor([0, 1, 2])  # the third sample's class has no prototype
    q = prototype_logits(feats, protos, seen)
    assert torch.isinf(q[:, 2]).all() and (q[:, 2] < 0).all()
    pce, score = pce_and_score(q, labels, seen[labels])
    assert pce.item() == pytest.approx(PCE, abs=1e-6)  # the two valid samples only
    assert score.item() == pytest.approx(SCORE, abs=1e-6)
    pce.backward()
    assert torch.isfinite(feats.grad).all()
    assert torch.equal(feats.grad[2], torch.zeros(2))
    # no valid sample at all: PCE 0, score 0 (not NaN)
    pce0, score0 = pce_and_score(q, labels, torch.zeros(3, dtype=torch.bool))
    assert pce0.item() == 0.0 and score0.item() == 0.0


def test_rebalance_coefficient_goes_to_the_weaker_modality():
    s_a, s_b = torch.tensor(SCORE), torch.tensor(1.2)  # a is stronger: ratio 1.40 > 1
    c_a, c_b = rebalance_coefficients(s_a, s_b, 2.0)
    assert (c_a.item(), c_b.item()) == (0.0, 2.0)
    c_a, c_b = rebalance_coefficients(s_b, s_a, 2.0)
    assert (c_a.item(), c_b.item()) == (2.0, 0.0)
    c_a, c_b = rebalance_coefficients(s_a, s_a.clone(), 2.0)  # exact tie: none (official)
    assert (c_a.item(), c_b.item()) == (0.0, 0.0)
    # the whole tiny example: b's prototypes are swapped, so b is the weaker modality
    q_a, q_b = prototype_logits(E, P), prototype_logits(E, P.flip(0))
    (pce_a, s_a), (pce_b, s_b) = pce_and_score(q_a, Y), pce_and_score(q_b, Y)
    c_a, c_b = rebalance_coefficients(s_a, s_b, 2.0)
    # b: distances [[3,0],[4,5]]: p = 1/(1+e^3), 1/(1+e^1); PCE = (log(1+e^3) + log(1+e^1)) / 2
    pce_b_hand = (math.log(1 + math.exp(3)) + math.log(1 + math.e)) / 2
    assert pce_b.item() == pytest.approx(pce_b_hand, abs=1e-6)
    extra = c_a * pce_a + c_b * pce_b
    assert extra.item() == pytest.approx(2.0 * pce_b_hand, abs=1e-5)


def test_window_is_inclusive_and_pass_size_follows_the_floor_rule():
    assert [in_window(e, 2, 4) for e in range(6)] == [False, False, True, True, True, False]
    # official: break once sample_count >= len(loader) // 10 (after at least one batch)
    assert all(prototype_pass_batches(n) == max(1, n // 10) for n in range(1, 100_000))
    assert [prototype_pass_batches(n) for n in (1, 9, 10, 19, 20, 105)] == [1, 1, 1, 1, 2, 10]
    # the trainer's iterate(fraction=0.1) count rule, floor(0.1 * n) in floats, agrees
    assert all(max(1, math.floor(0.1 * n)) == max(1, n // 10) for n in range(1, 100_000))


# ---- the plugin on a real trainer --------------------------------------------------------
def test_prototype_pass_uses_floor_of_a_tenth_of_the_batches_in_eval_mode(tmp_path):
    trainer = setup_trainer(tmp_path, n_train=1600, batch_size=16)  # 1440 train -> 90 batches
    method, model = trainer.method, trainer.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    start_epoch(trainer, 0)
    n = method.num_training_batches
    assert n == 90
    assert trainer._step_logs["proto_batches"] == [9.0]  # floor(90 / 10)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the prototypes are the class means of the eval-mode features of exactly those batches
    batches = list(trainer.iterate("train", fraction=0.1, tag="pmr-prototypes"))
    assert len(batches) == 9
    with torch.no_grad():
        model.eval()
        feats = {m: torch.cat([model.encode(b)[m] for b in batches]) for m in method.modalities}
        model.train()
    y = torch.cat([b["label"] for b in batches])
    for m in method.modalities:
        for c in range(10):
            torch.testing.assert_close(method.protos[m][c], feats[m][y == c].mean(0))
    assert method.seen.all()


def test_pass_count_with_limit_train_batches(tmp_path):
    trainer = setup_trainer(tmp_path, limit_train_batches=3)
    trainer.method.epoch = 0
    trainer.method.num_training_batches = 3
    trainer._step_logs = {}
    trainer.method.on_train_epoch_start(0)
    assert trainer._step_logs["proto_batches"] == [1.0]  # floor(3 / 10) = 0 -> at least 1


def test_step_adds_alpha_pce_of_the_weaker_modality_only(tmp_path):
    trainer = setup_trainer(tmp_path, alpha=2.0)
    method, model = trainer.method, trainer.model
    start_epoch(trainer, 0)
    method.protos["m2"] = method.protos["m2"].roll(1, dims=0)  # m2's prototypes point to wrong classes
    batch = first_batch(trainer)
    y = batch["label"]
    model.train()

    def grads():
        return {m: torch.cat([p.grad.flatten() for p in model.encoder_params(m)]) for m in ("m1", "m2")}

    loss = method.training_step(batch, 0)
    loss.backward()
    g_pmr = grads()
    model.zero_grad(set_to_none=True)
    feats = model.encode(batch)
    ce = F.cross_entropy(model.fuse(feats), y)
    ce.backward()
    g_ce = grads()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        f = model.encode(batch)
        q = {m: -(f[m][:, None, :] - method.protos[m][None]).pow(2).sum(-1).sqrt() for m in ("m1", "m2")}
        s = {m: torch.softmax(q[m], 1)[torch.arange(len(y)), y].sum() for m in q}
        pce_m2 = F.cross_entropy(q["m2"], y)
    assert s["m1"] > s["m2"]  # m2 is the weaker one
    assert loss.item() == pytest.approx(ce.item() + 2.0 * pce_m2.item(), rel=1e-5)
    # the PCE reaches only the weaker modality's encoder
    torch.testing.assert_close(g_pmr["m1"], g_ce["m1"])
    assert not torch.allclose(g_pmr["m2"], g_ce["m2"])
    logs = trainer._step_logs
    assert logs["coef_m1"][-1].item() == 0.0 and logs["coef_m2"][-1].item() == 2.0
    assert logs["ratio"][-1].item() == pytest.approx((s["m1"] / s["m2"]).item(), rel=1e-5)
    acc_m2 = (q["m2"].argmax(1) == y).float().mean()
    assert logs["proto_acc_m2"][-1].item() == pytest.approx(acc_m2.item())


def test_outside_the_window_the_loss_is_the_fused_ce(tmp_path):
    trainer = setup_trainer(tmp_path, modulation_start=1, modulation_end=3)
    method, model = trainer.method, trainer.model
    start_epoch(trainer, 0)
    batch = first_batch(trainer)
    loss = method.training_step(batch, 0)
    with torch.no_grad():
        ce = F.cross_entropy(model.fuse(model.encode(batch)), batch["label"])
    assert loss.item() == pytest.approx(ce.item(), rel=1e-6)
    assert trainer._step_logs["coef_m1"][-1].item() == 0.0 == trainer._step_logs["coef_m2"][-1].item()
    method.epoch = 1  # inside: the PCE is added
    assert method.training_step(batch, 0).item() > ce.item()


def test_state_round_trip_and_refusals(tmp_path):
    trainer = setup_trainer(tmp_path, momentum_coef=0.5)
    method = trainer.method
    with pytest.raises(MMBalanceError, match="no class prototypes"):
        method.training_step(first_batch(trainer), 0)
    assert method.state_dict() == {}
    start_epoch(trainer, 0)
    state = method.state_dict()
    other = setup_trainer(tmp_path / "b", momentum_coef=0.5).method
    other.load_state_dict(state)
    for m in ("m1", "m2"):
        assert torch.equal(other.protos[m], method.protos[m])
    assert torch.equal(other.seen, method.seen) and other.updated_epoch == 0
    with pytest.raises(ConfigError, match="prototypes for"):
        other.load_state_dict({**state, "modalities": ["m2", "m1"]})


def test_bad_options_and_three_modalities_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="modulation_end"):
        setup_trainer(tmp_path, modulation_start=5, modulation_end=4)
    with pytest.raises(ConfigError):
        setup_trainer(tmp_path, alpha=-1.0)
    with pytest.raises(ConfigError):
        setup_trainer(tmp_path, momentum_coef=1.5)
    with pytest.raises(ConfigError):
        setup_trainer(tmp_path, proto_fraction=0.0)
    with pytest.raises(UnsupportedError, match="exactly 2 modalities"):
        setup_trainer(tmp_path, n_modalities=3)


def test_cremad_paper_defaults_and_labels():
    cfg = assemble(DATASETS.get("cremad"), METHODS.get("pmr"))
    assert (cfg["alpha"], cfg["momentum_coef"], cfg["modulation_start"], cfg["modulation_end"]) == (2.0, 0.0, 0, 70)
    assert PMR(cfg).label() == "PMR"
    assert "unreleased PER runs" in PMR(cfg).record_info()["defaults_source"]
    syn = assemble(DATASETS.get("synthetic"), METHODS.get("pmr"))
    assert (syn["alpha"], syn["momentum_coef"]) == (1.0, 0.0)
    assert PMR({**syn, "alpha": 2.0, "fusion_head": "sum"}).label() == "PMR (alpha=2, sum fusion)"


def test_sum_fusion_and_prototype_per_modality_rule(tmp_path):
    trainer = setup_trainer(tmp_path, fusion_head="sum", per_modality="prototypes")
    method, model = trainer.method, trainer.model
    assert isinstance(model.fusion, SumHead)
    assert method.per_modality_source() == "method"
    start_epoch(trainer, 0)
    batch = first_batch(trainer)
    model.eval()
    pred = method.predict(batch)
    with torch.no_grad():
        f = model.encode(batch)
    torch.testing.assert_close(pred.per_modality["m2"], -torch.cdist(f["m2"], method.protos["m2"]))
    torch.testing.assert_close(pred.fused, model.fuse(f))


# ---- runs ----------------------------------------------------------------------------------
def test_two_epochs_on_synthetic_record_diagnostics(tmp_path, fast):
    result = run("pmr", "synthetic", {**fast, "epochs": 2, "n_train": 300, "n_test": 100})
    diag = result.record["epochs"][-1]["diagnostics"]
    expected = {"ratio", "proto_acc_m1", "proto_acc_m2", "pce_m1", "pce_m2", "coef_m1", "coef_m2",
                "proto_batches", "proto_classes_seen"}
    assert expected <= set(diag)
    assert diag["proto_batches"] == 1.0  # 270 training samples, batch 64: 5 batches -> 1
    assert all(math.isfinite(diag[k]) for k in expected)
    assert PMR.key_diagnostic == "ratio"
    assert {"m1", "m2"} <= set(result.record["epochs"][-1]["test"])
    assert result.record["header"]["method_label"] == "PMR"


def test_two_epochs_on_avdigits(tmp_path, fast, shared_data):
    result = run("pmr", "avdigits", {**fast, "epochs": 2, "limit_train_batches": 5, "limit_eval_batches": 3})
    diag = result.record["epochs"][-1]["diagnostics"]
    assert {"ratio", "proto_acc_audio", "proto_acc_image", "proto_batches"} <= set(diag)
    assert diag["proto_batches"] == 1.0
    assert math.isfinite(diag["ratio"])


def test_resume_is_identical_with_prototype_momentum(tmp_path, fast, monkeypatch):
    """Killed in epoch 2, where the EMA needs the checkpointed prototypes of epoch 1."""
    overrides = {**fast, "epochs": 3, "n_train": 300, "n_test": 100, "momentum_coef": 0.5, "checkpoint": True}
    assert_resume_identical("pmr", "synthetic", overrides, tmp_path, monkeypatch, kill_epoch=2, kill_batch=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_step_never_syncs_with_the_host(tmp_path):
    trainer = setup_trainer(tmp_path, device="cuda", amp="bf16")
    start_epoch(trainer, 0)
    batch = first_batch(trainer)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with trainer.autocast():
            loss = trainer.method.training_step(batch, 0)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
    assert trainer.method.protos["m1"].dtype == torch.float32


# ---- wrong variants that earlier tests let pass, and the official evaluation order (issue 21) -
def eval_mode_class_means(trainer, epoch):
    """The prototypes of ``epoch`` by hand: eval-mode class means over that epoch's subset."""
    method, model = trainer.method, trainer.model
    current, method.epoch = method.epoch, epoch
    batches = list(trainer.iterate("train", fraction=method.fraction, tag="pmr-prototypes"))
    method.epoch = current
    was = model.training
    with torch.no_grad():
        model.eval()
        feats = {m: torch.cat([model.encode(b)[m] for b in batches]) for m in method.modalities}
        model.train(was)
    y = torch.cat([b["label"] for b in batches])
    return {m: torch.stack([feats[m][y == c].mean(0) for c in range(10)]) for m in method.modalities}


def test_prototype_pass_runs_in_eval_mode_on_a_dropout_encoder(tmp_path):
    """Wrong variant caught: the prototype pass in train mode. With dropout in both encoders a
    train-mode pass gives other class means (random masks, and the kept units scaled by 2);
    earlier tests only used encoders without BatchNorm or dropout, where the mode is invisible."""
    trainer = setup_trainer(tmp_path, n_train=1600, batch_size=16,
                            **{"backbone.m1.dropout": 0.5, "backbone.m2.dropout": 0.5})
    method, model = trainer.method, trainer.model
    model.train()
    start_epoch(trainer, 0)
    assert model.training
    want = eval_mode_class_means(trainer, 0)
    for m in method.modalities:
        torch.testing.assert_close(method.protos[m], want[m])


def test_evaluation_uses_the_prototypes_of_the_model_it_evaluates(tmp_path, fast):
    """Item 7 of issue 21: the official loop computes the prototypes after each epoch and
    valid() uses them, so ``per_modality=prototypes`` after epoch e reports the prototypes of the
    model that finished epoch e (earlier: the ones computed before epoch e, one epoch older);
    epoch e + 1 trains with the same prototypes."""
    trainer = make_trainer("pmr", "synthetic", {**fast, **SMALL, "per_modality": "prototypes"})
    record = trainer.fit()
    method, model = trainer.method, trainer.model
    assert method.updated_epoch == 2  # the pass after the last epoch
    want = eval_mode_class_means(trainer, 2)
    for m in method.modalities:
        torch.testing.assert_close(method.protos[m], want[m])
    # the recorded per-modality test accuracy of the last epoch is nearest-prototype with them
    test = next(iter(trainer.loader(trainer.splits.test, train=False, batch_size=1000)))
    model.eval()
    with torch.no_grad():
        feats = model.encode(test)
    for m in method.modalities:
        acc = (torch.cdist(feats[m], want[m]).argmin(1) == test["label"]).float().mean().item()
        assert record["epochs"][-1]["test"][m]["acc"] == pytest.approx(100 * acc)


def test_prototypes_of_an_epoch_come_from_the_pass_before_it(tmp_path):
    """The pass after epoch e serves epoch e + 1: its subset, its EMA index; the epoch-start hook
    then runs no second pass."""
    trainer = setup_trainer(tmp_path, momentum_coef=0.5)
    method = trainer.method
    start_epoch(trainer, 0)
    method.on_train_epoch_end(0)
    assert method.updated_epoch == 1
    first = {m: p.clone() for m, p in method.protos.items()}
    calls = []
    original = trainer.iterate
    trainer.iterate = lambda *a, **k: calls.append(a) or original(*a, **k)
    start_epoch(trainer, 1)
    assert not calls and all(torch.equal(first[m], method.protos[m]) for m in first)
    assert trainer._step_logs["proto_batches"] == [1.0]
    for m, p in eval_mode_class_means(trainer, 1).items():  # epoch 1: unsmoothed (as the official code)
        torch.testing.assert_close(first[m], p)
