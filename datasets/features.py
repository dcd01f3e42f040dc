"""Bring-your-own pre-extracted features: the common case for researchers with their own data.

A directory (``--data-root DIR``) holding ``train.npz`` and ``test.npz`` and optionally
``val.npz``. Each file has one 2-D float array per modality, named by the modality, and a 1-D
integer array ``label``. Modalities and the classes are read from the files: the classes are
the distinct labels of train.npz (at least two), and val/test may hold any of them (a class
may be absent from val or test) but no other.

Labels other than 0..K-1 (1-based labels, or a subset such as 5..7 of a larger set) are
renumbered 0..K-1 in sorted order, with a LabelRemapWarning, and the run records the mapping
(``dataset_info.label_map``, original label -> class index) and the original labels as its
class names. Renumbering, rather than refusing, because such labels are a normal way to store
a subset of classes and the fix a user would make by hand is this same mapping. Used as they
are, labels 5..7 would make an 8-way classifier: the record would claim 8 classes, and every
rule that counts classes (class prototypes, entropies over K classes, chance levels) would
include five that do not exist. A val/test label that train never has is refused instead: no
renumbering makes a model predict a class it never saw, and its scores would mislead.

Validation: ``val.npz`` when present (``val_fraction`` is then ignored); otherwise a stratified
``val_fraction`` of train is held out with the fixed ``split_seed`` (not the run seed), which
needs at least 2 training samples per class; ``val_fraction=0`` holds nothing out and
validates on the test split (recorded as ``val_is_test``).

Standardisation (``standardize``, default on): every feature is shifted and scaled by the
mean and std of the training rows (a feature that is constant in train is only shifted). Left
as stored, features on a tiny scale starve the default MLP: histogram-like features that sum
to 1 over a few hundred bins have a per-feature std around 3e-4, and the default recipe then
predicts the majority class. ``--set standardize=false`` uses the features as stored.

Input is checked before training, each problem a DataError naming the file and the array:
NaN/inf values, a modality whose width differs between files, fewer than 2 samples of a class
when validation must be carved from train, a train split of a single class, val/test labels
that train never has, and a label range far larger than the labels used (largest label + 1 >
2 x distinct labels and > distinct labels + 10, e.g. a stray label 1000000: a corrupt row far
more likely than a class).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

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

NAME = "features"
SPLITS = ("train", "val", "test")
LAYOUT = (
    "DIR/train.npz and DIR/test.npz (optionally DIR/val.npz), each holding one 2-D float array "
    "per modality named by the modality (rows = samples) and a 1-D integer array 'label'; e.g. "
    "np.savez(DIR/'train.npz', audio=A, video=V, label=y)."
)
# A label range is refused when max+1 exceeds both of these relative to the distinct labels:
# gaps (a class missing from the data, 1-based labels) pass, a stray huge label does not.
RANGE_FACTOR = 2
RANGE_SLACK = 10


def _load(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as exc:
        raise DataError(f"Could not read '{path}': {exc}. Expected layout: {LAYOUT}") from exc


def _validate(path: Path, arrays: Mapping[str, np.ndarray], modalities: Sequence[str] | None) -> None:
    """Layout of one file: a 1-D integer label, 2-D float modalities with one row per label."""
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


def _check_finite(path: Path, name: str, a: np.ndarray) -> None:
    bad = ~np.isfinite(a)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise DataError(
            f"'{path}': array '{name}' holds {int(bad.sum())} NaN/inf values (first at row "
            f"{int(rows[0])}; {len(rows)} rows affected); clean the features (drop or impute those "
            f"rows, or fix the extractor) before training: NaN/inf inputs make every loss NaN."
        )


def _check_widths(files: Mapping[str, Path], arrays: Mapping[str, Mapping[str, np.ndarray]], mods: Sequence[str]) -> None:
    for m in mods:
        w_train = arrays["train"][m].shape[1]
        for s in files:
            w = arrays[s][m].shape[1]
            if w != w_train:
                raise DataError(
                    f"'{files['train']}' and '{files[s]}': array '{m}' is {w_train} wide in "
                    f"train.npz but {w} wide in {s}.npz; a modality must have the same number of "
                    f"features (second dimension) in every file."
                )


class LabelRemapWarning(UserWarning):
    """The labels of a ``features`` folder were renumbered to 0..K-1 (recorded with the run)."""


def _check_labels(files: Mapping[str, Path], arrays: Mapping[str, Mapping[str, np.ndarray]]) -> np.ndarray:
    """The classes, as the sorted distinct labels of train.npz, after refusing what cannot give
    honest metrics: negative or stray labels, a train split of one class (every prediction is
    right: accuracy, MAP and F1 of 100), and val/test labels that train never has (a class the
    model never sees cannot be predicted; its scores mislead)."""
    for s, p in files.items():
        y = arrays[s]["label"]
        if len(y) and y.min() < 0:
            raise DataError(
                f"'{p}': array 'label' holds {int(y.min())} (row {int(np.argmin(y))}); labels must "
                f"be 0..K-1."
            )
    distinct = np.unique(np.concatenate([arrays[s]["label"] for s in files]))
    top = int(distinct[-1])
    k = top + 1
    if k > RANGE_FACTOR * len(distinct) and k > len(distinct) + RANGE_SLACK:
        where = next(s for s in files if len(arrays[s]["label"]) and int(arrays[s]["label"].max()) == top)
        row = int(np.argmax(arrays[where]["label"]))
        raise DataError(
            f"'{files[where]}': array 'label' holds {top} (row {row}), but only {len(distinct)} "
            f"distinct labels occur in {', '.join(f'{s}.npz' for s in files)}; labels must be 0..K-1 "
            f"(K classes), and {top} looks like a stray value, not a class. Fix that row, or remap "
            f"the labels, e.g. np.unique(all_labels, return_inverse=True)."
        )
    classes = np.unique(arrays["train"]["label"])
    if len(classes) < 2:
        raise DataError(
            f"'{files['train']}': array 'label' holds one class ({int(classes[0])}) in all "
            f"{len(arrays['train']['label'])} samples; a classifier needs at least two classes (with "
            f"one, every prediction is right and accuracy, MAP and F1 all read 100). Add the "
            f"samples of the other classes."
        )
    for s, p in files.items():
        y = arrays[s]["label"]
        unseen = np.setdiff1d(np.unique(y), classes)
        if len(unseen):
            rows = np.flatnonzero(np.isin(y, unseen))
            shown = ", ".join(map(str, unseen[:10].tolist())) + (" ..." if len(unseen) > 10 else "")
            raise DataError(
                f"'{p}': array 'label' holds class {shown} ({len(rows)} rows, first at row "
                f"{int(rows[0])}), which train.npz never has; a model cannot learn a class it never "
                f"sees, and its scores on it would mislead. Move some samples of it into train.npz, "
                f"or drop those rows."
            )
    return classes


def _shown_labels(classes: np.ndarray) -> str:
    """'5, 6, 7' (or the first and last few of a long list)."""
    vals = classes.tolist()
    return ", ".join(map(str, vals)) if len(vals) <= 8 else f"{', '.join(map(str, vals[:4]))}, ..., {vals[-1]}"


def _check_carvable(path: Path, y: np.ndarray, fraction: float) -> None:
    """Stratified holdout needs 2+ samples of every class present in train."""
    counts = np.bincount(y)
    small = [(c, int(n)) for c, n in enumerate(counts) if 0 < n < 2]
    if small:
        shown = ", ".join(f"class {c} has {n} sample" for c, n in small[:5])
        more = f" (and {len(small) - 5} more classes)" if len(small) > 5 else ""
        raise DataError(
            f"'{path}': array 'label': {shown}{more}; a stratified validation split "
            f"(val_fraction={fraction:g}) needs at least 2 training samples per class. Provide "
            f"your own DIR/val.npz, or --set val_fraction=0 to validate on the test split."
        )


def _standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Train mean and std per feature, and how many features are constant in train: those
    get std 1 (shifted only), so a zero std never turns into inf/NaN."""
    x = x.astype(np.float64)
    mean = x.mean(0)
    std = x.std(0)
    # exactly constant columns can still get a rounding-sized std (mean != value by an ulp)
    constant = (x.max(0) <= x.min(0)) | ~(std > 0)
    return mean, np.where(constant, 1.0, std), int(constant.sum())


