"""Kinetics-Sounds (audio + RGB frames; 31 classes in this line of work).

Default = the njustkmg layout the IPRM lab's loaders read (Layout C, docs/datasets/ksounds.md):
``annotations/{train,valid,test}.csv`` with a ``youtube_id,label`` header, WAVs per split,
1-fps frame folders per split. Audio: 35,400 Hz mono (resampled by soxr HQ, as librosa.load),
tiled/cut to 10 s, log STFT 512/353 -> (1, 257, 1003). Layouts A (OGM-GE lists
``{clip},10,{label}``) and B (BalanceMM lists ``clip ... label``) read stored kaldi fbanks
(1024, 128) -> (1, 1024, 128) and ``frame_0000k.jpg`` frames.

Visual: 3 frames, picked as the layout's own loader picks them (``frame_choice=source``, the
default; :data:`mmbalance.media.FRAME_RULES`), in train and in eval alike:

* C (IGM / AUG ``datasets/KS.py``): the first 3 entries of the listing. The lab code draws 3
  random indices and then reads entries 0, 1, 2 regardless, so the first three it is.
* A (OGM-GE ``dataset/dataset.py``): frames ``(n // 3) * i + 1``, i.e. 1, 4, 7 of the 10
  ``frame_0000k.jpg``.
* B (BalanceMM ``KS_dataset.py``): 3 segments of ``s = n // 3``; train draws one frame per
  segment at random (``[i*s + 1, i*s + s]``, capped at 9), eval takes ``i*s + max(s // 2, 1)``.

The indices go into the sorted listing (``sort_frames``), which is what the official code's
file names ``frame_0000{t}.jpg`` address. ``frame_choice=random`` uses IPRM's CREMA-D rule
instead (3 distinct random sorted indices in train, the first 3 in eval), which we
guessed for IPRM's KS runs; the rule in effect is recorded in ``Splits.info``.

Class index = sorted class names (a **decision**: the lab numbers classes by first appearance
in train.csv, which depends on row order; ``class_order=first_appearance`` restores that). The
mapping is recorded in ``Splits.info`` and ``class_names``.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmbalance.av_clips import AVClipPlugin, av_clip_splits, find_clip
from mmbalance.config import Option
from mmbalance.data import (
    Splits,
    check_modalities,
    check_split,
    option,
    require_paths,
    resolve_data_root,
)
from mmbalance.errors import ConfigError, DataError
from mmbalance.media import (
    CACHE_OPTIONS,
    MANIFEST_MODES,
    AVSettings,
    Clip,
    read_text_lines,
    stored_fbank_input,
    warn_missing,
)
from mmbalance.registry import register_dataset

NAME = "ksounds"
PREPARE = "mmbalance prepare ksounds --raw RAW --out ROOT"
PAPER_CLASSES = 31
# Published list sizes (OGM-GE's my_train.txt / my_test.txt). The njustkmg csvs (~15K / 1.9K /
# 1.9K in the paper) and BalanceMM's lists have no published exact counts.
MANIFEST = {"A": {"train": 14799, "test": 2597}}
VAL_SEED = 20220602
LIST_NAMES = {"A": "my_{split}.txt", "B": "{split}.txt"}
# frame_choice=source: the frame rule of each layout's own loader (mmbalance.media.FRAME_RULES)
SOURCE_FRAME_RULES = {"C": "first", "A": "ogm_fixed", "B": "segments"}


@dataclass(frozen=True)
class Resolved(AVSettings):
    """The effective settings after defaults are filled in."""

    min_frames: int


@register_dataset(NAME, "Kinetics-Sounds: audio + RGB frames of audible Kinetics classes (31 in the papers)")
class KineticsSounds(AVClipPlugin):
    """Kinetics-Sounds audio-visual action recognition."""
    data_subdir = "kinetics_sound"
    prepare_command = PREPARE

    name = NAME
    description = "Kinetics-Sounds: audio + RGB frames of audible Kinetics classes (31 in the papers)"
    options = {
        "layout": Option(
            "C",
            "on-disk layout: C = njustkmg annotations/*.csv + {split}_wav + {split}_img (paper); "
            "A = OGM-GE lists '{clip},10,{label}' + fbank .npy; B = BalanceMM lists 'clip label' + fbank .npy",
            choices=("C", "A", "B"),
        ),
        "list_dir": Option(
            None,
            "folder of the split lists, relative to the data root or absolute; default: "
            "annotations (C), the data root (A, B)",
            type=str,
        ),
        "frames": Option(3, "frames per clip"),
        "frame_choice": Option(
            "source",
            "which frames: source = the layout's own loader's (C: the first 3, IGM; A: 1, 4, 7, "
            "OGM-GE; B: a random one per third in train and each third's middle in eval, "
            "BalanceMM); random = IPRM's CREMA-D rule (3 random sorted in train, first 3 in eval)",
            choices=("source", "random"),
        ),
        "min_frames": Option(
            None,
            "clips with fewer frames are dropped; default frames + 1 (the lab loaders need more "
            "than 3 frames for 3)",
            type=int,
        ),
        "audio_seconds": Option(10.0, "seconds of (tiled) audio (layout C)"),
        "sample_rate": Option(35400, "audio sample rate the WAVs are resampled to (Hz, layout C)"),
        "n_fft": Option(512, "STFT size (layout C)"),
        "hop_length": Option(353, "STFT hop in samples (layout C)"),
        "image_size": Option(224, "frame side after crop/resize (pixels)"),
        "sort_frames": Option(
            True, "index the sorted frame listing (deterministic); false = os.listdir order"
        ),
        "check_manifest": Option(
            True,
            "require the published list sizes where known (layout A); false for subsets; warn = "
            "skip clips whose files are missing with a warning that counts them",
            choices=MANIFEST_MODES,
            changes_results=False,  # only checks: a run that completes reads the same clips
        ),
        "class_order": Option(
            "sorted",
            "class index: sorted = sorted class names (numeric order for integer labels); "
            "first_appearance = order of first appearance in the train list (lab code)",
            choices=("sorted", "first_appearance"),
        ),
        **CACHE_OPTIONS,
    }
    layout_help = (
        "Layout C (default, njustkmg): <root>/annotations/train.csv and test.csv (optional "
        "valid.csv), each with a header 'youtube_id,label' and class names as labels; "
        "<root>/{train,test}_wav/<youtube_id>.wav; <root>/{train,test}_img/Image-01-FPS/<youtube_id>/*.jpg "
        "(1-fps frames, more than 'frames' of them); valid.csv clips are read from valid_wav/ and "
        "valid_img/ when those exist, else from the train folders. The root may be the "
        "kinetics_sound folder itself or a parent holding it. Layout A (OGM-GE): "
        "<root>/my_{train,test}.txt with lines '<clip>,10,<int label>'; Layout B (BalanceMM): "
        "<root>/{train,test}.txt with lines '<clip> ... <int label>'; both with "
        "<root>/audio/{train,test}_fbank/<clip>.npy (1024x128 kaldi fbank) and "
        "<root>/visual/{train,test}_imgs/<clip>/frame_0000k.jpg. Frames are picked as each "
        "layout's loader picks them (C: the first 3; A: 1, 4, 7; B: one per third), or with "
        "--set frame_choice=random as IPRM's CREMA-D rule. Build layout C from the raw "
        f"clips with `{PREPARE}`."
        " --set cache=DIR reads an input cache instead of the files (memory-mapped audio inputs, "
        "uint8 frames; built in DIR, outside the data folder, on first use or by `mmbalance prepare "
        f"{NAME} ... --set cache=DIR`); the uncached files stay the reference."
    )

    def build(self, cfg: Mapping[str, Any], modalities: Sequence[str]) -> Splits:
        mods = check_modalities(NAME, modalities, self.modality_names)
        root = _find_root(cfg)
        r = _resolve(cfg, root)
        notes: list[str] = []
        rows = {s: _read_split(root, r, s) for s in _splits_present(r)}
        class_names = _class_names(rows["train"], r.class_order)
        label_of = {c: i for i, c in enumerate(class_names)}
        parts = {s: _index(root, r, s, rs, label_of, notes) for s, rs in rows.items()}
        if len(class_names) != PAPER_CLASSES:
            notes.append(f"{len(class_names)} classes in the train list (the papers use {PAPER_CLASSES})")
        info = {
            "layout": r.layout,
            "num_classes": len(class_names),
            "class_order": r.class_order,
            "label_map": dict(label_of),
            "frames": r.frames,
            "frame_source": "the layout's own loader" if r.frame_rule != "random" else "IPRM's CREMA-D rule",
            "min_frames": r.min_frames,
            "frame_order": "sorted listing" if r.sort_frames else "os.listdir order",
        }
        return av_clip_splits(
            parts, mods, r, class_names, info, notes,
            val_fraction=option(cfg, self, "val_fraction"), seed=VAL_SEED, dataset=NAME,
            fix=f"If the prepared layout is incomplete, re-run `{PREPARE}` (it skips finished clips).",
            cache_root=root, fingerprint=self.data_fingerprint(cfg) if r.cache else None,
            cache_workers=cfg.get("num_workers"),
            valid_rule=f"val = the layout's own valid split ({_list_file(r, 'valid')})",
        )


def _find_root(cfg: Mapping[str, Any]) -> Path:
    """The dataset folder: data_root itself or its kinetics_sound/ (or Kinetics-Sounds/) child."""
    root = resolve_data_root(cfg, NAME, subdir="kinetics_sound")
    if root.name != "kinetics_sound" and (root / "Kinetics-Sounds").is_dir():
        root = root / "Kinetics-Sounds"
    return root


def _resolve(cfg: Mapping[str, Any], root: Path) -> Resolved:
    layout = str(cfg.get("layout") or "C").upper()
    if layout not in ("A", "B", "C"):
        raise ConfigError(f"Dataset '{NAME}': unknown layout '{layout}'. Use C, A or B.")
    frames = int(cfg.get("frames", 3))
    min_frames = cfg.get("min_frames")
    min_frames = frames + 1 if min_frames is None else int(min_frames)
    if min_frames < frames:
        raise ConfigError(
            f"Dataset '{NAME}': min_frames ({min_frames}) must be at least frames ({frames})."
        )
    return Resolved.from_options(
        cfg, NAME, root,
        layout=layout,
        frames=frames,
        seconds=float(cfg.get("audio_seconds", 10.0)),
        list_dir=cfg.get("list_dir") or ("annotations" if layout == "C" else "."),
        stored_fbank=None if layout == "C" else stored_fbank_input(
            "kaldi fbank (stored)", " as shipped (OGM-GE normalises it)"
        ),
        default_rate=35400,
        default_order="sorted",
        frame_rule=SOURCE_FRAME_RULES[layout] if cfg.get("frame_choice", "source") == "source" else "random",
        min_frames=min_frames,
    )


def _list_file(r: Resolved, split: str) -> Path:
    if r.layout == "C":
        return r.list_dir / f"{split}.csv"
    return r.list_dir / LIST_NAMES[r.layout].format(split=split)


def _splits_present(r: Resolved) -> list[str]:
    """train and test always; valid when the layout ships a list for it."""
    splits = ["train", "test"]
    if r.layout == "C" and _list_file(r, "valid").is_file():
        splits.append("valid")
    return splits


def _media_paths(root: Path, r: Resolved, split: str) -> tuple[Path, Path, str]:
    """(audio folder, frames folder, audio suffix) of one split."""
    if r.layout == "C":
        media = split
        if split == "valid" and not (root / "valid_wav").is_dir():
            media = "train"  # the lab's extra lists (weight.csv) point into the train folders
        return root / f"{media}_wav", root / f"{media}_img" / "Image-01-FPS", ".wav"
    return root / "audio" / f"{split}_fbank", root / "visual" / f"{split}_imgs", ".npy"


def _fix_text(r: Resolved) -> str:
    return (
        f"Build layout C with `{PREPARE}` and pass --data-root ROOT, or choose the layout you "
        f"have with --set layout=C|A|B (now layout={r.layout})."
    )


def _layout_line(r: Resolved) -> str:
    if r.layout == "C":
        return (
            "layout C: annotations/{train,test}.csv (header youtube_id,label), "
            "{train,test}_wav/<id>.wav, {train,test}_img/Image-01-FPS/<id>/*.jpg."
        )
    return (
        f"layout {r.layout}: {LIST_NAMES[r.layout].format(split='{train,test}')} in {r.list_dir}, "
        "audio/{train,test}_fbank/<clip>.npy, visual/{train,test}_imgs/<clip>/*.jpg."
    )


def _read_split(root: Path, r: Resolved, split: str) -> list[tuple[str, str]]:
    """(clip id, label text) rows of one split, after checking its files and folders exist."""
    list_file = _list_file(r, split)
    audio_dir, frame_root, _ = _media_paths(root, r, split)
    require_paths(NAME, root, [list_file, audio_dir, frame_root], _layout_line(r), _fix_text(r))
    if r.layout == "C":
        return _read_csv(list_file)
    return _read_list(list_file, r.layout)


def _read_csv(path: Path) -> list[tuple[str, str]]:
    """The njustkmg csv: a header naming youtube_id and label, then one row per clip."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            if "youtube_id" not in fields or "label" not in fields:
                raise DataError(
                    f"Dataset '{NAME}': '{path}' has columns {fields}; expected a header row "
                    f"with youtube_id and label."
                )
            reader.fieldnames = fields
            rows = [(row["youtube_id"].strip(), (row["label"] or "").strip()) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"Dataset '{NAME}': cannot read '{path}' as a csv ({exc}).") from exc
    bad = [i for i, (cid, lab) in enumerate(rows, start=2) if not cid or not lab]
    if bad:
        raise DataError(f"Dataset '{NAME}': '{path}' has empty youtube_id or label on line {bad[0]}.")
    return rows


