"""Transformer encoders for IEMOCAP (and any other fbank / image / token / feature-sequence input).

docs/datasets/iemocap.md takes IEMOCAP's encoders from MLA (``models/basic_model.py`` ``Modal3Classifier``):
a CAV-MAE audio branch, an M3AE-base image branch and an M3AE-base text branch, each a
ViT-B-sized transformer whose output tokens are averaged (768-d). They are built here from
timm's maintained ViT blocks, train from scratch, and load local checkpoints in their own
naming or in the official CAV-MAE / M3AE naming (``mmbalance.backbones.weights``):

* ``fbank_transformer``: kaldi fbank (1, T, F) or (T, F), time first as stored (1024 x 128);
  ``time_first=False`` takes (1, F, T) instead, the package's spectrogram convention.
  Like AST / CAV-MAE the map is turned to (F, T) (frequency = height) and cut into 16x16
  patches (8 x 64 = 512 tokens), learned position embeddings, no class token, pre-norm
  transformer blocks, final LayerNorm, token mean. ViT-B sizes by default.
* ``vit``: an image ViT shaped like timm ``vit_base_patch16_224`` at the modality's size
  (IEMOCAP faces are 256 px -> 256 tokens); ``pool="avg"`` (token mean), ``"token"`` (the class
  token) or ``"all"`` (mean over every token, class token included: M3AE as MLA pools it).
* ``m3ae_text``: M3AE's text branch (token embedding + fixed sine-cosine positions + type
  embedding, a class token, pre-norm blocks with the padding masked out of attention, final
  LayerNorm, token mean), for MLA's BERT-vocabulary ids stored without [CLS]/[SEP].
* ``seq_transformer``: for the MulT feature pickles (GloVe 300 / COVAREP 74 / Facet 35 per
  step): a linear embedding of each (L, D) step, sinusoidal positions, a PyTorch transformer
  encoder and a mean over the non-padded steps. Padding comes either from a dict input
  ``{"features": (B, L, D), "attention_mask": (B, L)}`` (1 = real step, like the text
  convention) or, with ``mask_zero_rows=True``, from all-zero steps (MulT zero-pads).

Weights (``weights=PATH``, a ``torch.save`` file read with ``weights_only=True``) and the
options every transformer here shares:

* ``weights_format``: ``auto`` (from the names in the file), ``timm`` (timm
  ``VisionTransformer`` naming, which is also this suite's own), ``cavmae`` or ``m3ae``. The
  family also shapes the network so the official forward pass is reproduced: CAV-MAE - no
  class token, LayerNorm eps 1e-5; M3AE - a class token without position, eps 1e-5, and for
  ``vit`` the mean over all tokens; timm - eps 1e-6 (unless ``norm_eps``/``pool`` are set).
  Set without ``weights`` it builds that family's layout from random init. ``layout``
  (auto | timm | cavmae | m3ae) sets the layout apart from the file's naming, for a file in
  timm naming saved from a CAV-MAE or M3AE layout.
* A CAV-MAE file gives ``fbank_transformer`` its audio branch and ``vit`` its visual branch:
  ``blocks_{a,v}`` then the shared ``blocks_u`` with the branch's own norms, ``norm_{a,v}``;
  ``modality_{a,v}`` is folded into the position embedding (same forward pass). An M3AE file
  gives ``vit`` its image branch (the patch Linear becomes the patch convolution; the fixed
  2-D sine-cosine table at this grid + the image type embedding become the position
  embedding) and ``m3ae_text`` its text branch.
* Strict: every parameter must come from the file, every shape must match (the error names
  both tensors and both shapes); ``weights_partial=true`` keeps absent ones at random init
  with a warning. Tensors of the file that nothing used (the other branch, the decoder, a
  classifier) are listed in the encoder's ``weights_report``.
* ``weights_prefix``: keep only names under it (``mae_a.`` / ``mae_v.`` / ``mae_t.`` of a
  saved MLA model). ``module.`` prefixes and ``{'model': ...}`` wrappers are removed always.
* Position grids. The official code never resamples: CAV-MAE's checkpoints are for 1024 x 128
  fbanks (8 x 64 patches) and 224-px frames (14 x 14), and its loader fails on another size;
  M3AE computes its sine-cosine table for whatever grid it gets, so an M3AE file fits every
  size. So a CAV-MAE grid that differs from this model's is an error naming both grids;
  ``weights_resize_pos=true`` resamples it bicubically instead (a departure, recorded in the
  report). timm-format files keep timm's own behaviour: positions are resampled to the grid,
  the classifier head is dropped, a 3-channel patch embedding is summed to 1 channel for
  fbanks (the AST ImageNet trick) and a class token the fbank model does not use is removed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmbalance.backbones.common import Projected
from mmbalance.backbones.text import text_inputs
from mmbalance.backbones.weights import (
    LoadReport,
    Mapped,
    Source,
    WeightsError,
    apply_mapped_state,
    cavmae_to_vit,
    grid_of,
    identity_map,
    load_state_dict_file,
    m3ae_image_to_vit,
    m3ae_text_to_encoder,
    read_checkpoint,
    resolve_format,
    sincos_1d,
)
from mmbalance.data import ModalitySpec
from mmbalance.errors import ConfigError
from mmbalance.registry import register_backbone

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

VIT_B = {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0}
VIT_POOLS = ("avg", "token", "all")
TEXT_POOLS = ("all", "masked", "cls")


@dataclass(frozen=True)
class Flavour:
    """How a checkpoint family's ViT differs from timm's defaults."""

    class_token: bool
    no_embed_class: bool  # class token without a position embedding (M3AE)
    norm_eps: float
    pool: str


FLAVOURS = {
    "timm": Flavour(class_token=True, no_embed_class=False, norm_eps=1e-6, pool="avg"),
    "cavmae": Flavour(class_token=False, no_embed_class=False, norm_eps=1e-5, pool="avg"),
    "m3ae": Flavour(class_token=True, no_embed_class=True, norm_eps=1e-5, pool="all"),
}


def _vit_sizes(
    embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, name: str
) -> dict[str, Any]:
    if embed_dim % num_heads:
        raise ConfigError(
            f"The {name} backbone needs embed_dim divisible by num_heads, got {embed_dim} and "
            f"{num_heads}."
        )
    return {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "mlp_ratio": mlp_ratio}


def _layer_norm(eps: float) -> Any:
    return partial(nn.LayerNorm, eps=float(eps))


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


def _fit_cavmae_grid(
    mapped: Mapped, vit: VisionTransformer, branch: str, resize: bool, what: str, path: str | Path
) -> list[str]:
    """Check (or, opted in, resample) the CAV-MAE position grid against this ViT's grid."""
    src = mapped.get("pos_embed")
    if src is None or src.tensor.dim() != 3 or vit.pos_embed is None:
        return []
    ours = tuple(vit.patch_embed.grid_size)
    n = src.tensor.shape[1]
    if n == ours[0] * ours[1]:
        return []
    # audio: the frequency rows are fixed by the mel bins, only the length can differ
    theirs = grid_of(n, rows=ours[0] if branch == "a" else None)
    name = f"pos_embed_{branch}"
    if theirs is None or not resize:
        seen = f"a {theirs[0]} x {theirs[1]} patch grid ({n} tokens)" if theirs else f"{n} tokens"
        hint = ("feed 1024-frame x 128-mel fbanks (8 x 64 patches)" if branch == "a"
                else "set img_size=224 (14 x 14 patches) and resize the images to it")
        raise WeightsError(
            f"The CAV-MAE checkpoint '{path}' has {name} for {seen}, but {what} makes a "
            f"{ours[0]} x {ours[1]} grid ({ours[0] * ours[1]} tokens). The official CAV-MAE code "
            f"does not resample position embeddings: {hint}, or set weights_resize_pos=true "
            f"to resample them bicubically (a departure from the official code)."
            + ("" if theirs else " (The checkpoint's grid cannot even be inferred.)")
        )
    from timm.layers import resample_abs_pos_embed

    table = resample_abs_pos_embed(
        src.tensor.float(), new_size=list(ours), old_size=list(theirs), num_prefix_tokens=0
    )
    mapped["pos_embed"] = Source(src.names, table, f"{src.how} resampled {theirs} -> {ours}")
    return [f"pos_embed ({theirs[0]}x{theirs[1]} -> {ours[0]}x{ours[1]}, bicubic)"]


