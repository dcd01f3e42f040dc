"""UMT method plugin: the distillation loss by hand, the step against it (each modality's own
frozen, eval-mode teacher), the teachers' training (schedule, selection, the copy's own
parameters), ownership (never optimised, never in the model), resume restoring them, reuse of
recorded unimodal runs found by identity and the refusal of others, real data."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from method_checks import assert_resume_identical
from mmbalance.methods.umt import UMT, distill_terms, umt_loss

from mmbalance import records
from mmbalance.engine.services import Services
from mmbalance.errors import MMBalanceError
from mmbalance.runner import make_trainer, run
from mmbalance.trainer import to_device

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest

SMALL = {"epochs": 2, "n_train": 200, "n_test": 60, "dim": 8, "embed_dim": 8, "batch_size": 32,
         "checkpoint": False, "diagnostics": False, "progress": "off", "device": "cpu", "log_epochs": False}


# ---- the mathematics by hand ---------------------------------------------------------------
def test_distillation_loss_by_hand():
    """Features of two samples, d = 2. a: student (1, 2; 3, 4), teacher (0, 2; 3, 6): squared
    errors 1, 0, 0, 4, mean 1.25. b: student (0, 0; 0, 0), teacher (1, 1; 1, 1): mean 1. With
    zero fused logits over 4 classes CE = ln 4, so with lambda 10 the loss is ln 4 + 22.5.
    Wrong variants caught: sum instead of mean over elements (5 and 4); mean over samples only
    (2.5 and 2); lambda on the CE; the distance not squared (L1: 0.75)."""
    student = {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.zeros(2, 2)}
    teacher = {"a": torch.tensor([[0.0, 2.0], [3.0, 6.0]]), "b": torch.ones(2, 2)}
    terms = distill_terms(student, teacher)
    assert terms["a"].item() == pytest.approx(1.25) and terms["b"].item() == pytest.approx(1.0)
    loss, ce, _ = umt_loss(torch.zeros(2, 4), torch.tensor([0, 3]), student, teacher, 10.0)
    assert ce.item() == pytest.approx(math.log(4.0))
    assert loss.item() == pytest.approx(math.log(4.0) + 22.5)
    bf = distill_terms({"a": student["a"].bfloat16()}, {"a": teacher["a"].bfloat16()})
    assert bf["a"].dtype == torch.float32


def test_gradient_reaches_the_student_only():
    """d (lambda MSE) / d e = lambda * 2 (e - t) / (B d); the teacher side gets none. Wrong
    variants caught: the teacher features not detached (a gradient on t); the sign flipped
    (the student pushed away from its teacher)."""
    e = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    t = torch.tensor([[0.0, 2.0], [3.0, 6.0]], requires_grad=True)
    loss, _, _ = umt_loss(torch.zeros(2, 3, requires_grad=True), torch.tensor([0, 1]), {"a": e}, {"a": t}, 10.0)
    loss.backward()
    torch.testing.assert_close(e.grad, 10.0 * 2 * (e.detach() - t.detach()) / 4)
    assert t.grad is None


# ---- the step in a set-up run --------------------------------------------------------------
def _ready(tmp_path, **extra):
    t = make_trainer("umt", "synthetic", {**SMALL, "records": str(tmp_path), **extra})
    t.setup()
    t.method.on_cell_start()
    t.method.on_fit_start()
    return t


def test_step_distils_each_modality_from_its_own_eval_mode_teacher(tmp_path):
    """The step's loss equals CE(o) + lambda * sum_m MSE(e_m, T_m(x_m)) computed here with each
    modality's teacher in eval mode; encoders with dropout make train-mode teachers differ.
    Wrong variants caught: the teacher of the other modality; teachers run in train mode
    (BalanceBenchmark); the student's features detached (no distillation gradient); the
    unimodal head's logits distilled instead of the features."""
    t = _ready(tmp_path, **{"backbone.m1.dropout": 0.5, "backbone.m2.dropout": 0.5, "umt_lambda": 3.0})
    method, model = t.method, t.model
    batch = to_device(next(iter(t.loader(t.splits.train, train=True))), t.device)
    model.train()
    torch.manual_seed(5)
    loss = method.training_step(batch, 0)
    torch.manual_seed(5)
    feats = model.encode(batch)
    with torch.no_grad():
        targets = {m: method.teachers[m].encoder(batch[m]) for m in model.modalities}
    want = F.cross_entropy(model.fuse(feats), batch["label"]) + 3.0 * sum(
        F.mse_loss(feats[m], targets[m]) for m in model.modalities)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert all(not tm.training for tm in method.teachers.values())
    enc = list(model.encoders["m1"].parameters())
    got = torch.autograd.grad(loss, enc)
    expected = torch.autograd.grad(want, enc)
    for g, w in zip(got, expected, strict=True):
        torch.testing.assert_close(g, w)  # the distillation's gradient reaches the student


