"""Unimodal training of one modality: its encoder and a linear head, CE only (the documentation's unimodal page).

Run once per modality with the multimodal runs' recipe, to know how good each encoder can get
alone; the other modalities are not even loaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mmbalance.config import Option
from mmbalance.errors import ConfigError, did_you_mean
from mmbalance.method import Method, Prediction
from mmbalance.registry import register_method


@register_method("unimodal", "one modality alone (set modality=NAME): encoder + linear head, CE")
class Unimodal(Method):
    name = "unimodal"
    min_modalities = 1
    options = {"modality": Option(None, "the modality to train (default: the dataset's first)", type=str)}

    def check_modalities(self, available: Sequence[str]) -> list[str]:
        wanted = self.cfg.get("modality") or available[0]
        if wanted not in available:
            raise ConfigError(
                f"Method 'unimodal' was asked for modality '{wanted}', which this run does not "
                f"have.{did_you_mean(wanted, available)} Available: {', '.join(available)}; "
                f"set it with --set modality=NAME."
            )
        self.modality = wanted
        return [wanted]

    def build_fusion(self, dims, num_classes):
        return None

    def trains_unimodal_heads(self) -> bool:
        return True

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        assert self.model is not None
        feats = self.model.encode(batch)
        logits = self.model.uni_heads[self.modality](feats[self.modality])
        return F.cross_entropy(logits, batch["label"])

    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> Prediction:
        assert self.model is not None
        per = self.model.unimodal_logits(self.model.encode(batch))
        return Prediction(per[self.modality], per)

    def label(self) -> str:
        return f"Unimodal ({self.modality})" if hasattr(self, "modality") else "Unimodal"
