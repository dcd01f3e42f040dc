"""``mmbalance prepare cremad``: raw CREMA-D -> Layout B (frames, AudioWAV, annotations)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mmbalance.errors import ConfigError, DataError
from mmbalance.prepare.common import (
    FRAME_EXTRACTORS,
    Report,
    _check_frame_options,
    _check_link,
    _record,
    _run_jobs,
    _same_path,
    extract_frames,
    extract_frames_per_second,
    frames_folder_name,
    place_file,
    read_rows,
    stratified_split,
    write_csv,
)

CREMAD_EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")

RAW_LAYOUT = (
    "RAW = the CREMA-D release (CheyneyComputerScience/CREMA-D, media pulled from Git LFS): "
    "RAW/VideoFlash/<clip>.flv and RAW/AudioWAV/<clip>.wav, clip = "
    "<actor>_<sentence>_<EMO>_<level>. Writes Layout B into OUT: Image-01-FPS/<clip>/"
    "00000.jpg, 00030.jpg, ... (fps frames per second, named by source index: what produced "
    "OGM-GE's Image-01-FPS in its current code; --set extractor=ten_frames writes its earlier "
    "10 frames frame_00001.jpg ... instead), AudioWAV/ (copied or linked) and "
    "annotations/train.csv + test.csv ('clip,EMO'). Pass "
    "the paper's OGM-GE split with --set train_csv=.../train.csv --set test_csv=.../test.csv; "
    "without them a stratified random split (seed, test_fraction) is written."
)


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
    extractor: str = "per_second"


def run_frame_job(job: FrameJob) -> tuple[str, str, str]:
    try:
        if job.extractor == "per_second":
            status = extract_frames_per_second(job.video, job.folder, job.fps, job.quality, job.overwrite)
        else:
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
            f"{RAW_LAYOUT}"
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
    extractor: str = "per_second",
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
    """Raw CREMA-D -> Layout B (IPRM / njustkmg; docs/datasets/cremad.md).

    Raw layout: ``RAW/VideoFlash/<clip>.flv`` and ``RAW/AudioWAV/<clip>.wav``.
    Writes ``OUT/Image-{fps:02d}-FPS/<clip>/`` frames at full resolution, by ``extractor``
    (:data:`FRAME_EXTRACTORS`): ``per_second`` (default) is what made ``Image-01-FPS`` in
    OGM-GE's current code -- ``fps`` frames of every second, named by source index
    (``00000.jpg``, ``00030.jpg``, ...; :func:`per_second_plan`), so 1-5 frames per CREMA-D
    clip; ``ten_frames`` is its earlier extractor -- ``round(seconds * fps)`` frames
    ``frame_00001.jpg ...`` sampled at (i + 0.5) / fps s with short clips wrapped
    (:func:`frame_plan`). Also ``OUT/AudioWAV/<clip>.wav`` (``audio`` = copy, symlink or
    hardlink; nothing is done when OUT is RAW) and ``OUT/annotations/{train,test}.csv``
    ('clip,EMO', no header).

    Split: ``train_csv`` / ``test_csv`` = OGM-GE's ``data/CREMAD/{train,test}.csv`` (the
    paper's 6698 / 744 split; rows are copied as given, clips missing from RAW are reported).
    Without them: :func:`stratified_split` with ``test_fraction`` and ``seed`` over the clips
    that have both a video and a wav. ``workers`` > 1 extracts frames in that many processes.
    """
    raw, out = Path(raw), Path(out)
    link = _check_link(str(audio))
    if extractor not in FRAME_EXTRACTORS:
        raise ConfigError(
            f"extractor='{extractor}' is not one of {', '.join(FRAME_EXTRACTORS)}: "
            + "; ".join(f"{k} = {v}" for k, v in FRAME_EXTRACTORS.items())
        )
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
    jobs = [
        FrameJob(c, videos[c], frame_root / c, fps_i, num_frames, quality, bool(overwrite), extractor)
        for c in todo
    ]
    _record(report, _run_jobs(run_frame_job, jobs, int(workers), "cremad frames", progress), "frame folders")
    _place_audio(report, todo, wavs, out / "AudioWAV", link, bool(overwrite))
    write_csv(out / "annotations" / "train.csv", train)
    write_csv(out / "annotations" / "test.csv", test)
    report.written["train rows"], report.written["test rows"] = len(train), len(test)
    report.paths.update(
        frames=str(frame_root), audio=str(out / "AudioWAV"), annotations=str(out / "annotations")
    )
    if extractor == "per_second":
        report.notes.append(f"frames: {fps_i} per second of each clip ({FRAME_EXTRACTORS[extractor]})")
    else:
        report.notes.append(f"frames: {num_frames} per clip at {fps_i} fps ({FRAME_EXTRACTORS[extractor]})")
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
