"""Sample- and modality-level valuation: Shapley values, copy counts and the modality-level
rule by hand; the valuation pass, the row plan and the masked step on a real trainer; the
warm-up boundary, estimation charging, options, refusals, resume and real-data runs."""

from __future__ import annotations

import contextlib
import itertools
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from method_checks import assert_resume_identical
from mmbalance.methods.valuation import (
    OPTIONS,
    STREAM_COPIES,
    STREAM_Z,
    Valuation,
    coalition_values,
    copy_counts,
    draw_rng,
    mask_rows,
    modality_copies,
    modality_plan,
    sample_plan,
    shapley_values,
    shapley_weights,
)
from torch import nn

from mmbalance.config import assemble
from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.heads import ConcatHead
from mmbalance.model import MultimodalModel
from mmbalance.registry import DATASETS, METHODS
from mmbalance.runner import make_trainer, run
from mmbalance.trainer import to_device

SMALL = {"epochs": 3, "n_train": 300, "n_test": 100, "dim": 16, "embed_dim": 16, "checkpoint": False,
         "diagnostics": False, "log_epochs": False}

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest


def setup_trainer(tmp_path, **overrides):
    cfg = {**SMALL, "records": str(tmp_path / "runs"), "progress": "off", "device": "cpu", **overrides}
    trainer = make_trainer("valuation", "synthetic", cfg)
    trainer.setup()
    return trainer


def start_epoch(trainer, epoch: int) -> None:
    """What train_epoch does before its first batch."""
    method = trainer.method
    method.epoch = epoch
    method.num_training_batches = len(trainer.loader(trainer.splits.train, train=True))
    trainer._step_logs = {}
    method.on_train_epoch_start(epoch)


def independent_phi(trainer) -> torch.Tensor:
    """phi (N, 2) of every train sample written out from the two-modality formula, model in
    eval mode: phi_a = (1[a right] + 2 1[fused right] - 1[v right]) / 2, and symmetrically."""
    model = trainer.model
    n = len(trainer.splits.train)
    phi = torch.full((n, 2), float("nan"))
    was = model.training
    model.eval()
    with torch.no_grad():
        for batch in trainer.iterate("train", rows=list(range(n)), tag="check"):
            f = model.encode(batch)
            a, v = trainer.modalities
            y = batch["label"]
            full = (model.fuse(f).argmax(1) == y).float()
            a_only = (model.fuse({a: f[a], v: torch.zeros_like(f[v])}).argmax(1) == y).float()
            v_only = (model.fuse({a: torch.zeros_like(f[a]), v: f[v]}).argmax(1) == y).float()
            phi[batch["index"], 0] = (a_only + 2 * full - v_only) / 2
            phi[batch["index"], 1] = (v_only + 2 * full - a_only) / 2
    model.train(was)
    return phi


# ---- pure mathematics ------------------------------------------------------------------------
# Coalitions are bit masks (bit j = modality j): columns 0 = {}, 1 = {a}, 2 = {v}, 3 = {a, v}.
def correct_matrix(rows: list[tuple[int, int, int]]) -> torch.Tensor:
    """(fused, a-only, v-only) correctness per sample -> the (B, 4) coalition matrix."""
    return torch.tensor([[False, bool(a), bool(v), bool(f)] for f, a, v in rows])


# every (fused, a-only, v-only) case with its official (phi_a, phi_v), v(S) = |S| 1[correct]
WORKED = {
    (1, 1, 1): (1.0, 1.0), (1, 0, 1): (0.5, 1.5), (1, 1, 0): (1.5, 0.5), (1, 0, 0): (1.0, 1.0),
    (0, 0, 1): (-0.5, 0.5), (0, 1, 0): (0.5, -0.5), (0, 0, 0): (0.0, 0.0), (0, 1, 1): (0.0, 0.0),
}


