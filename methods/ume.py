"""UME: the uni-modal ensemble, one model per modality trained alone (Du et al., ICML 2023).

Full page: ``the documentation's ume page``. Paper: "On Uni-Modal Feature Learning in Supervised
Multi-Modal Learning" (ICML 2023, arXiv 2305.01233). No official code was found, and
BalanceBenchmark (GeWu-Lab/BalanceBenchmark), the only code of its companion UMT, has no UME.

Idea: where the paired (cross-modal) features matter little, joint training only gets in the way
of each modality's own features; training each modality alone and averaging the predictions
does better.

Rule. Modality m has its encoder phi_m and a linear head h_m, z_m = h_m(phi_m(x_m)); there is no
fused head. Training minimises sum_m CE(z_m, y): each term reaches only its own encoder and head,
so the M models train independently. Each modality has its own optimizer of the dataset recipe
(and its own schedule), and the trainer's gradient clipping (``grad_clip``) then acts per
modality, as in M separate runs (one global clip would couple them). Prediction::

    logits: o = (1/M) sum_m z_m                       (default)
    probs:  o = log((1/M) sum_m softmax(z_m))          (``ume_combine=probs``)

Per-modality numbers are each model's own head.

Differences from M truly separate runs, stated: the batches are shared (same order, same pairs:
harmless), and one epoch is selected for all models together (the run's best validation
epoch of the ensemble; separate runs would each pick their own). With the same seed each model
starts from the weights the multimodal model of this run starts from.

Open questions, settled: the combination rule is the mean of logits (the paper's exact rule could
not be read; the mean of probabilities is ``ume_combine=probs``); no weights tuned on
validation (not known to be in the paper); the guiding rule that chooses between UME and UMT is a
comparison of their leaderboard rows, not automated.

Refuses: one modality. Cost: each step runs M encoder forwards and backwards and M optimizer
steps, the work of M unimodal runs, about 1.0x joint training.

Diagnostics per step: ``ume_ce_<m>`` (each model's CE) and ``ume_ce`` (their sum; key).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from mmbalance.config import Option
from mmbalance.method import Method, Prediction
from mmbalance.registry import register_method

NAME = "ume"

OPTIONS: dict[str, Option] = {
    "ume_combine": Option("logits", "how the models' outputs are combined: mean of logits, or mean of probabilities",
                          choices=("logits", "probs")),
}


# ---- the mathematics (pure functions) ------------------------------------------------------
def ensemble(logits: Mapping[str, torch.Tensor], combine: str = "logits") -> torch.Tensor:
    """The ensemble's output: the mean of the models' logits, or the log of the mean of their
    class probabilities (a valid logit vector for argmax and cross-entropy)."""
    stacked = torch.stack([z.float() for z in logits.values()])
    if combine == "logits":
        return stacked.mean(0)
    if combine == "probs":
        return torch.logsumexp(torch.log_softmax(stacked, dim=-1), dim=0) - torch.log(torch.tensor(float(len(logits))))
    raise ValueError(f"unknown UME combination {combine!r}")


def ume_losses(logits: Mapping[str, torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each model's CE, in fp32."""
    return {m: F.cross_entropy(z.float(), y) for m, z in logits.items()}


# ---- the plugin ----------------------------------------------------------------------------
@register_method(NAME, "UME: an ensemble of unimodal models, each trained alone")
class UME(Method):
    name = NAME
    description = "UME: an ensemble of unimodal models, each trained alone"
    options = OPTIONS
    min_modalities = 2
    manual_optimization = True
    key_diagnostic = "ume_ce"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.combine = str(self.cfg.get("ume_combine", OPTIONS["ume_combine"].default))

    def build_fusion(self, dims: Mapping[str, int], num_classes: int) -> None:
        return None

    def trains_unimodal_heads(self) -> bool:
        return True

    def configure_optimizers(self) -> dict[str, Any]:
        """One recipe optimizer (and schedule) per modality: the first is "main"."""
        assert self.trainer is not None and self.model is not None
        out = {}
        for i, m in enumerate(self.model.modalities):
            params = self.model.encoder_params(m) + self.model.uni_head_params(m)
            out["main" if i == 0 else f"ume.{m}"] = self.trainer.default_optimizers(params)
        return out

    def _optimizer_of(self, i: int, m: str) -> torch.optim.Optimizer:
        return self.optimizers["main" if i == 0 else f"ume.{m}"]

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        assert self.model is not None
        model = self.model
        with self.autocast():
            logits = model.unimodal_logits(model.encode(batch))
        losses = ume_losses(logits, batch["label"])
        total = torch.stack(list(losses.values())).sum()
        self.manual_backward(total)  # each term reaches only its own model
        for i, m in enumerate(model.modalities):
            self.optimizer_step(self._optimizer_of(i, m))  # clipped per modality
        if self.trainer is not None:
            self.log(ume_ce=total.detach(), **{f"ume_ce_{m}": v.detach() for m, v in losses.items()})
        return total.detach()

    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> Prediction:
        assert self.model is not None
        per = self.model.unimodal_logits(self.model.encode(batch))
        return Prediction(ensemble(per, self.combine), per)

    def label(self) -> str:
        return "UME" if self.combine == "logits" else "UME (mean of probabilities)"

    def record_info(self) -> dict[str, Any]:
        rule = "mean of logits" if self.combine == "logits" else "log of the mean of probabilities"
        return {"ensemble": rule, "training": "sum_m CE(z_m), one optimizer and clip per modality",
                "selection": "one epoch for all models (the ensemble's best validation epoch)"}
