"""fp32 against bf16 on this CPU and on this CPU capped to AVX2, in one run.

    OMP_NUM_THREADS=1 MMBALANCE_DATA_ROOT=../shared/data python benchmarks/cpu_precision.py [--json OUT]

Times one training step (forward, backward, optimizer step) of a cell's real model, built by
the trainer, in the four combinations of precision (fp32, bf16 autocast) and layout
(contiguous, channels-last), alternating the four in every round so a change of machine load
hits them alike, and reports the minimum over the rounds. Each CPU kind runs in its own
process because oneDNN and ATen read their caps once, at start-up: ``native`` as the machine
is, ``avx2`` with ``ONEDNN_MAX_CPU_ISA=AVX2``, ``ATEN_CPU_CAPABILITY=avx2`` and
``MKL_ENABLE_INSTRUCTIONS=AVX2`` (what a CPU without AVX-512 runs; check with
``ONEDNN_VERBOSE=1`` that the convolutions report ``jit:avx2``). The cap runs this CPU's AVX2
kernels at this CPU's clock and memory speed: an older AVX2-only CPU can be slower still. The figures decide ``amp=auto`` on a CPU (bf16 only with bf16 hardware) and the
benchmark grid's precision; the ratio, not the seconds, is what carries between machines.

``--cells`` times whole grid cells instead (training, evaluation and diagnostics of one seed,
fp32 channels-last, as the benchmark grids run them), alternating the two CPU kinds in every
round, one process per cell run (the import is not timed): the ratio by which a CPU without
AVX-512 stretches the benchmark's wall time::

    OMP_NUM_THREADS=1 python benchmarks/cpu_precision.py --cells --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# MKL (the linear layers' GEMMs) picks its own kernels: capped too, as an AVX2-only CPU would run
KINDS = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                                "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}
COMBOS = [("none", "contiguous"), ("none", "channels_last"), ("bf16", "channels_last"), ("bf16", "contiguous")]
#: Cells timed: AV-digits' audio and image CNNs (where bf16 matters), and an MLP setting.
CELLS = [("avdigits", {}), ("mfeat", {"modalities": ["zer", "mor"]})]


def _data_root() -> str | None:
    here = Path(__file__).resolve().parents[1]
    for cand in [os.environ.get("MMBALANCE_DATA_ROOT"), here.parent / "shared" / "data", here / "shared" / "data"]:
        if cand and (Path(cand) / "fsdd" / "recordings").is_dir():
            return str(cand)
    return None


def _step_timer(dataset: str, options: dict[str, Any], amp: str, layout: str, records: str) -> Any:
    """A function that runs one training step of the cell on one fixed batch."""
    import torch

    from mmbalance.runner import make_trainer

    overrides = {**options, "amp": amp, "memory_format": layout, "device": "cpu", "progress": "off",
                 "log_epochs": False, "diagnostics": False, "checkpoint": False, "records": records,
                 "limit_train_batches": 1}
    root = _data_root()
    if root:
        overrides["data_root"] = root
    trainer = make_trainer("concat", dataset, overrides)
    trainer.setup()
    trainer.method.on_fit_start()

    def step() -> float:
        t0 = time.perf_counter()
        trainer.train_epoch(0)  # one batch (limit_train_batches=1), ends in .item()
        return time.perf_counter() - t0

    step()  # warm-up: allocator, kernels, first-batch costs
    torch.manual_seed(0)
    return step


def child(rounds: int) -> dict[str, Any]:
    """Time every combination on this process's CPU kind."""
    import torch

    from mmbalance import records

    out: dict[str, Any] = {"cpu_kernels": records.cpu_kernels(), "threads": torch.get_num_threads(), "cells": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for dataset, options in CELLS:
            try:
                timers = {f"{a}/{lay}": _step_timer(dataset, options, a, lay, tmp) for a, lay in COMBOS}
            except Exception as exc:  # a missing data root skips the cell, it does not end the run
                out["cells"][dataset] = {"skipped": f"{type(exc).__name__}: {exc}"}
                continue
            times: dict[str, list[float]] = {k: [] for k in timers}
            for _ in range(rounds):
                for key, step in timers.items():
                    times[key].append(step())
            out["cells"][dataset] = {k: min(v) for k, v in times.items()}
    return out


def cell_child(dataset: str) -> dict[str, Any]:
    """One whole cell (seed 0, the grid's fp32 channels-last settings) in a fresh records folder."""
    from mmbalance import records
    from mmbalance.runner import make_trainer

    options = dict(dict(CELLS)[dataset])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer("concat", dataset, {**options, "amp": "none", "memory_format": "channels_last",
                                                   "device": "cpu", "progress": "off", "log_epochs": False,
                                                   "records": tmp})
        t0 = time.perf_counter()
        trainer.fit()
        return {"cell_s": time.perf_counter() - t0, "cpu_kernels": records.cpu_kernels()}


def cells(rounds: int) -> dict[str, Any]:
    """Whole cells, the CPU kinds alternating in every round; the minimum per kind and cell."""
    out: dict[str, Any] = {kind: {} for kind in KINDS}
    for _ in range(rounds):
        for dataset, _opts in CELLS:
            for kind, env in KINDS.items():
                proc = subprocess.run([sys.executable, __file__, "--cell-child", dataset],
                                      env={**os.environ, **env}, capture_output=True, text=True, check=False)
                if proc.returncode:
                    raise RuntimeError(f"{dataset} on {kind}: {proc.stderr.strip().splitlines()[-1:]}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                best = out[kind].get(dataset, {}).get("cell_s", float("inf"))
                out[kind][dataset] = {"cell_s": min(best, res["cell_s"]), "cpu_kernels": res["cpu_kernels"]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--cells", action="store_true", help="time whole grid cells (fp32) instead of steps")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cell-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.rounds)))
        return 0
    if args.cell_child:
        print(json.dumps(cell_child(args.cell_child)))
        return 0
    if args.cells:
        from mmbalance.records import cpu_kernels_label

        found = cells(args.rounds)
        print(f"whole cells (concat, seed 0, fp32 channels-last), min of {args.rounds} rounds:")
        for dataset, _opts in CELLS:
            nat, avx2 = found["native"][dataset], found["avx2"][dataset]
            print(f"  {dataset}: native ({cpu_kernels_label(nat['cpu_kernels'])}) {nat['cell_s']:.1f} s, "
                  f"capped ({cpu_kernels_label(avx2['cpu_kernels'])}) {avx2['cell_s']:.1f} s: "
                  f"ratio {avx2['cell_s'] / nat['cell_s']:.2f}")
        if args.json:
            args.json.write_text(json.dumps({"rounds": args.rounds, "cells": found}, indent=1))
        return 0
    results: dict[str, Any] = {}
    for kind, env in KINDS.items():
        proc = subprocess.run([sys.executable, __file__, "--child", "--rounds", str(args.rounds)],
                              env={**os.environ, **env}, capture_output=True, text=True, check=False)
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        results[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    from mmbalance.records import cpu_kernels_label

    for kind, res in results.items():
        label = cpu_kernels_label(res["cpu_kernels"])
        print(f"\n{kind}: {label}, bf16 hardware used: {res['cpu_kernels']['bf16_native']}, "
              f"{res['threads']} thread(s); one training step, min of {args.rounds} rounds")
        for cell, times in res["cells"].items():
            if "skipped" in times:
                print(f"  {cell}: skipped ({times['skipped']})")
                continue
            fp32 = min(times["none/contiguous"], times["none/channels_last"])
            bf16 = min(times["bf16/contiguous"], times["bf16/channels_last"])
            parts = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in times.items())
            print(f"  {cell}: {parts}; best bf16 / best fp32 = {bf16 / fp32:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
