"""CGGM: classifier-guided gradient modulation (Guo, Jin, Chen, Zhao, NeurIPS 2024).

Docs page: ``the documentation's cggm page``. Official code: zrguo/CGGM at 21e428c, ``src/msatrain.py``
(CMU-MOSI, IEMOCAP; three modalities), ``src/foodtrain.py`` (UPMC-Food101; two),
``models/msamodel.py`` (``ClassifierGuided``), ``src/eval_metrics.py`` (``cal_cos``,
``train_eval_*``).

An auxiliary classifier per modality, c_m = ``cls_m``(e_m.detach()), is trained beside the
model with its own optimizer; it never sends a gradient into the encoders. At step t, with
acc_m the batch accuracy of c_m (before its own update):

    Delta_m = acc_m(t) - acc_m(t-1)        (acc(-1) = 0; carried across epochs)
    D = sum_k Delta_k + 1e-8,   B_m(t) = (D - Delta_m) / D      (sum_m B_m = M - 1)

* **Magnitude**: every gradient of encoder m is multiplied by rho * B_m(t) after the
  backward pass (before clipping, as released): the modality whose classifier improved more
  gets the smaller factor.
* **Direction**: the loss of step t is CE(o, y) + lambda * l_gm with

      l_gm = ( sum_m |B_m(t-1)| - sum_m B_m(t-1) cos(W_cls_m, W_fused_m) ) / M,

  the cosine of the flattened output weights of classifier m and of the fused head's block
  of modality m. It pulls the fused head's weights towards each classifier's weights, more
  for the modality with the larger B. It reaches only the fused head (the classifier weights
  are detached in it; the release zeroes the classifier gradients it creates); it is omitted
  at the run's first step. The B of the previous step is used because the release adds the
  previous step's l_gm to the current loss.

Then the classifiers step (their own optimizer; never clipped, as released) and the model
steps through the trainer (with the run's ``grad_clip``).

Carried over to the suite's datasets (the official code covers only Food-101, MOSI, IEMOCAP and
BraTS; there is no CREMA-D / Kinetics-Sounds setting), our defaults, not the paper's:

* rho = 1.3 and lambda = 0.2 (the values shared by the two classification settings, MOSI and
  IEMOCAP; Food uses lambda 0.05, BraTS rho 1.0 and lambda 0.1);
* the classifier is ``Linear(d_m -> C)`` on the detached pooled feature: the suite's encoders
  emit vectors, so the official 2-layer transformer over a token sequence has nothing to run
  on; its output layer has the fused block's shape, which the cosine needs;
* the fused head is the suite's late-fusion head (``fusion_mode``: concat by default, whose
  block of modality m is W[:, cols of m]; sum: the modality's own linear layer; weight: the
  one shared layer, the official situation where fusion happens in one common space);
* the classifier optimizer is the dataset recipe's optimizer, momentum, weight decay and
  schedule at ``cggm_cls_lr`` x the run's lr (0.5: official 5e-4 against 1e-3 everywhere);
  the model uses the dataset recipe (official: Adam 1e-3 with ReduceLROnPlateau on val loss);
* gradients are clipped at the global norm 0.8, the value of all four official run files
  (``defaults``): without a clip the rule is unstable, since B explodes whenever D ~ 0 (see
  below; on mfeat zer+mor about 5 % of the steps, and the run without a clip diverged to NaN
  in its first epoch); ``--set grad_clip=...`` changes it.

Departures from the official code, each switchable:

* **Direction at the current weights.** The release builds l_gm from the parameters at step
  t-1 and keeps that graph for step t, so the fused head gets the cosine gradient at its
  previous weights. Default here: l_gm recomputed at step t with the current weights and
  B(t-1) (no graph kept across steps). ``cggm_direction=stale`` reproduces the release exactly
  (the gradient is taken at step t-1's weights, stored, and added at step t);
  ``cggm_direction=none`` drops the term (magnitude only, an ablation).
* **All encoder parameters are scaled.** The release scales parameters named
  ``encoders.{i}`` (Food: ``vision_encoder`` / ``text_encoder``), so its Conv1d input
  projections keep their gradient, and its BraTS model matches no name and is never
  modulated. Here every parameter of the encoder group of m is scaled (the suite addresses
  encoders as groups, never by name; an input-projection filter would need a backbone
  declaration the contract does not have, so no option reproduces that detail).
* **B guard** (``cggm_b_max``, off): D is a difference of noisy batch accuracies; when it is
  ~0 the release's B is huge or negative (a negative B reverses an encoder's gradient). The
  option clamps B into [0, b_max]. The diagnostic ``small_D`` counts steps with |D| < 1e-3.
* **Accuracy source** (``cggm_acc_source``): ``train_batch`` (default, the release: each
  training batch's classifier accuracy, per step) or ``val``: each classifier's accuracy on
  the validation split, measured by the epoch's evaluation (``on_validation_end``; never the
  test split); B then changes once per epoch, from epoch-to-epoch improvements, and is the
  balanced (M-1)/M before the first validation. Refused when validation is the test split.
* The release hard-codes three (MOSI/IEMOCAP) or two (Food) cosine terms; here any M >= 2.

Open questions, settled: the released code takes the cosine of head
*weights* (``cal_cos`` is given the parameters), the paper speaks of gradient directions; the
weights are what the code does, and a cosine of gradients used as a coefficient would carry no
gradient at all, so it is not offered. The accuracy is a per-batch training accuracy in the
release (``cal_coeff`` on the classifiers' training outputs, before their step); validation
accuracy is an option, never test. The state (acc(t-1), B(t-1), the stored gradient) is never
reset: it carries across epochs as in the release, and is checkpointed.

Per-modality accuracy comes from the auxiliary classifiers (``per_modality_source="method"``);
the model's unimodal heads are never trained. Prediction is the fused head.

Cost: one plain step, plus M linear classifiers on detached features (forward, backward,
step) and a cosine over a C x d_m matrix per modality: a few percent.

Diagnostics per step: ``B_<m>`` (the magnitude coefficient B_m; the key diagnostic),
``acc_<m>`` (classifier batch accuracy), ``cos_<m>``, ``l_gm``, ``small_D``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.config import Option, Search
from mmbalance.errors import ConfigError
from mmbalance.heads import build_head
from mmbalance.method import Method, Prediction
from mmbalance.registry import register_method

NAME = "cggm"
EPS = 1e-8  # the release's guard on D
SMALL_D = 1e-3

OPTIONS: dict[str, Option] = {
    # search range: official 1.3, BraTS 1.0
    "cggm_rho": Option(1.3, "rho: encoder m's gradient is scaled by rho * B_m (official 1.3; BraTS 1.0)",
                       min=0.0, search=Search(0.5, 2.0)),
    # search range: official MOSI/IEMOCAP 0.2
    "cggm_lambda": Option(0.2, "lambda: weight of the direction loss l_gm (official MOSI/IEMOCAP 0.2, "
                          "Food 0.05, BraTS 0.1)", min=0.0, search=Search(0.01, 1.0, log=True)),
    "cggm_cls_lr": Option(0.5, "classifier learning rate as a multiple of the run's lr (official 5e-4 "
                          "against 1e-3)", min=0.0, min_open=True),
    "cggm_direction": Option("current", "direction term: at the current weights with the previous B "
                             "(current), exactly as released (stale: gradient at the previous step's "
                             "weights), or none", choices=("current", "stale", "none")),
    "cggm_acc_source": Option("train_batch", "classifier accuracy that drives B: each training batch "
                              "(release) or the validation split once per epoch (never test)",
                              choices=("train_batch", "val")),
    "cggm_b_max": Option(None, "clamp B into [0, b_max] (off: B as released, possibly huge or negative)",
                         type=float, min=0.0),
    "fusion_mode": Option("concat", "fused head: concat (block of W per modality), sum (one layer per "
                          "modality) or weight (one shared layer)", choices=("concat", "sum", "weight")),
}


# ---- pure mathematics ------------------------------------------------------------------------
def batch_accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Share of the batch the logits classify correctly (argmax), a 0-d fp32 tensor."""
    return (logits.detach().argmax(dim=1) == y).float().mean()