def test_two_modality_shapley_values_of_every_case_by_hand():
    """Wrong variants caught: a flipped sign on the other modality's single value, v(full) = 1
    instead of 2 under the official value, the Shapley weights not halved."""
    cases = list(WORKED)
    phi = shapley_values(correct_matrix(cases))
    assert phi.tolist() == [list(WORKED[c]) for c in cases]
    # BalanceBenchmark's v(S) = 1[correct]: phi_a = (a + f - v) / 2
    phi_bb = shapley_values(correct_matrix(cases), "correct")
    assert phi_bb.tolist() == [[(a + f - v) / 2, (v + f - a) / 2] for f, a, v in cases]
    assert phi_bb[0].tolist() == [0.5, 0.5]  # all right: one copy per modality under BB's rule
    # the empty coalition's column is never counted, whatever it holds
    flipped = correct_matrix(cases)
    flipped[:, 0] = True
    assert torch.equal(shapley_values(flipped), phi)


def test_three_modality_shapley_by_hand_and_against_permutations():
    """Only {a, b} and {a, b, c} right: v(ab) = 2, v(abc) = 3. phi_a = 1/6 * 2 (S = {b}) + 1/3 * 3
    (S = {b, c}) = 4/3 = phi_b; phi_c = 1/3 * (3 - 2) = 1/3; they sum to v(full) = 3."""
    correct = torch.zeros(1, 8, dtype=torch.bool)
    correct[0, 0b011] = correct[0, 0b111] = True
    torch.testing.assert_close(shapley_values(correct), torch.tensor([[4 / 3, 4 / 3, 1 / 3]]))
    # every sample whose coalitions are all right: phi_m = 1 for each m (its fair share), so no copies
    all_right = torch.ones(1, 8, dtype=torch.bool)
    torch.testing.assert_close(shapley_values(all_right), torch.ones(1, 3))
    torch.testing.assert_close(shapley_values(all_right, "correct"), torch.full((1, 3), 1 / 3))
    # the definition written out: the mean marginal contribution over all M! orders
    gen = torch.Generator().manual_seed(0)
    random_correct = torch.rand(64, 8, generator=gen) > 0.5
    v = coalition_values(random_correct)
    want = torch.zeros(64, 3)
    for order in itertools.permutations(range(3)):
        mask = 0
        for m in order:
            want[:, m] += (v[:, mask | 1 << m] - v[:, mask]) / 6
            mask |= 1 << m
    torch.testing.assert_close(shapley_values(random_correct), want)
    torch.testing.assert_close(shapley_values(random_correct).sum(1), v[:, 7])  # efficiency
    assert shapley_weights(2).tolist() == [[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]]


def test_copy_counts_follow_the_official_thresholds():
    """Wrong variants caught: a closed upper bound (phi = 1 getting a copy), the 1 and 3 copy
    counts swapped, the -0.1 threshold moved to 0."""
    phi = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.5, 0.41, 0.39, -0.09, -0.11, 0.999, 0.4, -0.1])
    assert copy_counts(phi).tolist() == [3, 2, 1, 0, 0, 1, 2, 2, 3, 1, 0, 0]
    # the worked cases: (0,0,1) -> 3 audio-only + 1 visual-only copies; (1,1,1) -> none
    counts = copy_counts(shapley_values(correct_matrix([(0, 0, 1), (1, 1, 1), (0, 0, 0), (1, 0, 1)])))
    assert counts.tolist() == [[3, 1], [0, 0], [2, 2], [1, 0]]


def test_sample_plan_keeps_every_original_then_the_copies_in_order():
    rows, keep = sample_plan(np.array([[0, 0], [3, 1], [2, 2]]))
    assert rows.tolist() == [0, 1, 2, 1, 1, 1, 1, 2, 2, 2, 2]
    a, v, both = [True, False], [False, True], [True, True]
    assert keep.tolist() == [both] * 3 + [a, a, a, v, a, a, v, v]


