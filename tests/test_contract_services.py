"""The contract services added for the methods that resample, diagnose or keep teachers:
epochs over a row list with duplicates (``Phase.rows``), passes over chosen rows and without
training augmentation (``iterate(rows=..., augment=False)``), and work charged as estimation
(``trainer.estimation()``)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from method_checks import assert_resume_identical

from mmbalance.data import DictDataset, RowPlan, eval_view, subset
from mmbalance.errors import DataError
from mmbalance.method import Method, Phase
from mmbalance.registry import register_method
from mmbalance.runner import make_trainer, run

SMALL = {"epochs": 2, "n_train": 120, "n_test": 60, "batch_size": 16, "val_fraction": 0.0}


def _dict_ds(n: int = 10) -> DictDataset:
    return DictDataset({"a": torch.arange(n, dtype=torch.float32).view(n, 1)}, torch.arange(n) % 3)


# ---------------------------------------------------------------------------- RowPlan
def test_row_plan_keeps_each_sample_index_and_numbers_the_copies():
    ds = _dict_ds()
    plan = RowPlan(ds, [4, 4, 7, 0])
    assert len(plan) == 4
    batch = plan.get_batch([1, 0, 2])
    assert batch["index"].tolist() == [4, 4, 7]  # the position in the split, kept
    assert batch["row"].tolist() == [1, 0, 2]  # the position in the plan: copies stay apart
    assert batch["a"].view(-1).tolist() == [4.0, 4.0, 7.0]
    assert plan.labels.tolist() == [1, 1, 1, 0]


def test_row_plan_over_a_viewed_subset_keeps_the_subset_positions():
    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return {"a": torch.tensor([float(i)]), "label": i % 2, "index": i}

    sub = subset(Items(), [5, 3, 1])  # a held-out carve of a non-memory dataset
    plan = RowPlan(sub, [2, 2, 0])
    items = [plan[r] for r in range(3)]
    assert [it["index"] for it in items] == [2, 2, 0]  # positions in the (carved) train split
    assert [it["row"] for it in items] == [0, 1, 2]
    assert [float(it["a"]) for it in items] == [1.0, 1.0, 5.0]


def test_row_plan_refuses_rows_outside_its_split():
    with pytest.raises(ValueError, match="outside 0..9"):
        RowPlan(_dict_ds(), [0, 10])


# ------------------------------------------------------------------------- eval_view
def test_eval_view_of_memory_data_is_itself_and_unknown_augmenting_data_is_refused():
    ds = _dict_ds()
    assert eval_view(ds) is ds

    class Augmented(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"a": torch.rand(1), "label": 0, "index": i}

    with pytest.raises(DataError, match="eval_view"):
        eval_view(Augmented())
    with pytest.raises(DataError, match="eval_view"):
        eval_view(subset(Augmented(), [0, 1]))


def test_eval_view_of_av_clips_reads_fixed_frames(tmp_path):
    """Train items of an audio + frames dataset are random crops; their eval view gives the
    same rows as the test pipeline would, identical on every read."""
    from test_cremad import build, make_cremad_b

    make_cremad_b(tmp_path, n_train=2, n_test=1, frames=4)
    splits = build(tmp_path, val_fraction=0.0)
    view = eval_view(splits.train)
    assert len(view) == len(splits.train) and view.train is False
    torch.manual_seed(0)
    a = view[0]["visual"]
    torch.manual_seed(1)
    assert torch.equal(a, view[0]["visual"])  # deterministic whatever the RNG
    torch.manual_seed(0)
    t0 = splits.train[0]["visual"]
    torch.manual_seed(1)
    assert not torch.equal(t0, splits.train[0]["visual"])  # the train pipeline is random


# --------------------------------------------------------------- Phase.rows in a real run
@register_method("test-rows", "trains each epoch on a row plan with duplicates")
class RowsMethod(Method):
    name = "test-rows"
    seen: list[tuple[int, list[int], list[int]]] = []

    def epoch_plan(self, epoch: int):
        n = len(self.trainer.split("train"))
        rows = np.concatenate([np.arange(n), np.arange(0, n, 3)])  # every third sample twice
        return [Phase(rows=rows.tolist())]

    def training_step(self, batch, batch_idx):
        RowsMethod.seen.append((self.epoch, batch["index"].tolist(), batch["row"].tolist()))
        assert self.num_training_batches == -(-len(self.phase.rows) // self.cfg["batch_size"])
        return F.cross_entropy(self.model(batch).fused, batch["label"])


def test_an_epoch_over_a_row_plan_sees_every_copy_once(fast):
    RowsMethod.seen = []
    rec = run("test-rows", "synthetic", {**fast, **SMALL, "epochs": 1}).record
    n = 120
    index = [i for e, idx, _ in RowsMethod.seen for i in idx]
    rows = [r for _, _, rr in RowsMethod.seen for r in rr]
    assert sorted(rows) == list(range(n + 40))  # each copy exactly once
    counts = np.bincount(index, minlength=n)
    assert (counts[::3] == 2).all() and (np.delete(counts, np.arange(0, n, 3)) == 1).all()
    assert rec["epochs"][0]["train_batches"] == -(-(n + 40) // 16)
    assert rows != sorted(rows)  # shuffled as one set


def test_a_row_plan_run_resumes_identically(fast, tmp_path, monkeypatch):
    assert_resume_identical("test-rows", "synthetic", {**fast, **SMALL, "epochs": 3}, tmp_path, monkeypatch,
                            kill_epoch=1)


# ------------------------------------------------------------ iterate(rows=..., augment=)
def test_iterate_over_chosen_rows_in_order(fast):
    t = make_trainer("concat", "synthetic", {**fast, **SMALL})
    t.setup()
    got = [(b["index"].tolist(), b["row"].tolist()) for b in t.iterate("train", rows=[5, 1, 5, 9], tag="x")]
    assert [i for idx, _ in got for i in idx] == [5, 1, 5, 9]  # in the order given: no shuffle
    assert [r for _, rr in got for r in rr] == [0, 1, 2, 3]
    shuffled = [i for b in t.iterate("train", rows=list(range(40)), shuffle=True, tag="x") for i in b["index"].tolist()]
    assert sorted(shuffled) == list(range(40)) and shuffled != list(range(40))


# ------------------------------------------------------------------------- estimation
@register_method("test-estimating", "spends time and passes in an estimation block each epoch")
class Estimating(Method):
    name = "test-estimating"
    pause = 1000.0  # seconds of a fake clock: far more than any real epoch

    def on_train_epoch_start(self, epoch: int) -> None:
        with self.trainer.estimation():
            FakeClock.now += self.pause
            for _ in self.trainer.iterate("train", batches=3, tag="value"):
                pass
        for _ in self.trainer.iterate("train", batches=2, tag="other"):  # not estimation
            pass


class FakeClock:
    """time.perf_counter that real time drives and a test can move forward at once."""

    now = 0.0
    real = staticmethod(time.perf_counter)

    @classmethod
    def read(cls) -> float:
        return cls.real() + cls.now


def test_estimation_is_charged_apart_from_training_time(fast, monkeypatch):
    monkeypatch.setattr(time, "perf_counter", FakeClock.read)
    rec = run("test-estimating", "synthetic", {**fast, **SMALL, "epochs": 2}).record
    for e in rec["epochs"]:
        assert e["estimation_cost"]["time_s"] >= Estimating.pause
        assert e["estimation_cost"]["batches"] == 3
        assert e["extra_batches"] == 2
        assert e["train_time_s"] < Estimating.pause  # a tiny synthetic epoch; the pause is left out
    assert rec["final"]["estimation_cost"]["batches"] == 6


def test_nested_sub_training_inside_estimation_is_counted_once(fast):
    t = make_trainer("concat", "synthetic", {**fast, **SMALL})
    t.setup()
    t0 = time.perf_counter()
    with t.estimation():
        time.sleep(0.1)
        t.sub_train(t.model, list(t.model.fusion.parameters()),
                    lambda model, batch: F.cross_entropy(model(batch).fused, batch["label"]), "train", 1)
        with t.estimation():
            time.sleep(0.1)
    wall = time.perf_counter() - t0
    assert t.estimation_cost.time_s == pytest.approx(wall, abs=0.05)
