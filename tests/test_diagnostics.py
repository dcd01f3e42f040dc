"""Imbalance diagnostics: linear probes of frozen encoders and Shapley contributions from
absent-modality evaluations (mmbalance.diagnostics)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mmbalance import records
from mmbalance.diagnose import probe_main, probe_run
from mmbalance.diagnostics import (
    DIAGNOSTICS_FILE,
    DiagnosticsError,
    absent_modalities,
    all_coalitions,
    coalition_accuracy,
    coalition_key,
    compute_diagnostics,
    imbalance_degree,
    majority_accuracy,
    probe_accuracy,
    shapley_share,
    shapley_values,
    shapley_weight,
)
from mmbalance.errors import MMBalanceError, UnsupportedError
from mmbalance.method import Prediction
from mmbalance.model import MultimodalModel
from mmbalance.runner import make_trainer

F = frozenset
SMALL = {"n_train": 400, "n_test": 250, "epochs": 3, "progress": "off", "device": "cpu"}


def trained(tmp: Path, method: str = "concat", **extra) -> object:
    trainer = make_trainer(method, "synthetic", {**SMALL, "records": str(tmp), **extra})
    trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def concat_run(tmp_path_factory):
    return trained(tmp_path_factory.mktemp("runs"))


# ---- pure math -----------------------------------------------------------------------------
def test_shapley_two_modalities_hand_values():
    v = {F(): 10.0, F({"a"}): 60.0, F({"b"}): 30.0, F({"a", "b"}): 70.0}
    phi = shapley_values(v, ["a", "b"])
    # phi_a = 1/2 (60 - 10) + 1/2 (70 - 30) = 45; phi_b = 1/2 (30 - 10) + 1/2 (70 - 60) = 15
    assert phi == pytest.approx({"a": 45.0, "b": 15.0})
    assert sum(phi.values()) == pytest.approx(70.0 - 10.0)


def test_shapley_three_modalities_hand_values():
    v = {F(): 0.0, F("a"): 10.0, F("b"): 20.0, F("c"): 30.0,
         F("ab"): 40.0, F("ac"): 40.0, F("bc"): 50.0, F("abc"): 90.0}
    phi = shapley_values(v, ["a", "b", "c"])
    # phi_a = 1/3*10 + 1/6*(40-20) + 1/6*(40-30) + 1/3*(90-50) = 65/3, etc.
    assert phi["a"] == pytest.approx(65 / 3)
    assert phi["b"] == pytest.approx(95 / 3)
    assert phi["c"] == pytest.approx(110 / 3)
    assert sum(phi.values()) == pytest.approx(90.0)
    assert shapley_weight(0, 3) == pytest.approx(1 / 3) and shapley_weight(1, 3) == pytest.approx(1 / 6)


def test_shapley_dummy_gets_zero_and_symmetric_modalities_share():
    # d never changes the value; a and b are interchangeable
    base = {F(): 5.0, F("a"): 25.0, F("b"): 25.0, F("ab"): 65.0}
    v = {**base, **{s | {"d"}: x for s, x in base.items()}}
    phi = shapley_values(v, ["a", "b", "d"])
    assert phi["d"] == pytest.approx(0.0, abs=1e-12)
    assert phi["a"] == pytest.approx(phi["b"]) == pytest.approx(30.0)


def test_shapley_needs_every_coalition():
    v = {F(): 0.0, F("a"): 1.0, F("ab"): 2.0}
    with pytest.raises(DiagnosticsError, match="missing: b"):
        shapley_values(v, ["a", "b"])


def test_coalition_names_and_imbalance_degree():
    assert [coalition_key(s) for s in all_coalitions(["m2", "m1"])] == ["none", "m2", "m1", "m1+m2"]
    assert imbalance_degree({"a": 45.0, "b": 15.0, "c": -2.5}) == pytest.approx(47.5)
    assert shapley_share({"a": 45.0, "b": 15.0}) == pytest.approx({"a": 0.75, "b": 0.25})
    assert shapley_share({"a": 1.0, "b": -1.0}) == {"a": None, "b": None}


def test_probe_on_separable_and_on_constant_features():
    rng = np.random.default_rng(0)
    y_tr, y_te = rng.integers(0, 4, 400), rng.integers(0, 4, 200)
    means = np.eye(4, 8) * 6.0
    x_tr = means[y_tr] + rng.standard_normal((400, 8))
    x_te = means[y_te] + rng.standard_normal((200, 8))
    good = probe_accuracy(x_tr, y_tr, x_te, y_te)
    assert good["probe_acc"] > 97.0 and good["probe_converged"]
    const = probe_accuracy(np.full((400, 8), 3.0), y_tr, np.full((200, 8), 3.0), y_te)
    assert const["probe_acc"] == pytest.approx(majority_accuracy(y_tr, y_te))
    # majority baseline by hand: train majority class 1, test has two of five
    assert majority_accuracy(np.array([0, 1, 1, 2]), np.array([1, 0, 1, 2, 2])) == pytest.approx(40.0)


def test_probe_refuses_bad_features():
    y = np.array([0, 1, 0, 1])
    with pytest.raises(DiagnosticsError, match="NaN"):
        probe_accuracy(np.array([[np.nan], [1.0], [0.0], [1.0]]), y, np.zeros((2, 1)), y[:2])
    with pytest.raises(DiagnosticsError, match="single class"):
        probe_accuracy(np.zeros((4, 1)), np.zeros(4, int), np.zeros((2, 1)), y[:2])


# ---- absent modalities ---------------------------------------------------------------------
class Lin(nn.Linear):
    def __init__(self, i: int, o: int) -> None:
        super().__init__(i, o)
        self.out_dim = o


class Constant(nn.Module):
    """An encoder that learned nothing: the same vector whatever its input."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value)
        self.out_dim = value.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(x.shape[0], -1)


