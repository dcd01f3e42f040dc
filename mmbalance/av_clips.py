"""The audio + frame-folder datasets (CREMA-D, Kinetics-Sounds): their shared recipe, the
indexing of one clip, and their splits, read from the files or from the input cache.

One layer above :mod:`mmbalance.media` (decoding and transforms) and :mod:`mmbalance.cache`
(the input cache, which itself reads through media), so neither of those imports the other's
user.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from mmbalance.cache import CachedAVClipDataset, DeviceCrop, open_av_cache
from mmbalance.data import PAPER_SCHEDULE, DatasetPlugin, ModalitySpec, Splits, carve_validation
from mmbalance.media import FRAME_RULES, AVClipDataset, AVSettings, Clip, list_frames


class AVClipPlugin(DatasetPlugin):
    """Base of the audio + frame-folder datasets (CREMA-D, Kinetics-Sounds): their modalities
    and the IPRM paper's recipe for both (ResNet-18 per modality, SGD 1e-2, alpha 0.8)."""

    modality_names = ("audio", "visual")
    defaults = {
        "batch_size": 64,
        "optimizer": "sgd",
        "lr": 1e-2,
        **PAPER_SCHEDULE,
        "embed_dim": 512,
        "backbone": {"audio": {"name": "resnet18"}, "visual": {"name": "resnet18"}},
    }
    method_defaults = {"iprm": {"alpha": 0.8}}


def find_clip(
    clip_id: str, label: int, audio: Path, frame_dir: Path, min_frames: int, sort: bool
) -> Clip | None:
    """A Clip when its audio exists and its folder holds at least ``min_frames`` images, else
    None (the official loaders skip such rows; the manifest check reports them). ``sort``: index
    the sorted frame listing, else ``os.listdir`` order."""
    if not audio.is_file() or not frame_dir.is_dir():
        return None
    names = list_frames(frame_dir, sort=sort)
    if len(names) < min_frames:
        return None
    return Clip(clip_id, label, audio, frame_dir, tuple(names))


def frame_naming(names: Sequence[str]) -> str:
    """Which extractor a frame folder's names point to (recorded with the run, since the
    extractor decides which moments of a clip the frames show)."""
    import re

    if names and all(re.fullmatch(r"\d{5}\.jpg", n) for n in names):
        kind = "{source index:05d}.jpg: OGM-GE's current per-second extractor"
    elif names and all(re.fullmatch(r"frame_\d{5}\.jpg", n) for n in names):
        kind = "frame_NNNNN.jpg: OGM-GE's earlier 10-frame extractor (or another)"
    else:
        kind = "other names"
    return f"{kind}; e.g. {', '.join(names[:3])}"


def av_clip_splits(
    parts: Mapping[str, Sequence[Clip]],
    modalities: Sequence[str],
    r: AVSettings,
    class_names: Sequence[str],
    info: Mapping[str, Any],
    notes: list[str],
    *,
    val_fraction: float,
    seed: int,
    dataset: str,
    valid_rule: str = "",
    fix: str = "",
    cache_root: Path | None = None,
    fingerprint: Mapping[str, Any] | None = None,
    cache_workers: int | None = None,
) -> Splits:
    """The Splits of an audio + frames dataset from its indexed clips.

    ``parts`` holds "train" and "test", and "valid" when the layout ships one (then
    ``valid_rule`` describes it); otherwise validation is carved from train with the dataset's
    fixed ``seed`` (:func:`mmbalance.data.carve_validation`; val_fraction=0 validates on the
    test split). Validation and test use eval-mode sampling. ``info`` (the dataset's own
    entries) is recorded with the val, frame and audio rules, the sizes and ``notes`` added.

    With ``r.cache`` set (the ``cache`` option) the datasets read the input cache of
    :mod:`mmbalance.cache` instead of the files: opened (or built, in ``cache_workers``
    processes) for every clip of ``parts`` under the dataset folder ``cache_root``, keyed to
    ``fingerprint`` (the plugin's data fingerprint) and the settings; the Splits then carry
    ``device_transform`` (train-time crops and flips on the device, per batch).
    """

    frames, size = r.frames, r.image_size
    store = None
    if r.cache:
        store = open_av_cache(
            r, parts, dataset=dataset, root=cache_root, fingerprint=fingerprint or {},
            workers=cache_workers,
        )

    def make(clips: Sequence[Clip], train: bool) -> Dataset:
        if store is not None:
            return CachedAVClipDataset(store, clips, modalities, frames, size, train, fix, r.frame_rule)
        return AVClipDataset(clips, modalities, r.audio.loader, frames, size, train, fix, r.frame_rule)

    test = make(parts["test"], False)
    if "valid" in parts:
        train, val, rule = make(parts["train"], True), make(parts["valid"], False), valid_rule
    else:
        keep, hold, rule = carve_validation(parts["train"], val_fraction, seed, dataset)
        train = make(keep, True)
        val = make(hold, False) if hold is not None else test
    val_is_test = val is test
    specs = {"audio": r.audio.spec, "visual": ModalitySpec("video", (3, frames, size, size))}
    info = {
        **info,
        "val_rule": rule,
        "val_is_test": val_is_test,
        "frame_choice": r.frame_rule,
        "frame_rule": f"{FRAME_RULES[r.frame_rule]} (k = {frames}); train: RandomResizedCrop"
        f"({size}) + flip; eval: Resize",
        "audio": r.audio.rule,
        **({"resampler": r.audio.resampler} if r.audio.resampler else {}),
        "check_manifest": r.manifest,
        **({"frame_files": frame_naming(parts["train"][0].frame_names)} if parts["train"] else {}),
        "sizes": {"train": len(train), "val": len(val), "test": len(test)},
        "notes": notes,
        **({"input_cache": store.describe()} if store is not None else {}),
    }
    splits = Splits(
        train=train,
        val=val,
        test=test,
        modalities={m: specs[m] for m in modalities},
        num_classes=len(class_names),
        class_names=list(class_names),
        info=info,
    )
    if store is not None and "visual" in modalities:
        splits.device_transform = DeviceCrop(size)  # type: ignore[attr-defined]
    return splits
