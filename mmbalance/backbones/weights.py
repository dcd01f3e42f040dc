"""Loading pretrained weights from local files (never from a hub at run time).

Two layers:

* Reading. :func:`read_checkpoint` opens a ``torch.save`` file with
  ``torch.load(weights_only=True)``, so a file that holds anything but tensors and plain
  containers (a planted pickle) is refused before any of its code can run. It unwraps the
  usual containers (``{'model': state}``, ``{'state_dict': state}``, training checkpoints that
  also hold an optimizer), drops the ``module.`` prefix that ``nn.DataParallel`` puts on every
  name (CAV-MAE's released checkpoints all carry it) and, with ``prefix=``, keeps one
  sub-model of a bigger state dict (e.g. ``mae_a.`` of a saved MLA model).
* Mapping. A checkpoint in another code base's naming is turned into a
  ``{our name: Source}`` table by a pure function (:func:`cavmae_to_vit`,
  :func:`m3ae_image_to_vit`, :func:`m3ae_text_to_encoder`), and :func:`apply_mapped_state`
  loads it strictly: every shape must match (the error names both parameters and both
  shapes), every parameter of the model must be covered (unless ``allow_partial``), and the
  checkpoint tensors nothing used are listed in the returned :class:`LoadReport`.

The official naming (read from the released code, not copied):

* CAV-MAE (YuanGongND/cav-mae ``src/models/cav_mae.py``; MLA loads it into ``CAVMAEFT`` for
  IEMOCAP's audio): ``patch_embed_{a,v}.proj``, ``pos_embed_{a,v}`` (1, N, D) and
  ``modality_{a,v}`` (1, 1, D), both added to every patch token; ``blocks_{a,v}.i`` are the
  modality-specific blocks, run with their ``norm1``/``norm2``; ``blocks_u.j`` are the shared
  blocks, run for audio with ``norm1_a``/``norm2_a`` and for video with ``norm1_v``/``norm2_v``
  (their attention and MLP are shared); then ``norm_{a,v}`` and a token mean. No class
  token. LayerNorm eps 1e-5 (``nn.LayerNorm``'s default).
* M3AE as MLA's PyTorch port names it (MLA ``models/m3ae.py``, the checkpoint MLA loads as
  ``m3ae_base.pth`` for IEMOCAP's image and text): ``image_embedding`` is a Linear over
  flattened 16x16x3 patches ordered (channel, row, column); ``text_embedding`` an
  ``nn.Embedding``; ``encoder_{image,text}_type_embedding`` (1, 1, D) added to every token of
  that modality; ``cls_token`` prepended without position or type; positions are fixed
  sine-cosine tables (not in the checkpoint); ``encoder.blocks.i.{layer_norm1,
  attention.qkv_linear, attention.fc, layer_norm2, transformer_mlp.fc1, transformer_mlp.fc2}``
  and ``encoder.layer_norm``. LayerNorm eps 1e-5.
"""

from __future__ import annotations

import math
import pickle
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmbalance.errors import ConfigError

WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "net")
CAVMAE_BRANCHES = {"a": "audio", "v": "visual"}
# one timm / CAV-MAE transformer block: the parameter names below each "blocks.i."
VIT_BLOCK_PARAMS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
# the same pieces in MLA's M3AE port, in the same order
M3AE_BLOCK_PARAMS = (
    "layer_norm1",
    "attention.qkv_linear",
    "attention.fc",
    "layer_norm2",
    "transformer_mlp.fc1",
    "transformer_mlp.fc2",
)


class WeightsError(ConfigError):
    """A pretrained-weights file that cannot be read or does not fit the model."""


class PartialWeightsWarning(UserWarning):
    """Some parameters were left at their random init (``weights_partial=true``)."""


