"""Training-epoch time of joint training and IPRM at the CREMA-D shapes, three input paths.

The device check of issue 12 (run by ``benchmarks/gpu_check.sh``): two ResNet-18 encoders
(the ``cremad`` recipe: audio (1, 257, 1250) log spectrograms, two 224 x 224 frames), batch
64, bf16 autocast on CUDA, built through mmbalance's own assembly (``make_trainer`` +
``Trainer.setup``: the dataset plugin, the backbone registry, the method plugin) and timed
through ``Trainer.train_epoch`` (the real loop: the method's step, autocast, optimizer),
fed three ways:

* ``random``: random tensors already on the device (the compute alone);
* ``cache``: clips generated at CREMA-D's real sizes (16 kHz WAVs of 1.5-3.5 s, 480 x 360
  JPEG frames at 1 fps) read through the input cache (``--set cache=DIR``), batches moved and
  cropped on the device by :func:`mmbalance.cache.wrap_loader`;
* ``files``: the same clips read from the files (soxr resampling, STFT, JPEG decoding in the
  loader workers), the reference path.

Methods: ``joint`` = ``concat`` with ``unimodal_loss=true`` (fused + unimodal CEs) and
``iprm``. An epoch of the paper's CREMA-D split (6698 training clips, 105 batches) is
extrapolated from ``--steps`` timed batches (one epoch over ``steps`` x batch generated
clips, the loader's start-up included once, so the figure errs high). The input path alone
is timed too (samples/s: loader, transfer and device crops, no model). One JSON of figures
is written (``--out``). Usage::

    python benchmarks/gpu_epoch.py --out gpu_epoch.json             # CUDA, real shapes
    python benchmarks/gpu_epoch.py --device cpu --steps 2           # a tiny smoke run on CPU

On CPU the shapes are tiny unless ``--shapes real`` is given (ResNet-18 at the real shapes
takes minutes per step on a few cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
SENTENCES = ("DFA", "IEO", "TIE", "IOM", "IWW", "TAI", "TSI", "WSI", "ITS", "ITH", "MTI", "IEO")
PAPER_TRAIN_CLIPS = 6698  # the OGM-GE CREMA-D train split the IPRM paper trains on
GOAL_S = 5.0  # issue 12: a CREMA-D IPRM epoch in at most 5 s on one H100-class GPU

# Shapes: real = CREMA-D as shipped and as the IPRM recipe reads it; tiny = a CPU smoke run.
SHAPES: dict[str, dict[str, Any]] = {
    "real": {"frame_wh": (480, 360), "wav_rate": 16000, "wav_seconds": (1.5, 3.5), "image_size": 224,
             "audio_seconds": 20.0, "batch_size": 64},
    "tiny": {"frame_wh": (40, 30), "wav_rate": 16000, "wav_seconds": (0.4, 0.9), "image_size": 32,
             "audio_seconds": 0.5, "batch_size": 2},
}


# ----------------------------------------------------------------------------- the clips


def clip_id(i: int) -> tuple[str, str]:
    """A CREMA-D style clip id (<actor>_<sentence>_<EMO>_<level>) and its emotion."""
    emo = EMOTIONS[i % len(EMOTIONS)]
    return f"{1001 + i // 72:04d}_{SENTENCES[(i // 6) % len(SENTENCES)]}_{emo}_X{i:05d}", emo


def _write_clip(args: tuple[str, int, str, tuple[int, int], int, float]) -> None:
    """One clip of Layout B: a 16-bit WAV and its 1-fps JPEG frames (smooth pictures with
    noise, so the JPEGs have realistic sizes and decoding costs)."""
    import soundfile as sf
    from PIL import Image

    base, i, cid, (w, h), rate, seconds = args
    base_p = Path(base)
    rng = np.random.default_rng(i)
    n = int(rate * seconds)
    t = np.arange(n) / rate
    sig = 0.3 * np.sin(2 * np.pi * (150 + 10 * (i % 30)) * t) + 0.05 * rng.standard_normal(n)
    sf.write(str(base_p / "AudioWAV" / f"{cid}.wav"), (np.clip(sig, -1, 1) * 32767).astype(np.int16), rate,
             subtype="PCM_16")
    folder = base_p / "Image-01-FPS" / cid
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for k in range(max(2, math.ceil(seconds))):
        phase = 0.3 * k + 0.1 * i
        img = np.stack([128 + 90 * np.sin(xx / (17 + c * 5) + phase) * np.cos(yy / 23 - c) for c in range(3)], -1)
        img += rng.normal(0, 6, img.shape).astype(np.float32)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{30 * k:05d}.jpg", quality=95)


def write_cremad_clips(root: Path, n_train: int, n_test: int, shapes: str = "real", workers: int | None = None) -> Path:
    """CREMA-D Layout B under ``root`` (annotations/{train,test}.csv, AudioWAV/, Image-01-FPS/)
    with ``n_train`` + ``n_test`` generated clips at the ``shapes`` sizes; returns ``root``."""
    spec = SHAPES[shapes]
    root = Path(root)
    (root / "AudioWAV").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ids = [clip_id(i) for i in range(n_train + n_test)]
    rng = np.random.default_rng(0)
    lo, hi = spec["wav_seconds"]
    jobs = [(str(root), i, cid, spec["frame_wh"], spec["wav_rate"], float(rng.uniform(lo, hi)))
            for i, (cid, _) in enumerate(ids)]
    workers = workers or min(16, os.cpu_count() or 1)
    if workers > 1 and len(jobs) > 16:
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            list(pool.map(_write_clip, jobs, chunksize=8))
    else:
        for job in jobs:
            _write_clip(job)
    for name, rows in (("train", ids[:n_train]), ("test", ids[n_train:])):
        (root / "annotations" / f"{name}.csv").write_text("".join(f"{c},{e}\n" for c, e in rows))
    return root


# --------------------------------------------------------------------------- measurements


def overrides(data_root: Path, records: Path, device: str, shapes: str, cache: Path | None = None) -> dict[str, Any]:
    """Run settings: the cremad recipe at ``shapes``, every generated train clip trained on."""
    spec = SHAPES[shapes]
    over: dict[str, Any] = {
        "data_root": str(data_root), "records": str(records), "device": device, "progress": "off",
        "check_manifest": False, "val_fraction": 0.0, "checkpoint": False, "diagnostics": False,
        "batch_size": spec["batch_size"], "image_size": spec["image_size"],
        "audio_seconds": spec["audio_seconds"], "log_epochs": False,
    }
    if shapes == "tiny":
        over["embed_dim"] = 64
    if cache is not None:
        over["cache"] = str(cache)
    return over


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def random_batches(trainer: Any, n: int) -> list[dict[str, Any]]:
    """``n`` batches of random tensors at the splits' shapes, already on the device."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    bs = trainer.cfg["batch_size"]
    out = []
    for _ in range(n):
        batch: dict[str, Any] = {m: torch.randn((bs, *spec.shape), generator=g).to(trainer.device)
                                 for m, spec in trainer.splits.modalities.items()}
        batch["label"] = torch.randint(0, trainer.splits.num_classes, (bs,), generator=g).to(trainer.device)
        batch["index"] = torch.arange(bs).to(trainer.device)
        out.append(batch)
    return out


