"""Sarcasm: Twitter image + text, binary (Cai, Cai & Wan, ACL 2019).

Three on-disk layouts of the same release (docs/datasets/sarcasm.md), detected in this order:

* ``json`` (default; BSS / IGM): ``annotations/{train,valid,test}_data.json``, JSON lists of
  ``{"image", "text", "label"}``; the image is ``images/<basename of image>``.
* ``original`` (headacheboy's release): ``text/train.txt``, ``text/valid2.txt``,
  ``text/test2.txt`` of Python list literals (read with ``ast.literal_eval``, never ``eval``),
  images ``images/<id>.jpg`` (or ``dataset_image/``). The authors' keyword filter is applied
  to train (19,816 of 29,040 posts remain); the label is the last list element.
* ``tsv`` (AMSS): ``annotations/{train,test}.tsv`` with header ``Label  String  ImageID``.

Where a layout has no validation file, validation is carved from train with a fixed seed.
Text (njustkmg/IJCAI25-IGM ``datasets/sarcasm_dataset.py``): lower-cased, punctuation ``,.'!?"()*#:;~`` removed, ``-`` and ``/`` to
spaces, at most 50 words; tokenised once at build time with a LOCAL tokenizer (BERT's
WordPiece, or CLIP's BPE when the text backbone is ``clip_text``), with special tokens, and --
as IGM's ``train_sarcasm.py`` does it (``padding='longest', max_length=50`` without
``truncation``, which transformers reads as "do not truncate") -- not truncated; ``max_tokens``
truncates on purpose. A batch is padded to its longest member (``text_padding``).
Images: train RandomResizedCrop (scale 0.5-1, bicubic) + flip + IGM's own RandomAugment
(:class:`IGMRandomAugment`: 2 operations drawn from its list of 10, each applied with
probability 0.5, magnitude 7 on its 10-level scale); test resize; both CLIP-normalised by
default. ``augment=torchvision`` gives torchvision's RandAugment(2, 7) instead (a 31-level
scale, so much weaker), the suite's former default.
"""

from __future__ import annotations

import ast
import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
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
    resolve_data_root,
)
from mmbalance.errors import ConfigError, DataError
from mmbalance.media import IMAGENET_MEAN, IMAGENET_STD, load_rgb, read_text_lines
from mmbalance.registry import register_dataset
from mmbalance.tokenizers import PadTokens, encode_texts, tokenizer_for_backbone

CLASS_NAMES = ["not_sarcastic", "sarcastic"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MANIFEST = {"train": 19816, "valid": 2410, "test": 2409}
VAL_SEED = 2019
# The original authors drop training posts containing any of these whitespace-split words.
FILTER_WORDS = frozenset(
    {"sarcasm", "sarcastic", "reposting", "<url>", "joke", "jokes", "humour", "humor",
     "irony", "ironic", "exgag"}
)
_PUNCT = str.maketrans("", "", ",.'!?\"()*#:;~")
LAYOUT_FILES = {
    "json": {s: f"annotations/{s}_data.json" for s in ("train", "valid", "test")},
    "original": {"train": "text/train.txt", "valid": "text/valid2.txt", "test": "text/test2.txt"},
    "tsv": {s: f"annotations/{s}.tsv" for s in ("train", "valid", "test")},
}
IMAGE_DIRS = ("images", "dataset_image")
# Longest sequences the text encoders take (position embeddings); without max_tokens a post is
# only ever cut at these, and the run's notes say how many were.
ENCODER_LIMITS = {"bert": 512, "clip": 77}


@dataclass(frozen=True)
class Post:
    pid: str
    text: str  # raw text; cleaned when tokenised
    label: int
    image: Path


def clean_text(text: str, max_words: int = 50) -> str:
    """IGM's caption cleaning: lower-case, drop ``,.'!?"()*#:;~``, ``-`` and ``/`` to spaces,
    collapse whitespace, keep the first ``max_words`` words."""
    t = text.lower().translate(_PUNCT).replace("-", " ").replace("/", " ")
    return " ".join(t.split()[:max_words])


def keep_original_train(text: str) -> bool:
    """The original release's training filter (posts naming sarcasm, jokes, urls... go)."""
    return not any(w in FILTER_WORDS for w in text.split())


def _basename(name: str) -> str:
    """Basename of a path written on any OS (the JSON holds the authors' absolute paths)."""
    return PureWindowsPath(PurePosixPath(name).name).name


def read_json_split(path: Path, images: Path) -> list[Post]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"'{path}' is not a readable JSON list ({exc}).") from exc
    posts = []
    for i, rec in enumerate(records):
        try:
            name = _basename(str(rec["image"]))
            posts.append(Post(Path(name).stem, str(rec["text"]), int(rec["label"]), images / name))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"'{path}', record {i}: expected keys image, text, label (0|1); got {rec!r}."
            ) from exc
    return posts