def _read_list(path: Path, layout: str) -> list[tuple[str, str]]:
    """OGM-GE '{clip},10,{label}' (A) or BalanceMM 'clip ... label' (B) lines; CRLF stripped."""
    rows: list[tuple[str, str]] = []
    for n, line in enumerate(read_text_lines(path), start=1):
        fields = [f.strip() for f in line.split(",")] if layout == "A" else line.split()
        ok = len(fields) >= (3 if layout == "A" else 2) and fields[-1].lstrip("-").isdigit()
        if not ok:
            want = "'<clip>,10,<int label>'" if layout == "A" else "'<clip> <int label>'"
            raise DataError(
                f"Dataset '{NAME}': line {n} of '{path}' reads {line!r}; expected {want}."
            )
        rows.append((fields[0], fields[-1]))
    return rows


def _class_names(train_rows: list[tuple[str, str]], order: str) -> list[str]:
    """Class names in index order: sorted (numerically for integer labels) or first appearance."""
    seen = list(dict.fromkeys(lab for _, lab in train_rows))
    if order == "first_appearance":
        return seen
    if all(lab.lstrip("-").isdigit() for lab in seen):
        return sorted(seen, key=int)
    return sorted(seen)


def _index(
    root: Path,
    r: Resolved,
    split: str,
    rows: list[tuple[str, str]],
    label_of: dict[str, int],
    notes: list[str],
) -> list[Clip]:
    """Keep the clips whose audio exists and whose folder has at least min_frames images."""
    unknown = sorted({lab for _, lab in rows if lab not in label_of})
    if unknown:
        raise DataError(
            f"Dataset '{NAME}', split '{split}': labels {unknown[:5]} in {_list_file(r, split)} "
            f"never occur in the train list, so they have no class index. Use matching lists."
        )
    audio_dir, frame_root, suffix = _media_paths(root, r, split)
    found = (
        find_clip(cid, label_of[lab], audio_dir / f"{cid}{suffix}", frame_root / cid, r.min_frames, r.sort_frames)
        for cid, lab in rows
    )
    clips = [c for c in found if c is not None]
    expected = MANIFEST.get(r.layout, {}).get(split)
    listed, usable = [cid for cid, _ in rows], [c.clip_id for c in clips]
    notes += check_split(NAME, split, listed, usable, expected, _fix_text(r), strict=r.strict)
    if r.manifest == "warn":
        warned = warn_missing(NAME, split, listed, usable)
        notes += [warned] if warned else []
    return clips
