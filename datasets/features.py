"""Bring-your-own pre-extracted features: the common case for researchers with their own data.

A directory (``--data-root DIR``) holding ``train.npz`` and ``test.npz`` and optionally
``val.npz``. Each file has one 2-D float array per modality, named by the modality, and a 1-D
integer array ``label`` (0..K-1). Modalities and the class count are read from the files;
without ``val.npz`` a stratified validation split is carved from train with a fixed seed.
Features are used as stored (standardise them yourself, or set ``standardize=true``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmbalance.config import Option
from mmbalance.data import (
    DatasetPlugin,
    DictDataset,
    ModalitySpec,
    Splits,
    require_paths,
    resolve_data_root,
    stratified_holdout,
)
from mmbalance.errors import DataError
from mmbalance.registry import register_dataset

LAYOUT = (
    "DIR/train.npz and DIR/test.npz (optionally DIR/val.npz), each holding one 2-D float array "
    "per modality named by the modality (rows = samples) and a 1-D integer array 'label'; e.g. "
    "np.savez(DIR/'train.npz', audio=A, video=V, label=y)."
)


def _load(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as exc:
        raise DataError(f"Could not read '{path}': {exc}. Expected layout: {LAYOUT}") from exc


def _validate(path: Path, arrays: Mapping[str, np.ndarray], modalities: Sequence[str] | None) -> None:
    if "label" not in arrays:
        raise DataError(f"'{path}' has no 'label' array. Expected layout: {LAYOUT}")
    y = arrays["label"]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"'{path}': 'label' must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}.")
    mods = [k for k in arrays if k != "label"]
    if not mods:
        raise DataError(f"'{path}' holds no modality arrays besides 'label'. Expected layout: {LAYOUT}")
    for m in mods:
        a = arrays[m]
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.floating) or len(a) != len(y):
            raise DataError(
                f"'{path}': modality '{m}' must be a 2-D float array with one row per label "
                f"({len(y)}), got shape {a.shape} dtype {a.dtype}."
            )
    if modalities is not None and sorted(mods) != sorted(modalities):
        raise DataError(f"'{path}' has modalities {sorted(mods)} but train.npz has {sorted(modalities)}.")


@register_dataset("features", "your own pre-extracted features: DIR/{train,val,test}.npz, one array per modality")
class Features(DatasetPlugin):
    name = "features"
    description = "your own pre-extracted features: DIR/{train,val,test}.npz, one array per modality"
    layout_help = LAYOUT
    defaults = {
        "epochs": 30,
        "scheduler": "cosine",
        "embed_dim": 128,
        "backbone": {},
    }
    options = {
        "standardize": Option(False, "standardise each modality with train mean/std"),
        "split_seed": Option(0, "seed of the stratified validation carve-out when there is no val.npz"),
        "encoder": Option("mlp", "backbone for every modality unless backbone.<m> is set", type=str),
    }

    def _root(self, cfg: Mapping[str, Any]) -> Path:
        root = resolve_data_root(cfg, self.name)
        require_paths(self.name, root, ["train.npz", "test.npz"], LAYOUT)
        return root

    def available_modalities(self, cfg: Mapping[str, Any]) -> list[str]:
        path = self._root(cfg) / "train.npz"
        try:
            with np.load(path, allow_pickle=False) as f:
                return sorted(k for k in f.files if k != "label")
        except Exception as exc:
            raise DataError(f"Could not read '{path}': {exc}. Expected layout: {LAYOUT}") from exc

    def build(self, cfg: Mapping[str, Any], modalities: Sequence[str]) -> Splits:
        root = self._root(cfg)
        files = {s: root / f"{s}.npz" for s in ("train", "val", "test") if (root / f"{s}.npz").exists()}
        arrays = {s: _load(p) for s, p in files.items()}
        all_mods = [k for k in arrays["train"] if k != "label"]
        for s, p in files.items():
            _validate(p, arrays[s], all_mods if s != "train" else None)
        labels = np.concatenate([a["label"] for a in arrays.values()])
        if labels.min() < 0:
            raise DataError(f"Labels in '{root}' must be 0..K-1; found {labels.min()}.")
        num_classes = int(labels.max()) + 1
        stats = {}
        if cfg["standardize"]:
            for m in modalities:
                x = arrays["train"][m]
                stats[m] = (x.mean(0), x.std(0) + 1e-6)

        def dataset(split: str, idx: np.ndarray | None = None) -> DictDataset:
            a = arrays[split]
            sel = slice(None) if idx is None else idx
            tensors = {}
            for m in modalities:
                x = a[m][sel].astype(np.float32)
                if m in stats:
                    x = (x - stats[m][0]) / stats[m][1]
                tensors[m] = torch.from_numpy(x)
            return DictDataset(tensors, torch.from_numpy(a["label"][sel].astype(np.int64)))

        if "val" in arrays:
            train, val, rule = dataset("train"), dataset("val"), "val.npz"
        else:
            keep, hold = stratified_holdout(arrays["train"]["label"], cfg["val_fraction"], cfg["split_seed"])
            train, val = dataset("train", keep), dataset("train", hold)
            rule = f"stratified {cfg['val_fraction']:.0%} of train.npz, seed {cfg['split_seed']}"
        specs = {
            m: ModalitySpec("vector", (arrays["train"][m].shape[1],), {"default_backbone": cfg["encoder"]})
            for m in modalities
        }
        info = {"root": str(root), "val_rule": rule, "modalities_in_files": all_mods}
        return Splits(train, val, dataset("test"), specs, num_classes, [str(i) for i in range(num_classes)], info)
