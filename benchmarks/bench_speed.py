"""What the benchmark grid's speed work buys (issue 10), each as a ratio measured in one run.

1. ``test_cell_setup``: setting a cell up in a grid worker that already built the same data
   (``mmbalance.memo``: splits and file hashes reused) against a cold one; numbers unchanged.
2. ``test_metrics``: one evaluation's metrics (accuracy, MAP, macro-F1) with the ports of
   scikit-learn's average precision and macro-F1 against calling scikit-learn; equal to the bit.
   ``test_probe_blas_threads``: the linear probe on its pinned BLAS thread against the default.
3. ``test_numerics``: an AV-digits training epoch with ``amp=bf16, memory_format=channels_last``
   (the benchmark grid's CPU numerics; numbers differ, so both are options, recorded) against
   the default fp32, contiguous; epochs alternate, so load drift cancels in the ratio.
4. ``test_pool_before_relu``: the CNN's pool-before-ReLU order against ReLU-then-pool, an
   AV-digits epoch in the grid's numerics, epochs alternating; equal numbers (tested).
5. ``test_huge_pages``: two AV-digits cells run at once as a grid's two workers do, one with
   ``THP_MEM_ALLOC_ENABLE=1`` (mmbalance's default) and one with 0, roles swapped each round;
   the ratio of their training seconds per epoch. Equal numbers (tested).
6. ``test_retained_heap``: the same pairing, one cell with freed memory kept in the process
   (``mmbalance/engine/heap.py``, the default) and one with ``MMBALANCE_HEAP=default``, in the
   grid's fp32 channels-last, natively and capped to AVX2. Equal numbers (tested).
7. ``test_feature_cell_settings``: a whole feature-set cell (IPRM, the dataset's recipe, the
   grid's numerics) with the benchmark grid's speed settings (each split evaluated in one batch,
   ``eval_batch_size=4096``; checkpoint and record lines every 30 s) against the defaults
   (twice the training batch; both every epoch), cells alternating in one process. Equal
   numbers (tested).

Each test's ``extra_info`` holds ``ratio`` (optimised time / reference time; < 1 is faster)
and prints it. Run::

    pytest benchmarks/bench_speed.py --benchmark-json=bench_speed.json -s
"""

from __future__ import annotations

import os
import statistics
import time
import unittest.mock
from pathlib import Path

import numpy as np
import pytest
import torch
from bench_methods import dataset_overrides
from sklearn.metrics import accuracy_score, average_precision_score, f1_score

from mmbalance import diagnostics, memo
from mmbalance.metrics import classification_metrics
from mmbalance.runner import make_trainer, run

ROUNDS = int(os.environ.get("MMBALANCE_BENCH_ROUNDS", "3"))


def _report(benchmark, name: str, fast: list[float], slow: list[float]) -> float:
    ratio = statistics.median(fast) / statistics.median(slow)
    benchmark.extra_info.update({"ratio": round(ratio, 3), "fast_s": statistics.median(fast),
                                 "reference_s": statistics.median(slow)})
    print(f"\n{name}: {statistics.median(fast):.4f} s vs {statistics.median(slow):.4f} s, ratio {ratio:.3f}")
    return ratio