def modulation_coefficients(acc: torch.Tensor, acc_prev: torch.Tensor, eps: float = EPS
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, D): Delta = acc - acc_prev, D = sum(Delta) + eps, B_m = (D - Delta_m) / D (fp32)."""
    delta = acc.float() - acc_prev.float()
    d = delta.sum() + eps
    return (d - delta) / d, d


def flat_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of two weight matrices, flattened (the release's ``cal_cos``), fp32."""
    return F.cosine_similarity(a.float().reshape(-1), b.float().reshape(-1), dim=0)


def direction_loss(b: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """l_gm = (sum_m |B_m| - sum_m B_m cos_m) / M."""
    return (b.abs().sum() - (b * cos).sum()) / b.numel()


def fused_blocks(fusion: nn.Module, order: Sequence[str]) -> dict[str, torch.Tensor]:
    """The fused head's output weight that faces each modality, shaped like its classifier's
    (C x d_m): concat -> the columns of m; sum -> m's own layer; weight -> the shared layer."""
    if hasattr(fusion, "fcs"):  # SumHead
        return {m: fusion.fcs[m].weight for m in order}
    weight = fusion.fc.weight
    if hasattr(fusion, "sizes"):  # ConcatHead
        return dict(zip(order, torch.split(weight, fusion.sizes, dim=1), strict=True))
    return {m: weight for m in order}  # WeightHead: one layer on the fused feature


@register_method(NAME, "CGGM: classifier-guided gradient modulation (NeurIPS 2024)")
class CGGM(Method):
    name = NAME
    description = "CGGM: classifier-guided gradient modulation (NeurIPS 2024)"
    options = OPTIONS
    defaults = {"grad_clip": 0.8}  # every official run file clips the global norm at 0.8
    min_modalities = 2
    manual_optimization = True
    key_diagnostic = "B_"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.fusion = str(self._opt("fusion_mode"))
        self.direction = str(self._opt("cggm_direction"))
        self.acc_source = str(self._opt("cggm_acc_source"))
        self.order: list[str] = []
        self.acc_prev: torch.Tensor | None = None  # classifier accuracies of the previous measurement
        self.b_prev: torch.Tensor | None = None  # B of the previous step (direction term)
        self.b_epoch: torch.Tensor | None = None  # B from validation (acc_source=val)
        self.stale_grad: dict[str, torch.Tensor] | None = None  # release's stored l_gm gradient

    def _opt(self, key: str) -> Any:
        """Option value; the declared default when ``cfg`` lacks it (a method built by hand)."""
        return self.cfg.get(key, OPTIONS[key].default)

    # ---- set-up ---------------------------------------------------------------------------
    def build_fusion(self, dims: Mapping[str, int], num_classes: int) -> nn.Module:
        self.order = list(dims)
        return build_head(self.fusion, dims, num_classes)

    def configure_model(self, model: Any) -> None:
        if self.acc_source == "val" and self.trainer is not None and self.trainer.val_is_test:
            raise ConfigError(
                "Method 'cggm': cggm_acc_source=val reads each classifier's validation accuracy, but "
                "this run validates on the test split (val_fraction=0 or the paper protocol), so the "
                "rule would read test labels. Use cggm_acc_source=train_batch (the release) or set "
                "val_fraction > 0."
            )
        self.order = list(model.modalities)
        model.extra["cggm_cls"] = nn.ModuleDict({m: nn.Linear(d, model.num_classes) for m, d in model.dims.items()})
        dev = self.trainer.device if self.trainer is not None else torch.device("cpu")
        self.acc_prev = torch.zeros(len(self.order), device=dev)
        if self.acc_source == "val":
            self.b_epoch = torch.full((len(self.order),), (len(self.order) - 1) / len(self.order), device=dev)

    @property
    def classifiers(self) -> nn.ModuleDict:
        assert self.model is not None
        return self.model.extra["cggm_cls"]

    def configure_optimizers(self) -> Any:
        """Main: the dataset recipe over encoders and fused head; cls: the same recipe over the
        classifiers at ``cggm_cls_lr`` x lr. The unimodal heads are not trained."""
        assert self.trainer is not None and self.model is not None
        groups = [{"params": self.model.encoder_params(m), "name": f"encoder.{m}"} for m in self.order]
        groups.append({"params": self.model.fusion_params(), "name": "fusion"})
        lr = float(self.cfg["lr"]) * float(self._opt("cggm_cls_lr"))
        cls = [{"params": list(self.classifiers.parameters()), "name": "classifiers", "lr": lr}]
        return {"main": self.trainer.default_optimizers(groups), "cls": self.trainer.default_optimizers(cls)}

    def trains_unimodal_heads(self) -> bool:
        return False

    def per_modality_source(self) -> str:
        return "method"  # the auxiliary classifiers (predict)

    # ---- training -------------------------------------------------------------------------
    def _cosines(self) -> torch.Tensor:
        """cos(W_cls_m, fused block of m) per modality; classifier weights detached, so the
        direction loss reaches only the fused head."""
        assert self.model is not None
        blocks = fused_blocks(self.model.fusion, self.order)
        return torch.stack([flat_cosine(self.classifiers[m].weight.detach(), blocks[m]) for m in self.order])

    def _stale_gradient(self, b: torch.Tensor) -> dict[str, torch.Tensor]:
        """The release's l_gm gradient on the fused head at this step's (pre-update) weights
        with this step's B, by parameter name, kept for the next step."""
        assert self.model is not None
        named = [(n, p) for n, p in self.model.fusion.named_parameters() if p.requires_grad]
        with torch.enable_grad():
            loss = direction_loss(b, self._cosines())
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        return {n: g.detach().float() for (n, _), g in zip(named, grads, strict=True) if g is not None}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        assert self.model is not None and self.optimizer is not None and self.acc_prev is not None
        model, y = self.model, batch["label"]
        lam = float(self._opt("cggm_lambda"))
        with self.autocast():
            feats = model.encode(batch)
            fused = model.fuse(feats)
        loss = F.cross_entropy(fused.float(), y)
        logs: dict[str, torch.Tensor] = {}
        total = loss
        if self.direction == "current" and self.b_prev is not None:
            cos = self._cosines()
            l_gm = direction_loss(self.b_prev, cos)
            total = loss + lam * l_gm
            logs["l_gm"] = l_gm.detach()
        self.manual_backward(total)
        if self.direction == "stale" and self.stale_grad is not None:
            self._add_stale_gradient(lam)
        # the auxiliary classifiers, on detached features: their graph never meets the model's
        with self.autocast():
            cls_logits = {m: self.classifiers[m](feats[m].detach()) for m in self.order}
        self.manual_backward(sum(F.cross_entropy(cls_logits[m].float(), y) for m in self.order))
        acc = torch.stack([batch_accuracy(cls_logits[m], y) for m in self.order])
        if self.acc_source == "train_batch":
            b, d = modulation_coefficients(acc, self.acc_prev)
            self.acc_prev = acc
            logs["small_D"] = (d.abs() < SMALL_D).float()
        else:
            assert self.b_epoch is not None
            b = self.b_epoch
        if self._opt("cggm_b_max") is not None:
            b = b.clamp(0.0, float(self._opt("cggm_b_max")))
        if self.direction == "stale":
            self.stale_grad = self._stale_gradient(b)  # at this step's weights, before any update
        if self.direction != "none":
            with torch.no_grad():
                logs.update({f"cos_{m}": c for m, c in zip(self.order, self._cosines(), strict=True)})
        self._scale_encoder_grads(float(self._opt("cggm_rho")) * b)
        cls_opt = self.optimizers["cls"]
        cls_opt.step()  # the release never clips the classifiers
        cls_opt.zero_grad(set_to_none=True)
        self.optimizer_step(self.optimizer)  # the model, with the run's clip after the scaling
        self.b_prev = b
        logs.update({f"B_{m}": v for m, v in zip(self.order, b, strict=True)})
        logs.update({f"acc_{m}": v for m, v in zip(self.order, acc, strict=True)})
        self.log(**logs)
        return loss.detach()

    @torch.no_grad()
    def _scale_encoder_grads(self, factors: torch.Tensor) -> None:
        """grad <- factor_m * grad for every parameter of encoder m (fp32, on the device)."""
        assert self.model is not None
        for m, k in zip(self.order, factors.unbind(0), strict=True):
            grads = [p.grad for p in self.model.encoder_params(m) if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, k)

    @torch.no_grad()
    def _add_stale_gradient(self, lam: float) -> None:
        """grad W_fused += lambda * (the previous step's stored l_gm gradient)."""
        assert self.model is not None and self.stale_grad is not None
        params = dict(self.model.fusion.named_parameters())
        for n, g in self.stale_grad.items():
            p = params[n]
            if p.grad is None:
                p.grad = lam * g
            else:
                p.grad.add_(g, alpha=lam)

    def on_validation_end(self, metrics: Mapping[str, Any]) -> None:
        """acc_source=val: B for the next epoch from the classifiers' validation accuracies
        (the improvement since the previous validation; the validation split only)."""
        if self.acc_source != "val" or self.acc_prev is None:
            return
        val = metrics["val"]
        acc = torch.tensor([val[m]["acc"] / 100.0 for m in self.order], device=self.acc_prev.device)
        b, d = modulation_coefficients(acc, self.acc_prev)
        self.acc_prev, self.b_epoch = acc, b
        self.log(small_D=float(abs(float(d)) < SMALL_D))

    # ---- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> Prediction:
        assert self.model is not None
        feats = self.model.encode(batch)
        return Prediction(self.model.fuse(feats), {m: self.classifiers[m](feats[m]) for m in self.order})

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().cpu().clone()

        return {
            "order": list(self.order),
            "acc_prev": cpu(self.acc_prev),
            "b_prev": cpu(self.b_prev),
            "b_epoch": cpu(self.b_epoch),
            "stale_grad": None if self.stale_grad is None else {k: cpu(v) for k, v in self.stale_grad.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if list(state["order"]) != self.order:
            raise ConfigError(f"Method 'cggm': the checkpoint was written for modalities {list(state['order'])}, "
                              f"this run has {self.order}. Resume with the same settings, or start fresh.")
        dev = self.trainer.device if self.trainer is not None else torch.device("cpu")

        def dev_(t: Any) -> torch.Tensor | None:
            return None if t is None else torch.as_tensor(t).to(dev)

        self.acc_prev = dev_(state["acc_prev"])
        self.b_prev = dev_(state["b_prev"])
        self.b_epoch = dev_(state["b_epoch"])
        stale = state.get("stale_grad")
        self.stale_grad = None if stale is None else {k: dev_(v) for k, v in stale.items()}

    # ---- reporting ------------------------------------------------------------------------
    def label(self) -> str:
        tags = []
        if self.fusion != "concat":
            tags.append(f"{self.fusion} fusion")
        for key, short in (("cggm_rho", "rho"), ("cggm_lambda", "lambda"), ("cggm_cls_lr", "cls lr x")):
            if self._opt(key) != OPTIONS[key].default:
                tags.append(f"{short}={self._opt(key):g}")
        if self.direction == "stale":
            tags.append("stale direction, as released")
        elif self.direction == "none":
            tags.append("no direction term")
        if self.acc_source == "val":
            tags.append("B from val accuracy")
        if self._opt("cggm_b_max") is not None:
            tags.append(f"B in [0, {self._opt('cggm_b_max'):g}]")
        return "CGGM" if not tags else f"CGGM ({', '.join(tags)})"

    def record_info(self) -> dict[str, Any]:
        return {
            "classifiers": "Linear(d_m -> C) on the detached feature of each modality",
            "magnitude": "grad(encoder m) *= rho * B_m, B from "
            + ("each training batch's classifier accuracy" if self.acc_source == "train_batch"
               else "the classifiers' validation accuracy, once per epoch"),
            "direction": {"current": "cosine of head weights at the current step, previous B",
                          "stale": "cosine gradient at the previous step's weights (as released)",
                          "none": "none"}[self.direction],
            "fused_block": {"concat": "columns of modality m", "sum": "modality m's layer",
                            "weight": "the shared layer"}[self.fusion],
        }
