"""Method x dataset x seed grids that survive interruption.

A grid file (YAML)::

    name: iprm-small                 # optional
    records: runs/iprm-small         # optional; --records overrides it
    seeds: [0, 1, 2]
    set: {epochs: 20}                # settings for every cell
    datasets:
      - avdigits
      - {name: mfeat, set: {modalities: [fac, mor]}}
    methods:
      - concat
      - {name: iprm, set: {mixup: linear}}

Cells run one after another in this process. A finished cell (DONE marker) is skipped, a killed
one resumes from its last epoch checkpoint, so rerunning the same command after an interruption
finishes the grid without redoing work. A cell the method refuses (e.g. a two-modality method
on three modalities) is reported and skipped.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmbalance.config import read_yaml_mapping
from mmbalance.errors import ConfigError, MMBalanceError, UnsupportedError


@dataclass
class Cell:
    method: str
    dataset: str
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class Grid:
    name: str
    cells: list[Cell]
    records: str | None = None


def _entries(items: Any, what: str, path: Path) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(items, list) or not items:
        raise ConfigError(f"Grid file '{path}' needs a non-empty list under '{what}'.")
    out = []
    for it in items:
        if isinstance(it, str):
            out.append((it, {}))
        elif isinstance(it, Mapping) and "name" in it:
            out.append((str(it["name"]), dict(it.get("set") or {})))
        else:
            raise ConfigError(f"Grid file '{path}': each entry of '{what}' is a name or {{name: ..., set: {{...}}}}; got {it!r}.")
    return out


def load_grid(path: str | Path) -> Grid:
    p = Path(path)
    data = read_yaml_mapping(p, "Grid file")
    unknown = set(data) - {"name", "records", "seeds", "set", "datasets", "methods"}
    if unknown:
        raise ConfigError(f"Grid file '{p}' has unknown keys {sorted(unknown)}; allowed: name, records, seeds, set, datasets, methods.")
    seeds = data.get("seeds", [0])
    common = dict(data.get("set") or {})
    cells = [
        Cell(m, d, int(s), {**common, **dset, **mset})
        for d, dset in _entries(data.get("datasets"), "datasets", p)
        for m, mset in _entries(data.get("methods"), "methods", p)
        for s in seeds
    ]
    return Grid(str(data.get("name", p.stem)), cells, data.get("records"))


def run_grid(grid: Grid, shared: Mapping[str, Any], dry_run: bool = False) -> int:
    """Run every cell; returns 0 when all ran or were skipped as unsupported, 1 otherwise."""
    from mmbalance.records import CHECKPOINT, DONE
    from mmbalance.runner import make_trainer

    base = {"records": grid.records or "runs", "progress": "off", **shared}
    failed = 0
    for i, cell in enumerate(grid.cells, 1):
        tag = f"[{i}/{len(grid.cells)}] {cell.method} on {cell.dataset} seed {cell.seed}"
        try:
            trainer = make_trainer(cell.method, cell.dataset, {**cell.overrides, **base, "seed": cell.seed})
            state = "done" if (trainer.run_dir / DONE).exists() else (
                "resume" if (trainer.run_dir / CHECKPOINT).exists() else "new")
            if dry_run:
                print(f"{tag}: {state} ({trainer.run_dir})")
                continue
            if state == "done":
                print(f"{tag}: done, skipped")
                continue
            t0 = time.perf_counter()
            rec = trainer.fit()
            sel = rec["final"]["selection"]
            print(f"{tag}: best_val test acc {sel['best_val']['test']['fused']['acc']:.2f} "
                  f"({time.perf_counter() - t0:.0f} s, {state})", flush=True)
        except UnsupportedError as exc:
            print(f"{tag}: not applicable — {exc}")
        except MMBalanceError as exc:
            failed += 1
            print(f"{tag}: FAILED — {exc}")
    return 1 if failed else 0