def _alternate(benchmark, steps: dict) -> dict[str, list[float]]:
    """Each round runs every step once in turn (given the round's index), so load drift cancels
    in a ratio; one warm-up round first."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    rounds = iter(range(1000))

    def pair() -> None:
        i = next(rounds)
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(i)
            times[name].append(time.perf_counter() - t0)

    benchmark.pedantic(pair, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    return times


def _alternate_epochs(benchmark, trainers: dict) -> dict[str, list[float]]:
    """Each round trains one epoch of every trainer in turn."""
    return _alternate(benchmark, {name: t.train_epoch for name, t in trainers.items()})


@pytest.mark.parametrize("dataset", ["avdigits", "mfeat"])
def test_cell_setup(benchmark, dataset, tmp_path):
    overrides = {**dataset_overrides("avdigits" if dataset == "avdigits" else "synthetic"),
                 "records": str(tmp_path), "progress": "off", "device": "cpu"}
    if dataset == "mfeat":
        overrides["modalities"] = ["zer", "mor"]
    warm, cold = [], []

    def setup() -> float:
        t0 = time.perf_counter()
        make_trainer("concat", dataset, overrides).setup()
        return time.perf_counter() - t0

    def pair() -> None:
        memo.clear()
        cold.append(setup())
        warm.append(setup())

    benchmark.pedantic(pair, rounds=ROUNDS, iterations=1)
    _report(benchmark, f"cell set-up on {dataset}, warm worker / cold", warm, cold)


def _sklearn_metrics(logits: torch.Tensor, labels: torch.Tensor, k: int) -> dict[str, float]:
    """The metrics as scikit-learn computes them, one call per class and metric."""
    scores = torch.softmax(logits.float(), dim=1).numpy()
    y = labels.numpy()
    pred = scores.argmax(1)
    onehot = np.eye(k, dtype=np.int64)[y]
    present = [c for c in range(k) if (y == c).any()]
    return {
        "acc": 100.0 * float(accuracy_score(y, pred)),
        "map": 100.0 * float(np.mean([average_precision_score(onehot[:, c], scores[:, c]) for c in present])),
        "f1": 100.0 * float(f1_score(y, pred, labels=present, average="macro", zero_division=0)),
    }


def test_metrics(benchmark):
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(300, 10)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 10, 300))
    assert classification_metrics(logits, labels, 10) == _sklearn_metrics(logits, labels, 10)
    fast, slow = [], []

    def pair() -> None:
        for out, fn in ((slow, lambda: _sklearn_metrics(logits, labels, 10)), (fast, lambda: classification_metrics(logits, labels, 10))):
            t0 = time.perf_counter()
            for _ in range(20):
                fn()
            out.append((time.perf_counter() - t0) / 20)

    benchmark.pedantic(pair, rounds=ROUNDS, iterations=1)
    _report(benchmark, "metrics of one evaluation, ports / scikit-learn", fast, slow)


def test_probe_blas_threads(benchmark):
    """AV-digits-sized probe (2430 x 128 features, 10 classes) on one BLAS thread against the
    machine's default (lbfgs may end a few float bits apart, so results are not compared)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 128))
    y_tr, y_te = rng.integers(0, 10, 2430), rng.integers(0, 10, 300)
    x_tr = np.maximum(centres[y_tr] + 3.0 * rng.normal(size=(2430, 128)), 0.0)
    x_te = np.maximum(centres[y_te] + 3.0 * rng.normal(size=(300, 128)), 0.0)
    fast, slow = [], []

    def unlimited() -> dict:
        with unittest.mock.patch.object(diagnostics, "PROBE_BLAS_THREADS", None):  # no limit
            return diagnostics.probe_accuracy(x_tr, y_tr, x_te, y_te)

    def pair() -> None:
        for out, fn in ((slow, unlimited), (fast, lambda: diagnostics.probe_accuracy(x_tr, y_tr, x_te, y_te))):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)

    benchmark.pedantic(pair, rounds=ROUNDS, iterations=1)
    _report(benchmark, "linear probe, one BLAS thread / default threads", fast, slow)


def test_numerics(benchmark, tmp_path: Path):
    base = {**dataset_overrides("avdigits"), "progress": "off", "device": "cpu", "log_epochs": False,
            "diagnostics": False, "checkpoint": False}
    trainers = {}
    for name, extra in (("default", {}), ("bf16_channels_last", {"amp": "bf16", "memory_format": "channels_last"})):
        t = make_trainer("concat", "avdigits", {**base, **extra, "records": str(tmp_path / name)})
        t.setup()
        trainers[name] = t
    times = _alternate_epochs(benchmark, trainers)
    _report(benchmark, "avdigits epoch, bf16 + channels_last / fp32 contiguous", times["bf16_channels_last"], times["default"])


def _relu_then_pool(trainer) -> None:
    from mmbalance.backbones.cnn import SmallCNN

    for net in (m for m in trainer.model.modules() if isinstance(m, SmallCNN)):
        mods = list(net.features)
        for i in range(0, len(mods), 4):
            mods[i + 2], mods[i + 3] = mods[i + 3], mods[i + 2]
        net.features = torch.nn.Sequential(*mods)


