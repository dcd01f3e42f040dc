"""AUG method plugin: check epochs, learner assignment and loss by hand, the step against a
hand-written reference of the release, learners that stay put until activated, runs, resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from method_checks import assert_resume_identical
from mmbalance.methods.aug import (
    AUG,
    OPTIONS,
    LearnerStacks,
    assign_learners,
    aug_loss,
    check_epochs,
    check_interval,
    confidence_sum,
    ensemble_ratios,
)

from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.runner import make_trainer, run
from mmbalance.trainer import to_device

SYN = {"epochs": 2, "n_train": 300, "n_test": 100}
SMALL = {**SYN, "dim": 16, "embed_dim": 16, "checkpoint": False, "batch_size": 32, "aug_hidden": 8}

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest


# ---- mathematics by hand -----------------------------------------------------------------------
def test_check_epochs_by_hand():
    """Wrong variants caught here: checks at e % every == 0 (one epoch early), the release's
    E / 10 computed as a float or as E // 10 for E <= 10, the last epoch checked."""
    assert check_interval(200) == 20 and check_interval(30) == 3 and check_interval(10) == 1
    assert check_interval(11) == 1
    assert check_epochs(200, 20) == [0, 19, 39, 59, 79, 99, 119, 139, 159, 179]  # 199 never trains
    assert check_epochs(30, 3) == [0, 2, 5, 8, 11, 14, 17, 20, 23, 26]
    assert check_epochs(5, 1) == [0, 1, 2, 3]
    assert check_epochs(1, 1) == []


def test_assignment_by_hand():
    """Two modalities: rho = S_a / S_b against lam +- 0.01; three or more: S_m / sum of the
    others below lam. Wrong variants caught here: the learner given to the STRONGER modality;
    no dead band; the three-modality ratio against the total (S_m / sum_k S_k)."""
    assert assign_learners({"a": 60.0, "b": 50.0}) == ["b"]  # rho 1.2: a stronger -> b learns more
    assert assign_learners({"a": 50.0, "b": 60.0}) == ["a"]
    assert assign_learners({"a": 100.5, "b": 100.0}) == []  # rho 1.005 inside the band
    assert assign_learners({"a": 99.5, "b": 100.0}) == []
    assert assign_learners({"a": 102.0, "b": 100.0}) == ["b"]  # 1.02 > 1.01
    assert assign_learners({"a": 60.0, "b": 50.0}, lam=1.5) == ["a"]  # rho 1.2 < 1.49
    # three: rho = (20/80, 50/50, 30/70) = (0.25, 1, 0.4286); lam 0.4 -> r only; 0.45 -> r and d
    three = {"r": 20.0, "o": 50.0, "d": 30.0}
    assert ensemble_ratios(three) == pytest.approx({"r": 0.25, "o": 1.0, "d": 30.0 / 70.0})
    assert assign_learners(three) == ["r"]
    assert assign_learners(three, lam=0.45) == ["r", "d"]
    assert assign_learners({"r": 30.0, "o": 40.0, "d": 30.0}) == []  # 0.4286, 0.667, 0.4286
    y = torch.tensor([0, 1])
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # true-class prob 0.75 and 0.5
    torch.testing.assert_close(confidence_sum(logits, y), torch.tensor(1.25))
    assert confidence_sum(logits.bfloat16(), y).dtype == torch.float32


def release_loss(full, prev, new, y, c):
    """The release's form: CE(F, y) + CE(P, y) + CE(A, y) - c CE_soft(A, y * softmax(P).detach())."""
    onehot = F.one_hot(y, full.shape[1]).float()
    soft = onehot * prev.detach().softmax(1)
    ce_soft = -(soft * F.log_softmax(new, 1)).sum(1).mean()
    return F.cross_entropy(full, y) + F.cross_entropy(prev, y) + F.cross_entropy(new, y) - c * ce_soft


