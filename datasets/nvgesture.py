"""NVGesture: RGB + optical flow + depth clips of 25 dynamic hand gestures (Molchanov et al. 2016).

Follows the loader of the IPRM / AMSS / IGM code (njustkmg/IJCAI25-IPRM ``dataset/nvGesture_dataset.py``):
the official NVIDIA split lists, ``sk_color.avi`` / ``sk_depth.avi`` read over the annotated
80-frame window and resized to 256 x 256, precomputed flow in ``Video_data/flow_data``, a
random 64-frame window and one random 224 crop shared by all modalities in training, all 80
frames and a centre crop at test time. Modality order is the paper's m1, m2, m3 = RGB, OF,
Depth (docs/datasets/nvgesture.md), which decides the IPRM pair order (rgb, flow), (rgb, depth), (flow, depth).

The flow's origin is recorded with the run (``Splits.info["flow"]``): ``mmbalance prepare
nvgesture`` writes which method made each file (OpenCV's TV-L1 by default, or Horn-Schunck)
into ``flow_data/<split>/mmbalance_flow.json``; flow from elsewhere is reported as
"unrecorded", and a mix of methods as "mixed" with a note.

Decisions (docs/datasets/nvgesture.md): colour frames are converted to RGB by default, since they receive
RGB ImageNet statistics and feed RGB-pretrained I3D; ``color_order=bgr`` reproduces the
official code, which keeps OpenCV's BGR. The source has no validation split: one is carved
from train with a fixed seed (``VAL_SEED``) and its list lines are recorded with the run.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mmbalance.config import Option
from mmbalance.data import (
    PAPER_SCHEDULE,
    DatasetPlugin,
    ModalitySpec,
    Splits,
    carve_validation,
    check_modalities,
    check_split,
    option,
    require_paths,
    resolve_data_root,
)
from mmbalance.errors import ConfigError, DataError
from mmbalance.media import IMAGENET_MEAN, IMAGENET_STD
from mmbalance.prepare.flow import FLOW_META_FILE, flow_provenance, read_flow_meta
from mmbalance.registry import register_dataset
from mmbalance.video import read_frames

NUM_CLASSES = 25
VAL_SEED = 2016  # fixed per dataset, never the run seed: every run validates on the same clips
MANIFEST = {"train": 1050, "test": 482}
LIST_NAMES = (
    "nvgesture_{split}_correct_cvpr2016_v2.lst",  # NVIDIA's release
    "nvgesture_{split}_correct_v2.lst",  # the njustkmg loaders' renamed copy
)
SENSOR_FILES = {"rgb": "color", "depth": "depth"}
MAX_OFFICIAL_FLOW_FRAMES = 128  # I3D's fixed (8,7,7) pool yields 1024-d only below this


@dataclass(frozen=True)
class Clip:
    """One line of an NVGesture split list."""

    folder: Path  # Video_data/class_XX/subjectY_rZ under the configured root
    sensors: Mapping[str, tuple[str, int, int]]  # sensor -> (file stem, start, end exclusive)
    label: int  # 0-based, from the line's ``label`` field (not the class folder)
    line: int  # 0-based line index in the list: the flow file's name
    split: str  # "train" or "test": the list (and flow folder) it came from

    def video(self, sensor: str) -> Path:
        return self.folder / f"{self.sensors[sensor][0]}.avi"


def parse_list_line(text: str, root: Path, line: int, split: str, source: Path) -> Clip:
    """Parse ``path:./Video_data/... depth:sk_depth:146:226 color:... label:1``."""
    fields = text.split()
    if not fields or not fields[0].startswith("path:"):
        raise DataError(
            f"{source}, line {line + 1}: expected a first field 'path:./Video_data/...', got "
            f"{text[:80]!r}. Is this an NVGesture split list?"
        )
    rel = fields[0].split(":", 1)[1]
    rel = rel[2:] if rel.startswith("./") else rel.lstrip("/")
    sensors: dict[str, tuple[str, int, int]] = {}
    label: int | None = None
    for field in fields[1:]:
        parts = field.split(":")
        try:
            if parts[0] == "label":
                label = int(parts[1])
            elif len(parts) == 4:
                sensors[parts[0]] = (parts[1], int(parts[2]), int(parts[3]))
        except (ValueError, IndexError) as exc:
            raise DataError(f"{source}, line {line + 1}: malformed field {field!r}.") from exc
    if label is None or not 1 <= label <= NUM_CLASSES:
        raise DataError(
            f"{source}, line {line + 1}: needs a 'label:<1..{NUM_CLASSES}>' field, got {label!r}."
        )
    return Clip(root / rel, sensors, label - 1, line, split)


def read_split_list(path: Path, root: Path, split: str) -> list[Clip]:
    """All clips of one list file; CRLF endings and blank lines are tolerated."""
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    return [parse_list_line(t, root, i, split, path) for i, t in enumerate(x for x in lines if x)]


def find_list(root: Path, split: str) -> Path | None:
    for pattern in LIST_NAMES:
        p = root / pattern.format(split=split)
        if p.is_file():
            return p
    return None


class NVGestureClips(Dataset):
    """Decodes, crops and normalises the requested modalities of each clip on the fly."""

    def __init__(
        self, clips: Sequence[Clip], modalities: Sequence[str], train: bool, root: Path, opts: Mapping[str, Any]
    ) -> None:
        self.clips = list(clips)
        self.modalities = tuple(modalities)
        self.train = train
        self.root = root
        self.frame_size = int(opts["frame_size"])
        self.crop = int(opts["crop_size"])
        self.clip_frames = int(opts["clip_frames"])
        self.train_frames = int(opts["train_frames"])
        self.order = str(opts["color_order"])
        self.max_flow_frames: int | None = opts.get("max_flow_frames")
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)

    def __len__(self) -> int:
        return len(self.clips)

    def eval_view(self) -> NVGestureClips:
        """The same clips read as evaluation reads them (all frames, centre crop)."""
        view = copy.copy(self)
        view.train = False
        return view

    def _draw(self) -> tuple[int, int, int, int]:
        """(t0, T, y, x): a random window and crop in training, the centre at test time."""
        room = self.frame_size - self.crop
        if self.train:
            t0 = int(torch.randint(0, self.clip_frames - self.train_frames + 1, ()))
            y = int(torch.randint(0, room + 1, ()))
            x = int(torch.randint(0, room + 1, ()))
            return t0, self.train_frames, y, x
        return 0, self.clip_frames, room // 2, room // 2

    def _frames(self, clip: Clip, sensor: str, order: str) -> np.ndarray:
        _, start, end = clip.sensors[sensor]
        return read_frames(
            clip.video(sensor), start, end, size=self.frame_size, order=order, buffer_len=self.clip_frames
        )

    def __getitem__(self, i: int) -> dict[str, Any]:
        clip = self.clips[i]
        t0, n, y, x = self._draw()
        item: dict[str, Any] = {}
        for m in self.modalities:
            if m == "rgb":
                arr = self._frames(clip, "color", self.order)[t0 : t0 + n, y : y + self.crop, x : x + self.crop]
                t = torch.from_numpy(np.ascontiguousarray(arr)).permute(3, 0, 1, 2).float() / 255.0
                item[m] = (t - self._mean) / self._std
            elif m == "depth":
                # channel 0 of OpenCV's BGR frame, as the official loader keeps it
                arr = self._frames(clip, "depth", "bgr")[t0 : t0 + n, y : y + self.crop, x : x + self.crop, 0]
                item[m] = torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(0).float() / 255.0
            elif m == "flow":
                item[m] = self._flow(clip, y, x)
        item["label"] = clip.label
        item["index"] = i
        return item

    def _flow(self, clip: Clip, y: int, x: int) -> torch.Tensor:
        """(H, W, 2, T) float -> (2, T, crop, crop); never cropped in time (official)."""
        path = flow_path(self.root, clip)
        arr = np.load(path, mmap_mode="r")
        check_flow_array(arr.shape, path, self.frame_size, self.max_flow_frames)
        crop = np.array(arr[y : y + self.crop, x : x + self.crop], dtype=np.float32)
        return torch.from_numpy(crop).permute(2, 3, 0, 1).contiguous()


def flow_path(root: Path, clip: Clip) -> Path:
    return root / "Video_data" / "flow_data" / clip.split / f"{clip.line}.npy"


def check_flow_array(shape: tuple[int, ...], path: Path, frame_size: int, max_frames: int | None) -> None:
    if len(shape) != 4 or shape[2] != 2 or shape[0] != frame_size or shape[1] != frame_size:
        raise DataError(
            f"Flow file '{path}' has shape {tuple(shape)}; expected (H, W, 2, T) with "
            f"H = W = frame_size = {frame_size} (the official flow is 256 x 256). Re-save it in "
            f"that layout or set frame_size to its size."
        )
    if max_frames is not None and shape[3] >= max_frames:
        raise DataError(
            f"Flow file '{path}' holds T = {shape[3]} frames; the i3d backbone with "
            f"pool=official needs T < {max_frames} (its fixed (8,7,7) pool only gives a "
            f"1024-d feature then). Save shorter flow, or use --set backbone.flow.pool=adaptive."
        )


@register_dataset("nvgesture", "NVGesture: RGB + optical flow + depth, 25 hand gestures (I3D)")
class NVGesture(DatasetPlugin):
    prepare_command = "mmbalance prepare nvgesture --raw RAW --out ROOT"
    name = "nvgesture"
    description = "NVGesture: RGB + optical flow + depth clips, 25 dynamic hand gestures"
    modality_names = ("rgb", "flow", "depth")
    defaults = {
        "batch_size": 2,
        "optimizer": "sgd",
        "lr": 1e-2,
        **PAPER_SCHEDULE,
        "embed_dim": 1024,
        "backbone": {
            "rgb": {"name": "i3d", "pool": "official"},
            "flow": {"name": "i3d", "pool": "official"},
            "depth": {"name": "i3d", "pool": "official"},
        },
    }
    method_defaults = {"iprm": {"alpha": 0.7}}  # paper 0.7 vs README 0.8; decision 0.7
    options = {
        "check_manifest": Option(True, "fail unless the lists hold the official 1050 / 482 usable clips", changes_results=False),
        "frame_size": Option(256, "every frame (and the stored flow) is H = W = this size"),
        "crop_size": Option(224, "spatial crop shared by all modalities (random in train, centre in test)"),
        "clip_frames": Option(80, "frames read per clip from its annotated start (official 80-slot buffer)"),
        "train_frames": Option(64, "random temporal window used in training (test uses clip_frames)"),
        "color_order": Option("rgb", "colour channel order; bgr = the official code (docs/datasets/nvgesture.md)", ["rgb", "bgr"]),
    }
    layout_help = (
        "NVGesture root (or <root>/nvGesture): nvgesture_train_correct_cvpr2016_v2.lst and "
        "nvgesture_test_correct_cvpr2016_v2.lst as released by NVIDIA (or the renamed "
        "nvgesture_{train,test}_correct_v2.lst), Video_data/class_XX/subjectY_rZ/sk_color.avi "
        "and sk_depth.avi from the NVIDIA release, and precomputed optical flow "
        "Video_data/flow_data/{train,test}/<n>.npy of shape (256, 256, 2, T), n = 0-based line "
        "of the clip in its list. 'mmbalance prepare nvgesture --raw RAW --out ROOT' turns the "
        "NVIDIA release into this layout (renamed lists, verified AVIs, and optical flow: "
        "OpenCV's TV-L1 by default, or Horn-Schunck; the official flow algorithm is unknown), "
        "recording the method in flow_data/<split>/mmbalance_flow.json; flow you computed "
        "yourself can be dropped into flow_data instead."
    )

    def build(self, cfg: Mapping[str, Any], modalities: Sequence[str]) -> Splits:
        mods = check_modalities(self.name, modalities, self.modality_names)
        opts = self._options(cfg, mods)
        root = _nvgesture_root(cfg)
        lists = self._lists(root)
        strict = bool(option(cfg, self, "check_manifest"))
        fix = (
            "Check that every clip the lists name has sk_color.avi / sk_depth.avi under "
            "Video_data and its flow under Video_data/flow_data/<split>/<line>.npy."
        )
        notes: list[str] = []
        usable: dict[str, list[Clip]] = {}
        for split, path in lists.items():
            listed = read_split_list(path, root, split)
            ok = [c for c in listed if _has_files(c, mods, root)]
            notes += check_split(
                self.name, split, [_cid(c) for c in listed], [_cid(c) for c in ok],
                MANIFEST[split], fix, strict=strict,
            )
            usable[split] = ok
        flow_frames = self._flow_frames(usable["train"], root, opts) if "flow" in mods else None
        train_clips, held, rule = carve_validation(
            usable["train"], option(cfg, self, "val_fraction"), VAL_SEED, self.name, fallback=True
        )
        val_clips = held if held is not None else usable["test"]
        info = {
            "root": str(root),
            "lists": {k: str(v) for k, v in lists.items()},
            "val_split": rule,
            "val_is_test": held is None,
            "val_lines": [c.line for c in held] if held is not None else None,
            "color_order": opts["color_order"],
            "notes": notes,
        }
        if "flow" in mods:
            info["flow"] = self._flow_origin(root, usable, notes)
        return Splits(
            train=NVGestureClips(train_clips, mods, True, root, opts),
            val=NVGestureClips(val_clips, mods, False, root, opts),
            test=NVGestureClips(usable["test"], mods, False, root, opts),
            modalities={m: self._spec(m, opts, flow_frames) for m in mods},
            num_classes=NUM_CLASSES,
            class_names=[f"gesture_{k:02d}" for k in range(1, NUM_CLASSES + 1)],
            info=info,
        )

    def _options(self, cfg: Mapping[str, Any], mods: Sequence[str]) -> dict[str, Any]:
        opts = {k: option(cfg, self, k) for k in self.options}
        if opts["crop_size"] > opts["frame_size"]:
            raise ConfigError(
                f"nvgesture: crop_size {opts['crop_size']} is larger than frame_size "
                f"{opts['frame_size']}. Use a crop no larger than the frames."
            )
        if not 0 < opts["train_frames"] <= opts["clip_frames"]:
            raise ConfigError(
                f"nvgesture: train_frames must be in 1..clip_frames ({opts['clip_frames']}), "
                f"got {opts['train_frames']}."
            )
        flow_bb = dict((cfg.get("backbone") or {}).get("flow") or {})
        official_pool = flow_bb.get("name", "i3d") == "i3d" and flow_bb.get("pool", "official") == "official"
        opts["max_flow_frames"] = MAX_OFFICIAL_FLOW_FRAMES if "flow" in mods and official_pool else None
        return opts

    def _lists(self, root: Path) -> dict[str, Path]:
        found = {s: find_list(root, s) for s in ("train", "test")}
        if None in found.values():
            wanted = [LIST_NAMES[0].format(split=s) for s, p in found.items() if p is None]
            require_paths(
                self.name, root, wanted, self.layout_help,
                "The renamed copies nvgesture_{train,test}_correct_v2.lst are accepted too.",
            )
        require_paths(self.name, root, ["Video_data"], self.layout_help)
        return {s: p for s, p in found.items() if p is not None}

    @staticmethod
    def _flow_origin(root: Path, usable: Mapping[str, Sequence[Clip]], notes: list[str]) -> dict[str, Any]:
        """Which method made the flow files this run reads (from mmbalance_flow.json)."""
        metas = {s: read_flow_meta(root / "Video_data" / "flow_data" / s) for s in usable}
        prov = flow_provenance(metas, {s: [c.line for c in cs] for s, cs in usable.items()})
        if prov["method"] == "mixed":
            notes.append(
                f"flow files come from several methods {prov['counts']}: re-run `mmbalance "
                f"prepare nvgesture ... --set overwrite=true` for flow made one way"
            )
        elif prov["method"] == "unrecorded":
            notes.append(
                f"no {FLOW_META_FILE} records how the flow was made (not by `mmbalance prepare "
                f"nvgesture`); the run's flow method is unknown"
            )
        return prov

    def _flow_frames(self, clips: Sequence[Clip], root: Path, opts: Mapping[str, Any]) -> int:
        """T of the stored flow, read from the first file's header (shape checks included)."""
        path = flow_path(root, clips[0])
        shape = np.load(path, mmap_mode="r").shape
        check_flow_array(shape, path, int(opts["frame_size"]), opts["max_flow_frames"])
        return int(shape[3])

    @staticmethod
    def _spec(m: str, opts: Mapping[str, Any], flow_frames: int | None) -> ModalitySpec:
        c = int(opts["crop_size"])
        if m == "flow":
            return ModalitySpec("video", (2, int(flow_frames or 0), c, c), {"source": "optical flow"})
        channels = 3 if m == "rgb" else 1
        extras = {"eval_frames": int(opts["clip_frames"])}
        if m == "rgb":
            extras["color_order"] = opts["color_order"]
        return ModalitySpec("video", (channels, int(opts["train_frames"]), c, c), extras)


def _nvgesture_root(cfg: Mapping[str, Any]) -> Path:
    root = resolve_data_root(cfg, "nvgesture")
    for sub in ("nvGesture", "NVGesture", "nvgesture"):
        if (root / sub).is_dir():
            return root / sub
    return root


def _has_files(clip: Clip, mods: Sequence[str], root: Path) -> bool:
    for m in mods:
        if m == "flow":
            if not flow_path(root, clip).is_file():
                return False
        elif SENSOR_FILES[m] not in clip.sensors or not clip.video(SENSOR_FILES[m]).is_file():
            return False
    return True


def _cid(clip: Clip) -> str:
    return f"{clip.split}:{clip.line}:{clip.folder.name}"
