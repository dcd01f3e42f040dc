"""BERT and CLIP tokenizers built from LOCAL files only (never from the Hugging Face hub).

Accepted inputs:

* BERT: a ``vocab.txt`` file (WordPiece, one token a line; bert-base-uncased casing by
  default), or a folder holding ``tokenizer.json`` (a saved tokenizer, its own settings win)
  or ``vocab.txt``.
* CLIP: a folder holding ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``, or the path of
  ``vocab.json`` with ``merges.txt`` beside it.

Transformers 5 trap: ``BertTokenizer(vocab_file=...)`` is silently ignored (every word becomes
[UNK]); the vocabulary must be passed as ``vocab=``. This module does that and tests check
that real words survive.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmbalance.errors import ConfigError

_BERT_HINT = (
    "Point it at the vocab.txt of bert-base-uncased (or a folder saved with "
    "tokenizer.save_pretrained), e.g. --set tokenizer=/models/bert-base-uncased/vocab.txt. "
    "Nothing is downloaded at run time."
)
_CLIP_HINT = (
    "Point it at a folder holding vocab.json and merges.txt (or tokenizer.json) of the CLIP "
    "model, e.g. --set tokenizer=/models/clip-vit-base-patch32. Nothing is downloaded at run time."
)


def _existing(path: str | Path | None, what: str, hint: str) -> Path:
    if path is None or str(path).strip() == "":
        raise ConfigError(f"No {what} tokenizer path was given. {hint}")
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"The {what} tokenizer path '{p}' does not exist. {hint}")
    return p


def read_wordpiece_vocab(path: str | Path) -> dict[str, int]:
    """vocab.txt -> {token: line index}; the index is the token id, as in BERT."""
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            token = line.rstrip("\r\n")
            if token and token not in vocab:
                vocab[token] = i
    return vocab


def bert_tokenizer(path: str | Path | None, lowercase: bool = True) -> Any:
    """A BERT WordPiece tokenizer from a local vocab.txt or saved-tokenizer folder."""
    from transformers import BertTokenizer

    p = _existing(path, "BERT", _BERT_HINT)
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return _from_folder(BertTokenizer, p, "BERT", _BERT_HINT)
        if not (p / "vocab.txt").is_file():
            raise ConfigError(
                f"The BERT tokenizer folder '{p}' holds neither tokenizer.json nor vocab.txt. "
                f"{_BERT_HINT}"
            )
        p = p / "vocab.txt"
    vocab = read_wordpiece_vocab(p)
    missing = [t for t in ("[UNK]", "[PAD]", "[CLS]", "[SEP]") if t not in vocab]
    if missing:
        raise ConfigError(
            f"'{p}' does not look like a BERT vocab.txt: it lacks the special tokens "
            f"{', '.join(missing)}. {_BERT_HINT}"
        )
    return BertTokenizer(vocab=vocab, do_lower_case=lowercase)


def clip_tokenizer(path: str | Path | None) -> Any:
    """A CLIP byte-level BPE tokenizer from local vocab.json + merges.txt (or tokenizer.json)."""
    from transformers import CLIPTokenizer

    p = _existing(path, "CLIP", _CLIP_HINT)
    folder = p if p.is_dir() else p.parent
    if p.is_dir() and (p / "tokenizer.json").is_file():
        return _from_folder(CLIPTokenizer, p, "CLIP", _CLIP_HINT)
    vocab_file = p if p.is_file() else folder / "vocab.json"
    merges_file = folder / "merges.txt"
    if not vocab_file.is_file() or not merges_file.is_file():
        raise ConfigError(
            f"The CLIP tokenizer at '{p}' needs vocab.json and merges.txt side by side "
            f"(found vocab.json: {vocab_file.is_file()}, merges.txt: {merges_file.is_file()}). "
            f"{_CLIP_HINT}"
        )
    try:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"'{vocab_file}' is not valid JSON: {exc}. {_CLIP_HINT}") from exc
    merges = _read_merges(merges_file)
    return CLIPTokenizer(vocab=vocab, merges=merges)


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt -> list of pairs; the '#version' header and blank lines are skipped."""
    pairs: list[tuple[str, str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#version"):
            continue
        a, _, b = line.strip().partition(" ")
        if b:
            pairs.append((a, b))
    return pairs


def _from_folder(cls: Any, folder: Path, what: str, hint: str) -> Any:
    try:
        return cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises several unrelated types here
        raise ConfigError(f"Could not load the {what} tokenizer from '{folder}': {exc}. {hint}") from exc


def tokenizer_for_backbone(backbone: str | None, path: str | Path | None) -> Any:
    """The tokenizer a text backbone expects: CLIP's BPE for ``clip_text``, else BERT's."""
    if backbone and backbone.lower().startswith("clip"):
        return clip_tokenizer(path)
    return bert_tokenizer(path)


def encode_texts(
    tokenizer: Any, texts: Sequence[str], max_length: int | None, pad_to_max: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Tokenise each text (special tokens on) into LongTensors, truncated to ``max_length``.

    ``max_length=None`` truncates nothing: what IGM's ``tokenizer(text, padding='longest',
    max_length=50)`` does, since transformers only truncates there when asked. Without
    ``pad_to_max`` the items keep their own length and :class:`PadTokens` pads a batch to its
    longest member (the lab loaders pad to the longest); with it every item is padded to
    ``max_length`` (which must then be given) so the default collate works.
    """
    if pad_to_max and max_length is None:
        raise ConfigError("Padding every text to max_length needs a max_length; none was given.")
    enc = tokenizer(
        list(texts),
        truncation=max_length is not None,
        max_length=max_length,
        padding="max_length" if pad_to_max else False,
        return_attention_mask=True,
    )
    return [
        {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
        }
        for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)
    ]


class PadTokens:
    """Collate that pads token modalities to the longest item in the batch.

    ``pad_ids`` maps each token modality to its tokenizer's pad id; the attention mask is
    padded with 0. Everything else goes through torch's default collate. A plain class (not a
    closure) so it pickles into data-loader worker processes.
    """

    def __init__(self, pad_ids: dict[str, int]) -> None:
        self.pad_ids = dict(pad_ids)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        from torch.utils.data import default_collate

        rest = [{k: v for k, v in it.items() if k not in self.pad_ids} for it in items]
        batch = default_collate(rest)
        for m, pad_id in self.pad_ids.items():
            if m in items[0]:
                batch[m] = pad_token_dicts([it[m] for it in items], pad_id)
        return batch


def pad_token_dicts(seqs: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack ``{"input_ids", "attention_mask"}`` dicts of varying length into (B, L_max)."""
    longest = max(int(s["input_ids"].shape[0]) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = int(s["input_ids"].shape[0])
        ids[i, :n] = s["input_ids"]
        mask[i, :n] = s["attention_mask"]
    return {"input_ids": ids, "attention_mask": mask}
