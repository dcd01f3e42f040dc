"""IEMOCAP: audio + face + transcript, 4 emotions (Angry, Happy, Neutral, Sad).

Two processed layouts (docs/datasets/iemocap.md):

* Layout A, MLA's (the IPRM paper follows MLA): ``my_{train,test}_iemo.txt`` lists with the
  literal `` [split|sign] `` separator, kaldi fbank ``.npy`` (1024, 128), BERT ids without
  special tokens ``<utt>_token.npy`` int64 (1, 256) with a padding mask ``<utt>_pm.npy``
  (1.0 = padding), and a folder of 256-px face crops per utterance of which the middle file is
  used. MLA ships no validation list: one is carved from train with a fixed seed.
* Layout B, MulT's feature pickles ``iemocap_data.pkl`` (word-aligned) or
  ``iemocap_data_noalign.pkl``: GloVe / COVAREP / Facet sequences with train / valid / test.
  Registered separately as ``iemocap_mult`` whose backbones are ``seq_transformer``.
  Unpickling can run arbitrary code and a data root may be writable by others, so the loader
  does not unpickle: ``mmbalance prepare iemocap_mult --raw DIR --out ROOT`` converts each
  pickle once (the one explicit trust step, through an allow-list unpickler that accepts only
  numpy arrays in plain containers) into ``iemocap_data.npz`` / ``iemocap_data_noalign.npz``
  (arrays ``<split>__<key>``), read here with ``np.load(..., allow_pickle=False)``. A root
  holding only the ``.pkl`` is a DataError saying so; ``unsafe_unpickle=true`` reads the pickle
  directly instead (still through the allow-list unpickler), for files the user trusts.

Modality order (m1, m2, m3) = (audio, visual, text), our guess for IEMOCAP (docs/datasets/iemocap.md).
Labels are the position in the sorted names in both layouts: Angry 0, Happy 1, Neutral 2,
Sad 3. Decision: the face is the middle file of the SORTED listing (MLA indexes the unsorted
``os.listdir`` order, which differs between filesystems; ``frame_pick=listdir`` reproduces it).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
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
    DictDataset,
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
from mmbalance.media import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    list_frames,
    load_fbank_npy,
    load_npy_feature,
    load_rgb,
    read_text_lines,
)
from mmbalance.registry import register_dataset

CLASS_NAMES = ["Angry", "Happy", "Neutral", "Sad"]  # sorted: the MLA label index
SEPARATOR = " [split|sign] "
VAL_SEED = 2024
MANIFEST_MLA = {"train": 3318, "test": 1107}
MANIFEST_MULT = {"train": 2717, "valid": 798, "test": 938}
MULT_EMOTIONS = ("Neutral", "Happy", "Sad", "Angry")  # order of the pickles' label axis
MULT_FILES = {True: "iemocap_data.pkl", False: "iemocap_data_noalign.pkl"}  # as MulT ships them
MULT_NPZ = {True: "iemocap_data.npz", False: "iemocap_data_noalign.npz"}  # mmbalance prepare iemocap_mult
MULT_SEP = "__"  # .npz array name = f"{split}{MULT_SEP}{key}"
PREPARE_MULT = "mmbalance prepare iemocap_mult"
MULT_KEYS = {"audio": "audio", "visual": "vision", "text": "text"}
LIST_FILES = {"train": "my_train_iemo.txt", "test": "my_test_iemo.txt"}
LAYOUT_A_BACKBONES = ("fbank_transformer", "vit", "bert", "m3ae_text")


@dataclass(frozen=True)
class Utterance:
    utt: str
    transcript: str
    label: int
    split: str  # folder prefix: train / test


def parse_list_line(text: str, source: Path, line: int) -> Utterance:
    """``<utt>.mp4 [split|sign] <transcript> [split|sign] <Label>`` -> Utterance."""
    parts = text.split(SEPARATOR)
    if len(parts) < 3:
        raise DataError(
            f"{source}, line {line + 1}: expected '<utt>.mp4{SEPARATOR}<text>{SEPARATOR}<Label>' "
            f"(the separator is the literal ' [split|sign] '), got {text[:100]!r}."
        )
    name, label = parts[0].strip(), parts[-1].strip()
    if label not in CLASS_NAMES:
        raise DataError(
            f"{source}, line {line + 1}: unknown emotion {label!r}; IEMOCAP here has "
            f"{', '.join(CLASS_NAMES)}."
        )
    utt = name[: -len(".mp4")] if name.endswith(".mp4") else name
    return Utterance(utt, SEPARATOR.join(parts[1:-1]).strip(), CLASS_NAMES.index(label), "")


def read_list(path: Path, split: str) -> list[Utterance]:
    out = []
    for i, text in enumerate(read_text_lines(path)):
        u = parse_list_line(text, path, i)
        out.append(Utterance(u.utt, u.transcript, u.label, split))
    return out


# MLA builds its train transform with timm's create_transform(..., color_jitter=True); timm
# 0.4.5 turns a scalar into (float(x),) * 3, so True is brightness = contrast = saturation = 1.0
# (timm's default, 0.4, applies only when the argument is left out).
MLA_COLOR_JITTER = 1.0


def image_transform(train: bool, size: int, color_jitter: float = MLA_COLOR_JITTER) -> Any:
    """MLA's face transforms with torchvision (torch's global RNG, unlike timm's ``random``).

    Train = what timm 0.4.5's ``create_transform(size, is_training=True, color_jitter=True,
    interpolation="bicubic")`` builds: RandomResizedCrop (scale 0.08-1, bicubic) + flip +
    ColorJitter(brightness, contrast, saturation = ``color_jitter``, no hue), 1.0 for MLA's
    ``True`` (:data:`MLA_COLOR_JITTER`; 0 turns it off); test = Resize(size, bicubic) +
    CenterCrop(size). Both ImageNet-normalised.
    """
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        return T.Compose(
            [
                T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=bicubic),
                T.RandomHorizontalFlip(),
                *([T.ColorJitter(color_jitter, color_jitter, color_jitter)] if color_jitter > 0 else []),
                *norm,
            ]
        )
    return T.Compose([T.Resize(size, interpolation=bicubic), T.CenterCrop(size), *norm])


class MLAPaths:
    """Where Layout A keeps one utterance's files."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def fbank(self, u: Utterance) -> Path:
        return self.root / "audio" / f"{u.split}_fbank" / f"{u.utt}.npy"

    def tokens(self, u: Utterance) -> tuple[Path, Path]:
        folder = self.root / "text_token" / f"{u.split}_token"
        return folder / f"{u.utt}_token.npy", folder / f"{u.utt}_pm.npy"

    def faces(self, u: Utterance) -> Path:
        return self.root / "visual" / f"{u.split}_imgs" / u.utt

    def has(self, u: Utterance, modality: str) -> bool:
        if modality == "audio":
            return self.fbank(u).is_file()
        if modality == "text":
            return all(p.is_file() for p in self.tokens(u))
        folder = self.faces(u)
        return folder.is_dir() and bool(list_frames(folder, sort=False))


