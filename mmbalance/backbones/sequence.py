"""Transformer encoders for IEMOCAP (and any other fbank / image / feature-sequence input).

iprm.md 2.2 takes IEMOCAP's encoders from MLA: a CAV-MAE audio branch, an M3AE-base image
branch and an M3AE-base text branch, each a ViT-B-sized transformer whose output tokens are
averaged (768-d). Those checkpoints are not downloadable here, so these are the same kind of
network built from timm's maintained ViT, trainable from scratch and loading local weights:

* ``fbank_transformer``: kaldi fbank (1, T, F) or (T, F), time first as stored (1024 x 128);
  ``time_first=False`` takes (1, F, T) instead, the package's spectrogram convention.
  Like AST / CAV-MAE the map is turned to (F, T) (frequency = height) and cut into 16x16
  patches (8 x 64 = 512 tokens), learned position embeddings, no class token, pre-norm
  transformer blocks, final LayerNorm, token mean. ViT-B sizes by default.
* ``vit``: an image ViT shaped like timm ``vit_base_patch16_224`` at the modality's size
  (IEMOCAP faces are 256 px -> 256 tokens); ``pool="avg"`` (token mean, default, as M3AE) or
  ``"token"`` (the class token).
* ``seq_transformer``: for the MulT feature pickles (GloVe 300 / COVAREP 74 / Facet 35 per
  step): a linear embedding of each (L, D) step, sinusoidal positions, a PyTorch transformer
  encoder and a mean over the non-padded steps. Padding comes either from a dict input
  ``{"features": (B, L, D), "attention_mask": (B, L)}`` (1 = real step, like the text
  convention) or, with ``mask_zero_rows=True``, from all-zero steps (MulT zero-pads).

Weights (``weights=PATH``): a ``torch.save``'d state dict. For the two ViTs it is in timm
``VisionTransformer`` naming, so a timm ViT checkpoint (e.g. an ImageNet
``vit_base_patch16_224``) also loads: the classifier head is dropped, position embeddings are
resampled to this grid, a 3-channel patch embedding is summed to 1 channel for fbanks (the AST
ImageNet trick) and a class token the fbank model does not use is removed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmbalance.backbones.common import Projected
from mmbalance.backbones.weights import load_state_dict_file, require_weights_path
from mmbalance.data import ModalitySpec
from mmbalance.errors import ConfigError
from mmbalance.registry import register_backbone

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

VIT_B = {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0}


def _vit_sizes(
    embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, name: str
) -> dict[str, Any]:
    if embed_dim % num_heads:
        raise ConfigError(
            f"The {name} backbone needs embed_dim divisible by num_heads, got {embed_dim} and "
            f"{num_heads}."
        )
    return {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "mlp_ratio": mlp_ratio}


def _read_state(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    p = require_weights_path(path, what)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"Could not read weights for {what} from '{p}': {exc}. Expected a state dict "
            f"saved with torch.save."
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _adapt_vit_state(state: dict[str, torch.Tensor], vit: VisionTransformer) -> dict[str, torch.Tensor]:
    """Make a timm-ViT checkpoint fit this ViT: head, class token, channels, grid size."""
    from timm.models import adapt_input_conv
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    if vit.cls_token is None and "cls_token" in state:
        state.pop("cls_token")
        pos = state.get("pos_embed")
        if pos is not None and pos.shape[1] == _grid_tokens(state) + 1:
            state["pos_embed"] = pos[:, 1:]
    patch = state.get("patch_embed.proj.weight")
    want_chans = vit.patch_embed.proj.weight.shape[1]
    if patch is not None and patch.dim() == 4 and patch.shape[1] != want_chans:
        state["patch_embed.proj.weight"] = adapt_input_conv(want_chans, patch)
    return checkpoint_filter_fn(state, vit)


def _grid_tokens(state: Mapping[str, torch.Tensor]) -> int:
    """Number of patch tokens the checkpoint's pos_embed was trained for (square grid guess)."""
    pos = state["pos_embed"]
    n = pos.shape[1]
    return n - 1 if math.isqrt(n - 1) ** 2 == n - 1 else n


