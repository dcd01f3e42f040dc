"""The dataset plugin contract and the shared data helpers.

A dataset plugin is a class registered with ``@register_dataset``. It declares its defaults
(training recipe, backbones per modality, its own options) and builds train / val / test
splits whose items are dicts ``{"<modality>": Tensor, ..., "label": int, "index": int}``.
Everything downstream (model assembly, trainer, metrics) only sees :class:`Splits`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset

from mmbalance import memo
from mmbalance.config import TRAINER_OPTIONS, Option
from mmbalance.errors import ConfigError, DataError

T = TypeVar("T")

DATA_ROOT_ENV = "MMBALANCE_DATA_ROOT"
# Used when neither --data-root nor $MMBALANCE_DATA_ROOT is given: ./data, then the shared data
# folder that sits beside a checkout of this project.
DEFAULT_ROOTS = (Path("data"), Path("../shared/data"))
# The schedule the IPRM paper trains all five of its datasets with (njustkmg/IJCAI25-IPRM main_av.py): momentum 0.9,
# weight decay 1e-4, StepLR every 70 epochs by 0.1, 100 epochs. Plugins spread it between
# their batch size / optimiser / lr and their embed_dim / backbones.
PAPER_SCHEDULE: dict[str, Any] = {
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "scheduler": "step",
    "step_size": 70,
    "gamma": 0.1,
    "epochs": 100,
}


@dataclass(frozen=True)
class ModalitySpec:
    """What one modality's tensors look like, so a backbone can be built for it.

    kind: "vector" (C,), "spectrogram" (1, F, T), "image" (C, H, W), "video" (C, T, H, W),
    "tokens" (L,) integer ids, or "sequence" (L, C) features.
    """

    kind: str
    shape: tuple[int, ...]
    extras: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Splits:
    """The three splits of one dataset plus what the model needs to know about them."""

    train: Dataset
    val: Dataset
    test: Dataset
    modalities: dict[str, ModalitySpec]
    num_classes: int
    class_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)  # recorded with the run (split rule...)
    collate: Any = None  # optional custom collate_fn (e.g. token padding)
    # optional per-batch train transform run on the device (the input cache's crops and flips)
    device_transform: Any = None


class DatasetPlugin:
    """Base class of dataset plugins.

    Subclasses set ``modality_names`` (default modality order), ``defaults`` (config values
    this dataset wants: epochs, lr, batch_size, ``backbone`` per modality, ...), ``options``
    (dataset-only keys and their defaults, e.g. ``image_noise``) and ``method_defaults``
    (per-method option values from the papers, e.g. IPRM's alpha per dataset), and implement
    :meth:`build`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    modality_names: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {}
    options: ClassVar[dict[str, Any]] = {}
    method_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    needs_data_root: ClassVar[bool] = True
    layout_help: ClassVar[str] = ""
    # The one-time preparation command of a dataset whose layout is derived from a raw
    # release (named in "missing data" errors); None where the data is read as distributed.
    prepare_command: ClassVar[str | None] = None
    # The folder under a shared data root that holds this dataset (resolve_data_root's subdir).
    data_subdir: ClassVar[str | None] = None
    # build() depends only on the config keys it reads, the modalities and the files that
    # data_fingerprint covers, and draws no global random numbers: the cells of one process
    # (a grid worker) then share one build (mmbalance.memo). In-memory datasets set it.
    pure_build: ClassVar[bool] = False

    def available_modalities(self, cfg: Mapping[str, Any]) -> list[str]:
        """Modalities this dataset can provide under ``cfg`` (files may decide, e.g. features)."""
        return list(self.modality_names)

    def default_modalities(self, cfg: Mapping[str, Any]) -> list[str]:
        """Modalities a run uses when ``--set modalities=`` is not given (default: all)."""
        return self.available_modalities(cfg)

    def build(self, cfg: Mapping[str, Any], modalities: Sequence[str]) -> Splits:
        """Build the splits, loading only ``modalities`` (a subset of the available ones)."""
        raise NotImplementedError

    def data_fingerprint(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """What identifies the data this run reads; it is part of the run's identity hash, so
        the same settings on another data folder are another cell, never old numbers.

        Default (large file datasets): the resolved root plus the names, sizes and
        modification times of its top-level entries: cheap enough for a million frames, and
        it changes when a folder is swapped, rebuilt or moved. Plugins whose files are small
        override this with :func:`hash_files` (a content hash, which survives copying the data
        to another folder). Datasets that read no files return ``{}``.
        """
        if not self.needs_data_root:
            return {}
        root = resolve_data_root(cfg, self.name, subdir=self.data_subdir)
        return {"root": str(root.resolve()), "listing": listing_digest(root)}


class BatchView(Dataset):
    """Wraps a dataset with ``get_batch`` so a DataLoader driven by a BatchSampler (with
    ``batch_size=None``) fetches whole batches in one call."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, indices: Sequence[int]) -> dict[str, Any]:
        return self.base.get_batch(indices)


class DictDataset(Dataset):
    """In-memory dataset of per-modality tensors; items are the contract's dicts."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], labels: torch.Tensor) -> None:
        n = len(labels)
        for name, t in tensors.items():
            if len(t) != n:
                raise ValueError(f"modality {name} has {len(t)} rows for {n} labels")
        self.tensors = dict(tensors)
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {m: t[i] for m, t in self.tensors.items()}
        item["label"] = int(self.labels[i])
        item["index"] = int(i)
        return item

    def get_batch(self, indices: Sequence[int]) -> dict[str, Any]:
        """Whole-batch fetch used by the trainer: one index op per modality instead of one
        dict per sample, which is most of the cost of small in-memory data."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch: dict[str, Any] = {m: t[idx] for m, t in self.tensors.items()}
        batch["label"] = self.labels[idx]
        batch["index"] = idx
        return batch

    def subset(self, idx: np.ndarray) -> DictDataset:
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        return DictDataset({m: t[idx_t] for m, t in self.tensors.items()}, self.labels[idx_t])


def hash_files(paths: Sequence[Path], root: Path) -> str:
    """sha256 over each file's path relative to ``root`` and its bytes (sorted by path), so
    the digest follows the content and not where the folder sits."""
    root = Path(root)
    ordered = sorted(Path(q) for q in paths)
    try:
        return memo.files_hash(ordered, root, lambda: _hash_files(ordered, root))
    except OSError as exc:
        raise DataError(f"Could not read '{exc.filename}' to fingerprint the data: {exc}.") from exc


def _hash_files(ordered: Sequence[Path], root: Path) -> str:
    h = hashlib.sha256()
    for p in ordered:
        try:
            rel = p.relative_to(root).as_posix()
        except ValueError:
            rel = p.name
        h.update(rel.encode() + b"\0")
        try:
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as exc:
            raise DataError(f"Could not read '{p}' to fingerprint the data: {exc}.") from exc
        h.update(b"\0")
    return h.hexdigest()[:16]


def listing_digest(root: Path) -> str:
    """sha256 of (name, size, mtime_ns) of the entries directly under ``root``."""
    h = hashlib.sha256()
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
        for e in entries:
            st = e.stat(follow_symlinks=True) if e.is_file() or e.is_dir() else e.stat(follow_symlinks=False)
            h.update(f"{e.name}\0{st.st_size if e.is_file() else -1}\0{st.st_mtime_ns}\n".encode())
    except OSError as exc:
        raise DataError(f"Could not list the data root '{root}': {exc}.") from exc
    return h.hexdigest()[:16]


class IndexSubset(Dataset):
    """Some rows of a dataset, keeping its whole-batch fetch and its labels."""

    def __init__(self, base: Any, indices: Sequence[int]) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        item = self.base[int(self.indices[i])]
        if isinstance(item, dict):
            item = {**item, "index": int(i)}
        return item

    @property
    def labels(self) -> np.ndarray | None:
        labels = getattr(self.base, "labels", None)
        return None if labels is None else np.asarray(labels)[self.indices]

    def __getattr__(self, name: str) -> Any:
        if name == "get_batch" and hasattr(self.base, "get_batch"):
            return self._get_batch
        raise AttributeError(name)

    def _get_batch(self, indices: Sequence[int]) -> dict[str, Any]:
        batch = self.base.get_batch(self.indices[np.asarray(indices, dtype=np.int64)].tolist())
        batch["index"] = torch.as_tensor(indices, dtype=torch.long)
        return batch

    def eval_view(self) -> IndexSubset:
        return IndexSubset(eval_view(self.base), self.indices)


class RowPlan(Dataset):
    """An epoch over a list of a split's rows, duplicates allowed (a resampled epoch).

    Item ``r`` is row ``rows[r]`` of ``base``; it keeps its ``index`` (the position in
    ``base``, so a method can look up what it knows of that sample) and gains ``row`` (the
    position in ``rows``, so two copies of one sample stay apart). Whole-batch fetch is kept.
    """

    def __init__(self, base: Any, rows: Sequence[int] | np.ndarray) -> None:
        self.base = base
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        n = len(base)
        if len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= n):
            raise ValueError(f"row plan names rows outside 0..{n - 1} of its split")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, r: int) -> Any:
        item = self.base[int(self.rows[r])]
        if isinstance(item, dict):
            item = {**item, "row": int(r)}
        return item

    @property
    def labels(self) -> np.ndarray | None:
        labels = getattr(self.base, "labels", None)
        return None if labels is None else np.asarray(labels)[self.rows]

    def __getattr__(self, name: str) -> Any:
        if name == "get_batch" and hasattr(self.base, "get_batch"):
            return self._get_batch
        raise AttributeError(name)

    def _get_batch(self, positions: Sequence[int]) -> dict[str, Any]:
        batch = self.base.get_batch(self.rows[np.asarray(positions, dtype=np.int64)].tolist())
        batch["row"] = torch.as_tensor(positions, dtype=torch.long)
        return batch


def eval_view(ds: Any) -> Any:
    """The same rows as ``ds`` read with the evaluation pipeline (no random crops, flips or
    frame draws): what a method measures on train data without augmentation.

    A dataset that augments in training says how to read it otherwise with an ``eval_view()``
    method; in-memory data (:class:`DictDataset`, which never augments) is its own view.
    Anything else is refused rather than silently measured on augmented items.
    """
    if hasattr(ds, "eval_view"):
        return ds.eval_view()
    if isinstance(ds, DictDataset):
        return ds
    raise DataError(
        f"{type(ds).__name__} does not say how to read its rows without training augmentation "
        f"(no eval_view() method), so an un-augmented pass over it is impossible. Give the "
        f"dataset class an eval_view() that returns the same rows with the evaluation pipeline."
    )


def subset(ds: Any, indices: Sequence[int] | np.ndarray) -> Any:
    """Rows ``indices`` of a split: in-memory data is copied, anything else viewed."""
    if isinstance(ds, DictDataset):
        return ds.subset(np.asarray(indices))
    return IndexSubset(ds, indices)


def stratified_holdout(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (keep, holdout) with ``fraction`` of each class held out.

    Used to carve a validation split from train where the source ships none; the seed is fixed
    per dataset (not the run seed) so every run of a grid validates on the same samples.
    Raises ValueError (sklearn's) when some class is too small to stratify; see
    :func:`carve_validation` for the plugins' policy around it.
    """
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    keep, hold = train_test_split(
        idx, test_size=fraction, random_state=seed, stratify=labels, shuffle=True
    )
    return np.sort(keep), np.sort(hold)


def every_class_on_both_sides(
    labels: np.ndarray, keep: np.ndarray, hold: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Make a stratified (keep, hold) split leave at least one sample of every class on each side.

    sklearn rounds each class's share, so a small class can end up entirely on one side (a
    class of 4 at val_fraction 0.1 gets no validation sample; at 0.9 none is left to train on):
    the run would never learn it, or select epochs without ever checking it. One sample of such
    a class is moved across, chosen with ``seed``; a split that already has every class on both
    sides is returned unchanged. Returns (keep, hold, the classes moved). A class with a single
    sample cannot be on both sides: ValueError naming it (callers turn it into their DataError).
    """
    labels = np.asarray(labels)
    keep_l, hold_l = list(keep), list(hold)
    classes, counts = np.unique(labels, return_counts=True)
    single = [str(c) for c, n in zip(classes, counts, strict=True) if n < 2]
    if single:
        raise ValueError(f"class {', '.join(single)} has a single sample, which cannot be both "
                         f"trained on and validated")
    rng = np.random.default_rng(seed)
    in_keep, in_hold = set(labels[keep].tolist()), set(labels[hold].tolist())
    moved: list[str] = []
    for c in classes.tolist():
        src, dst = (keep_l, hold_l) if c not in in_hold else (hold_l, keep_l) if c not in in_keep else (None, None)
        if src is None:
            continue
        own = [i for i in src if labels[i] == c]
        pick = own[int(rng.integers(len(own)))]
        src.remove(pick)
        dst.append(pick)
        moved.append(str(c))
    return np.sort(np.asarray(keep_l, dtype=np.int64)), np.sort(np.asarray(hold_l, dtype=np.int64)), moved


def random_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep, holdout) indices of a plain seeded holdout of ``fraction`` of ``n`` samples
    (at least one held out, at least one kept): the fallback where stratifying is impossible."""
    order = np.random.default_rng(seed).permutation(n)
    n_hold = min(max(1, round(fraction * n)), n - 1)
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def carve_validation(
    items: Sequence[T],
    fraction: float,
    seed: int,
    dataset: str,
    *,
    labels: Sequence[int] | np.ndarray | None = None,
    fallback: bool = False,
) -> tuple[list[T], list[T] | None, str]:
    """Hold out ``fraction`` of a train split's ``items`` as validation: (train, val, rule).

    The one rule every plugin without a validation split follows: a holdout stratified by
    ``labels`` (default: each item's ``.label``) with the dataset's fixed ``seed``, not the run
    seed, so every cell of a grid validates on the same samples. ``fraction == 0`` keeps all
    of train and returns ``val=None``: validate on the test split (the papers' protocol). When
    some class is too small to stratify, ``fallback=True`` takes a plain seeded holdout instead
    (tiny subsets); without it that is a DataError. ``rule`` says what was done and is recorded
    with the run.
    """
    fraction = float(fraction)
    if fraction <= 0:
        rule = "val_fraction=0: no holdout, training on the full train split; val is the test split"
        return list(items), None, rule
    if fraction >= 1:
        raise ConfigError(
            f"Dataset '{dataset}': val_fraction must be below 1 (the share of train held out "
            f"for validation), got {fraction}. Use e.g. --set val_fraction=0.1."
        )
    if labels is None:
        labels = [item.label for item in items]  # type: ignore[attr-defined]
    moved: list[str] = []
    try:
        keep, hold = stratified_holdout(np.asarray(labels), fraction, seed)
        keep, hold, moved = every_class_on_both_sides(np.asarray(labels), keep, hold, seed)
        kind, how = "stratified", "sklearn train_test_split"
    except ValueError as exc:
        if not fallback:
            raise DataError(
                f"Dataset '{dataset}': cannot hold out a stratified val_fraction={fraction} of "
                f"{len(items)} training samples ({exc}). Use a larger train split or change "
                f"--set val_fraction=..."
            ) from exc
        keep, hold = random_holdout(len(items), fraction, seed)
        kind, how = "random", "too few samples per class to stratify"
    rule = (
        f"val = {kind} {fraction:g} of the train split ({how}, fixed seed {seed}, not the run "
        f"seed); {len(keep)} train / {len(hold)} val"
        + (f"; moved one sample of class {', '.join(moved)} so that every class is in both" if moved else "")
    )
    return [items[i] for i in keep], [items[i] for i in hold], rule


def option(cfg: Mapping[str, Any], plugin: type[DatasetPlugin] | DatasetPlugin, key: str) -> Any:
    """A dataset option from the run config, falling back to the plugin's declared default
    (or, for a trainer key such as ``val_fraction``, the trainer's)."""
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    default = plugin.options[key] if key in plugin.options else TRAINER_OPTIONS[key]
    return default.default if isinstance(default, Option) else default


def check_modalities(
    dataset: str, modalities: Sequence[str] | None, known: Sequence[str]
) -> tuple[str, ...]:
    """The requested modalities (all of ``known`` when none are given), refusing unknown ones."""
    mods = tuple(modalities or known)
    bad = [m for m in mods if m not in known]
    if bad:
        raise ConfigError(
            f"Dataset '{dataset}' has modalities {', '.join(known)}; got unknown modality "
            f"{', '.join(bad)}. Pick from those with --set modalities={','.join(known)} (or a "
            f"subset)."
        )
    return mods


def resolve_data_root(cfg: Mapping[str, Any], dataset: str, subdir: str | None = None) -> Path:
    """The directory a dataset reads: ``data_root`` from the config, else $MMBALANCE_DATA_ROOT.

    With ``subdir``, ``<root>/<subdir>`` is used when it exists, so one root can hold several
    datasets, and a root pointing straight at the dataset folder works too.
    """
    raw = cfg.get("data_root") or os.environ.get(DATA_ROOT_ENV)
    if not raw:
        fallback = next((p for p in DEFAULT_ROOTS if p.is_dir()), None)
        if fallback is None:
            raise DataError(
                f"Dataset '{dataset}' needs a data root: pass --data-root DIR or set the "
                f"environment variable {DATA_ROOT_ENV} (looked for a default in "
                f"{', '.join(str(p.resolve()) for p in DEFAULT_ROOTS)})."
            )
        raw = str(fallback)
    root = Path(raw).expanduser()
    if not root.is_dir():
        prep = _prepare_command(dataset)
        raise DataError(
            f"Data root '{root}' for dataset '{dataset}' does not exist or is not a directory. "
            f"Pass --data-root DIR (or set {DATA_ROOT_ENV}) to the folder that holds the data."
            + (f" To build it from the raw release, run `{prep}`." if prep else "")
        )
    if subdir and (root / subdir).is_dir():
        return root / subdir
    return root


def _prepare_command(dataset: str) -> str | None:
    """The registered plugin's one-time preparation command, if it has one."""
    from mmbalance.registry import DATASETS

    try:
        return getattr(DATASETS.get(dataset), "prepare_command", None)
    except Exception:  # an unregistered name: no hint rather than a second error
        return None


def require_paths(
    dataset: str, root: Path, rel_paths: Sequence[str | Path], layout: str, fix: str = ""
) -> None:
    """Raise one DataError listing every expected path under ``root`` that is missing.

    ``rel_paths`` are relative to ``root`` or full paths; a full path inside ``root`` is shown
    relative to it.
    """
    missing = [_shown(root, p) for p in rel_paths if not (root / p).exists()]
    if missing:
        shown = ", ".join(missing[:8]) + (f" (and {len(missing) - 8} more)" if len(missing) > 8 else "")
        raise DataError(
            f"Dataset '{dataset}': looked in '{root}' and did not find {shown}. Expected layout: "
            f"{layout}{(' ' + fix) if fix else ''}"
        )


def _shown(root: Path, path: str | Path) -> str:
    """``path`` (relative to ``root``, or full) as relative to ``root`` when it is inside it."""
    try:
        return str((root / path).relative_to(root))
    except ValueError:
        return str(path)


def check_split(
    dataset: str,
    split: str,
    listed: Sequence[str],
    usable: Sequence[str],
    expected: int | None,
    fix: str,
    strict: bool = True,
) -> list[str]:
    """Compare a split's listed samples with those whose files exist, and with the manifest.

    ``listed``: ids named by the split file; ``usable``: those whose files are all present;
    ``expected``: the manifest count for the paper's split (None when the split is the user's
    own). A manifest mismatch is an error only when ``strict`` (fixtures and subsets pass
    ``strict=False`` via the dataset's ``check_manifest`` option). Returns the notes recorded
    with the run.
    """
    usable_set = set(usable)
    missing = [i for i in listed if i not in usable_set]
    notes: list[str] = []
    if not usable:
        raise DataError(
            f"Dataset '{dataset}', split '{split}': none of the {len(listed)} listed samples "
            f"has its files on disk. {fix}"
        )
    if missing:
        notes.append(f"{split}: {len(missing)} listed samples lack files (e.g. {missing[:3]})")
    if expected is not None and len(usable) != expected:
        msg = (
            f"Dataset '{dataset}', split '{split}': the manifest expects {expected} samples, "
            f"found {len(usable)} usable of {len(listed)} listed"
            + (f"; missing files for {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "") if missing else "")
            + (f"; {len(usable) - expected} more than expected" if len(usable) > expected else "")
            + f". {fix} To run on a subset on purpose, pass --set check_manifest=false."
        )
        if strict:
            raise DataError(msg)
        notes.append(msg)
    return notes
