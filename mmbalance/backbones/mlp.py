"""MLP encoder for feature vectors (mfeat views, pixels, pre-extracted features)."""

from __future__ import annotations

import math

from torch import nn

from mmbalance.backbones.weights import load_state_dict_file
from mmbalance.data import ModalitySpec
from mmbalance.registry import register_backbone


@register_backbone("mlp", "MLP for feature vectors: Linear-ReLU blocks to the common width")
def build_mlp(
    spec: ModalitySpec,
    out_dim: int | None,
    weights: str | None = None,
    hidden: int = 256,
    layers: int = 2,
    dropout: float = 0.0,
) -> nn.Module:
    in_dim = math.prod(spec.shape)
    width = out_dim or hidden
    dims = [in_dim] + [hidden] * (layers - 1) + [width]
    mods: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        mods.append(nn.Linear(a, b))
        mods.append(nn.ReLU(inplace=True))
        if dropout and i < len(dims) - 2:
            mods.append(nn.Dropout(dropout))
    net = nn.Sequential(*mods)
    net.out_dim = width
    if weights:
        load_state_dict_file(net, weights, "the mlp backbone")
    return net