def test_modality_level_rule_by_hand():
    """phi_mean (1.2, 0.6): gaps (-0.2, 0.4), diff = 0.6 / 3 * 2 = 0.4, floor(0.4 * 101) = 40 copies
    keeping the larger gap's modality (1). Wrong variants caught: the factor 2/3 left out, the
    stronger modality kept, alpha not applied, round instead of floor."""
    diff, n, weak = modality_copies([1.2, 0.6], 101)
    assert diff == pytest.approx(0.4) and n == 40 and weak == 1
    assert modality_copies([0.6, 1.2], 101)[1:] == (40, 0)
    assert modality_copies([1.2, 0.6], 101, alpha=0.5)[1] == 20  # 0.2 * 101 = 20.2
    assert modality_copies([1.2, 0.6], 101, func="tanh")[1] == math.floor(math.tanh(0.4) * 101) == 38
    assert modality_copies([1.2, 0.6], 101, func="square")[1] == math.floor(0.4 ** 1.5 * 101) == 25
    assert modality_copies([1.0, 1.3], 9) == (pytest.approx(0.2), 1, 0)  # 1.8 copies -> 1
    # a tie: no copies (and the last modality would be the one kept, as the official visual)
    diff, n, weak = modality_copies([0.8, 0.8], 100)
    assert (diff, n, weak) == (0.0, 0, 1)
    # three modalities: range of the gaps, the largest gap's modality
    diff, n, weak = modality_copies([1.5, 0.9, 0.6], 101)
    assert diff == pytest.approx(0.6) and n == 60 and weak == 2
    rows, keep = modality_plan(4, 3, np.array([2, 2, 0]), weak=2)
    assert rows.tolist() == [0, 1, 2, 3, 2, 2, 0]
    assert keep[4:].tolist() == [[False, False, True]] * 3 and keep[:4].all()


def test_draws_are_seeded_by_seed_and_epoch():
    a = draw_rng(0, 5, STREAM_Z).integers(0, 1000, 50)
    assert np.array_equal(a, draw_rng(0, 5, STREAM_Z).integers(0, 1000, 50))
    assert not np.array_equal(a, draw_rng(0, 6, STREAM_Z).integers(0, 1000, 50))
    assert not np.array_equal(a, draw_rng(1, 5, STREAM_Z).integers(0, 1000, 50))
    assert not np.array_equal(a, draw_rng(0, 5, STREAM_COPIES).integers(0, 1000, 50))


def test_mask_rows_blanks_only_the_dropped_rows():
    x = torch.arange(12.0).view(3, 2, 2)
    out = mask_rows(x, torch.tensor([True, False, True]), torch.full((1, 2, 2), -1.0))
    assert out[0].tolist() == x[0].tolist() and out[2].tolist() == x[2].tolist()
    assert (out[1] == -1).all()


# ---- the valuation pass from hand-made predictions --------------------------------------------
class Ident(nn.Module):
    out_dim = 1

    def forward(self, x):
        return x


def hand_method(**options) -> Valuation:
    """Identity encoders a, v (1-d) and a concat head whose class-0 logit is a + v and class-1
    logit is 0: each coalition predicts class 0 iff its sum is positive."""
    head = ConcatHead({"a": 1, "v": 1}, 2)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
        head.fc.bias.zero_()
    method = Valuation(dict(options))
    method.model = MultimodalModel({"a": Ident(), "v": Ident()}, 2, head)
    method.configure_model(method.model)
    method.trainer = SimpleNamespace(autocast=contextlib.nullcontext, device=torch.device("cpu"))
    return method


# (a, v, y) -> (fused, a-only, v-only) right?
HAND = [(2.0, 1.0, 0), (-1.0, 3.0, 0), (-3.0, 1.0, 0), (2.0, 1.0, 1)]
HAND_CASES = [(1, 1, 1), (1, 0, 1), (0, 0, 1), (0, 0, 0)]


