"""Programmatic entry point: one call runs (or resumes, or skips) one cell."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmbalance import config as config_mod
from mmbalance.engine.loop import Trainer
from mmbalance.registry import DATASETS, METHODS


@dataclass
class RunResult:
    run_dir: Path
    record: dict[str, Any]  # folded record: header, epochs, final, done
    config: dict[str, Any]
    outcome: str = ""  # trained, resumed, or "finished before" (nothing was trained)

    @property
    def final(self) -> dict[str, Any]:
        return self.record["final"]["selection"]


def resolve_config(
    method: str,
    dataset: str,
    overrides: Mapping[str, Any] | None = None,
    yaml_path: str | Path | None = None,
    sources: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], Any, Any]:
    """The run's configuration and plugin classes; ``sources`` names where overrides that are
    not ``--set`` came from (a grid file's cell), for the errors."""
    method_cls = METHODS.get(method)
    dataset_cls = DATASETS.get(dataset)
    yaml_values = config_mod.load_yaml(yaml_path) if yaml_path else None
    cfg = config_mod.assemble(dataset_cls, method_cls, yaml_values, overrides, sources)
    return cfg, dataset_cls, method_cls


def make_trainer(
    method: str,
    dataset: str,
    overrides: Mapping[str, Any] | None = None,
    yaml_path: str | Path | None = None,
    sources: Mapping[str, str] | None = None,
) -> Trainer:
    cfg, dataset_cls, method_cls = resolve_config(method, dataset, overrides, yaml_path, sources)
    return Trainer(cfg, dataset_cls(), method_cls(cfg))


def run(
    method: str,
    dataset: str,
    overrides: Mapping[str, Any] | None = None,
    yaml_path: str | Path | None = None,
    fresh: bool = False,
) -> RunResult:
    """Train one cell and return its record. A finished cell is not trained again; a killed
    one resumes from its last epoch checkpoint; ``fresh=True`` discards both and starts over."""
    trainer = make_trainer(method, dataset, overrides, yaml_path)
    record = trainer.fit(fresh=fresh)
    return RunResult(trainer.run_dir, record, trainer.cfg, trainer.outcome)
