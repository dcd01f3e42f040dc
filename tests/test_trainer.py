"""The trainer: determinism, resume, skipping finished cells, hooks, manual optimisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmbalance import records
from mmbalance.method import Method
from mmbalance.registry import METHODS, register_method
from mmbalance.runner import make_trainer, run

SMALL = {"n_train": 400, "n_test": 200, "epochs": 3, "batch_size": 32}


def _metrics(record):
    """Per-epoch metrics without timings, and the final selection."""
    keep = ("epoch", "train_loss", "val", "test", "diagnostics", "lr", "optimizer_steps")
    return [{k: e[k] for k in keep} for e in record["epochs"]], record["final"]["selection"]


def test_same_seed_same_metrics_and_seed_matters(fast, tmp_path):
    a = run("concat", "synthetic", {**fast, **SMALL})
    b = run("concat", "synthetic", {**fast, **SMALL, "records": str(tmp_path / "other")})
    c = run("concat", "synthetic", {**fast, **SMALL, "seed": 1})
    assert _metrics(a.record) == _metrics(b.record)
    assert _metrics(a.record) != _metrics(c.record)
    assert a.run_dir != c.run_dir


def test_record_contents(fast):
    r = run("concat", "synthetic", {**fast, **SMALL})
    rec = r.record
    assert rec["done"] and (r.run_dir / records.DONE).exists()
    h = rec["header"]
    assert h["config"]["method"] == "concat" and h["device"] == "cpu" and h["amp"] == "none"
    assert h["versions"]["torch"] == torch.__version__.split("+")[0] or h["versions"]["torch"]
    assert "mmbalance" in h["code_version"]
    assert len(rec["epochs"]) == 3
    e = rec["epochs"][0]
    for key in ("train_loss", "train_time_s", "eval_time_s", "peak_mem_mb", "val", "test", "lr"):
        assert key in e
    assert set(e["test"]) >= {"fused", "m1", "m2", "loss"}
    assert set(e["test"]["fused"]) == {"acc", "map", "f1"}
    sel = rec["final"]["selection"]
    assert sel["last"]["epoch"] == 2
    best = max(range(3), key=lambda i: (rec["epochs"][i]["val"]["fused"]["acc"], -i))
    assert sel["best_val"]["epoch"] == best
    # every line of the record is JSON; the run directory is named by the config hash
    lines = (r.run_dir / records.RECORD).read_text().splitlines()
    assert [json.loads(x)["type"] for x in lines] == ["header", "epoch", "epoch", "epoch", "final"]
    assert r.run_dir.name.endswith(h["config_hash"])


def test_finished_cell_is_not_trained_again(fast, monkeypatch):
    first = run("concat", "synthetic", {**fast, **SMALL})
    monkeypatch.setattr("mmbalance.trainer.Trainer.train_epoch", lambda *a, **k: pytest.fail("retrained"))
    again = run("concat", "synthetic", {**fast, **SMALL})
    assert _metrics(again.record) == _metrics(first.record)


def test_interrupted_run_resumes_to_identical_record(fast, tmp_path, monkeypatch):
    full = run("concat", "synthetic", {**fast, **SMALL, "records": str(tmp_path / "full")})

    from mmbalance.trainer import Trainer

    original = Trainer.train_epoch
    calls = {"n": 0}

    def dying(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt  # killed mid-training of the last epoch
        calls["n"] += 1
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", dying)
    overrides = {**fast, **SMALL, "records": str(tmp_path / "killed")}
    with pytest.raises(KeyboardInterrupt):
        run("concat", "synthetic", overrides)
    t = make_trainer("concat", "synthetic", overrides)
    assert (t.run_dir / records.CHECKPOINT).exists() and not (t.run_dir / records.DONE).exists()
    partial = records.load_record(t.run_dir)
    assert len(partial["epochs"]) == 2 and partial["final"] is None
    monkeypatch.setattr(Trainer, "train_epoch", original)
    resumed = run("concat", "synthetic", overrides)
    assert resumed.record["header"]["resumed_from_epoch"] == 2
    assert _metrics(resumed.record) == _metrics(full.record)


def test_checkpoint_every_s_saves_fewer_checkpoints_and_resumes_to_the_same_numbers(fast, tmp_path, monkeypatch):
    """checkpoint_every_s: an epoch's checkpoint waits for the interval, the last epoch's is always
    saved, the run folder is the same (a speed setting), and a run killed before its next
    checkpoint resumes from the one it has, to the same record as an uninterrupted run.
    Wrong variants caught: the last epoch skipped (nothing for diagnose or teachers to read), the
    interval never read (a save every epoch), the setting in the run's identity (a second folder),
    the clock not reset at a save (every epoch after the first interval saved), the record
    still written every epoch (a fsync'd write each, 8 % of a feature-set cell)."""
    from mmbalance.trainer import Trainer

    clock = {"t": 0.0}
    monkeypatch.setattr("mmbalance.engine.checkpoint.time.monotonic", lambda: clock["t"])
    monkeypatch.setattr("mmbalance.engine.loop.time.monotonic", lambda: clock["t"])
    saved: list[int] = []
    written: list[int] = []  # epochs in the record at each write of it
    original_save, original_epoch = Trainer._save_checkpoint, Trainer.train_epoch
    original_write = Trainer._write_record

    def writing(self, header, final):
        written.append(len(self.history))
        return original_write(self, header, final)

    def counting(self, epoch):
        saved.append(epoch)
        return original_save(self, epoch)

    def ticking(self, epoch):  # each epoch takes 4 "seconds"
        clock["t"] += 4.0
        return original_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "_save_checkpoint", counting)
    monkeypatch.setattr(Trainer, "train_epoch", ticking)
    monkeypatch.setattr(Trainer, "_write_record", writing)
    cfg = {**fast, **SMALL, "epochs": 5}
    every = run("concat", "synthetic", {**cfg, "records": str(tmp_path / "every")})
    assert saved == [0, 1, 2, 3, 4]
    assert written == [1, 2, 3, 4, 5, 5]  # each epoch, then the final line
    saved.clear()
    written.clear()
    spaced = run("concat", "synthetic", {**cfg, "records": str(tmp_path / "spaced"), "checkpoint_every_s": 10.0})
    assert saved == [2, 4]  # 12 s after the start, then the last epoch (only 8 s after the save)
    assert written == [3, 5, 5]  # the record's epoch lines on the checkpoints' beat
    assert Path(spaced.record["run_dir"]).name == Path(every.record["run_dir"]).name
    assert _metrics(spaced.record) == _metrics(every.record)

    def dying(self, epoch):
        if epoch == 4:
            raise KeyboardInterrupt  # the checkpoint of epoch 2 is the last one saved
        return ticking(self, epoch)

    killed = {**cfg, "records": str(tmp_path / "killed"), "checkpoint_every_s": 10.0}
    monkeypatch.setattr(Trainer, "train_epoch", dying)
    with pytest.raises(KeyboardInterrupt):
        run("concat", "synthetic", killed)
    # the record holds what the checkpoint holds (epochs 0-2), not the epoch 3 a resume repeats
    assert len(records.load_record(make_trainer("concat", "synthetic", killed).run_dir)["epochs"]) == 3
    monkeypatch.setattr(Trainer, "train_epoch", ticking)
    resumed = run("concat", "synthetic", killed)
    assert resumed.record["header"]["resumed_from_epoch"] == 3
    assert _metrics(resumed.record) == _metrics(every.record)


