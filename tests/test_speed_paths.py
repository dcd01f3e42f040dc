"""The fast paths of a grid worker change no number: reused splits and file hashes, the metric
port, the per-epoch peak memory, the channels-last option (numbers differ, so it is named)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from mmbalance import memo, memory
from mmbalance.data import DictDataset, Splits, hash_files
from mmbalance.metrics import average_precision
from mmbalance.runner import make_trainer, run

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# ---- metrics --------------------------------------------------------------------------------
def test_average_precision_equals_scikit_learn_to_the_bit():
    rng = np.random.default_rng(0)
    for i in range(400):
        n = int(rng.integers(2, 300))
        s = rng.random(n).astype(np.float32)
        if i % 3 == 0:
            s = np.round(s, 1).astype(np.float32)  # many ties
        y = rng.random(n) < rng.random()
        y[0] = True
        assert average_precision(y, s) == average_precision_score(y.astype(int), s)


def test_average_precision_hand_case():
    # scores 0.9 (pos), 0.8 (neg), 0.7 (pos): precision at the positives 1 and 2/3 -> AP = 5/6
    assert average_precision(np.array([True, False, True]), np.array([0.9, 0.8, 0.7], np.float32)) == pytest.approx(5 / 6)


# ---- reused splits ----------------------------------------------------------------------------
def _toy_build(calls: list):
    def build(cfg, modalities):
        calls.append(cfg["scale"])
        x = torch.full((4, 2), float(cfg["scale"]))
        ds = DictDataset({"a": x}, torch.arange(4) % 2)
        return Splits(ds, ds, ds, {}, 2, ["0", "1"], {"note": "built"})
    return build


def test_reuse_splits_keys_on_the_values_read_and_copies_info():
    memo.clear()
    calls: list = []
    build = _toy_build(calls)
    a = memo.reuse_splits(build, "toy", {"scale": 1, "seed": 0}, ["a"], {})
    b = memo.reuse_splits(build, "toy", {"scale": 1, "seed": 7}, ["a"], {})  # seed was never read
    assert calls == [1] and b.train is a.train
    b.info["heldout_rule"] = "x"
    b.train = None  # a cell re-carving train must not touch the kept build
    c = memo.reuse_splits(build, "toy", {"scale": 1, "seed": 3}, ["a"], {})
    assert "heldout_rule" not in c.info and c.train is a.train
    memo.reuse_splits(build, "toy", {"scale": 2, "seed": 0}, ["a"], {})  # a read key changed
    memo.reuse_splits(build, "toy", {"scale": 1, "seed": 0}, ["a", "b"], {})  # other modalities
    memo.reuse_splits(build, "toy", {"scale": 1, "seed": 0}, ["a"], {"files": "other"})  # other data
    assert calls == [1, 2, 1, 1]
    memo.clear()


def test_a_warm_worker_trains_the_same_numbers_as_a_cold_one(tmp_path):
    base = {"records": str(tmp_path / "r"), "progress": "off", "epochs": 2, "n_train": 300, "n_test": 120,
            "log_epochs": False, "diagnostics": False, "checkpoint": False}
    memo.clear()
    run("concat", "synthetic", {**base, "seed": 0})
    warm = run("concat", "synthetic", {**base, "seed": 1}, fresh=True).record
    memo.clear()
    cold = run("concat", "synthetic", {**base, "seed": 1}, fresh=True).record
    strip = lambda rec: [{k: e[k] for k in ("train_loss", "val", "test")} for e in rec["epochs"]]  # noqa: E731
    assert strip(warm) == strip(cold)


def test_impure_plugins_always_build(tmp_path, monkeypatch):
    trainer = make_trainer("concat", "synthetic", {"records": str(tmp_path), "progress": "off"})
    monkeypatch.setattr(type(trainer.dataset), "pure_build", False)
    calls = []
    original = type(trainer.dataset).build

    def counting(self, cfg, modalities):
        calls.append(1)
        return original(self, cfg, modalities)

    monkeypatch.setattr(type(trainer.dataset), "build", counting)
    trainer.setup()
    trainer.setup()
    assert len(calls) == 2


# ---- reused file hashes -----------------------------------------------------------------------
def test_file_hash_follows_a_changed_byte_even_within_the_clock_granularity(tmp_path):
    memo.clear()
    f = tmp_path / "a.bin"
    f.write_bytes(b"abcd")
    first = hash_files([f], tmp_path)
    f.write_bytes(b"abce")  # same size, written immediately: a racy file is never remembered
    assert hash_files([f], tmp_path) != first
    old = time.time() - 60
    os.utime(f, (old, old))
    settled = hash_files([f], tmp_path)
    assert hash_files([f], tmp_path) == settled  # now remembered
    f.write_bytes(b"abcf")
    assert hash_files([f], tmp_path) != settled  # a later write changes mtime: recomputed
    memo.clear()


# ---- peak memory ------------------------------------------------------------------------------
def _give_back_freed_memory() -> None:
    """An earlier run in this process keeps its freed memory (engine/heap.py): resident pages a
    new tensor reuses without raising the peak, and that a freed one leaves resident. malloc_trim
    returns them to the kernel (glibc; elsewhere nothing is kept)."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def test_peak_rss_is_per_window():
    _give_back_freed_memory()
    cpu = torch.device("cpu")
    kind = memory.reset_peak(cpu)
    base = memory.peak_mb(cpu, kind)
    x = torch.ones(40_000_000)  # 160 MB touched
    x += 1
    high = memory.peak_mb(cpu, kind)
    del x
    assert high - base > 100
    if kind == "rss_peak_epoch":
        _give_back_freed_memory()
        kind = memory.reset_peak(cpu)
        assert memory.peak_mb(cpu, kind) < high - 100