def require_weights_path(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(
            f"Pretrained weights for {what} were asked for at '{p}', but that path does not "
            f"exist. Weights are read from local files only (nothing is downloaded at run "
            f"time): put the file there, or drop the setting to train from random init."
        )
    return p


# ------------------------------------------------------------------------------ reading


def read_checkpoint(path: str | Path, what: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a ``torch.save`` file, by name, without running any code in it.

    Why ``weights_only=True``: a weights file is often downloaded from a mirror or shared
    drive, and a full unpickle would run whatever the file says. Containers are unwrapped
    (see :data:`WRAPPER_KEYS`), ``module.`` prefixes dropped, non-tensor entries (epoch
    counters, args) ignored; ``prefix`` keeps only the names under it, with it removed.
    """
    p = require_weights_path(path, what)
    if p.is_dir():
        raise WeightsError(
            f"Pretrained weights for {what} must be one file saved with torch.save, but '{p}' "
            f"is a folder. Point weights= at the checkpoint file inside it."
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            raise WeightsError(
                f"Refused to load the weights for {what} from '{p}': the file holds Python "
                f"objects other than tensors, and unpickling them could run code, so it is "
                f"read with torch.load(weights_only=True) only ({_first_line(exc)}). Re-save "
                f"just the tensors where you trust the file: "
                f"torch.save(model.state_dict(), path)."
            ) from exc
        raise _not_a_checkpoint(p, what, exc) from exc
    except Exception as exc:  # zip / magic-number / EOF errors of a file that is no checkpoint
        raise _not_a_checkpoint(p, what, exc) from exc
    state = _unwrap(obj)
    if state is None:
        raise WeightsError(
            f"The file '{p}' given as weights for {what} is a readable torch file but holds no "
            f"state dict (found {_describe(obj)}). Expected {{name: tensor}} as written by "
            f"torch.save(model.state_dict(), path), possibly under 'model' or 'state_dict'."
        )
    state = {_strip_module(k): v for k, v in state.items()}
    if prefix:
        kept = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not kept:
            raise WeightsError(
                f"No tensor of the weights file '{p}' for {what} starts with weights_prefix="
                f"'{prefix}'. Its names start with: {', '.join(name_groups(state)[:12])}."
            )
        state = kept
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _not_a_checkpoint(p: Path, what: str, exc: BaseException) -> WeightsError:
    return WeightsError(
        f"The file '{p}' given as weights for {what} is not a PyTorch checkpoint "
        f"({type(exc).__name__}: {_first_line(exc)}). Expected a file written by torch.save "
        f"(a state dict, or {{'model': state_dict}})."
    )


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj)[:6]
        return f"a dict with keys {keys}"
    return f"a {type(obj).__name__}"


def _unwrap(obj: Any) -> dict[str, torch.Tensor] | None:
    """The innermost {str: tensor} mapping of a checkpoint, or None when there is none."""
    for _ in range(4):  # {'model': {'state_dict': ...}} and similar nestings
        if not isinstance(obj, Mapping):
            return None
        inner = next(
            (obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping) and _has_tensors(obj[k])),
            None,
        )
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        return None
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return tensors or None


def _has_tensors(obj: Mapping[Any, Any]) -> bool:
    return any(isinstance(v, (torch.Tensor, Mapping)) for v in obj.values())


def _strip_module(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def name_groups(names: Iterable[str]) -> list[str]:
    """Distinct names with block numbers folded and the weight/bias leaf dropped
    (``blocks_a.*.norm1_a``), for short messages."""
    seen: dict[str, None] = {}
    for n in names:
        stem = re.sub(r"\.\d+(?=\.|$)", ".*", n)
        stem = re.sub(r"\.(weight|bias)$", "", stem)
        seen.setdefault(stem, None)
    # numbered groups (blocks_a.*...) first: they say most about which model a file is for
    return sorted(seen, key=lambda stem: ".*" not in stem)


# ------------------------------------------------------------------------ format detection


def detect_format(state: Mapping[str, torch.Tensor]) -> str:
    """'cavmae', 'm3ae' or 'timm' (anything else: our own / timm ViT naming) from the names."""
    names = set(state)
    if any(n.startswith(("blocks_a.", "blocks_v.", "blocks_u.", "patch_embed_a.", "patch_embed_v."))
           for n in names) or {"pos_embed_a", "pos_embed_v"} & names:
        return "cavmae"
    if any(n.startswith("encoder.blocks.") for n in names) and (
        {"image_embedding.weight", "text_embedding.weight", "encoder.layer_norm.weight"} & names
    ):
        return "m3ae"
    return "timm"


def resolve_format(requested: str, state: Mapping[str, torch.Tensor] | None, allowed: tuple[str, ...],
                   what: str) -> str:
    """The checkpoint family to build for: ``requested`` unless 'auto'; refuses other families."""
    if requested != "auto" and requested not in allowed:
        raise ConfigError(
            f"{what} got weights_format='{requested}'; it takes 'auto' or one of {list(allowed)}."
        )
    if requested != "auto":
        return requested
    if state is None:
        return allowed[0]
    found = detect_format(state)
    if found == "timm" and "timm" not in allowed:
        return allowed[0]
    if found not in allowed:
        raise WeightsError(
            f"The weights given to {what} are a {found} checkpoint, which this backbone cannot "
            f"take (it takes {list(allowed)}). Use the backbone for that checkpoint, or set "
            f"weights_format= if the detection is wrong."
        )
    return found


# ------------------------------------------------------------------------------- mapping


@dataclass(frozen=True)
class Source:
    """Where one model tensor comes from: the checkpoint names it was made of, and the value."""

    names: tuple[str, ...]
    tensor: torch.Tensor
    how: str = ""  # e.g. "pos_embed_a + modality_a"; empty for a plain copy


Mapped = dict[str, Source]


@dataclass
class LoadReport:
    """What a mapped load did; kept on the built encoder as ``weights_report``."""

    path: str
    format: str
    branch: str | None = None
    loaded: list[str] = field(default_factory=list)  # model names that received a tensor
    missing: list[str] = field(default_factory=list)  # model names left at init (partial)
    unused: list[str] = field(default_factory=list)  # checkpoint names nothing used
    resized: list[str] = field(default_factory=list)  # model names whose grid was resampled
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        part = f" ({self.branch} branch)" if self.branch else ""
        text = (f"{len(self.loaded)} tensors from {self.format} checkpoint{part} '{self.path}'; "
                f"{len(self.unused)} checkpoint tensors unused")
        if self.unused:
            text += f" ({', '.join(name_groups(self.unused)[:8])})"
        if self.missing:
            text += f"; {len(self.missing)} left at random init ({', '.join(self.missing[:5])})"
        if self.resized:
            text += f"; resampled {', '.join(self.resized)}"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "format": self.format, "branch": self.branch,
            "loaded": len(self.loaded), "missing": list(self.missing),
            "unused": name_groups(self.unused), "resized": list(self.resized),
            "notes": list(self.notes),
        }


def block_indices(state: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    """Sorted block numbers i of names ``{prefix}i.…``; they must run 0..n-1 without gaps."""
    pat = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    found = sorted({int(m.group(1)) for n in state if (m := pat.match(n))})
    if found != list(range(len(found))):
        raise WeightsError(
            f"The checkpoint's blocks under '{prefix}' are numbered {found}, not 0..{len(found) - 1}: "
            f"some blocks are missing from the file."
        )
    return found


def _take(state: Mapping[str, torch.Tensor], out: Mapped, target: str, source: str,
          absent: list[str]) -> None:
    if source in state:
        out[target] = Source((source,), state[source])
    else:
        absent.append(source)


def cavmae_to_vit(state: Mapping[str, torch.Tensor], branch: str, depth: int) -> tuple[Mapped, list[str]]:
    """Map CAV-MAE's ``branch`` ('a' audio, 'v' visual) onto a timm ViT without class token.

    The ViT's blocks 0..S-1 are CAV-MAE's ``blocks_{branch}`` (with ``norm1``/``norm2``) and
    S..S+U-1 its shared ``blocks_u`` with the branch's own norms (``norm1_{branch}``), as
    ``forward_feat`` runs them. ``modality_{branch}`` is a constant added to every token next
    to the position embedding, so it is folded into ``pos_embed``: the forward pass is the
    same, only the split of that sum into two trained tensors is lost. Returns the table and
    the CAV-MAE names the branch needs but the file lacks.
    """
    if branch not in CAVMAE_BRANCHES:
        raise ValueError(f"CAV-MAE branch must be one of {list(CAVMAE_BRANCHES)}, got {branch!r}")
    specific = block_indices(state, f"blocks_{branch}.")
    shared = block_indices(state, "blocks_u.")
    if not specific and not shared:
        raise _no_blocks(state, "CAV-MAE", f"blocks_{branch}.N.* / blocks_u.N.*")
    if len(specific) + len(shared) != depth:
        raise WeightsError(
            f"The CAV-MAE checkpoint's {CAVMAE_BRANCHES[branch]} branch has {len(specific)} "
            f"modality-specific + {len(shared)} shared blocks = {len(specific) + len(shared)}, "
            f"but this model has depth={depth}. Set depth={len(specific) + len(shared)} "
            f"(CAV-MAE base: 11 + 1 = 12)."
        )
    out: Mapped = {}
    absent: list[str] = []
    for ours, theirs in (("patch_embed.proj.weight", f"patch_embed_{branch}.proj.weight"),
                         ("patch_embed.proj.bias", f"patch_embed_{branch}.proj.bias"),
                         ("norm.weight", f"norm_{branch}.weight"),
                         ("norm.bias", f"norm_{branch}.bias")):
        _take(state, out, ours, theirs, absent)
    pos, mod = f"pos_embed_{branch}", f"modality_{branch}"
    if pos in state and mod in state:
        out["pos_embed"] = Source((pos, mod), state[pos] + state[mod], f"{pos} + {mod}")
    else:
        absent += [n for n in (pos, mod) if n not in state]
    for i in specific:
        for piece in VIT_BLOCK_PARAMS:
            for leaf in ("weight", "bias"):
                _take(state, out, f"blocks.{i}.{piece}.{leaf}", f"blocks_{branch}.{i}.{piece}.{leaf}", absent)
    for j in shared:
        for piece in VIT_BLOCK_PARAMS:
            theirs = f"{piece}_{branch}" if piece in ("norm1", "norm2") else piece
            for leaf in ("weight", "bias"):
                _take(state, out, f"blocks.{len(specific) + j}.{piece}.{leaf}", f"blocks_u.{j}.{theirs}.{leaf}", absent)
    return out, absent


def _no_blocks(state: Mapping[str, torch.Tensor], family: str, pattern: str) -> WeightsError:
    return WeightsError(
        f"The weights file holds no {family} transformer blocks ({pattern}), so it is not in "
        f"{family} naming. Its names start with: "
        f"{', '.join(name_groups(state)[:10])}. Check weights_format (or leave it at 'auto')."
    )


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(len, dim) fixed sine-cosine table, sines in the first half and cosines in the second.

    This is the MAE / M3AE layout (frequencies 1/10000^(k/(dim/2))), not the interleaved one
    of 'Attention is all you need': pretrained weights only fit the layout they saw.
    """
    if dim % 2:
        raise ConfigError(f"sine-cosine positions need an even width, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(rows: int, cols: int, dim: int) -> torch.Tensor:
    """(rows*cols, dim) M3AE/MAE 2-D table in row-major token order.

    The first half of the width encodes the token's column, the second half its row (MAE's
    meshgrid puts the width coordinate first). M3AE only builds square grids; a rectangular
    grid is the same rule applied to each axis.
    """
    if dim % 4:
        raise ConfigError(f"2-D sine-cosine positions need a width divisible by 4, got {dim}")
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([sincos_1d(c.reshape(-1), dim // 2), sincos_1d(r.reshape(-1), dim // 2)], dim=1)


def _m3ae_blocks(state: Mapping[str, torch.Tensor], depth: int, out: Mapped, absent: list[str]) -> None:
    found = block_indices(state, "encoder.blocks.")
    if not found:
        raise _no_blocks(state, "M3AE", "encoder.blocks.N.*")
    if len(found) != depth:
        raise WeightsError(
            f"The M3AE checkpoint has {len(found)} encoder blocks, but this model has "
            f"depth={depth}. Set depth={len(found)} (M3AE base: 12)."
        )
    for i in found:
        for ours, theirs in zip(VIT_BLOCK_PARAMS, M3AE_BLOCK_PARAMS, strict=True):
            for leaf in ("weight", "bias"):
                _take(state, out, f"blocks.{i}.{ours}.{leaf}", f"encoder.blocks.{i}.{theirs}.{leaf}", absent)
    _take(state, out, "norm.weight", "encoder.layer_norm.weight", absent)
    _take(state, out, "norm.bias", "encoder.layer_norm.bias", absent)


def m3ae_image_to_vit(
    state: Mapping[str, torch.Tensor], depth: int, grid: tuple[int, int], in_chans: int, patch_size: int
) -> tuple[Mapped, list[str]]:
    """Map M3AE's image branch onto a timm ViT with a class token kept out of the positions.

    The ViT must be built with ``no_embed_class=True``: M3AE's class token gets neither a
    position nor a type embedding. ``pos_embed`` = the fixed 2-D sine-cosine table at this
    model's grid (M3AE computes it from the number of patches, so no resampling is ever
    needed) + ``encoder_image_type_embedding``. The patch Linear over (channel, row, column)
    flattened patches is exactly a stride-``patch`` convolution with its weight reshaped.
    """
    out: Mapped = {}
    absent: list[str] = []
    _m3ae_blocks(state, depth, out, absent)
    _take(state, out, "cls_token", "cls_token", absent)
    w, b = "image_embedding.weight", "image_embedding.bias"
    if w in state:
        weight = state[w]
        want = in_chans * patch_size * patch_size
        if weight.dim() != 2 or weight.shape[1] != want:
            raise WeightsError(
                f"The M3AE checkpoint's '{w}' has shape {tuple(weight.shape)}, but this ViT's "
                f"patches hold {in_chans} x {patch_size} x {patch_size} = {want} values, so it "
                f"needs ({weight.shape[0] if weight.dim() else '?'}, {want}). M3AE uses 16x16 "
                f"RGB patches: set patch_size=16 on a 3-channel image."
            )
        conv = weight.reshape(weight.shape[0], in_chans, patch_size, patch_size)
        out["patch_embed.proj.weight"] = Source((w,), conv, f"{w} reshaped (D, C, p, p)")
    else:
        absent.append(w)
    _take(state, out, "patch_embed.proj.bias", b, absent)
    typ = "encoder_image_type_embedding"
    width = _m3ae_width(state)
    if width is not None:
        table = sincos_2d(grid[0], grid[1], width).unsqueeze(0)
        if typ in state:
            out["pos_embed"] = Source((typ,), table + state[typ], f"2-D sin-cos {grid} + {typ}")
        else:
            absent.append(typ)
    return out, absent


def m3ae_text_to_encoder(state: Mapping[str, torch.Tensor], depth: int) -> tuple[Mapped, list[str]]:
    """Map M3AE's text branch onto :class:`~mmbalance.backbones.sequence.M3AEText` names."""
    out: Mapped = {}
    absent: list[str] = []
    _m3ae_blocks(state, depth, out, absent)
    _take(state, out, "cls_token", "cls_token", absent)
    _take(state, out, "embed.weight", "text_embedding.weight", absent)
    _take(state, out, "type_embed", "encoder_text_type_embedding", absent)
    return out, absent


def _m3ae_width(state: Mapping[str, torch.Tensor]) -> int | None:
    for name in ("cls_token", "encoder.layer_norm.weight", "image_embedding.bias"):
        if name in state:
            return int(state[name].shape[-1])
    return None


def identity_map(state: Mapping[str, torch.Tensor]) -> Mapped:
    """A checkpoint already in the model's own naming."""
    return {k: Source((k,), v) for k, v in state.items()}


# ------------------------------------------------------------------------------ applying


def apply_mapped_state(
    module: nn.Module,
    mapped: Mapped,
    state: Mapping[str, torch.Tensor],
    *,
    path: str | Path,
    what: str,
    fmt: str,
    branch: str | None = None,
    absent: Iterable[str] = (),
    allow_partial: bool = False,
    resized: Iterable[str] = (),
) -> LoadReport:
    """Copy ``mapped`` into ``module``: shapes strictly equal, nothing missing unless allowed.

    ``absent`` lists checkpoint names the mapping needed but the file lacks; those are the
    cause of the model's missing parameters and are named in the error. Casting to the
    model's dtype is the only conversion done here.
    """
    own = module.state_dict()
    strays = sorted(set(mapped) - set(own))
    if strays:
        raise WeightsError(
            f"The {fmt} checkpoint '{path}' has tensors with no place in {what}: "
            f"{_pairs(strays, mapped)}. The model was built for another layout; check "
            f"weights_format and the backbone options."
        )
    wrong = [
        f"'{'+'.join(mapped[k].names)}' {tuple(mapped[k].tensor.shape)} vs the model's '{k}' "
        f"{tuple(own[k].shape)}"
        for k in own if k in mapped and tuple(mapped[k].tensor.shape) != tuple(own[k].shape)
    ]
    if wrong:
        raise WeightsError(
            f"The {fmt} checkpoint '{path}' does not fit {what}: {len(wrong)} tensors have "
            f"another shape, e.g. {'; '.join(wrong[:3])}. The checkpoint is for another size: "
            f"set embed_dim / depth / num_heads / mlp_ratio / patch_size to its values (or "
            f"make the input match its grid)."
        )
    missing = [k for k in own if k not in mapped]
    absent = list(dict.fromkeys(absent))
    if missing and not allow_partial:
        cause = f" The file lacks {absent[:6]}." if absent else ""
        raise WeightsError(
            f"The {fmt} checkpoint '{path}' leaves {len(missing)} parameters of {what} without "
            f"a value: {missing[:6]}.{cause} They would silently stay random. Use a complete "
            f"checkpoint, or set weights_partial=true to load what is there and keep the rest "
            f"at random init."
        )
    new = dict(own)
    for k, src in mapped.items():
        new[k] = src.tensor.detach().to(dtype=own[k].dtype)
    module.load_state_dict(new, strict=True)
    used = {n for src in mapped.values() for n in src.names}
    report = LoadReport(
        path=str(path), format=fmt, branch=branch, loaded=sorted(mapped), missing=missing,
        unused=sorted(n for n in state if n not in used), resized=list(resized),
    )
    if missing:
        warnings.warn(
            f"{what}: weights_partial=true left {len(missing)} parameters at random init "
            f"({', '.join(missing[:5])}); the file lacks {absent[:5]}.",
            PartialWeightsWarning,
            stacklevel=3,
        )
    return report


def _pairs(names: list[str], mapped: Mapped) -> str:
    shown = [f"'{'+'.join(mapped[n].names)}' -> '{n}'" for n in names[:4]]
    return ", ".join(shown) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def grid_of(tokens: int, rows: int | None = None) -> tuple[int, int] | None:
    """The (rows, cols) grid of ``tokens`` patches: with ``rows`` given, or square; else None."""
    if rows:
        return (rows, tokens // rows) if tokens % rows == 0 else None
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens else None


# ------------------------------------------------------------------ plain state dict files


def load_state_dict_file(
    module: nn.Module,
    path: str | Path,
    what: str,
    rename: Callable[[str], str | None] | None = None,
    strict: bool = True,
) -> tuple[list[str], list[str]]:
    """Load a ``torch.save``'d state dict (optionally nested under 'state_dict'/'model').

    ``rename`` maps checkpoint keys to module keys (None drops a key). Returns the missing and
    unexpected keys when ``strict`` is False.
    """
    state = read_checkpoint(path, what)
    if rename is not None:
        state = {nk: v for k, v in state.items() if (nk := rename(k)) is not None}
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches are raised even with strict=False
        raise WeightsError(f"Pretrained weights for {what} at '{path}' do not fit the model: {exc}") from exc
    if strict and (result.missing_keys or result.unexpected_keys):
        raise WeightsError(
            f"Pretrained weights for {what} at '{path}' do not match the model: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}. Check that "
            f"the file is for this backbone."
        )
    return list(result.missing_keys), list(result.unexpected_keys)