def test_teachers_are_trained_frozen_and_owned_by_the_method(tmp_path):
    """Each teacher trained (its weights moved from the student's initial ones; its val accuracy
    above chance), selected on validation, never in the model (so in no optimizer and not in
    the model's state), requires_grad off, and charged as estimation (teacher epochs x batches
    x M steps). Wrong variants caught: the live model's parameters passed to sub_train (the
    copy frozen: weights unchanged); the teachers put in ``model.extra`` (then optimised);
    requires_grad left on; teacher epochs ignored (the recipe's 2 instead of 3)."""
    t = make_trainer("umt", "synthetic", {**SMALL, "records": str(tmp_path), "umt_teacher_epochs": 3})
    t.setup()
    init = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.method.on_cell_start()
    method = t.method
    n = len(t.loader(t.splits.train, train=True))
    assert t.estimation_cost.optimizer_steps == 3 * n * 2
    for m in ("m1", "m2"):
        teacher = method.teachers[m]
        assert not any(p.requires_grad for p in teacher.parameters())
        key, value = next(iter(teacher.encoder.state_dict().items()))
        assert not torch.equal(value, init[f"encoders.{m}.{key}"])
        info = method.teacher_info[m]
        assert info["val_acc"] > 30.0 and info["epochs"] == 3 and info["selection"] == "best val accuracy"
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, init[k]), k  # the run's own model untouched
    optimised = {id(p) for opt in t.optimizers.values() for g in opt.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in method.teachers.parameters()}
    assert not any(k.startswith("teachers") or "teacher" in k for k in t.model.state_dict())


def test_teacher_selection_and_schedule_reach_sub_train(tmp_path, monkeypatch):
    """The teachers are trained with the recipe's schedule and selected on val, or on the last
    epoch with umt_teacher_select=last; where val is the test split, never on it. Wrong
    variants caught: schedule not asked for; selection not asked for (or asked for on a run
    that validates on test)."""
    calls = []
    original = Services.sub_train

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Services, "sub_train", spy)
    _ready(tmp_path / "a")
    assert [(c["schedule"], c["select_on"]) for c in calls] == [(True, "val")] * 2
    calls.clear()
    _ready(tmp_path / "b", umt_teacher_select="last")
    assert [(c["schedule"], c["select_on"]) for c in calls] == [(True, None)] * 2
    calls.clear()
    t = _ready(tmp_path / "c", val_fraction=0.0)
    assert t.val_is_test and [c["select_on"] for c in calls] == [None, None]
    assert t.method.teacher_info["m1"]["selection"] == "last epoch (val is test)"