def load_vit_checkpoint(
    vit: VisionTransformer,
    state: dict[str, torch.Tensor],
    fmt: str,
    *,
    path: str | Path,
    what: str,
    branch: str,
    partial_ok: bool = False,
    resize_pos: bool = False,
) -> LoadReport:
    """Load a checkpoint of family ``fmt`` into a timm ViT built for that family.

    ``branch`` picks CAV-MAE's audio ('a') or visual ('v') branch; it is ignored otherwise.
    """
    absent: list[str] = []
    resized: list[str] = []
    if fmt == "timm":
        adapted = _adapt_vit_state(dict(state), vit)
        mapped = identity_map(adapted)
        if "pos_embed" in state and "pos_embed" in adapted and state["pos_embed"].shape != adapted["pos_embed"].shape:
            resized.append("pos_embed (timm resampling)")
        branch_name = None
    elif fmt == "cavmae":
        mapped, absent = cavmae_to_vit(state, branch, depth=len(vit.blocks))
        resized = _fit_cavmae_grid(mapped, vit, branch, resize_pos, what, path)
        branch_name = {"a": "audio", "v": "visual"}[branch]
    elif fmt == "m3ae":
        proj = vit.patch_embed.proj
        mapped, absent = m3ae_image_to_vit(
            state, depth=len(vit.blocks), grid=tuple(vit.patch_embed.grid_size),
            in_chans=proj.weight.shape[1], patch_size=proj.weight.shape[-1],
        )
        branch_name = "image"
    else:  # resolve_format only hands out the families above
        raise ValueError(f"no ViT loader for checkpoint format {fmt!r}")
    return apply_mapped_state(
        vit, mapped, state, path=path, what=what, fmt=fmt, branch=branch_name, absent=absent,
        allow_partial=partial_ok, resized=resized,
    )