def test_valuation_of_hand_made_predictions():
    """Hand values: s0 all right -> (1, 1), no copies; s1 a-only wrong -> (0.5, 1.5), 1 a-copy;
    s2 only v right -> (-0.5, 0.5), 3 a-copies and 1 v-copy; s3 all wrong -> (0, 0), 2 + 2.
    Wrong variant caught: the absent modality's feature left in (no zeroing) for a coalition."""
    method = hand_method()
    batch = {"a": torch.tensor([[a] for a, _, _ in HAND]), "v": torch.tensor([[v] for _, v, _ in HAND]),
             "label": torch.tensor([y for _, _, y in HAND])}
    correct = method.coalition_correct(batch)
    assert correct[:, 1:].tolist() == [[bool(a), bool(v), bool(f)] for f, a, v in HAND_CASES]
    phi = shapley_values(correct)
    assert phi.tolist() == [[1.0, 1.0], [0.5, 1.5], [-0.5, 0.5], [0.0, 0.0]]
    assert copy_counts(phi).tolist() == [[0, 0], [1, 0], [3, 1], [2, 2]]
    rows, keep = sample_plan(copy_counts(phi).numpy())
    assert rows.tolist() == [0, 1, 2, 3, 1, 2, 2, 2, 2, 3, 3, 3, 3]


# ---- the plugin on a real trainer -----------------------------------------------------------
def test_sample_level_plan_is_built_from_eval_mode_shapley_values(tmp_path):
    """The epoch plan at epoch >= warmup: every sample once plus copy_counts(phi) copies, phi from
    an eval-mode, no-grad pass over train. Wrong variants caught: the pass in train mode, the
    copies keeping the other modality, a sample's copies counted from another sample's phi."""
    trainer = setup_trainer(tmp_path, warmup=0)
    method, model = trainer.method, trainer.model
    modes = []
    handle = model.encoders["m1"].register_forward_hook(lambda mod, i, o: modes.append(mod.training))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start_epoch(trainer, 0)
    handle.remove()
    assert modes and not any(modes)  # eval mode throughout the valuation pass
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    phi = independent_phi(trainer)
    counts = copy_counts(phi).numpy()
    n = len(trainer.splits.train)
    assert counts.sum() > 0
    want_rows, want_keep = sample_plan(counts)
    assert np.array_equal(method.rows, want_rows)
    assert torch.equal(method.keep, torch.as_tensor(want_keep, dtype=torch.float32))
    logs = trainer._step_logs
    assert logs["phi_m1"][0].item() == pytest.approx(phi[:, 0].mean().item(), abs=1e-6)
    assert logs["copies_m1"] == [float(counts[:, 0].sum())]
    assert logs["copies_m2"] == [float(counts[:, 1].sum())]
    assert logs["epoch_rows"] == [len(want_rows) / n]
    plan = method.epoch_plan(0)
    assert len(plan) == 1 and plan[0].rows is method.rows


def test_step_zeroes_each_rows_dropped_features(tmp_path):
    """A batch of the plan: each row's logits are the head on its kept features only. Wrong
    variants caught: the mask looked up by ``index`` (every copy of a sample alike), the kept and
    dropped modality swapped, the mask not applied, the dropped encoder getting gradient."""
    trainer = setup_trainer(tmp_path)
    method, model = trainer.method, trainer.model
    method.rows, keep = sample_plan(np.array([[0, 0], [2, 0], [0, 1]] + [[0, 0]] * 267))
    method.keep = torch.as_tensor(keep, dtype=torch.float32)
    from mmbalance.data import RowPlan

    plan = RowPlan(trainer.splits.train, method.rows)
    batch = to_device(plan.get_batch([1, 270, 271, 2, 272]), trainer.device)  # sample 1, its 2 a-copies, sample 2, its v-copy
    assert batch["index"].tolist() == [1, 1, 1, 2, 2]
    model.train()
    loss = method.training_step(batch, 0)
    with torch.no_grad():
        f = model.encode(batch)
        z1, z2 = torch.zeros_like(f["m1"]), torch.zeros_like(f["m2"])
        keep_a = torch.tensor([1.0, 1, 1, 1, 0]).unsqueeze(1)
        keep_v = torch.tensor([1.0, 0, 0, 1, 1]).unsqueeze(1)
        logits = model.fuse({"m1": torch.where(keep_a > 0, f["m1"], z1), "m2": torch.where(keep_v > 0, f["m2"], z2)})
    assert loss.item() == pytest.approx(F.cross_entropy(logits, batch["label"]).item(), rel=1e-6)
    assert trainer._step_logs["kept_m1"][-1].item() == pytest.approx(0.8)
    assert trainer._step_logs["kept_m2"][-1].item() == pytest.approx(0.6)
    # a batch of a-only copies sends no gradient into the m2 encoder
    model.zero_grad(set_to_none=True)
    method.training_step(to_device(plan.get_batch([270, 271]), trainer.device), 0).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.encoder_params("m2"))
    assert any(p.grad.any() for p in model.encoder_params("m1"))


