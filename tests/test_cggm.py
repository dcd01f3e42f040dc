"""CGGM method plugin: coefficients and direction loss by hand, the step against a hand-written
reference of the release (both direction variants), the splits the rule reads, runs, resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from method_checks import assert_resume_identical
from mmbalance.methods.cggm import (
    CGGM,
    OPTIONS,
    batch_accuracy,
    direction_loss,
    flat_cosine,
    fused_blocks,
    modulation_coefficients,
)

from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.heads import build_head
from mmbalance.runner import make_trainer, run
from mmbalance.trainer import Trainer, to_device

SYN = {"epochs": 2, "n_train": 300, "n_test": 100}
SMALL = {**SYN, "dim": 16, "embed_dim": 16, "checkpoint": False, "batch_size": 32}

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest


# ---- mathematics by hand -----------------------------------------------------------------------
def test_modulation_coefficients_by_hand():
    """Wrong variants caught here: B_m = Delta_m / D (the improving modality boosted instead of
    damped); D without the 1e-8 guard; Delta against the wrong previous accuracy."""
    # Delta = (0.25, 0.125), D = 0.375: B = (0.125, 0.25) / 0.375 = (1/3, 2/3)
    b, d = modulation_coefficients(torch.tensor([0.75, 0.5]), torch.tensor([0.5, 0.375]))
    torch.testing.assert_close(b, torch.tensor([1.0 / 3.0, 2.0 / 3.0]))
    torch.testing.assert_close(d, torch.tensor(0.375 + 1e-8))
    # three modalities: Delta = (0.1, 0.2, 0.3), D = 0.6; B = (0.5, 0.4, 0.3) / 0.6, sum M - 1 = 2
    b, _ = modulation_coefficients(torch.tensor([0.1, 0.2, 0.3]), torch.zeros(3))
    torch.testing.assert_close(b, torch.tensor([5.0 / 6.0, 4.0 / 6.0, 3.0 / 6.0]))
    assert b.sum().item() == pytest.approx(2.0)
    # one classifier got worse: Delta = (0.25, -0.125), D = 0.125 -> B = (-1, 2): the sign flips
    b, _ = modulation_coefficients(torch.tensor([0.75, 0.375]), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(b, torch.tensor([-1.0, 2.0]))
    # D = 0 exactly: only the 1e-8 guard is left, B = (1e-8 -+ 0.125) / 1e-8 (the release's blow-up)
    b, d = modulation_coefficients(torch.tensor([0.625, 0.375]), torch.tensor([0.5, 0.5]))
    assert d.item() == pytest.approx(1e-8)
    assert b[0].item() == pytest.approx(1.0 - 0.125 / 1e-8, rel=1e-4)
    assert b[1].item() == pytest.approx(1.0 + 0.125 / 1e-8, rel=1e-4)
    # no change at all: D = 1e-8, B = 1 for every modality
    b, _ = modulation_coefficients(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(b, torch.ones(2))


def test_direction_loss_cosine_accuracy_and_blocks_by_hand():
    """Wrong variants caught here: the cosine term with the other sign (the fused head pushed
    away from the classifiers); |B| replaced by B; the cosine not flattened; the concat block
    of the other modality."""
    # B = (1/3, 2/3), cos = (0.5, -1): l_gm = (1 - (1/6 - 2/3)) / 2 = 0.75
    l_gm = direction_loss(torch.tensor([1.0 / 3.0, 2.0 / 3.0]), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(l_gm, torch.tensor(0.75))
    # |B| counts: B = (-1, 2), cos = (1, 1): (3 - 1) / 2 = 1
    torch.testing.assert_close(direction_loss(torch.tensor([-1.0, 2.0]), torch.ones(2)), torch.tensor(1.0))
    # flattened cosine: (1, 0; 0, 1) vs (1, 1; 0, 0) -> 1 / (sqrt 2 sqrt 2) = 0.5
    c = flat_cosine(torch.eye(2), torch.tensor([[1.0, 1.0], [0.0, 0.0]]).bfloat16())
    assert c.dtype == torch.float32
    torch.testing.assert_close(c, torch.tensor(0.5))
    y = torch.tensor([0, 1, 1, 0])
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [0.0, 0.0]])  # argmax 0, 1, 0, 0
    torch.testing.assert_close(batch_accuracy(logits, y), torch.tensor(0.75))
    dims = {"a": 2, "b": 3}
    concat = build_head("concat", dims, 4)
    blocks = fused_blocks(concat, ["a", "b"])
    assert torch.equal(blocks["a"], concat.fc.weight[:, :2]) and torch.equal(blocks["b"], concat.fc.weight[:, 2:])
    summed = build_head("sum", dims, 4)
    assert fused_blocks(summed, ["a", "b"])["b"] is summed.fcs["b"].weight
    shared = build_head("weight", {"a": 3, "b": 3}, 4)
    assert all(w is shared.fc.weight for w in fused_blocks(shared, ["a", "b"]).values())


# ---- the step against a hand-written reference of the release -----------------------------------
def setup_trainer(tmp_path, **overrides):
    cfg = {**SMALL, "records": str(tmp_path / "runs"), "progress": "off", "device": "cpu", **overrides}
    trainer = make_trainer("cggm", "synthetic", cfg)
    trainer.setup()
    trainer.model.train()
    trainer._step_logs = {}
    return trainer


def batches(trainer, n, start=0):
    it = iter(trainer.loader(trainer.splits.train, train=False))
    out = [to_device(next(it), trainer.device) for _ in range(start + n)]
    return out[start:]


def reference_run(trainer, data, direction="current", rho=1.3, lam=0.2, clip=0.8, b_max=None):
    """CGGM as the release's msatrain.py / foodtrain.py does it, on a copy of the model:
    model.zero_grad; CE(o) [+ lam * l_gm]; backward; cls_optimizer.zero_grad (this wipes what
    l_gm sent to the classifiers); classifier CEs on detached features, backward; batch
    accuracies; B; encoder grads *= rho * B; classifier step; clip(model); model step. The
    ``stale`` direction keeps l_gm WITH its graph (clones of the weights) for the next step,
    as released; ``current`` recomputes it at the current weights with the previous B."""
    cfg = trainer.cfg
    model = copy.deepcopy(trainer.model)
    fusion, cls = model.fusion, model.extra["cggm_cls"]
    mods = model.modalities
    main = [p for m in mods for p in model.encoder_params(m)] + list(fusion.parameters())
    opt = torch.optim.SGD(main, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    cls_opt = torch.optim.SGD(cls.parameters(), lr=0.5 * cfg["lr"], momentum=cfg["momentum"],
                              weight_decay=cfg["weight_decay"])
    acc_prev, b_prev, l_gm_prev = torch.zeros(len(mods)), None, None
    sizes = [model.dims[m] for m in mods]

    def cosines(w_cls, w_fused):
        blocks = torch.split(w_fused, sizes, dim=1)
        return torch.stack([F.cosine_similarity(w_cls[i].reshape(-1), blocks[i].reshape(-1), dim=0)
                            for i in range(len(mods))])

    for batch in data:
        y = batch["label"]
        opt.zero_grad(set_to_none=True)
        feats = model.encode(batch)
        loss = F.cross_entropy(fusion(feats), y)
        if direction == "current" and b_prev is not None:
            cos = cosines([cls[m].weight for m in mods], fusion.fc.weight)
            loss = loss + lam * (b_prev.abs().sum() - (b_prev * cos).sum()) / len(mods)
        if direction == "stale" and l_gm_prev is not None:
            loss = loss + lam * l_gm_prev
        loss.backward()
        cls_opt.zero_grad(set_to_none=True)
        logits = [cls[m](feats[m].detach()) for m in mods]
        sum(F.cross_entropy(c, y) for c in logits).backward()
        acc = torch.stack([(c.argmax(1) == y).float().mean() for c in logits])
        delta = acc - acc_prev
        d = delta.sum() + 1e-8
        b = (d - delta) / d
        if b_max is not None:
            b = b.clamp(0.0, b_max)
        acc_prev = acc
        if direction == "stale":
            cos = cosines([cls[m].weight.clone() for m in mods], fusion.fc.weight.clone())
            l_gm_prev = (b.abs().sum() - (b * cos).sum()) / len(mods)
        for i, m in enumerate(mods):
            for p in model.encoder_params(m):
                p.grad = p.grad * (rho * b[i])
        cls_opt.step()
        torch.nn.utils.clip_grad_norm_(main, clip)
        opt.step()
        b_prev = b
    return model


def assert_same_params(a, b, rtol=1e-5, atol=1e-6):
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("direction", ["current", "stale"])
def test_step_matches_the_hand_written_release(tmp_path, direction):
    """Four steps against the reference. Wrong variants caught here: the magnitude scaled with
    the previous step's B (or the direction term built with this step's B); the scaling put on
    the other modality's encoder; acc_prev never updated (Delta always against 0); the
    classifier weights left attached in l_gm (the classifiers then take the direction
    gradient); the classifiers fed the live features (their CE reaches the encoders); the
    classifiers stepped through the trainer's clipped step; clipping before the scaling;
    (stale) the stored gradient taken after the update, or at the current step."""
    trainer = setup_trainer(tmp_path, cggm_direction=direction)
    data = batches(trainer, 4)
    ref = reference_run(trainer, data, direction=direction)
    for i, batch in enumerate(data):
        trainer.method.training_step(batch, i)
    assert_same_params(trainer.model, ref)
    assert trainer.optimizer_steps == 4  # the model's steps; the classifiers step on their own
    logs = trainer._step_logs
    assert {"B_m1", "B_m2", "acc_m1", "acc_m2", "cos_m1", "cos_m2", "small_D"} <= set(logs)
    for k in range(4):  # two modalities: B_1 + B_2 = M - 1 = 1 at every step
        assert (logs["B_m1"][k] + logs["B_m2"][k]).item() == pytest.approx(1.0, abs=1e-4)
    # the modulation really acted: plain joint training of the same model gives other encoders
    plain = reference_run(trainer, data, direction="current", rho=1.0, lam=0.0)
    assert not torch.allclose(plain.encoder_params("m1")[0], trainer.model.encoder_params("m1")[0])
    assert all(p.grad is None for p in trainer.model.parameters())


def test_direction_variants_differ_and_none_drops_the_term(tmp_path):
    """The current-weights default differs from the release's stale form (it is not a no-op
    rename), and ``none`` equals the reference with lambda = 0."""
    runs = {}
    for direction in ("current", "stale", "none"):
        t = setup_trainer(tmp_path / direction, cggm_direction=direction)
        for i, batch in enumerate(batches(t, 4)):
            t.method.training_step(batch, i)
        runs[direction] = t
    w = {k: t.model.fusion.fc.weight for k, t in runs.items()}
    assert not torch.allclose(w["current"], w["stale"], atol=1e-7)
    assert not torch.allclose(w["current"], w["none"], atol=1e-7)
    fresh = setup_trainer(tmp_path / "none2", cggm_direction="none")
    ref = reference_run(fresh, batches(fresh, 4), direction="current", lam=0.0)
    assert_same_params(runs["none"].model, ref)


def test_b_guard_clamps_the_coefficients(tmp_path):
    trainer = setup_trainer(tmp_path, cggm_b_max=0.6)
    data = batches(trainer, 4)
    ref = reference_run(trainer, data, b_max=0.6)
    for i, batch in enumerate(data):
        trainer.method.training_step(batch, i)
    assert_same_params(trainer.model, ref)
    b = torch.stack(trainer._step_logs["B_m1"] + trainer._step_logs["B_m2"])
    assert (b >= 0).all() and (b <= torch.tensor(0.6)).all()
    assert ((b == 0) | (b == torch.tensor(0.6))).any()  # the clamp acted on these batches


def test_gradients_reach_only_their_owners(tmp_path):
    """The classifiers' CE never reaches an encoder or the fused head; the direction term
    reaches the fused head only (never the classifiers)."""
    trainer = setup_trainer(tmp_path)
    method, model = trainer.method, trainer.model
    batch = batches(trainer, 1)[0]
    method.b_prev = torch.tensor([0.3, 0.7])
    seen = {}
    original = method.manual_backward

    def spy(loss, **kw):
        before = {id(p): (None if p.grad is None else p.grad.clone()) for p in model.parameters()}
        original(loss, **kw)
        seen[len(seen)] = {id(p) for p in model.parameters()
                           if p.grad is not None and (before[id(p)] is None or not torch.equal(before[id(p)], p.grad))}

    method.manual_backward = spy
    trainer.optimizer_step = lambda opt: None  # look at the gradients only
    method.optimizers["cls"].step = lambda: None
    method.optimizers["cls"].zero_grad = lambda set_to_none=True: None
    method.training_step(batch, 0)
    cls = {id(p) for p in model.extra["cggm_cls"].parameters()}
    main = {id(p) for m in model.modalities for p in model.encoder_params(m)} | {id(p) for p in model.fusion_params()}
    assert seen[0] == main  # CE(o) + lambda l_gm: encoders and fused head, no classifier
    assert seen[1] == cls  # the classifiers' CEs: nothing else


# ---- the splits the rule reads ----------------------------------------------------------------
def scrambled_test_labels(monkeypatch):
    original = Trainer.setup

    def setup(self):
        original(self)
        labels = self.splits.test.labels
        self.splits.test.labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(7))]

    monkeypatch.setattr(Trainer, "setup", setup)


def trajectory(rec):
    return [(e["train_loss"], e["val"], e["diagnostics"]) for e in rec["epochs"]]


@pytest.mark.parametrize("source", ["train_batch", "val"])
def test_the_test_split_is_never_read(fast, monkeypatch, source):
    """The same run with the test split's labels scrambled trains identically (loss, val
    metrics, every diagnostic, final weights), while its test numbers change. Wrong variant
    caught here: acc_source=val reading the epoch's test metrics instead of val."""
    cfg = {**fast, **SYN, "epochs": 3, "cggm_acc_source": source}
    a = make_trainer("cggm", "synthetic", cfg)
    rec_a = a.fit()
    scrambled_test_labels(monkeypatch)
    b = make_trainer("cggm", "synthetic", {**cfg, "records": cfg["records"] + "-scrambled"})
    rec_b = b.fit()
    assert trajectory(rec_a) == trajectory(rec_b)
    assert_same_params(a.model, b.model, rtol=0, atol=0)
    assert [e["test"] for e in rec_a["epochs"]] != [e["test"] for e in rec_b["epochs"]]