@register_method("test-hooks", "test method recording hook order and freezing encoders")
class HookRecorder(Method):
    name = "test-hooks"
    calls: list[str] = []

    def on_fit_start(self):
        self.calls.append("fit_start")

    def on_train_epoch_start(self, epoch):
        self.calls.append(f"epoch_start{epoch}")

    def training_step(self, batch, batch_idx):
        self.calls.append("step")
        return super().training_step(batch, batch_idx)

    def on_after_backward(self):
        # gradients exist here, before the optimizer step; zero the m1 encoder's
        assert all(p.grad is not None for p in self.model.encoder_params("m2"))
        self.calls.append("after_backward")
        for p in self.model.encoder_params("m1"):
            p.grad = None

    def on_train_epoch_end(self, epoch):
        self.calls.append(f"epoch_end{epoch}")

    def on_validation_end(self, metrics):
        self.calls.append("validation_end")

    def state_dict(self):
        return {"n": len(self.calls)}


def test_hooks_run_in_order_and_after_backward_can_rewrite_grads(fast):
    HookRecorder.calls = []
    t = make_trainer("test-hooks", "synthetic", {**fast, **SMALL, "epochs": 1, "limit_train_batches": 2, "weight_decay": 0.0})
    t.setup()
    before = [p.detach().clone() for p in t.model.encoder_params("m1")]
    t.fit()
    c = HookRecorder.calls
    assert c[:2] == ["fit_start", "epoch_start0"]
    assert c[2:6] == ["step", "after_backward", "step", "after_backward"]
    assert c[6:] == ["epoch_end0", "validation_end"]
    after = list(t.model.encoder_params("m1"))
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@register_method("test-manual", "test method in manual-optimisation mode: one step per modality")
class ManualAlternating(Method):
    name = "test-manual"
    manual_optimization = True

    def training_step(self, batch, batch_idx):
        feats = self.model.encode(batch)
        total = 0.0
        for m in self.model.modalities:
            loss = F.cross_entropy(self.model.uni_heads[m](feats[m]), batch["label"])
            self.manual_backward(loss, retain_graph=True)
            self.optimizer_step()
            total = total + loss.detach()
        self.log(total=total)
        return total


def test_manual_optimisation_steps_per_modality(fast):
    r = run("test-manual", "synthetic", {**fast, **SMALL, "epochs": 1})
    e = r.record["epochs"][0]
    assert e["optimizer_steps"] == 2 * e["train_batches"]
    assert e["diagnostics"]["total"] > 0
    diag = records.read_jsonl(r.run_dir / "diagnostics" / "epoch_0000.jsonl")
    assert len(diag) == e["train_batches"]


def test_methods_refuse_modality_counts_clearly(fast):
    from mmbalance.errors import UnsupportedError

    class TwoOnly(Method):
        name = "two-only"
        max_modalities = 2

    with pytest.raises(UnsupportedError, match="two-only.*exactly 2|two-only.*at most 2"):
        TwoOnly({}).check_modalities(["a", "b", "c"])
    assert "test-manual" in METHODS


def test_cuda_requested_without_cuda_is_a_clear_error(fast):
    from mmbalance.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="no CUDA device"):
        make_trainer("concat", "synthetic", {**fast, "device": "cuda"})


def test_wandb_logging_works_offline(fast, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    r = run("concat", "synthetic", {**fast, **SMALL, "epochs": 1, "wandb": True, "wandb_mode": "offline"})
    files = list((r.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files and files[0].stat().st_size > 0
