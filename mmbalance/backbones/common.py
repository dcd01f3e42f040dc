"""Small pieces shared by backbones."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from mmbalance.backbones.staged import StagedView, staged


class Projected(nn.Module):
    """A feature extractor followed, when needed, by a linear map to the common width."""

    def __init__(self, body: nn.Module, natural_dim: int, out_dim: int | None) -> None:
        super().__init__()
        self.body = body
        self.proj = nn.Linear(natural_dim, out_dim) if out_dim and out_dim != natural_dim else None
        self.out_dim = out_dim or natural_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.body(x)
        return self.proj(z) if self.proj is not None else z

    def staged(self) -> StagedView | None:
        """The body's staged view with this projection added to its pool (None if it has none)."""
        view = staged(self.body)
        if view is None or self.proj is None:
            return view
        body_pool, proj = view.pool, self.proj
        return replace(view, pool=lambda h, batch: proj(body_pool(h, batch)))

    def __getattr__(self, name: str):
        if name == "blank_input" and "body" in self._modules and hasattr(self._modules["body"], "blank_input"):
            return self._modules["body"].blank_input  # absent-input rule of the wrapped backbone
        return super().__getattr__(name)