def test_resume_restores_the_teachers_and_never_retrains_them(tmp_path, monkeypatch):
    """A run killed in epoch 1 and resumed equals the uninterrupted one, and the resumed process
    trains no teacher (on_cell_start does not run; the checkpoint's method state holds them).
    Both processes use the teacher-feature cache, and the resumed one rebuilds it from the
    restored teachers. Wrong variants caught: teachers left out of state_dict (resume fails or
    retrains); teacher retraining in on_fit_start; load_state_dict leaving them in train mode or
    with gradients; the cache built before the checkpoint's teachers are in place (from the
    blank copies load_state_dict starts from)."""
    overrides = {**SMALL, "epochs": 3, "checkpoint": True, "backbone.m1.dropout": 0.3}
    assert_resume_identical("umt", "synthetic", overrides, tmp_path, monkeypatch)  # with the cache (auto)
    full = records.load_checkpoint(tmp_path / "full" / next(p.name for p in (tmp_path / "full").iterdir()) / records.CHECKPOINT)
    killed_dir = tmp_path / "killed" / next(p.name for p in (tmp_path / "killed").iterdir())
    killed = records.load_checkpoint(killed_dir / records.CHECKPOINT)
    for k, v in full["method"]["teachers"].items():
        assert torch.equal(v, killed["method"]["teachers"][k]), k
    monkeypatch.setattr(Services, "sub_train", lambda *a, **k: pytest.fail("a resumed run retrained a teacher"))
    t = make_trainer("umt", "synthetic", {**overrides, "records": str(tmp_path / "killed")})
    t.setup()
    assert t.restore_checkpoint() == 3
    method = t.method
    assert all(not tm.training and not any(p.requires_grad for p in tm.parameters()) for tm in method.teachers.values())
    assert method.teacher_info["m1"]["source"] == "trained in the cell"
    header = records.load_record(killed_dir)["header"]
    assert header["method_info"]["teacher_features"].startswith("cached")


# ---- the teachers' features, computed once per process -------------------------------------
DROPOUT = {"backbone.m1.dropout": 0.5, "backbone.m2.dropout": 0.5}  # train-mode teachers would differ


def _teacher_forward(method, batch):
    with torch.no_grad():
        return {m: method.teachers[m].encoder(batch[m]) for m in method.teachers}


def _spy_steps(monkeypatch, method):
    """Record each training step's batch and the teacher targets it distils towards."""
    module = sys.modules[type(method).__module__]
    seen, real_loss, real_step = [], module.umt_loss, type(method).training_step

    def loss(fused, y, student, teacher, lam):
        seen[-1]["targets"] = {m: v.detach().clone() for m, v in teacher.items()}
        return real_loss(fused, y, student, teacher, lam)

    def step(batch, i):
        seen.append({"batch": batch})
        return real_step(method, batch, i)

    monkeypatch.setattr(module, "umt_loss", loss)
    monkeypatch.setattr(method, "training_step", step)
    return seen


def test_cached_features_are_the_eval_teachers_and_are_looked_up_by_index(tmp_path, monkeypatch):
    """On in-memory data the teachers' features of every training row are computed once (fit
    start) and equal each teacher's eval-mode forward on that row; the main loop's shuffled
    batches (also under limit_train_batches) distil towards their own rows' features, found by
    the batch's ``index``, and the step runs no teacher. Wrong variants caught: lookup by the
    position in the batch (rows 0..B-1 of the split); the cache built from the student's
    encoders; the cache built with the teachers in train mode (dropout on); the teachers run in
    the step anyway."""
    t = _ready(tmp_path, limit_train_batches=2, **DROPOUT)
    method = t.method
    train = t.splits.train
    n = len(train)
    assert method.feature_plan()[0] and set(method.teacher_features) == {"m1", "m2"}
    whole = to_device(train.get_batch(list(range(n))), t.device)
    want = _teacher_forward(method, whole)
    for m in ("m1", "m2"):
        assert method.teacher_features[m].shape == (n, 8)
        torch.testing.assert_close(method.teacher_features[m], want[m], rtol=1e-6, atol=1e-6)
    calls = []
    for tm in method.teachers.values():
        tm.encoder.register_forward_hook(lambda *a: calls.append(1))
    seen = _spy_steps(monkeypatch, method)
    t.train_epoch(1)
    assert len(seen) == 2 and not calls  # two batches; no teacher forward in the step
    for s in seen:
        batch = s["batch"]
        assert not torch.equal(batch["index"].cpu(), torch.arange(len(batch["index"])))  # shuffled rows
        rows = to_device(train.get_batch(batch["index"].tolist()), t.device)
        torch.testing.assert_close(rows["m1"], batch["m1"])  # index is the row's position in train
        own = _teacher_forward(method, batch)
        for m in ("m1", "m2"):
            torch.testing.assert_close(s["targets"][m], own[m], rtol=1e-6, atol=1e-6)
    assert method.record_info()["teacher_features"].startswith("cached")


