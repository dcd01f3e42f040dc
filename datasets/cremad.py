"""CREMA-D (audio + face frames, 6 emotions) in the layouts the field uses.

Default = the IPRM paper's recipe on the njustkmg layout (Layout B, docs/datasets/cremad.md):
the OGM-GE 6698 / 744 split, 2 frames per clip, 20 s of audio at 22,050 Hz turned into a
(1, 257, 1250) log spectrogram. Layout A (OGM-GE: csvs in a separate folder, 1 frame, 3 s ->
(1, 257, 188)) and Layout D (MLA: its own 90/10 split, stored kaldi fbanks (1, 1024, 128), 3
frames) are options; so is reading the MLA split lists over Layout A/B media.

CREMA-D ships no validation split: one is carved from train with a fixed seed (see
``VAL_SEED``) and the rule is recorded in ``Splits.info``.

The root may be the dataset folder itself or a parent holding it under any of the names the
codebases use: ``CREMA-D`` (the release), ``CREMAD`` (OGM-GE) or ``CREMA`` (IPRM). Clips whose
wav or frame folder is missing: an error by default (``check_manifest=true``); ``warn`` skips
them with a warning that counts them (the official loaders skip them silently); ``false``
skips them with a note only (subsets).

``--set cache=DIR`` reads the same clips from the input cache of :mod:`mmbalance.cache`
(eval tensors bit for bit those of the files; train crops drawn from the same stream).
"""

from __future__ import annotations

import warnings
from collections import Counter
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
    MissingSamplesWarning,
    read_text_lines,
    stored_fbank_input,
    warn_missing,
)
from mmbalance.registry import register_dataset

NAME = "cremad"
PREPARE = "mmbalance prepare cremad --raw RAW --out ROOT"

# Class order hard-coded by OGM-GE and kept by IPRM/LFM/BalanceMM ("official").
OFFICIAL_ORDER = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
# MLA's list files name the emotions in words; its labels are the sorted words, which sort in
# the same order as the codes (Anger < Disgust < ... and ANG < DIS < ...).
MLA_NAMES = {"Anger": "ANG", "Disgust": "DIS", "Fear": "FEA", "Happy": "HAP", "Neutral": "NEU", "Sad": "SAD"}

# Manifest of the two splits the field uses (GeWu-Lab/OGM-GE_CVPR2022 data/CREMAD/*.csv; MLA's lists).
MANIFEST = {"ogm": {"train": 6698, "test": 744}, "mla": {"train": 6698, "test": 744}}
CLASS_COUNTS = {
    "ogm": {
        "train": {"ANG": 1166, "DIS": 1142, "FEA": 1138, "HAP": 1148, "NEU": 973, "SAD": 1131},
        "test": {"ANG": 105, "DIS": 129, "FEA": 133, "HAP": 123, "NEU": 114, "SAD": 140},
    }
}
# Folder names of the dataset under a data root: the release's, OGM-GE's, IPRM's.
ROOT_NAMES = ("CREMA-D", "CREMAD", "CREMA")
# Fixed seed of the carved validation split: independent of the run seed, so every run of a
# grid validates on the same clips.
VAL_SEED = 20220601

LAYOUT_DEFAULTS = {
    "B": {"frames": 2, "audio_seconds": 20.0, "split": "ogm", "list_dir": "annotations"},
    "A": {"frames": 1, "audio_seconds": 3.0, "split": "ogm", "list_dir": "data/CREMAD"},
    "D": {"frames": 3, "audio_seconds": None, "split": "mla", "list_dir": "data"},
}


@dataclass(frozen=True)
class Resolved(AVSettings):
    """The effective settings after layout defaults are filled in."""

    split: str