def load_vit_weights(vit: VisionTransformer, path: str | Path, what: str) -> None:
    state = _adapt_vit_state(_read_state(path, what), vit)
    try:
        result = vit.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ConfigError(f"The weights at '{path}' do not fit {what}: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"The weights at '{path}' do not match {what}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}. Expected a timm VisionTransformer state "
            f"dict of the same depth and width."
        )


class FbankTransformer(nn.Module):
    """CAV-MAE/AST-style audio transformer over a time-first kaldi fbank."""

    def __init__(
        self,
        frames: int,
        mel_bins: int,
        patch_size: int,
        sizes: Mapping[str, Any],
        drop_path_rate: float = 0.0,
        time_first: bool = True,
    ) -> None:
        from timm.models.vision_transformer import VisionTransformer

        super().__init__()
        self.frames, self.mel_bins = frames, mel_bins
        self.time_first = time_first
        self.vit = VisionTransformer(
            img_size=(mel_bins, frames),
            patch_size=patch_size,
            in_chans=1,
            num_classes=0,
            global_pool="avg",
            class_token=False,
            fc_norm=False,  # norm every token, then average (CAV-MAE's norm_a + mean)
            drop_path_rate=drop_path_rate,
            **sizes,
        )
        self.out_dim = self.vit.embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        dims = (self.frames, self.mel_bins) if self.time_first else (self.mel_bins, self.frames)
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, *dims):
            raise ValueError(
                f"fbank_transformer expects (B, 1, {dims[0]}, {dims[1]}) or "
                f"(B, {dims[0]}, {dims[1]}) fbanks, got {tuple(x.shape)}"
            )
        return self.vit(x.transpose(2, 3) if self.time_first else x)


@register_backbone("fbank_transformer", "AST/CAV-MAE-style ViT over a (T, F) kaldi fbank, 16x16 patches, token mean")
def build_fbank_transformer(
    spec: ModalitySpec,
    out_dim: int | None,
    weights: str | None = None,
    patch_size: int = 16,
    embed_dim: int = VIT_B["embed_dim"],
    depth: int = VIT_B["depth"],
    num_heads: int = VIT_B["num_heads"],
    mlp_ratio: float = VIT_B["mlp_ratio"],
    drop_path_rate: float = 0.0,
    time_first: bool = True,
) -> nn.Module:
    """Build the audio transformer; the spec's last two dims are (frames, mel bins)."""
    if spec.kind not in ("spectrogram", "sequence") or len(spec.shape) not in (2, 3):
        raise ConfigError(
            f"The fbank_transformer backbone takes a (1, T, F) or (T, F) fbank, but this "
            f"modality is '{spec.kind}' {spec.shape}. Pick another backbone for it."
        )
    frames, mel = spec.shape[-2:] if time_first else spec.shape[-1:-3:-1]
    if frames % patch_size or mel % patch_size:
        raise ConfigError(
            f"fbank_transformer: the fbank size {frames}x{mel} must be a multiple of "
            f"patch_size={patch_size}. Pad or cut the fbank (1024x128 is the usual size)."
        )
    sizes = _vit_sizes(embed_dim, depth, num_heads, mlp_ratio, "fbank_transformer")
    enc = FbankTransformer(frames, mel, patch_size, sizes, drop_path_rate, time_first)
    if weights:
        load_vit_weights(enc.vit, weights, "the fbank_transformer backbone")
    return enc if not out_dim or out_dim == enc.out_dim else Projected(enc, enc.out_dim, out_dim)


