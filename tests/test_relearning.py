"""Diagnosing & Re-learning plugin: purity, gap, strength and blend by hand; the diagnosis on
the right splits, in eval mode, without augmentation; the reset schedule and what a reset
touches; resume toward the same initial weights; the test split never read; a real-data run;
the refusals."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from method_checks import assert_resume_identical
from mmbalance.methods import relearning as rl
from mmbalance.methods.relearning import (
    ReLearning,
    blend_,
    cluster_purity,
    purity,
    reinit_strength,
    reset_due,
    scaled_reinit_epoch,
)
from torch import nn

from mmbalance.data import DictDataset
from mmbalance.errors import ConfigError
from mmbalance.runner import make_trainer, run
from mmbalance.trainer import Trainer

# 4 classes, 1080 training rows: a held-out slice of 120 (about 30 per class, above the warning's 20)
SMALL = {"epochs": 3, "n_train": 1200, "n_test": 200, "num_classes": 4, "dim": 16, "embed_dim": 16,
         "checkpoint": False, "diagnostics": False}

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest


def setup_trainer(tmp_path: Path, dataset: str = "synthetic", **overrides):
    base = SMALL if dataset == "synthetic" else {"checkpoint": False, "diagnostics": False}
    cfg = {**base, "records": str(tmp_path / "runs"), "progress": "off", "device": "cpu", **overrides}
    trainer = make_trainer("relearning", dataset, cfg)
    trainer.setup()
    trainer.method.on_cell_start()
    trainer.method.on_fit_start()
    return trainer


def start_epoch(trainer, epoch: int) -> dict[str, float]:
    """What train_epoch does before its first batch; returns what the epoch hook logged."""
    method = trainer.method
    method.epoch = epoch
    trainer._step_logs = {}
    method.on_train_epoch_start(epoch)
    return {k: float(v[0]) for k, v in trainer._step_logs.items()}


def encoder_features(trainer, ds: DictDataset, order: torch.Tensor) -> dict[str, np.ndarray]:
    """Each encoder's features of the rows ``order`` of an in-memory split, computed here
    without the plugin (eval mode, whole split at once)."""
    model = trainer.model
    model.eval()
    with torch.no_grad():
        feats = model.encode({m: t[order] for m, t in ds.tensors.items()})
    model.train()
    return {m: f.float().numpy() for m, f in feats.items()}


def expected_purities(trainer, held: DictDataset, epoch: int) -> dict[str, float]:
    """P_D and P_V by hand for the diagnosis at the start of ``epoch``: train in the order the
    trainer's seeded shuffle gives that epoch's "relearning" pass, the held-out set in order."""
    trainer.method.epoch = epoch
    shuffled = torch.cat([b["index"] for b in trainer.iterate("train", shuffle=True, tag="relearning")])
    k = trainer.model.num_classes
    out = {}
    for name, ds, order in (("train", trainer.splits.train, shuffled), ("heldout", held, torch.arange(len(held)))):
        for m, f in encoder_features(trainer, ds, order).items():
            out[f"purity_{name}_{m}"] = cluster_purity(f, ds.labels[order].numpy(), k)
    return out


# ---- pure mathematics ------------------------------------------------------------------------
def test_purity_of_a_hand_made_clustering():
    """Cluster 0 holds labels {0, 0, 1} (majority 2), cluster 1 holds {1, 1, 2} (majority 2):
    purity 4/6. Cluster ids and label values need not be contiguous.
    Wrong variant caught: purity as the mean of per-cluster majority shares (2/3 here too, so a
    second case with unequal cluster sizes: {0,0,0,1} and {1,2} -> (3 + 1) / 6, not (3/4 + 1/2) / 2)."""
    assert purity([0, 0, 1, 1, 1, 2], [0, 0, 0, 1, 1, 1]) == pytest.approx(4 / 6)
    assert purity([3, 3, 7, 7, 7, 9], [5, 5, 5, 9, 9, 9]) == pytest.approx(4 / 6)
    assert purity([0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 1, 1]) == pytest.approx(4 / 6)
    assert purity([0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 1, 1]) != pytest.approx((3 / 4 + 1 / 2) / 2)
    assert purity([0, 1, 2, 3], [0, 0, 0, 0]) == pytest.approx(1 / 4)  # one cluster: the largest class
    assert purity([0, 1, 2, 3], [0, 1, 2, 3]) == 1.0
    with pytest.raises(ValueError, match="one cluster per label"):
        purity([0, 1], [0])


def test_reinit_strength_by_hand():
    """g = |P_D - P_V|, alpha = tanh(lambda g): (0.8, 0.7, 3) -> 0.1, tanh(0.3) = 0.2913126124515909.
    Wrong variants caught: no absolute value (P_V > P_D gives a negative alpha); the gap not
    scaled by lambda; alpha = 1 - tanh (as OGM's coefficient)."""
    gap, alpha = reinit_strength(0.8, 0.7, 3.0)
    assert gap == pytest.approx(0.1) and alpha == pytest.approx(0.2913126124515909)
    gap, alpha = reinit_strength(0.7, 0.8, 3.0)  # held-out purer than train: the same strength
    assert gap == pytest.approx(0.1) and alpha == pytest.approx(0.2913126124515909)
    assert reinit_strength(0.9, 0.4, 1.0)[1] == pytest.approx(math.tanh(0.5))
    assert reinit_strength(0.9, 0.4, 0.0) == (pytest.approx(0.5), 0.0)
    assert reinit_strength(0.6, 0.6, 3.0) == (0.0, 0.0)


def test_blend_on_a_tiny_model_by_hand():
    """theta <- alpha theta_init + (1 - alpha) theta, in place on the same Parameter objects:
    W = [[1, 2]], b = [3]; init W0 = [[0, 4]], b0 = [1]; alpha = 0.25 -> W = [[0.75, 2.5]], b = [2.5].
    Wrong variant caught: alpha on the current weights instead of the initial ones
    ([[0.25, 3.5]], [1.5])."""
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0]]))
        lin.bias.copy_(torch.tensor([3.0]))
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    weight = lin.weight
    blend_([lin.weight, lin.bias], [torch.tensor([[0.0, 4.0]]), torch.tensor([1.0])], 0.25)
    assert lin.weight is weight and opt.param_groups[0]["params"][0] is weight
    torch.testing.assert_close(lin.weight.data, torch.tensor([[0.75, 2.5]]))
    torch.testing.assert_close(lin.bias.data, torch.tensor([2.5]))
    blend_([lin.bias], [torch.tensor([1.0])], 0.0)  # alpha 0: unchanged
    torch.testing.assert_close(lin.bias.data, torch.tensor([2.5]))
    blend_([lin.bias], [torch.tensor([1.0])], 1.0)  # alpha 1: back to the initial weights
    torch.testing.assert_close(lin.bias.data, torch.tensor([1.0]))