def read_original_split(path: Path, images: Path, train: bool) -> list[Post]:
    posts = []
    for i, line in enumerate(read_text_lines(path)):
        try:
            row = ast.literal_eval(line)
            pid, text, label = str(row[0]), str(row[1]), int(row[-1])
        except (ValueError, SyntaxError, IndexError, TypeError) as exc:
            raise DataError(
                f"'{path}', line {i + 1}: expected a list literal ['<id>', '<text>', ..., label]; "
                f"got {line[:100]!r}."
            ) from exc
        if train and not keep_original_train(text):
            continue
        posts.append(Post(pid, text, label, images / f"{pid}.jpg"))
    return posts


def read_tsv_split(path: Path, images: Path) -> list[Post]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    posts = []
    for i, row in enumerate(rows):
        try:
            name = _basename(row["ImageID"].strip())
            label = int(float(row["Label"]))
            posts.append(Post(Path(name).stem, row["String"], label, images / name))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(
                f"'{path}', row {i + 2}: expected the columns Label, String, ImageID; got {row!r}."
            ) from exc
    return posts


# ------------------------------------------------------------ IGM's RandomAugment, as released

# IGM's train transform (datasets/__init__.py): RandomAugment(2, 7, isPIL=True, augs=...) with
# these ten operations; its levels run 0..10 (IGM_MAX_LEVEL), torchvision's RandAugment 0..30.
IGM_AUGMENT_OPS = (
    "Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
    "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
)
IGM_MAX_LEVEL = 10
IGM_FILL = (128, 128, 128)  # what the geometric operations fill uncovered pixels with
IGM_TRANSLATE_PIXELS = 10  # translation at the full level
AUGMENTS = {
    "igm": "IGM's RandomAugment(2, 7) as released: 2 of Identity, AutoContrast, Equalize, "
    "Brightness, Sharpness, ShearX, ShearY, TranslateX, TranslateY, Rotate (drawn with "
    "replacement), each applied with probability 0.5, level 7 of 10",
    "torchvision": "torchvision RandAugment(num_ops=2, magnitude=7) (31 levels; the suite's former default)",
    "none": "no RandAugment",
}


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as exc:  # opencv-contrib-python-headless is a pinned dependency
        raise ConfigError(
            "Dataset 'sarcasm': IGM's RandomAugment needs OpenCV (its operations are OpenCV's "
            "warps and filters). Install it with `pip install opencv-contrib-python-headless` "
            "(a dependency of mmbalance), or pass --set augment=torchvision."
        ) from exc
    return cv2


def _as_uint8_like_numpy_cast(x: np.ndarray) -> np.ndarray:
    """float -> uint8 the way the reference's ``.astype(np.uint8)`` behaves on x86: truncate
    toward zero, then wrap modulo 256 (numpy leaves out-of-range casts undefined; this is what
    they give on the machines the code ran on), e.g. 274.8 -> 18, -3.2 -> 253."""
    return (np.trunc(x).astype(np.int64) % 256).astype(np.uint8)


