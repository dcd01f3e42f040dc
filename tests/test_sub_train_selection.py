"""``sub_train``'s optional schedule and selection on validation (added for UMT's teachers): the
recipe's schedule over the sub-training's own epochs, the best validation epoch restored, the
evaluation charged as estimation, and the defaults unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mmbalance.errors import MMBalanceError
from mmbalance.runner import make_trainer

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

SMALL = {"device": "cpu", "progress": "off", "diagnostics": False, "log_epochs": False, "n_train": 160,
         "n_test": 40, "dim": 8, "embed_dim": 8, "batch_size": 32, "epochs": 5, "limit_train_batches": 2}


def _setup(tmp_path, **extra):
    t = make_trainer("concat", "synthetic", {**SMALL, "records": str(tmp_path), **extra})
    t.setup()
    return t


def _branch(t):
    """A copy of modality m1's encoder and head, and its CE."""
    net = torch.nn.ModuleDict({"enc": copy.deepcopy(t.model.encoders["m1"]), "head": copy.deepcopy(t.model.uni_heads["m1"])})

    def loss_fn(n, batch):
        return F.cross_entropy(n["head"](n["enc"](batch["m1"])), batch["label"])

    return net, loss_fn


def test_schedule_anneals_over_the_sub_training_epochs_not_the_run(tmp_path):
    """Cosine over the sub-training's 3 epochs ends at 0 (the run has 5 epochs), StepLR with
    step 1 decays by gamma per sub-epoch, and without ``schedule`` the rate stays the base one.
    Wrong variants caught: T_max = the run's epochs (lr not 0 after 3); the schedule stepped
    per batch (gamma^6, not gamma^3); the schedule never stepped."""
    t = _setup(tmp_path, scheduler="cosine", lr=0.1)
    net, loss_fn = _branch(t)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    t.sub_train(net, list(net.parameters()), loss_fn, "train", 3, optimizer=opt, schedule=True)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)

    t = _setup(tmp_path, scheduler="step", step_size=1, gamma=0.5, lr=0.1)
    net, loss_fn = _branch(t)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    t.sub_train(net, list(net.parameters()), loss_fn, "train", 3, optimizer=opt, schedule=True)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    t.sub_train(net, list(net.parameters()), loss_fn, "train", 3, optimizer=opt)
    assert opt.param_groups[0]["lr"] == 0.1


def test_the_schedule_changes_the_trained_weights_and_the_default_does_not_schedule(tmp_path):
    """With a StepLR of step 1 the scheduled sub-training trains other weights than the plain
    one, and the plain one equals a run whose recipe has no schedule at all (the default path
    is the one every existing method's numbers come from)."""
    results = {}
    for name, extra, sched in (("plain", {"scheduler": "step", "step_size": 1}, False),
                               ("none", {"scheduler": "none"}, False),
                               ("scheduled", {"scheduler": "step", "step_size": 1}, True)):
        t = _setup(tmp_path / name, **extra)
        net, loss_fn = _branch(t)
        t.sub_train(net, list(net.parameters()), loss_fn, "train", 3, schedule=sched)
        results[name] = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert torch.equal(results["plain"], results["none"])
    assert not torch.equal(results["plain"], results["scheduled"])


def _scored_run(tmp_path, wanted_scores, select=True):
    """Sub-train with a score that reads ``wanted_scores[epoch]`` (per sample), and snapshot
    the weights each epoch's evaluation sees (2 training batches per epoch)."""
    t = _setup(tmp_path)
    net, plain_loss = _branch(t)
    steps = [0]
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def loss_fn(n, batch):
        steps[0] += 1
        return plain_loss(n, batch)

    def score(n, batch):
        epoch = steps[0] // 2 - 1
        seen.setdefault(epoch, {k: v.clone() for k, v in n.state_dict().items()})
        return torch.full((batch["label"].shape[0],), float(wanted_scores[epoch]))

    cost = t.sub_train(net, list(net.parameters()), loss_fn, "train", len(wanted_scores),
                       select_on="val" if select else None, score_fn=score if select else None)
    return t, net, cost, seen


def test_selection_restores_the_best_validation_epoch_earliest_on_ties(tmp_path):
    """Scores 0.2, 0.7, 0.7, 0.5: epoch 1 is restored (the earliest of the tie), with the
    weights that epoch's evaluation saw, in eval of every val batch. Wrong variants caught:
    keeping the last epoch; ``>=`` (the later tied epoch 2); the snapshot taken before the
    epoch trains (epoch 0's weights); a snapshot by reference (the last weights)."""
    t, net, cost, seen = _scored_run(tmp_path, [0.2, 0.7, 0.7, 0.5])
    assert cost.scores == pytest.approx([0.2, 0.7, 0.7, 0.5])
    assert cost.best_epoch == 1
    assert sorted(seen) == [0, 1, 2, 3]
    first = next(iter(seen[0]))
    assert all(not torch.equal(seen[i][first], seen[i + 1][first]) for i in range(3))  # it trained
    for k, v in net.state_dict().items():
        assert torch.equal(v, seen[1][k]), k


def test_selection_leaves_the_trajectory_alone_and_charges_its_evaluation(tmp_path):
    """When the last epoch is the best, the selected weights equal the plain sub-training's;
    the optimizer steps are the same and the evaluation batches are added to the estimation
    cost. Wrong variant caught: evaluation left in eval mode for the next epoch's training
    (dropout/BatchNorm would change; here the trajectory check) and val batches not counted."""
    t1, plain, c1, _ = _scored_run(tmp_path / "a", [0.0, 0.0, 0.0], select=False)
    t2, selected, c2, _ = _scored_run(tmp_path / "b", [0.1, 0.2, 0.3])
    for (k, a), (_, b) in zip(plain.state_dict().items(), selected.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    n_val = len(t2.loader(t2.splits.val, train=False))
    assert c2.optimizer_steps == c1.optimizer_steps == 3 * 2
    assert c2.batches == c1.batches + 3 * n_val
    assert t2.estimation_cost.batches == c2.batches and t2.estimation_cost.optimizer_steps == 6
    assert c1.best_epoch is None and c1.scores == []


def test_selection_in_train_mode_model_keeps_its_mode_and_needs_a_score(tmp_path):
    """A selection without a scoring function is refused with the fix named; after a
    selecting sub-training the model is back in the mode it was given in."""
    t = _setup(tmp_path)
    net, loss_fn = _branch(t)
    with pytest.raises(MMBalanceError, match="score_fn"):
        t.sub_train(net, list(net.parameters()), loss_fn, "train", 1, select_on="val")
    net.eval()
    t.sub_train(net, list(net.parameters()), loss_fn, "train", 2, select_on="val",
                score_fn=lambda n, b: (n["head"](n["enc"](b["m1"])).argmax(1) == b["label"]).float())
    assert not net.training