def test_warmup_epochs_are_concat_and_the_first_resampled_epoch_is_warmup(tmp_path, fast):
    """Epochs 0..warmup-1 are plain joint training, number for number (even when valued for
    logging); epoch ``warmup`` trains on the plan. Wrong variants caught: the warm-up window off by
    one either way, a valuation pass that moves the training epoch's RNG draws."""
    cfg = {**fast, **SMALL, "epochs": 3}
    concat = run("concat", "synthetic", cfg).record["epochs"]
    for extra in ({}, {"value_in_warmup": True}):
        records = {"records": str(tmp_path / f"v{len(extra)}")}  # value_in_warmup is not in the identity
        rec = run("valuation", "synthetic", {**cfg, "warmup": 2, **extra, **records}).record["epochs"]
        for e in (0, 1):
            assert (rec[e]["train_loss"], rec[e]["val"], rec[e]["test"]) == \
                   (concat[e]["train_loss"], concat[e]["val"], concat[e]["test"])
            assert rec[e]["train_batches"] == concat[e]["train_batches"]
            assert "copies_m1" not in rec[e]["diagnostics"]
            assert ("phi_m1" in rec[e]["diagnostics"]) == bool(extra)
        assert rec[2]["train_batches"] > concat[2]["train_batches"]
        assert rec[2]["diagnostics"]["copies_m2"] > 0 and rec[2]["data_passes"] > 1


def test_valuation_is_charged_as_estimation_not_training(tmp_path, fast):
    """Each resampled epoch's valuation reads train once (ceil(N / batch) batches) inside the
    estimation block. Wrong variant caught: the pass outside ``trainer.estimation()``."""
    rec = run("valuation", "synthetic", {**fast, **SMALL, "epochs": 2, "warmup": 1}).record
    e0, e1 = rec["epochs"]
    assert e0["estimation_cost"]["batches"] == 0
    assert e1["estimation_cost"]["batches"] == math.ceil(270 / 64)
    assert e1["estimation_cost"]["time_s"] > 0 and e1["extra_batches"] == 0
    assert rec["final"]["estimation_cost"]["batches"] == math.ceil(270 / 64)


def test_modality_level_values_z_and_copies_the_weaker_modality(tmp_path):
    """Z = floor(0.2 N) draws with replacement from (seed, epoch); the distinct ones are valued
    once, the mean weights each by its multiplicity; floor(diff N) copies keep the larger gap's
    modality. Wrong variants caught: Z's duplicates counted once, the draws not seeded by the
    epoch, the stronger modality kept."""
    trainer = setup_trainer(tmp_path, level="modality", warmup=0, alpha=3.0)
    method = trainer.method
    seen_rows = []
    iterate = trainer.iterate

    def spy(split, **kw):
        seen_rows.append(kw.get("rows"))
        return iterate(split, **kw)

    trainer.iterate = spy
    start_epoch(trainer, 4)
    n = len(trainer.splits.train)
    z = draw_rng(0, 4, STREAM_Z).integers(0, n, size=int(0.2 * n))
    assert len(np.unique(z)) < len(z)  # duplicates do occur
    assert seen_rows == [np.unique(z).tolist()]
    phi = independent_phi(trainer)
    mean = phi[torch.as_tensor(z)].mean(0)
    assert trainer._step_logs["phi_m1"][0].item() == pytest.approx(mean[0].item(), abs=1e-6)
    diff, n_copies, weak = modality_copies(mean.tolist(), n, alpha=3.0)
    assert n_copies > 0 and weak == int(mean[1] < mean[0])
    drawn = draw_rng(0, 4, STREAM_COPIES).integers(0, n, size=n_copies)
    assert np.array_equal(method.rows, np.concatenate([np.arange(n), drawn]))
    kept = method.keep[n:]
    assert kept[:, weak].all() and not kept[:, 1 - weak].any()
    assert trainer._step_logs["diff"] == [pytest.approx(diff)]
    start_epoch(trainer, 5)  # another epoch draws other rows
    assert not np.array_equal(method.rows[n:n + 20], drawn[:20])


