"""The staged-encoder protocol: an encoder seen as stem, stages and pool, so a method can act
between its stages (Greedy's MMTM layers, the documentation's greedy page) without changing the encoder.

A backbone that can be split defines ``staged() -> StagedView``; :func:`staged` returns that
view, or None for an encoder that cannot be split (an MLP, a transformer: methods then fall
back to the pooled features). The view is a second way of running the *same* modules in the
*same* order, so for every input ``x`` of a batch of ``B`` samples::

    h = view.stem(x)
    for stage in view.stages:
        h = stage(h)
    view.pool(h, B) == encoder(x)        # bit for bit (tests/test_staged.py)

Maps keep the channel axis at 1. A backbone that folds the frames of a clip into the batch
(ResNet-18 on video) keeps its stage maps folded, ``(B * T, C, h, w)`` with the rows of one
clip together (row ``b * T + t``); :func:`per_sample` unfolds any stage map with the real
batch size ``B`` (never a constant), so a per-sample statistic or gate covers all frames of
its clip. ``pool`` takes ``B`` for the same reason and includes everything the encoder does
after its last stage: the backbone's pooling, its own head and any projection to the run's
``embed_dim`` that wraps it (:class:`mmbalance.backbones.common.Projected`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class StagedView:
    """``stem``: input -> first map; ``stages``: ordered map -> map callables (modules or
    compositions of them); ``stage_channels``: channels of each stage's output;
    ``pool(h, B)``: last map -> the encoder's (B, out_dim) output."""

    stem: Callable[[torch.Tensor], torch.Tensor]
    stages: tuple[Callable[[torch.Tensor], torch.Tensor], ...]
    stage_channels: tuple[int, ...]
    pool: Callable[[torch.Tensor, int], torch.Tensor]

    def __post_init__(self) -> None:
        if len(self.stages) != len(self.stage_channels):
            raise ValueError(f"{len(self.stages)} stages but {len(self.stage_channels)} channel counts")

    def run(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """The encoder's forward through the view (what the tests compare with ``forward``)."""
        h = self.stem(x)
        for stage in self.stages:
            h = stage(h)
        return self.pool(h, batch)


def staged(encoder: nn.Module) -> StagedView | None:
    """The staged view of ``encoder``, or None when it does not implement the protocol."""
    fn = getattr(encoder, "staged", None)
    return fn() if callable(fn) else None


def per_sample(h: torch.Tensor, batch: int) -> torch.Tensor:
    """``(B * T, C, ...)`` -> ``(B, T, C, ...)`` (T = 1 for unfolded maps): a view that groups
    the folded frames of each sample."""
    if h.shape[0] % batch:
        raise ValueError(f"a map of {h.shape[0]} rows does not fold {batch} samples")
    return h.reshape(batch, h.shape[0] // batch, *h.shape[1:])


def chain(*modules: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Run callables in order (a stage made of several modules, without a new Module that
    would add names to the state dict)."""

    def run(h: torch.Tensor) -> torch.Tensor:
        for mod in modules:
            h = mod(h)
        return h

    return run


def sequence_view(
    stem: Sequence[Any], stages: Sequence[Sequence[Any]], channels: Sequence[int],
    pool: Callable[[torch.Tensor, int], torch.Tensor],
) -> StagedView:
    """A view from lists of modules: the stem's, and each stage's."""
    return StagedView(chain(*stem), tuple(chain(*s) for s in stages), tuple(channels), pool)