def _layout(layout: str, fmt: str, allowed: tuple[str, ...], what: str) -> str:
    """The network layout: the weights' family unless ``layout`` names one (for a file in
    this suite's own timm naming saved from a CAV-MAE or M3AE layout)."""
    if layout == "auto":
        return fmt
    if layout not in allowed:
        raise ConfigError(f"{what} got layout='{layout}'; it takes 'auto' or one of {list(allowed)}.")
    if fmt != "timm" and layout != fmt:
        raise ConfigError(
            f"{what} got layout='{layout}' with a {fmt} checkpoint, which only fits the {fmt} "
            f"layout. Drop layout= (or set it to '{fmt}')."
        )
    return layout


def _read_weights(weights: str | None, prefix: str, what: str) -> dict[str, torch.Tensor] | None:
    return read_checkpoint(weights, what, prefix=prefix) if weights else None


def _finish(enc: nn.Module, natural: int, out_dim: int | None, report: LoadReport | None) -> nn.Module:
    """Add the projection when needed and keep the load report on what the builder returns."""
    out = enc if not out_dim or out_dim == natural else Projected(enc, natural, out_dim)
    if report is not None:
        enc.weights_report = report
        out.weights_report = report
    return out


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
        norm_eps: float = 1e-6,
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
            norm_layer=_layer_norm(norm_eps),
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


@register_backbone("fbank_transformer", "AST/CAV-MAE-style ViT over a (T, F) kaldi fbank, 16x16 patches, token mean; loads CAV-MAE audio")
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
    norm_eps: float | None = None,
    layout: str = "auto",
    weights_format: str = "auto",
    weights_prefix: str = "",
    weights_partial: bool = False,
    weights_resize_pos: bool = False,
) -> nn.Module:
    """Build the audio transformer; the spec's last two dims are (frames, mel bins)."""
    what = "the fbank_transformer backbone"
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
    state = _read_weights(weights, weights_prefix, what)
    fmt = resolve_format(weights_format, state, ("timm", "cavmae"), what)
    lay = _layout(layout, fmt, ("timm", "cavmae"), what)
    eps = FLAVOURS[lay].norm_eps if norm_eps is None else norm_eps
    enc = FbankTransformer(frames, mel, patch_size, sizes, drop_path_rate, time_first, eps)
    report = None
    if state is not None:
        report = load_vit_checkpoint(enc.vit, state, fmt, path=weights, what=what, branch="a",
                                     partial_ok=weights_partial, resize_pos=weights_resize_pos)
    return _finish(enc, enc.out_dim, out_dim, report)


