"""``mmbalance prepare ksounds``: Kinetics clips + split csvs -> Layout C (frames, WAVs)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mmbalance.errors import DataError
from mmbalance.prepare.common import (
    Report,
    _check_frame_options,
    _record,
    _run_jobs,
    decode_audio,
    extract_frames,
    frames_folder_name,
    read_rows,
    write_csv,
    write_wav,
)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".flv", ".mov", ".m4v")

RAW_LAYOUT = (
    "RAW = a folder (searched recursively) of Kinetics clips named <youtube_id>.<ext> "
    "(mp4, mkv, webm, avi, ...; <youtube_id>_<start>_<end>.<ext> is matched too) plus "
    "split csvs of youtube_id,label (header optional): RAW/train.csv, RAW/test.csv and "
    "optionally RAW/valid.csv (or under RAW/annotations/, or given with --set "
    "train_csv=... test_csv=... valid_csv=...). Writes Layout C into OUT: "
    "annotations/{train,test[,valid]}.csv (header youtube_id,label), "
    "{split}_img/Image-01-FPS/<id>/frame_00001.jpg... and {split}_wav/<id>.wav (mono, "
    "sample_rate Hz, 16-bit PCM)."
)


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
            f"{RAW_LAYOUT}"
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
    """Kinetics clips -> Layout C (njustkmg / IGM; docs/datasets/ksounds.md).

    Raw layout: videos ``<youtube_id>.<ext>`` anywhere under RAW (or Kinetics-style
    ``<youtube_id>_<start>_<end>.<ext>``, matched when unique) and split csvs of
    ``youtube_id,label`` (``train_csv`` / ``test_csv`` / ``valid_csv``, default
    ``RAW/{split}.csv`` or ``RAW/annotations/{split}.csv``; valid is optional).
    Writes ``OUT/annotations/{split}.csv`` (header ``youtube_id,label``, labels as given),
    ``OUT/{split}_img/Image-{fps:02d}-FPS/<id>/frame_00001.jpg ...`` (``round(seconds * fps)``
    frames, OGM-GE sampling) and ``OUT/{split}_wav/<id>.wav``: the first audio stream, mono
    (channel mean), resampled to ``sample_rate`` with soxr HQ as ``librosa.load`` does
    (default 35,400 Hz, the rate the lab's KS loader asks librosa for, so loading does not
    resample again), 16-bit PCM.
    """
    raw, out = Path(raw), Path(out)
    fps_i, num_frames, quality = _check_frame_options(fps, seconds, jpeg_quality)
    files = _ks_split_files(raw, {"train": train_csv, "test": test_csv, "valid": valid_csv})
    videos = index_videos(raw)
    if not videos:
        raise DataError(f"No video files ({', '.join(VIDEO_EXTENSIONS)}) under '{raw}'. Expected: {RAW_LAYOUT}")
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
    report.notes.append(
        f"{num_frames} frames per clip at {fps_i} fps; audio mono {sample_rate} Hz, resampled "
        f"from each stream's rate by soxr HQ (librosa.load's default)"
    )
    return report