@register_dataset(NAME, "CREMA-D: speech audio + face frames, 6 emotions (IPRM recipe by default)")
class CremaD(AVClipPlugin):
    """CREMA-D audio-visual emotion recognition."""
    data_subdir = "CREMA-D"
    prepare_command = PREPARE

    name = NAME
    description = "CREMA-D: speech audio + face frames, 6 emotions (IPRM recipe by default)"
    options = {
        "layout": Option(
            "B",
            "on-disk layout: B = njustkmg annotations/ + AudioWAV/ + Image-01-FPS/ (IPRM); "
            "A = OGM-GE csvs under list_dir; D = MLA fbank .npy + per-split frames",
            choices=("B", "A", "D"),
        ),
        "split": Option(
            None,
            "train/test lists: ogm (OGM-GE 6698/744 csvs) or mla (MLA my_{train,test}_cre.txt); "
            "default: mla for layout D, else ogm",
            choices=("ogm", "mla"),
        ),
        "list_dir": Option(
            None,
            "folder of the split lists, relative to the data root or absolute; default: "
            "annotations (B), data/CREMAD (A), data (D or split=mla)",
            type=str,
        ),
        "frames": Option(None, "frames per clip; default 2 (B, IPRM), 1 (A), 3 (D)", type=int),
        "audio_seconds": Option(
            None, "seconds of (tiled) audio; default 20 (B, IPRM) or 3 (A)", type=float
        ),
        "sample_rate": Option(22050, "audio sample rate the WAVs are resampled to (Hz)"),
        "n_fft": Option(512, "STFT size (librosa-style log spectrogram)"),
        "hop_length": Option(353, "STFT hop in samples"),
        "image_size": Option(224, "frame side after crop/resize (pixels)"),
        "sort_frames": Option(
            True, "index the sorted frame listing (deterministic); false = os.listdir order as the official code"
        ),
        "check_manifest": Option(
            True,
            "true = require the split's published sample and per-class counts; warn = skip "
            "listed clips whose files are missing and warn with their count (the official "
            "loader skips them silently); false = skip them with a note (subsets)",
            choices=MANIFEST_MODES,
            changes_results=False,  # only checks: a run that completes reads the same clips
        ),
        "class_order": Option(
            "official",
            "label map: official = NEU 0, HAP 1, SAD 2, FEA 3, DIS 4, ANG 5 (OGM-GE/IPRM); "
            "sorted = ANG 0, DIS 1, FEA 2, HAP 3, NEU 4, SAD 5 (MMPareto, MLA)",
            choices=("official", "sorted"),
        ),
        **CACHE_OPTIONS,
    }
    layout_help = (
        "Layout B (default, njustkmg/IPRM): <root>/annotations/train.csv and test.csv (no header, "
        "rows 'clip_id,EMO', e.g. '1001_DFA_ANG_XX,ANG'), <root>/AudioWAV/<clip_id>.wav and "
        "<root>/Image-01-FPS/<clip_id>/*.jpg (1-fps frames, at least as many as 'frames'); the root "
        "may be the dataset folder itself or a parent holding CREMA-D/, CREMAD/ or CREMA/. The "
        "split csvs may live elsewhere (OGM-GE keeps them in its code checkout, data/CREMAD/): "
        "--set list_dir=DIR reads them from there in any layout. Layout A (OGM-GE) keeps the "
        "same media but reads train.csv/test.csv from list_dir (default <root>/data/CREMAD) and "
        "switches to OGM-GE's recipe (1 frame, 3 s of audio). Layout "
        "D (MLA): <root>/data/my_{train,test}_cre.txt ('<clip_id>.flv Anger'), "
        "<root>/audio/{train,test}_fbank/<clip_id>.npy (1024x128 kaldi fbank) and "
        "<root>/visual/{train,test}_imgs/Image-01-FPS/<clip_id>/*.jpg. Build layout B from the raw "
        f"CREMA-D release with `{PREPARE}`."
        " --set cache=DIR reads an input cache instead of the files (memory-mapped audio inputs, "
        "uint8 frames; built in DIR, outside the data folder, on first use or by `mmbalance prepare "
        f"{NAME} ... --set cache=DIR`); the uncached files stay the reference."
    )

    def build(self, cfg: Mapping[str, Any], modalities: Sequence[str]) -> Splits:
        mods = check_modalities(NAME, modalities, self.modality_names)
        root = _find_root(cfg)
        r = _resolve(cfg, root)
        names = OFFICIAL_ORDER if r.class_order == "official" else tuple(sorted(OFFICIAL_ORDER))
        label_of = {c: i for i, c in enumerate(names)}
        notes: list[str] = []
        parts = {split: _index_split(root, r, split, label_of, names, notes) for split in ("train", "test")}
        info = {
            "layout": r.layout,
            "split": r.split,
            "label_map": dict(label_of),
            "frames": r.frames,
            "frame_order": "sorted listing" if r.sort_frames else "os.listdir order (official)",
        }
        return av_clip_splits(
            parts, mods, r, names, info, notes,
            val_fraction=option(cfg, self, "val_fraction"), seed=VAL_SEED, dataset=NAME,
            fix=f"If the prepared layout is incomplete, re-run `{PREPARE}` (it skips finished clips).",
            cache_root=root, fingerprint=self.data_fingerprint(cfg) if r.cache else None,
            cache_workers=cfg.get("num_workers"),
        )


