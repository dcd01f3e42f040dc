"""BERT text encoder (Sarcasm's text branch; also usable for IEMOCAP transcripts).

Input: the text-modality dict ``{"input_ids": (B, L) long, "attention_mask": (B, L) long}``.
Output: the last-layer hidden state of the first token, the [CLS] vector (768 for bert-base),
as docs/datasets/sarcasm.md says. The dataset must therefore put [CLS] first (the
tokenizer's default with special tokens). ``pool="mean"`` instead averages the unmasked tokens,
the "token mean" of MLA's M3AE text branch, for id sequences stored without [CLS].

The pooler layer of BertModel is not built: IGM/mmbalance use the raw [CLS] hidden state,
not the tanh pooler. ``config`` holds BertConfig fields (defaults are bert-base-uncased) so a
tiny encoder can be built for tests. ``weights=DIR`` loads a local Hugging Face folder
(``config.json`` plus ``model.safetensors`` or ``pytorch_model.bin``) with
``local_files_only=True``; a hub id is never contacted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmbalance.backbones.common import Projected
from mmbalance.backbones.weights import require_weights_path
from mmbalance.data import ModalitySpec
from mmbalance.errors import ConfigError
from mmbalance.registry import register_backbone

if TYPE_CHECKING:
    from transformers import BertModel, PreTrainedModel

TEXT_POOLS = ("cls", "mean")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report; missing keys are checked (and raised) by us."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def load_hf_folder(
    cls: type[PreTrainedModel],
    folder: str | Path,
    what: str,
    allowed_missing: tuple[str, ...] = (),
    **kwargs: Any,
) -> PreTrainedModel:
    """``cls.from_pretrained`` on a local folder only; any missing weight is a ConfigError.

    Unexpected keys (another tower of a CLIP checkpoint, BERT's MLM head) are fine; a weight
    the model needs but the folder lacks would silently stay random, so it is refused.
    """
    p = require_weights_path(folder, what)
    if not p.is_dir():
        raise ConfigError(
            f"Pretrained weights for {what} must be a local Hugging Face folder (config.json "
            f"plus model.safetensors), but '{p}' is a file. Point weights= at the folder made "
            f"by save_pretrained or by downloading the model elsewhere."
        )
    try:
        with _quiet_transformers():
            model, info = cls.from_pretrained(
                str(p), local_files_only=True, output_loading_info=True, **kwargs
            )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"Could not load {what} from the folder '{p}': {exc}") from exc
    missing = sorted(
        k for k in info.get("missing_keys", ()) if not any(a in k for a in allowed_missing)
    )
    mismatched = sorted(info.get("mismatched_keys", ()))
    if missing or mismatched:
        raise ConfigError(
            f"The folder '{p}' does not hold complete weights for {what}: missing "
            f"{missing[:5]}, shape-mismatched {mismatched[:5]}. Check that it is the right "
            f"model (and the right options for this backbone)."
        )
    return model


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the sequence axis of (B, L, D) counting only positions where mask is 1."""
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def blank_text(batch: Any) -> dict[str, torch.Tensor]:
    """The absent-text input: one row holding only the sequence's first token ([CLS] for BERT,
    start-of-text for CLIP), every other position masked out. Id 0 is a real token, so an
    all-zero row would be a sentence of [PAD]s, not an absent modality."""
    ids, mask = text_inputs(batch)
    blank_ids = torch.zeros_like(ids[:1])
    blank_ids[:, 0] = ids[0, 0]
    blank_mask = torch.zeros_like(ids[:1] if mask is None else mask[:1])
    blank_mask[:, 0] = 1
    return {"input_ids": blank_ids, "attention_mask": blank_mask}


def text_inputs(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a text-modality batch into (input_ids, attention_mask); a bare id tensor works too."""
    if isinstance(batch, Mapping):
        return batch["input_ids"].long(), batch.get("attention_mask")
    return batch.long(), None


class BertEncoder(nn.Module):
    """BertModel (no pooler) -> last-layer [CLS] or masked token mean."""

    def __init__(self, bert: BertModel, pool: str = "cls") -> None:
        super().__init__()
        if pool not in TEXT_POOLS:
            raise ConfigError(f"The bert backbone got pool='{pool}'; use one of {TEXT_POOLS}.")
        self.bert = bert
        self.pool = pool
        self.out_dim = bert.config.hidden_size

    blank_input = staticmethod(blank_text)

    def forward(self, batch: Any) -> torch.Tensor:
        ids, mask = text_inputs(batch)
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden[:, 0] if self.pool == "cls" else masked_mean(hidden, mask)


def _check_tokens(spec: ModalitySpec, name: str) -> None:
    if spec.kind != "tokens":
        raise ConfigError(
            f"The {name} backbone takes token ids (modality kind 'tokens'), but this modality "
            f"is '{spec.kind}'. Pick another backbone for it."
        )


@register_backbone("bert", "BERT (transformers BertModel), last-layer [CLS]; local HF folder weights")
def build_bert(
    spec: ModalitySpec,
    out_dim: int | None,
    weights: str | None = None,
    config: Mapping[str, Any] | None = None,
    pool: str = "cls",
) -> nn.Module:
    """Build BERT; ``config`` fields override bert-base (or the folder's config when loading)."""
    from transformers import BertConfig, BertModel

    _check_tokens(spec, "bert")
    overrides = dict(config or {})
    if weights:
        bert = load_hf_folder(
            BertModel, weights, "the bert backbone", add_pooling_layer=False, **overrides
        )
    else:
        try:
            bert = BertModel(BertConfig(**overrides), add_pooling_layer=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"Bad bert config {overrides}: {exc}") from exc
    enc = BertEncoder(bert, pool=pool)
    return enc if not out_dim or out_dim == enc.out_dim else Projected(enc, enc.out_dim, out_dim)