def test_loss_by_hand_and_equal_to_the_release_form():
    """P = (0, 0) -> q = 1/2; A = (ln 3, 0), y = 0 -> -log softmax(A)[0] = -ln(3/4); F = P + A.
    Loss = -ln .75 + ln 2 + (1 - 0.5 * 0.5) (-ln .75) = 1.75 (-ln .75) + ln 2. Wrong variants
    caught here: the weight 1 + c q (sign); q from the newest learner or from F; P left out."""
    y = torch.tensor([0])
    prev = torch.zeros(1, 2)
    new = torch.tensor([[math.log(3.0), 0.0]])
    loss = aug_loss(prev + new, prev, new, y, 0.5)
    assert loss.item() == pytest.approx(1.75 * -math.log(0.75) + math.log(2.0), rel=1e-6)
    torch.testing.assert_close(aug_loss(prev + new, None, None, y, 0.5), torch.tensor(-math.log(0.75)))
    gen = torch.Generator().manual_seed(0)
    prev, new = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    y = torch.tensor([0, 1, 2, 3, 1, 2])
    for c in (0.5, 0.2, 0.0):
        torch.testing.assert_close(aug_loss(prev + new, prev, new, y, c), release_loss(prev + new, prev, new, y, c))
    # the re-weighting sees no gradient through q
    prev.requires_grad_(True)
    aug_loss(prev + new, prev, new, y, 0.5).backward()
    g_ours = prev.grad.clone()
    prev.grad = None
    (F.cross_entropy(prev + new, y) + F.cross_entropy(prev, y)).backward()
    torch.testing.assert_close(g_ours, prev.grad)


def test_learner_stack_by_hand():
    """F = head(h0) + sum_j head(h_j), P = F minus the newest learner, A = the newest; every
    term carries the head's bias. Wrong variants caught here: P including the newest learner;
    learners fed the previous learner's output instead of the encoder feature."""
    torch.manual_seed(0)
    stacks = LearnerStacks({"a": 3}, 2, hidden=4, slots=3)
    e = torch.randn(5, 3)
    head = stacks.head

    def term(layer):
        return head(torch.relu(layer(e)))

    full, prev, new = stacks.logits("a", e, 0)
    torch.testing.assert_close(full, term(stacks.base["a"]))
    assert prev is None and new is None
    full, prev, new = stacks.logits("a", e, 2)
    t0, t1, t2 = term(stacks.base["a"]), term(stacks.added["a"][0]), term(stacks.added["a"][1])
    torch.testing.assert_close(full, t0 + t1 + t2)
    torch.testing.assert_close(prev, t0 + t1)
    torch.testing.assert_close(new, t2)
    assert torch.all(stacks.added["a"][2].bias == 0) and torch.all(stacks.head.bias == 0)  # release init


# ---- the step against a hand-written reference of the release -----------------------------------
def setup_trainer(tmp_path, **overrides):
    cfg = {**SMALL, "records": str(tmp_path / "runs"), "progress": "off", "device": "cpu", **overrides}
    trainer = make_trainer("aug", "synthetic", cfg)
    trainer.setup()
    trainer.model.train()
    trainer._step_logs = {}
    return trainer


def batches(trainer, n):
    it = iter(trainer.loader(trainer.splits.train, train=False))
    return [to_device(next(it), trainer.device) for _ in range(n)]


def reference_run(trainer, data, active, c=0.5, legacy_zero_grad=False, frozen=False):
    """train_CREMAD.py's batch on a copy of the model: both encoders once; then per modality
    its learner stack (after the previous modality's step), the release's loss, backward, SGD
    step, zero_grad (torch >= 2: None; torch 1.11: zeros); every gradient deleted at the end.
    Learners the release adds after building its optimizer are left out of it (``frozen``)."""
    cfg = trainer.cfg
    model = copy.deepcopy(trainer.model)
    st = model.extra["aug"]
    params = [p for m in model.modalities for p in model.encoder_params(m)]
    params += list(st.base.parameters()) + list(st.head.parameters())
    if not frozen:
        params += list(st.added.parameters())
    opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    scores = {m: 0.0 for m in model.modalities}
    for batch in data:
        y = batch["label"]
        feats = model.encode(batch)
        for m in model.modalities:
            e = feats[m]
            full = st.head(torch.relu(st.base[m](e)))
            prev = new = None
            for j in range(active[m]):
                prev = full
                new = st.head(torch.relu(st.added[m][j](e)))
                full = full + new
            loss = F.cross_entropy(full, y) if new is None else release_loss(full, prev, new, y, c)
            scores[m] += float(full.detach().softmax(1).gather(1, y.view(-1, 1)).sum())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=not legacy_zero_grad)
        for p in model.parameters():
            p.grad = None
    return model, scores


def assert_same_params(a, b, atol=1e-6):
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=0 if atol == 0 else 1e-5, atol=atol, msg=name)