class Cycle:
    """``n`` batches drawn in turn from a few (a loader's length and iteration, without
    holding ``n`` batches in device memory, which would inflate the peak)."""

    def __init__(self, batches: list[dict[str, Any]], n: int) -> None:
        self.batches, self.n = batches, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        return (self.batches[i % len(self.batches)] for i in range(self.n))


def timed_epoch(trainer: Any, epoch: int) -> tuple[float, int, float | None]:
    """(seconds, batches, peak MiB) of one ``Trainer.train_epoch``."""
    _sync(trainer.device)
    _peak_reset(trainer.device)
    t0 = time.perf_counter()
    out = trainer.train_epoch(epoch)  # ends in .item(): the device is synchronised
    _sync(trainer.device)
    return time.perf_counter() - t0, int(out["train_batches"]), _peak_mb(trainer.device)


def epoch_figures(seconds: float, batches: int, batch_size: int, peak: float | None, epoch_batches: int) -> dict[str, Any]:
    return {"measured_s": round(seconds, 4), "batches": batches, "s_per_batch": round(seconds / batches, 5),
            "samples_per_s": round(batches * batch_size / seconds, 1),
            "s_per_epoch": round(seconds / batches * epoch_batches, 3),
            "peak_mem_mb": None if peak is None else round(peak, 1)}