def test_every_epoch_records_its_peak_memory(tmp_path):
    rec = run("concat", "synthetic", {"records": str(tmp_path), "progress": "off", "epochs": 2, "n_train": 200,
                                      "n_test": 100, "log_epochs": False, "diagnostics": False}).record
    for e in rec["epochs"]:
        assert e["peak_mem_mb"] > 50 and e["peak_mem_kind"] in ("rss_peak_epoch", "rss_peak_process")


# ---- channels-last ------------------------------------------------------------------------------
def test_channels_last_is_named_in_the_identity_and_trains_close_to_the_default(tmp_path, shared_data):
    base = {"records": str(tmp_path), "progress": "off", "epochs": 1, "limit_train_batches": 3,
            "limit_eval_batches": 1, "log_epochs": False, "diagnostics": False}
    plain = make_trainer("concat", "avdigits", base)
    fast = make_trainer("concat", "avdigits", {**base, "memory_format": "channels_last"})
    assert plain.hash != fast.hash
    fast.setup()
    conv = next(m for m in fast.model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    a = run("concat", "avdigits", base).record["epochs"][0]["train_loss"]
    b = run("concat", "avdigits", {**base, "memory_format": "channels_last"}).record["epochs"][0]["train_loss"]
    assert a == pytest.approx(b, rel=1e-3)


def test_a_failed_diagnostic_leaves_a_finished_run(tmp_path, monkeypatch):
    from mmbalance import diagnostics

    def broken(trainer):
        raise diagnostics.DiagnosticsError("probe: the train split holds a single class")

    monkeypatch.setattr(diagnostics, "compute_diagnostics", broken)
    with pytest.warns(UserWarning, match="no imbalance diagnostics"):
        res = run("concat", "synthetic", {"records": str(tmp_path), "progress": "off", "epochs": 1,
                                          "n_train": 100, "n_test": 50, "log_epochs": False})
    assert (res.run_dir / "DONE").exists()
    assert "single class" in res.record["final"]["diagnostics_error"]


# ---- the probe's pinned BLAS thread ---------------------------------------------------------------
def test_the_probe_fits_on_one_blas_thread_whatever_the_machine_allows(monkeypatch):
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_info, threadpool_limits

    from mmbalance import diagnostics

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 64))
    y_tr, y_te = rng.integers(0, 10, 1500), rng.integers(0, 10, 300)
    x_tr = centres[y_tr] + 2.0 * rng.normal(size=(1500, 64))
    x_te = centres[y_te] + 2.0 * rng.normal(size=(300, 64))
    threads_seen: list[int] = []
    fit = LogisticRegression.fit

    def spy(self, *args, **kwargs):
        threads_seen.extend(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(LogisticRegression, "fit", spy)
    results = []
    for ambient in (1, 2, None):  # what the machine (or a caller) allows
        with threadpool_limits(limits=ambient):
            results.append(diagnostics.probe_accuracy(x_tr, y_tr, x_te, y_te))
    assert threads_seen and set(threads_seen) == {diagnostics.PROBE_BLAS_THREADS}
    assert results[0] == results[1] == results[2]
    assert results[0]["probe_acc"] > 50.0  # the features carry the class: far above the 10 % chance


def test_metrics_equal_scikit_learn_to_the_bit():
    from sklearn.metrics import accuracy_score, f1_score

    from mmbalance.metrics import classification_metrics, macro_f1

    rng = np.random.default_rng(1)
    for i in range(300):
        k = int(rng.integers(2, 12))
        n = int(rng.integers(1, 200))
        y = rng.integers(0, k if i % 4 else max(2, k // 2), n)  # some classes absent from y
        pred = rng.integers(0, k if i % 5 else 1, n)  # some runs predict a single class
        present = [c for c in range(k) if (y == c).any()]
        assert macro_f1(y, pred, present, k) == f1_score(y, pred, labels=present, average="macro", zero_division=0)
        logits = torch.from_numpy(rng.normal(size=(n, k)).astype(np.float32))
        got = classification_metrics(logits, torch.from_numpy(y), k)
        p = logits.argmax(1).numpy()
        assert got["acc"] == 100.0 * float(accuracy_score(y, p))
        assert got["f1"] == 100.0 * float(f1_score(y, p, labels=present, average="macro", zero_division=0))


def test_macro_f1_hand_case():
    # class 0: tp 1, true 2, predicted 1 -> 2/3; class 1: tp 1, true 1, predicted 2 -> 2/3; class 2
    # is absent from the labels and not asked for.
    from mmbalance.metrics import macro_f1

    assert macro_f1(np.array([0, 0, 1]), np.array([0, 1, 1]), [0, 1], 3) == pytest.approx(2 / 3)


_CELL = """
import json, sys
from mmbalance.runner import run
rec = run("concat", "avdigits", json.loads(sys.argv[1])).record
print(json.dumps({"thp_alloc": rec["header"]["thp_alloc"], "heap": rec["header"]["heap"]["heap"],
                  "epochs": [{k: e[k] for k in ("train_loss", "val", "test")} for e in rec["epochs"]]}))
"""


def cell_in_subprocess(cfg: dict, env_set: dict[str, str | None]) -> dict:
    """One AV-digits Concat cell in a fresh process (the allocator settings are read at import
    and set once per process) with ``env_set`` applied to this environment (None unsets): what
    its header says it ran with, and its epochs' numbers."""
    import json
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in env_set}
    env.update({k: v for k, v in env_set.items() if v is not None})
    out = subprocess.run([sys.executable, "-c", _CELL, json.dumps(cfg)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_huge_pages_are_on_by_default_and_change_no_number(tmp_path, shared_data):
    """The allocator hint is a speed setting only: the AV-digits CNN's activations (the ~8 MB
    tensors it is for) train to the same bits with it and without it; an explicit 0 wins."""
    cfg = {"records": str(tmp_path), "progress": "off", "epochs": 1, "limit_train_batches": 3,
           "limit_eval_batches": 2, "log_epochs": False, "diagnostics": False, "checkpoint": False,
           "amp": "bf16", "memory_format": "channels_last", "data_root": str(shared_data)}
    on = cell_in_subprocess(cfg, {"THP_MEM_ALLOC_ENABLE": None})
    off = cell_in_subprocess({**cfg, "records": str(tmp_path / "off")}, {"THP_MEM_ALLOC_ENABLE": "0"})
    assert (on["thp_alloc"], off["thp_alloc"]) == ("1", "0")
    assert on["epochs"] == off["epochs"]


_HEAP_FAULTS = """
import resource, sys
import torch
from mmbalance.engine.heap import retain_freed_memory
state = retain_freed_memory()
def step():  # a training step's shape: 16 MB activations made and freed
    for _ in range(4):
        a = torch.empty(64, 16, 64, 64); a.fill_(1.0); del a
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(state["heap"], (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc's thresholds")
def test_retained_heap_stops_each_step_faulting_its_memory_in():
    """Freed 16 MB activations go back to the kernel by default and come back as zero-filled
    pages every step; with the heap retained a step reuses them. The opt-out restores malloc."""
    import subprocess

    def faults(heap: str | None) -> tuple[str, float]:
        env = {k: v for k, v in os.environ.items() if k != "MMBALANCE_HEAP"}
        env["THP_MEM_ALLOC_ENABLE"] = "1"  # mmbalance's default (mmbalance/__init__.py)
        if heap is not None:
            env["MMBALANCE_HEAP"] = heap
        out = subprocess.run([sys.executable, "-c", _HEAP_FAULTS], env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        return out[-2], float(out[-1])

    kept, kept_faults = faults(None)
    plain, plain_faults = faults("default")
    assert (kept, plain) == ("retained", "default")
    # 4 x 16 MB per step is 16,384 4-KiB pages; huge pages (the THP default) make it fewer faults
    assert plain_faults >= 8 and kept_faults <= plain_faults / 8, (kept_faults, plain_faults)


def test_retained_heap_changes_no_number(tmp_path, shared_data):
    """Where freed memory goes is a speed setting only: the same cell trains to the same bits
    with the heap retained (the default) and with malloc's own thresholds, and the header says
    which it ran with."""
    cfg = {"records": str(tmp_path), "progress": "off", "epochs": 2, "limit_train_batches": 4,
           "limit_eval_batches": 2, "log_epochs": False, "diagnostics": False, "checkpoint": False,
           "amp": "none", "memory_format": "channels_last", "data_root": str(shared_data)}
    runs = {heap: cell_in_subprocess({**cfg, "records": str(tmp_path / heap)},
                                     {"MMBALANCE_HEAP": None if heap == "retained" else heap})
            for heap in ("retained", "default")}
    assert runs["retained"]["heap"] == "retained" and runs["default"]["heap"] == "default"
    assert runs["retained"]["epochs"] == runs["default"]["epochs"]


def test_one_batch_evaluation_changes_no_number(tmp_path, shared_data):
    """The evaluation batch is outside a run's identity: a feature-set cell evaluated at the
    default batch (twice the training one: 66 batches of the test split) and in one batch of
    4096 records the same numbers, per-modality metrics and diagnostics included. The benchmark
    grid evaluates the feature sets in one batch; a loss averaged over batches, or the setting
    in the identity, fails here."""
    cfg = {"progress": "off", "epochs": 3, "log_epochs": False, "data_root": str(shared_data)}
    a, b = (run("iprm", "image-seg", {**cfg, **extra, "records": str(tmp_path / name)}).record
            for name, extra in (("default", {}), ("one", {"eval_batch_size": 4096})))
    assert Path(a["run_dir"]).name == Path(b["run_dir"]).name
    keep = ("train_loss", "val", "test", "diagnostics")
    assert [{k: e[k] for k in keep} for e in a["epochs"]] == [{k: e[k] for k in keep} for e in b["epochs"]]
    assert a["final"]["selection"] == b["final"]["selection"]
    assert a["final"]["diagnostics"] == b["final"]["diagnostics"]