def test_val_source_uses_the_validation_improvement(tmp_path):
    """acc_source=val: balanced B = (M-1)/M until the first validation, then B from the
    classifiers' validation accuracies (Delta against the previous validation, 0 at first)."""
    trainer = setup_trainer(tmp_path, cggm_acc_source="val")
    method = trainer.method
    torch.testing.assert_close(method.b_epoch, torch.tensor([0.5, 0.5]))
    val = {"m1": {"acc": 60.0}, "m2": {"acc": 20.0}, "fused": {"acc": 70.0}}
    method.on_validation_end({"val": val, "test": {"m1": {"acc": 0.0}, "m2": {"acc": 90.0}}, "epoch": 0})
    torch.testing.assert_close(method.b_epoch, torch.tensor([0.25, 0.75]))  # Delta = (0.6, 0.2)
    val = {"m1": {"acc": 70.0}, "m2": {"acc": 50.0}}
    method.on_validation_end({"val": val, "test": {"m1": {"acc": 0.0}, "m2": {"acc": 0.0}}, "epoch": 1})
    torch.testing.assert_close(method.b_epoch, torch.tensor([0.75, 0.25]))  # Delta = (0.1, 0.3)
    data = batches(trainer, 1)
    b_before = method.b_epoch.clone()
    method.training_step(data[0], 0)
    torch.testing.assert_close(method.b_prev, b_before)  # a step does not move B in val mode
    torch.testing.assert_close(trainer._step_logs["B_m1"][0], torch.tensor(0.75))