@pytest.mark.parametrize("active", [{"m1": 0, "m2": 0}, {"m1": 2, "m2": 1}], ids=["base", "learners"])
def test_step_matches_the_hand_written_release(tmp_path, active):
    """Two batches of M sub-steps against the reference, with and without active learners.
    Wrong variants caught here: every stack evaluated before the first step (the second
    modality then sees the head before the first step moved it); P with the newest learner;
    c not reaching the loss; the scores taken after the modality's step; scores of the wrong
    modality."""
    trainer = setup_trainer(tmp_path, epochs=4, aug_check_every=1)  # 3 learner slots
    trainer.method.active = dict(active)
    data = batches(trainer, 2)
    ref, scores = reference_run(trainer, data, active)
    steps = trainer.optimizer_steps
    for i, batch in enumerate(data):
        trainer.method.training_step(batch, i)
    assert trainer.optimizer_steps - steps == 4  # M = 2 optimizer steps per batch
    assert_same_params(trainer.model, ref)
    for m in ("m1", "m2"):
        assert trainer.method._scores[m].item() == pytest.approx(scores[m], rel=1e-5)
    assert all(p.grad is None for p in trainer.model.parameters())


def test_each_substep_moves_only_its_modality_and_the_head(tmp_path):
    trainer = setup_trainer(tmp_path)
    model, method = trainer.model, trainer.method
    method.active = {"m1": 1, "m2": 0}
    st = model.extra["aug"]
    head = {id(p) for p in st.head.parameters()}
    seen = []
    original = trainer.optimizer_step

    def spy(opt):
        seen.append({id(p) for p in model.parameters() if p.grad is not None})
        original(opt)

    trainer.optimizer_step = spy
    method.training_step(batches(trainer, 1)[0], 0)

    def own(m):
        ids = {id(p) for p in model.encoder_params(m)} | {id(p) for p in st.base[m].parameters()}
        return ids | {id(p) for j in range(method.active[m]) for p in st.added[m][j].parameters()}

    assert seen == [own("m1") | head, own("m2") | head]


def test_inactive_learners_stay_bit_identical_and_activate(tmp_path):
    """With momentum 0.9 and weight decay 1e-3, an inactive (pre-allocated) learner never
    moves; the learner just activated moves. Wrong variant caught here: every pre-allocated
    learner in the training forward, active or not (they then train from the start)."""
    trainer = setup_trainer(tmp_path, weight_decay=1e-3)
    st, method = trainer.model.extra["aug"], trainer.method
    assert method.slots == 1 and len(st.added["m1"]) == 1  # 2 epochs: one check (epoch 0)
    before = {n: p.detach().clone() for n, p in st.added.named_parameters()}
    data = batches(trainer, 3)
    for i, batch in enumerate(data[:2]):
        method.training_step(batch, i)
    for n, p in st.added.named_parameters():
        assert torch.equal(p, before[n]), n
    method.active["m2"] = 1
    method.training_step(data[2], 2)
    assert not torch.equal(st.added["m2"][0].weight, before["m2.0.weight"])
    assert torch.equal(st.added["m1"][0].weight, before["m1.0.weight"])


def test_frozen_learners_as_released(tmp_path):
    """aug_legacy_frozen_learners: an active learner changes the logits but never moves, as in
    the release; otherwise equal to the reference without the learners in the optimizer.
    Wrong variant caught here: the option not reaching the learners (they are trained)."""
    trainer = setup_trainer(tmp_path, aug_legacy_frozen_learners=True)
    st, method = trainer.model.extra["aug"], trainer.method
    method.active = {"m1": 1, "m2": 1}
    before = {n: p.detach().clone() for n, p in st.added.named_parameters()}
    data = batches(trainer, 2)
    ref, _ = reference_run(trainer, data, method.active, frozen=True)
    for i, batch in enumerate(data):
        method.training_step(batch, i)
    assert_same_params(trainer.model, ref)
    for n, p in st.added.named_parameters():
        assert torch.equal(p, before[n]), n
    e = torch.randn(4, 16)
    assert not torch.equal(st.logits("m1", e, 1)[0], st.logits("m1", e, 0)[0])
    assert method.label() == "AUG (frozen learners, as released, hidden=8)"


def test_legacy_zero_grad_emulates_torch_1_11(tmp_path):
    """aug_legacy_zero_grad: what the first sub-step moved gets a zero-gradient step in the
    second (momentum and weight decay move it again). Wrong variant caught here: the option
    never reaching the step."""
    trainer = setup_trainer(tmp_path, aug_legacy_zero_grad=True)
    trainer.method.active = {"m1": 1, "m2": 0}
    data = batches(trainer, 2)
    ref, _ = reference_run(trainer, data, trainer.method.active, legacy_zero_grad=True)
    modern, _ = reference_run(trainer, data, trainer.method.active)
    for i, batch in enumerate(data):
        trainer.method.training_step(batch, i)
    assert_same_params(trainer.model, ref)
    assert not torch.equal(trainer.model.encoder_params("m1")[0], modern.encoder_params("m1")[0])
    assert all(p.grad is None for p in trainer.model.parameters())