def _find_root(cfg: Mapping[str, Any]) -> Path:
    """The CREMA-D folder: data_root itself, or its first subfolder named as in
    :data:`ROOT_NAMES` (CREMA-D, OGM-GE's CREMAD, IPRM's CREMA)."""
    root = resolve_data_root(cfg, NAME, subdir=ROOT_NAMES[0])
    if root.name in ROOT_NAMES or (root / "AudioWAV").exists():
        return root
    for name in ROOT_NAMES[1:]:
        if (root / name).is_dir():
            return root / name
    return root


def _resolve(cfg: Mapping[str, Any], root: Path) -> Resolved:
    layout = str(cfg.get("layout") or "B").upper()
    if layout not in LAYOUT_DEFAULTS:
        raise ConfigError(f"Dataset '{NAME}': unknown layout '{layout}'. Use B, A or D.")
    base = LAYOUT_DEFAULTS[layout]
    split = cfg.get("split") or base["split"]
    if layout == "D" and split != "mla":
        raise ConfigError(
            f"Dataset '{NAME}': layout D stores media per MLA split, so split must be mla, "
            f"not {split}. Use layout B for the OGM-GE split."
        )
    list_dir = cfg.get("list_dir") or ("data" if split == "mla" else base["list_dir"])
    return Resolved.from_options(
        cfg, NAME, root,
        layout=layout,
        frames=int(_pick(cfg.get("frames"), base["frames"])),
        seconds=_pick(cfg.get("audio_seconds"), base["audio_seconds"]),
        list_dir=list_dir,
        stored_fbank=stored_fbank_input("kaldi fbank (MLA)", ", unnormalised") if layout == "D" else None,
        default_rate=22050,
        default_order="official",
        split=split,
    )


def _pick(value: Any, default: Any) -> Any:
    """The user's value when set, else the layout's default (0 is a value, None is not)."""
    return default if value is None else value


def _list_file(r: Resolved, split: str) -> Path:
    return r.list_dir / (f"{split}.csv" if r.split == "ogm" else f"my_{split}_cre.txt")


def _media_paths(root: Path, r: Resolved, split: str) -> tuple[Path, Path, str]:
    """(audio folder, frames folder, audio suffix) of one split."""
    if r.layout == "D":
        return root / "audio" / f"{split}_fbank", root / "visual" / f"{split}_imgs" / "Image-01-FPS", ".npy"
    return root / "AudioWAV", root / "Image-01-FPS", ".wav"


def _fix_text(r: Resolved) -> str:
    return (
        f"Build layout B with `{PREPARE}` and pass --data-root ROOT, or choose the layout you "
        f"have with --set layout=A|B|D (now layout={r.layout}, split={r.split})."
    )


def _lists_missing_text(r: Resolved) -> str:
    """The extra advice when a split list is absent: where OGM-GE users keep theirs, and what
    switching to layout A would change besides the list folder."""
    names = "train.csv and test.csv" if r.split == "ogm" else "my_train_cre.txt and my_test_cre.txt"
    where = "OGM-GE keeps its csvs in the code checkout, data/CREMAD/" if r.split == "ogm" else (
        "MLA keeps its lists in the code checkout, data/"
    )
    text = (
        f" The split lists ({names}) are not in {r.list_dir}. If they are elsewhere ({where}), "
        f"pass --set list_dir=DIR; that keeps "
        f"layout {r.layout}'s recipe ({r.frames} frame(s), "
        f"{'stored fbanks' if r.layout == 'D' else f'{_seconds(r):g} s of audio'})."
    )
    if r.layout != "A" and r.split == "ogm":
        text += (
            " Beware: --set layout=A also reads data/CREMAD/ but changes the recipe to OGM-GE's "
            "(1 frame, 3 s of audio), which is not IPRM's."
        )
    return text


def _seconds(r: Resolved) -> float:
    return float(r.audio.spec.extras.get("seconds", 0.0))