def test_absent_modalities_blanks_through_predict_paths_and_restores():
    torch.manual_seed(0)
    model = MultimodalModel({"a": Lin(3, 4), "b": Lin(5, 4)}, num_classes=2)
    batch = {"a": torch.randn(6, 3), "b": torch.randn(6, 5)}
    blank_b = model.encoders["b"](torch.zeros(1, 5))
    with absent_modalities(model, {"b"}) as counter:
        feats = model(batch).feats  # forward goes through self.encode too
        torch.testing.assert_close(feats["b"], blank_b.expand(6, 4))
        torch.testing.assert_close(feats["a"], model.encoders["a"](batch["a"]))
        with absent_modalities(model, {"a"}):  # nested: both absent
            both = model.encode(batch)
            torch.testing.assert_close(both["a"], model.encoders["a"](torch.zeros(1, 3)).expand(6, 4))
        assert model.encode(batch, drop={"a"})["a"].shape == (6, 4)
    assert counter.calls == 3  # forward, nested (through the outer wrapper), direct
    assert "encode" not in model.__dict__
    torch.testing.assert_close(model.encode(batch)["b"], model.encoders["b"](batch["b"]))
    with pytest.raises(RuntimeError), absent_modalities(model, {"a"}):
        raise RuntimeError("boom")
    assert "encode" not in model.__dict__  # restored on error too
    with pytest.raises(DiagnosticsError, match="cannot mark"), absent_modalities(model, {"c"}):
        pass


# ---- on trained models ---------------------------------------------------------------------
def test_constant_encoder_probes_at_chance_and_contributes_nothing(concat_run):
    trainer = concat_run
    real = trainer.model.encoders["m2"]
    # the constant is m2's blank feature, so the fused head (trained with m2) stays sensible
    blank = trainer.model.blank_feature("m2", trainer.splits.test.tensors["m2"][:1]).detach()[0]
    trainer.model.encoders["m2"] = Constant(blank)
    try:
        diag = compute_diagnostics(trainer.eval_view())
    finally:
        trainer.model.encoders["m2"] = real
    base = diag["probe_baseline_acc"]
    assert 5.0 < base < 20.0  # 10 classes
    assert abs(diag["probe"]["m2"]["probe_acc"] - base) <= 2.0
    assert diag["probe"]["m1"]["probe_acc"] > base + 40.0
    phi, v = diag["shapley"], diag["coalitions"]
    assert phi["m2"] == pytest.approx(0.0, abs=1e-9)
    assert v["m1"] == v["m1+m2"] and v["none"] == v["m2"]
    assert phi["m1"] == pytest.approx(v["m1+m2"] - v["none"]) and phi["m1"] > 30.0
    assert diag["imbalance_degree"] == pytest.approx(phi["m1"])


