"""``mmbalance prepare nvgesture``: the NVIDIA release -> renamed lists, AVIs, optical flow."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmbalance.errors import DataError
from mmbalance.prepare.common import (
    Report,
    _check_link,
    _run_jobs,
    _same_path,
    _save_npy,
    place_file,
)
from mmbalance.prepare.flow import (
    FLOW_FORMAT,
    FLOW_METHODS,
    FlowSettings,
    _torch_device,
    flow_method_record,
    grey,
    horn_schunck,
    method_id,
    read_flow_meta,
    resolve_flow_method,
    tvl1_flow,
    write_flow_meta,
)

RAW_LAYOUT = (
    "RAW = the NVIDIA release: RAW/nvgesture_train_correct_cvpr2016_v2.lst, "
    "RAW/nvgesture_test_correct_cvpr2016_v2.lst and RAW/Video_data/class_XX/subjectY_rZ/"
    "sk_color.avi + sk_depth.avi. Writes into OUT (may equal RAW): "
    "nvgesture_{train,test}_correct_v2.lst, Video_data/ (class folders linked or the two "
    "AVIs copied, unless OUT is RAW) and Video_data/flow_data/{train,test}/<line>.npy, "
    "(256, 256, 2, T) float32 optical flow by OpenCV's TV-L1 where its contrib build is "
    "installed (method=horn_schunck: our own Horn-Schunck), the method recorded in "
    "flow_data/<split>/mmbalance_flow.json (set flow=false to supply your own flow instead)."
)


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
            f"Expected: {RAW_LAYOUT}"
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
    method: str = "auto",
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
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> Report:
    """The NVIDIA release -> what the NVGesture loader reads (docs/datasets/nvgesture.md).

    Raw layout: ``RAW/nvgesture_{train,test}_correct_cvpr2016_v2.lst`` (or the already
    renamed ``*_correct_v2.lst``) and ``RAW/Video_data/class_XX/subjectY_rZ/{sk_color,
    sk_depth}.avi``. Writes ``OUT/nvgesture_{split}_correct_v2.lst`` (byte copies), makes
    ``OUT/Video_data`` hold the videos when OUT is not RAW (``link=symlink`` links each class
    folder; ``copy`` / ``hardlink`` place only the two AVIs of every listed clip), checks that
    every listed AVI exists (``strict``: a missing one is an error), and with ``flow`` writes
    ``OUT/Video_data/flow_data/{split}/{line}.npy``.

    Flow between consecutive grey frames of ``sk_color`` over the annotated range, read and
    resized to ``frame_size`` exactly as the loader reads RGB, by ``method``: ``tvl1`` =
    OpenCV's Dual TV-L1 at its default parameters (the flow I3D's authors used; OpenCV's
    contrib build, a dependency), ``horn_schunck`` = our own pyramidal Horn-Schunck
    (:func:`horn_schunck` with ``alpha``, ``iterations``, ``warps``, ``levels``, ``sigma``, on
    ``device``), ``auto`` (default) = tvl1 where the contrib build is installed, else
    horn_schunck (the summary says so). Stored (frame_size, frame_size, 2, T) float32, x then
    y, in pixels (no clipping or rescaling). T = number of frames (80) with ``pad_flow`` (the
    last pair's flow repeated, so flow aligns with RGB and depth) else frames - 1. The method,
    library and parameters of every file are recorded in
    ``flow_data/<split>/mmbalance_flow.json`` (the loader reports them with the run). The
    official flow algorithm is unknown, so models trained on this flow are not exactly the
    paper's; set ``flow=false`` to supply your own. Cost: TV-L1 takes about a second per 256 x
    256 pair on a CPU core (79 pairs per clip; ``workers`` clips run in parallel processes);
    Horn-Schunck takes seconds per clip on a GPU. Finished files are skipped on a rerun.
    """
    raw, out = Path(raw), Path(out)
    link = _check_link(str(link))
    chosen, fallback = resolve_flow_method(str(method)) if flow else (str(method), None)
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
    if fallback:
        report.notes.append(fallback)
    settings = FlowSettings(float(alpha), int(iterations), int(warps), int(levels), float(sigma))
    if chosen == "horn_schunck":
        _torch_device(str(device))  # a bad device is an error before any work
    record = flow_method_record(chosen, settings if chosen == "horn_schunck" else None, bool(pad_flow), int(frame_size))
    mid = method_id(record)
    for split, split_clips in clips.items():
        folder = out / "Video_data" / "flow_data" / split
        meta = read_flow_meta(folder)
        meta["format"] = FLOW_FORMAT
        jobs = []
        for c in split_clips:
            if not _avi(raw, c, c.color).is_file():
                continue
            target = folder / f"{c.line}.npy"
            if target.is_file() and not overwrite:
                report.skipped["flow files"] += 1
                continue
            jobs.append(FlowJob(
                f"{split}/{c.line}", _avi(raw, c, c.color), c.color[1], c.color[2], target,
                chosen, int(frame_size), settings, bool(pad_flow), str(device),
            ))
        for item, status, message in _run_jobs(run_flow_job, jobs, int(workers), f"nvgesture {split} flow", progress):
            if status != "ok":
                report.fail(item, message)
                continue
            meta["methods"][mid] = record
            meta["files"][item.split("/", 1)[1]] = mid
            write_flow_meta(folder, meta)  # after every file: an interrupted run stays truthful
            report.written["flow files"] += 1
    report.paths["flow"] = str(out / "Video_data" / "flow_data")
    shown = f"{FLOW_METHODS[chosen]}" + (f" ({settings})" if chosen == "horn_schunck" else "")
    report.notes.append(
        f"flow = {shown}, recorded as '{mid}' in flow_data/<split>/mmbalance_flow.json; the "
        f"paper's method is unknown"
    )
    return report


@dataclass(frozen=True)
class FlowJob:
    """One clip's optical flow (picklable for the worker pool)."""

    item: str  # "<split>/<line>"
    video: Path
    start: int
    end: int
    target: Path
    method: str
    size: int
    settings: FlowSettings
    pad: bool
    device: str


def run_flow_job(job: FlowJob) -> tuple[str, str, str]:
    try:
        dev = _torch_device(job.device) if job.method == "horn_schunck" else None
        arr = clip_flow(job.video, job.start, job.end, job.size, job.settings, job.pad, dev, job.method)
        _save_npy(job.target, arr)
    except Exception as exc:  # reported per clip, the run goes on
        return job.item, "failed", f"{type(exc).__name__}: {exc}"
    return job.item, "ok", ""


def clip_flow(
    video: Path,
    start: int,
    end: int,
    size: int,
    settings: FlowSettings,
    pad: bool,
    device: Any,
    method: str = "horn_schunck",
) -> np.ndarray:
    """Flow of one clip as (size, size, 2, T) float32 -- the layout the loader reads.

    ``method`` tvl1 (OpenCV, on uint8 grey frames) or horn_schunck (torch on ``device``, on
    [0, 1] grey frames); both see the frames the loader reads for RGB.
    """
    from mmbalance.video import read_frames

    frames = read_frames(video, start, end, size=size, order="rgb")
    if frames.shape[0] < 2:
        raise DataError(f"'{video}' frames {start}:{end} give fewer than 2 frames; no flow.")
    if method == "tvl1":
        luma = np.clip(np.rint(grey(frames) * 255.0), 0, 255).astype(np.uint8)
        flow = tvl1_flow(luma)  # (T - 1, H, W, 2)
        if pad:
            flow = np.concatenate([flow, flow[-1:]], axis=0)
        return np.ascontiguousarray(flow.transpose(1, 2, 3, 0).astype(np.float32))
    import torch

    g = torch.from_numpy(grey(frames)).to(device)
    with torch.no_grad():
        out = horn_schunck(g[:-1], g[1:], settings)
    if pad:
        out = torch.cat([out, out[-1:]], dim=0)
    return np.ascontiguousarray(out.permute(2, 3, 1, 0).cpu().numpy().astype(np.float32))
