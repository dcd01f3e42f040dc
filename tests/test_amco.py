"""AMCo method plugin: mask ratio, mask draw, dependence test and loss by hand; the step against
a hand-written reference; every option reaching the step; resume; real data; refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from method_checks import assert_resume_identical
from mmbalance.methods.amco import (
    AMCo,
    amco_loss,
    apply_mask,
    dependence_masses,
    keep_masks,
    masked_count,
    ratio_global,
    ratio_per_epoch_bb,
    step_seed,
)

from mmbalance.errors import ConfigError, MMBalanceError
from mmbalance.runner import make_trainer, run
from mmbalance.trainer import to_device

SMALL = {"epochs": 2, "n_train": 300, "n_test": 100, "dim": 16, "embed_dim": 16, "checkpoint": False}

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest


# ---- mathematics by hand -----------------------------------------------------------------------
def test_global_ratio_by_hand():
    """sin(pi/2 min(1, t / (eps T))): T = 100, eps = 0.3, so the ramp ends at step 30.
    Wrong variant caught here: the ramp measured in epochs or with t + 1 (step 0 must give 0)."""
    assert ratio_global(0, 100, 0.3) == 0.0
    assert ratio_global(10, 100, 0.3) == pytest.approx(0.5)  # sin(pi/6)
    assert ratio_global(15, 100, 0.3) == pytest.approx(math.sqrt(0.5))  # sin(pi/4)
    assert ratio_global(30, 100, 0.3) == 1.0
    assert ratio_global(99, 100, 0.3) == 1.0
    assert ratio_global(5, 0, 0.3) == 1.0  # no steps: no ramp (never a division by zero)


def test_per_epoch_ramp_reproduces_balancebenchmark():
    """BalanceBenchmark's counter grows by epoch/10 after each batch: epoch 1 gives p = 0, 1/2,
    0.87, 1, 1, ...; epoch 2 gives 0, 0.87, 1; epoch 0 never masks. Wrong variant caught here:
    the counter advanced before it is used (epoch 1 would start at p = 1/2)."""
    m = AMCo({"amco_schedule": "per_epoch_bb", "epochs": 5, "seed": 0})
    seqs = {}
    for epoch in (0, 1, 2):
        m.epoch = epoch
        m.on_train_epoch_start(epoch)
        seqs[epoch] = [m.mask_ratio() for _ in range(5)]
    assert seqs[0] == [0.0] * 5
    assert seqs[1] == pytest.approx([0.0, 0.5, math.sqrt(3) / 2, 1.0, 1.0])
    assert seqs[2] == pytest.approx([0.0, math.sqrt(3) / 2, 1.0, 1.0, 1.0])
    assert ratio_per_epoch_bb(0.15, 0.3) == pytest.approx(math.sqrt(0.5))


def test_global_ratio_follows_the_run_step_not_the_batch_index():
    """Wrong variant caught here: the ratio taken from the batch index within the epoch (it
    would restart every epoch) or one step late."""
    m = AMCo({"epochs": 4, "seed": 0})
    m.num_training_batches = 25  # T = 100, ramp over 30 steps
    m.global_step, m.epoch = 10, 0
    assert m.mask_ratio() == pytest.approx(0.5)
    m.global_step, m.epoch = 40, 1
    assert m.mask_ratio() == 1.0
    m.global_step = 0
    assert m.mask_ratio() == 0.0


def test_masked_count_is_a_floor_like_balancebenchmark():
    """int(p * n): sin(pi/6) is 0.49999999999999994 in floating point, so 10 logits lose 4, not 5.
    Wrong variant caught here: rounding instead of the floor."""
    assert masked_count(math.sin(math.pi / 6), 10) == 4
    assert masked_count(0.5, 10) == 5
    assert masked_count(0.999, 128) == 127
    assert masked_count(1.0, 128) == 128
    assert masked_count(0.0, 7) == 0


def test_keep_masks_have_exactly_n_zeros_and_follow_the_generator():
    g = torch.Generator().manual_seed(3)
    one = keep_masks(10, 4, 1, g)
    assert one.shape == (1, 10) and one.dtype == torch.float32
    assert int((one == 0).sum()) == 4 and set(one.unique().tolist()) == {0.0, 1.0}
    many = keep_masks(10, 4, 6, torch.Generator().manual_seed(3))
    assert ((many == 0).sum(1) == 4).all()
    assert len({tuple(r.tolist()) for r in many}) > 1  # one mask per sample: rows differ
    again = keep_masks(10, 4, 1, torch.Generator().manual_seed(3))
    assert torch.equal(one, again)
    assert torch.equal(keep_masks(5, 0, 2), torch.ones(2, 5))
    assert torch.equal(keep_masks(5, 5, 2), torch.zeros(2, 5))
    assert step_seed(0, 1) != step_seed(0, 2) and step_seed(0, 1) != step_seed(1, 1)


def test_apply_mask_only_where_flagged_and_rescale():
    """Wrong variant caught here: the rescale applied to an unflagged modality."""
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    keep = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    assert torch.equal(apply_mask(x, keep, torch.tensor(True)), torch.tensor([[1.0, 0, 3, 0], [5, 0, 7, 0]]))
    assert torch.equal(apply_mask(x, keep, torch.tensor(False)), x)
    assert torch.equal(apply_mask(x, keep, torch.tensor(False), scale=2.0), x)
    assert torch.equal(apply_mask(x, keep, torch.tensor(True), scale=2.0), torch.tensor([[2.0, 0, 6, 0], [10, 0, 14, 0]]))
    per_sample = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    assert torch.equal(apply_mask(x, per_sample, torch.tensor(True)), torch.tensor([[1.0, 0, 3, 4], [0, 6, 7, 8]]))
    assert apply_mask(x.bfloat16(), keep, torch.tensor(True)).dtype == torch.bfloat16


def test_dependence_masses_by_hand():
    """One softmax over all M*C logits of a sample. Sample 1: z1 = (0, 0), z2 = (ln 3, ln 3):
    exp = (1, 1, 3, 3) / 8, shares (1/4, 3/4). Sample 2: z1 = (ln 3, 0), z2 = (0, 0): (3, 1, 1, 1) / 6,
    shares (2/3, 1/3). Batch means (11/24, 13/24). Wrong variant caught here: a softmax per
    modality block (every share would be 1/2) or a sum over the batch instead of the mean."""
    z1 = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    z2 = torch.tensor([[math.log(3.0), math.log(3.0)], [0.0, 0.0]])
    masses = dependence_masses([z1, z2])
    torch.testing.assert_close(masses, torch.tensor([11 / 24, 13 / 24]))
    assert masses.dtype == torch.float32
    assert dependence_masses([z1.bfloat16(), z2.bfloat16()]).dtype == torch.float32
    three = dependence_masses([z1, z2, torch.zeros(2, 2)])
    assert three.sum().item() == pytest.approx(1.0)


def test_amco_loss_by_hand():
    """CE(o) + sum_m CE(z_m); with all-zero logits over C = 4 classes every term is ln 4."""
    y = torch.tensor([0, 3])
    z = torch.zeros(2, 4)
    assert amco_loss(z, [z, z], y).item() == pytest.approx(3 * math.log(4.0))
    o = torch.tensor([[math.log(3.0), 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    expected = 0.5 * (-math.log(0.5) + math.log(4.0)) + 2 * math.log(4.0)
    assert amco_loss(o, [z, z], y).item() == pytest.approx(expected)


# ---- the step ----------------------------------------------------------------------------------
def setup_trainer(tmp_path, **overrides):
    cfg = {**SMALL, "records": str(tmp_path / "runs"), "progress": "off", "device": "cpu", **overrides}
    trainer = make_trainer("amco", "synthetic", cfg)
    trainer.setup()
    trainer.model.train()
    trainer.method.num_training_batches = len(trainer.loader(trainer.splits.train, train=True))
    trainer.method.on_fit_start()
    trainer._step_logs = {}
    return trainer


def first_batch(trainer):
    return to_device(next(iter(trainer.loader(trainer.splits.train, train=False))), trainer.device)


def capture_features(model):
    """Keep each encoder's output (with its gradient) through forward hooks."""
    seen = {}

    def hook(name):
        def keep(module, inputs, output):
            output.retain_grad()
            seen[name] = output
        return keep

    handles = [model.encoders[m].register_forward_hook(hook(m)) for m in model.modalities]
    return seen, handles


