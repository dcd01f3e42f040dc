"""The services the method contract offers plugins (docs/guides/method-plugin.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from method_checks import assert_resume_identical

from mmbalance.errors import MMBalanceError
from mmbalance.method import Method, Phase, Prediction
from mmbalance.registry import register_method
from mmbalance.runner import make_trainer, run

SMALL = {"epochs": 3, "n_train": 300, "n_test": 100, "batch_size": 32}


def _trainer(method: str, fast: dict, **extra):
    t = make_trainer(method, "synthetic", {**fast, **SMALL, **extra})
    t.setup()
    return t


# --------------------------------------------------------------------------- declarations
@register_method("test-lying-heads", "claims per-modality numbers from heads it never trains")
class LyingHeads(Method):
    name = "test-lying-heads"

    def per_modality_source(self) -> str:
        return "unimodal_heads"


@register_method("test-no-fusion", "builds no fused head and keeps the default predict")
class NoFusion(Method):
    name = "test-no-fusion"

    def build_fusion(self, dims, num_classes):
        return None

    def training_step(self, batch, batch_idx):
        out = self.model(batch)
        return sum(F.cross_entropy(z, batch["label"]) for z in out.uni.values())

    def trains_unimodal_heads(self) -> bool:
        return True


def test_untrained_heads_are_never_reported(fast):
    with pytest.raises(MMBalanceError, match="does not\\s+train"):
        _trainer("test-lying-heads", fast)


def test_fused_only_method_reports_fused_parts_not_its_untrained_heads(fast):
    rec = run("concat", "synthetic", {**fast, **SMALL, "epochs": 1}).record
    assert rec["header"]["method_info"].get("per_modality") == "fused_parts"
    t = _trainer("concat", fast)
    batch = next(iter(t.loader(t.splits.test, train=False)))
    pred = t.method.predict(batch)
    feats = t.model.encode(batch)
    parts = t.model.fusion.parts(feats)
    for m in t.modalities:
        assert torch.equal(pred.per_modality[m], parts[m])
        assert not torch.equal(pred.per_modality[m], t.model.uni_heads[m](feats[m]))


def test_default_predict_without_fused_head_is_the_mean_of_trained_heads(fast):
    rec = run("test-no-fusion", "synthetic", {**fast, **SMALL, "epochs": 1}).record
    assert rec["epochs"][0]["test"]["fused"]["acc"] > 10  # above chance (10 classes)
    t = _trainer("test-no-fusion", fast)
    batch = next(iter(t.loader(t.splits.test, train=False)))
    pred = t.method.predict(batch)
    uni = t.model.unimodal_logits(t.model.encode(batch))
    assert torch.allclose(pred.fused, (uni["m1"] + uni["m2"]) / 2)


@register_method("test-no-heads", "builds no fused head and trains no unimodal heads")
class NoHeads(NoFusion):
    name = "test-no-heads"

    def trains_unimodal_heads(self) -> bool:
        return False

    def per_modality_source(self) -> str:
        return "none"


def test_default_predict_without_any_trained_head_is_a_clear_error(fast):
    with pytest.raises(MMBalanceError, match="builds no fused head and trains no unimodal heads"):
        run("test-no-heads", "synthetic", {**fast, **SMALL, "epochs": 1})


def test_methods_without_unimodal_option_train_no_unimodal_heads(fast):
    t = _trainer("concat", fast)
    before = {m: t.model.uni_heads[m].weight.detach().clone() for m in t.modalities}
    t.train_epoch(0)
    for m in t.modalities:
        assert torch.equal(before[m], t.model.uni_heads[m].weight)  # no gradient ever reached them


# --------------------------------------------------------------------------- passes over data
@register_method("test-passes", "logs from the epoch-start hook through a data pass")
class Passes(Method):
    name = "test-passes"

    def on_train_epoch_start(self, epoch):
        n = 0
        modes = []
        for _batch in self.trainer.iterate("train", fraction=0.1, tag="test"):
            n += 1
            modes.append((self.model.training, torch.is_grad_enabled()))
        self.seen = (n, modes)
        self.log(pass_batches=torch.tensor(float(n)))


def test_iterate_counts_modes_and_order(fast):
    t = _trainer("test-passes", fast)
    n_batches = len(t.loader(t.splits.train, train=True))
    t.model.train()
    t.method.epoch = 0
    got = list(t.iterate("train", fraction=0.1, tag="x"))
    assert len(got) == max(1, math.floor(0.1 * n_batches))
    assert t.model.training  # mode restored
    t.model.eval()
    for _ in t.iterate("train", batches=2, train_mode=True, grad=True):
        assert t.model.training and torch.is_grad_enabled()
    assert not t.model.training
    for _ in t.iterate("val", batches=1):
        assert not torch.is_grad_enabled()
    a = [b["index"].tolist() for b in t.iterate("train", batches=3, tag="x")]
    b = [b["index"].tolist() for b in t.iterate("train", batches=3, tag="x")]
    c = [b["index"].tolist() for b in t.iterate("train", batches=3, tag="y")]
    assert a == b and a != c  # seeded by the tag, repeatable


def test_iterate_honours_limit_train_batches(fast):
    t = _trainer("test-passes", fast, limit_train_batches=4)
    t.method.epoch = 0
    assert len(list(t.iterate("train"))) == 4
    assert len(list(t.iterate("train", fraction=0.5))) == 2


def test_epoch_start_diagnostics_are_kept(fast):
    rec = run("test-passes", "synthetic", {**fast, **SMALL, "epochs": 1}).record
    n_batches = math.ceil(270 / 32)  # 300 minus the 10 % validation carve-out
    assert rec["epochs"][0]["diagnostics"]["pass_batches"] == max(1, math.floor(0.1 * n_batches))


def test_a_data_pass_does_not_disturb_the_main_loop(fast, tmp_path):
    plain = run("concat", "synthetic", {**fast, **SMALL, "records": str(tmp_path / "a")}).record
    with_pass = run("test-passes", "synthetic", {**fast, **SMALL, "records": str(tmp_path / "b")}).record
    assert [e["train_loss"] for e in plain["epochs"]] == [e["train_loss"] for e in with_pass["epochs"]]


# --------------------------------------------------------------------------- held-out slice, sub-trainer
@register_method("test-gblend-like", "held-out slice and a sub-trainer on a copy")
class SubTrainer(Method):
    name = "test-gblend-like"
    heldout_fraction = 0.2

    def on_cell_start(self):
        import copy

        self.cell_starts = getattr(self, "cell_starts", 0) + 1
        clone = copy.deepcopy(self.model)
        m = self.trainer.modalities[0]

        def loss_fn(model, batch):
            return F.cross_entropy(model.uni_heads[m](model.encode(batch)[m]), batch["label"])

        params = clone.encoder_params(m) + clone.uni_head_params(m)
        self.cost = self.trainer.sub_train(clone, params, loss_fn, "train", epochs=2, tag="probe")
        self.clone = clone


def test_heldout_slice_and_sub_trainer(fast):
    t = _trainer("test-gblend-like", fast)
    held = t.heldout()
    assert len(held) == round(0.2 * 270) and len(t.splits.train) == 270 - len(held)
    assert "heldout_rule" in t.splits.info
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.method.on_cell_start()
    for k, v in t.model.state_dict().items():
        assert torch.equal(before[k], v), k  # the run's model is untouched
    n = len(t.loader(t.splits.train, train=True))
    assert t.method.cost.optimizer_steps == 2 * n == t.estimation_cost.optimizer_steps
    m1, m2 = t.modalities
    assert all(p.requires_grad for p in t.method.clone.parameters())  # frozen ones restored
    trained = dict(t.method.clone.named_parameters())
    changed = {k for k, v in t.model.named_parameters() if not torch.equal(v, trained[k])}
    assert changed and all(k.startswith((f"encoders.{m1}.", f"uni_heads.{m1}.")) for k in changed)


def test_sub_trainer_cost_is_recorded_apart_and_not_redone_on_resume(fast, tmp_path, monkeypatch):
    overrides = {**fast, **SMALL}
    rec = run("test-gblend-like", "synthetic", overrides).record
    assert rec["final"]["estimation_cost"]["optimizer_steps"] > 0
    assert sum(e["optimizer_steps"] for e in rec["epochs"]) == 3 * len(
        _trainer("test-gblend-like", fast).loader(_trainer("test-gblend-like", fast).splits.train, train=True))
    assert_resume_identical("test-gblend-like", "synthetic", {**fast, **SMALL}, tmp_path, monkeypatch)


# --------------------------------------------------------------------------- optimizers and rates
@register_method("test-two-optimizers", "one optimizer per modality, with its own schedule")
class TwoOptimizers(Method):
    name = "test-two-optimizers"
    manual_optimization = True

    def configure_optimizers(self):
        out = {}
        for i, m in enumerate(self.trainer.modalities):
            params = self.model.encoder_params(m) + self.model.uni_head_params(m)
            out["main" if i == 0 else m] = self.trainer.default_optimizers(params)
        out["fusion"] = self.trainer.default_optimizers(self.model.fusion_params())
        return out

    def trains_unimodal_heads(self):
        return True

    def training_step(self, batch, batch_idx):
        self.autocast_inside = torch.is_autocast_enabled("cpu")
        with self.autocast():
            out = self.model(batch)
            self.autocast_forward = torch.is_autocast_enabled("cpu")
        y = batch["label"]
        loss = F.cross_entropy(out.fused.float(), y) + sum(F.cross_entropy(z.float(), y) for z in out.uni.values())
        self.manual_backward(loss)
        for opt in self.optimizers.values():
            self.optimizer_step(opt)
        return loss.detach()


def test_method_owned_optimizers_are_checkpointed_and_resume(fast, tmp_path, monkeypatch):
    overrides = {**fast, **SMALL, "optimizer": "adam", "lr": 1e-3, "scheduler": "step", "step_size": 1}
    rec = run("test-two-optimizers", "synthetic", {**overrides, "records": str(tmp_path / "x")}).record
    lrs = rec["epochs"][0]["lrs"]
    assert set(lrs) == {"main/0", "m2/0", "fusion/0"}
    assert rec["epochs"][0]["lrs"]["m2/0"] == pytest.approx(1e-3)
    assert rec["epochs"][2]["lrs"]["m2/0"] == pytest.approx(1e-3 * 0.1**2)
    assert_resume_identical("test-two-optimizers", "synthetic", overrides, tmp_path, monkeypatch)


def test_manual_optimisation_runs_outside_autocast(fast):
    t = _trainer("test-two-optimizers", fast, amp="bf16")  # CPU bf16 autocast, for the test
    batch = next(iter(t.loader(t.splits.train, train=True)))
    t.model.train()
    t.method.training_step(batch, 0)
    assert t.method.autocast_inside is False and t.method.autocast_forward is True


@register_method("test-lr-scale", "halves the first group's rate from on_validation_end")
class LrScale(Method):
    name = "test-lr-scale"

    def configure_optimizers(self):
        groups = [{"params": self.model.encoder_params(m), "name": f"enc.{m}"} for m in self.trainer.modalities]
        groups.append({"params": self.model.fusion_params() + list(self.model.uni_heads.parameters()), "name": "rest"})
        return self.trainer.default_optimizers(groups)

    def on_validation_end(self, metrics):
        self.seen_lr = self.optimizer.param_groups[0]["lr"]
        self.trainer.set_lr_scale(self.optimizer, f"enc.{self.trainer.modalities[0]}", 0.5 if metrics["epoch"] % 2 == 0 else 2.0)


def test_lr_scale_composes_with_the_schedule_and_does_not_compound(fast):
    rec = run("test-lr-scale", "synthetic", {**fast, **SMALL, "epochs": 4, "scheduler": "step", "step_size": 1,
                                             "gamma": 0.5, "lr": 0.08}).record
    m1 = rec["header"]["modalities"][0]
    # epoch e trains at 0.08 * 0.5**e (the schedule, stepped after each epoch) times the
    # scale set in on_validation_end of epoch e-1 (not compounded: 0.5, then 2.0, ...)
    scales = [1.0, 0.5, 2.0, 0.5]
    for e, entry in enumerate(rec["epochs"]):
        sched = 0.08 * 0.5**e
        assert entry["lrs"][f"main/enc.{m1}"] == pytest.approx(sched * scales[e])
        assert entry["lrs"]["main/rest"] == pytest.approx(sched)


# --------------------------------------------------------------------------- absent modalities
def test_encode_with_absent_modality_blanks_one_row(fast):
    t = _trainer("concat", fast)
    t.model.eval()
    batch = next(iter(t.loader(t.splits.test, train=False)))
    m1, m2 = t.modalities
    full = t.model.encode(batch)
    dropped = t.model.encode(batch, drop={m2})
    assert torch.equal(dropped[m1], full[m1])
    blank = t.model.encoders[m2](torch.zeros_like(batch[m2][:1]))
    assert dropped[m2].shape == full[m2].shape
    assert torch.allclose(dropped[m2], blank.expand_as(full[m2]))
    with pytest.raises(ValueError, match="cannot drop"):
        t.model.encode(batch, drop={"m9"})


def test_blank_text_keeps_only_the_first_token():
    from mmbalance.backbones.text import blank_text

    ids = torch.tensor([[101, 7, 8, 102], [101, 9, 102, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    b = blank_text({"input_ids": ids, "attention_mask": mask})
    assert b["input_ids"].tolist() == [[101, 0, 0, 0]] and b["attention_mask"].tolist() == [[1, 0, 0, 0]]


# --------------------------------------------------------------------------- start hooks
@register_method("test-cell-start", "counts its once-per-cell hook")
class CellStart(Method):
    name = "test-cell-start"
    calls: list[str] = []

    def on_cell_start(self):
        self.calls.append("cell")

    def on_fit_start(self):
        self.calls.append(f"fit resumed={self.resumed}")


def test_cell_start_runs_once_per_cell_not_after_resume(fast, tmp_path, monkeypatch):
    from mmbalance.trainer import Trainer

    original = Trainer.train_epoch

    def dying(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    CellStart.calls.clear()
    monkeypatch.setattr(Trainer, "train_epoch", dying)
    with pytest.raises(KeyboardInterrupt):
        run("test-cell-start", "synthetic", {**fast, **SMALL})
    monkeypatch.setattr(Trainer, "train_epoch", original)
    run("test-cell-start", "synthetic", {**fast, **SMALL})
    assert CellStart.calls == ["cell", "fit resumed=False", "fit resumed=True"]


def test_prediction_dataclass_is_the_evaluation_contract():
    p = Prediction(torch.zeros(2, 3), {"a": torch.zeros(2, 3)})
    assert p.fused.shape == (2, 3) and set(p.per_modality) == {"a"}


# --------------------------------------------------------------------------- phases
@register_method("test-stages", "alternates one modality per 2-epoch stage, fresh SGD per stage")
class Stages(Method):
    name = "test-stages"
    fusion = "sum"

    def stage(self, epoch: int) -> int:
        return epoch // 2

    def epoch_plan(self, epoch):
        m = self.trainer.modalities[self.stage(epoch) % len(self.trainer.modalities)]
        params = self.model.encoder_params(m) + list(self.model.fusion.fcs[m].parameters())
        make = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)  # noqa: E731
        return [Phase(name=f"stage{self.stage(epoch)}-{m}", params=params, passes=2,
                      optimizer=f"stage{self.stage(epoch)}", make_optimizer=make, step=self.step)]

    def step(self, batch, batch_idx):
        return F.cross_entropy(self.model(batch).fused, batch["label"])

    def should_evaluate(self, epoch):
        return epoch % 2 == 1  # at the end of each stage


def test_phases_train_their_subset_with_a_fresh_optimizer_and_evaluate_at_stage_end(fast):
    t = _trainer("test-stages", fast, epochs=4)
    m1, m2 = t.modalities
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    out = t.train_epoch(0)
    assert [p["phase"] for p in out["phases"]] == ["stage0-m1", "stage0-m1"] and out["data_passes"] == 2
    changed = {k for k, v in t.model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith((f"encoders.{m1}.", f"fusion.fcs.{m1}.")) for k in changed)
    first = t.optimizers["stage0"]
    t.train_epoch(1)
    assert t.optimizers["stage0"] is first  # kept within the stage
    t.train_epoch(2)
    assert "stage0" not in t.optimizers and "stage1" in t.optimizers  # fresh for the next stage
    assert not t.optimizers["stage1"].state or all(
        id(p) in {id(q) for q in t.model.encoder_params(m2)} | {id(q) for q in t.model.fusion.fcs[m2].parameters()}
        for p in t.optimizers["stage1"].state)
    rec = run("test-stages", "synthetic", {**fast, **SMALL, "epochs": 4}).record
    assert [e["val"] is None for e in rec["epochs"]] == [True, False, True, False]
    assert {r["epoch"] for r in rec["final"]["selection"].values()} <= {1, 3}


def test_resume_mid_stage_restores_the_stage_optimizer(fast, tmp_path, monkeypatch):
    assert_resume_identical("test-stages", "synthetic", {**fast, **SMALL, "epochs": 4}, tmp_path, monkeypatch,
                            kill_epoch=1)
