"""Checks every method plugin must pass, shared by the per-method test files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mmbalance import records
from mmbalance.runner import make_trainer, run
from mmbalance.trainer import Trainer


def epoch_metrics(record: dict[str, Any]) -> list[tuple]:
    """What must match between an interrupted-and-resumed run and an uninterrupted one."""
    return [(e["epoch"], e["train_loss"], e["val"], e["test"], e.get("diagnostics"), e.get("lrs"))
            for e in record["epochs"]]


def assert_resume_identical(
    method: str, dataset: str, overrides: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    kill_epoch: int = 1, kill_batch: int = 2,
) -> None:
    """Kill a run in the middle of epoch ``kill_epoch`` (after ``kill_batch`` batches), rerun
    it, and require the same per-epoch record and final selection as an uninterrupted run."""
    full = run(method, dataset, {**overrides, "records": str(tmp_path / "full")})
    original = Trainer._limited

    def dying(self, loader, limit):
        for i, batch in original(self, loader, limit):
            if self.method.epoch == kill_epoch and i == kill_batch and loader.dataset is not None \
                    and self.model.training:
                raise KeyboardInterrupt  # killed mid-epoch
            yield i, batch

    killed = {**overrides, "records": str(tmp_path / "killed")}
    monkeypatch.setattr(Trainer, "_limited", dying)
    with pytest.raises(KeyboardInterrupt):
        run(method, dataset, killed)
    monkeypatch.setattr(Trainer, "_limited", original)
    t = make_trainer(method, dataset, killed)
    assert not (t.run_dir / records.DONE).exists()
    resumed = run(method, dataset, killed)
    assert resumed.record["header"].get("resumed_from_epoch") == kill_epoch
    assert epoch_metrics(resumed.record) == epoch_metrics(full.record)
    assert resumed.record["final"]["selection"] == full.record["final"]["selection"]