def test_assignment_after_evaluation(fast):
    """The check of epoch 0 adds a learner only AFTER epoch 0 is evaluated: epoch 0's numbers
    equal those of a run that never adds one, epoch 1's differ. Wrong variant caught here: the
    decision taken in on_train_epoch_end (an untrained learner enters epoch 0's val/test)."""
    cfg = {**fast, **SMALL, "epochs": 3, "aug_check_every": 1}
    grow = run("aug", "synthetic", cfg).record
    fixed = run("aug", "synthetic", {**cfg, "aug_max_learners": 0}).record
    d = [e["diagnostics"] for e in grow["epochs"]]
    assert d[0]["learners_m1"] + d[0]["learners_m2"] == 1.0  # a learner was added after epoch 0
    assert grow["epochs"][0]["val"] == fixed["epochs"][0]["val"]
    assert grow["epochs"][0]["test"] == fixed["epochs"][0]["test"]
    assert grow["epochs"][1]["test"] != fixed["epochs"][1]["test"]
    # the check rule on the recorded epoch sums: rho of the first modality decides
    rho = d[0]["ratio_m1"]
    assert (d[0]["learners_m2"] == 1.0) == (rho > 1.01) and (d[0]["learners_m1"] == 1.0) == (rho < 0.99)
    assert d[0]["ratio_m2"] == pytest.approx(1.0 / rho, rel=1e-5)
    assert grow["header"]["method_info"]["check_epochs"] == [0, 1]


# ---- options, runs, resume -------------------------------------------------------------------
ALTERNATIVES = {
    "aug_residual_c": 0.2, "aug_lam": 2.0, "aug_check_every": 2, "aug_max_learners": 0,
    "aug_merge_alpha": 0.7, "aug_hidden": 12, "aug_legacy_frozen_learners": True, "aug_legacy_zero_grad": True,
}


def test_every_option_reaches_the_result(fast):
    """Each declared option, set to another value, changes a short run's numbers (training
    or, for the prediction weight, evaluation). An option that never reaches the rule fails."""
    assert set(ALTERNATIVES) == set(OPTIONS)
    cfg = {**fast, **SMALL, "epochs": 4, "aug_check_every": 1, "diagnostics": False}

    def numbers(**overrides):
        rec = run("aug", "synthetic", {**cfg, **overrides}).record
        return [(e["train_loss"], e["val"], e["test"]) for e in rec["epochs"]]

    base = numbers()
    alternatives = {**ALTERNATIVES, "aug_check_every": 3}  # the base run checks every epoch
    for key, value in alternatives.items():
        assert numbers(**{key: value}) != base, key


def test_mfeat_zer_mor_trains_well_above_chance(fast, shared_data):
    """Real data (10 classes, chance 10 %), five epochs, learners added every epoch."""
    r = run("aug", "mfeat", {**fast, "epochs": 5, "modalities": ["zer", "mor"], "aug_check_every": 1,
                             "diagnostics": False})
    sel = r.final["best_val"]["test"]
    assert sel["fused"]["acc"] > 70.0
    assert sel["zer"]["acc"] > 30.0 and sel["mor"]["acc"] > 30.0
    last = r.record["epochs"][-1]["diagnostics"]
    assert last["learners_zer"] + last["learners_mor"] >= 1


def test_two_epochs_on_synthetic_record_the_rule(fast):
    rec = run("aug", "synthetic", {**fast, **SYN}).record
    h = rec["header"]
    assert h["method_label"] == "AUG" and h["method_info"]["per_modality"] == "method"
    assert h["method_info"]["inference_rule"].startswith("fixed weights m1 0.4, m2 0.6")
    for e in rec["epochs"]:
        assert e["optimizer_steps"] == 2 * e["train_batches"]
        assert set(e["lrs"]) == {"main/encoder.m1", "main/encoder.m2", "main/aug.base_and_head", "main/aug.learners"}
        assert {"loss_m1", "loss_m2", "conf_m1", "ratio_m1", "learners_m2"} <= set(e["diagnostics"])
        assert {"m1", "m2", "fused"} <= set(e["test"])