class ShiftedReads:
    """Training reads that add a fixed per-row shift (a stand-in for random crops: it draws no
    RNG); the evaluation view is the clean data."""

    def __init__(self, base):
        self.base, self.labels = base, base.labels

    def __len__(self):
        return len(self.base)

    def get_batch(self, idx):
        batch = self.base.get_batch(idx)
        rows = torch.as_tensor(idx, dtype=torch.float32).reshape(-1, 1)
        for m in ("m1", "m2"):
            batch[m] = batch[m] + 2.0 * torch.sin(rows * 1.3 + torch.arange(batch[m].shape[1]))
        return batch

    def eval_view(self):
        return self.base


class SilentReads(ShiftedReads):
    """A dataset that cannot say how it reads without augmentation (no eval_view)."""

    eval_view = None

    def __getattribute__(self, name):
        if name == "eval_view":
            raise AttributeError(name)
        return super().__getattribute__(name)


@pytest.mark.parametrize("reads", [ShiftedReads, SilentReads])
def test_augmenting_training_reads_get_the_per_step_teacher_forward(tmp_path, monkeypatch, reads):
    """A training split whose reads augment (or that cannot say they do not) gets no cache: the
    step distils towards the teachers' forward of the batch it trains on. The builder itself
    reads the evaluation pipeline. Wrong variants caught: the cache used on an augmenting split
    (the targets of the clean rows); the cache built from augmented reads (augment=None)."""
    t = make_trainer("umt", "synthetic", {**SMALL, "records": str(tmp_path), "limit_train_batches": 2})
    t.setup()
    method = t.method
    method.on_cell_start()
    clean = t.splits.train
    t.splits.train = reads(clean)
    method.on_fit_start()
    assert method.teacher_features is None and not method.feature_plan()[0]
    assert method.record_info()["teacher_features"].startswith("per-step")
    seen = _spy_steps(monkeypatch, method)
    t.train_epoch(0)
    assert len(seen) == 2
    for s in seen:
        own = _teacher_forward(method, s["batch"])
        for m in ("m1", "m2"):
            torch.testing.assert_close(s["targets"][m], own[m], rtol=0, atol=0)
    if reads is ShiftedReads:
        built = method._teacher_features()
        want = _teacher_forward(method, to_device(clean.get_batch(list(range(len(clean)))), t.device))
        for m in ("m1", "m2"):
            torch.testing.assert_close(built[m], want[m], rtol=1e-6, atol=1e-6)


def test_option_off_runs_the_teachers_in_every_step(tmp_path, monkeypatch):
    """umt_teacher_cache=off builds nothing and runs every teacher once per step; it trains the
    same numbers as the cache here (fp32 CPU). Wrong variant caught: the option never read (the
    cache built and used under off)."""
    t = _ready(tmp_path / "off", limit_train_batches=3, umt_teacher_cache="off")
    method = t.method
    assert method.teacher_features is None and method.record_info()["teacher_features"].endswith("umt_teacher_cache=off)")
    calls = []
    for tm in method.teachers.values():
        tm.encoder.register_forward_hook(lambda *a: calls.append(1))
    t.train_epoch(0)
    assert len(calls) == 3 * 2
    cached = _ready(tmp_path / "auto", limit_train_batches=3)
    assert cached.method.teacher_features is not None
    cached.train_epoch(0)
    for k, v in cached.model.state_dict().items():
        assert torch.equal(v, t.model.state_dict()[k]), k


