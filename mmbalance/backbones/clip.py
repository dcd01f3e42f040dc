"""CLIP ViT-B/16 towers (transformers): ``clip_vision`` for images, ``clip_text`` for text.

Output choice (documented decision): by default each tower returns its pooled output passed
through CLIP's own projection, i.e. the 512-d joint-embedding vectors (``image_embeds`` /
``text_embeds``). That gives both modalities the same width out of the box (GMM/slerp needs a
common d) and keeps the space the two towers were aligned in. ``projection=False`` returns the
un-projected pooled output instead: post-layernorm [CLS] of the vision tower (768) or the
final-layer-norm state of the text tower's end-of-text token (512).

``config`` holds CLIPVisionConfig / CLIPTextConfig fields; the defaults are ViT-B/16 (vision:
224 px, patch 16, width 768, 12 layers; text: width 512, 12 layers, 77 positions, vocabulary
49408, projection 512), so tests can build a tiny tower. ``weights=DIR`` is a local Hugging
Face folder: either a full ``CLIPModel`` checkpoint (e.g. a saved openai/clip-vit-base-patch16;
the other tower's weights are ignored) or a single-tower folder. Nothing is downloaded.

Inputs: images (B, 3, H, W), already normalised with CLIP's mean/std by the dataset; other
sizes than ``image_size`` are handled by interpolating the position embeddings. Text is the
usual dict ``{"input_ids", "attention_mask"}`` tokenised with the CLIP tokenizer (its
end-of-text id 49407 marks the pooled position).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmbalance.backbones.common import Projected
from mmbalance.backbones.text import _check_tokens, blank_text, load_hf_folder, text_inputs
from mmbalance.data import ModalitySpec
from mmbalance.errors import ConfigError
from mmbalance.registry import register_backbone

if TYPE_CHECKING:
    from transformers import PreTrainedModel

VIT_B16_VISION = {"patch_size": 16, "image_size": 224}


def _tower(
    classes: tuple[type[PreTrainedModel], type[PreTrainedModel]],
    config_cls: type,
    defaults: Mapping[str, Any],
    weights: str | None,
    config: Mapping[str, Any] | None,
    projection: bool,
    what: str,
) -> PreTrainedModel:
    """Build (or load) the plain or the projected tower class."""
    cls = classes[1] if projection else classes[0]
    overrides = dict(config or {})
    if weights:
        return load_hf_folder(cls, weights, what, **overrides)
    try:
        return cls(config_cls(**{**defaults, **overrides}))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Bad {what} config {overrides}: {exc}") from exc


class CLIPVisionEncoder(nn.Module):
    """CLIP vision tower -> pooled (optionally projected) image vector."""

    def __init__(self, tower: PreTrainedModel, projection: bool) -> None:
        super().__init__()
        self.tower = tower
        self.projection = projection
        cfg = tower.config
        self.out_dim = cfg.projection_dim if projection else cfg.hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.tower.config.image_size
        interpolate = tuple(x.shape[-2:]) != (size, size)
        out = self.tower(pixel_values=x, interpolate_pos_encoding=interpolate)
        return out.image_embeds if self.projection else out.pooler_output


class CLIPTextEncoder(nn.Module):
    """CLIP text tower -> end-of-text (optionally projected) vector."""

    def __init__(self, tower: PreTrainedModel, projection: bool) -> None:
        super().__init__()
        self.tower = tower
        self.projection = projection
        cfg = tower.config
        self.out_dim = cfg.projection_dim if projection else cfg.hidden_size

    blank_input = staticmethod(blank_text)

    def forward(self, batch: Any) -> torch.Tensor:
        ids, mask = text_inputs(batch)
        out = self.tower(input_ids=ids, attention_mask=mask)
        return out.text_embeds if self.projection else out.pooler_output


def _wrap(enc: nn.Module, out_dim: int | None) -> nn.Module:
    return enc if not out_dim or out_dim == enc.out_dim else Projected(enc, enc.out_dim, out_dim)


@register_backbone("clip_vision", "CLIP ViT-B/16 image tower, projected 512-d embedding; local HF folder weights")
def build_clip_vision(
    spec: ModalitySpec,
    out_dim: int | None,
    weights: str | None = None,
    config: Mapping[str, Any] | None = None,
    projection: bool = True,
) -> nn.Module:
    if spec.kind != "image":
        raise ConfigError(
            f"The clip_vision backbone takes images (3, H, W), but this modality is "
            f"'{spec.kind}'. Pick another backbone for it."
        )
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    tower = _tower(
        (CLIPVisionModel, CLIPVisionModelWithProjection),
        CLIPVisionConfig,
        VIT_B16_VISION,
        weights,
        config,
        projection,
        "the clip_vision backbone",
    )
    return _wrap(CLIPVisionEncoder(tower, projection), out_dim)


@register_backbone("clip_text", "CLIP ViT-B/16 text tower, projected 512-d embedding; local HF folder weights")
def build_clip_text(
    spec: ModalitySpec,
    out_dim: int | None,
    weights: str | None = None,
    config: Mapping[str, Any] | None = None,
    projection: bool = True,
) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _check_tokens(spec, "clip_text")
    tower = _tower(
        (CLIPTextModel, CLIPTextModelWithProjection),
        CLIPTextConfig,
        {},
        weights,
        config,
        projection,
        "the clip_text backbone",
    )
    return _wrap(CLIPTextEncoder(tower, projection), out_dim)