def test_three_modalities_and_mfeat_views(fast, shared_data):
    rec = run("aug", "synthetic", {**fast, **SMALL, "n_modalities": 3, "epochs": 3, "aug_check_every": 1}).record
    assert rec["header"]["method_info"]["inference_rule"].startswith("fixed weights m1 0.3333, m2 0.3333, m3 0.3333")
    for e in rec["epochs"]:
        assert e["optimizer_steps"] == 3 * e["train_batches"]
        assert {"ratio_m3", "learners_m3", "loss_m3"} <= set(e["diagnostics"])
    rec = run("aug", "mfeat", {**fast, "epochs": 1, "modalities": ["fac", "zer", "mor"],
                               "limit_train_batches": 4, "diagnostics": False}).record
    assert {"fac", "zer", "mor"} <= set(rec["epochs"][0]["test"])


def test_resume_is_identical_with_the_learner_counts(fast, tmp_path, monkeypatch):
    """Killed in epoch 2 after learners were added at the checks of epochs 0 and 1: the
    resumed run must rebuild the same active counts. Wrong variant caught here: the counts
    left out of state_dict (the resumed run would continue with no learners)."""
    cfg = {**fast, **SMALL, "epochs": 4, "aug_check_every": 1, "checkpoint": True}
    assert_resume_identical("aug", "synthetic", cfg, tmp_path, monkeypatch, kill_epoch=2)
    rec = run("aug", "synthetic", {**cfg, "records": str(tmp_path / "killed")}).record
    d = rec["epochs"][1]["diagnostics"]
    assert d["learners_m1"] + d["learners_m2"] >= 1  # learners existed before the kill


def test_bf16_autocast_step(tmp_path):
    trainer = setup_trainer(tmp_path, amp="bf16")
    method = trainer.method
    method.active = {"m1": 1, "m2": 1}
    for i, batch in enumerate(batches(trainer, 2)):
        loss = method.training_step(batch, i)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert method._scores["m1"].dtype == torch.float32
    with trainer.autocast():
        pred = method.predict(batches(trainer, 1)[0])
    assert torch.isfinite(pred.fused).all()


def test_predict_uses_the_active_learners_and_fixed_weights(tmp_path):
    """Wrong variant caught here: predict ignoring the added learners (J = 0 at evaluation)."""
    trainer = setup_trainer(tmp_path)
    trainer.model.eval()
    method = trainer.method
    method.active = {"m1": 1, "m2": 0}
    batch = batches(trainer, 1)[0]
    pred = method.predict(batch)
    feats = trainer.model.encode(batch)
    st = trainer.model.extra["aug"]
    f1, f2 = st.logits("m1", feats["m1"], 1)[0], st.logits("m2", feats["m2"], 0)[0]
    torch.testing.assert_close(pred.per_modality["m1"], f1)
    torch.testing.assert_close(pred.fused, 0.4 * f1 + 0.6 * f2)
    assert not torch.allclose(f1, st.logits("m1", feats["m1"], 0)[0])


def test_labels_state_and_refusals(fast, tmp_path):
    assert AUG({}).label() == "AUG"
    assert AUG({"aug_residual_c": 0.2, "aug_legacy_zero_grad": True}).label() == "AUG (torch-1.11 zero_grad, c=0.2)"
    assert AUG({"dataset": "ksounds", "aug_residual_c": 0.2}).label() == "AUG"  # the April KS value
    a = setup_trainer(tmp_path / "a")
    a.method.active = {"m1": 1, "m2": 0}
    b = setup_trainer(tmp_path / "b")
    b.method.load_state_dict(a.method.state_dict())
    assert b.method.active == {"m1": 1, "m2": 0}
    with pytest.raises(ConfigError, match="learner"):
        b.method.load_state_dict({"active": {"m1": 5, "m2": 0}, "order": ["m1", "m2"]})
    with pytest.raises(UnsupportedError, match="at least 2"):
        make_trainer("aug", "synthetic", {**fast, **SMALL, "n_modalities": 1}).check()
    with pytest.raises(ConfigError, match="aug_residual_c"):
        make_trainer("aug", "synthetic", {**fast, **SMALL, "aug_residual_c": 1.5})


@pytest.mark.gpu
def test_cell_runs_on_cuda_with_bf16(tmp_path):
    r = run("aug", "synthetic", {**SYN, "epochs": 3, "aug_check_every": 1, "records": str(tmp_path),
                                 "device": "cuda", "progress": "off"})
    assert r.record["header"]["amp"] == "bfloat16"
    assert r.final["last"]["test"]["fused"]["acc"] > 20.0