def hand_loss(model, batch, masked: dict[str, torch.Tensor]):
    """AMCo's loss written out: the features of m times masked[m] (1 = untouched), the concat
    head's blocks W_m e_m + b/2, o = L*(z_1 + z_2), CE(o) + CE(z_1) + CE(z_2)."""
    w, b = model.fusion.fc.weight, model.fusion.fc.bias
    e = {m: model.encoders[m](batch[m]) * masked[m] for m in model.modalities}
    d1 = e["m1"].shape[1]
    z1 = e["m1"] @ w[:, :d1].t() + b / 2
    z2 = e["m2"] @ w[:, d1:].t() + b / 2
    o = model.extra["lstar"](z1 + z2)
    y = batch["label"]
    return F.cross_entropy(o, y) + F.cross_entropy(z1, y) + F.cross_entropy(z2, y), z1, z2


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_flags_of_a_step_apply_at_the_next_step(tmp_path):
    """First step: no flag yet, so nothing is masked even at p = 1; it sets the flags from its
    own parts (mass > 1/2). Second step at p = 1: the flagged modality's features are all zero.
    Wrong variants caught here: flags used in the same step; the other modality masked; the
    unimodal (co-optimised) CEs taken on the unmasked parts."""
    t = setup_trainer(tmp_path)
    method, model = t.method, t.model
    batch = first_batch(t)
    method.global_step = 10_000  # p = 1
    loss = method.training_step(batch, 0)
    ref, z1, z2 = hand_loss(model, batch, {"m1": 1.0, "m2": 1.0})
    torch.testing.assert_close(loss, ref)
    masses = dependence_masses([z1, z2])
    assert torch.equal(method.flags, masses > 0.5)
    assert method.flags.sum().item() == 1  # two masses summing to 1: exactly one is above 1/2
    flagged = "m1" if method.flags[0] else "m2"
    loss2 = method.training_step(batch, 1)
    ref2, *_ = hand_loss(model, batch, {m: (0.0 if m == flagged else 1.0) for m in model.modalities})
    torch.testing.assert_close(loss2, ref2)
    logs = t._step_logs
    assert [v.item() for v in logs[f"dependent_{flagged}"]] == [0.0, 1.0]
    assert logs["mask_ratio"] == [1.0, 1.0]