def _index_split(
    root: Path,
    r: Resolved,
    split: str,
    label_of: dict[str, int],
    names: tuple[str, ...],
    notes: list[str],
) -> list[Clip]:
    """Read one split list, keep the clips whose files exist, and check the manifest."""
    list_file = _list_file(r, split)
    audio_dir, frame_root, suffix = _media_paths(root, r, split)
    fix = _fix_text(r) + ("" if list_file.is_file() else _lists_missing_text(r))
    require_paths(NAME, root, [list_file, audio_dir, frame_root], _layout_line(r), fix)
    rows = _read_rows(list_file, r.split)
    found = (
        find_clip(cid, label_of[emo], audio_dir / f"{cid}{suffix}", frame_root / cid, r.frames, r.sort_frames)
        for cid, emo in rows
    )
    clips = [c for c in found if c is not None]
    listed = [cid for cid, _ in rows]
    usable = [c.clip_id for c in clips]
    expected = MANIFEST[r.split][split]
    skip = " To skip clips whose files are missing, as the official loader does, pass --set check_manifest=warn."
    notes += check_split(NAME, split, listed, usable, expected, _fix_text(r) + skip, strict=r.strict)
    if r.manifest == "warn":
        warned = warn_missing(NAME, split, listed, usable)
        notes += [warned] if warned else []
    notes += _check_class_counts(r, split, [names[c.label] for c in clips])
    return clips


def _layout_line(r: Resolved) -> str:
    if r.layout == "D":
        return (
            "layout D (MLA): list_dir/my_{train,test}_cre.txt, audio/{train,test}_fbank/<clip>.npy, "
            "visual/{train,test}_imgs/Image-01-FPS/<clip>/*.jpg."
        )
    lists = "train.csv, test.csv" if r.split == "ogm" else "my_train_cre.txt, my_test_cre.txt"
    return (
        f"layout {r.layout}: {r.list_dir} holding {lists}; AudioWAV/<clip_id>.wav; "
        f"Image-01-FPS/<clip_id>/*.jpg (see `mmbalance list datasets`)."
    )


def _read_rows(path: Path, split_kind: str) -> list[tuple[str, str]]:
    """(clip_id, emotion code) rows of an OGM-GE csv ('id,EMO') or an MLA list ('id.flv Name')."""
    rows: list[tuple[str, str]] = []
    for n, line in enumerate(read_text_lines(path), start=1):
        if split_kind == "ogm":
            fields = [f.strip() for f in line.split(",")]
            clip_id, emo = (fields[0], fields[1]) if len(fields) >= 2 else (fields[0], "")
        else:
            fields = line.split()
            clip_id = fields[0].removesuffix(".flv") if fields else ""
            emo = MLA_NAMES.get(fields[-1], "") if len(fields) >= 2 else ""
        if not clip_id or emo not in OFFICIAL_ORDER:
            raise DataError(
                f"Dataset '{NAME}': line {n} of '{path}' reads {line!r}; expected "
                + ("'clip_id,EMO' with EMO in " + ", ".join(OFFICIAL_ORDER) if split_kind == "ogm"
                   else "'<clip_id>.flv <Name>' with Name in " + ", ".join(MLA_NAMES))
                + ". Restore the file from the release."
            )
        rows.append((clip_id, emo))
    return rows


def _check_class_counts(r: Resolved, split: str, emos: list[str]) -> list[str]:
    """Compare per-class counts with the published OGM-GE split (only when the totals are the
    manifest's, so a subset run with check_manifest=false is not flooded with notes)."""
    expected = CLASS_COUNTS.get(r.split, {}).get(split)
    if expected is None or len(emos) != MANIFEST[r.split][split]:
        return []
    got = Counter(emos)
    diff = {c: (got.get(c, 0), n) for c, n in expected.items() if got.get(c, 0) != n}
    if not diff:
        return []
    msg = (
        f"Dataset '{NAME}', split '{split}': per-class counts differ from the OGM-GE manifest "
        + ", ".join(f"{c} {g} (expected {n})" for c, (g, n) in diff.items())
        + f". The list file {_list_file(r, split)} is not the published one; restore it, or "
        "pass --set check_manifest=false to use it on purpose."
    )
    if r.strict:
        raise DataError(msg)
    if r.manifest == "warn":
        warnings.warn(msg, MissingSamplesWarning, stacklevel=2)
    return [msg]