def test_reset_schedule_after_multiples_of_reinit_epoch_at_most_reinit_num_times():
    """Official: after 0-based epochs 20, 40, 60 (every 20, 3 times), never after epoch 0.
    Wrong variants caught: a reset after epoch 0; a fourth reset (< instead of <=, counting
    from 0); the schedule shifted by one epoch."""
    assert [k for k in range(200) if reset_due(k, 20, 3)] == [20, 40, 60]
    assert [k for k in range(10) if reset_due(k, 1, 2)] == [1, 2]
    assert [k for k in range(10) if reset_due(k, 3, 5)] == [3, 6, 9]
    assert not any(reset_due(k, 2, 0) for k in range(10))


def test_kmeans_purity_with_k_equal_to_the_number_of_classes():
    """Three tight groups on a line at 0, 1 and 10 (then scaled to [-1, 1]): A = 10 of class 0,
    B = 10 of class 1, C = 10 of class 1. With k = C = 2, k-means joins A and B:
    purity (10 + 10) / 30 = 2/3. Wrong variant caught: k = C + 1 (three clusters, purity 1)."""
    x = np.concatenate([np.zeros(10), np.ones(10), np.full(10, 10.0)]).reshape(-1, 1)
    x = np.hstack([x, np.full_like(x, 5.0)]).astype(np.float32)  # a constant column: scaled to -1
    y = np.array([0] * 10 + [1] * 20)
    assert cluster_purity(x, y, 2) == pytest.approx(2 / 3)
    assert cluster_purity(x, y, 3) == 1.0  # what k = C + 1 would give