# ---- options, runs, resume -------------------------------------------------------------------
ALTERNATIVES = {
    "cggm_rho": 0.7, "cggm_lambda": 2.0, "cggm_cls_lr": 2.0, "cggm_direction": "stale",
    "cggm_acc_source": "val", "cggm_b_max": 0.6, "fusion_mode": "sum",
}


def test_every_option_reaches_the_step(tmp_path):
    """Each declared option, set to another value, changes the model after three steps from
    the same initialisation (an option that never reaches the step fails here)."""
    assert set(ALTERNATIVES) == set(OPTIONS)

    def weights(**overrides):
        t = setup_trainer(tmp_path / str(len(list(tmp_path.iterdir()))), **overrides)
        for i, batch in enumerate(batches(t, 3)):
            t.method.training_step(batch, i)
        return torch.cat([p.detach().reshape(-1) for p in t.model.parameters()])

    base = weights()
    assert torch.equal(weights(), base)  # deterministic: a difference below is the option's
    for key, value in ALTERNATIVES.items():
        assert not torch.equal(weights(**{key: value}), base), key


def test_mfeat_zer_mor_trains_well_above_chance(fast, shared_data):
    """Real data (10 classes, chance 10 %): five epochs of the default rule."""
    r = run("cggm", "mfeat", {**fast, "epochs": 5, "modalities": ["zer", "mor"], "diagnostics": False})
    sel = r.final["best_val"]["test"]
    assert sel["fused"]["acc"] > 50.0
    assert sel["zer"]["acc"] > 25.0 and sel["mor"]["acc"] > 25.0  # the classifiers learn too