@register_backbone("vit", "image ViT (timm vit_base_patch16_224 layout) at the modality's size; loads timm, CAV-MAE visual, M3AE image")
def build_vit(
    spec: ModalitySpec,
    out_dim: int | None,
    weights: str | None = None,
    img_size: int | None = None,
    patch_size: int = 16,
    pool: str | None = None,
    embed_dim: int = VIT_B["embed_dim"],
    depth: int = VIT_B["depth"],
    num_heads: int = VIT_B["num_heads"],
    mlp_ratio: float = VIT_B["mlp_ratio"],
    drop_path_rate: float = 0.0,
    norm_eps: float | None = None,
    layout: str = "auto",
    weights_format: str = "auto",
    weights_prefix: str = "",
    weights_partial: bool = False,
    weights_resize_pos: bool = False,
) -> nn.Module:
    """Build an image ViT; ``img_size`` defaults to the modality's (H, W); ``pool`` to the
    checkpoint family's (token mean; M3AE: mean over all tokens)."""
    what = "the vit backbone"
    if spec.kind != "image":
        raise ConfigError(
            f"The vit backbone takes images (C, H, W), but this modality is '{spec.kind}'. "
            f"Pick another backbone for it."
        )
    if pool is not None and pool not in VIT_POOLS:
        raise ConfigError(
            f"The vit backbone got pool='{pool}'; use 'avg' (token mean), 'token' (CLS) or "
            f"'all' (mean over every token, CLS included, as M3AE)."
        )
    from timm.models.vision_transformer import VisionTransformer

    size = (img_size, img_size) if img_size else tuple(spec.shape[1:3])
    sizes = _vit_sizes(embed_dim, depth, num_heads, mlp_ratio, "vit")
    state = _read_weights(weights, weights_prefix, what)
    fmt = resolve_format(weights_format, state, ("timm", "cavmae", "m3ae"), what)
    lay = _layout(layout, fmt, ("timm", "cavmae", "m3ae"), what)
    flavour = FLAVOURS[lay]
    pool = pool or flavour.pool
    if pool == "token" and not flavour.class_token:
        raise ConfigError(
            f"The vit backbone got pool='token', but a {lay} ViT has no class token. Use "
            f"pool='avg'."
        )
    vit = VisionTransformer(
        img_size=size,
        patch_size=patch_size,
        in_chans=spec.shape[0],
        num_classes=0,
        global_pool="token" if pool == "token" else "avg",
        pool_include_prefix=pool == "all",
        class_token=flavour.class_token,
        no_embed_class=flavour.no_embed_class,
        fc_norm=False,
        drop_path_rate=drop_path_rate,
        norm_layer=_layer_norm(flavour.norm_eps if norm_eps is None else norm_eps),
        **sizes,
    )
    vit.out_dim = vit.embed_dim
    report = None
    if state is not None:
        report = load_vit_checkpoint(vit, state, fmt, path=weights, what=what, branch="v",
                                     partial_ok=weights_partial, resize_pos=weights_resize_pos)
    return _finish(vit, vit.out_dim, out_dim, report)


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


