"""ResNet-18 trained from scratch, as in the CREMA-D / Kinetics-Sounds setup of OGM-GE and IPRM.

Audio: a 1-channel first convolution on the (1, F, T) log-spectrogram, 2-D average pooling of
the layer4 map. Video (C, T, H, W): frames are folded into the batch, run through the 2-D
network, and the layer4 maps are average-pooled over (T, H, W) together, the 3-D pooling of
the official model. Images (C, H, W) are treated as one-frame videos. No classifier inside.
"""

from __future__ import annotations

import torch
from torch import nn

from mmbalance.backbones.common import Projected
from mmbalance.backbones.staged import StagedView, sequence_view
from mmbalance.backbones.weights import load_state_dict_file
from mmbalance.data import ModalitySpec
from mmbalance.registry import register_backbone


def official_init(net: nn.Module) -> None:
    """Kaiming-normal convolutions, BN weight ~ N(1, 0.02), BN bias 0 (IPRM's backbone init)."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, mean=1.0, std=0.02)
            nn.init.constant_(m.bias, 0.0)


class ResNet18Features(nn.Module):
    """torchvision ResNet-18 trunk returning pooled 512-d features."""

    def __init__(self, in_channels: int, video: bool) -> None:
        super().__init__()
        from torchvision.models import resnet18  # here: importing torchvision costs every run ~1 s

        net = resnet18(weights=None)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        net.fc = nn.Identity()
        net.avgpool = nn.Identity()
        self.trunk = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
        )
        self.video = video
        official_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.video:
            return torch.flatten(nn.functional.adaptive_avg_pool2d(self.trunk(x), 1), 1)
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        fmap = self.trunk(frames)  # (B*T, 512, h', w')
        fmap = fmap.reshape(b, t, *fmap.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, 512, T, h', w')
        return torch.flatten(nn.functional.adaptive_avg_pool3d(fmap, 1), 1)

    def staged(self) -> StagedView:
        """Staged protocol (mmbalance/backbones/staged.py): stem conv1-bn1-relu-maxpool (with
        the frames of a clip folded into the batch), stages layer1-4 (64, 128, 256, 512
        channels), pool as in ``forward`` (video: over the clip's frames and space)."""
        t = self.trunk

        def fold(x: torch.Tensor) -> torch.Tensor:
            b, c, frames, h, w = x.shape
            return x.permute(0, 2, 1, 3, 4).reshape(b * frames, c, h, w)

        def pool(fmap: torch.Tensor, batch: int) -> torch.Tensor:
            if not self.video:
                return torch.flatten(nn.functional.adaptive_avg_pool2d(fmap, 1), 1)
            fmap = fmap.reshape(batch, fmap.shape[0] // batch, *fmap.shape[1:]).permute(0, 2, 1, 3, 4)
            return torch.flatten(nn.functional.adaptive_avg_pool3d(fmap, 1), 1)

        stem = ([fold] if self.video else []) + [t[0], t[1], t[2], t[3]]
        return sequence_view(stem, [[t[4]], [t[5]], [t[6]], [t[7]]], (64, 128, 256, 512), pool)


@register_backbone("resnet18", "ResNet-18 from scratch: 1-channel for spectrograms, per-frame 3-D pooled for video")
def build_resnet18(
    spec: ModalitySpec, out_dim: int | None, weights: str | None = None
) -> nn.Module:
    if spec.kind == "video":
        body = ResNet18Features(spec.shape[0], video=True)
    elif spec.kind in ("spectrogram", "image"):
        body = ResNet18Features(spec.shape[0], video=False)
    else:
        raise ValueError(f"resnet18 takes spectrograms, images or video, not {spec.kind}")
    if weights:
        load_state_dict_file(body, weights, "the resnet18 backbone")
    return Projected(body, 512, out_dim)
