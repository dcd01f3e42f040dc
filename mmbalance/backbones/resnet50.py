"""ResNet-50 image encoder (Sarcasm), timm implementation.

docs/datasets/sarcasm.md: an ImageNet ResNet-50 whose 1000-way fc is replaced by
``Linear(2048, 768)``; the 768 matches the BERT [CLS] width so the two modalities share d
without another projection. ``out_dim`` changes the width of that linear layer (it is always
present: it *is* the replaced fc). The trunk ends with timm's global average pool (2048-d).

Weights (``weights=PATH``) are a local ``torch.save``'d state dict of a timm or torchvision
``resnet50`` (both use the same parameter names: conv1, bn1, layer1..4, fc); the 1000-way
``fc`` is dropped. A state dict saved from this module (``trunk.*`` and ``proj.*`` keys) loads
whole. Nothing is downloaded: the model is built with ``pretrained=False`` and then loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mmbalance.backbones.staged import StagedView, sequence_view
from mmbalance.backbones.weights import require_weights_path
from mmbalance.data import ModalitySpec
from mmbalance.errors import ConfigError
from mmbalance.registry import register_backbone

TRUNK_DIM = 2048
DEFAULT_DIM = 768


class ResNet50Encoder(nn.Module):
    """timm ResNet-50 trunk (global-average-pooled 2048-d) followed by the replaced fc."""

    def __init__(self, out_dim: int = DEFAULT_DIM, in_chans: int = 3) -> None:
        import timm

        super().__init__()
        self.trunk = timm.create_model("resnet50", pretrained=False, num_classes=0, in_chans=in_chans)
        self.proj = nn.Linear(TRUNK_DIM, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.trunk(x))

    def staged(self) -> StagedView:
        """Staged protocol (mmbalance/backbones/staged.py): stem conv1-bn1-act1-maxpool,
        stages layer1-4 (256, 512, 1024, 2048 channels), pool = timm's own head (global pool,
        its dropout when set, its identity fc) and the replaced fc."""
        t = self.trunk
        if getattr(t, "grad_checkpointing", False):
            raise ValueError("the staged view of resnet50 does not run timm's gradient checkpointing")

        def pool(h: torch.Tensor, batch: int) -> torch.Tensor:
            return self.proj(t.forward_head(h))

        stages = [[t.layer1], [t.layer2], [t.layer3], [t.layer4]]
        return sequence_view([t.conv1, t.bn1, t.act1, t.maxpool], stages, (256, 512, 1024, 2048), pool)


def load_resnet50_weights(net: ResNet50Encoder, path: str | Path) -> None:
    """Load a timm/torchvision ResNet-50 state dict (fc dropped) or one of this module."""
    p = require_weights_path(path, "the resnet50 backbone")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"Could not read resnet50 weights from '{p}': {exc}. Expected a timm or "
            f"torchvision resnet50 state dict saved with torch.save."
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    whole = any(k.startswith("trunk.") for k in state)
    target: nn.Module = net if whole else net.trunk
    if not whole:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        result = target.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch (e.g. another depth or width)
        raise ConfigError(f"The resnet50 weights at '{p}' do not fit ResNet-50: {exc}") from exc
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"The resnet50 weights at '{p}' do not match ResNet-50: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}. Expected a timm/torchvision resnet50 "
            f"state dict."
        )


@register_backbone("resnet50", "timm ResNet-50 (ImageNet weights from a local file), fc -> Linear(2048, 768)")
def build_resnet50(
    spec: ModalitySpec,
    out_dim: int | None,
    weights: str | None = None,
) -> nn.Module:
    """Build the Sarcasm image encoder for (C, H, W) images."""
    if spec.kind != "image":
        raise ConfigError(
            f"The resnet50 backbone takes images (C, H, W), but this modality is "
            f"'{spec.kind}'. Pick another backbone for it."
        )
    net = ResNet50Encoder(out_dim or DEFAULT_DIM, in_chans=spec.shape[0])
    if weights:
        load_resnet50_weights(net, weights)
    return net
