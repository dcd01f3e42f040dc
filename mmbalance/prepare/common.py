"""Helpers shared by the ``mmbalance prepare`` preparers.

The per-run :class:`Report` (turned into the summary the CLI prints and writes), atomic file
placement and csv / ``.npy`` writing, the seeded per-class split, the worker pool that runs
one job per clip, and PyAV (FFmpeg) extraction of OGM-GE-style frames and mono WAV audio
(resampled with soxr, as librosa) from videos.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from mmbalance.errors import ConfigError, DataError

LINK_MODES = ("copy", "symlink", "hardlink")
MAX_REPORTED_FAILURES = 20


# ------------------------------------------------------------------------------- summary


@dataclass
class Report:
    """What one preparer did, turned into the summary dict the CLI prints."""

    dataset: str
    raw: Path
    out: Path
    written: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    failures: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    paths: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def fail(self, item: str, error: str) -> None:
        self.failures.append({"item": item, "error": error})

    def summary(self, seconds: float) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "raw": str(self.raw),
            "out": str(self.out),
            "written": dict(self.written),
            "skipped_existing": dict(self.skipped),
            "failed": len(self.failures),
            "failures": self.failures[:MAX_REPORTED_FAILURES],
            "notes": list(self.notes),
            "paths": dict(self.paths),
            "options": {k: _jsonable(v) for k, v in self.options.items()},
            "seconds": round(seconds, 1),
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


# ------------------------------------------------------------------------------ helpers


def _progress(items: Iterable[Any], total: int, desc: str, enabled: bool) -> Iterable[Any]:
    """tqdm when asked (the CLI's long runs), the bare iterable otherwise."""
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit="clip")


def _check_link(link: str) -> str:
    if link not in LINK_MODES:
        raise ConfigError(f"Option link='{link}' is not one of {', '.join(LINK_MODES)}.")
    return link


def place_file(src: Path, dst: Path, link: str) -> None:
    """Copy, symlink or hardlink ``src`` to ``dst`` (replacing it), via a temporary name."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    if tmp.exists() or tmp.is_symlink():
        tmp.unlink()
    if link == "symlink":
        tmp.symlink_to(src.resolve())
    elif link == "hardlink":
        os.link(src, tmp)
    else:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def read_rows(path: Path) -> list[list[str]]:
    """A headerless-or-not csv as stripped rows: UTF-8 with optional BOM, CRLF tolerated."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"Cannot read the split file '{path}' ({exc}). Pass a UTF-8 csv.") from exc
    rows = csv.reader(line for line in text.splitlines() if line.strip())
    return [[cell.strip() for cell in row] for row in rows]