@register_backbone("vit", "image ViT (timm vit_base_patch16_224 layout) at the modality's size, token mean or CLS")
def build_vit(
    spec: ModalitySpec,
    out_dim: int | None,
    weights: str | None = None,
    img_size: int | None = None,
    patch_size: int = 16,
    pool: str = "avg",
    embed_dim: int = VIT_B["embed_dim"],
    depth: int = VIT_B["depth"],
    num_heads: int = VIT_B["num_heads"],
    mlp_ratio: float = VIT_B["mlp_ratio"],
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """Build an image ViT; ``img_size`` defaults to the modality's (H, W)."""
    if spec.kind != "image":
        raise ConfigError(
            f"The vit backbone takes images (C, H, W), but this modality is '{spec.kind}'. "
            f"Pick another backbone for it."
        )
    if pool not in ("avg", "token"):
        raise ConfigError(f"The vit backbone got pool='{pool}'; use 'avg' (token mean) or 'token' (CLS).")
    from timm.models.vision_transformer import VisionTransformer

    size = (img_size, img_size) if img_size else tuple(spec.shape[1:3])
    sizes = _vit_sizes(embed_dim, depth, num_heads, mlp_ratio, "vit")
    vit = VisionTransformer(
        img_size=size,
        patch_size=patch_size,
        in_chans=spec.shape[0],
        num_classes=0,
        global_pool=pool,
        fc_norm=False,
        drop_path_rate=drop_path_rate,
        **sizes,
    )
    vit.out_dim = vit.embed_dim
    if weights:
        load_vit_weights(vit, weights, "the vit backbone")
    return vit if not out_dim or out_dim == vit.out_dim else Projected(vit, vit.out_dim, out_dim)


def sinusoidal_positions(length: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """The (length, dim) sine/cosine table of 'Attention is all you need' (any length)."""
    pos = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


class SeqTransformer(nn.Module):
    """Linear step embedding + sinusoidal positions + transformer encoder + masked mean."""

    def __init__(
        self,
        in_dim: int,
        d_model: int,
        depth: int,
        num_heads: int,
        ff_mult: float,
        dropout: float,
        mask_zero_rows: bool,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model,
            num_heads,
            int(d_model * ff_mult),
            dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.mask_zero_rows = mask_zero_rows
        self.in_dim = in_dim
        self.out_dim = d_model

    def _split(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(batch, Mapping):
            return batch["features"], batch.get("attention_mask")
        mask = (batch != 0).any(dim=-1).long() if self.mask_zero_rows else None
        return batch, mask

    def forward(self, batch: Any) -> torch.Tensor:
        x, mask = self._split(batch)
        if x.dim() != 3 or x.shape[-1] != self.in_dim:
            raise ValueError(f"seq_transformer expects (B, L, {self.in_dim}), got {tuple(x.shape)}")
        h = self.embed(x.float())
        h = h + sinusoidal_positions(h.shape[1], h.shape[2], h.device).to(h.dtype)
        if mask is not None:
            mask = mask.bool()
            mask = mask | ~mask.any(dim=1, keepdim=True)  # an all-padding row attends to all
        pad = None if mask is None else ~mask
        h = self.norm(self.encoder(h, src_key_padding_mask=pad))
        if mask is None:
            return h.mean(dim=1)
        m = mask.to(h.dtype).unsqueeze(-1)
        return (h * m).sum(dim=1) / m.sum(dim=1)


@register_backbone("seq_transformer", "transformer over (L, D) feature sequences (MulT pickles), masked mean")
def build_seq_transformer(
    spec: ModalitySpec,
    out_dim: int | None,
    weights: str | None = None,
    d_model: int = 256,
    depth: int = 4,
    num_heads: int = 8,
    ff_mult: float = 4.0,
    dropout: float = 0.1,
    mask_zero_rows: bool = False,
) -> nn.Module:
    """Build the sequence encoder; the spec's last dim is the per-step feature size D."""
    if spec.kind != "sequence" or len(spec.shape) != 2:
        raise ConfigError(
            f"The seq_transformer backbone takes (L, D) feature sequences (kind 'sequence'), "
            f"but this modality is '{spec.kind}' {spec.shape}. Pick another backbone for it."
        )
    if d_model % num_heads:
        raise ConfigError(
            f"seq_transformer needs d_model divisible by num_heads, got {d_model} and {num_heads}."
        )
    enc = SeqTransformer(spec.shape[1], d_model, depth, num_heads, ff_mult, dropout, mask_zero_rows)
    if weights:
        load_state_dict_file(enc, weights, "the seq_transformer backbone")
    return enc if not out_dim or out_dim == enc.out_dim else Projected(enc, enc.out_dim, out_dim)