def test_two_epochs_on_synthetic_record_the_rule(fast):
    rec = run("cggm", "synthetic", {**fast, **SYN}).record
    h = rec["header"]
    assert h["method_label"] == "CGGM" and h["method_info"]["per_modality"] == "method"
    assert h["config"]["grad_clip"] == 0.8
    for e in rec["epochs"]:
        assert e["optimizer_steps"] == e["train_batches"]
        assert set(e["lrs"]) == {"main/encoder.m1", "main/encoder.m2", "main/fusion", "cls/classifiers"}
        assert e["lrs"]["cls/classifiers"] == pytest.approx(0.5 * e["lrs"]["main/fusion"])
        assert all(math.isfinite(e["diagnostics"][k]) for k in ("acc_m1", "acc_m2", "cos_m1", "l_gm"))
        assert {"m1", "m2", "fused"} <= set(e["test"])


def test_three_modalities_and_mfeat_views(fast, shared_data):
    rec = run("cggm", "synthetic", {**fast, **SYN, "n_modalities": 3, "epochs": 1}).record
    e = rec["epochs"][0]
    assert {"B_m3", "cos_m3", "acc_m3"} <= set(e["diagnostics"]) and "m3" in e["test"]
    rec = run("cggm", "mfeat", {**fast, "epochs": 1, "modalities": ["fac", "zer", "mor"],
                                "limit_train_batches": 4, "diagnostics": False}).record
    assert {"fac", "zer", "mor"} <= set(rec["epochs"][0]["test"])