def write_csv(path: Path, rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> None:
    """Write a csv atomically with '\\n' line endings (the loaders accept CRLF and LF)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


# ``mmbalance.data.stratified_holdout`` is not used here: it is sklearn's stratified
# train_test_split, which sizes the test set as ceil(n * fraction) over all classes and shares
# it out by largest remainder (random ties), draws with a RandomState, may leave a class with
# nothing in train and rejects classes of one member -- a different split for the same seed
# -- and mmbalance.data imports torch, which ``import mmbalance.prepare`` avoids.
def stratified_split(
    ids: Sequence[str], labels: Sequence[str], test_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """(train, test) ids with ``round(n_c * test_fraction)`` test clips drawn from each class.

    Deterministic for a seed: each class's ids are sorted, then permuted with
    ``numpy.random.default_rng(seed)`` (classes visited in sorted order). On full CREMA-D with
    the defaults (0.1) this gives 744 test clips, the size of OGM-GE's test.csv, but not the
    same clips: pass OGM-GE's files to reproduce the paper.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[str]] = {}
    for i, lab in zip(ids, labels, strict=True):
        by_class.setdefault(lab, []).append(i)
    train: list[str] = []
    test: list[str] = []
    for lab in sorted(by_class):
        members = sorted(by_class[lab])
        order = rng.permutation(len(members))
        n_test = min(int(round(len(members) * test_fraction)), len(members) - 1)  # keep >= 1 in train
        test += [members[k] for k in order[:n_test]]
        train += [members[k] for k in order[n_test:]]
    return sorted(train), sorted(test)


def _run_jobs(
    fn: Callable[[Any], tuple[str, str, str]],
    jobs: Sequence[Any],
    workers: int,
    desc: str,
    progress: bool,
) -> Iterator[tuple[str, str, str]]:
    """Run ``fn`` over jobs, in-process or in a spawn pool; yields (item, status, message).

    The pool uses 'spawn' so that workers never inherit a forked torch/OpenMP state; the jobs
    only need PyAV, numpy, PIL and soundfile.
    """
    if workers <= 1 or len(jobs) <= 1:
        yield from _progress(map(fn, jobs), len(jobs), desc, progress)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        results = pool.map(fn, jobs, chunksize=max(1, min(32, len(jobs) // (workers * 8) or 1)))
        yield from _progress(results, len(jobs), desc, progress)


def _record(report: Report, results: Iterable[tuple[str, str, str]], what: str) -> None:
    for item, status, message in results:
        if status == "ok":
            report.written[what] += 1
        elif status == "skipped":
            report.skipped[what] += 1
        else:
            report.fail(item, message)


# --------------------------------------------------------------------- frame extraction


def frame_plan(total: int, src_rate: Fraction | float, fps: int, num_frames: int) -> list[int]:
    """Source frame indices (0-based) of the frames an OGM-GE-style extractor saves.

    Output frame i shows the source at time (i + 0.5) / fps seconds, i.e. source frame
    ``floor((i + 0.5) * src_rate / fps)``. Times past the clip's end wrap into its last
    (partial) second -- the frames whose second ``floor(k / src_rate)`` is that of the last
    frame -- exactly as OGM-GE's ``video_to_frame.py`` pads every clip to 10 s, so short
    CREMA-D clips get repeated frames. (OGM-GE's moviepy positions are 1-based and rounded,
    which picks the frame before ours at the same time; the wrap rule is the same.)
    """
    if total < 1:
        raise DataError("The video holds no decodable frames.")
    rate = Fraction(src_rate).limit_denominator(1_000_000)
    last_second = math.floor(Fraction(total - 1) / rate)
    last_start = math.ceil(last_second * rate)
    span = total - last_start
    plan = []
    for i in range(num_frames):
        k = math.floor(Fraction(2 * i + 1, 2 * fps) * rate)
        if k >= total:
            k = last_start + (k - last_start) % span
        plan.append(k)
    return plan


def _video_rate(stream: Any, path: Path) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise DataError(f"Video '{path}' declares no frame rate; cannot place 1-fps samples.")
    return Fraction(rate)


def decode_planned_frames(path: Path, fps: int, num_frames: int) -> list[Any]:
    """Decode one video once and return the PIL images of :func:`frame_plan`'s frames.

    The clip length is only known at the end of the stream (FLV headers carry no frame
    count), so frames are kept on the way: those at the direct sample times, plus a rolling
    buffer of the current second for the wrap-around of short clips.
    """
    import av

    wanted: set[int] = set()
    kept: dict[int, Any] = {}
    window: dict[int, Any] = {}
    window_second = -1
    total = 0
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise DataError(f"'{path}' holds no video stream.")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = _video_rate(stream, path)
        wanted = {math.floor(Fraction(2 * i + 1, 2 * fps) * rate) for i in range(num_frames)}
        for k, frame in enumerate(container.decode(stream)):
            second = math.floor(k / rate)
            if second != window_second:
                window, window_second = {}, second
            window[k] = frame
            if k in wanted:
                kept[k] = frame
            total = k + 1
    plan = frame_plan(total, rate, fps, num_frames)
    return [(kept[k] if k in kept else window[k]).to_image() for k in plan]


def _frame_folder_done(folder: Path, num_frames: int) -> bool:
    return folder.is_dir() and len(list(folder.glob("frame_*.jpg"))) >= num_frames


def extract_frames(
    video: Path, folder: Path, fps: int, num_frames: int, quality: int, overwrite: bool
) -> str:
    """Write ``frame_00001.jpg`` ... into ``folder``; returns 'ok' or 'skipped' (already there).

    The folder appears atomically (written as ``<folder>.partial`` and renamed), so an
    interrupted run never leaves a half folder that a loader would accept.
    """
    if not overwrite and _frame_folder_done(folder, num_frames):
        return "skipped"
    images = decode_planned_frames(video, fps, num_frames)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i, img in enumerate(images):
        img.convert("RGB").save(tmp / f"frame_{i + 1:05d}.jpg", format="JPEG", quality=quality)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return "ok"


# The frame extractors OGM-GE has published for CREMA-D, by the name ``prepare cremad`` takes.
FRAME_EXTRACTORS: dict[str, str] = {
    "per_second": "OGM-GE's current data/CREMAD/video_preprocessing.py: in every second "
    "(int(frame rate) source frames) keep fps of them, int(rate / fps) apart from the second's "
    "first, full resolution, named by source index {index:05d}.jpg (00000.jpg, 00030.jpg, ...)",
    "ten_frames": "OGM-GE's earlier video_to_frame.py: round(seconds * fps) frames sampled at "
    "(i + 0.5) / fps s, wrapping into the last second of short clips, named frame_00001.jpg ...",
}


def per_second_plan(total: int, rate: int, fps: int) -> list[int]:
    """Source frame indices (0-based) that OGM-GE's current CREMA-D extractor saves.

    It counts frames, restarts a within-second counter j every ``rate`` frames (``rate`` =
    the integer part of the declared frame rate, as ``int(cv2.CAP_PROP_FPS)``) and keeps a
    frame when ``j % step == 0 and j < step * fps`` with ``step = rate // fps``: at 1 fps
    and 30 fps the frames 0, 30, 60, ... -- one per started second, so a 2.5 s clip gives 3.
    """
    step = _per_second_step(rate, fps)
    return [k for k in range(total) if (k % rate) % step == 0 and (k % rate) < step * fps]


def _per_second_step(rate: int, fps: int) -> int:
    if rate < 1:
        raise DataError(f"The video declares a frame rate of {rate} frames per second.")
    step = rate // fps
    if step < 1:
        raise ConfigError(f"fps={fps} is more than the video's {rate} frames per second.")
    return step


def extract_frames_per_second(video: Path, folder: Path, fps: int, quality: int, overwrite: bool) -> str:
    """Write the frames of :func:`per_second_plan` as ``{index:05d}.jpg`` into ``folder``;
    returns 'ok' or 'skipped' (already there: the folder holds ``00000.jpg``).

    Decoded once with PyAV, frames kept on the way (the plan needs no clip length); the
    folder appears atomically, as in :func:`extract_frames`.
    """
    import av

    if not overwrite and (folder / "00000.jpg").is_file():
        return "skipped"
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    saved = 0
    with av.open(str(video)) as container:
        if not container.streams.video:
            raise DataError(f"'{video}' holds no video stream.")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.guessed_rate or stream.average_rate or stream.base_rate
        if not rate:
            raise DataError(f"Video '{video}' declares no frame rate; cannot keep frames per second.")
        whole = int(Fraction(rate))  # OpenCV's CAP_PROP_FPS, truncated as int() does
        step = _per_second_step(whole, fps)
        for k, frame in enumerate(container.decode(stream)):
            if (k % whole) % step == 0 and (k % whole) < step * fps:  # per_second_plan's rule
                frame.to_image().convert("RGB").save(tmp / f"{k:05d}.jpg", format="JPEG", quality=quality)
                saved += 1
    if not saved:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"'{video}' holds no decodable frames.")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return "ok"


def frames_folder_name(fps: int) -> str:
    """'Image-01-FPS' for 1 fps: the folder name the loaders read ("01" = fps, two digits)."""
    return f"Image-{fps:02d}-FPS"


def _check_frame_options(fps: Any, seconds: Any, quality: Any) -> tuple[int, int, int]:
    fps_i = int(fps)
    if fps_i < 1 or fps_i != fps:
        raise ConfigError(f"fps must be a positive whole number (frames per second), got {fps}.")
    num = int(round(float(seconds) * fps_i))
    if num < 1:
        raise ConfigError(f"seconds * fps must give at least one frame, got seconds={seconds}.")
    q = int(quality)
    if not 1 <= q <= 100:
        raise ConfigError(f"jpeg_quality must be in 1..100, got {quality}.")
    return fps_i, num, q


# ------------------------------------------------------------------------ audio extraction


def decode_audio(path: Path, sample_rate: int) -> np.ndarray:
    """A video's first audio stream as mono float32 at ``sample_rate``, resampled as librosa.

    FFmpeg decodes at the stream's own rate (its swresample only converts the sample format);
    the channels are averaged (the channel mean, as ``librosa.load(mono=True)``, rather than
    FFmpeg's downmix matrix, so the levels match the field's loaders) and the rate is then
    changed with :func:`mmbalance.media.soxr_resample` -- soxr HQ with librosa's length fix,
    what ``librosa.load(sr=sample_rate)`` would do to the same audio.
    """
    import av

    from mmbalance.media import soxr_resample

    chunks: list[np.ndarray] = []
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise DataError(f"'{path}' holds no audio stream.")
        stream = container.streams.audio[0]
        native = int(stream.rate or stream.sample_rate or 0)
        if native <= 0:
            raise DataError(f"'{path}' has an audio stream without a sample rate.")
        resampler = av.AudioResampler(format="fltp", rate=native)
        for frame in container.decode(stream):
            chunks += [f.to_ndarray() for f in resampler.resample(frame)]
        chunks += [f.to_ndarray() for f in resampler.resample(None)]
    if not chunks:
        raise DataError(f"'{path}' has an audio stream but no decodable samples.")
    mono = np.concatenate(chunks, axis=1).mean(axis=0).astype(np.float32)
    return soxr_resample(mono, native, int(sample_rate))


def write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM mono WAV, written to a temporary name then renamed."""
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    sf.write(str(tmp), np.clip(samples, -1.0, 1.0), int(sample_rate), subtype="PCM_16", format="WAV")
    os.replace(tmp, path)
