"""An optional input cache for the audio + frames datasets (CREMA-D, Kinetics-Sounds).

A CREMA-D epoch read from the files spends most of its time decoding JPEGs and computing
STFTs of 20 s of resampled audio; the GPU waits. The cache does that work once per dataset:

* ``audio.npy``: every clip's audio input exactly as the dataset's loader computes it (log
  spectrogram or stored fbank), float32 ``(N, 1, F, T)``, read memory-mapped;
* ``train_frames.npy``: every frame a train-time draw can pick (:func:`media.train_candidates`)
  decoded to uint8 ``(F, H, W, 3)`` at one store shape: the dataset's most common frame size
  when its shorter side is at most ``cache_frame_size`` (then those frames are the decoded
  JPEG pixels, untouched), else that size scaled down; each frame's own size is kept
  (``train_sizes.npy``) so the crops are drawn in its own pixel coordinates;
* ``eval_frames.npy``: the eval-time picks already resized to ``image_size`` squared with the
  very PIL resize of the uncached path, uint8 ``(N, k, S, S, 3)``;
* ``manifest.json`` (written last, the whole folder renamed into place: a crash never
  leaves a half cache) and ``clips.json`` (per clip: its media paths, frame listing and a
  signature of the names, sizes and modification times of every file it was built from).

The manifest is keyed to the preprocessing settings (audio recipe and shape, frames per
clip, frame rule, image size, listing order, store size) and to the data: opening checks
the settings and every clip the run reads against its signature, and a mismatch is a
:class:`StaleCacheError` that names what differs (a cache is never silently used for other
data). The plugin's own data fingerprint is recorded too.

What a run gets (``--set cache=DIR``; the uncached path stays the default and the
reference):

* test-time (eval) tensors identical, bit for bit, to the uncached path's (same pixels, same
  torchvision ``to_tensor`` / ``normalize`` arithmetic on the CPU);
* train-time crops and flips drawn from the same stream as the uncached path: each item draws
  its frame picks, then per frame the RandomResizedCrop parameters (:func:`rrc_params`, the
  exact algorithm of torchvision's ``RandomResizedCrop.get_params``) and the flip, from
  torch's global RNG in the loader worker, in the order the uncached transforms draw them.
  By default (CPU mode) the crop is applied in the worker with torchvision's PIL functions,
  bit-identical to the uncached path for frames stored at their own size. In device mode
  (:func:`enable_device_transform`, done by :func:`wrap_loader` on CUDA) the item carries
  the uint8 frames with the crop boxes and flips, and :class:`DeviceCrop` (the Splits'
  ``device_transform(batch, generator)``) crops, resizes (``torchvision.ops.roi_align``,
  bilinear with adaptive sampling), flips and normalises the whole batch on the device.

Loading: the trainer's loaders pin memory on CUDA and prefetch in their workers;
:class:`DeviceLoader` adds a batch of host-to-device prefetch on a side stream. Workers are
not persistent: the trainer builds each epoch's loader afresh so that the workers' RNGs are
re-seeded from (seed, epoch), which is what makes a resumed run equal an uninterrupted one.

Wiring: a run gets device mode when every loader the trainer builds goes through
:func:`wrap_loader` (one call at the end of ``Trainer.loader``); without it a cached run
still works, cropping in the loader workers (CPU mode).

The array files are plain ``.npy`` (``np.load(..., mmap_mode="r")``, never pickles).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mmbalance import media
from mmbalance.errors import DataError

CACHE_FORMAT = "mmbalance-avcache"
CACHE_VERSION = 1
MANIFEST = "manifest.json"
CLIPS = "clips.json"
ARRAY_FILES = {
    "audio": "audio.npy",
    "train_frames": "train_frames.npy",
    "train_sizes": "train_sizes.npy",
    "train_pos": "train_pos.npy",
    "train_offsets": "train_offsets.npy",
    "eval_frames": "eval_frames.npy",
}
# torchvision's RandomResizedCrop / RandomHorizontalFlip defaults: what the uncached path uses
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
FLIP_P = 0.5
# libraries whose arithmetic the cached tensors depend on (recorded; a change only warns)
VERSIONED = ("numpy", "torch", "torchvision", "torchaudio", "PIL", "soxr", "soundfile")


class CacheError(DataError):
    """The input cache cannot be used: not a cache, unreadable, or in the wrong place."""


class StaleCacheError(CacheError):
    """The input cache was built for other data or other preprocessing settings."""


class CacheVersionWarning(UserWarning):
    """The cache was built with other library versions (its tensors may differ in the last bits)."""


# ------------------------------------------------------------------------- crop parameters


def rrc_params(
    height: int,
    width: int,
    scale: Sequence[float] = RRC_SCALE,
    ratio: Sequence[float] = RRC_RATIO,
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop of a ``height`` x ``width`` image.

    The algorithm and the random draws of torchvision's ``RandomResizedCrop.get_params`` (ten
    tries of an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``, then a
    central crop), op for op in float32 torch arithmetic, so that the same RNG state gives the
    same crop: from ``generator``, or torch's global RNG when it is None (what the uncached
    path's transform uses). Kept here because the cache draws the crop without an image.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            j = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_flip(p: float = FLIP_P, generator: torch.Generator | None = None) -> bool:
    """RandomHorizontalFlip's draw: ``torch.rand(1) < p`` (global RNG when ``generator`` is None)."""
    return bool(torch.rand(1, generator=generator) < p)


