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

Cells run one after another, or ``--jobs N`` at a time in worker processes, or one per GPU with
``--gpus all`` / ``--gpus 0,1``. A finished cell (DONE marker) is skipped, a killed one resumes
from its last epoch checkpoint, so rerunning the same command after an interruption finishes
the grid without redoing work. A cell the method refuses (e.g. a two-modality method on three
modalities) is reported and skipped. Past one machine, hand the cells to a cluster scheduler:
each cell is an independent ``mmbalance run`` writing into a shared records folder.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
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


def run_cell(cell: Cell, base: Mapping[str, Any], dry_run: bool = False) -> tuple[str, bool]:
    """Run (or skip, or resume) one cell; returns (one-line report, failed?)."""
    from mmbalance.records import CHECKPOINT, DONE
    from mmbalance.runner import make_trainer

    try:
        trainer = make_trainer(cell.method, cell.dataset, {**cell.overrides, **base, "seed": cell.seed})
        state = "done" if (trainer.run_dir / DONE).exists() else (
            "resume" if (trainer.run_dir / CHECKPOINT).exists() else "new")
        if dry_run:
            return f"{state} ({trainer.run_dir})", False
        if state == "done":
            return "done, skipped", False
        t0 = time.perf_counter()
        rec = trainer.fit()
        acc = rec["final"]["selection"]["best_val"]["test"]["fused"]["acc"]
        return f"best_val test acc {acc:.2f} ({time.perf_counter() - t0:.0f} s, {state}, {trainer.device})", False
    except UnsupportedError as exc:
        return f"not applicable — {exc}", False
    except MMBalanceError as exc:
        return f"FAILED — {exc}", True



def _init_worker(slots: Any, gpus: list[str] | None, threads: int) -> None:
    """Pin this worker process to one GPU (before CUDA starts) and a share of the CPU threads."""
    slot = slots.get()
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[slot]
    import torch

    torch.set_num_threads(threads)


def run_grid(
    grid: Grid, shared: Mapping[str, Any], dry_run: bool = False, jobs: int = 1, gpus: list[str] | None = None
) -> int:
    """Run every cell; returns 0 when all ran or were skipped as unsupported, 1 otherwise.

    ``jobs > 1`` runs that many cells at once in worker processes; with ``gpus`` each worker
    owns one GPU (one cell per visible GPU at a time). Cells never share a run directory, so
    parallel workers cannot corrupt each other's records.
    """
    base = {"records": grid.records or "runs", "progress": "off", **shared}
    n = len(grid.cells)
    tags = [f"[{i}/{n}] {c.method} on {c.dataset} seed {c.seed}" for i, c in enumerate(grid.cells, 1)]
    failed = 0
    if gpus:
        jobs = len(gpus)
    if jobs <= 1 or dry_run:
        for tag, cell in zip(tags, grid.cells, strict=True):
            msg, bad = run_cell(cell, base, dry_run)
            failed += bad
            print(f"{tag}: {msg}", flush=True)
        return 1 if failed else 0
    ctx = mp.get_context("spawn")
    slots = ctx.Queue()
    for k in range(jobs):
        slots.put(k)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(slots, gpus, threads)) as pool:
        futures = {pool.submit(run_cell, cell, base): tag for tag, cell in zip(tags, grid.cells, strict=True)}
        for fut in as_completed(futures):
            msg, bad = fut.result()
            failed += bad
            print(f"{futures[fut]}: {msg}", flush=True)
    return 1 if failed else 0