def test_pool_before_relu(benchmark, tmp_path: Path):
    base = {**dataset_overrides("avdigits"), "progress": "off", "device": "cpu", "log_epochs": False,
            "diagnostics": False, "checkpoint": False, "amp": "bf16", "memory_format": "channels_last"}
    trainers = {}
    for name in ("pool_relu", "relu_pool"):
        t = make_trainer("concat", "avdigits", {**base, "records": str(tmp_path / name)})
        t.setup()
        if name == "relu_pool":
            _relu_then_pool(t)
        trainers[name] = t
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a grid worker
    try:
        times = _alternate_epochs(benchmark, trainers)
    finally:
        torch.set_num_threads(threads)
    _report(benchmark, "avdigits epoch on one thread, pool-then-ReLU / ReLU-then-pool", times["pool_relu"], times["relu_pool"])


_CELL = """
import json, sys
from mmbalance.runner import run
ep = run("concat", "avdigits", json.loads(sys.argv[1])).record["epochs"][1:]
print(sum(e["train_time_s"] for e in ep) / len(ep))
"""


def _paired_cells(benchmark, tmp_path: Path, cfg: dict, envs: dict[str, dict[str, str]]) -> dict[str, list[float]]:
    """Two AV-digits cells at once, as a grid's two workers run them, one per environment in
    ``envs`` (two entries), roles swapped each round; each cell's training seconds per epoch
    (its first epoch left out)."""
    import json
    import subprocess
    import sys

    names = list(envs)
    times: dict[str, list[float]] = {name: [] for name in names}
    rounds = iter(range(1000))

    def pair() -> None:
        r = next(rounds)
        procs = {}
        for name in (names if r % 2 else names[::-1]):
            env = {**os.environ, "OMP_NUM_THREADS": "1", **envs[name]}
            run_cfg = {**cfg, "records": str(tmp_path / f"r{r}_{name}")}
            procs[name] = subprocess.Popen([sys.executable, "-c", _CELL, json.dumps(run_cfg)], env=env,
                                           stdout=subprocess.PIPE, text=True)
        for name, proc in procs.items():
            out, _ = proc.communicate()
            assert proc.returncode == 0
            times[name].append(float(out.strip().splitlines()[-1]))

    benchmark.pedantic(pair, rounds=ROUNDS + ROUNDS % 2, iterations=1, warmup_rounds=0)
    return times


def _cell_config(**numerics: str) -> dict:
    return {**dataset_overrides("avdigits"), "progress": "off", "device": "cpu", "log_epochs": False,
            "diagnostics": False, "checkpoint": False, "eval_batch_size": 64, **numerics,
            "epochs": int(os.environ.get("MMBALANCE_BENCH_EPOCHS", "4"))}


def test_huge_pages(benchmark, tmp_path: Path):
    cfg = _cell_config(amp="bf16", memory_format="channels_last")
    times = _paired_cells(benchmark, tmp_path, cfg, {"1": {"THP_MEM_ALLOC_ENABLE": "1"},
                                                     "0": {"THP_MEM_ALLOC_ENABLE": "0"}})
    _report(benchmark, "avdigits epoch beside a second cell, huge pages / 4 KiB pages", times["1"], times["0"])


_AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


@pytest.mark.parametrize("kernels", ["native", "avx2"])
def test_retained_heap(benchmark, tmp_path: Path, kernels: str):
    """The grid's numerics (fp32, channels-last), on this CPU and on it capped to AVX2 (what a
    CPU without AVX-512 runs)."""
    cfg = _cell_config(amp="none", memory_format="channels_last")
    cap = _AVX2 if kernels == "avx2" else {}
    times = _paired_cells(benchmark, tmp_path, cfg, {"retained": {**cap, "MMBALANCE_HEAP": "retained"},
                                                     "default": {**cap, "MMBALANCE_HEAP": "default"}})
    _report(benchmark, f"avdigits epoch beside a second cell ({kernels} kernels), heap retained / malloc's "
            f"default", times["retained"], times["default"])


@pytest.mark.parametrize("dataset", ["image-seg", "reuters"])
def test_feature_cell_settings(benchmark, tmp_path: Path, dataset: str):
    base = {"progress": "off", "log_epochs": False, "device": "cpu", "amp": "none",
            "memory_format": "channels_last"}
    settings = {"grid": {"eval_batch_size": 4096, "checkpoint_every_s": 30.0}, "default": {}}

    def cell(name: str):
        return lambda i: run("iprm", dataset, {**base, **settings[name], "records": str(tmp_path / f"{name}{i}")})

    times = _alternate(benchmark, {name: cell(name) for name in settings})
    _report(benchmark, f"{dataset} IPRM cell, the grid's speed settings / the defaults",
            times["grid"], times["default"])