def crop_box(
    params: tuple[int, int, int, int], native_hw: tuple[int, int], stored_hw: tuple[int, int]
) -> tuple[float, float, float, float]:
    """The crop ``params`` = (top, left, h, w), drawn in a frame's own ``native_hw`` pixels, as
    an (x1, y1, x2, y2) box in the pixels of its stored copy (``stored_hw``): the same region
    of the picture whatever size it was stored at."""
    i, j, h, w = params
    sy, sx = stored_hw[0] / native_hw[0], stored_hw[1] / native_hw[1]
    return j * sx, i * sy, (j + w) * sx, (i + h) * sy


def store_shape(sizes: Sequence[tuple[int, int]], max_side: int) -> tuple[int, int]:
    """(H, W) every train frame is stored at: the most common (H, W) of ``sizes``, scaled down
    (never up) so its shorter side is at most ``max_side``. One shape lets the frames live in
    one memory-mapped array; the most common size kept as it is makes most crops exact."""
    if not sizes:
        return (1, 1)
    (h, w), _ = Counter(tuple(s) for s in sizes).most_common(1)[0]
    f = min(1.0, max_side / min(h, w))
    return max(1, int(round(h * f))), max(1, int(round(w * f)))


# ------------------------------------------------------------------ the device-side transform


class DeviceCrop:
    """Train-time crop, resize, flip and normalisation of a whole batch, on its device.

    Called as ``device_transform(batch, generator)`` on a batch already on the device. It acts
    only on a raw batch of the cache's device mode (uint8 ``visual`` (N, k, H, W, 3) with
    ``visual_box`` (N, k, 4) and ``visual_flip`` (N, k)) and returns every other batch
    unchanged, so calling it on eval batches, uncached batches or twice is harmless. The crop
    of each frame is ``torchvision.ops.roi_align`` (bilinear, ``sampling_ratio=-1``: as many
    samples per output pixel as the box is larger, a box-filter antialias) of its box to
    ``size`` squared, rounded to whole uint8 levels as PIL's resize is, then flipped where
    drawn, divided by 255 and ImageNet-normalised: (N, 3, k, size, size) float32, the layout of
    the uncached path. The boxes and flips were drawn by the dataset (:func:`rrc_params`, the
    uncached path's stream); ``generator`` only serves a raw batch that carries none.
    """

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self._norm: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """ImageNet mean and std on ``device``, made once (a fresh host-to-device copy per batch
        would wait for the device to finish the previous step)."""
        if device not in self._norm:
            self._norm[device] = tuple(  # type: ignore[assignment]
                torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(device) for v in (media.IMAGENET_MEAN, media.IMAGENET_STD)
            )
        return self._norm[device]

    def __repr__(self) -> str:
        return f"DeviceCrop(size={self.size})"

    def __call__(self, batch: Any, generator: torch.Generator | None = None) -> Any:
        if not is_raw_batch(batch):
            return batch
        from torchvision.ops import roi_align

        x = batch["visual"]
        n, k, hh, ww, c = x.shape
        boxes = batch.get("visual_box")
        flips = batch.get("visual_flip")
        if boxes is None or flips is None:  # a raw batch without draws: draw them here
            draws = [(rrc_params(hh, ww, generator=generator), draw_flip(generator=generator)) for _ in range(n * k)]
            boxes = torch.tensor([crop_box(p, (hh, ww), (hh, ww)) for p, _ in draws], dtype=torch.float32)
            flips = torch.tensor([f for _, f in draws], dtype=torch.bool)
        boxes = boxes.to(x.device, torch.float32).reshape(n * k, 4)
        flips = flips.to(x.device).reshape(n * k)
        imgs = x.reshape(n * k, hh, ww, c).permute(0, 3, 1, 2).contiguous().float()  # roi_align wants NCHW
        index = torch.arange(n * k, device=x.device, dtype=torch.float32).unsqueeze(1)
        out = roi_align(imgs, torch.cat([index, boxes], dim=1), output_size=(self.size, self.size),
                        spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        out = out.round_().clamp_(0, 255)
        out = torch.where(flips.view(-1, 1, 1, 1), out.flip(-1), out)
        mean, std = self._mean_std(x.device)
        out = (out / 255.0 - mean) / std
        done = {key: v for key, v in batch.items() if key not in ("visual_box", "visual_flip")}
        done["visual"] = out.reshape(n, k, c, self.size, self.size).permute(0, 2, 1, 3, 4).contiguous()
        return done


def is_raw_batch(batch: Any) -> bool:
    """Whether ``batch`` holds the cache's raw train frames (uint8, channels last)."""
    return (
        isinstance(batch, Mapping)
        and isinstance(batch.get("visual"), torch.Tensor)
        and batch["visual"].dtype == torch.uint8
        and batch["visual"].dim() == 5
    )


def _base_datasets(splits: Any) -> list[Any]:
    """The datasets under a Splits' train / val / test (IndexSubset views unwrapped)."""
    out = []
    for name in ("train", "val", "test"):
        ds = getattr(splits, name, None)
        while ds is not None and not isinstance(ds, CachedAVClipDataset) and hasattr(ds, "base"):
            ds = ds.base
        if isinstance(ds, CachedAVClipDataset):
            out.append(ds)
    return out


def enable_device_transform(splits: Any) -> Callable[..., Any] | None:
    """Switch a cached Splits to device mode and return its ``device_transform``.

    From then on its train-mode datasets yield raw uint8 frames with their crop draws, which
    every consumer must pass through the returned transform once on the device (every loader
    of the run: :func:`wrap_loader` does both). Returns None, and changes nothing, for Splits
    without a device transform (uncached data, or no visual modality).
    """
    transform = getattr(splits, "device_transform", None)
    if transform is None:
        return None
    for ds in _base_datasets(splits):
        if ds.train:
            ds.raw = True
    return transform


def device_mode(splits: Any) -> bool:
    """Whether some train dataset of ``splits`` yields raw frames (device mode is on)."""
    return any(ds.raw for ds in _base_datasets(splits))


def to_device(obj: Any, device: torch.device) -> Any:
    """Tensors of a (nested) batch onto ``device`` (non-blocking from pinned memory)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def _record_stream(obj: Any, stream: Any) -> None:
    if isinstance(obj, torch.Tensor):
        obj.record_stream(stream)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _record_stream(v, stream)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _record_stream(v, stream)


class DeviceLoader:
    """A loader's batches on the device, with the device transform applied.

    On CUDA the next batch's host-to-device copy is issued on a side stream while the current
    batch is being used (one batch of prefetch on top of the DataLoader's own worker
    prefetching), and the transform runs on the consumer's stream. ``len`` and every other
    attribute are the wrapped loader's.
    """

    def __init__(self, loader: Any, device: torch.device, transform: Callable[..., Any] | None) -> None:
        self.loader = loader
        self.device = torch.device(device)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name in ("loader", "device", "transform"):
            raise AttributeError(name)
        return getattr(self.loader, name)

    def _finish(self, batch: Any) -> Any:
        return self.transform(batch, None) if self.transform is not None else batch

    def __iter__(self) -> Iterator[Any]:
        if self.device.type != "cuda":
            for batch in self.loader:
                yield self._finish(to_device(batch, self.device))
            return
        copy_stream = torch.cuda.Stream(self.device)
        it = iter(self.loader)

        def stage(batch: Any) -> Any:
            with torch.cuda.stream(copy_stream):
                return to_device(batch, self.device)

        nxt = next(it, None)
        staged = stage(nxt) if nxt is not None else None
        while staged is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(copy_stream)
            _record_stream(staged, current)  # memory made on the copy stream, used on this one
            batch = staged
            nxt = next(it, None)
            staged = stage(nxt) if nxt is not None else None
            yield self._finish(batch)


def wrap_loader(loader: Any, splits: Any, device: torch.device | str, enable: bool | None = None) -> Any:
    """``loader`` as the run should consume it when its data may be cached.

    Unchanged (the same object) when ``splits`` has no device transform, or when device mode
    stays off (``enable`` None: on on CUDA, off elsewhere, where the loader workers crop as
    the uncached path does). Otherwise device mode is switched on for ``splits`` and a
    :class:`DeviceLoader` is returned: batches come already on ``device`` with the crops
    applied. Wrap every loader of a run this way (one call in ``Trainer.loader``), because
    device mode changes what the train datasets yield for all of them. Idempotent.
    """
    if isinstance(loader, DeviceLoader):
        return loader
    device = torch.device(device)
    transform = getattr(splits, "device_transform", None)
    if transform is None:
        return loader
    on = device.type == "cuda" if enable is None else bool(enable)
    if on:
        enable_device_transform(splits)
    elif not device_mode(splits):
        return loader
    return DeviceLoader(loader, device, transform)


# ------------------------------------------------------------------------- the cache itself


def cache_settings(r: media.AVSettings, dataset: str) -> dict[str, Any]:
    """The preprocessing settings a cache is keyed to: everything that changes a cached array
    or which frames it holds (JSON-normalised, so a manifest compares equal)."""
    settings = {
        "format": CACHE_VERSION,
        "dataset": dataset,
        "layout": r.layout,
        "audio": r.audio.rule,
        "audio_shape": list(r.audio.spec.shape),
        "frames": int(r.frames),
        "frame_rule": r.frame_rule,
        "image_size": int(r.image_size),
        "sort_frames": bool(r.sort_frames),
        "frame_store_max_side": int(r.cache_frame_size),
        "eval_resize": "torchvision Resize((S, S)), PIL bilinear",
        "store_resize": "PIL bilinear",
    }
    return json.loads(json.dumps(settings))


def _rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (the plugins build clip paths under it, so a string test
    is enough; otherwise both are resolved), else its resolved absolute path."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        pass
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return Path(path).resolve().as_posix()


def clip_key(clip: media.Clip, root: Path) -> str:
    """A clip's identity in a cache: its audio file and frame folder relative to the dataset
    folder (so the same media listed in two splits is one entry)."""
    return f"{_rel(clip.audio, root)}|{_rel(clip.frame_dir, root)}"


def _frame_plan(clip: media.Clip, k: int, rule: str, train: bool) -> tuple[list[int], list[int]]:
    """(train candidate listing indices, eval picks) of one clip."""
    n = len(clip.frame_names)
    return (media.train_candidates(n, k, rule) if train else []), media.choose_frames(n, k, False, rule)


def clip_signature(clip: media.Clip, used: Sequence[int], root: Path) -> str:
    """sha256 of the relative path, size and modification time of a clip's audio file and of
    the frames ``used`` (listing indices), and of its whole frame listing: what must not change
    for its cached tensors to stay what the files give."""
    h = hashlib.sha256()
    paths = [clip.audio] + [clip.frame_dir / clip.frame_names[t] for t in sorted(set(used))]
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as exc:
            raise DataError(f"Cannot read '{p}' to check the input cache against it: {exc}.") from exc
        h.update(f"{_rel(p, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update("\0".join(clip.frame_names).encode())
    return h.hexdigest()[:20]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in VERSIONED:
        try:
            out[name] = version("pillow" if name == "PIL" else name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(
            f"The input cache file '{path}' cannot be read ({exc}). Delete the folder "
            f"'{path.parent}' (it is rebuilt on first use) or point --set cache= at another one."
        ) from exc


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to the disk; best effort where that is refused."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _build_lock(cache_dir: Path) -> Iterator[None]:
    """An exclusive flock beside the cache folder: one process builds, the others wait and
    then find it built."""
    lock = cache_dir.parent / f".{cache_dir.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@dataclass(frozen=True)
class _Job:
    """A chunk of clips one build worker decodes into the (already allocated) arrays."""

    folder: str
    audio_loader: Callable[[Path], torch.Tensor]
    audio_shape: tuple[int, ...]
    stored_hw: tuple[int, int]
    image_size: int
    # (clip row, audio path, ((train row, frame path), ...), (eval frame path, ...))
    entries: tuple[tuple[int, str, tuple[tuple[int, str], ...], tuple[str, ...]], ...]


def eval_frame_pixels(img: Image.Image, size: int) -> np.ndarray:
    """The uncached eval path's resize of one frame (torchvision ``Resize((size, size))`` on
    the PIL image) as uint8 (size, size, 3)."""
    from torchvision import transforms as T

    return np.asarray(T.Resize((size, size))(img), dtype=np.uint8)


def stored_frame_pixels(img: Image.Image, stored_hw: tuple[int, int]) -> np.ndarray:
    """A train frame as stored: its decoded pixels when it has the store shape, else resized
    to it (PIL bilinear)."""
    h, w = stored_hw
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _fill(job: _Job) -> int:
    """Decode one chunk of clips into the arrays of a cache being built (a worker's task)."""
    folder = Path(job.folder)
    arrays = {k: np.load(folder / ARRAY_FILES[k], mmap_mode="r+") for k in ("audio", "train_frames", "eval_frames")}
    for row, audio_path, train, evals in job.entries:
        spec = job.audio_loader(Path(audio_path))
        if tuple(spec.shape) != tuple(job.audio_shape):
            raise DataError(
                f"Audio input of '{audio_path}' has shape {tuple(spec.shape)}; the cache expects "
                f"{tuple(job.audio_shape)}."
            )
        arrays["audio"][row] = spec.numpy()
        decoded: dict[str, Image.Image] = {}

        def frame(path: str, decoded: dict[str, Image.Image] = decoded) -> Image.Image:
            if path not in decoded:
                decoded[path] = media.load_rgb(path)
            return decoded[path]

        for trow, path in train:
            arrays["train_frames"][trow] = stored_frame_pixels(frame(path), job.stored_hw)
        for t, path in enumerate(evals):
            arrays["eval_frames"][row, t] = eval_frame_pixels(frame(path), job.image_size)
    for a in arrays.values():
        a.flush()
    return len(job.entries)


def _one_thread() -> None:
    """A build worker computes with one intra-op thread, as a DataLoader worker does (and
    eight workers do not each start a thread per core)."""
    torch.set_num_threads(1)


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file from its header (no decoding)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
    except Exception as exc:
        raise DataError(f"Image file '{path}' is missing, corrupt or not an image ({exc}).") from exc
    return int(h), int(w)


def build_av_cache(
    cache_dir: Path,
    settings: Mapping[str, Any],
    clips: Sequence[media.Clip],
    train_keys: set[str],
    r: media.AVSettings,
    root: Path,
    fingerprint: Mapping[str, Any],
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the cache of ``clips`` (unique by :func:`clip_key`) into ``cache_dir``; returns
    its manifest.

    Everything is written into a fresh sibling folder, the manifest last, and that folder is
    renamed to ``cache_dir`` (which must not exist or be empty): a killed build leaves only a
    ``.partial`` folder, removed by the next build. ``workers`` > 1 decodes in up to that many
    processes (forked on Linux), each writing its clips' rows of the memory-mapped arrays.
    """
    t0 = time.monotonic()
    cache_dir = Path(cache_dir)
    for old in cache_dir.parent.glob(f".{cache_dir.name}.partial-*"):
        shutil.rmtree(old, ignore_errors=True)  # a killed build's leftovers (we hold the lock)
    k, size = int(r.frames), int(r.image_size)
    rows: list[dict[str, Any]] = []
    train_rows: list[tuple[int, Path]] = []
    sizes: list[tuple[int, int]] = []
    pos: list[int] = []
    offsets = [0]
    for clip in clips:
        key = clip_key(clip, root)
        cands, evals = _frame_plan(clip, k, r.frame_rule, key in train_keys)
        for t in cands:
            path = clip.frame_dir / clip.frame_names[t]
            sizes.append(_image_size(path))
            pos.append(t)
            train_rows.append((len(rows), path))
        offsets.append(len(pos))
        rows.append({
            "key": key,
            "frame_names": list(clip.frame_names),
            "signature": clip_signature(clip, cands + evals, root),
            "audio": str(clip.audio),
            "evals": [str(clip.frame_dir / clip.frame_names[t]) for t in evals],
        })
    stored = store_shape(sizes, int(r.cache_frame_size))
    n, nf = len(rows), len(pos)
    audio_shape = tuple(int(d) for d in r.audio.spec.shape)
    shapes = {
        "audio": ((n, *audio_shape), np.float32),
        "train_frames": ((nf, *stored, 3), np.uint8),
        "eval_frames": ((n, k, size, size, 3), np.uint8),
    }
    need = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in shapes.values())
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache_dir.parent).free
    if need > free:
        raise CacheError(
            f"The input cache of {settings['dataset']} needs {need / 2**30:.1f} GiB but "
            f"'{cache_dir.parent}' has {free / 2**30:.1f} GiB free. Free some space or point "
            f"--set cache= at another disk (a smaller --set cache_frame_size=... shrinks the frames)."
        )
    tmp = cache_dir.parent / f".{cache_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, (shape, dtype) in shapes.items():
            np.lib.format.open_memmap(tmp / ARRAY_FILES[name], mode="w+", dtype=dtype, shape=shape).flush()
        np.save(tmp / ARRAY_FILES["train_sizes"], np.asarray(sizes, dtype=np.int32).reshape(nf, 2))
        np.save(tmp / ARRAY_FILES["train_pos"], np.asarray(pos, dtype=np.int32))
        np.save(tmp / ARRAY_FILES["train_offsets"], np.asarray(offsets, dtype=np.int64))
        if progress:
            print(f"mmbalance: building the input cache of {settings['dataset']} in '{cache_dir}': "
                  f"{n} clips, {nf} train frames stored at {stored[0]}x{stored[1]}, "
                  f"{need / 2**30:.2f} GiB", file=sys.stderr, flush=True)
        by_row: dict[int, list[tuple[int, str]]] = {}
        for trow, (crow, path) in enumerate(train_rows):
            by_row.setdefault(crow, []).append((trow, str(path)))
        entries = [(i, row["audio"], tuple(by_row.get(i, [])), tuple(row["evals"])) for i, row in enumerate(rows)]
        n_workers = max(1, min(int(workers or 1), len(entries) // 16))  # a pool pays off from ~16 clips each
        chunk = max(1, min(64, math.ceil(len(entries) / (n_workers * 4))))
        jobs = [
            _Job(str(tmp), r.audio.loader, audio_shape, stored, size, tuple(entries[i : i + chunk]))
            for i in range(0, len(entries), chunk)
        ]
        if n_workers == 1:
            for job in jobs:
                _fill(job)
        else:
            # fork, as the DataLoader workers that run the same loaders do (spawn would re-run
            # a caller's unguarded __main__); spawn where there is no fork
            ctx = get_context("fork" if sys.platform.startswith("linux") else "spawn")
            with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx, initializer=_one_thread) as pool:
                list(pool.map(_fill, jobs))
        native = sum(1 for s in sizes if tuple(s) == stored)
        _write_json(tmp / CLIPS, {
            "keys": [row["key"] for row in rows],
            "frame_names": [row["frame_names"] for row in rows],
            "signatures": [row["signature"] for row in rows],
        })
        manifest = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "dataset": settings["dataset"],
            "settings": dict(settings),
            "data_fingerprint": json.loads(json.dumps(dict(fingerprint), default=str)),
            "root": str(Path(root).resolve()),
            "clips": n,
            "train_frames": nf,
            "stored_hw": list(stored),
            "native_frames": native,
            "arrays": {name: {"file": ARRAY_FILES[name], "shape": list(shape), "dtype": np.dtype(dtype).str}
                       for name, (shape, dtype) in shapes.items()},
            "bytes": need,
            "versions": _versions(),
            "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "build_s": round(time.monotonic() - t0, 3),
        }
        for f in tmp.iterdir():  # on disk before the manifest says the cache is complete
            _fsync(f)
        _write_json(tmp / MANIFEST, manifest)
        _fsync(tmp / MANIFEST)
        if cache_dir.is_dir():
            cache_dir.rmdir()  # empty (checked by the caller); rename needs the name free
        os.rename(tmp, cache_dir)
        _fsync(cache_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(f"mmbalance: input cache built in {manifest['build_s']:.1f} s", file=sys.stderr, flush=True)
    return manifest


class AVCache:
    """An opened input cache: its manifest, clip index and (lazily, per process) its arrays.

    Pickling (to loader workers) carries the folder and the index, never the mapped arrays;
    each process maps them itself on first use.
    """

    def __init__(self, folder: Path, root: Path) -> None:
        self.folder = Path(folder)
        self.root = Path(root)  # the dataset folder the clip keys are relative to
        self.manifest = _read_json(self.folder / MANIFEST)
        if self.manifest.get("format") != CACHE_FORMAT:
            raise CacheError(
                f"'{self.folder / MANIFEST}' is not the manifest of an mmbalance input cache. "
                f"Point --set cache= at an empty or new folder (it is built there on first use)."
            )
        clips = _read_json(self.folder / CLIPS)
        self.keys: list[str] = list(clips["keys"])
        self.frame_names: list[list[str]] = [list(x) for x in clips["frame_names"]]
        self.signatures: list[str] = list(clips["signatures"])
        self.index = {key: i for i, key in enumerate(self.keys)}
        self.stored_hw = tuple(self.manifest["stored_hw"])
        self._arrays: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state

    def array(self, name: str) -> np.ndarray:
        """One of the cache's arrays, memory-mapped read-only (never unpickled)."""
        a = self._arrays.get(name)
        if a is None:
            path = self.folder / ARRAY_FILES[name]
            try:
                a = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise CacheError(
                    f"The input cache array '{path}' is missing or damaged ({exc}). Delete "
                    f"'{self.folder}' (it is rebuilt on first use) or point --set cache= elsewhere."
                ) from exc
            want = self.manifest["arrays"].get(name)
            if want is not None and (list(a.shape) != want["shape"] or a.dtype.str != want["dtype"]):
                raise CacheError(
                    f"The input cache array '{path}' has shape {list(a.shape)} {a.dtype.str}; its "
                    f"manifest says {want['shape']} {want['dtype']}. Delete '{self.folder}' and "
                    f"let it be rebuilt."
                )
            self._arrays[name] = a
        return a

    def describe(self) -> dict[str, Any]:
        """What a run records about the cache it read (JSON)."""
        m = self.manifest
        return {"dir": str(self.folder), "built": m.get("built"), "clips": m.get("clips"),
                "train_frames": m.get("train_frames"), "stored_hw": m.get("stored_hw"),
                "native_frames": m.get("native_frames"), "versions": m.get("versions")}

    # ---- validation ---------------------------------------------------------------------
    def check(self, settings: Mapping[str, Any], clips: Sequence[media.Clip], train_keys: set[str],
              r: media.AVSettings) -> None:
        """Refuse (StaleCacheError) a cache built with other settings, or whose clips differ
        from the files now: missing, another frame listing, or files changed since."""
        fix = (f"Delete the folder '{self.folder}' (it is rebuilt on first use) or point --set "
               f"cache= at another folder.")
        mine = self.manifest.get("settings", {})
        if self.manifest.get("version") != CACHE_VERSION or mine != dict(settings):
            diff = [f"{k}: {mine.get(k)!r} there, {settings.get(k)!r} now"
                    for k in sorted(set(mine) | set(settings)) if mine.get(k) != settings.get(k)]
            raise StaleCacheError(
                f"The input cache at '{self.folder}' was built with other preprocessing settings "
                f"({'; '.join(diff[:4]) or 'format version ' + str(self.manifest.get('version'))}"
                f"{' ...' if len(diff) > 4 else ''}). {fix}"
            )
        missing, listing, changed, untrained = [], [], [], []
        offsets = self.array("train_offsets")
        root = self.root
        for clip in clips:
            key = clip_key(clip, root)
            row = self.index.get(key)
            if row is None:
                missing.append(key)
                continue
            if list(clip.frame_names) != self.frame_names[row]:
                listing.append(key)
                continue
            train = key in train_keys
            cands, evals = _frame_plan(clip, r.frames, r.frame_rule, train)
            if train and offsets[row + 1] == offsets[row] and cands:
                untrained.append(key)
            if clip_signature(clip, cands + evals, root) != self.signatures[row]:
                changed.append(key)
        problems = [
            (missing, "are not in it (it was built for other split lists or another subset)"),
            (listing, "have other frame files now"),
            (changed, "have files that changed since it was built (size or modification time)"),
            (untrained, "are train clips now but were cached for evaluation only"),
        ]
        for keys, what in problems:
            if keys:
                raise StaleCacheError(
                    f"The input cache at '{self.folder}' does not match the data: {len(keys)} of "
                    f"the {len(clips)} clips this run reads {what}, e.g. {', '.join(keys[:3])}. {fix}"
                )
        built = self.manifest.get("versions") or {}
        now = _versions()
        moved = {k: (built.get(k), v) for k, v in now.items() if built.get(k) != v}
        if moved:
            warnings.warn(
                f"The input cache at '{self.folder}' was built with "
                + ", ".join(f"{k} {a}" for k, (a, _) in moved.items()) + "; now "
                + ", ".join(f"{k} {b}" for k, (_, b) in moved.items())
                + ". Its tensors may differ from what the files give now in the last bits; delete "
                "it to rebuild if that matters.",
                CacheVersionWarning, stacklevel=3,
            )

    # ---- reading --------------------------------------------------------------------------
    def rows_for(self, clips: Sequence[media.Clip]) -> np.ndarray:
        """The cache rows of ``clips`` (each checked by :meth:`check` to be there)."""
        try:
            return np.asarray([self.index[clip_key(c, self.root)] for c in clips], dtype=np.int64)
        except KeyError as exc:
            raise StaleCacheError(
                f"The input cache at '{self.folder}' has no clip {exc.args[0]}. Delete it (it is "
                f"rebuilt on first use) or point --set cache= at another folder."
            ) from None

    def audio(self, row: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array("audio")[row]))

    def train_frames(self, row: int, picks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (k, H, W, 3) stored frames and their own (k, 2) sizes for listing ``picks``."""
        lo, hi = (int(x) for x in self.array("train_offsets")[row : row + 2])
        pos = self.array("train_pos")[lo:hi]
        at = np.searchsorted(pos, picks)
        if len(pos) == 0 or np.any(at >= len(pos)) or np.any(pos[np.minimum(at, len(pos) - 1)] != picks):
            raise CacheError(
                f"The input cache at '{self.folder}' holds no train frames {list(picks)} of clip "
                f"{self.keys[row]}. Delete it (it is rebuilt on first use)."
            )
        idx = lo + at
        return np.array(self.array("train_frames")[idx]), np.array(self.array("train_sizes")[idx])

    def eval_frames(self, row: int) -> np.ndarray:
        return np.array(self.array("eval_frames")[row])


def open_av_cache(
    r: media.AVSettings,
    parts: Mapping[str, Sequence[media.Clip]],
    *,
    dataset: str,
    root: Path | None,
    fingerprint: Mapping[str, Any],
    workers: int | None = None,
    progress: bool = True,
) -> AVCache:
    """The input cache of ``r.cache`` for every clip of ``parts``, built first if the folder
    does not exist or is empty, then checked against the settings and the files.

    ``root`` is the dataset folder the clips are read from: the cache must lie outside it
    (building it there would change the data's fingerprint, and so every run's identity).
    ``parts["train"]`` are the train-mode clips (their train frames are cached); the other
    parts are evaluated only. ``workers`` (default: the CPUs, at most 8) decode in parallel.
    """
    if not r.cache:
        raise CacheError("open_av_cache needs the cache option set (--set cache=DIR).")
    if root is None:
        raise CacheError(f"Dataset '{dataset}': the input cache needs the dataset folder it caches.")
    cache_dir, root = Path(r.cache).expanduser().absolute(), Path(root)
    try:
        cache_dir.resolve().relative_to(root.resolve())
        inside = True
    except ValueError:
        inside = False
    if inside:
        raise CacheError(
            f"The input cache folder '{cache_dir}' is inside the data folder '{root}'. Put it "
            f"elsewhere (e.g. --set cache={root.parent / (root.name + '-cache')}): building it "
            f"there would change the data's fingerprint and with it every run's identity."
        )
    if cache_dir.exists() and not cache_dir.is_dir():
        raise CacheError(f"The input cache path '{cache_dir}' is a file. Point --set cache= at a folder.")
    settings = cache_settings(r, dataset)
    train_keys = {clip_key(c, root) for c in parts.get("train", [])}
    seen: dict[str, media.Clip] = {}
    for name in ("train", *[p for p in parts if p != "train"]):
        for clip in parts.get(name, []):
            seen.setdefault(clip_key(clip, root), clip)
    clips = list(seen.values())
    if not (cache_dir / MANIFEST).is_file():
        if cache_dir.is_dir() and any(cache_dir.iterdir()):
            raise CacheError(
                f"The folder '{cache_dir}' is not empty and holds no {MANIFEST}: it is not an "
                f"input cache. Point --set cache= at an empty or new folder (it is built there)."
            )
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        with _build_lock(cache_dir):
            if not (cache_dir / MANIFEST).is_file():  # another process may have built it meanwhile
                n = workers if workers else min(8, os.cpu_count() or 1)
                build_av_cache(cache_dir, settings, clips, train_keys, r, root, fingerprint, n, progress)
    store = AVCache(cache_dir, root)
    store.check(settings, clips, train_keys, r)
    return store


class CachedAVClipDataset(Dataset):
    """:class:`mmbalance.media.AVClipDataset` read from an :class:`AVCache`: the same items.

    Audio: the cached array row. Eval frames: the cached resized pixels through torchvision's
    ``to_tensor`` and ``normalize`` (bit-identical to the files). Train frames: the frame picks
    (:func:`media.choose_frames`), then per frame :func:`rrc_params` and :func:`draw_flip` from
    torch's global RNG, in the uncached transforms' order; applied here (``raw`` False, CPU
    mode) with torchvision's PIL crop (exactly the files' result for frames stored at their own
    size, the same region otherwise), or handed on as uint8 frames with ``visual_box`` and
    ``visual_flip`` for :class:`DeviceCrop` (``raw`` True, device mode).
    """

    def __init__(
        self,
        store: AVCache,
        clips: Sequence[media.Clip],
        modalities: Sequence[str],
        frames: int,
        image_size: int,
        train: bool,
        fix: str = "",
        frame_rule: str = "random",
    ) -> None:
        if frame_rule not in media.FRAME_RULES:
            raise DataError(f"Unknown frame rule '{frame_rule}'.")
        self.store = store
        self.clips = list(clips)
        self.rows = store.rows_for(self.clips)
        self.modalities = tuple(modalities)
        self.frames = int(frames)
        self.image_size = int(image_size)
        self.train = bool(train)
        self.fix = fix
        self.frame_rule = frame_rule
        self.raw = False

    def __len__(self) -> int:
        return len(self.clips)

    def eval_view(self) -> CachedAVClipDataset:
        """The same clips read as evaluation reads them (the cached resized frames)."""
        return CachedAVClipDataset(self.store, self.clips, self.modalities, self.frames, self.image_size,
                                   False, self.fix, self.frame_rule)

    @property
    def labels(self) -> np.ndarray:
        return np.array([c.label for c in self.clips], dtype=np.int64)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return self._item(i)
        except DataError as exc:
            if not self.fix or isinstance(exc, CacheError):  # a cache error carries its own fix
                raise
            raise DataError(f"{exc} {self.fix}") from exc

    def _item(self, i: int) -> dict[str, Any]:
        clip, row = self.clips[i], int(self.rows[i])
        item: dict[str, Any] = {}
        if "audio" in self.modalities:
            item["audio"] = self.store.audio(row)
        if "visual" in self.modalities:
            if self.train:
                item.update(self._train_visual(clip, row))
            else:
                item["visual"] = _normalised_stack(list(self.store.eval_frames(row)))
        item["label"] = int(clip.label)
        item["index"] = int(i)
        return item

    def _train_visual(self, clip: media.Clip, row: int) -> dict[str, torch.Tensor]:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        picks = media.choose_frames(len(clip.frame_names), self.frames, True, self.frame_rule)
        pixels, sizes = self.store.train_frames(row, picks)
        stored = tuple(pixels.shape[1:3])
        draws = []
        for h, w in sizes:
            params = rrc_params(int(h), int(w))
            draws.append((params, draw_flip()))
        if self.raw:
            boxes = [crop_box(p, (int(h), int(w)), stored) for (p, _), (h, w) in zip(draws, sizes, strict=True)]
            return {"visual": torch.from_numpy(pixels),
                    "visual_box": torch.tensor(boxes, dtype=torch.float32),
                    "visual_flip": torch.tensor([f for _, f in draws], dtype=torch.bool)}
        s = self.image_size
        out = []
        for arr, (h, w), (params, flip) in zip(pixels, sizes, draws, strict=True):
            img = Image.fromarray(arr)
            if (int(h), int(w)) == stored:  # the decoded pixels: torchvision's own crop, exactly
                i, j, ch, cw = params
                img = TF.resized_crop(img, i, j, ch, cw, [s, s], InterpolationMode.BILINEAR, antialias=True)
            else:
                img = img.resize((s, s), Image.BILINEAR, box=crop_box(params, (int(h), int(w)), stored))
            out.append(TF.hflip(img) if flip else img)
        return {"visual": _normalised_stack([np.asarray(im) for im in out])}


def _normalised_stack(frames: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) frames -> ImageNet-normalised (3, k, H, W) float32, with torchvision's
    ``to_tensor`` and ``normalize`` (the uncached path's arithmetic, so equal bits)."""
    from torchvision.transforms import functional as TF

    ts = [TF.normalize(TF.to_tensor(np.array(f)), media.IMAGENET_MEAN, media.IMAGENET_STD) for f in frames]
    return torch.stack(ts, dim=1).to(torch.float32).contiguous()