def measure_method(method: str, options: dict[str, Any], over_files: dict[str, Any], over_cache: dict[str, Any],
                   steps: int, epoch_batches: int, paths: list[str]) -> dict[str, Any]:
    """Epoch figures of one method on each input path."""
    from mmbalance.cache import wrap_loader
    from mmbalance.runner import make_trainer

    res: dict[str, Any] = {}
    trainers = {}
    if "random" in paths or "files" in paths:
        trainers["files"] = make_trainer(method, "cremad", {**over_files, **options})
        trainers["files"].setup()
    if "cache" in paths:
        trainers["cache"] = make_trainer(method, "cremad", {**over_cache, **options})
        t0 = time.perf_counter()
        trainers["cache"].setup()
        res["cache_setup_s"] = round(time.perf_counter() - t0, 2)
    for tr in trainers.values():
        tr.method.trainer = tr
        tr.method.on_cell_start()
        tr.method.on_fit_start()
    epoch = 0
    for path in paths:
        tr = trainers["files" if path == "random" else path]
        original = type(tr).loader.__get__(tr)
        if path == "random":
            pool = random_batches(tr, 2)
            warm = Cycle(pool, 3 if tr.device.type == "cuda" else 1)
            timed = Cycle(pool, steps)
            feed: dict[str, Any] = {"batches": warm}

            def loader(ds: Any, train: bool, epoch: int = 0, seed: Any = None, batch_size: Any = None,
                       _feed: dict[str, Any] = feed, _orig: Any = original, _tr: Any = tr) -> Any:
                return _feed["batches"] if ds is _tr.splits.train and train else _orig(ds, train, epoch, seed, batch_size)

            tr.loader = loader
            tr.cfg["limit_train_batches"] = None
            timed_epoch(tr, epoch)  # warm-up: kernels, allocator, cudnn choices
            feed["batches"] = timed
            secs, n, peak = timed_epoch(tr, epoch + 1)
            del tr.loader
        else:
            if path == "cache":
                def loader(ds: Any, train: bool, epoch: int = 0, seed: Any = None, batch_size: Any = None,
                           _orig: Any = original, _tr: Any = tr) -> Any:
                    return wrap_loader(_orig(ds, train, epoch, seed, batch_size), _tr.splits, _tr.device)

                tr.loader = loader
            tr.cfg["limit_train_batches"] = 2 if tr.device.type == "cuda" else 1
            timed_epoch(tr, epoch)  # warm-up (page cache, kernels)
            tr.cfg["limit_train_batches"] = None
            secs, n, peak = timed_epoch(tr, epoch + 1)
            tr.__dict__.pop("loader", None)
        epoch += 2
        res[path] = epoch_figures(secs, n, tr.cfg["batch_size"], peak, epoch_batches)
        print(f"[gpu_epoch] {method} {path}: {res[path]['s_per_batch'] * 1000:.1f} ms/batch -> "
              f"{res[path]['s_per_epoch']:.2f} s per CREMA-D epoch", flush=True)
    res["device"] = str(next(iter(trainers.values())).device)
    res["label"] = next(iter(trainers.values())).method.label()
    return res