@register_dataset("features", "your own pre-extracted features: DIR/{train,val,test}.npz, one array per modality")
class Features(DatasetPlugin):
    name = NAME
    description = "your own pre-extracted features: DIR/{train,val,test}.npz, one array per modality"
    layout_help = LAYOUT
    pure_build = True  # in memory, from the config and fingerprinted files: reused in a grid worker
    defaults = {
        "epochs": 30,
        "scheduler": "cosine",
        "embed_dim": 128,
        "backbone": {},
    }
    options = {
        "standardize": Option(True, "standardise every feature with the train mean/std (false: use as stored)"),
        "split_seed": Option(0, "seed of the stratified validation carve-out when there is no val.npz"),
        "encoder": Option("mlp", "backbone for every modality unless backbone.<m> is set", type=str),
        "name": Option(None, "what leaderboards call these data (their column); default: the data folder's name",
                       type=str, changes_results=False),
    }

    def _root(self, cfg: Mapping[str, Any]) -> Path:
        root = resolve_data_root(cfg, self.name)
        require_paths(self.name, root, ["train.npz", "test.npz"], LAYOUT)
        return root

    def _files(self, root: Path) -> dict[str, Path]:
        return {s: root / f"{s}.npz" for s in SPLITS if (root / f"{s}.npz").exists()}

    def available_modalities(self, cfg: Mapping[str, Any]) -> list[str]:
        path = self._root(cfg) / "train.npz"
        try:
            with np.load(path, allow_pickle=False) as f:
                return sorted(k for k in f.files if k != "label")
        except Exception as exc:
            raise DataError(f"Could not read '{path}': {exc}. Expected layout: {LAYOUT}") from exc

    def data_fingerprint(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """Content hash of the .npz files present: a copied folder is the same cell."""
        root = self._root(cfg)
        return {"files": hash_files(list(self._files(root).values()), root)}

    def build(self, cfg: Mapping[str, Any], modalities: Sequence[str]) -> Splits:
        root = self._root(cfg)
        files = self._files(root)
        arrays = {s: _load(p) for s, p in files.items()}
        all_mods = [k for k in arrays["train"] if k != "label"]
        for s, p in files.items():
            _validate(p, arrays[s], all_mods if s != "train" else None)
        _check_widths(files, arrays, all_mods)
        for s, p in files.items():
            for m in modalities:
                _check_finite(p, m, arrays[s][m])
        y_train = arrays["train"]["label"]
        if not len(y_train):
            raise DataError(f"'{files['train']}' holds no samples (array 'label' is empty).")
        classes = _check_labels(files, arrays)
        num_classes = len(classes)
        remap = not np.array_equal(classes, np.arange(num_classes))
        if remap:
            warnings.warn(
                f"features: the labels in '{root}' are {_shown_labels(classes)}, not 0..{num_classes - 1}; "
                f"they are trained as classes 0..{num_classes - 1} in that order (class names keep the "
                f"original labels; the mapping is recorded as dataset_info.label_map).",
                LabelRemapWarning, stacklevel=2,
            )
        fraction = float(cfg["val_fraction"])

        if "val" in files:
            keep = np.arange(len(y_train))
            hold = None
            rule = "val = the directory's own val.npz (val_fraction is ignored)"
        else:
            if fraction > 0:
                _check_carvable(files["train"], y_train, fraction)
            try:
                kept, held, rule = carve_validation(
                    list(range(len(y_train))), fraction, cfg["split_seed"], self.name,
                    labels=y_train, fallback=False,
                )
            except DataError as exc:
                raise DataError(
                    f"'{files['train']}': {exc} Or provide your own DIR/val.npz, or --set "
                    f"val_fraction=0 to validate on the test split."
                ) from exc
            keep = np.asarray(kept, dtype=np.int64)
            hold = None if held is None else np.asarray(held, dtype=np.int64)

        stats = {m: _standardiser(arrays["train"][m][keep]) for m in modalities} if cfg["standardize"] else {}

        def dataset(split: str, idx: np.ndarray | None = None) -> DictDataset:
            a = arrays[split]
            sel = slice(None) if idx is None else idx
            tensors = {}
            for m in modalities:
                x = a[m][sel]
                if m in stats:
                    x = (x - stats[m][0]) / stats[m][1]
                tensors[m] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            labels = a["label"][sel].astype(np.int64)
            if remap:  # original label -> its rank among train's classes
                labels = np.searchsorted(classes, labels)
            return DictDataset(tensors, torch.from_numpy(labels.astype(np.int64)))

        test = dataset("test")
        if "val" in files:
            train, val = dataset("train"), dataset("val")
        else:
            train = dataset("train", keep)
            val = dataset("train", hold) if hold is not None else test
        specs = {
            m: ModalitySpec("vector", (arrays["train"][m].shape[1],), {"default_backbone": cfg["encoder"]})
            for m in modalities
        }
        info: dict[str, Any] = {
            "root": str(root),
            "files": sorted(p.name for p in files.values()),
            "val_rule": rule,
            "val_is_test": val is test,
            "modalities_in_files": all_mods,
            "standardize": bool(cfg["standardize"]),
        }
        if stats:
            info["constant_features"] = {m: stats[m][2] for m in modalities}
        if remap:
            info["label_map"] = {str(c): i for i, c in enumerate(classes.tolist())}
        return Splits(train, val, test, specs, num_classes, [str(c) for c in classes.tolist()], info)


class NamedFeatureSet(Features):
    """A published feature set under its own name: the ``features`` machinery (same checks,
    standardisation, validation carve-out) plus what makes it *that* data set.

    A subclass states the folder under the data root (``data_subdir``), the views and their
    widths, the file sizes and classes it was published with, its default modalities
    (``modality_names``) and its recipe (``defaults``). Before any training the files are
    checked against that description, so a folder of other features (or a cut copy) under a
    known name is refused with the expected layout instead of training on the wrong data; one's
    own features go through ``--dataset features`` instead. Not registered itself.
    """

    data_subdir: ClassVar[str] = ""
    views: ClassVar[dict[str, int]] = {}  # view -> feature width, in file order
    rows: ClassVar[dict[str, int]] = {}  # split -> number of samples ("train", "test")
    class_names: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def layout(cls) -> str:
        views = ", ".join(f"'{v}' (N x {w})" for v, w in cls.views.items())
        sizes = " and ".join(f"{n} rows in {s}.npz" for s, n in cls.rows.items())
        return (
            f"<root>/{cls.data_subdir}/train.npz and test.npz (or <root>/train.npz and test.npz): "
            f"float32 arrays {views} and an int64 'label' in 0..{len(cls.class_names) - 1}, "
            f"{sizes}."
        )

    def _root(self, cfg: Mapping[str, Any]) -> Path:
        root = resolve_data_root(cfg, self.name, subdir=self.data_subdir)
        require_paths(self.name, root, ["train.npz", "test.npz"], self.layout())
        return root

    def available_modalities(self, cfg: Mapping[str, Any]) -> list[str]:
        return list(self.views)

    def default_modalities(self, cfg: Mapping[str, Any]) -> list[str]:
        return list(self.modality_names)

    def _check_published(self, files: Mapping[str, Path]) -> None:
        """The files hold this set's views at their widths, its row counts and its classes."""
        for split, path in files.items():
            arrays = _load(path)
            problems = [f"no array '{v}'" for v in self.views if v not in arrays]
            problems += [
                f"'{v}' is {arrays[v].shape[1] if arrays[v].ndim == 2 else arrays[v].shape} wide, not {w}"
                for v, w in self.views.items() if v in arrays and (arrays[v].ndim != 2 or arrays[v].shape[1] != w)
            ]
            y = arrays.get("label")
            if y is None:
                problems.append("no array 'label'")
            else:
                if split in self.rows and len(y) != self.rows[split]:
                    problems.append(f"{len(y)} rows, not {self.rows[split]}")
                if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.class_names)):
                    problems.append(f"labels outside 0..{len(self.class_names) - 1}")
            if problems:
                raise DataError(
                    f"Dataset '{self.name}': '{path}' is not the {self.name} feature set: "
                    f"{'; '.join(problems)}. Expected layout: {self.layout()} For features of your "
                    f"own, use --dataset features --data-root DIR."
                )

    def build(self, cfg: Mapping[str, Any], modalities: Sequence[str]) -> Splits:
        root = self._root(cfg)
        self._check_published(self._files(root))
        splits = super().build(cfg, modalities)
        splits.class_names = list(self.class_names)
        splits.info["views"] = list(modalities)
        return splits
