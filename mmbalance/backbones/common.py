"""Small pieces shared by backbones."""

from __future__ import annotations

import torch
from torch import nn


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

    def __getattr__(self, name: str):
        if name == "blank_input" and "body" in self._modules and hasattr(self._modules["body"], "blank_input"):
            return self._modules["body"].blank_input  # absent-input rule of the wrapped backbone
        return super().__getattr__(name)
