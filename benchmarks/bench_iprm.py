"""IPRM's training-epoch cost against plain joint training (IPRM paper, Table 4 shape).

One pytest-benchmark run times one training epoch of

* ``concat`` with ``unimodal_loss=true``: naive joint training (fused + unimodal CEs), and
* ``iprm``: the same encoders, plus a probe pass and a rebalanced pass of the fused head,

on ``synthetic`` (always) and on ``avdigits`` when its data is found (``$MMBALANCE_DATA_ROOT``
or ``../shared/data`` beside the checkout; skipped otherwise). The IPRM entry's ``extra_info``
holds ``ratio_to_concat`` (median epoch time of IPRM / median of concat, same dataset, same
machine, same run) and ``ratio_to_concat_min`` (ratio of the fastest epochs, steadier on a
shared machine); both are also printed. Run::

    pytest benchmarks/bench_iprm.py --benchmark-json=bench_iprm.json -s

``--device`` follows ``MMBALANCE_BENCH_DEVICE`` (default ``auto``: the GPU when there is one).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from mmbalance.errors import MMBalanceError
from mmbalance.registry import DATASETS
from mmbalance.runner import make_trainer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROUNDS = int(os.environ.get("MMBALANCE_BENCH_ROUNDS", "3"))
DEVICE = os.environ.get("MMBALANCE_BENCH_DEVICE", "auto")
METHODS: list[tuple[str, dict[str, Any]]] = [("concat", {"unimodal_loss": True}), ("iprm", {})]
_TIMES: dict[tuple[str, str], list[float]] = {}


def shared_data_root() -> Path | None:
    """Where avdigits' FSDD folder lives, or None (then the avdigits cells are skipped)."""
    env = os.environ.get("MMBALANCE_DATA_ROOT")
    here = Path(__file__).resolve().parents[1]
    for cand in ([Path(env)] if env else []) + [here.parent / "shared" / "data", here / "shared" / "data"]:
        if (cand / "fsdd" / "recordings").is_dir():
            return cand
    return None


def dataset_overrides(dataset: str) -> dict[str, Any]:
    if dataset == "synthetic":
        return {}
    root = shared_data_root()
    if root is None or dataset not in DATASETS:
        pytest.skip(f"{dataset}: data (fsdd/recordings under ../shared/data) or plugin not found")
    return {"data_root": str(root)}


@pytest.mark.parametrize("dataset", ["synthetic", "avdigits"])
@pytest.mark.parametrize(("method", "options"), METHODS, ids=[m for m, _ in METHODS])
def test_epoch_time(benchmark, tmp_path, dataset: str, method: str, options: dict[str, Any]) -> None:
    overrides = {
        **dataset_overrides(dataset),
        **options,
        "device": DEVICE,
        "progress": "off",
        "checkpoint": False,
        "records": str(tmp_path / "runs"),
    }
    try:
        trainer = make_trainer(method, dataset, overrides)
        trainer.setup()
    except MMBalanceError as exc:
        pytest.skip(f"{dataset}: {exc}")
    durations: list[float] = []

    def one_epoch() -> None:
        t0 = time.perf_counter()
        trainer.train_epoch(len(durations))  # ends in .item(): the device is synchronised
        durations.append(time.perf_counter() - t0)

    one_epoch()  # warm-up: allocator, kernels, first-batch costs
    durations.clear()
    benchmark.pedantic(one_epoch, rounds=ROUNDS, iterations=1)
    _TIMES[(dataset, method)] = list(durations)
    info = benchmark.extra_info
    info.update(dataset=dataset, method=trainer.method.label(), device=str(trainer.device),
                batches=len(trainer.loader(trainer.splits.train, train=True)),
                median_epoch_s=statistics.median(durations), min_epoch_s=min(durations))
    base = _TIMES.get((dataset, "concat"))
    if method == "iprm" and base:
        # the median is the headline; the min is the better estimate on a loaded machine
        ratio = statistics.median(durations) / statistics.median(base)
        ratio_min = min(durations) / min(base)
        info.update(ratio_to_concat=ratio, ratio_to_concat_min=ratio_min)
        print(f"\n[bench_iprm] {dataset} on {trainer.device}: IPRM epoch median "
              f"{statistics.median(durations):.3f}s vs concat+uni CE {statistics.median(base):.3f}s: "
              f"ratio {ratio:.3f} (ratio of minima {ratio_min:.3f})")
