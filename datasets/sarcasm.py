"""Sarcasm: Twitter image + text, binary (Cai, Cai & Wan, ACL 2019).

Three on-disk layouts of the same release (datasets.md section 5), detected in this order:

* ``json`` (default; BSS / IGM): ``annotations/{train,valid,test}_data.json``, JSON lists of
  ``{"image", "text", "label"}``; the image is ``images/<basename of image>``.
* ``original`` (headacheboy's release): ``text/train.txt``, ``text/valid2.txt``,
  ``text/test2.txt`` of Python list literals (read with ``ast.literal_eval``, never ``eval``),
  images ``images/<id>.jpg`` (or ``dataset_image/``). The authors' keyword filter is applied
  to train (19,816 of 29,040 posts remain); the label is the last list element.
* ``tsv`` (AMSS): ``annotations/{train,test}.tsv`` with header ``Label  String  ImageID``.

Where a layout has no validation file, validation is carved from train with a fixed seed.
Text (iprm.md 10.5): lower-cased, punctuation ``,.'!?"()*#:;~`` removed, ``-`` and ``/`` to
spaces, at most 50 words; tokenised once at build time with a LOCAL tokenizer (BERT's
WordPiece, or CLIP's BPE when the text backbone is ``clip_text``), with special tokens,
truncated to ``max_length``; a batch is padded to its longest member (``text_padding``).
Images: train RandomResizedCrop (scale 0.5-1, bicubic) + flip + RandAugment(2, 7); test
resize, both CLIP-normalised by default.
"""

from __future__ import annotations

import ast
import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

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


def image_transform(train: bool, size: int, norm: str) -> Any:
    """IGM's image pipeline with torchvision (torch's global RNG).

    RandAugment is torchvision's (2 ops, magnitude 7) rather than IGM's own op list.
    """
    from torchvision import transforms as T

    mean, std = (CLIP_MEAN, CLIP_STD) if norm == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
    bicubic = T.InterpolationMode.BICUBIC
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    if train:
        return T.Compose(
            [
                T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=bicubic),
                T.RandomHorizontalFlip(),
                T.RandAugment(num_ops=2, magnitude=7),
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
    ) -> None:
        self.posts = list(posts)
        self.tokens = list(tokens) if tokens is not None else None
        self.modalities = tuple(modalities)
        self.transform = transform

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
        "check_manifest": Option(True, "fail unless the splits hold 19,816 / 2,410 / 2,409 usable posts"),
        "layout": Option("auto", "json = BSS/IGM annotations; original = text/*.txt list literals; tsv = AMSS", ["auto", "json", "original", "tsv"]),
        "tokenizer": Option(None, "local tokenizer: a vocab.txt or tokenizer folder (BERT), or a folder with vocab.json + merges.txt (CLIP); default: backbone.text.weights", type=str),
        "max_length": Option(50, "token limit per post, special tokens included"),
        "max_words": Option(50, "words kept after cleaning (IGM: 50)"),
        "text_padding": Option("longest", "pad each batch to its longest post, or every post to max_length", ["longest", "max_length"]),
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
        if "text" in mods:
            tok, backbone = self._tokenizer(cfg)
            max_len = int(option(cfg, self, "max_length"))
            max_words = int(option(cfg, self, "max_words"))
            fixed = option(cfg, self, "text_padding") == "max_length"
            for split, items in posts.items():
                texts = [clean_text(p.text, max_words) for p in items]
                tokens[split] = encode_texts(tok, texts, max_len, pad_to_max=fixed)
            pad_id = int(tok.pad_token_id)
            specs["text"] = ModalitySpec(
                "tokens", (max_len,), {"pad_id": pad_id, "vocab_size": len(tok), "tokenizer": backbone}
            )
            collate = None if fixed else PadTokens({"text": pad_id})
            info["tokenizer"] = backbone
        datasets = {
            split: SarcasmPosts(items, tokens[split], mods, image_transform(split == "train", size, norm))
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
