"""``mmbalance prepare``: one-time conversion of a raw paper release into a loader layout.

The dataset plugins read the layouts the field's code reads (reference/datasets.md). Some of
those layouts are derived from the raw releases by scripts that run once (frame extraction,
audio extraction, optical flow, fbank features); this module is those scripts, written with
PyAV (FFmpeg) instead of OpenCV / moviepy / ffmpeg subprocesses:

* ``cremad``: raw CREMA-D (``VideoFlash/*.flv`` + ``AudioWAV/*.wav``) -> Layout B
  (``annotations/{train,test}.csv``, ``AudioWAV/``, ``Image-01-FPS/<clip>/frame_00001.jpg``).
* ``ksounds``: a folder of Kinetics clips + ``youtube_id,label`` csvs -> Layout C
  (``annotations/*.csv``, ``{split}_wav/<id>.wav``, ``{split}_img/Image-01-FPS/<id>/``).
* ``nvgesture``: the NVIDIA release -> renamed ``*_correct_v2.lst`` lists, the AVIs verified,
  and dense optical flow ``Video_data/flow_data/{split}/<line>.npy`` (256, 256, 2, T) computed
  with our own pyramidal Horn-Schunck (the official flow algorithm is unknown, iprm.md 10.3).
* ``iemocap``: IEMOCAP sentence WAVs + MLA's split lists -> MLA Layout A (kaldi fbank
  ``.npy``, BERT token ``.npy`` when a local vocab is given, 256x256 faces when face crops
  are given).

``sarcasm`` needs no preparation (its loader reads the original release as distributed), so
it is listed in :data:`NOT_OFFERED` with the reason instead of being half-done here.

Every preparer is resumable: outputs are written to a temporary name and renamed into place,
finished outputs are skipped unless ``overwrite=True``, and a clip that cannot be decoded is
reported in the summary instead of stopping a 7,000-clip run. The summary (also written to
``<out>/mmbalance_prepare.json``) says what was written, skipped and why anything failed.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from mmbalance.errors import ConfigError, DataError, MMBalanceError, did_you_mean

CREMAD_EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".flv", ".mov", ".m4v")
LINK_MODES = ("copy", "symlink", "hardlink")
SUMMARY_FILE = "mmbalance_prepare.json"
MAX_REPORTED_FAILURES = 20
IEMOCAP_LABELS = ("Neutral", "Angry", "Sad", "Happy")  # MLA's stat_iemo.txt order
IEMOCAP_SEP = " [split|sign] "

RAW_LAYOUTS: dict[str, str] = {
    "cremad": (
        "RAW = the CREMA-D release (CheyneyComputerScience/CREMA-D, media pulled from Git LFS): "
        "RAW/VideoFlash/<clip>.flv and RAW/AudioWAV/<clip>.wav, clip = "
        "<actor>_<sentence>_<EMO>_<level>. Writes Layout B into OUT: Image-01-FPS/<clip>/"
        "frame_00001.jpg... (fps frames per second, `seconds` worth, OGM-GE sampling), "
        "AudioWAV/ (copied or linked) and annotations/train.csv + test.csv ('clip,EMO'). Pass "
        "the paper's OGM-GE split with --set train_csv=.../train.csv --set test_csv=.../test.csv; "
        "without them a stratified random split (seed, test_fraction) is written."
    ),
    "ksounds": (
        "RAW = a folder (searched recursively) of Kinetics clips named <youtube_id>.<ext> "
        "(mp4, mkv, webm, avi, ...; <youtube_id>_<start>_<end>.<ext> is matched too) plus "
        "split csvs of youtube_id,label (header optional): RAW/train.csv, RAW/test.csv and "
        "optionally RAW/valid.csv (or under RAW/annotations/, or given with --set "
        "train_csv=... test_csv=... valid_csv=...). Writes Layout C into OUT: "
        "annotations/{train,test[,valid]}.csv (header youtube_id,label), "
        "{split}_img/Image-01-FPS/<id>/frame_00001.jpg... and {split}_wav/<id>.wav (mono, "
        "sample_rate Hz, 16-bit PCM)."
    ),
    "nvgesture": (
        "RAW = the NVIDIA release: RAW/nvgesture_train_correct_cvpr2016_v2.lst, "
        "RAW/nvgesture_test_correct_cvpr2016_v2.lst and RAW/Video_data/class_XX/subjectY_rZ/"
        "sk_color.avi + sk_depth.avi. Writes into OUT (may equal RAW): "
        "nvgesture_{train,test}_correct_v2.lst, Video_data/ (class folders linked or the two "
        "AVIs copied, unless OUT is RAW) and Video_data/flow_data/{train,test}/<line>.npy, "
        "(256, 256, 2, T) float32 optical flow from our own Horn-Schunck (set flow=false to "
        "supply your own flow instead)."
    ),
    "iemocap": (
        "RAW = the IEMOCAP release (Session1..5/sentences/wav/<dialog>/<utt>.wav, searched "
        "recursively) plus MLA's lists RAW/my_train_iemo.txt and RAW/my_test_iemo.txt (or "
        "--set train_list=... test_list=...; lines '<utt>.mp4 [split|sign] <text> [split|sign] "
        "<Label>'). Writes MLA Layout A into OUT: the lists, stat_iemo.txt, "
        "audio/{split}_fbank/<utt>.npy (1024, 128); text_token/{split}_token/<utt>_token.npy "
        "and _pm.npy when --set vocab=/path/to/bert-base-uncased/vocab.txt is given; "
        "visual/{split}_imgs/<utt>/*.jpg (256x256) when --set faces_dir=DIR holds one folder "
        "of face crops per utterance (MLA's face detector is not published)."
    ),
}

NOT_OFFERED: dict[str, str] = {
    "sarcasm": (
        "Dataset 'sarcasm' needs no preparation: its loader reads the original release "
        "(text/train.txt, text/valid2.txt, text/test2.txt with images/ or dataset_image/) as "
        "distributed and applies the authors' keyword filter itself. Point --data-root at the "
        "release folder and run."
    ),
}


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
    """A video's first audio stream as mono float32 at ``sample_rate`` (FFmpeg's swresample).

    Channels are averaged after resampling (the channel mean, as ``librosa.load(mono=True)``),
    rather than FFmpeg's downmix matrix, so the levels match the field's loaders.
    """
    import av

    chunks: list[np.ndarray] = []
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise DataError(f"'{path}' holds no audio stream.")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp", rate=int(sample_rate))
        for frame in container.decode(stream):
            chunks += [f.to_ndarray() for f in resampler.resample(frame)]
        chunks += [f.to_ndarray() for f in resampler.resample(None)]
    if not chunks:
        raise DataError(f"'{path}' has an audio stream but no decodable samples.")
    return np.concatenate(chunks, axis=1).mean(axis=0).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM mono WAV, written to a temporary name then renamed."""
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    sf.write(str(tmp), np.clip(samples, -1.0, 1.0), int(sample_rate), subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------- CREMA-D


def _cremad_label(clip: str) -> str:
    parts = clip.split("_")
    if len(parts) != 4 or parts[2] not in CREMAD_EMOTIONS:
        raise DataError(
            f"'{clip}' is not a CREMA-D clip id (<actor>_<sentence>_<EMO>_<level>, EMO one of "
            f"{', '.join(CREMAD_EMOTIONS)})."
        )
    return parts[2]


def read_cremad_split(path: Path) -> list[tuple[str, str]]:
    """OGM-GE's 'clip,EMO' csv (no header; BOM and CRLF tolerated) as (clip, EMO) pairs."""
    pairs = []
    for n, row in enumerate(read_rows(path), 1):
        if len(row) < 2 or row[1] not in CREMAD_EMOTIONS:
            raise DataError(
                f"Line {n} of '{path}' is {','.join(row)!r}; expected 'clip_id,EMO' with EMO one "
                f"of {', '.join(CREMAD_EMOTIONS)} (OGM-GE's data/CREMAD/train.csv format)."
            )
        pairs.append((row[0], row[1]))
    return pairs


@dataclass(frozen=True)
class FrameJob:
    """One clip's frame extraction (picklable for the worker pool)."""

    item: str
    video: Path
    folder: Path
    fps: int
    num_frames: int
    quality: int
    overwrite: bool


def run_frame_job(job: FrameJob) -> tuple[str, str, str]:
    try:
        status = extract_frames(
            job.video, job.folder, job.fps, job.num_frames, job.quality, job.overwrite
        )
    except Exception as exc:  # one corrupt clip must not stop the run; reported instead
        return job.item, "failed", f"{type(exc).__name__}: {exc}"
    return job.item, status, ""


def _cremad_clips(raw: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    video_dir, audio_dir = raw / "VideoFlash", raw / "AudioWAV"
    missing = [f"{d.name}/" for d in (video_dir, audio_dir) if not d.is_dir()]
    if missing:
        raise DataError(
            f"Raw folder '{raw}' lacks {' and '.join(missing)}. Expected the CREMA-D release: "
            f"{RAW_LAYOUTS['cremad']}"
        )
    videos = {p.stem: p for p in video_dir.glob("*.flv")}
    wavs = {p.stem: p for p in audio_dir.glob("*.wav")}
    if not videos or not wavs:
        raise DataError(
            f"Raw folder '{raw}' has {len(videos)} VideoFlash/*.flv and {len(wavs)} "
            f"AudioWAV/*.wav files; both are needed. If the files are Git LFS pointers, run "
            f"'git lfs pull' in the CREMA-D checkout first."
        )
    return videos, wavs


def _cremad_splits(
    clips: Sequence[str], train_csv: str | None, test_csv: str | None, test_fraction: float, seed: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]], str]:
    if (train_csv is None) != (test_csv is None):
        raise ConfigError("Pass both train_csv and test_csv (OGM-GE's split files), or neither.")
    if train_csv is not None and test_csv is not None:
        train, test = read_cremad_split(Path(train_csv)), read_cremad_split(Path(test_csv))
        return train, test, f"user split files {train_csv} and {test_csv}"
    labels = [_cremad_label(c) for c in clips]
    tr, te = stratified_split(clips, labels, float(test_fraction), int(seed))
    rule = (
        f"stratified random split: round({test_fraction} x clips per emotion) to test, "
        f"numpy default_rng({seed}); NOT the paper's OGM-GE split"
    )
    return [(c, _cremad_label(c)) for c in tr], [(c, _cremad_label(c)) for c in te], rule