def test_input_drop_blanks_inputs_and_values_with_the_blank_feature(tmp_path):
    """drop=input: a coalition's absent modality is the encoder's feature of a blank input (as
    ``model.encode(batch, drop=...)``), and a copy's dropped input rows are zeroed before the
    encoder. Wrong variant caught: the option never reaching the step or the valuation."""
    trainer = setup_trainer(tmp_path, drop="input")
    method, model = trainer.method, trainer.model
    batch = to_device(next(iter(trainer.loader(trainer.splits.train, train=False))), trainer.device)
    model.eval()
    with torch.no_grad():
        feats = model.encode(batch)
        absent = method.absent_features(batch, feats)
        for m in ("m1", "m2"):
            torch.testing.assert_close(absent[m], model.encode(batch, drop=[m])[m])
            assert absent[m].abs().sum() > 0  # a blank input is not a zero feature here
    model.train()
    method.rows, keep = sample_plan(np.array([[1, 0]] + [[0, 0]] * 269))
    method.keep = torch.as_tensor(keep, dtype=torch.float32)
    from mmbalance.data import RowPlan

    b = to_device(RowPlan(trainer.splits.train, method.rows).get_batch([0, 270]), trainer.device)
    loss = method.training_step(b, 0)
    blanked = {**b, "m2": torch.stack([b["m2"][0], torch.zeros_like(b["m2"][1])])}
    with torch.no_grad():
        want = F.cross_entropy(model.fuse(model.encode(blanked)), b["label"])
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    feature = setup_trainer(tmp_path / "f").method
    feature.rows, feature.keep = method.rows, method.keep
    assert feature.training_step(b, 0).item() != pytest.approx(loss.item(), rel=1e-4)