PREPARE_MLA = "mmbalance prepare iemocap --raw RAW --out ROOT"


class MLAUtterances(Dataset):
    """Layout A items: fbank, face image and token ids, read on demand."""

    def __init__(
        self,
        utts: Sequence[Utterance],
        modalities: Sequence[str],
        paths: MLAPaths,
        train: bool,
        image_size: int,
        sorted_frames: bool,
        fbank_shape: tuple[int, ...] | None,
        color_jitter: float = MLA_COLOR_JITTER,
    ) -> None:
        self.utts = list(utts)
        self.modalities = tuple(modalities)
        self.paths = paths
        self.transform = image_transform(train, image_size, color_jitter)
        self.eval_transform = image_transform(False, image_size, color_jitter)
        self.sorted_frames = sorted_frames
        self.fbank_shape = fbank_shape

    def eval_view(self) -> MLAUtterances:
        """The same utterances with the evaluation face transform (resize, centre crop)."""
        view = copy.copy(self)
        view.transform = self.eval_transform
        return view

    def __len__(self) -> int:
        return len(self.utts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return self._item(i)
        except DataError as exc:
            raise DataError(f"{exc} If the prepared files are incomplete, re-run `{PREPARE_MLA}`.") from exc

    def _item(self, i: int) -> dict[str, Any]:
        u = self.utts[i]
        item: dict[str, Any] = {}
        for m in self.modalities:
            if m == "audio":
                item[m] = load_fbank_npy(self.paths.fbank(u), self.fbank_shape)
            elif m == "visual":
                folder = self.paths.faces(u)
                names = list_frames(folder, sort=self.sorted_frames)
                if not names:
                    raise DataError(f"Face folder '{folder}' holds no images.")
                item[m] = self.transform(load_rgb(folder / names[len(names) // 2]))
            elif m == "text":
                item[m] = read_tokens(*self.paths.tokens(u))
        item["label"] = u.label
        item["index"] = i
        return item


def read_tokens(token_path: Path, mask_path: Path) -> dict[str, torch.Tensor]:
    """MLA's ``_token.npy`` (1, L) ids and ``_pm.npy`` (1, L) padding mask (1.0 = padding)."""
    try:
        ids = np.load(token_path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"Token file '{token_path}' is missing or not a .npy array ({exc}).") from exc
    pad = load_npy_feature(mask_path)
    ids = torch.from_numpy(np.asarray(ids, dtype=np.int64)).reshape(-1)
    pad = pad.reshape(-1)
    if ids.shape != pad.shape:
        raise DataError(
            f"'{token_path}' holds {ids.numel()} ids but '{mask_path}' {pad.numel()} mask "
            f"values; they must have the same length (MLA stores (1, 256) each)."
        )
    return {"input_ids": ids, "attention_mask": (1 - pad).round().long()}


def mult_labels(raw: np.ndarray, source: Path, split: str) -> np.ndarray:
    """MulT labels -> one class index (sorted names) per sample.

    (N, 4, 2) holds a 2-way one-hot per emotion (Neutral, Happy, Sad, Angry): positive = argmax
    1. (N, 4) holds 0/1 directly. Only a single-label reading is a 4-class task, so every
    sample must have exactly one positive emotion.
    """
    arr = np.asarray(raw)
    if arr.ndim == 3 and arr.shape[1:] == (4, 2):
        pos = arr.argmax(-1) == 1
    elif arr.ndim == 2 and arr.shape[1] == 4:
        pos = arr > 0.5
    else:
        raise DataError(
            f"'{source}' split '{split}': labels have shape {arr.shape}; expected (N, 4, 2) "
            f"or (N, 4) for the emotions {', '.join(MULT_EMOTIONS)}."
        )
    counts = pos.sum(1)
    if not np.all(counts == 1):
        raise DataError(
            f"'{source}' split '{split}': {int((counts == 0).sum())} samples have no positive "
            f"emotion and {int((counts > 1).sum())} more than one, so the labels cannot be read "
            f"as one of 4 classes. This loader needs single-label pickles (MulT's 4-class IEMOCAP)."
        )
    to_sorted = np.array([CLASS_NAMES.index(e) for e in MULT_EMOTIONS])
    return to_sorted[pos.argmax(1)]


def mult_modality(split: Mapping[str, Any], modality: str, source: Path, name: str) -> torch.Tensor:
    key = MULT_KEYS[modality]
    if key not in split:
        raise DataError(f"'{source}' split '{name}' has no '{key}' array (keys: {sorted(split)}).")
    arr = np.array(split[key], dtype=np.float32)
    if arr.ndim != 3:
        raise DataError(f"'{source}' split '{name}': '{key}' has shape {arr.shape}; expected (N, L, D).")
    arr[np.isneginf(arr)] = 0.0  # COVAREP holds -inf; BalanceMM zeroes them
    return torch.from_numpy(arr)


@register_dataset("iemocap", "IEMOCAP: audio fbank + face + transcript, 4 emotions (MLA layout; or MulT pickles)")
class IEMOCAP(DatasetPlugin):
    data_subdir = "IEMOCAP"
    prepare_command = "mmbalance prepare iemocap --raw RAW --out ROOT (or iemocap_mult for MulT's pickles)"
    name = "iemocap"
    description = "IEMOCAP: audio + face + transcript, 4 emotions (MLA lists; MulT pickles)"
    modality_names = ("audio", "visual", "text")
    defaults = {
        "batch_size": 16,
        "optimizer": "sgd",
        "lr": 1e-3,
        **PAPER_SCHEDULE,
        "embed_dim": 768,
        "backbone": {
            "audio": {"name": "fbank_transformer"},
            # img_size follows the modality (image_size, 256 by default): one knob, no mismatch
            "visual": {"name": "vit"},
            # MLA's text encoder is M3AE's text branch (not BERT) over BERT-vocabulary ids
            "text": {"name": "m3ae_text"},
        },
    }
    method_defaults = {"iprm": {"alpha": 0.7}}
    options = {
        "check_manifest": Option(True, "fail unless the splits hold the manifest's sample counts (MLA 3318 / 1107; MulT 2717 / 798 / 938)", changes_results=False),
        "layout": Option("auto", "mla = MLA lists + npy + faces; mult = MulT features (.npz from 'mmbalance prepare iemocap_mult'); auto = whichever is present", ["auto", "mla", "mult"]),
        "aligned": Option(True, "MulT layout: iemocap_data.npz (word-aligned) or, when false, iemocap_data_noalign.npz"),
        "unsafe_unpickle": Option(False, "MulT layout: unpickle MulT's .pkl directly when its .npz is absent; a pickle can run arbitrary code, use only on files you trust (allow-list unpickler still applied; safe path: 'mmbalance prepare iemocap_mult')", changes_results=False),
        "image_size": Option(256, "MLA layout: face image size (train random-resized crop, test resize + centre crop)"),
        "frame_pick": Option("sorted", "MLA layout: the face is the middle file of the sorted listing, or of os.listdir order (official)", ["sorted", "listdir"]),
        "color_jitter": Option(MLA_COLOR_JITTER, "MLA layout: train colour jitter (brightness = contrast = saturation); 1.0 = MLA's timm color_jitter=True, 0.4 = timm's default, 0 = none", min=0.0),
    }
    layout_help = (
        "IEMOCAP root (or <root>/IEMOCAP), MLA layout: my_train_iemo.txt and my_test_iemo.txt "
        "(in the root or its data/ folder; lines '<utt>.mp4 [split|sign] <text> [split|sign] "
        "<Label>'), audio/{train,test}_fbank/<utt>.npy (1024, 128), "
        "text_token/{train,test}_token/<utt>_token.npy and <utt>_pm.npy (1, 256), "
        "visual/{train,test}_imgs/<utt>/*.jpg; or MulT layout: iemocap_data.npz / "
        "iemocap_data_noalign.npz (use the dataset 'iemocap_mult'). 'mmbalance prepare iemocap "
        "--raw RAW --out ROOT' builds the MLA layout from the IEMOCAP release and MLA's lists "
        "(tokens need --set vocab=.../vocab.txt, faces --set faces_dir=DIR); 'mmbalance prepare "
        "iemocap_mult --raw DIR --out ROOT' converts MulT's iemocap_data.pkl / "
        "iemocap_data_noalign.pkl once into those .npz files (the loader does not unpickle: a "
        "pickle can run code; unsafe_unpickle=true reads a trusted .pkl directly)."
    )

    def build(self, cfg: Mapping[str, Any], modalities: Sequence[str]) -> Splits:
        mods = check_modalities(self.name, modalities, self.modality_names)
        root = resolve_data_root(cfg, self.name, subdir="IEMOCAP")
        layout = self._layout(cfg, root)
        if layout == "mult":
            self._check_mult_backbones(cfg, mods)
            return self._build_mult(cfg, root, mods)
        return self._build_mla(cfg, root, mods)

    # --- layout detection --------------------------------------------------------------
    def _layout(self, cfg: Mapping[str, Any], root: Path) -> str:
        layout = option(cfg, self, "layout")
        if layout != "auto":
            return layout
        if _find_lists(root):
            return "mla"
        if any((root / f).is_file() for f in (*MULT_NPZ.values(), *MULT_FILES.values())):
            return "mult"
        raise DataError(
            f"Dataset '{self.name}': '{root}' holds neither MLA's lists ({LIST_FILES['train']}, "
            f"{LIST_FILES['test']}) nor MulT's features ({', '.join(MULT_NPZ.values())}, or the "
            f"pickles {', '.join(MULT_FILES.values())} to convert). Expected layout: {self.layout_help}"
        )

    def _check_mult_backbones(self, cfg: Mapping[str, Any], mods: Sequence[str]) -> None:
        table = cfg.get("backbone") or {}
        wrong = [m for m in mods if (table.get(m) or {}).get("name") in LAYOUT_A_BACKBONES]
        if wrong:
            sets = " ".join(f"--set backbone.{m}=seq_transformer" for m in wrong)
            raise ConfigError(
                f"Dataset '{self.name}' found MulT's features, whose modalities are (L, D) "
                f"feature sequences, but modalities {', '.join(wrong)} are set to the MLA-layout "
                f"backbones ({', '.join((table.get(m) or {}).get('name') for m in wrong)}). Use "
                f"the dataset 'iemocap_mult' (its defaults are seq_transformer), or pass {sets}."
            )

    # --- Layout A ----------------------------------------------------------------------
    def _build_mla(self, cfg: Mapping[str, Any], root: Path, mods: Sequence[str]) -> Splits:
        lists = _find_lists(root)
        if not lists:
            require_paths(self.name, root, list(LIST_FILES.values()), self.layout_help)
        dirs = {"audio": "audio", "visual": "visual", "text": "text_token"}
        require_paths(self.name, root, [dirs[m] for m in mods], self.layout_help)
        paths = MLAPaths(root)
        strict = bool(option(cfg, self, "check_manifest"))
        fix = "Re-run MLA's preprocessing for the missing utterances, or fix the list."
        usable: dict[str, list[Utterance]] = {}
        notes: list[str] = []
        for split, path in lists.items():
            listed = read_list(path, split)
            ok = [u for u in listed if all(paths.has(u, m) for m in mods)]
            notes += check_split(
                self.name, split, [u.utt for u in listed], [u.utt for u in ok],
                MANIFEST_MLA[split], fix, strict=strict,
            )
            usable[split] = ok
        train_u, held, rule = carve_validation(
            usable["train"], option(cfg, self, "val_fraction"), VAL_SEED, self.name, fallback=True
        )
        val_u = held if held is not None else usable["test"]
        fbank_shape = _first_shape(paths.fbank(usable["train"][0])) if "audio" in mods else None
        size = int(option(cfg, self, "image_size"))
        sorted_frames = option(cfg, self, "frame_pick") == "sorted"
        jitter = float(option(cfg, self, "color_jitter"))

        def make(utts: Sequence[Utterance], train: bool) -> MLAUtterances:
            return MLAUtterances(utts, mods, paths, train, size, sorted_frames, fbank_shape, jitter)

        specs = {m: self._mla_spec(m, paths, usable["train"][0], size, fbank_shape) for m in mods}
        info = {
            "layout": "mla",
            "root": str(root),
            "lists": {k: str(v) for k, v in lists.items()},
            "val_split": rule,
            "val_is_test": held is None,
            "val_utterances": [u.utt for u in held] if held is not None else None,
            "frame_pick": option(cfg, self, "frame_pick"),
            "image_transform": (
                f"train: RandomResizedCrop({size}, scale 0.08-1, bicubic) + flip + ColorJitter("
                f"{jitter:g}, {jitter:g}, {jitter:g}); eval: Resize({size}, bicubic) + "
                f"CenterCrop({size}); ImageNet mean/std"
            ),
            "color_jitter": jitter,
            "notes": notes,
        }
        return Splits(
            make(train_u, True), make(val_u, False), make(usable["test"], False),
            specs, len(CLASS_NAMES), list(CLASS_NAMES), info,
        )

    @staticmethod
    def _mla_spec(
        m: str, paths: MLAPaths, first: Utterance, size: int, fbank_shape: tuple[int, ...] | None
    ) -> ModalitySpec:
        if m == "audio":
            return ModalitySpec("spectrogram", (1, *fbank_shape), {"format": "kaldi fbank (1, frames, mel)"})
        if m == "visual":
            return ModalitySpec("image", (3, size, size))
        length = _first_shape(paths.tokens(first)[0])[-1]
        return ModalitySpec("tokens", (length,), {"special_tokens": False, "tokenizer": "bert-base-uncased"})

    # --- Layout B ----------------------------------------------------------------------
    def _build_mult(self, cfg: Mapping[str, Any], root: Path, mods: Sequence[str]) -> Splits:
        path = self._mult_file(cfg, root)
        strict = bool(option(cfg, self, "check_manifest"))
        splits: dict[str, DictDataset] = {}
        notes: list[str] = []
        with _open_mult(path) as data:
            for split in ("train", "valid", "test"):
                if split not in data:
                    raise DataError(f"'{path}' has no '{split}' split (keys: {sorted(data)}).")
                part = data[split]
                labels = mult_labels(part.get("labels"), path, split)
                ids = [str(k) for k in range(len(labels))]
                notes += check_split(self.name, split, ids, ids, MANIFEST_MULT[split], "Check the pickle.", strict=strict)
                tensors = {m: mult_modality(part, m, path, split) for m in mods}
                splits[split] = DictDataset(tensors, torch.from_numpy(labels))
        specs = {
            m: ModalitySpec("sequence", tuple(splits["train"].tensors[m].shape[1:]), {"source": MULT_KEYS[m]})
            for m in mods
        }
        info = {"layout": "mult", "file": str(path), "val_split": "the pickle's 'valid' split", "val_is_test": False, "notes": notes}
        return Splits(
            splits["train"], splits["valid"], splits["test"], specs, len(CLASS_NAMES), list(CLASS_NAMES), info
        )

    def _mult_file(self, cfg: Mapping[str, Any], root: Path) -> Path:
        """The prepared ``.npz``; MulT's ``.pkl`` only with ``unsafe_unpickle``, else a DataError."""
        aligned = bool(option(cfg, self, "aligned"))
        npz, pkl = root / MULT_NPZ[aligned], root / MULT_FILES[aligned]
        if npz.is_file():
            return npz
        fix = f"run `{PREPARE_MULT} --raw {root} --out {root}` to convert it once into a safe .npz"
        if pkl.is_file():
            if option(cfg, self, "unsafe_unpickle"):
                return pkl
            raise DataError(
                f"Dataset '{self.name}': '{root}' holds MulT's pickle '{pkl}' but not '{npz.name}'. "
                f"Unpickling a file can run arbitrary code, so the loader does not read pickles: "
                f"{fix} (or, only for a file you trust, --set unsafe_unpickle=true reads it directly)."
            )
        require_paths(
            self.name, root, [npz.name], self.layout_help,
            f"Set aligned=false for the unaligned file. From MulT's {pkl.name}, run "
            f"`{PREPARE_MULT} --raw DIR --out {root}` to convert it once into a safe .npz.",
        )
        return npz


@register_dataset("iemocap_mult", "IEMOCAP as MulT feature pickles: GloVe / COVAREP / Facet sequences, 4 emotions")
class IEMOCAPMulT(IEMOCAP):
    """The MulT pickles with sequence backbones by default (same options as ``iemocap``)."""

    name = "iemocap_mult"
    description = "IEMOCAP MulT pickles: text/audio/vision feature sequences, 4 emotions"
    defaults = {
        **IEMOCAP.defaults,
        "backbone": {m: {"name": "seq_transformer"} for m in IEMOCAP.modality_names},
    }
    options = {**IEMOCAP.options, "layout": Option("mult", "mult = MulT features (.npz from 'mmbalance prepare iemocap_mult')", ["mult"])}


def _find_lists(root: Path) -> dict[str, Path]:
    """The MLA list files, in the root or in its data/ folder (where MLA commits them)."""
    for folder in (root, root / "data"):
        found = {s: folder / f for s, f in LIST_FILES.items() if (folder / f).is_file()}
        if len(found) == len(LIST_FILES):
            return found
    return {}


def _first_shape(path: Path) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in np.load(path, mmap_mode="r", allow_pickle=False).shape)
    except Exception as exc:
        raise DataError(f"'{path}' is not a readable .npy array ({exc}).") from exc


@contextmanager
def _open_mult(path: Path) -> Iterator[Mapping[str, Mapping[str, Any]]]:
    """MulT's splits as ``{split: {key: array}}``: from the ``.npz`` (no pickle), arrays read on
    access while open; or, for a ``.pkl`` (``unsafe_unpickle``), through the preparer's
    allow-list unpickler."""
    if path.suffix != ".npz":
        from mmbalance.prepare.iemocap_mult import load_mult_pickle

        yield load_mult_pickle(path)
        return
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(
            f"'{path}' is not a readable .npz ({exc}). Re-create it with `{PREPARE_MULT} --raw "
            f"DIR --out {path.parent} --set overwrite=true`."
        ) from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"'{path}' holds a single array, not the .npz of splits `{PREPARE_MULT}` writes.")
    with npz:
        names: dict[str, dict[str, str]] = {}
        for name in npz.files:
            split, sep, key = name.partition(MULT_SEP)
            if sep and key:
                names.setdefault(split, {})[key] = name
        yield {split: _NpzSplit(npz, path, keys) for split, keys in names.items()}


class _NpzSplit(Mapping):
    """One split of an open MulT ``.npz``: key -> array, read (without pickle) on access."""

    def __init__(self, npz: Any, path: Path, names: Mapping[str, str]) -> None:
        self.npz, self.path, self.names = npz, path, dict(names)

    def __getitem__(self, key: str) -> np.ndarray:
        name = self.names[key]
        try:
            return self.npz[name]
        except Exception as exc:
            raise DataError(f"Could not read array '{name}' of '{self.path}' without pickle ({exc}).") from exc

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)