def test_teacher_features_are_charged_as_estimation(tmp_path):
    """The pass over the training split is the method's estimation cost: one batch per
    ceil(n / batch_size) of train, its wall time, and none of the run's extra batches (so never
    the epoch's training cost); with off nothing is charged. Wrong variant caught: the pass run
    outside ``trainer.estimation()`` (its batches counted as extra training batches)."""
    t = make_trainer("umt", "synthetic", {**SMALL, "records": str(tmp_path)})
    t.setup()
    t.method.on_cell_start()
    before, extra = t.estimation_cost.as_dict(), t.extra_batches
    t.method.on_fit_start()
    after = t.estimation_cost.as_dict()
    n = len(t.splits.train)
    assert after["batches"] - before["batches"] == math.ceil(n / SMALL["batch_size"])
    assert after["time_s"] > before["time_s"] and after["optimizer_steps"] == before["optimizer_steps"]
    assert t.extra_batches == extra
    t.method.cfg = {**t.method.cfg, "umt_teacher_cache": "off"}
    t.method.on_fit_start()
    assert t.estimation_cost.as_dict()["batches"] == after["batches"]


def test_cache_follows_the_teachers_when_they_change(tmp_path):
    """Teachers replaced after a cache was built (a checkpoint's method state loaded) are
    the ones the next fit start caches. Wrong variants caught: a cache kept across
    load_state_dict (built once, never rebuilt); the cache built before the loaded teachers are
    in place."""
    t = _ready(tmp_path)
    method = t.method
    state = method.state_dict()
    state["teachers"] = {k: v + 0.25 if v.is_floating_point() else v for k, v in state["teachers"].items()}
    old = {m: v.clone() for m, v in method.teacher_features.items()}
    method.load_state_dict(state)
    method.on_fit_start()
    whole = to_device(t.splits.train.get_batch(list(range(len(t.splits.train)))), t.device)
    want = _teacher_forward(method, whole)
    for m in ("m1", "m2"):
        assert not torch.allclose(old[m], want[m])
        torch.testing.assert_close(method.teacher_features[m], want[m], rtol=1e-6, atol=1e-6)


# ---- recorded teachers ---------------------------------------------------------------------
def _record_unimodal(tmp_path, settings):
    for m in ("m1", "m2"):
        run("unimodal", "synthetic", {**settings, "modality": m})


def test_recorded_teachers_are_found_by_identity_and_loaded(tmp_path):
    """With a unimodal run of each modality recorded under the same settings, umt_teachers=
    recorded loads their final weights (equal to their checkpoints), trains nothing, and says
    which runs it used; the fit start caches the loaded teachers' features. Wrong variants
    caught: the other modality's run loaded; the head prefix used for the encoder; the recorded
    runs ignored (teachers trained anyway); the cache built from the student's encoders."""
    settings = {**SMALL, "records": str(tmp_path), "checkpoint": True}
    _record_unimodal(tmp_path, settings)
    t = make_trainer("umt", "synthetic", {**settings, "umt_teachers": "recorded"})
    t.setup()
    t.method.on_cell_start()
    assert t.estimation_cost.optimizer_steps == 0
    for m in ("m1", "m2"):
        info = t.method.teacher_info[m]
        assert info["source"] == "recorded" and info["run"].startswith("synthetic_unimodal_s0_")
        state = records.load_checkpoint(tmp_path / info["run"] / records.CHECKPOINT)["model"]
        for k, v in t.method.teachers[m].encoder.state_dict().items():
            assert torch.equal(v, state[f"encoders.{m}.{k}"]), k
        for k, v in t.method.teachers[m].head.state_dict().items():
            assert torch.equal(v, state[f"uni_heads.{m}.{k}"]), k
    t.method.on_fit_start()
    whole = to_device(t.splits.train.get_batch(list(range(len(t.splits.train)))), t.device)
    for m, want in _teacher_forward(t.method, whole).items():
        torch.testing.assert_close(t.method.teacher_features[m], want, rtol=1e-6, atol=1e-6)
    res = run("umt", "synthetic", {**settings, "umt_teachers": "recorded"})
    assert res.record["header"]["method_label"] == "UMT (recorded teachers)"