def test_diagnostics_of_a_trained_concat_model(concat_run):
    trainer = concat_run
    trainer.model.train()
    diag = compute_diagnostics(trainer.eval_view())
    assert trainer.model.training  # mode restored
    assert "encode" not in trainer.model.__dict__
    assert all(p.grad is None for p in trainer.model.parameters())
    v, phi = diag["coalitions"], diag["shapley"]
    assert set(v) == {"none", "m1", "m2", "m1+m2"}
    # the full coalition is exactly what evaluation reports; all-absent predicts one class
    assert v["m1+m2"] == pytest.approx(trainer.evaluate(trainer.splits.test)["fused"]["acc"])
    labels = trainer.splits.test.labels.numpy()
    shares = {100.0 * float(np.mean(labels == k)) for k in range(10)}
    assert any(v["none"] == pytest.approx(s) for s in shares)
    assert sum(phi.values()) == pytest.approx(v["m1+m2"] - v["none"])
    # synthetic's m1 is the strong modality: larger probe and larger contribution
    assert diag["probe"]["m1"]["probe_acc"] > diag["probe"]["m2"]["probe_acc"]
    assert phi["m1"] > phi["m2"] and diag["imbalance_degree"] == pytest.approx(phi["m1"] - phi["m2"])
    assert diag["n_test"] == 250 and diag["probe_settings"]["C"] == 1.0


def test_shapley_sums_with_three_modalities_and_the_methods_own_rule(tmp_path):
    trainer = trained(tmp_path, "iprm", n_modalities=3, epochs=1, n_train=300, n_test=200)
    diag = compute_diagnostics(trainer.eval_view())
    v, phi = diag["coalitions"], diag["shapley"]
    assert len(v) == 8 and set(phi) == {"m1", "m2", "m3"}
    assert sum(phi.values()) == pytest.approx(v["m1+m2+m3"] - v["none"], abs=1e-9)
    # IPRM's predict (logit sum rule) is what the full coalition scores
    assert v["m1+m2+m3"] == pytest.approx(trainer.evaluate(trainer.splits.test)["fused"]["acc"])


def test_predict_that_bypasses_encode_is_refused(concat_run, monkeypatch):
    trainer = concat_run
    model = trainer.model

    def bypass(batch):
        feats = {m: model.encoders[m](batch[m]) for m in model.modalities}
        return Prediction(model.fuse(feats), {})

    monkeypatch.setattr(trainer.method, "predict", bypass)
    with pytest.raises(UnsupportedError, match="model.encode"):
        coalition_accuracy(trainer.eval_view(), {"m1"})
    diag = compute_diagnostics(trainer.eval_view())
    assert diag["shapley"] is None and "model.encode" in diag["shapley_unavailable"]
    assert diag["probe"]["m1"]["probe_acc"] > 50.0  # the probes still ran


# ---- run folders ---------------------------------------------------------------------------
def test_probe_run_writes_diagnostics_of_the_checkpoint(concat_run, capsys):
    trainer = concat_run
    run_dir = trainer.run_dir
    expected = compute_diagnostics(trainer.eval_view())
    (run_dir / DIAGNOSTICS_FILE).unlink(missing_ok=True)
    assert probe_main(str(run_dir), "cpu") == 0  # probe_run, then the table
    on_disk = json.loads((run_dir / DIAGNOSTICS_FILE).read_text())
    assert on_disk["shapley"] == pytest.approx(expected["shapley"])  # the trained weights, not a fresh init
    assert on_disk["probe"]["m2"]["probe_acc"] == pytest.approx(expected["probe"]["m2"]["probe_acc"])
    rec = records.load_record(run_dir)
    assert on_disk["coalitions"]["m1+m2"] == pytest.approx(rec["epochs"][-1]["test"]["fused"]["acc"])
    assert on_disk["run"]["done"] and on_disk["run"]["checkpoint_epoch"] == SMALL["epochs"] - 1
    out = capsys.readouterr().out
    assert "probe acc" in out and "m2" in out and "imbalance degree" in out


def test_probe_run_refuses_folders_it_cannot_trust(concat_run, tmp_path):
    with pytest.raises(DiagnosticsError, match="not a run folder"):
        probe_run(tmp_path)
    with pytest.raises(DiagnosticsError, match="not a folder"):
        probe_run(tmp_path / "missing")
    renamed = tmp_path / "elsewhere" / "synthetic_concat_s0_000000000000"
    shutil.copytree(concat_run.run_dir, renamed)
    (renamed / DIAGNOSTICS_FILE).unlink(missing_ok=True)  # another test may have written one
    with pytest.raises(DiagnosticsError, match="renamed"):
        probe_run(renamed)
    assert not (renamed / DIAGNOSTICS_FILE).exists()


def test_probe_run_refuses_a_run_without_checkpoint(tmp_path):
    trainer = trained(tmp_path, epochs=1, checkpoint=False, diagnostics=False)  # nothing written yet
    assert not (trainer.run_dir / records.CHECKPOINT).exists()
    with pytest.raises(DiagnosticsError, match="no checkpoint.pt") as err:
        probe_run(trainer.run_dir)
    assert isinstance(err.value, MMBalanceError) and "checkpoint=true" in str(err.value)
    assert not (trainer.run_dir / DIAGNOSTICS_FILE).exists()
