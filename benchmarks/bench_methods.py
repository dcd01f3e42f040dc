"""Every method's training-epoch cost against joint training (IPRM paper, Table 4 shape).

One pytest-benchmark run times training epochs of each method, alternating with epochs of
the baseline with the same encoders, ``concat`` with ``unimodal_loss=true`` (naive joint
training: fused + unimodal CEs), on ``synthetic`` (always) and on ``avdigits`` when its data is found
(``$MMBALANCE_DATA_ROOT`` or ``../shared/data`` beside the checkout; skipped otherwise). Each
method's ``extra_info`` holds ``ratio_to_joint`` (median epoch time / the baseline's median,
same dataset, same machine, same run), ``ratio_to_joint_min`` (ratio of the fastest epochs,
steadier on a shared machine) and, for methods with work outside the main loop (G-Blend's
sub-training), ``estimation_s``: that cost, reported apart. Both are also printed. Run::

    pytest benchmarks/bench_methods.py --benchmark-json=bench_methods.json -s
    pytest benchmarks/bench_methods.py -k "avdigits and (ogm or concat)" -s   # a subset

``--device`` follows ``MMBALANCE_BENCH_DEVICE`` (default ``auto``: the GPU when there is one).
Targets: OGM-GE, PMR, MSLR and OGR-GB (per training epoch) within 1.10x, AGM within 2.0x at
two modalities, IPRM about 1x (issue 8); MMPareto <= 1.8x, MLA <= 1.15x, LFM (scheduled)
<= 1.05x with the learnable mode reported, ReconBoost per stage against its budget preset
(about 1.7x a plain epoch; with the default ``recon_epoch=stage`` one epoch is one stage).
Valuation: a resampled epoch costs its rows (originals + copies, ``data_passes``) at the price of
plain steps, its valuation pass (one forward over train, or over Z) reported apart.
The naive fusions (one joint loss, no unimodal CEs) and unimodal training (the dataset's first
modality alone) are timed too, so every method's documentation page can quote its cost
(``benchmarks/method_costs.py`` writes the ratios to ``docs/data/method_costs.json``).
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
from mmbalance.registry import METHODS as REGISTERED
from mmbalance.runner import make_trainer

ROUNDS = int(os.environ.get("MMBALANCE_BENCH_ROUNDS", "3"))
DEVICE = os.environ.get("MMBALANCE_BENCH_DEVICE", "auto")
BASELINE = ("concat", {"unimodal_loss": True})
#: Variants timed besides every method's defaults (a cost that an option changes).
#: Valuation at its defaults trains 5 plain warm-up epochs, longer than the timed ones: its
#: variants with warmup=0 time resampled epochs (the valuation pass is estimation_s).
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("lfm", {"alpha_schedule": "learnable"}),
    ("agm", {"coalitions": "reuse"}),  # the cheaper train-mode coalitions against the official re-encoding
    ("valuation", {"warmup": 0}),
    ("valuation", {"warmup": 0, "level": "modality"}),
    # a diagnosis (train + held-out passes and k-means, as estimation) in every timed epoch
    ("relearning", {"reinit_epoch": 1}),
    ("opm", {"warmup_epochs": 0}),  # the default warm-up (6 epochs) would time plain training
    ("umt", {"umt_teacher_cache": "off"}),  # the teachers' forward in every step (as on augmenting data)
]
#: Every registered method at its defaults, the naive fusions and unimodal training included (a
#: method added later is timed without an edit here), then the variants.
METHODS: list[tuple[str, dict[str, Any]]] = [BASELINE] + [
    (name, {}) for name in REGISTERED.names()
] + VARIANTS


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


def _trainer(method: str, dataset: str, options: dict[str, Any], tmp_path: Path) -> Any:
    overrides = {**dataset_overrides(dataset), **options, "device": DEVICE, "progress": "off",
                 "log_epochs": False, "diagnostics": False, "checkpoint": False,
                 "records": str(tmp_path / "runs" / method)}
    try:
        trainer = make_trainer(method, dataset, overrides)
        trainer.setup()
    except MMBalanceError as exc:
        pytest.skip(f"{dataset}: {exc}")
    trainer.method.on_cell_start()  # one-time work (offline G-Blend) is not an epoch's cost
    trainer.method.on_fit_start()
    return trainer


def _epoch(trainer: Any, epoch: int) -> tuple[float, float, float]:
    """(training seconds without the method's estimation cost, estimation seconds, passes over
    the training data: above 1 for a method that trains on a resampled, longer epoch)."""
    est0 = trainer.estimation_cost.time_s
    t0 = time.perf_counter()
    out = trainer.train_epoch(epoch)  # ends in .item(): the device is synchronised
    est = trainer.estimation_cost.time_s - est0
    return time.perf_counter() - t0 - est, est, out["data_passes"]


@pytest.mark.parametrize("dataset", ["synthetic", "avdigits"])
@pytest.mark.parametrize(("method", "options"), METHODS[1:],
                         ids=[m + ("-" + "-".join(f"{v}" for v in o.values()) if o else "") for m, o in METHODS[1:]])
def test_epoch_time(benchmark, tmp_path, dataset: str, method: str, options: dict[str, Any]) -> None:
    """Epochs of the method and of the baseline alternate (baseline, method, baseline, ...), so a
    change of machine load during the run affects both sides of the ratio alike."""
    if method not in REGISTERED:
        pytest.skip(f"method {method} is not registered")
    base = _trainer(BASELINE[0], dataset, BASELINE[1], tmp_path)
    trainer = _trainer(method, dataset, options, tmp_path)
    _epoch(base, 0)  # warm-up of both: allocator, kernels, first-batch costs
    _epoch(trainer, 0)
    durations: list[float] = []
    base_durations: list[float] = []
    estimation: list[float] = []
    passes: list[float] = []

    def one_epoch() -> None:
        base_durations.append(_epoch(base, len(base_durations) + 1)[0])
        t, est, p = _epoch(trainer, len(durations) + 1)
        durations.append(t)
        estimation.append(est)
        passes.append(p)

    benchmark.pedantic(one_epoch, rounds=ROUNDS, iterations=1)
    ratio = statistics.median(durations) / statistics.median(base_durations)
    ratio_min = min(durations) / min(base_durations)
    info = benchmark.extra_info
    info.update(dataset=dataset, method=trainer.method.label(), device=str(trainer.device),
                batches=len(trainer.loader(trainer.splits.train, train=True)),
                median_epoch_s=statistics.median(durations), min_epoch_s=min(durations),
                baseline_median_epoch_s=statistics.median(base_durations), estimation_s=sum(estimation),
                ratio_to_joint=ratio, ratio_to_joint_min=ratio_min, data_passes=statistics.median(passes))
    print(f"\n[bench_methods] {dataset} on {trainer.device}: {trainer.method.label()} epoch median "
          f"{statistics.median(durations):.3f}s vs concat+uni CE {statistics.median(base_durations):.3f}s: "
          f"ratio {ratio:.3f} (ratio of minima {ratio_min:.3f})"
          + (f"; estimation {sum(estimation):.3f}s apart" if sum(estimation) else "")
          + (f"; {statistics.median(passes):.2f} data passes per epoch" if statistics.median(passes) != 1 else ""))
