"""A tiny vector encoder that implements the staged protocol (mmbalance/backbones/staged.py),
so staged-path tests run on the synthetic data (whose modalities are vectors)."""

from __future__ import annotations

import torch
from torch import nn

from mmbalance.backbones.staged import StagedView, sequence_view


class StagedMLP(nn.Module):
    """Linear-ReLU stages of widths 12, 10, 8, 6 on (B, C) vectors, then a linear head."""

    widths = (12, 10, 8, 6)

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        dims = (in_dim, *self.widths)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.head = nn.Linear(dims[-1], out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    def staged(self) -> StagedView:
        return sequence_view([lambda x: x.flatten(1)], [[b] for b in self.blocks], self.widths,
                             lambda h, batch: self.head(h))