def igm_autocontrast(img: np.ndarray) -> np.ndarray:
    """IGM's AutoContrast (cutoff 0), per channel, as released.

    The lookup table is ``k * scale + offset`` with ``scale = 255 / (max - min)`` and
    ``offset = -min * scale``, clipped to 0..255 and truncated. The release computes
    ``-min`` on a uint8 scalar, which wraps to ``256 - min``: a channel whose minimum is 0 is
    stretched to 0..255 as intended, any other channel becomes 255 everywhere. A flat channel
    (max <= min) is kept.
    """
    out = img.copy()
    for c in range(img.shape[2]):
        ch = img[..., c]
        low, high = int(ch.min()), int(ch.max())
        if high <= low:
            continue
        scale = 255 / (high - low)
        offset = ((-low) % 256) * scale  # the uint8 negation of the release
        table = (np.arange(256) * scale + offset).clip(0, 255).astype(np.uint8)
        out[..., c] = table[ch]
    return out


def igm_equalize(img: np.ndarray) -> np.ndarray:
    """IGM's Equalize (PIL's rule), per channel: ``step = (pixels - last level's count) //
    255``; level k maps to ``(step // 2 + count below k) // step``; step 0 keeps the channel."""
    out = img.copy()
    for c in range(img.shape[2]):
        ch = img[..., c]
        hist = np.bincount(ch.ravel(), minlength=256).astype(np.int64)
        used = hist[hist != 0]
        step = int(used[:-1].sum()) // 255
        if step == 0:
            continue
        before = np.concatenate([[step // 2], hist[:-1]])
        out[..., c] = (np.cumsum(before) // step).clip(0, 255).astype(np.uint8)[ch]
    return out


def igm_brightness(img: np.ndarray, factor: float) -> np.ndarray:
    """IGM's Brightness: every level times ``factor`` in float32, clipped, truncated."""
    table = (np.arange(256, dtype=np.float32) * np.float32(factor)).clip(0, 255).astype(np.uint8)
    return table[img]


def igm_sharpness(img: np.ndarray, factor: float) -> np.ndarray:
    """IGM's Sharpness: blend with a 3x3 smoothing (centre 5, others 1, over 13; OpenCV's
    rounding), interior pixels only: ``s + factor (x - s)`` in float32, cast to uint8 as the
    release does (wrapping, :func:`_as_uint8_like_numpy_cast`); factor 0 gives the smoothed
    image, 1 the image."""
    cv2 = _cv2()
    kernel = np.ones((3, 3), dtype=np.float32)
    kernel[1, 1] = 5
    kernel /= 13
    smooth = cv2.filter2D(img, -1, kernel)
    if factor == 0.0:
        return smooth
    if factor == 1.0:
        return img
    out = img.astype(np.float32)
    s = smooth.astype(np.float32)[1:-1, 1:-1]
    out[1:-1, 1:-1] = s + np.float32(factor) * (out[1:-1, 1:-1] - s)
    return _as_uint8_like_numpy_cast(out)


def igm_affine(img: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """OpenCV's forward affine warp (bilinear), uncovered pixels grey 128: IGM's geometry."""
    cv2 = _cv2()
    h, w = img.shape[:2]
    return cv2.warpAffine(img, matrix, (w, h), borderValue=IGM_FILL, flags=cv2.INTER_LINEAR)


def igm_operation(img: np.ndarray, name: str, level: float, negate: bool = False) -> np.ndarray:
    """One of :data:`IGM_AUGMENT_OPS` at ``level`` (0..10) on uint8 RGB (H, W, 3).

    Arguments as IGM's level-to-argument maps: Brightness / Sharpness factor
    ``level / 10 * 1.8 + 0.1`` (1.36 at 7); shear ``level / 10 * 0.3`` (x' = x + s y for
    ShearX); translation ``level / 10 * 10`` pixels (TranslateX moves the content left by it,
    as the matrix [[1, 0, -t], [0, 1, 0]] does); rotation ``level / 10 * 30`` degrees
    counter-clockwise about (W/2, H/2). ``negate`` flips the sign of the signed ones (drawn
    with probability 0.5 by :class:`IGMRandomAugment`).
    """
    frac = level / IGM_MAX_LEVEL
    sign = -1.0 if negate else 1.0
    if name == "Identity":
        return img
    if name == "AutoContrast":
        return igm_autocontrast(img)
    if name == "Equalize":
        return igm_equalize(img)
    if name == "Brightness":
        return igm_brightness(img, frac * 1.8 + 0.1)
    if name == "Sharpness":
        return igm_sharpness(img, frac * 1.8 + 0.1)
    if name in ("ShearX", "ShearY"):
        s = sign * frac * 0.3
        m = [[1, s, 0], [0, 1, 0]] if name == "ShearX" else [[1, 0, 0], [s, 1, 0]]
        return igm_affine(img, np.float32(m))
    if name in ("TranslateX", "TranslateY"):
        t = sign * frac * float(IGM_TRANSLATE_PIXELS)
        m = [[1, 0, -t], [0, 1, 0]] if name == "TranslateX" else [[1, 0, 0], [0, 1, -t]]
        return igm_affine(img, np.float32(m))
    if name == "Rotate":
        cv2 = _cv2()
        h, w = img.shape[:2]
        return igm_affine(img, cv2.getRotationMatrix2D((w / 2, h / 2), sign * frac * 30, 1))
    raise ConfigError(f"Unknown IGM augmentation '{name}'. Known: {', '.join(IGM_AUGMENT_OPS)}.")


class IGMRandomAugment:
    """IGM's ``RandomAugment(N, M, isPIL=True, augs=...)`` on a PIL image, as released.

    Each call draws ``n`` operations uniformly with replacement from ``ops``; each is then
    skipped with probability 0.5 (a uniform draw above 0.5), else applied at level
    ``magnitude`` of 10 (:func:`igm_operation`), a signed one with its sign flipped with
    probability 0.5. Returns uint8 (H, W, 3), which ``ToTensor`` scales like a PIL image. The
    draws come from torch's global RNG (not numpy's, as in the release), so the trainer's
    per-epoch / per-worker seeding makes them reproducible. A plain class: it pickles into
    data-loader workers.
    """

    SIGNED = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})

    def __init__(self, n: int = 2, magnitude: float = 7, ops: Sequence[str] = IGM_AUGMENT_OPS) -> None:
        unknown = [o for o in ops if o not in IGM_AUGMENT_OPS]
        if unknown or not ops:
            raise ConfigError(f"IGMRandomAugment: unknown operations {unknown}; use some of {IGM_AUGMENT_OPS}.")
        self.n, self.magnitude, self.ops = int(n), float(magnitude), tuple(ops)

    def __call__(self, img: Any) -> np.ndarray:
        x = np.array(img, dtype=np.uint8)
        for k in torch.randint(len(self.ops), (self.n,)).tolist():
            if torch.rand(()).item() > 0.5:
                continue
            name = self.ops[k]
            negate = name in self.SIGNED and torch.rand(()).item() < 0.5
            x = igm_operation(x, name, self.magnitude, negate)
        return np.ascontiguousarray(x)

    def __repr__(self) -> str:
        return f"IGMRandomAugment(n={self.n}, magnitude={self.magnitude:g}, ops={list(self.ops)})"


def image_transform(train: bool, size: int, norm: str, augment: str = "igm") -> Any:
    """IGM's image pipeline (torch's global RNG).

    Train: RandomResizedCrop(size, scale 0.5-1, bicubic) + flip + the ``augment`` of
    :data:`AUGMENTS` (default IGM's own RandomAugment, :class:`IGMRandomAugment`); test:
    Resize((size, size), bicubic). Then ToTensor and the ``norm`` statistics (CLIP's, IGM's).
    """
    from torchvision import transforms as T

    if augment not in AUGMENTS:
        raise ConfigError(f"Dataset 'sarcasm': augment='{augment}' is not one of {', '.join(AUGMENTS)}.")
    mean, std = (CLIP_MEAN, CLIP_STD) if norm == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
    bicubic = T.InterpolationMode.BICUBIC
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    if train:
        rand = {
            "igm": [IGMRandomAugment(2, 7, IGM_AUGMENT_OPS)],
            "torchvision": [T.RandAugment(num_ops=2, magnitude=7)],
            "none": [],
        }[augment]
        return T.Compose(
            [
                T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=bicubic),
                T.RandomHorizontalFlip(),
                *rand,
                *tail,
            ]
        )
    return T.Compose([T.Resize((size, size), interpolation=bicubic), *tail])


class SarcasmPosts(Dataset):
    """Items ``{"image": (3, S, S), "text": {"input_ids", "attention_mask"}, ...}``."""

    def __init__(
        self,
        posts: Sequence[Post],
        tokens: Sequence[dict[str, torch.Tensor]] | None,
        modalities: Sequence[str],
        transform: Any,
        eval_transform: Any = None,
    ) -> None:
        self.posts = list(posts)
        self.tokens = list(tokens) if tokens is not None else None
        self.modalities = tuple(modalities)
        self.transform = transform
        self.eval_transform = transform if eval_transform is None else eval_transform

    def eval_view(self) -> SarcasmPosts:
        """The same posts with the evaluation image transform (resize only)."""
        return SarcasmPosts(self.posts, self.tokens, self.modalities, self.eval_transform)

    def __len__(self) -> int:
        return len(self.posts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        post = self.posts[i]
        item: dict[str, Any] = {}
        for m in self.modalities:
            if m == "image":
                item[m] = self.transform(load_rgb(post.image))
            elif m == "text" and self.tokens is not None:
                item[m] = dict(self.tokens[i])
        item["label"] = post.label
        item["index"] = i
        return item


@register_dataset("sarcasm", "Sarcasm (Twitter image + text, binary): ResNet-50 + BERT")
class Sarcasm(DatasetPlugin):
    data_subdir = "Sarcasm"
    name = "sarcasm"
    description = "Twitter sarcasm detection: image + tweet text, 2 classes"
    modality_names = ("image", "text")
    defaults = {
        "batch_size": 64,
        "optimizer": "adam",
        "lr": 1e-4,
        **PAPER_SCHEDULE,
        "embed_dim": 768,
        "backbone": {"image": {"name": "resnet50"}, "text": {"name": "bert"}},
    }
    method_defaults = {"iprm": {"alpha": 0.7}}
    options = {
        "check_manifest": Option(True, "fail unless the splits hold 19,816 / 2,410 / 2,409 usable posts", changes_results=False),
        "layout": Option("auto", "json = BSS/IGM annotations; original = text/*.txt list literals; tsv = AMSS", ["auto", "json", "original", "tsv"]),
        "tokenizer": Option(None, "local tokenizer: a vocab.txt or tokenizer folder (BERT), or a folder with vocab.json + merges.txt (CLIP); default: backbone.text.weights", type=str),
        "max_tokens": Option(None, "truncate each post to this many tokens, special tokens included; default: no truncation, as IGM tokenises (only the encoder's own limit, 512 for BERT, 77 for CLIP, ever cuts)", type=int, min=1),
        "max_words": Option(50, "words kept after cleaning (IGM: 50)"),
        "text_padding": Option("longest", "pad each batch to its longest post, or every post to max_tokens (which must then be set)", ["longest", "max_length"]),
        "augment": Option("igm", "train-time RandAugment: igm = IGM's own RandomAugment as released (10 ops, p 0.5 each, level 7 of 10); torchvision = RandAugment(2, 7) (31 levels, weaker); none", list(AUGMENTS)),
        "image_size": Option(224, "image side (train random-resized crop, test resize)"),
        "image_norm": Option("clip", "image normalisation statistics (IGM uses CLIP's)", ["clip", "imagenet"]),
    }
    layout_help = (
        "Sarcasm root (or <root>/Sarcasm) in one of three layouts: BSS/IGM "
        "annotations/{train,valid,test}_data.json (lists of {image, text, label}) with "
        "images/<id>.jpg; the original release text/train.txt, text/valid2.txt, text/test2.txt "
        "(list literals) with the images in images/ (or dataset_image/); or AMSS "
        "annotations/{train,test}.tsv (Label, String, ImageID) with images/. A text modality "
        "also needs a local tokenizer: --set tokenizer=/path/to/bert-base-uncased (vocab.txt). "
        "Sarcasm needs no 'mmbalance prepare' step: every layout is read as distributed."
    )

    def build(self, cfg: Mapping[str, Any], modalities: Sequence[str]) -> Splits:
        mods = check_modalities(self.name, modalities, self.modality_names)
        root = resolve_data_root(cfg, self.name, subdir="Sarcasm")
        layout = self._layout(cfg, root)
        images = _image_dir(root)
        posts = self._read(layout, root, images)
        strict = bool(option(cfg, self, "check_manifest"))
        notes: list[str] = []
        fix = "Put the missing images under images/ (named as the annotations say)."
        for split in list(posts):
            have = [("image" not in mods or p.image.is_file()) for p in posts[split]]
            listed = [f"{i}:{p.pid}" for i, p in enumerate(posts[split])]
            usable = [key for key, ok in zip(listed, have, strict=True) if ok]
            notes += check_split(self.name, split, listed, usable, MANIFEST[split], fix, strict=strict)
            posts[split] = [p for p, ok in zip(posts[split], have, strict=True) if ok]
        rule = "the layout's validation file"
        val_is_test = False
        if "valid" not in posts:
            posts["train"], held, rule = carve_validation(
                posts["train"], option(cfg, self, "val_fraction"), VAL_SEED, self.name, fallback=True
            )
            posts["valid"] = held if held is not None else posts["test"]
            val_is_test = held is None
        return self._splits(cfg, mods, posts, {
            "layout": layout, "root": str(root), "val_split": rule, "val_is_test": val_is_test,
            "notes": notes,
        })

    def _layout(self, cfg: Mapping[str, Any], root: Path) -> str:
        layout = option(cfg, self, "layout")
        candidates = [layout] if layout != "auto" else list(LAYOUT_FILES)
        for name in candidates:
            files = LAYOUT_FILES[name]
            if (root / files["train"]).is_file() and (root / files["test"]).is_file():
                return name
        wanted = "; ".join(
            f"{n}: {LAYOUT_FILES[n]['train']} + {LAYOUT_FILES[n]['test']}" for n in candidates
        )
        raise DataError(
            f"Dataset '{self.name}': looked in '{root}' and found no complete layout ({wanted}). "
            f"Expected layout: {self.layout_help}"
        )

    @staticmethod
    def _read(layout: str, root: Path, images: Path) -> dict[str, list[Post]]:
        out: dict[str, list[Post]] = {}
        for split, rel in LAYOUT_FILES[layout].items():
            path = root / rel
            if not path.is_file():
                continue  # only 'valid' may be absent (checked by _layout)
            if layout == "json":
                out[split] = read_json_split(path, images)
            elif layout == "original":
                out[split] = read_original_split(path, images, train=split == "train")
            else:
                out[split] = read_tsv_split(path, images)
        for split, items in out.items():
            bad = sorted({p.label for p in items} - {0, 1})
            if bad:
                raise DataError(f"Sarcasm split '{split}' has labels {bad}; only 0 and 1 are allowed.")
        return out

    def _splits(
        self, cfg: Mapping[str, Any], mods: Sequence[str], posts: Mapping[str, list[Post]], info: dict[str, Any]
    ) -> Splits:
        size = int(option(cfg, self, "image_size"))
        norm = option(cfg, self, "image_norm")
        specs: dict[str, ModalitySpec] = {}
        tokens: dict[str, list[dict[str, torch.Tensor]] | None] = dict.fromkeys(posts)
        collate = None
        if "image" in mods:
            specs["image"] = ModalitySpec("image", (3, size, size), {"norm": norm})
        augment = option(cfg, self, "augment")
        if "image" in mods:
            info["augment"] = AUGMENTS[augment]
            info["image_transform"] = (
                f"train: RandomResizedCrop({size}, scale 0.5-1, bicubic) + flip + "
                f"{AUGMENTS[augment]}; eval: Resize(({size}, {size}), bicubic); {norm} mean/std"
            )
        if "text" in mods:
            tok, backbone = self._tokenizer(cfg)
            max_tokens = option(cfg, self, "max_tokens")
            max_words = int(option(cfg, self, "max_words"))
            fixed = option(cfg, self, "text_padding") == "max_length"
            if fixed and max_tokens is None:
                raise ConfigError(
                    f"Dataset '{self.name}': text_padding=max_length pads every post to "
                    f"max_tokens, which is not set. Pass --set max_tokens=N (e.g. 50), or keep "
                    f"text_padding=longest (IGM's)."
                )
            limit = int(max_tokens) if max_tokens is not None else ENCODER_LIMITS[backbone]
            for split, items in posts.items():
                texts = [clean_text(p.text, max_words) for p in items]
                full = encode_texts(tok, texts, None)  # as IGM: no truncation
                cut = sum(int(t["input_ids"].shape[0]) > limit for t in full)
                if cut and max_tokens is None:
                    info.setdefault("notes", []).append(
                        f"{split}: {cut} posts longer than the {backbone} encoder's {limit} tokens were cut to it"
                    )
                tokens[split] = encode_texts(tok, texts, limit, pad_to_max=fixed) if cut or fixed else full
            longest = max((int(t["input_ids"].shape[0]) for ts in tokens.values() for t in ts or []), default=1)
            pad_id = int(tok.pad_token_id)
            specs["text"] = ModalitySpec(
                "tokens", (limit if fixed else longest,),
                {"pad_id": pad_id, "vocab_size": len(tok), "tokenizer": backbone, "max_tokens": max_tokens},
            )
            collate = None if fixed else PadTokens({"text": pad_id})
            info["tokenizer"] = backbone
            info["text_rule"] = (
                f"clean (lower-case, drop ,.'!?\"()*#:;~, - and / to spaces, {max_words} words) -> "
                f"{backbone} tokens with special tokens, "
                + (f"truncated to max_tokens={max_tokens}" if max_tokens is not None
                   else f"not truncated (IGM; the encoder's limit {limit} only)")
                + (f", padded to {limit}" if fixed else ", each batch padded to its longest post")
            )
        datasets = {
            split: SarcasmPosts(items, tokens[split], mods, image_transform(split == "train", size, norm, augment),
                                image_transform(False, size, norm, augment))
            for split, items in posts.items()
        }
        return Splits(
            datasets["train"], datasets["valid"], datasets["test"], specs,
            len(CLASS_NAMES), list(CLASS_NAMES), info, collate,
        )

    def _tokenizer(self, cfg: Mapping[str, Any]) -> tuple[Any, str]:
        """The tokenizer the configured text backbone expects, from local files only."""
        entry = (cfg.get("backbone") or {}).get("text") or {}
        backbone = str(entry.get("name") or "bert")
        path = option(cfg, self, "tokenizer") or entry.get("weights")
        if not path:
            raise ConfigError(
                f"Dataset '{self.name}': the text modality needs a local tokenizer for the "
                f"'{backbone}' backbone and none is set. Pass --set tokenizer=PATH (a vocab.txt "
                f"or tokenizer folder of bert-base-uncased; for clip_text a folder with "
                f"vocab.json + merges.txt), or set backbone.text.weights to a model folder that "
                f"holds its tokenizer files."
            )
        kind = "clip" if backbone.lower().startswith("clip") else "bert"
        return tokenizer_for_backbone(backbone, path), kind


def _image_dir(root: Path) -> Path:
    for name in IMAGE_DIRS:
        if (root / name).is_dir():
            return root / name
    return root / IMAGE_DIRS[0]