class Jittered(torch.utils.data.Dataset):
    """A train split that 'augments' (adds large noise on every read) and whose eval view is the
    clean data: what a media dataset's training pipeline is to its evaluation pipeline."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def get_batch(self, idx):
        batch = self.base.get_batch(idx)
        return {k: (v + 5 * torch.randn_like(v) if k in ("m1", "m2") else v) for k, v in batch.items()}

    def eval_view(self):
        return self.base


@pytest.mark.parametrize("augment", [True, False])
def test_valuation_reads_the_augmented_pipeline_by_default(tmp_path, augment):
    """valuation_augment=true values the training pipeline's (augmented) reads, false the eval
    view. Wrong variant caught: the option not reaching ``iterate``."""
    trainer = setup_trainer(tmp_path, warmup=0, valuation_augment=augment)
    clean = independent_phi(trainer)
    trainer.splits.train = Jittered(trainer.splits.train)
    phi, valued = trainer.method.value_rows(None, len(clean))
    assert valued.all()
    assert torch.equal(phi, clean) is (not augment)


def test_valuation_pass_leaves_the_global_rngs_where_they_were(tmp_path):
    """The pass reads the augmented pipeline, whose noise comes from torch's global RNG
    (Jittered); afterwards torch, Python and NumPy draw exactly what they would have drawn
    without it, so valuing (value_in_warmup, or any epoch's pass) never shifts training's
    randomness. Wrong variant caught: the pass not run inside forked_rng."""
    trainer = setup_trainer(tmp_path, warmup=0)
    trainer.splits.train = Jittered(trainer.splits.train)

    def seed_and_draw(between=lambda: None):
        torch.manual_seed(5)
        random.seed(5)
        np.random.seed(5)
        between()
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    expected = seed_and_draw()
    assert seed_and_draw(lambda: trainer.method.value_rows(None, len(trainer.splits.train))) == expected


def test_rows_a_capped_pass_never_valued_get_no_copies(tmp_path):
    """With limit_train_batches = 1 the sample-level pass values one batch only; every other row
    (phi left at 0) is trained once, with no copy. Wrong variant caught: copy_counts applied to
    the unvalued rows' zero phi (0 lies in (-0.1, 0.4): two copies of each modality per row)."""
    trainer = setup_trainer(tmp_path, warmup=0, limit_train_batches=1)
    start_epoch(trainer, 0)
    method = trainer.method
    n = len(trainer.splits.train)
    phi, valued = method.value_rows(None, n)
    batch_size = int(trainer.cfg["batch_size"])
    assert int(valued.sum()) == batch_size < n
    times = np.bincount(method.rows, minlength=n)
    assert (times[~valued.numpy()] == 1).all()  # never valued: once, uncopied
    copies = copy_counts(phi[valued]).sum(1).numpy()
    assert np.array_equal(times[valued.numpy()], 1 + copies)
    assert len(method.rows) == n + int(copies.sum())


# ---- options, refusals, labels ---------------------------------------------------------------
@pytest.mark.parametrize(("key", "value"), [
    ("level", "modality"), ("warmup", 1), ("value", "correct"), ("drop", "input"),
    ("part_ratio", 0.05), ("alpha", 0.5), ("func", "square"),
])
def test_every_option_changes_the_training(tmp_path, fast, key, value):
    """Each option that declares it changes results does change a recorded number (the
    modality-level ones at level=modality); value_in_warmup changes none."""
    base = {**fast, **SMALL, "epochs": 2, "warmup": 0, "n_train": 200}
    if key in ("part_ratio", "alpha", "func"):
        base["level"] = "modality"
    if key == "warmup":
        base["warmup"] = 0
    a = run("valuation", "synthetic", base).record["epochs"]
    b = run("valuation", "synthetic", {**base, key: value}).record["epochs"]
    assert OPTIONS[key].changes_results
    assert [e["train_loss"] for e in a] != [e["train_loss"] for e in b]


def test_value_in_warmup_changes_no_training_number(tmp_path, fast):
    assert not OPTIONS["value_in_warmup"].changes_results
    cfg = {**fast, **SMALL, "epochs": 2, "warmup": 1}
    a = run("valuation", "synthetic", cfg).record["epochs"]
    b = run("valuation", "synthetic", {**cfg, "value_in_warmup": True, "records": str(tmp_path / "b")}).record["epochs"]
    assert [(e["train_loss"], e["test"]) for e in a] == [(e["train_loss"], e["test"]) for e in b]
    assert b[0]["estimation_cost"]["batches"] > 0 == a[0]["estimation_cost"]["batches"]


def test_refusals(tmp_path):
    with pytest.raises(ConfigError, match="level=modality"):
        setup_trainer(tmp_path, alpha=2.0)
    with pytest.raises(ConfigError):
        setup_trainer(tmp_path, part_ratio=0.0)
    with pytest.raises(ConfigError):
        setup_trainer(tmp_path, warmup=-1)
    with pytest.raises(UnsupportedError, match="at least 2"):
        setup_trainer(tmp_path, n_modalities=1)
    method = hand_method(drop="input")
    method.keep = torch.ones(2, 2)
    batch = {"a": torch.tensor([[1], [2]]), "v": torch.tensor([[1.0], [2.0]]), "label": torch.tensor([0, 1]),
             "row": torch.tensor([0, 1])}
    with pytest.raises(UnsupportedError, match="drop=feature"):
        method.training_step(batch, 0)


def test_labels_and_record_info():
    cfg = assemble(DATASETS.get("synthetic"), METHODS.get("valuation"))
    assert Valuation(cfg).label() == "Valuation"
    assert Valuation({**cfg, "level": "modality"}).label() == "Valuation (modality)"
    assert Valuation({**cfg, "level": "modality", "alpha": 2.0, "drop": "input"}).label() == \
        "Valuation (modality, input drop, alpha=2)"
    assert Valuation({**cfg, "warmup": 1, "value": "correct", "valuation_augment": False}).label() == \
        "Valuation (warmup 1, v = 1[correct], un-augmented valuation)"
    assert Valuation({**cfg, "value_in_warmup": True}).label() == "Valuation"
    info = Valuation(cfg).record_info()
    assert "official" in info["absent_modality"] and "estimation" in info["valuation_cost"]


# ---- runs --------------------------------------------------------------------------------------
def test_resume_is_identical_sample_level(tmp_path, fast, monkeypatch):
    """Killed inside a resampled epoch: the resumed run rebuilds the same plan from the
    checkpointed model and reproduces every number."""
    overrides = {**fast, **SMALL, "epochs": 3, "warmup": 1, "checkpoint": True}
    assert_resume_identical("valuation", "synthetic", overrides, tmp_path, monkeypatch, kill_epoch=2, kill_batch=3)


def test_resume_is_identical_modality_level(tmp_path, fast, monkeypatch):
    overrides = {**fast, **SMALL, "epochs": 3, "warmup": 1, "level": "modality", "alpha": 2.0, "checkpoint": True}
    assert_resume_identical("valuation", "synthetic", overrides, tmp_path, monkeypatch, kill_epoch=2, kill_batch=3)


def test_trains_well_above_chance_on_mfeat(fast, shared_data):
    """mfeat zer+mor (10 classes, chance 10 %): a few epochs, two of them resampled."""
    rec = run("valuation", "mfeat", {**fast, "modalities": ["zer", "mor"], "epochs": 6, "warmup": 3,
                                     "diagnostics": False, "log_epochs": False}).record
    assert rec["final"]["selection"]["best_val"]["test"]["fused"]["acc"] > 60.0
    assert rec["epochs"][-1]["data_passes"] > 1.0


@pytest.mark.parametrize("level", ["sample", "modality"])
def test_three_views_of_mfeat_and_the_features_dataset(tmp_path, fast, shared_data, level):
    rec = run("valuation", "mfeat", {**fast, "modalities": ["fac", "zer", "mor"], "epochs": 2, "warmup": 1,
                                     "level": level, "diagnostics": False, "log_epochs": False}).record
    diag = rec["epochs"][1]["diagnostics"]
    assert {"phi_fac", "phi_zer", "phi_mor", "copies_fac", "copies_zer", "copies_mor"} <= set(diag)
    assert "unverified" in rec["header"]["method_info"]["three_or_more_modalities"]
    from test_features_input import write

    (tmp_path / "feat").mkdir()
    rec = run("valuation", "features", {**fast, **write(tmp_path / "feat"), "epochs": 2, "warmup": 1,
                                        "level": level, "diagnostics": False, "log_epochs": False}).record
    assert rec["epochs"][1]["estimation_cost"]["batches"] > 0


def test_avdigits_runs(fast, shared_data):
    rec = run("valuation", "avdigits-noisy", {**fast, "epochs": 2, "warmup": 1, "limit_train_batches": 3,
                                              "limit_eval_batches": 2, "diagnostics": False,
                                              "log_epochs": False}).record
    e1 = rec["epochs"][1]
    assert e1["train_batches"] == 3 and e1["estimation_cost"]["batches"] == 3  # both capped
    assert {"phi_audio", "phi_image", "copies_audio", "kept_audio"} <= set(e1["diagnostics"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("level", ["sample", "modality"])
def test_cuda_bf16_cell(tmp_path, fast, level):
    rec = run("valuation", "synthetic", {**fast, **SMALL, "device": "cuda", "amp": "bf16", "epochs": 2,
                                         "warmup": 1, "level": level}).record
    assert rec["header"]["amp"] == "bf16" or rec["header"]["amp"]
    e1 = rec["epochs"][1]
    assert e1["estimation_cost"]["batches"] > 0 and math.isfinite(e1["train_loss"])
    assert e1["test"]["fused"]["acc"] > 20.0
