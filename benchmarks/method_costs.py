"""Regenerate ``docs/data/method_costs.json``: every method's epoch cost against joint training.

The documentation's method pages quote these ratios; they come from one run of
``benchmarks/bench_methods.py`` (each method's epochs alternate with those of the baseline,
``concat`` with ``unimodal_loss=true``, in the same process, so a change of machine load hits
both sides of a ratio alike), never from numbers typed by hand. The file names the machine
(CPU model and the bf16 kernels oneDNN uses), the date, the thread count and the library
versions, since a ratio measured on one kind of CPU need not hold on another. Run::

    python benchmarks/method_costs.py                 # all methods, synthetic and avdigits
    python benchmarks/method_costs.py --rounds 5      # more epochs per method (steadier)
    python benchmarks/method_costs.py --keep bench.json   # also keep pytest-benchmark's JSON
    python benchmarks/method_costs.py -k avdigits --update # re-measure a subset, keep the other rows

``--update`` keeps the rows of the existing file that this run did not measure, provided they
were measured on the same kind of CPU (model and bf16 kernels); every row carries its own date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "data" / "method_costs.json"
BENCH = ROOT / "benchmarks" / "bench_methods.py"


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (``/proc/cpuinfo``), else the platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What decides the timings: CPU, its bf16 kernels, threads and library versions."""
    import torch

    from mmbalance import records

    kernels = records.cpu_kernels()
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_kernels": records.cpu_kernels_label(kernels),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "libraries": records.library_versions(),
        "code": records.code_version(),
    }


def row_key(row: dict[str, Any]) -> tuple[str, str, str]:
    return (str(row["method"]), json.dumps(row["options"], sort_keys=True), str(row["dataset"]))


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (r["method"] or "", json.dumps(r["options"], sort_keys=True), r["dataset"]))


def merge_rows(old: dict[str, Any] | None, new_rows: list[dict[str, Any]], machine_now: dict[str, Any]) -> list[dict[str, Any]]:
    """The new rows, plus the old file's rows this run did not measure when they came from the
    same kind of CPU; rows from another CPU are dropped (their ratios are not comparable)."""
    if not old:
        return sort_rows(new_rows)
    same = all(old.get("machine", {}).get(k) == machine_now.get(k) for k in ("cpu", "cpu_kernels"))
    if not same:
        return sort_rows(new_rows)
    measured = {row_key(r) for r in new_rows}
    kept = [r for r in old.get("rows", []) if row_key(r) not in measured]
    return sort_rows(new_rows + kept)


def rows_from_benchmark(report: dict[str, Any], date: str = "", rounds: int | None = None,
                        load: list[float] | None = None) -> list[dict[str, Any]]:
    """One row per (method variant, dataset) from pytest-benchmark's JSON ``extra_info``."""
    rows = []
    for bench in report.get("benchmarks", []):
        info, params = bench.get("extra_info", {}), bench.get("params") or {}
        if "ratio_to_joint" not in info:
            continue
        rows.append({
            "method": params.get("method"),
            "options": params.get("options") or {},
            "label": info["method"],
            "dataset": info["dataset"],
            "device": info["device"],
            "batches_per_epoch": info["batches"],
            "ratio_median": round(float(info["ratio_to_joint"]), 3),
            "ratio_min": round(float(info["ratio_to_joint_min"]), 3),
            "median_epoch_s": round(float(info["median_epoch_s"]), 4),
            "baseline_median_epoch_s": round(float(info["baseline_median_epoch_s"]), 4),
            "estimation_s": round(float(info["estimation_s"]), 4),
            "date": date,
            "rounds": rounds,
            "load_average": load,
        })
    return sort_rows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per method and dataset")
    parser.add_argument("--out", type=Path, default=OUT, help="the JSON the docs read")
    parser.add_argument("--keep", type=Path, default=None, help="also keep pytest-benchmark's JSON here")
    parser.add_argument("-k", default=None, help="pytest -k expression: time a subset only")
    parser.add_argument("--update", action="store_true",
                        help="keep the existing file's rows that this run does not re-measure (same CPU kind)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(args.keep or Path(tmp) / "bench.json")
        cmd = [sys.executable, "-m", "pytest", str(BENCH), "-q", "-s", "-p", "no:cacheprovider",
               f"--benchmark-json={raw}"] + (["-k", args.k] if args.k else [])
        env = {**os.environ, "MMBALANCE_BENCH_ROUNDS": str(args.rounds)}
        started = dt.datetime.now(dt.UTC)
        load_start = os.getloadavg()[0]
        done = subprocess.run(cmd, cwd=ROOT, env=env)
        if done.returncode != 0:
            print(f"method_costs: the benchmark failed (exit {done.returncode}); {args.out} is unchanged",
                  file=sys.stderr)
            return done.returncode
        report = json.loads(raw.read_text())

    now = machine()
    load = [round(load_start, 2), round(os.getloadavg()[0], 2)]  # a busy machine shows here
    old = json.loads(args.out.read_text()) if args.update and args.out.is_file() else None
    rows = merge_rows(old, rows_from_benchmark(report, started.date().isoformat(), args.rounds, load), now)
    data = {
        "generated_by": "python benchmarks/method_costs.py",
        "date": max(r["date"] for r in rows) if rows else started.date().isoformat(),
        "baseline": "concat with unimodal_loss=true (joint training: fused + unimodal CEs)",
        "ratio": "median epoch time of the method / median epoch time of the baseline, epochs "
                 "alternating in one process; ratio_min: the same for the fastest epochs; "
                 "estimation_s: work outside the training loop (G-Blend), reported apart",
        "machine": now,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    print(f"method_costs: {len(data['rows'])} rows written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