def prepare_cremad(
    raw: Path,
    out: Path,
    *,
    fps: int = 1,
    seconds: float = 10.0,
    train_csv: str | None = None,
    test_csv: str | None = None,
    test_fraction: float = 0.1,
    seed: int = 0,
    audio: str = "copy",
    jpeg_quality: int = 95,
    overwrite: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> Report:
    """Raw CREMA-D -> Layout B (IPRM / njustkmg; datasets.md section 1, iprm.md 10.1).

    Raw layout: ``RAW/VideoFlash/<clip>.flv`` and ``RAW/AudioWAV/<clip>.wav``.
    Writes ``OUT/Image-{fps:02d}-FPS/<clip>/frame_00001.jpg ...`` (``round(seconds * fps)``
    frames per clip, sampled as OGM-GE's extractor does: see :func:`frame_plan`; full
    resolution), ``OUT/AudioWAV/<clip>.wav`` (``audio`` = copy, symlink or hardlink; nothing
    is done when OUT is RAW) and ``OUT/annotations/{train,test}.csv`` ('clip,EMO', no header).

    Split: ``train_csv`` / ``test_csv`` = OGM-GE's ``data/CREMAD/{train,test}.csv`` (the
    paper's 6698 / 744 split; rows are copied as given, clips missing from RAW are reported).
    Without them: :func:`stratified_split` with ``test_fraction`` and ``seed`` over the clips
    that have both a video and a wav. ``workers`` > 1 extracts frames in that many processes.
    """
    raw, out = Path(raw), Path(out)
    link = _check_link(str(audio))
    fps_i, num_frames, quality = _check_frame_options(fps, seconds, jpeg_quality)
    videos, wavs = _cremad_clips(raw)
    both = sorted(set(videos) & set(wavs))
    report = Report("cremad", raw, out)
    for name, only in (("videos without a wav", set(videos) - set(wavs)), ("wavs without a video", set(wavs) - set(videos))):
        if only:
            report.notes.append(f"{len(only)} {name} are left out (e.g. {sorted(only)[:3]})")
    train, test, rule = _cremad_splits(both, train_csv, test_csv, test_fraction, seed)
    report.notes.append(f"split: {rule}")
    listed = [c for c, _ in train + test]
    absent = [c for c in listed if c not in videos or c not in wavs]
    if absent:
        report.notes.append(
            f"{len(absent)} clips of the split lack a video or wav in RAW (e.g. {absent[:3]}); "
            f"their rows are kept and the loader will report them"
        )
    todo = [c for c in dict.fromkeys(listed) if c in videos and c in wavs]
    if not todo:
        raise DataError(f"None of the {len(listed)} clips of the split has both files in '{raw}'.")
    frame_root = out / frames_folder_name(fps_i)
    jobs = [FrameJob(c, videos[c], frame_root / c, fps_i, num_frames, quality, bool(overwrite)) for c in todo]
    _record(report, _run_jobs(run_frame_job, jobs, int(workers), "cremad frames", progress), "frame folders")
    _place_audio(report, todo, wavs, out / "AudioWAV", link, bool(overwrite))
    write_csv(out / "annotations" / "train.csv", train)
    write_csv(out / "annotations" / "test.csv", test)
    report.written["train rows"], report.written["test rows"] = len(train), len(test)
    report.paths.update(
        frames=str(frame_root), audio=str(out / "AudioWAV"), annotations=str(out / "annotations")
    )
    report.notes.append(f"{num_frames} frames per clip at {fps_i} fps")
    return report


def _place_audio(
    report: Report, clips: Sequence[str], wavs: Mapping[str, Path], dst: Path, link: str, overwrite: bool
) -> None:
    if clips and _same_path(wavs[clips[0]].parent, dst):
        report.notes.append("AudioWAV/ is used in place (OUT is the raw folder)")
        return
    for c in clips:
        target = dst / f"{c}.wav"
        if target.exists() and not overwrite:
            report.skipped["wavs"] += 1
            continue
        place_file(wavs[c], target, link)
        report.written["wavs"] += 1


# ------------------------------------------------------------------------ Kinetics-Sounds


def read_ks_split(path: Path) -> list[tuple[str, str]]:
    """(youtube_id, label) rows: header 'youtube_id,label' (any column order) or headerless.

    A headerless file is read as 'id,label'; Kinetics' own csvs (label, youtube_id,
    time_start, ...) work through their header.
    """
    rows = read_rows(path)
    if not rows:
        raise DataError(f"Split file '{path}' is empty.")
    head = [c.lower() for c in rows[0]]
    if "youtube_id" in head and "label" in head:
        i, j = head.index("youtube_id"), head.index("label")
        body = rows[1:]
    else:
        i, j, body = 0, -1, rows
    pairs = []
    for n, row in enumerate(body, 2 if body is not rows else 1):
        if len(row) < 2 or not row[i]:
            raise DataError(f"Line {n} of '{path}' is {row!r}; expected 'youtube_id,label'.")
        pairs.append((row[i], row[j]))
    return pairs


def index_videos(raw: Path) -> dict[str, Path]:
    """Every video under ``raw`` (recursively) by file stem; the first found wins."""
    found: dict[str, Path] = {}
    for p in sorted(raw.rglob("*")):
        if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file():
            found.setdefault(p.stem, p)
    return found


def find_clip(youtube_id: str, videos: Mapping[str, Path], by_prefix: Mapping[str, list[str]]) -> Path | None:
    """The clip named exactly ``youtube_id``, else the one named ``<id>_<start>_<end>``."""
    if youtube_id in videos:
        return videos[youtube_id]
    stems = by_prefix.get(youtube_id, [])
    return videos[stems[0]] if len(stems) == 1 else None


_KINETICS_STEM = re.compile(r"^(?P<id>.+)_\d+_\d+$")


def _prefix_index(videos: Mapping[str, Path]) -> dict[str, list[str]]:
    index: dict[str, list[str]] = {}
    for stem in videos:
        m = _KINETICS_STEM.match(stem)
        if m:
            index.setdefault(m.group("id"), []).append(stem)
    return index


@dataclass(frozen=True)
class ClipJob:
    """One Kinetics clip: frames and mono WAV (picklable for the worker pool)."""

    item: str
    video: Path
    folder: Path
    wav: Path
    fps: int
    num_frames: int
    quality: int
    sample_rate: int
    overwrite: bool


def run_clip_job(job: ClipJob) -> tuple[str, str, str]:
    try:
        status = extract_frames(
            job.video, job.folder, job.fps, job.num_frames, job.quality, job.overwrite
        )
        if job.overwrite or not job.wav.is_file():
            write_wav(job.wav, decode_audio(job.video, job.sample_rate), job.sample_rate)
            status = "ok"
    except Exception as exc:  # reported per clip, the run goes on
        return job.item, "failed", f"{type(exc).__name__}: {exc}"
    return job.item, status, ""


def _ks_split_files(raw: Path, given: Mapping[str, str | None]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for split, path in given.items():
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise DataError(f"The {split} split file '{p}' does not exist.")
            files[split] = p
            continue
        for cand in (raw / f"{split}.csv", raw / "annotations" / f"{split}.csv"):
            if cand.is_file():
                files[split] = cand
                break
    missing = [s for s in ("train", "test") if s not in files]
    if missing:
        raise DataError(
            f"No {' / '.join(missing)} split csv found for Kinetics-Sounds in '{raw}'. Expected: "
            f"{RAW_LAYOUTS['ksounds']}"
        )
    return files


def prepare_ksounds(
    raw: Path,
    out: Path,
    *,
    train_csv: str | None = None,
    test_csv: str | None = None,
    valid_csv: str | None = None,
    fps: int = 1,
    seconds: float = 10.0,
    sample_rate: int = 35400,
    jpeg_quality: int = 95,
    overwrite: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> Report:
    """Kinetics clips -> Layout C (njustkmg / IGM; datasets.md section 2, iprm.md 10.2).

    Raw layout: videos ``<youtube_id>.<ext>`` anywhere under RAW (or Kinetics-style
    ``<youtube_id>_<start>_<end>.<ext>``, matched when unique) and split csvs of
    ``youtube_id,label`` (``train_csv`` / ``test_csv`` / ``valid_csv``, default
    ``RAW/{split}.csv`` or ``RAW/annotations/{split}.csv``; valid is optional).
    Writes ``OUT/annotations/{split}.csv`` (header ``youtube_id,label``, labels as given),
    ``OUT/{split}_img/Image-{fps:02d}-FPS/<id>/frame_00001.jpg ...`` (``round(seconds * fps)``
    frames, OGM-GE sampling) and ``OUT/{split}_wav/<id>.wav``: the first audio stream, mono
    (channel mean), resampled by FFmpeg to ``sample_rate`` (default 35,400 Hz, the rate the
    lab's KS loader reads, so loading does not resample again), 16-bit PCM.
    """
    raw, out = Path(raw), Path(out)
    fps_i, num_frames, quality = _check_frame_options(fps, seconds, jpeg_quality)
    files = _ks_split_files(raw, {"train": train_csv, "test": test_csv, "valid": valid_csv})
    videos = index_videos(raw)
    if not videos:
        raise DataError(f"No video files ({', '.join(VIDEO_EXTENSIONS)}) under '{raw}'. Expected: {RAW_LAYOUTS['ksounds']}")
    prefixes = _prefix_index(videos)
    report = Report("ksounds", raw, out)
    jobs: list[ClipJob] = []
    for split, path in files.items():
        rows = read_ks_split(path)
        write_csv(out / "annotations" / f"{split}.csv", rows, header=("youtube_id", "label"))
        report.written[f"{split} rows"] = len(rows)
        lost = []
        for yid, _ in rows:
            video = find_clip(yid, videos, prefixes)
            if video is None:
                lost.append(yid)
                continue
            folder = out / f"{split}_img" / frames_folder_name(fps_i) / yid
            jobs.append(ClipJob(f"{split}/{yid}", video, folder, out / f"{split}_wav" / f"{yid}.wav", fps_i, num_frames, quality, int(sample_rate), bool(overwrite)))
        if lost:
            report.notes.append(f"{split}: {len(lost)} listed clips have no video under RAW (e.g. {lost[:3]})")
    if not jobs:
        raise DataError(f"None of the listed clips has a video under '{raw}' (looked for <youtube_id>.<ext>).")
    _record(report, _run_jobs(run_clip_job, jobs, int(workers), "ksounds clips", progress), "clips")
    report.paths.update(annotations=str(out / "annotations"), **{s: str(out / f"{s}_img") for s in files})
    report.notes.append(f"{num_frames} frames per clip at {fps_i} fps; audio mono {sample_rate} Hz")
    return report


# ------------------------------------------------------------------------------ NVGesture


@dataclass(frozen=True)
class GestureClip:
    """One line of an NVGesture list: where its AVIs are and its colour frame range."""

    line: int
    folder: str  # relative to the dataset root, e.g. Video_data/class_01/subject3_r0
    color: tuple[str, int, int]
    depth: tuple[str, int, int]
    label: int


def parse_nvgesture_line(text: str, where: str) -> GestureClip:
    """``path:./Video_data/... depth:sk_depth:146:226 color:sk_color:146:226 ... label:1``."""
    fields: dict[str, list[str]] = {}
    for token in text.split():
        key, _, rest = token.partition(":")
        fields[key] = rest.split(":")
    try:
        folder = fields["path"][0]
        color = (fields["color"][0], int(fields["color"][1]), int(fields["color"][2]))
        depth = (fields["depth"][0], int(fields["depth"][1]), int(fields["depth"][2]))
        label = int(fields["label"][0])
    except (KeyError, IndexError, ValueError) as exc:
        raise DataError(
            f"{where} is not an NVGesture list line ('path:./Video_data/... depth:sk_depth:S:E "
            f"color:sk_color:S:E ... label:N'): {text.strip()!r}"
        ) from exc
    folder = folder[2:] if folder.startswith("./") else folder
    return GestureClip(0, folder, color, depth, label)


def read_nvgesture_list(path: Path) -> list[GestureClip]:
    lines = [ln for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
    clips = []
    for i, ln in enumerate(lines):
        c = parse_nvgesture_line(ln, f"Line {i + 1} of '{path}'")
        clips.append(GestureClip(i, c.folder, c.color, c.depth, c.label))
    return clips


NVGESTURE_LISTS = ("nvgesture_{split}_correct_cvpr2016_v2.lst", "nvgesture_{split}_correct_v2.lst")


def _nvgesture_lists(raw: Path) -> dict[str, Path]:
    found = {}
    for split in ("train", "test"):
        for pattern in NVGESTURE_LISTS:
            p = raw / pattern.format(split=split)
            if p.is_file():
                found[split] = p
                break
    if len(found) < 2 or not (raw / "Video_data").is_dir():
        raise DataError(
            f"Raw folder '{raw}' is not the NVGesture release (lists or Video_data/ missing). "
            f"Expected: {RAW_LAYOUTS['nvgesture']}"
        )
    return found


def _avi(root: Path, clip: GestureClip, sensor: tuple[str, int, int]) -> Path:
    return root / clip.folder / f"{sensor[0]}.avi"


def _link_video_data(raw: Path, out: Path, clips: Sequence[GestureClip], link: str, report: Report) -> None:
    """Make OUT/Video_data hold the AVIs without touching RAW (flow_data is written there)."""
    if _same_path(raw, out):
        return
    dst = out / "Video_data"
    dst.mkdir(parents=True, exist_ok=True)
    if link == "symlink":
        for src in sorted((raw / "Video_data").iterdir()):
            if src.is_dir() and src.name != "flow_data" and not (dst / src.name).exists():
                (dst / src.name).symlink_to(src.resolve(), target_is_directory=True)
                report.written["linked class folders"] += 1
        return
    for clip in clips:
        for sensor in (clip.color, clip.depth):
            src, target = _avi(raw, clip, sensor), _avi(out, clip, sensor)
            if src.is_file() and not target.exists():
                place_file(src, target, link)
                report.written["AVIs placed"] += 1


def prepare_nvgesture(
    raw: Path,
    out: Path,
    *,
    flow: bool = True,
    link: str = "symlink",
    strict: bool = True,
    frame_size: int = 256,
    alpha: float = 0.03,
    iterations: int = 30,
    warps: int = 2,
    levels: int = 4,
    sigma: float = 1.0,
    pad_flow: bool = True,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> Report:
    """The NVIDIA release -> what the NVGesture loader reads (datasets.md 3, iprm.md 10.3).

    Raw layout: ``RAW/nvgesture_{train,test}_correct_cvpr2016_v2.lst`` (or the already
    renamed ``*_correct_v2.lst``) and ``RAW/Video_data/class_XX/subjectY_rZ/{sk_color,
    sk_depth}.avi``. Writes ``OUT/nvgesture_{split}_correct_v2.lst`` (byte copies), makes
    ``OUT/Video_data`` hold the videos when OUT is not RAW (``link=symlink`` links each class
    folder; ``copy`` / ``hardlink`` place only the two AVIs of every listed clip), checks that
    every listed AVI exists (``strict``: a missing one is an error), and with ``flow`` writes
    ``OUT/Video_data/flow_data/{split}/{line}.npy``.

    Flow: our own pyramidal Horn-Schunck (:func:`horn_schunck`) between consecutive grey
    frames of ``sk_color`` over the annotated range, read and resized to ``frame_size``
    exactly as the loader reads RGB. Stored (frame_size, frame_size, 2, T) float32, x then y,
    in pixels. T = number of frames (80) with ``pad_flow`` (the last pair's flow repeated, so
    flow aligns with RGB and depth) else frames - 1. The official flow algorithm is unknown
    (probably TV-L1), so models trained on this flow are not the paper's; set ``flow=false``
    to supply your own. ``device``: cpu, cuda or auto. Cost: 79 frame pairs of 256 x 256 per
    clip take seconds on a GPU and tens of seconds per CPU core, so the 1,532 clips want a GPU
    (or a night); finished files are skipped on a rerun.
    """
    raw, out = Path(raw), Path(out)
    link = _check_link(str(link))
    lists = _nvgesture_lists(raw)
    report = Report("nvgesture", raw, out)
    clips = {s: read_nvgesture_list(p) for s, p in lists.items()}
    missing = [
        str(_avi(raw, c, s).relative_to(raw))
        for split in clips for c in clips[split] for s in (c.color, c.depth)
        if not _avi(raw, c, s).is_file()
    ]
    if missing:
        msg = f"{len(missing)} listed AVIs are missing under '{raw}' (e.g. {missing[:3]})"
        if strict:
            raise DataError(f"{msg}. Complete Video_data from the NVIDIA release, or pass --set strict=false to go on without them.")
        report.notes.append(msg)
    for split, path in lists.items():
        target = out / NVGESTURE_LISTS[1].format(split=split)
        if not _same_path(path, target):
            place_file(path, target, "copy")
        report.written["lists"] += 1
        report.written[f"{split} clips listed"] = len(clips[split])
    _link_video_data(raw, out, [c for cs in clips.values() for c in cs], link, report)
    report.paths["lists"] = str(out)
    if not flow:
        report.notes.append("flow=false: supply Video_data/flow_data/{train,test}/<line>.npy yourself")
        return report
    settings = FlowSettings(float(alpha), int(iterations), int(warps), int(levels), float(sigma))
    dev = _torch_device(str(device))
    for split, split_clips in clips.items():
        folder = out / "Video_data" / "flow_data" / split
        todo = [c for c in split_clips if _avi(raw, c, c.color).is_file()]
        for c in _progress(todo, len(todo), f"nvgesture {split} flow", progress):
            target = folder / f"{c.line}.npy"
            if target.is_file() and not overwrite:
                report.skipped["flow files"] += 1
                continue
            try:
                arr = clip_flow(_avi(raw, c, c.color), c.color[1], c.color[2], int(frame_size), settings, bool(pad_flow), dev)
            except Exception as exc:  # reported per clip
                report.fail(f"{split}/{c.line}", f"{type(exc).__name__}: {exc}")
                continue
            _save_npy(target, arr)
            report.written["flow files"] += 1
    report.paths["flow"] = str(out / "Video_data" / "flow_data")
    report.notes.append(
        f"flow = mmbalance's pyramidal Horn-Schunck ({settings}), not the paper's (unknown) method"
    )
    return report


# -------------------------------------------------------------------- Horn-Schunck flow


@dataclass(frozen=True)
class FlowSettings:
    """Horn-Schunck parameters; intensities are in [0, 1], so ``alpha`` is on that scale."""

    alpha: float = 0.03
    iterations: int = 30
    warps: int = 2
    levels: int = 4
    sigma: float = 1.0


def _torch_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device='{name}' was asked for, but no CUDA device is visible. Use device=cpu.")
    return torch.device(name)


def _gaussian_blur(x: Any, sigma: float) -> Any:
    """Separable Gaussian blur of (B, 1, H, W) with replicate borders.

    Written as weighted sums of shifted slices (a 7-tap kernel at sigma 1) rather than
    ``conv2d``: as fast on a free machine and far faster on an oversubscribed CPU.
    """
    import torch

    if sigma <= 0:
        return x
    r = max(1, math.ceil(2.5 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    h, w = x.shape[-2:]
    p = _replicate_pad(x, r, 0)
    x = sum(k[j] * p[..., :, j : j + w] for j in range(2 * r + 1))
    p = _replicate_pad(x, 0, r)
    return sum(k[j] * p[..., j : j + h, :] for j in range(2 * r + 1))


def _replicate_pad(x: Any, rx: int, ry: int) -> Any:
    """Edge padding by clamped indexing.

    ``F.pad(mode="replicate")`` is orders of magnitude slower on CPUs shared with other
    processes (its OpenMP loop stalls when the cores are oversubscribed); indexing is not.
    """
    import torch

    h, w = x.shape[-2:]
    if rx:
        cols = torch.arange(-rx, w + rx, device=x.device).clamp_(0, w - 1)
        x = x.index_select(-1, cols)
    if ry:
        rows = torch.arange(-ry, h + ry, device=x.device).clamp_(0, h - 1)
        x = x.index_select(-2, rows)
    return x


def _gradients(x: Any) -> tuple[Any, Any]:
    """Central differences with replicate borders."""
    p = _replicate_pad(x, 1, 1)
    return (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]) / 2, (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]) / 2


def _neighbour_mean(f: Any) -> Any:
    """Horn & Schunck's weighted neighbourhood average (1/6 edge, 1/12 corner neighbours)."""
    p = _replicate_pad(f, 1, 1)
    sides = p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:]
    corners = p[..., :-2, :-2] + p[..., :-2, 2:] + p[..., 2:, :-2] + p[..., 2:, 2:]
    return sides / 6 + corners / 12


def warp(image: Any, flow: Any) -> Any:
    """Sample ``image`` (B, 1, H, W) at x + flow (bilinear, borders replicated)."""
    import torch
    import torch.nn.functional as F

    _, _, h, w = image.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=image.dtype, device=image.device),
        torch.arange(w, dtype=image.dtype, device=image.device),
        indexing="ij",
    )
    gx = (xs + flow[:, 0]) * (2 / max(w - 1, 1)) - 1
    gy = (ys + flow[:, 1]) * (2 / max(h - 1, 1)) - 1
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _refine(i1: Any, i2: Any, flow: Any, s: FlowSettings) -> Any:
    """Horn-Schunck at one pyramid level, linearised around ``flow`` and re-warped ``warps`` times.

    With I2 warped by the current flow w0, the data term Ix (u - u0) + Iy (v - v0) + It = 0 is
    solved jointly with the smoothness term by HS's Jacobi iteration on the total flow.
    """
    import torch

    for _ in range(s.warps):
        i2w = warp(i2, flow)
        g1x, g1y = _gradients(i1)
        g2x, g2y = _gradients(i2w)
        ix, iy = (g1x + g2x) / 2, (g1y + g2y) / 2
        it = i2w - i1 - ix * flow[:, :1] - iy * flow[:, 1:]
        grad = torch.cat([ix, iy], dim=1)
        inv_denom = 1.0 / (s.alpha**2 + ix**2 + iy**2)
        for _ in range(s.iterations):
            mean = _neighbour_mean(flow)
            r = (ix * mean[:, :1] + iy * mean[:, 1:] + it) * inv_denom
            flow = mean - grad * r
    return flow


def _pyramid(x: Any, levels: int) -> list[Any]:
    """Blur-and-halve levels, finest first; stops before a side drops below 16 pixels."""
    out = [x]
    while len(out) < levels and min(out[-1].shape[-2:]) >= 32:
        y = _gaussian_blur(out[-1], 1.0)
        h, w = (y.shape[-2] // 2) * 2, (y.shape[-1] // 2) * 2
        y = y[..., :h, :w]
        out.append((y[..., 0::2, 0::2] + y[..., 1::2, 0::2] + y[..., 0::2, 1::2] + y[..., 1::2, 1::2]) / 4)
    return out


def horn_schunck(prev: Any, nxt: Any, settings: FlowSettings | None = None) -> Any:
    """Dense optical flow (B, 2, H, W) from grey frames ``prev`` to ``nxt`` (B, H, W) in [0, 1].

    Our own coarse-to-fine Horn & Schunck (1981): Gaussian pre-smoothing, an image pyramid
    (halving down to >= 16 px), and at each level HS's iteration linearised around the
    upsampled coarser flow with the second frame warped by it, so displacements of several
    pixels are recovered. Convention (as OpenCV's): prev(y, x) ~ nxt(y + v, x + u); channel 0
    is u (x, rightwards), channel 1 is v (y, downwards), in pixels.
    """
    import torch
    import torch.nn.functional as F

    s = settings or FlowSettings()
    a = _gaussian_blur(prev.unsqueeze(1).float(), s.sigma)
    b = _gaussian_blur(nxt.unsqueeze(1).float(), s.sigma)
    pa, pb = _pyramid(a, s.levels), _pyramid(b, s.levels)
    flow = torch.zeros(a.shape[0], 2, *pa[-1].shape[-2:], dtype=a.dtype, device=a.device)
    for ia, ib in zip(reversed(pa), reversed(pb), strict=True):
        if flow.shape[-2:] != ia.shape[-2:]:
            sy, sx = ia.shape[-2] / flow.shape[-2], ia.shape[-1] / flow.shape[-1]
            flow = F.interpolate(flow, size=ia.shape[-2:], mode="bilinear", align_corners=False)
            flow = torch.cat([flow[:, :1] * sx, flow[:, 1:] * sy], dim=1)
        flow = _refine(ia, ib, flow, s)
    return flow


def grey(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB (T, H, W, 3) -> float32 luma in [0, 1] (ITU-R BT.601, as OpenCV's RGB2GRAY)."""
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return (frames.astype(np.float32) @ weights) / 255.0


def clip_flow(
    video: Path, start: int, end: int, size: int, settings: FlowSettings, pad: bool, device: Any
) -> np.ndarray:
    """Flow of one clip as (size, size, 2, T) float32 -- the layout the loader reads."""
    import torch

    from mmbalance.video import read_frames

    frames = read_frames(video, start, end, size=size, order="rgb")
    g = torch.from_numpy(grey(frames)).to(device)
    if g.shape[0] < 2:
        raise DataError(f"'{video}' frames {start}:{end} give fewer than 2 frames; no flow.")
    with torch.no_grad():
        flow = horn_schunck(g[:-1], g[1:], settings)
    if pad:
        flow = torch.cat([flow, flow[-1:]], dim=0)
    return np.ascontiguousarray(flow.permute(2, 3, 1, 0).cpu().numpy().astype(np.float32))


# -------------------------------------------------------------------------------- IEMOCAP


def read_iemocap_list(path: Path) -> list[tuple[str, str, str]]:
    """MLA list lines '<utt>.mp4 [split|sign] <transcript> [split|sign] <Label>'."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(IEMOCAP_SEP)
        if len(parts) != 3 or parts[2].strip() not in IEMOCAP_LABELS:
            raise DataError(
                f"Line {n} of '{path}' is not an MLA IEMOCAP line ('<utt>.mp4{IEMOCAP_SEP}<text>"
                f"{IEMOCAP_SEP}<Label>', Label one of {', '.join(IEMOCAP_LABELS)})."
            )
        out.append((Path(parts[0].strip()).stem, parts[1], parts[2].strip()))
    return out


def iemocap_fbank(wav: Path) -> np.ndarray:
    """MLA's audio input: 16 kHz mono, mean removed, kaldi fbank 128 x 10 ms -> (1024, 128)."""
    from mmbalance.media import kaldi_fbank, load_audio

    wave = load_audio(wav, sample_rate=16000, mono=True)
    return kaldi_fbank(wave, 16000, target_frames=1024).numpy().astype(np.float32)


def iemocap_tokens(tokenizer: Any, text: str, length: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """MLA's text input: WordPiece ids without [CLS]/[SEP], padded/cut to ``length``.

    Returns int64 ids (1, length) and the float32 padding mask (1, length), 1.0 = padding.
    """
    enc = tokenizer(
        text, padding="max_length", truncation=True, max_length=length,
        add_special_tokens=False, return_tensors="np",
    )
    ids = enc["input_ids"][0].astype(np.int64)[None]
    mask = (1.0 - enc["attention_mask"][0].astype(np.float32))[None]
    return ids, mask


def _iemocap_lists(raw: Path, given: Mapping[str, str | None]) -> dict[str, Path]:
    lists = {}
    for split, path in given.items():
        p = Path(path) if path is not None else raw / f"my_{split}_iemo.txt"
        if path is None and not p.is_file() and (raw / "data" / p.name).is_file():
            p = raw / "data" / p.name
        if p.is_file():
            lists[split] = p
        elif path is not None or split != "dev":
            raise DataError(
                f"IEMOCAP {split} list '{p}' does not exist. MLA commits my_train_iemo.txt and "
                f"my_test_iemo.txt under its data/ folder; expected: {RAW_LAYOUTS['iemocap']}"
            )
    return lists


def _iemocap_faces(src: Path, dst: Path, size: int) -> int:
    """Resize every face crop of one utterance to size x size (bilinear), as MLA does."""
    from PIL import Image

    from mmbalance.media import IMAGE_EXTENSIONS

    names = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not names:
        raise DataError(f"Face folder '{src}' holds no images.")
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in names:
        with Image.open(p) as im:
            im.convert("RGB").resize((size, size), Image.BILINEAR).save(tmp / f"{p.stem}.jpg", quality=95)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return len(names)


def prepare_iemocap(
    raw: Path,
    out: Path,
    *,
    train_list: str | None = None,
    test_list: str | None = None,
    dev_list: str | None = None,
    vocab: str | None = None,
    faces_dir: str | None = None,
    face_size: int = 256,
    max_tokens: int = 256,
    overwrite: bool = False,
    progress: bool = True,
) -> Report:
    """IEMOCAP -> MLA Layout A (datasets.md 4, iprm.md 10.4); only the mechanical parts.

    Raw layout: the IEMOCAP release, whose sentence WAVs ``<utt>.wav`` are found anywhere
    under RAW (``Session*/sentences/wav/<dialog>/<utt>.wav``), and MLA's split lists
    (``train_list`` / ``test_list`` / optional ``dev_list``; default ``RAW/my_{split}_iemo.txt``
    or ``RAW/data/...``). Writes the lists and ``stat_iemo.txt`` into OUT and per utterance:
    ``audio/{split}_fbank/<utt>.npy`` (1024, 128) float32 (MLA's extract_fbank recipe at
    16 kHz); with ``vocab`` (a bert-base-uncased vocab.txt or tokenizer folder, local)
    ``text_token/{split}_token/<utt>_token.npy`` int64 (1, max_tokens) and ``<utt>_pm.npy``
    float32 (1, max_tokens), 1.0 = padding; with ``faces_dir`` (one folder of face crops
    per utterance) ``visual/{split}_imgs/<utt>/*.jpg`` resized to ``face_size``. MLA's face
    crops come from an unpublished detector, so without ``faces_dir`` no visual modality is
    written (the summary says so).
    """
    raw, out = Path(raw), Path(out)
    if not raw.is_dir():
        raise DataError(f"Raw IEMOCAP folder '{raw}' does not exist.")
    lists = _iemocap_lists(raw, {"train": train_list, "test": test_list, "dev": dev_list})
    wavs = {p.stem: p for p in sorted(raw.rglob("*.wav"))}
    report = Report("iemocap", raw, out)
    tokenizer = None
    if vocab is not None:
        from mmbalance.tokenizers import bert_tokenizer

        tokenizer = bert_tokenizer(vocab, lowercase=True)
    faces = Path(faces_dir) if faces_dir is not None else None
    if faces is not None and not faces.is_dir():
        raise DataError(f"faces_dir '{faces}' is not a folder of per-utterance face crops.")
    (out).mkdir(parents=True, exist_ok=True)
    (out / "stat_iemo.txt").write_text("".join(f"{n}\n" for n in IEMOCAP_LABELS), encoding="utf-8")
    for split, path in lists.items():
        place_file(path, out / f"my_{split}_iemo.txt", "copy")
        utts = read_iemocap_list(path)
        if not any(u in wavs for u, _, _ in utts):
            raise DataError(
                f"None of the {len(utts)} utterances of '{path}' has a <utt>.wav under '{raw}'. "
                f"Expected: {RAW_LAYOUTS['iemocap']}"
            )
        for utt, text, _ in _progress(utts, len(utts), f"iemocap {split}", progress):
            _iemocap_utterance(report, out, split, utt, text, wavs, tokenizer, faces, int(face_size), int(max_tokens), bool(overwrite))
    if tokenizer is None:
        report.notes.append("no vocab given: text_token/ not written (--set vocab=/path/to/vocab.txt)")
    if faces is None:
        report.notes.append(
            "no faces_dir given: visual/ not written (MLA's face crops come from an unpublished "
            "detector; pass --set faces_dir=DIR with one folder of crops per utterance)"
        )
    report.paths.update(audio=str(out / "audio"), lists=str(out))
    return report


def _iemocap_utterance(
    report: Report, out: Path, split: str, utt: str, text: str, wavs: Mapping[str, Path],
    tokenizer: Any, faces: Path | None, face_size: int, max_tokens: int, overwrite: bool,
) -> None:
    try:
        fbank = out / "audio" / f"{split}_fbank" / f"{utt}.npy"
        if utt not in wavs:
            raise DataError(f"no {utt}.wav under RAW")
        if overwrite or not fbank.is_file():
            _save_npy(fbank, iemocap_fbank(wavs[utt]))
            report.written["fbank files"] += 1
        else:
            report.skipped["fbank files"] += 1
        if tokenizer is not None:
            ids, mask = iemocap_tokens(tokenizer, text, max_tokens)
            folder = out / "text_token" / f"{split}_token"
            _save_npy(folder / f"{utt}_token.npy", ids)
            _save_npy(folder / f"{utt}_pm.npy", mask)
            report.written["token files"] += 1
        if faces is not None:
            dst = out / "visual" / f"{split}_imgs" / utt
            if overwrite or not dst.is_dir():
                report.written["face images"] += _iemocap_faces(faces / utt, dst, face_size)
    except (DataError, OSError, ValueError, RuntimeError) as exc:
        report.fail(f"{split}/{utt}", f"{type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------------ registry


PREPARERS: dict[str, Callable[..., Report]] = {
    "cremad": prepare_cremad,
    "ksounds": prepare_ksounds,
    "nvgesture": prepare_nvgesture,
    "iemocap": prepare_iemocap,
}


def preparer_options(dataset: str) -> dict[str, Any]:
    """Option name -> default of one preparer (for the CLI's help and for validation)."""
    fn = _preparer(dataset)
    params = inspect.signature(fn).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _preparer(dataset: str) -> Callable[..., Report]:
    key = dataset.lower()
    if key in PREPARERS:
        return PREPARERS[key]
    if key in NOT_OFFERED:
        raise MMBalanceError(NOT_OFFERED[key])
    known = sorted(PREPARERS)
    raise ConfigError(
        f"No preparation step for dataset '{dataset}'. Known: {', '.join(known)} "
        f"(and {', '.join(sorted(NOT_OFFERED))}, which needs none).{did_you_mean(key, known + sorted(NOT_OFFERED))}"
    )


def prepare(dataset: str, raw: Path | str, out: Path | str, **options: Any) -> dict[str, Any]:
    """Run one dataset's preparer; returns (and writes to OUT/mmbalance_prepare.json) a summary.

    ``options`` are the preparer's keyword options (see :func:`preparer_options`); an unknown
    one is a ConfigError listing the valid names. Raises DataError when RAW does not hold the
    expected raw release (the message shows :data:`RAW_LAYOUTS`), or when nothing at all
    could be prepared.
    """
    fn = _preparer(dataset)
    allowed = preparer_options(dataset)
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise ConfigError(
            f"Unknown option(s) {', '.join(unknown)} for 'mmbalance prepare {dataset}'. Valid: "
            f"{', '.join(f'{k} (default {v!r})' for k, v in allowed.items())}."
            f"{did_you_mean(unknown[0], allowed)}"
        )
    raw_p, out_p = Path(raw).expanduser(), Path(out).expanduser()
    if not raw_p.is_dir():
        raise DataError(
            f"Raw folder '{raw_p}' does not exist or is not a directory. Expected: "
            f"{RAW_LAYOUTS.get(dataset.lower(), '')}"
        )
    out_p.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    report = fn(raw_p, out_p, **options)
    report.options = {**allowed, **options}
    summary = report.summary(time.monotonic() - start)
    _write_summary(out_p, summary)
    done = sum(report.written.values()) + sum(report.skipped.values())
    if report.failures and not done:
        raise DataError(
            f"'mmbalance prepare {dataset}' could not prepare anything: {len(report.failures)} "
            f"failures, e.g. {report.failures[0]['item']}: {report.failures[0]['error']}"
        )
    return summary


def _write_summary(out: Path, summary: Mapping[str, Any]) -> None:
    path = out / SUMMARY_FILE
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    os.replace(tmp, path)


__all__ = [
    "NOT_OFFERED",
    "PREPARERS",
    "RAW_LAYOUTS",
    "FlowSettings",
    "frame_plan",
    "horn_schunck",
    "prepare",
    "preparer_options",
    "stratified_split",
]