@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_partial_mask_zeroes_exactly_n_feature_channels_of_the_flagged_modality(tmp_path, scope):
    """p = sin(pi/2 * 0.15 T / 0.3 T) ~ 0.71: floor(0.71 * 16) = 11 of the 16 channels of m2 carry
    no gradient (the same channels for the whole batch, or other ones per sample); m1 is untouched.
    Wrong variants caught here: the mask on the wrong modality, or on the logits when features
    are asked for, or one mask for the batch under amco_mask_scope=sample."""
    t = setup_trainer(tmp_path, amco_mask_scope=scope)
    method, model = t.method, t.model
    method.flags = torch.tensor([False, True])
    T = SMALL["epochs"] * method.num_training_batches
    method.global_step = int(0.15 * T)
    n = masked_count(ratio_global(method.global_step, T, 0.3), 16)
    assert 0 < n < 16
    seen, handles = capture_features(model)
    method.training_step(first_batch(t), 0).backward()
    for h in handles:
        h.remove()
    g1, g2 = seen["m1"].grad, seen["m2"].grad
    assert ((g2 == 0).sum(1) == n).all()  # every sample loses exactly n channels
    assert not (g1 == 0).any()  # the unflagged modality keeps every channel
    zero_columns = int((g2 == 0).all(0).sum())
    if scope == "batch":
        assert zero_columns == n
    else:
        assert zero_columns < n  # the samples' masks differ


