"""Fused heads of the naive late fusions (the documentation's concat page, sum.md, weight.md).

Each head maps the per-modality features ``{m: (B, d_m)}`` to fused logits and can split
them into per-modality parts (``parts``), the "head-part" logits that methods trained with a
single joint loss report as per-modality accuracy and that OGM-GE-style methods need.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

Feats = Mapping[str, torch.Tensor]


class ConcatHead(nn.Module):
    """o = W [z_1; ...; z_M] + b; part m = W[:, block m] z_m + b / M."""

    def __init__(self, dims: Mapping[str, int], num_classes: int) -> None:
        super().__init__()
        self.order = list(dims)
        self.sizes = [dims[m] for m in self.order]
        self.fc = nn.Linear(sum(self.sizes), num_classes)

    def forward(self, feats: Feats) -> torch.Tensor:
        return self.fc(torch.cat([feats[m] for m in self.order], dim=1))

    def parts(self, feats: Feats) -> dict[str, torch.Tensor]:
        blocks = torch.split(self.fc.weight, self.sizes, dim=1)
        share = self.fc.bias / len(self.order)
        return {m: feats[m] @ w.t() + share for m, w in zip(self.order, blocks, strict=True)}


class SumHead(nn.Module):
    """o = sum_m (W_m z_m + b_m); part m = W_m z_m + b_m."""

    def __init__(self, dims: Mapping[str, int], num_classes: int) -> None:
        super().__init__()
        self.fcs = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})

    def forward(self, feats: Feats) -> torch.Tensor:
        return torch.stack(list(self.parts(feats).values())).sum(0)

    def parts(self, feats: Feats) -> dict[str, torch.Tensor]:
        return {m: fc(feats[m]) for m, fc in self.fcs.items()}


def coordinate_weights(feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The IPRM code's parameter-free 'Weight' fusion weights.

    s_m = softmax of z_m over its d coordinates; w_m = s_m / sum_k s_k coordinate-wise, so the
    weights of all modalities sum to 1 at every coordinate of every sample.
    """
    soft = [torch.softmax(z, dim=1) for z in feats]
    total = torch.stack(soft).sum(0)
    return [s / total for s in soft]


class WeightHead(nn.Module):
    """Weighted sum of features into one shared linear head (needs equal d).

    ``mode="softmax_coord"``: the IPRM code's per-coordinate weights (default).
    ``mode="cmml_attention"``: CMML's learned scalar attention, a shared MLP d->64->32->1 with a
    softmax over modalities (no extra CMML losses).
    """

    def __init__(self, dims: Mapping[str, int], num_classes: int, mode: str = "softmax_coord") -> None:
        super().__init__()
        widths = set(dims.values())
        if len(widths) != 1:
            raise ValueError(f"Weight fusion needs equal feature widths, got {dict(dims)}")
        d = widths.pop()
        self.order = list(dims)
        self.mode = mode
        self.fc = nn.Linear(d, num_classes)
        if mode == "cmml_attention":
            self.attn = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))
        elif mode != "softmax_coord":
            raise ValueError(f"unknown weight mode {mode}")

    def fused_features(self, feats: Feats) -> torch.Tensor:
        zs = [feats[m] for m in self.order]
        if self.mode == "softmax_coord":
            ws = coordinate_weights(zs)
            return sum(w * z for w, z in zip(ws, zs, strict=True))
        scores = torch.cat([self.attn(z) for z in zs], dim=1)  # (B, M)
        alpha = torch.softmax(scores, dim=1)
        return sum(alpha[:, i : i + 1] * z for i, z in enumerate(zs))

    def forward(self, feats: Feats) -> torch.Tensor:
        return self.fc(self.fused_features(feats))

    def parts(self, feats: Feats) -> dict[str, torch.Tensor]:
        return {m: self.fc(feats[m]) for m in self.order}


def build_head(kind: str, dims: Mapping[str, int], num_classes: int, **kwargs) -> nn.Module:
    if kind == "concat":
        return ConcatHead(dims, num_classes)
    if kind == "sum":
        return SumHead(dims, num_classes)
    if kind == "weight":
        return WeightHead(dims, num_classes, **kwargs)
    raise ValueError(f"unknown fusion head {kind}")
