"""UME method plugin: the ensemble rules by hand, the M models training independently (one
optimizer and one gradient clip each), no fused head, resume, real data, refusals."""

from __future__ import annotations

import math

import pytest
import torch
from method_checks import assert_resume_identical
from mmbalance.methods.ume import UME, ensemble, ume_losses

from mmbalance.errors import MMBalanceError
from mmbalance.runner import make_trainer, run
from mmbalance.trainer import to_device

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest

SMALL = {"epochs": 2, "n_train": 200, "n_test": 60, "dim": 8, "embed_dim": 8, "batch_size": 32,
         "checkpoint": False, "diagnostics": False, "progress": "off", "device": "cpu", "log_epochs": False}


def test_ensemble_rules_by_hand():
    """Logits (ln 3, 0) and (0, ln 2): mean of logits (ln 3 / 2, ln 2 / 2) -> class 0; the
    probabilities (3/4, 1/4) and (1/3, 2/3) average to (13/24, 11/24), whose log is the probs
    rule's output. Wrong variants caught: sum instead of mean (the probs rule's log-probabilities
    would not normalise); the mean of log-probabilities (geometric pooling) for probs; the
    last model's logits only."""
    z = {"a": torch.tensor([[math.log(3.0), 0.0]]), "b": torch.tensor([[0.0, math.log(2.0)]])}
    torch.testing.assert_close(ensemble(z), torch.tensor([[math.log(3.0) / 2, math.log(2.0) / 2]]))
    torch.testing.assert_close(ensemble(z, "probs"), torch.log(torch.tensor([[13 / 24, 11 / 24]])))
    assert ensemble(z, "probs").exp().sum().item() == pytest.approx(1.0)
    losses = ume_losses(z, torch.tensor([1]))
    assert losses["a"].item() == pytest.approx(math.log(4.0)) and losses["b"].item() == pytest.approx(math.log(1.5))
    with pytest.raises(ValueError):
        ensemble(z, "vote")


def _trained(tmp_path, prepare=None, **extra):
    t = make_trainer("ume", "synthetic", {**SMALL, "records": str(tmp_path), **extra})
    t.setup()
    if prepare is not None:
        prepare(t)
    t.method.on_cell_start()
    t.method.on_fit_start()
    for epoch in range(2):
        t.train_epoch(epoch)
    return t


def _scramble_m2(t):
    """Other data and other initial weights for m2 only."""
    for split in (t.splits.train, t.splits.val, t.splits.test):
        split.tensors["m2"] = split.tensors["m2"] * -3.0 + 1.0
    with torch.no_grad():
        for p in t.model.encoders["m2"].parameters():
            p.mul_(2.0)


@pytest.mark.parametrize("clip", [None, 0.01])
def test_each_model_trains_as_if_alone(tmp_path, clip):
    """m1's encoder and head after two epochs are bit-identical whatever m2's data and weights
    are, with or without gradient clipping: the models do not interact (one optimizer and one
    clip per modality). Wrong variants caught: one optimizer over all models with grad_clip
    (the global norm couples them); a fused term or the ensemble's CE in the loss; m2's loss
    on m1's head."""
    a = _trained(tmp_path / "a", grad_clip=clip)
    b = _trained(tmp_path / "b", prepare=_scramble_m2, grad_clip=clip)
    for part in ("encoders.m1", "uni_heads.m1"):
        for k, v in a.model.state_dict().items():
            if k.startswith(part):
                assert torch.equal(v, b.model.state_dict()[k]), k
    assert not torch.equal(a.model.uni_heads["m2"].weight, b.model.uni_heads["m2"].weight)
    assert a.optimizer_steps == 2 * 2 * len(a.loader(a.splits.train, train=True))  # M steps a batch


def test_step_loss_and_prediction(tmp_path):
    """The step returns sum_m CE(z_m); prediction is the ensemble of the heads, per modality each
    head; no fused head exists. Wrong variants caught: the default predict's path with a
    combine option ignored (probs); per-modality logits from the wrong head."""
    t = _trained(tmp_path, ume_combine="probs")
    model = t.model
    assert model.fusion is None and t.method.per_modality_source() == "unimodal_heads"
    batch = to_device(next(iter(t.loader(t.splits.test, train=False))), t.device)
    model.eval()
    pred = t.method.predict(batch)
    per = model.unimodal_logits(model.encode(batch))
    for m in ("m1", "m2"):
        torch.testing.assert_close(pred.per_modality[m], per[m])
    torch.testing.assert_close(pred.fused, torch.log((per["m1"].softmax(1) + per["m2"].softmax(1)) / 2))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), t.autocast():
        want = sum(torch.nn.functional.cross_entropy(per_m, batch["label"])
                   for per_m in model.unimodal_logits(model.encode(batch)).values())
    model.load_state_dict(before)
    loss = t.method.training_step(batch, 0)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_resume_is_identical(tmp_path, monkeypatch):
    assert_resume_identical("ume", "synthetic", {**SMALL, "epochs": 3, "checkpoint": True}, tmp_path, monkeypatch)


def test_runs_three_modalities_refuses_one_and_labels(tmp_path):
    rec = run("ume", "synthetic", {**SMALL, "records": str(tmp_path), "n_modalities": 3, "epochs": 1}).record
    assert {"ume_ce_m1", "ume_ce_m2", "ume_ce_m3"} <= set(rec["epochs"][0]["diagnostics"])
    assert {"m1", "m2", "m3"} <= set(rec["epochs"][0]["test"])
    with pytest.raises(MMBalanceError, match="at least 2"):
        make_trainer("ume", "synthetic", {**SMALL, "records": str(tmp_path), "modalities": ["m1"]}).check()
    assert UME({}).label() == "UME" and UME({"ume_combine": "probs"}).label() == "UME (mean of probabilities)"


def test_mfeat_trains_well_above_chance(fast, shared_data):
    """Real data: mfeat zer+mor (10 classes, chance 10 %), a few epochs."""
    res = run("ume", "mfeat", {**fast, "modalities": ["zer", "mor"], "epochs": 6, "diagnostics": False})
    assert res.record["final"]["selection"]["best_val"]["test"]["fused"]["acc"] > 60.0


@pytest.mark.gpu
def test_cuda_bf16_cell(tmp_path):
    res = run("ume", "synthetic", {"epochs": 2, "n_train": 600, "n_test": 200, "device": "cuda",
                                   "records": str(tmp_path), "progress": "off"})
    assert res.record["header"]["amp"] == "bfloat16"
    assert res.record["final"]["selection"]["last"]["test"]["fused"]["acc"] > 20.0