def test_partial_mask_matches_the_generator_of_the_step(tmp_path):
    """The loss equals the hand-written one with the masks drawn from the generator seeded from
    (seed, step), m1 first, then m2 (one row per batch). Wrong variants caught here: a mask not
    seeded from the step (a resumed run would draw other masks); the mask on the other modality."""
    t = setup_trainer(tmp_path)
    method, model = t.method, t.model
    method.flags = torch.tensor([False, True])
    T = SMALL["epochs"] * method.num_training_batches
    method.global_step = int(0.15 * T)
    p = ratio_global(method.global_step, T, 0.3)
    batch = first_batch(t)
    loss = method.training_step(batch, 0)
    g = torch.Generator().manual_seed(step_seed(0, method.global_step))
    masks = {m: keep_masks(16, masked_count(p, 16), 1, g) for m in ("m1", "m2")}
    ref, *_ = hand_loss(model, batch, {"m1": 1.0, "m2": masks["m2"]})
    torch.testing.assert_close(loss, ref)
    other, *_ = hand_loss(model, batch, {"m1": masks["m1"], "m2": 1.0})
    assert not torch.allclose(loss, other)


def test_rescale_boosts_the_kept_channels_by_width_over_kept(tmp_path):
    """amco_rescale=true is inverted dropout: the flagged modality's kept channels are multiplied
    by 16 / (16 - n), with the masks of the step's generator as above. Wrong variant caught here: the
    factor inverted to (16 - n) / 16 (the kept channels shrunk instead of boosted)."""
    t = setup_trainer(tmp_path, amco_rescale=True)
    method, model = t.method, t.model
    method.flags = torch.tensor([False, True])
    T = SMALL["epochs"] * method.num_training_batches
    method.global_step = int(0.15 * T)
    n = masked_count(ratio_global(method.global_step, T, 0.3), 16)
    assert 0 < n < 16
    batch = first_batch(t)
    loss = method.training_step(batch, 0)
    g = torch.Generator().manual_seed(step_seed(0, method.global_step))
    keep = {m: keep_masks(16, n, 1, g) for m in ("m1", "m2")}
    ref, *_ = hand_loss(model, batch, {"m1": 1.0, "m2": keep["m2"] * (16 / (16 - n))})
    torch.testing.assert_close(loss, ref)


def test_logit_mask_zeroes_the_flagged_parts(tmp_path):
    """amco_mask_on=logits_bb at p = 1: the flagged modality's part is all zeros, so
    o = L*(z_other) and its own CE is ln C."""
    t = setup_trainer(tmp_path, amco_mask_on="logits_bb")
    method, model = t.method, t.model
    method.flags = torch.tensor([True, False])
    method.global_step = 10_000
    batch = first_batch(t)
    loss = method.training_step(batch, 0)
    _, z1, z2 = hand_loss(model, batch, {"m1": 1.0, "m2": 1.0})
    y = batch["label"]
    expected = (F.cross_entropy(model.extra["lstar"](z2), y) + math.log(10.0) + F.cross_entropy(z2, y))
    torch.testing.assert_close(loss, expected)


def test_clean_flags_test_the_unmasked_parts(tmp_path):
    """With m1 fully masked, the masked test sees z1 = b/2 while the clean test sees m1's real
    part. Wrong variant caught here: the default tests the clean parts (or clean tests masked)."""
    out = {}
    for flag_on in ("masked", "clean"):
        t = setup_trainer(tmp_path, amco_flag_on=flag_on)
        method, model = t.method, t.model
        method.flags = torch.tensor([True, False])
        method.global_step = 10_000
        batch = first_batch(t)
        method.training_step(batch, 0)
        _, z1, z2 = hand_loss(model, batch, {"m1": 0.0 if flag_on == "masked" else 1.0, "m2": 1.0})
        torch.testing.assert_close(t._step_logs["mass_m1"][0], dependence_masses([z1, z2])[0])
        out[flag_on] = t._step_logs["mass_m1"][0].item()
    assert out["masked"] != out["clean"]