def test_min_max_scaling_per_dimension_before_kmeans():
    """Dimension 0 carries the class (0 or 1), dimension 1 is noise spread over [0, 100].
    Scaled to [-1, 1] both span the same range, and splitting on the class costs k-means
    less (within-cluster variance 1/3 per point) than splitting the noise (1 + 1/12): purity 1.
    Wrong variant caught: no scaling (the noise dimension dominates, purity near 1/2)."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 50)
    x = np.stack([y + rng.normal(0, 0.01, 100), rng.uniform(0, 100, 100)], 1).astype(np.float32)
    assert cluster_purity(x, y, 2) == 1.0
    from sklearn.cluster import KMeans

    unscaled = purity(y, KMeans(n_clusters=2, random_state=0, n_init="auto").fit_predict(x))
    assert unscaled < 0.8


def test_kmeans_refuses_non_finite_features():
    with pytest.raises(FloatingPointError, match="NaN or infinity"):
        cluster_purity(np.array([[0.0], [np.nan], [1.0]]), np.array([0, 1, 0]), 2)


# ---- the diagnosis on a trainer --------------------------------------------------------------
def test_diagnosis_measures_train_and_the_heldout_slice_in_eval_mode(tmp_path):
    """P_D on the training split and P_V on the held-out slice, features from the encoders in
    eval mode (the encoders have dropout 0.5 here), logged with the gap and alpha.
    Wrong variants caught: P_V on the validation (or test) split; P_D on the held-out slice; the
    two swapped; features in train mode (dropout active; on BatchNorm encoders it also moves
    the running statistics, see the BatchNorm test); alpha of the other modality."""
    drop = {m: {"name": "mlp", "hidden": 32, "dropout": 0.5} for m in ("m1", "m2")}
    t = setup_trainer(tmp_path, backbone=drop, reinit_epoch=1)
    t.train_epoch(0)
    held = t.heldout()
    assert len(held) == math.ceil(0.111 * 1080) and len(t.splits.train) == 1080 - len(held)
    want = expected_purities(t, held, 2)  # before the reset moves the encoders
    logs = start_epoch(t, 2)
    for key, value in want.items():
        assert logs[key] == pytest.approx(value, abs=1e-6), key
    for m in ("m1", "m2"):
        gap, alpha = reinit_strength(want[f"purity_train_{m}"], want[f"purity_heldout_{m}"], 3.0)
        assert logs[f"gap_{m}"] == pytest.approx(gap) and logs[f"alpha_{m}"] == pytest.approx(alpha)
    assert logs["alpha_m1"] != pytest.approx(logs["alpha_m2"])  # a swap would show
    assert t.method.resets == [{"after_epoch": 1, **logs}]


def test_diagnosis_passes_are_charged_as_estimation(tmp_path):
    """The two passes (train + held-out) count as estimation batches, none as training.
    Wrong variant caught: the diagnosis outside ``trainer.estimation()``."""
    t = setup_trainer(tmp_path, reinit_epoch=1, batch_size=64)
    start_epoch(t, 2)
    n_train, n_held = len(t.splits.train), len(t.heldout())
    assert t.estimation_cost.batches == -(-n_train // 64) + -(-n_held // 64)
    assert t.estimation_cost.time_s > 0 and t.extra_batches == 0


def test_diagnosis_reads_the_evaluation_pipeline_unless_asked(tmp_path):
    """The diagnosis features come from the evaluation pipeline (official ``my_train`` mode); with
    ``diagnosis_augment=true`` from the training pipeline. Here train and held-out are wrapped in
    a dataset whose training reads add strong noise and whose eval view is the clean data.
    Wrong variants caught: ``augment`` left to the split's pipeline by default; the option not
    reaching the pass."""

    class Noisy:
        def __init__(self, base: DictDataset) -> None:
            self.base, self.labels = base, base.labels

        def __len__(self) -> int:
            return len(self.base)

        def get_batch(self, idx):
            batch = self.base.get_batch(idx)
            for m in ("m1", "m2"):
                batch[m] = batch[m] + 20.0 * torch.randn_like(batch[m])
            return batch

        def eval_view(self) -> DictDataset:
            return self.base

    results = {}
    for augment in (False, True):
        t = setup_trainer(tmp_path / str(augment), reinit_epoch=1, diagnosis_augment=augment)
        t.train_epoch(0)
        clean_train, clean_held = t.splits.train, t.heldout()
        want = expected_purities(t, clean_held, 2)
        t.splits.train, t._heldout = Noisy(clean_train), Noisy(clean_held)
        logs = start_epoch(t, 2)
        results[augment] = all(logs[k] == pytest.approx(v, abs=1e-6) for k, v in want.items())
    assert results == {False: True, True: False}


def test_purity_on_the_validation_split_when_asked(tmp_path):
    """``purity_split=val``: nothing is held out (the model trains on all of train) and P_V is the
    purity of the validation split. Wrong variant caught: the option not reaching the pass."""
    t = setup_trainer(tmp_path, purity_split="val", reinit_epoch=1)
    assert t.method.heldout_fraction == 0.0 and t._heldout is None and len(t.splits.train) == 1080
    want = expected_purities(t, t.splits.val, 2)
    logs = start_epoch(t, 2)
    for key, value in want.items():
        assert logs[key] == pytest.approx(value, abs=1e-6), key


def test_kmeans_n_init_and_lambda_reach_the_diagnosis(tmp_path, monkeypatch):
    """Every restart count the option names reaches scikit-learn's KMeans (k = classes,
    random_state 0); lambda reaches alpha. Wrong variants caught: n_init or lambda ignored."""
    from sklearn import cluster

    seen = []
    real = cluster.KMeans

    def spy(**kwargs):
        seen.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(cluster, "KMeans", spy)
    alphas = {}
    for n_init, lam in (("auto", 3.0), (3, 1.0)):
        t = setup_trainer(tmp_path / str(n_init), reinit_epoch=1, kmeans_n_init=n_init, move_lambda=lam)
        seen.clear()
        logs = start_epoch(t, 2)
        assert seen == [{"n_clusters": 4, "random_state": 0, "n_init": n_init}] * 4
        alphas[lam] = logs["alpha_m1"]
        assert logs["alpha_m1"] == pytest.approx(math.tanh(lam * logs["gap_m1"]))
    assert alphas[3.0] != alphas[1.0]


def test_heldout_fraction_sets_the_slice(tmp_path):
    """Wrong variant caught: heldout_fraction not reaching the trainer's carve."""
    t = setup_trainer(tmp_path, heldout_fraction=0.25)
    assert len(t.heldout()) == 270 and len(t.splits.train) == 810


