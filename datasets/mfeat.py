"""UCI Multiple Features (handwritten digits, six views) in the TMC packaging.

Reads ``handwritten_6views/handwritten_6views.mat`` (scipy.io.loadmat), keeps the file's own
1600/400 split, subtracts 1 from the 1-based labels, casts integer views to float, and
standardises each view with train statistics. Validation is a stratified ``val_fraction`` of
train (fixed ``split_seed``); ``val_fraction=0`` validates on the test split. Any two or more views can be the modalities
(``--set modalities=fac,mor``): their linear-probe accuracies range from 99.5 % (fac) to
70.3 % (mor), so the imbalance is strong and tunable.
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
    carve_validation,
    hash_files,
    require_paths,
    resolve_data_root,
)
from mmbalance.errors import DataError
from mmbalance.registry import register_dataset

VIEWS = {"pix": "x1", "fou": "x2", "fac": "x3", "zer": "x4", "kar": "x5", "mor": "x6"}
FILE = "handwritten_6views.mat"
LAYOUT = (
    f"<root>/handwritten_6views/{FILE} (or <root>/{FILE}): a MATLAB file with x1_train..x6_train, "
    "x1_test..x6_test and gt_train/gt_test, as packaged by TMC."
)


@register_dataset("mfeat", "UCI handwritten digits, six feature views (pix fou fac zer kar mor); pick 2+ views")
class MFeat(DatasetPlugin):
    name = "mfeat"
    description = "UCI handwritten digits, six feature views (pix fou fac zer kar mor); pick 2+ views"
    modality_names = ("fac", "mor")  # default pair: the strongest and the weakest view
    layout_help = LAYOUT
    pure_build = True  # in memory, from the config and fingerprinted files: reused in a grid worker
    defaults = {
        "epochs": 30,
        "batch_size": 64,
        "lr": 0.01,
        "scheduler": "cosine",
        "embed_dim": 64,
        "backbone": {v: {"name": "mlp", "hidden": 128} for v in VIEWS},
    }
    options = {"split_seed": Option(0, "seed of the stratified validation carve-out from train")}

    def available_modalities(self, cfg: Mapping[str, Any]) -> list[str]:
        return list(VIEWS)

    def default_modalities(self, cfg: Mapping[str, Any]) -> list[str]:
        return list(self.modality_names)

    def _root(self, cfg: Mapping[str, Any]) -> Path:
        root = resolve_data_root(cfg, self.name, subdir="handwritten_6views")
        require_paths(self.name, root, [FILE], LAYOUT)
        return root

    def data_fingerprint(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """Content hash of the .mat file: a copied folder is the same cell."""
        root = self._root(cfg)
        return {"files": hash_files([root / FILE], root)}

    def build(self, cfg: Mapping[str, Any], modalities: Sequence[str]) -> Splits:
        from scipy.io import loadmat

        root = self._root(cfg)
        try:
            mat = loadmat(str(root / FILE))
        except Exception as exc:
            raise DataError(f"Could not read '{root / FILE}': {exc}. Expected layout: {LAYOUT}") from exc
        needed = [f"{VIEWS[v]}_{s}" for v in modalities for s in ("train", "test")] + ["gt_train", "gt_test"]
        missing = [k for k in needed if k not in mat]
        if missing:
            raise DataError(f"'{root / FILE}' lacks the arrays {', '.join(missing)}. Expected layout: {LAYOUT}")
        y_train = torch.from_numpy(mat["gt_train"].reshape(-1).astype(np.int64) - 1)
        y_test = torch.from_numpy(mat["gt_test"].reshape(-1).astype(np.int64) - 1)
        train, test, specs = {}, {}, {}
        for v in modalities:
            xtr = mat[f"{VIEWS[v]}_train"].astype(np.float32)
            xte = mat[f"{VIEWS[v]}_test"].astype(np.float32)
            mean, std = xtr.mean(0), xtr.std(0) + 1e-6
            train[v] = torch.from_numpy((xtr - mean) / std)
            test[v] = torch.from_numpy((xte - mean) / std)
            specs[v] = ModalitySpec("vector", (xtr.shape[1],))
        full = DictDataset(train, y_train)
        keep, hold, rule = carve_validation(
            list(range(len(y_train))), cfg["val_fraction"], cfg["split_seed"], self.name, labels=y_train.numpy()
        )
        test_set = DictDataset(test, y_test)
        val = full.subset(np.asarray(hold)) if hold is not None else test_set
        info = {
            "root": str(root),
            "split": "the file's own 1600/400 split",
            "val_rule": rule,
            "val_is_test": hold is None,
            "views": list(modalities),
        }
        return Splits(full.subset(np.asarray(keep)), val, test_set, specs, 10, [str(i) for i in range(10)], info)