def test_sigma_defaults_to_one_over_m(tmp_path, fast):
    """Wrong variant caught here: sigma 0.5 for three modalities (almost never a flag)."""
    t = make_trainer("amco", "synthetic", {**fast, **SMALL, "n_modalities": 3})
    t.setup()
    assert t.method.sigma == pytest.approx(1 / 3)
    assert setup_trainer(tmp_path).method.sigma == 0.5
    assert setup_trainer(tmp_path, amco_sigma=0.7).method.sigma == 0.7


def test_flags_reset_each_epoch_only_in_the_balancebenchmark_schedule(tmp_path):
    """Wrong variant caught here: the global schedule resetting the flags at every epoch."""
    for schedule, kept in (("global", True), ("per_epoch_bb", False)):
        t = setup_trainer(tmp_path, amco_schedule=schedule)
        t.method.flags = torch.tensor([True, False])
        t.method.on_train_epoch_start(1)
        assert t.method.flags.tolist() == ([True, False] if kept else [False, False])


def test_predict_applies_lstar_or_the_plain_sum(tmp_path):
    """Wrong variant caught here: L* skipped at evaluation by default (or applied under
    amco_eval=sum_parts_bb)."""
    t = setup_trainer(tmp_path)
    model = t.model
    model.eval()
    batch = first_batch(t)
    _, z1, z2 = hand_loss(model, batch, {"m1": 1.0, "m2": 1.0})
    pred = t.method.predict(batch)
    torch.testing.assert_close(pred.fused, model.extra["lstar"](z1 + z2))
    torch.testing.assert_close(pred.per_modality["m1"], z1)
    t.method.eval_rule = "sum_parts_bb"
    torch.testing.assert_close(t.method.predict(batch).fused, z1 + z2)


def step_outcome(tmp_path, **opts):
    """One step with both modalities flagged at a mid-ramp ratio; returns what it computes: the
    loss, the masses that set the next flags, and the evaluation output."""
    t = setup_trainer(tmp_path, **opts)
    method = t.method
    torch.manual_seed(0)
    method.flags = torch.tensor([True, True])
    method.epoch = 1
    T = SMALL["epochs"] * method.num_training_batches
    method.global_step = int(0.15 * T)
    batch = first_batch(t)
    if method.schedule == "per_epoch_bb":
        method.counter = 0.1  # BalanceBenchmark's second batch of epoch 1: p = 1/2
    loss = method.training_step(batch, 1).detach()
    t.model.eval()
    fused = method.predict(batch).fused
    return loss, method.flags.clone(), torch.stack(t._step_logs["mass_m1"]), fused


@pytest.mark.parametrize("key,value", [
    ("amco_mask_on", "logits_bb"), ("amco_schedule", "per_epoch_bb"), ("amco_eps", 0.6),
    ("amco_sigma", 0.2), ("amco_mask_scope", "sample"), ("amco_flag_on", "clean"),
    ("amco_rescale", True), ("amco_lstar", False), ("amco_eval", "sum_parts_bb"),
])
def test_every_option_reaches_the_step(tmp_path, key, value):
    """Each declared option changes what a step or the evaluation computes (an option that never
    reaches the step is a wrong variant)."""
    assert key in AMCo.options
    base = step_outcome(tmp_path / "base")
    other = step_outcome(tmp_path / "other", **{key: value})
    differs = [not torch.equal(a, b) for a, b in zip(base, other, strict=True)]
    assert any(differs), key
    if key == "amco_sigma":
        assert differs[1]  # the flags of the next step
    if key == "amco_eval":
        assert differs == [False, False, False, True]