@pytest.mark.parametrize("overrides", [{}, {"cggm_direction": "stale"}, {"cggm_acc_source": "val"}],
                         ids=["default", "stale", "val"])
def test_resume_is_identical(fast, tmp_path, monkeypatch, overrides):
    """acc_prev, the previous B, the stored stale gradient and the validation B are in the
    state. Wrong variants caught here: any of them left out of state_dict (the resumed epoch
    starts from acc 0, no direction term, or the balanced B)."""
    assert_resume_identical("cggm", "synthetic", {**fast, **SYN, "epochs": 3, **overrides}, tmp_path, monkeypatch)


def test_bf16_autocast_step_keeps_fp32_state(tmp_path):
    trainer = setup_trainer(tmp_path, amp="bf16", cggm_direction="stale")
    method = trainer.method
    for i, batch in enumerate(batches(trainer, 3)):
        loss = method.training_step(batch, i)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert method.b_prev.dtype == torch.float32 and method.acc_prev.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in method.stale_grad.values())
    with trainer.autocast():
        pred = method.predict(batches(trainer, 1)[0])
    assert set(pred.per_modality) == {"m1", "m2"}


def test_predict_reports_the_classifiers(tmp_path):
    trainer = setup_trainer(tmp_path)
    trainer.model.eval()
    batch = batches(trainer, 1)[0]
    pred = trainer.method.predict(batch)
    feats = trainer.model.encode(batch)
    torch.testing.assert_close(pred.fused, trainer.model.fuse(feats))
    torch.testing.assert_close(pred.per_modality["m2"], trainer.model.extra["cggm_cls"]["m2"](feats["m2"]))


def test_labels_and_refusals(fast):
    assert CGGM({}).label() == "CGGM"
    assert CGGM({"cggm_direction": "stale", "cggm_b_max": 2.0}).label() == \
        "CGGM (stale direction, as released, B in [0, 2])"
    with pytest.raises(ConfigError, match="test split"):
        make_trainer("cggm", "synthetic", {**fast, **SMALL, "cggm_acc_source": "val", "val_fraction": 0.0}).setup()
    with pytest.raises(UnsupportedError, match="at least 2"):
        make_trainer("cggm", "synthetic", {**fast, **SMALL, "n_modalities": 1}).check()
    with pytest.raises(ConfigError, match="cggm_direction"):
        make_trainer("cggm", "synthetic", {**fast, **SMALL, "cggm_direction": "gradients"})


@pytest.mark.gpu
def test_cell_runs_on_cuda_with_bf16(tmp_path):
    r = run("cggm", "synthetic", {**SYN, "records": str(tmp_path), "device": "cuda", "progress": "off",
                                  "cggm_direction": "stale"})
    assert r.record["header"]["amp"] == "bfloat16"
    assert r.final["last"]["test"]["fused"]["acc"] > 20.0