class M3AEText(nn.Module):
    """M3AE's text branch: [CLS] + (embedding + sin-cos position + type), pre-norm blocks.

    As MLA runs it (``forward_representation(None, ids, padding_mask)`` then a token mean):
    the class token is prepended without position or type embedding and is never masked;
    the padded ids take part as queries but are masked out as keys; the final LayerNorm is
    applied to every token. ``pool="all"`` averages all L + 1 outputs, padding included, as
    MLA does; ``"masked"`` averages the class token and the real tokens; ``"cls"`` takes the
    class token.
    """

    def __init__(
        self,
        vocab_size: int,
        sizes: Mapping[str, Any],
        pool: str = "all",
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
    ) -> None:
        from timm.models.vision_transformer import Block

        super().__init__()
        if pool not in TEXT_POOLS:
            hint = (" ('mean' is the bert backbone's option, e.g. left over from IEMOCAP's default "
                    "text backbone: 'all' is MLA's mean over every token, 'masked' the mean over "
                    "the real tokens)") if pool == "mean" else ""
            raise ConfigError(
                f"The m3ae_text backbone got pool='{pool}'; use one of {list(TEXT_POOLS)}{hint}. "
                f"Set it with --set backbone.<modality>.pool=all."
            )
        dim, depth = int(sizes["embed_dim"]), int(sizes["depth"])
        if dim % 2:
            raise ConfigError(f"The m3ae_text backbone needs an even embed_dim (sine-cosine positions), got {dim}.")
        self.embed = nn.Embedding(vocab_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.type_embed = nn.Parameter(torch.zeros(1, 1, dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist() if depth else []
        self.blocks = nn.ModuleList(
            Block(dim, int(sizes["num_heads"]), float(sizes["mlp_ratio"]), qkv_bias=True,
                  drop_path=rates[i], norm_layer=_layer_norm(norm_eps))
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.pool = pool
        self.vocab_size = vocab_size
        self.out_dim = dim
        self._positions: dict[tuple[int, str], torch.Tensor] = {}  # fixed tables, by (L, device)
        self._init_weights()

    def _init_weights(self) -> None:
        for p in (self.embed.weight, self.cls_token, self.type_embed):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @staticmethod
    def blank_input(batch: Any) -> dict[str, torch.Tensor]:
        """The absent-text input: one row of all padding, so only the class token is real."""
        ids, _ = text_inputs(batch)
        blank = torch.zeros_like(ids[:1])
        return {"input_ids": blank, "attention_mask": torch.zeros_like(blank)}

    def _position_table(self, length: int, device: torch.device) -> torch.Tensor:
        key = (length, str(device))
        if key not in self._positions:
            self._positions[key] = sincos_1d(torch.arange(length), self.out_dim).unsqueeze(0).to(device)
        return self._positions[key]

    def forward(self, batch: Any) -> torch.Tensor:
        ids, mask = text_inputs(batch)
        if ids.dim() == 3 and ids.shape[1] == 1:  # MLA's stored (1, L) rows
            ids = ids.squeeze(1)
            mask = None if mask is None else mask.squeeze(1)
        if ids.dim() != 2:
            raise ValueError(f"m3ae_text expects (B, L) token ids, got {tuple(ids.shape)}")
        b, length = ids.shape
        x = self.embed(ids) + self._position_table(length, ids.device) + self.type_embed
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        keep = None
        attn_mask = None
        if mask is not None:
            keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=ids.device), mask.bool()], dim=1)
            attn_mask = keep[:, None, None, :]  # (B, 1, 1, L + 1): which keys take part
        for blk in self.blocks:
            x = blk(x, attn_mask=attn_mask)
        x = self.norm(x)
        if self.pool == "cls":
            return x[:, 0]
        if self.pool == "masked" and keep is not None:
            m = keep.to(x.dtype).unsqueeze(-1)
            return (x * m).sum(dim=1) / m.sum(dim=1)
        return x.mean(dim=1)


@register_backbone("m3ae_text", "M3AE text branch (MLA's IEMOCAP text): ids + sin-cos positions, pre-norm transformer, token mean; loads M3AE")
def build_m3ae_text(
    spec: ModalitySpec,
    out_dim: int | None,
    weights: str | None = None,
    vocab_size: int = 30522,
    embed_dim: int = VIT_B["embed_dim"],
    depth: int = VIT_B["depth"],
    num_heads: int = VIT_B["num_heads"],
    mlp_ratio: float = VIT_B["mlp_ratio"],
    pool: str = "all",
    drop_path_rate: float = 0.0,
    norm_eps: float = 1e-5,
    weights_format: str = "auto",
    weights_prefix: str = "",
    weights_partial: bool = False,
) -> nn.Module:
    """Build the M3AE text encoder; ``vocab_size`` is bert-base-uncased's (MLA's tokenizer)."""
    what = "the m3ae_text backbone"
    if spec.kind != "tokens":
        raise ConfigError(
            f"The m3ae_text backbone takes token ids (modality kind 'tokens'), but this "
            f"modality is '{spec.kind}'. Pick another backbone for it."
        )
    sizes = _vit_sizes(embed_dim, depth, num_heads, mlp_ratio, "m3ae_text")
    state = _read_weights(weights, weights_prefix, what)
    fmt = resolve_format(weights_format, state, ("mmbalance", "m3ae"), what)
    enc = M3AEText(vocab_size, sizes, pool, drop_path_rate, norm_eps)
    report = None
    if state is not None:
        if fmt == "m3ae":
            mapped, absent = m3ae_text_to_encoder(state, depth)
            branch = "text"
        else:
            mapped, absent, branch = identity_map(state), [], None
        report = apply_mapped_state(
            enc, mapped, state, path=weights, what=what, fmt=fmt, branch=branch, absent=absent,
            allow_partial=weights_partial,
        )
    return _finish(enc, enc.out_dim, out_dim, report)