# ---- runs --------------------------------------------------------------------------------------
def test_synthetic_records_diagnostics_and_label(fast):
    res = run("amco", "synthetic", {**fast, **SMALL, "epochs": 2})
    rec = res.record
    diag = rec["epochs"][-1]["diagnostics"]
    assert {"mask_ratio", "dependent_m1", "dependent_m2", "mass_m1", "mass_m2"} <= set(diag)
    assert 0.0 <= diag["dependent_m1"] <= 1.0
    assert diag["mass_m1"] + diag["mass_m2"] == pytest.approx(1.0, abs=1e-5)
    info = rec["header"]["method_info"]
    assert info["per_modality"] == "method" and "L*" in info["inference_rule"]
    assert rec["header"]["method_label"] == "AMCo"
    assert rec["epochs"][-1]["optimizer_steps"] > 0


def test_resume_is_identical(tmp_path, monkeypatch):
    """The dependence flags at the end of an epoch carry into the next one (global schedule), so
    they must be checkpointed. Wrong variant caught here: flags left out of state_dict."""
    assert_resume_identical("amco", "synthetic", {**SMALL, "epochs": 3, "checkpoint": True, "progress": "off",
                                                  "device": "cpu"}, tmp_path, monkeypatch)


def test_resume_is_identical_balancebenchmark_mode(tmp_path, monkeypatch):
    assert_resume_identical("amco", "synthetic", {**SMALL, "epochs": 3, "checkpoint": True, "progress": "off",
                                                  "device": "cpu", "amco_mask_on": "logits_bb",
                                                  "amco_schedule": "per_epoch_bb"}, tmp_path, monkeypatch)


def test_mfeat_trains_well_above_chance(fast, shared_data):
    """Real data: mfeat zer+mor (10 classes, chance 10 %), a few epochs."""
    res = run("amco", "mfeat", {**fast, "modalities": ["zer", "mor"], "epochs": 6, "diagnostics": False})
    acc = res.record["final"]["selection"]["best_val"]["test"]["fused"]["acc"]
    assert acc > 40.0  # 6 epochs reach about 60 %; the full 30-epoch recipe about 84 %


def test_three_modalities_run(fast):
    res = run("amco", "synthetic", {**fast, **SMALL, "epochs": 1, "n_modalities": 3})
    diag = res.record["epochs"][-1]["diagnostics"]
    assert {"dependent_m1", "dependent_m2", "dependent_m3"} <= set(diag)


def test_labels():
    assert AMCo({}).label() == "AMCo"
    bb = AMCo({"amco_mask_on": "logits_bb", "amco_schedule": "per_epoch_bb", "amco_eval": "sum_parts_bb"})
    assert bb.label() == "AMCo (logit mask (BB), per-epoch ramp (BB), eval sum of parts (BB))"
    assert AMCo({"amco_lstar": False, "amco_sigma": 0.4}).label() == "AMCo (sigma=0.4, no L*)"


def test_refusals(fast):
    with pytest.raises(ConfigError, match="amco_eval=sum_parts_bb"):
        AMCo({"amco_lstar": False, "amco_eval": "sum_parts_bb"})
    with pytest.raises(MMBalanceError, match="at least 2"):
        make_trainer("amco", "synthetic", {**fast, "modalities": ["m1"]}).check()
    with pytest.raises(ConfigError, match="amco_sigma"):
        make_trainer("amco", "synthetic", {**fast, "amco_sigma": 1.0})
    with pytest.raises(ConfigError, match="amco_mask_on"):
        make_trainer("amco", "synthetic", {**fast, "amco_mask_on": "inputs"})


@pytest.mark.gpu
def test_cuda_bf16_cell(tmp_path):
    res = run("amco", "synthetic", {"epochs": 2, "n_train": 600, "n_test": 200, "device": "cuda",
                                    "records": str(tmp_path), "progress": "off"})
    assert res.record["header"]["amp"] == "bfloat16"
    assert res.record["final"]["selection"]["last"]["test"]["fused"]["acc"] > 20.0