def test_recorded_teachers_of_other_settings_or_data_are_refused(tmp_path):
    """A unimodal run of another learning rate is not this run's teacher: the error names the
    command that trains the right one and says how the found run differs; a folder with the
    right name whose record was written for other data is refused, not reused; an unfinished
    run is refused. Wrong variants caught: lookup by dataset/method/seed only (the newest
    run, BalanceBenchmark's rule); the data fingerprint not compared; DONE not checked."""
    settings = {**SMALL, "records": str(tmp_path), "checkpoint": True}
    _record_unimodal(tmp_path, {**settings, "lr": 0.02})
    with pytest.raises(MMBalanceError, match="umt") as err:
        _ready(tmp_path, checkpoint=True, umt_teachers="recorded")
    text = str(err.value)
    assert "mmbalance run --method unimodal --dataset synthetic --seed 0" in text and "--set modality=m1" in text
    assert "differs in lr" in text
    _record_unimodal(tmp_path, settings)
    t = make_trainer("umt", "synthetic", {**settings, "umt_teachers": "recorded"})
    t.setup()
    found = t.recorded_run("unimodal", {"modality": "m1"})
    rows = records.read_jsonl(found.run_dir / records.RECORD)
    rows[0]["data_fingerprint"] = {"root": "/elsewhere", "listing": "x"}
    records.write_jsonl(found.run_dir / records.RECORD, rows)
    with pytest.raises(MMBalanceError, match="other data"):
        t.method.on_cell_start()
    (found.run_dir / records.DONE).unlink()
    with pytest.raises(MMBalanceError, match="unfinished"):
        t.recorded_run("unimodal", {"modality": "m1"})


# ---- runs ----------------------------------------------------------------------------------
def test_runs_three_modalities_and_refuses_one(tmp_path):
    rec = run("umt", "synthetic", {**SMALL, "records": str(tmp_path), "n_modalities": 3, "epochs": 1}).record
    assert {"umt_distill_m1", "umt_distill_m2", "umt_distill_m3", "umt_teacher_val_m3"} <= set(rec["epochs"][0]["diagnostics"])
    assert rec["header"]["method_info"]["per_modality"] == "fused_parts"
    with pytest.raises(MMBalanceError, match="at least 2"):
        make_trainer("umt", "synthetic", {**SMALL, "records": str(tmp_path), "modalities": ["m1"]}).check()


def test_labels():
    assert UMT({}).label() == "UMT"
    assert UMT({"umt_lambda": 1.0, "umt_teacher_epochs": 5}).label() == "UMT (lambda=1, teacher epochs=5)"
    assert UMT({"umt_teacher_select": "last"}).label() == "UMT (last-epoch teachers)"


def test_mfeat_trains_well_above_chance(fast, shared_data):
    """Real data: mfeat zer+mor (10 classes, chance 10 %), a few epochs with 3-epoch teachers."""
    res = run("umt", "mfeat", {**fast, "modalities": ["zer", "mor"], "epochs": 4, "diagnostics": False})
    assert res.record["final"]["selection"]["best_val"]["test"]["fused"]["acc"] > 60.0
    assert res.record["final"]["estimation_cost"]["optimizer_steps"] > 0


@pytest.mark.gpu
def test_cuda_bf16_cell(tmp_path):
    res = run("umt", "synthetic", {"epochs": 2, "n_train": 600, "n_test": 200, "device": "cuda",
                                   "records": str(tmp_path), "progress": "off"})
    assert res.record["header"]["amp"] == "bfloat16"
    assert res.record["final"]["selection"]["last"]["test"]["fused"]["acc"] > 20.0