# ---- the reset in a run ----------------------------------------------------------------------
def test_reset_blends_every_encoder_parameter_toward_the_initial_weights_only(tmp_path):
    """After epoch 1 (reinit_epoch=1) each encoder m becomes alpha_m theta_init + (1 - alpha_m)
    theta, theta_init = the weights before training; the fused head, the unimodal heads and SGD's
    momentum buffers are untouched. Wrong variants caught: blend direction swapped; the heads
    blended too; the other modality's alpha (or one modality's for both); theta_init taken after epoch 0; momentum
    reset; a reset already after epoch 0."""
    t = setup_trainer(tmp_path, reinit_epoch=1)
    model, method = t.model, t.method
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    for m in model.modalities:
        for n, p in model.encoders[m].named_parameters():
            assert torch.equal(method.theta_init[m][n], p.detach())
    t.train_epoch(0)
    assert start_epoch(t, 1) == {}  # no reset after epoch 0
    t.train_epoch(1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    momentum = {id(p): s["momentum_buffer"].clone() for p, s in t.optimizer.state.items()}
    assert len(momentum) > 8  # encoders and fused head (the unimodal heads get no gradient)
    logs = start_epoch(t, 2)
    assert {f"alpha_{m}" for m in model.modalities} <= set(logs)
    for n, p in model.named_parameters():
        if n.startswith("encoders."):
            m = n.split(".")[1]
            a = logs[f"alpha_{m}"]
            assert 0 < a < 1
            torch.testing.assert_close(p.detach(), init[n] * a + before[n] * (1 - a), rtol=0, atol=1e-6)
        else:
            assert torch.equal(p.detach(), before[n]), n
    for p, s in t.optimizer.state.items():
        assert torch.equal(s["momentum_buffer"], momentum[id(p)])


def test_reset_leaves_batchnorm_statistics_on_real_data(tmp_path, shared_data):
    """AV-digits' audio CNN has BatchNorm: its affine parameters are blended, its running
    statistics (buffers) are not. Wrong variant caught: the blend over the encoder's state_dict
    (buffers included)."""
    t = setup_trainer(tmp_path, "avdigits", reinit_epoch=1, limit_train_batches=3, batch_size=32)
    t.train_epoch(0)
    t.train_epoch(1)
    enc = t.model.encoders["audio"]
    buffers = {n: b.clone() for n, b in enc.named_buffers()}
    params = {n: p.detach().clone() for n, p in enc.named_parameters()}
    logs = start_epoch(t, 2)
    assert logs["alpha_audio"] > 0
    for n, b in enc.named_buffers():
        assert torch.equal(b, buffers[n]), n
    bn_weight = next(n for n in params if n.endswith("1.weight"))  # the first BatchNorm's scale
    assert not torch.equal(enc.get_parameter(bn_weight).detach(), params[bn_weight])


def test_schedule_in_a_run_and_diagnostics(tmp_path, fast):
    """reinit_epoch=2, reinit_num=2 over 8 epochs: resets after epochs 2 and 4 (logged in epochs
    3 and 5), not after 6. Wrong variants caught: resets one epoch early (before the epoch's
    evaluation, BalanceBenchmark's order) or late; a third reset; reinit options not reaching
    the schedule."""
    rec = run("relearning", "synthetic", {**fast, **SMALL, "epochs": 8, "reinit_epoch": 2, "reinit_num": 2}).record
    logged = [e["epoch"] for e in rec["epochs"] if "alpha_m1" in (e.get("diagnostics") or {})]
    assert logged == [3, 5]
    diag = rec["epochs"][3]["diagnostics"]
    assert {"purity_train_m1", "purity_heldout_m1", "gap_m1", "alpha_m1", "alpha_m2"} <= set(diag)
    assert rec["epochs"][3]["estimation_cost"]["batches"] > 0 and rec["epochs"][2]["estimation_cost"]["batches"] == 0
    assert rec["final"]["estimation_cost"]["time_s"] > 0
    assert rec["header"]["method_label"] == "ReLearning (every 2 x2)"
    info = rec["header"]["method_info"]
    assert info["kmeans"]["n_init"] == "auto" and "augmentation" in info["official_comparison"]
    assert "stratified 0.111" in info["purity_heldout_split"]


def test_resume_reinitialises_toward_the_same_initial_weights(tmp_path, fast, monkeypatch):
    """Killed in epoch 2 (after the checkpoint of epoch 1): the resumed process must blend toward
    the checkpointed theta_init, not its own start weights, and redo the reset of epoch 2.
    Wrong variants caught: theta_init taken in on_fit_start (BalanceBenchmark); theta_init left
    out of the checkpoint; the reset counted in state and not restored."""
    overrides = {**fast, **SMALL, "epochs": 4, "reinit_epoch": 1, "checkpoint": True}
    assert_resume_identical("relearning", "synthetic", overrides, tmp_path, monkeypatch, kill_epoch=2, kill_batch=2)


def test_the_test_split_is_never_read(tmp_path, fast, monkeypatch):
    """Scrambling the test split's features and labels leaves everything training computes
    (losses, validation metrics, purities, alphas) identical; only the test metrics move.
    Wrong variant caught: P_V measured on the test split (BalanceBenchmark's validation loader)."""
    cfg = {**fast, **SMALL, "epochs": 4, "reinit_epoch": 1}
    clean = run("relearning", "synthetic", {**cfg, "records": str(tmp_path / "clean")}).record
    original = Trainer.setup

    def scrambled(self):
        original(self)
        test = self.splits.test
        g = torch.Generator().manual_seed(7)
        self.splits.test = DictDataset({m: torch.randn(t.shape, generator=g) * 5 for m, t in test.tensors.items()},
                                       test.labels[torch.randperm(len(test), generator=g)])

    monkeypatch.setattr(Trainer, "setup", scrambled)
    other = run("relearning", "synthetic", {**cfg, "records": str(tmp_path / "scrambled")}).record

    def training(rec):
        return [(e["train_loss"], e["val"], e["diagnostics"]) for e in rec["epochs"]]

    assert training(other) == training(clean)
    assert [e["test"] for e in other["epochs"]] != [e["test"] for e in clean["epochs"]]


@pytest.mark.filterwarnings("ignore:Method 'relearning'. the held-out slice")  # 16 per class at 0.111
def test_trains_well_above_chance_on_mfeat(tmp_path, fast, shared_data):
    """mfeat zer + mor (10 classes, chance 10 %), 8 epochs with resets after epochs 2, 4, 6."""
    rec = run("relearning", "mfeat", {**fast, "modalities": ["zer", "mor"], "epochs": 8, "reinit_epoch": 2,
                                      "diagnostics": False}).record
    assert [e["epoch"] for e in rec["epochs"] if "alpha_zer" in e["diagnostics"]] == [3, 5, 7]
    assert rec["final"]["selection"]["best_val"]["test"]["fused"]["acc"] > 60.0


def test_three_modalities_are_diagnosed_one_by_one(tmp_path, fast):
    rec = run("relearning", "synthetic", {**fast, **SMALL, "n_modalities": 3, "reinit_epoch": 1}).record
    assert {"alpha_m1", "alpha_m2", "alpha_m3"} <= set(rec["epochs"][2]["diagnostics"])


# ---- refusals, labels ------------------------------------------------------------------------
def test_refusals(tmp_path):
    for bad in ("ten", 0, True):
        with pytest.raises(ConfigError, match="kmeans_n_init"):
            ReLearning({"kmeans_n_init": bad})
    with pytest.raises(ConfigError, match="validates on the test split"):
        setup_trainer(tmp_path / "a", purity_split="val", val_fraction=0.0)
    with pytest.raises(ConfigError, match="holds out only"):
        setup_trainer(tmp_path / "b", n_train=60, num_classes=10, heldout_fraction=0.1)
    with pytest.warns(UserWarning, match="fewer than 20"):
        setup_trainer(tmp_path / "c", n_train=300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        setup_trainer(tmp_path / "d", n_train=3000, reinit_epoch=1)


def test_a_schedule_that_never_fires_in_the_run_is_announced(tmp_path):
    """20 epochs with the official period unscaled (reinit_epoch=20): the first reset would follow
    the last epoch, so the run is plain joint training; this is said, not silent. 22 epochs reset
    once (after epoch 20, in epoch 21): no warning, nor with the default (auto) at 20 epochs.
    Wrong variant caught: the range counting the last epoch (a reset 'after' epoch 19... of a
    20-epoch run never happens)."""
    with pytest.warns(UserWarning, match="no re-initialisation happens"):
        setup_trainer(tmp_path / "a", n_train=3000, epochs=20, reinit_epoch=20)
    with pytest.warns(UserWarning, match="no re-initialisation happens"):
        setup_trainer(tmp_path / "b", n_train=3000, epochs=21, reinit_epoch=20)
    for epochs, every in ((22, 20), (3, 1), (20, "auto")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            setup_trainer(tmp_path / f"c{epochs}", n_train=3000, epochs=epochs, reinit_epoch=every)


def test_a_checkpoint_without_initial_weights_is_refused(tmp_path):
    t = setup_trainer(tmp_path)
    t.method.load_state_dict({"theta_init": {}, "resets": []})
    with pytest.raises(ConfigError, match="initial weights"):
        t.method.on_fit_start()


def test_the_default_period_is_the_official_schedule_scaled_to_the_run():
    """auto: round(epochs * 20 / 90), at least 1. 90 epochs give the official 20 (resets after
    20, 40, 60); the benchmark's 20 give 4 (after 4, 8, 12: the same places in the run); 40 give 9.
    Wrong variants caught: floor instead of round (40 -> 8), the period not scaled (20 at 20
    epochs, never firing), 0 for a short run, the value ignoring the run's epochs, scaling
    epochs - 1 (7 -> 1)."""
    assert [scaled_reinit_epoch(e) for e in (90, 20, 40, 7, 3, 1)] == [20, 4, 9, 2, 1, 1]
    assert ReLearning({"epochs": 20}).every == 4 and ReLearning({"epochs": 90}).every == 20
    assert ReLearning({"epochs": 20, "reinit_epoch": 20}).every == 20
    assert ReLearning({}).every == 20  # built by hand, without a run length: the official period
    for bad in (0, -2, "often", True, 2.5):
        with pytest.raises(ConfigError, match="reinit_epoch must be 'auto'"):
            ReLearning({"epochs": 20, "reinit_epoch": bad})


def test_the_default_schedule_resets_inside_a_short_run(fast):
    """The default at 9 epochs: period round(2) = 2, resets after epochs 2, 4 and 6 (logged in
    epochs 3, 5 and 7), the label unchanged and the period's source recorded."""
    rec = run("relearning", "synthetic", {**fast, **SMALL, "epochs": 9}).record
    logged = [e["epoch"] for e in rec["epochs"] if "alpha_m1" in (e.get("diagnostics") or {})]
    assert logged == [3, 5, 7]
    assert rec["header"]["method_label"] == "ReLearning"
    assert rec["header"]["method_info"]["schedule"]["reinit_epoch"] == 2
    assert rec["header"]["method_info"]["schedule"]["period_from"].startswith("auto")


def test_labels():
    assert ReLearning({}).label() == "ReLearning"
    assert ReLearning({"reinit_epoch": 20}).label() == "ReLearning (every 20 x3)"
    assert ReLearning({"move_lambda": 1.0, "diagnosis_augment": True}).label() == \
        "ReLearning (lambda=1, augmented diagnosis)"
    assert ReLearning({"purity_split": "val", "kmeans_n_init": 10}).label() == \
        "ReLearning (purity on val, n_init=10)"
    assert ReLearning({"heldout_fraction": 0.2}).label() == "ReLearning (heldout=0.2)"
    assert rl.OPTIONS["reinit_epoch"].default == "auto" and rl.OPTIONS["reinit_num"].default == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_cell_with_resets(tmp_path, fast):
    rec = run("relearning", "synthetic", {**fast, **SMALL, "device": "cuda", "amp": "bf16", "epochs": 4,
                                          "reinit_epoch": 1}).record
    assert rec["header"]["amp"] == "bf16"
    diag = rec["epochs"][2]["diagnostics"]
    assert 0 <= diag["alpha_m1"] < 1 and math.isfinite(diag["purity_train_m2"])
    assert rec["final"]["selection"]["best_val"]["test"]["fused"]["acc"] > 30.0
