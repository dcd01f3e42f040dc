"""Batches per second of the CREMA-D input path: from the input cache against from the files.

About 200 clips are generated at CREMA-D's real sizes (16 kHz WAVs of 1.5-3.5 s, 480 x 360
JPEG frames at 1 fps; the ``cremad`` recipe reads them as (1, 257, 1250) log spectrograms and
two 224 x 224 frames) and read once, batch 64, through the trainer's own loader (its worker
count and pinning) and onto the benchmark device, with the train-time crops:

* ``files``: the uncached path (soxr resampling, STFT and JPEG decoding in the workers);
* ``cache``: ``--set cache=DIR`` (built once before timing; its build time is in
  ``extra_info``), batches through :func:`mmbalance.cache.wrap_loader` (on CUDA the crops run
  on the device; on CPU in the workers).

One round each; the cache's ``extra_info`` holds ``ratio_to_files`` (its batches/s over the
files'). Run::

    pytest benchmarks/bench_input.py -s                       # CPU, or the GPU if there is one
    MMBALANCE_BENCH_DEVICE=cuda pytest benchmarks/bench_input.py --benchmark-json=input.json
    MMBALANCE_BENCH_CLIPS=640 pytest benchmarks/bench_input.py   # more clips
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from gpu_epoch import overrides, write_cremad_clips

from mmbalance.cache import to_device, wrap_loader
from mmbalance.prepare import prepare_cache
from mmbalance.runner import make_trainer

DEVICE = os.environ.get("MMBALANCE_BENCH_DEVICE", "auto")
CLIPS = int(os.environ.get("MMBALANCE_BENCH_CLIPS", "200"))
_RATES: dict[str, float] = {}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Any]:
    """The generated clips and their cache (built once, outside the timings)."""
    work = tmp_path_factory.mktemp("bench_input")
    t0 = time.perf_counter()
    data = write_cremad_clips(work / "CREMA-D", CLIPS, 6, "real")
    generated = time.perf_counter() - t0
    t0 = time.perf_counter()
    prepare_cache("cremad", data, work / "cache", check_manifest=False)
    built = time.perf_counter() - t0
    return {"work": work, "data": data, "generate_s": generated, "cache_build_s": built}


def _trainer(clips: dict[str, Any], path: str) -> Any:
    over = overrides(clips["data"], clips["work"] / "runs", DEVICE, "real",
                     cache=clips["work"] / "cache" if path == "cache" else None)
    trainer = make_trainer("concat", "cremad", over)
    trainer.setup()
    return trainer


@pytest.mark.parametrize("path", ["files", "cache"])
def test_input_batches_per_second(benchmark, clips, path):
    trainer = _trainer(clips, path)
    device = trainer.device
    counts: dict[str, int] = {}

    def one_pass() -> None:
        loader = wrap_loader(trainer.loader(trainer.splits.train, train=True, epoch=0), trainer.splits, device)
        batches = samples = 0
        for batch in loader:
            batch = to_device(batch, device)
            assert batch["visual"].dtype == torch.float32 and batch["visual"].shape[1:] == (3, 2, 224, 224)
            assert batch["audio"].shape[1:] == (1, 257, 1250)
            batches += 1
            samples += int(batch["label"].shape[0])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        counts.update(batches=batches, samples=samples)

    benchmark.pedantic(one_pass, rounds=1, iterations=1, warmup_rounds=0)
    secs = benchmark.stats.stats.mean
    rate = counts["batches"] / secs
    _RATES[path] = rate
    info = benchmark.extra_info
    info.update(path=path, device=str(device), clips=len(trainer.splits.train), batches=counts["batches"],
                batch_size=trainer.cfg["batch_size"], batches_per_s=round(rate, 3),
                samples_per_s=round(counts["samples"] / secs, 1),
                workers=trainer.loader(trainer.splits.train, train=True).num_workers,
                generate_s=round(clips["generate_s"], 2))
    if path == "cache":
        info["cache_build_s"] = round(clips["cache_build_s"], 2)
        if "files" in _RATES:
            info["ratio_to_files"] = round(rate / _RATES["files"], 2)
    print(f"\n[bench_input] {path} on {device}: {rate:.2f} batches/s ({counts['samples'] / secs:.0f} clips/s)"
          + (f", {info['ratio_to_files']:.2f}x the files" if "ratio_to_files" in info else ""))
    assert Path(clips["data"]).is_dir()