def measure_input(over_files: dict[str, Any], over_cache: dict[str, Any]) -> dict[str, Any]:
    """Samples/s of the input path alone (loader, transfer, device crops; no model)."""
    import torch

    from mmbalance.cache import to_device, wrap_loader
    from mmbalance.runner import make_trainer

    out: dict[str, Any] = {}
    for name, over in (("files", over_files), ("cache", over_cache)):
        tr = make_trainer("concat", "cremad", over)
        tr.setup()
        loader = tr.loader(tr.splits.train, train=True, epoch=0)
        if name == "cache":
            loader = wrap_loader(loader, tr.splits, tr.device)
        n = 0
        _sync(tr.device)
        t0 = time.perf_counter()
        first = None
        for batch in loader:
            batch = to_device(batch, tr.device)
            n += int(batch["label"].shape[0])
            if first is None:
                _sync(tr.device)
                first = time.perf_counter() - t0
        _sync(tr.device)
        secs = time.perf_counter() - t0
        visual = batch["visual"]
        assert visual.dtype == torch.float32 and visual.dim() == 5, "the input path must give finished frames"
        out[name] = {"samples": n, "seconds": round(secs, 3), "samples_per_s": round(n / secs, 1),
                     "first_batch_s": round(first or 0.0, 3), "workers": loader.num_workers}
    out["ratio_cache_to_files"] = round(out["cache"]["samples_per_s"] / out["files"]["samples_per_s"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    ap.add_argument("--steps", type=int, default=20, help="timed training batches per measurement")
    ap.add_argument("--shapes", choices=sorted(SHAPES), default=None,
                    help="real (CREMA-D) or tiny; default real on CUDA, tiny on CPU")
    ap.add_argument("--methods", default="joint,iprm", help="comma list of joint, iprm")
    ap.add_argument("--paths", default="random,cache,files", help="comma list of random, cache, files")
    ap.add_argument("--epoch-clips", type=int, default=PAPER_TRAIN_CLIPS, help="clips of the epoch extrapolated to")
    ap.add_argument("--workdir", default=None, help="where the clips and the cache go (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the generated clips and cache")
    ap.add_argument("--out", default=None, help="JSON of figures (default: $OUT/gpu_epoch.json or ./gpu_epoch.json)")
    args = ap.parse_args(argv)

    import torch

    from mmbalance.trainer import resolve_device

    device = resolve_device(args.device)
    shapes = args.shapes or ("real" if device.type == "cuda" else "tiny")
    spec = SHAPES[shapes]
    bs = spec["batch_size"]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    known = {"joint": ("concat", {"unimodal_loss": True}), "iprm": ("iprm", {})}
    bad = [m for m in methods if m not in known] + [p for p in paths if p not in ("random", "cache", "files")]
    if bad or args.steps < 1:
        ap.error(f"unknown methods/paths {bad} (or --steps < 1)")
    out_path = Path(args.out or Path(os.environ.get("OUT", ".")) / "gpu_epoch.json")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mmbalance-gpu-epoch-"))
    epoch_batches = math.ceil(args.epoch_clips / bs)
    t_start = time.perf_counter()
    try:
        t0 = time.perf_counter()
        data = write_cremad_clips(work / "CREMA-D", steps_clips := args.steps * bs, 12, shapes)
        gen_s = time.perf_counter() - t0
        print(f"[gpu_epoch] {steps_clips} + 12 clips at {shapes} sizes in {gen_s:.1f} s under {work}", flush=True)
        over_files = overrides(data, work / "runs", str(device), shapes)
        over_cache = overrides(data, work / "runs", str(device), shapes, cache=work / "cache")
        figures: dict[str, Any] = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "amp": "bf16" if device.type == "cuda" else "none (CPU)",
            "shapes": shapes, "batch_size": bs, "steps": args.steps,
            "input_shapes": {"audio": [1, 257, 1 + int(round(22050 * spec["audio_seconds"])) // 353],
                             "visual": [3, 2, spec["image_size"], spec["image_size"]]},
            "epoch": {"clips": args.epoch_clips, "batches": epoch_batches,
                      "rule": "s_per_epoch = measured s / timed batches x epoch batches (loader start-up included)"},
            "generate_s": round(gen_s, 2),
        }
        if "cache" in paths:
            from mmbalance.cache import MANIFEST
            from mmbalance.prepare import prepare_cache

            t0 = time.perf_counter()
            summary = prepare_cache("cremad", data, work / "cache", check_manifest=False,
                                    image_size=spec["image_size"], audio_seconds=spec["audio_seconds"])
            figures["cache_build"] = {"seconds": round(time.perf_counter() - t0, 2), "clips": summary["clips"],
                                      "stored_hw": summary["stored_hw"],
                                      "bytes": json.loads((work / "cache" / MANIFEST).read_text())["bytes"]}
        results = {}
        for m in methods:
            name, opts = known[m]
            results[m] = measure_method(name, opts, over_files, over_cache, args.steps, epoch_batches, paths)
        figures["methods"] = results
        if "joint" in results and "iprm" in results:
            figures["ratio_iprm_to_joint"] = {
                p: round(results["iprm"][p]["s_per_epoch"] / results["joint"][p]["s_per_epoch"], 3)
                for p in paths}
        for r in results.values():
            if "cache" in r and "files" in r:
                r["speedup_cache_over_files"] = round(r["files"]["s_per_epoch"] / r["cache"]["s_per_epoch"], 2)
        if "cache" in paths and "files" in paths:
            figures["input"] = measure_input(over_files, over_cache)
        if "iprm" in results:
            best = results["iprm"].get("cache", results["iprm"].get("random"))
            figures["goal"] = {"iprm_epoch_s_at_most": GOAL_S, "iprm_cache_epoch_s": best["s_per_epoch"],
                               "met": bool(best["s_per_epoch"] <= GOAL_S) if device.type == "cuda" else None}
        figures["wall_s"] = round(time.perf_counter() - t_start, 1)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    print(f"[gpu_epoch] figures written to {out_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
