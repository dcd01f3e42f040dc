"""CML: Calibrating Multimodal Learning (Ma, Zhang, Zhang, Wu, Fu, Zhou, Hu, ICML 2023).

Documented in the documentation's cml page. The principle: a model's confidence in its prediction should
not grow when a modality is taken away. CML adds a ranking regulariser that penalises, per
sample, any rise of the predicted-class confidence from a set of modalities to a subset of it.

Per batch (automatic optimisation; the encoders run once):

1. a chain of nested modality sets per sample, ``S_0 = all ⊃ S_1 ⊃ ... ⊃ S_{M-1}``: every sample
   draws its own random removal order (``order=per_sample``, the official ``miwae/train.py``
   ``get_multi_mask``), and ``S_k`` is ``S_{k-1}`` without the k-th modality of that order, so
   ``S_{M-1}`` holds one modality (:func:`removal_positions`, :func:`chain_masks`);
2. ``logits_k`` = the fused head on the features with the modalities outside ``S_k`` removed,
   row by row (:func:`subset_logits`; with zeroed features every set of the chain goes through
   the head in one call on ``M x B`` rows, every head being row-wise): concat zeroes the removed
   features, which is exactly
   BalanceBenchmark's ``out - part_m + b/2`` (the bias share restored); sum drops the removed
   modality's part, bias included (``removal``);
3. ``c_k = max_c softmax(logits_k)_c`` and ``p_k = argmax logits_k`` in fp32 (the confidence of
   the *predicted* class, as both official sources take it, never the true class);
4. for every link k = 0..M-2 and sample i, with ``d = c_{k+1} - c_k`` and the mask ``w`` computed
   without gradient (:func:`link_weights`):

   * ``sign=cpm`` (default): ``w = 1 - 1[p_{k+1} = y and p_k != y]``: a rise is penalised unless
     the removal turned a wrong prediction into a right one (official ``cpm/CPM_Nets.py``
     ``rank_loss``);
   * ``sign=miwae``: ``w = 1[p_k = y]`` (the larger set was right: "trick 1"), plus a second
     term ``relu((c_{k+1} - stopgrad(c_k)) * 1[p_{k+1} != y and p_k != y] - eps)`` that only
     pushes the smaller set down when both are wrong ("trick 2"; official ``miwae/train.py``);
   * ``sign=bb_trick1``: ``w = 1 - 1[p_k = y and p_{k+1} != y]``, the mask BalanceBenchmark's
     ``CML_trainer.py`` computes (roles swapped against the CPM rule) and then never uses;
   * ``sign=none``: ``w = 1``;

   ``reg = sum_k sum_i relu(d * w - eps)`` (:func:`calibration_penalty`);
5. ``loss = mean_k CE(logits_k, y) + lam * reg``: the classification loss on *every* set of the
   chain, as both official sources do (``ce_on_subsets=false`` keeps the fused CE only, an
   ablation no source runs).

The gradient of the regulariser reaches both confidences of a link (neither official rule
detaches ``c_k`` in its first term), and through them the encoders and the fused head.

Inference: the plain fused head on all modalities. The per-modality logits evaluation reports
are the method's own single-modality logits: the head with every other modality removed by the
same rule, i.e. the last set of a chain, which the subset CE trains directly
(``per_modality_source() == "method"``; for concat that is the head's part plus the whole bias,
for sum exactly the part).

Official code followed: QingyangZhang/CML (``cpm/CPM_Nets.py`` ``rank_loss``, ``miwae/train.py``
training loop); it covers only the paper's two imputation models on multi-view tabular data, so
the late-fusion form follows GeWu-Lab/BalanceBenchmark ``balancemm/trainer/CML_trainer.py``
where the official code says nothing (how a modality is removed from a late-fusion head).

Open questions, settled (the documentation's cml page, "Open questions settled"):

* **Which sign rule.** Three differ: CPM's (default), MIWAE's ``1[p_k = y]`` with its trick 2,
  and BalanceBenchmark's swapped mask (computed, unused). The CPM rule is the default because
  it is official code and the only one that states the paper's principle with its one
  exception (a removal that fixes a wrong prediction may raise confidence). All are reachable.
* **Reduction.** Both official sources sum over samples and links; ``reduction=sum`` is the
  default, so the regulariser grows with the batch size (with batch 64, a 30 % violation rate at
  a confidence rise of 0.1 gives about 0.2 against a CE of about 1; the record says so).
  ``reduction=mean`` divides by the batch size.
* **Per-dataset lambda.** Not known for any audio-visual set; ``lam = 0.1`` is BalanceBenchmark's
  value and equals the official MIWAE coefficient ``beta/100`` with its README's ``beta = 10``.
* **The hinge.** Per sample (both official rules); BalanceBenchmark puts one hinge on the batch
  sum, where confident samples cancel violations (``hinge=batch_sum``: each link's
  ``relu(sum_i (d_i w_i - eps))``).
* **Removal order.** Per sample (official); BalanceBenchmark draws one order per epoch for all
  samples (``order=per_epoch``, drawn from the run's RNG at the epoch start, so a resumed run
  draws it again).
* **How a modality is removed.** The feature is zeroed after its encoder (the official code
  fills a missing view with the training mean *before* its imputation model, which has no
  late-fusion counterpart). For concat this is BalanceBenchmark's bias-restoring formula; for
  sum the removed part is dropped with its bias (a decision: an absent branch contributes
  nothing), ``removal=zero_feature`` keeps ``b_m``; ``removal=drop_part`` on concat drops the
  bias share ``b/M`` too. BalanceBenchmark as it would run: ``sign=none hinge=batch_sum
  order=per_epoch`` (its 0-80 epoch window is not offered: no official code has one).

Refused: one modality (there is no subset), ``removal=drop_part`` with ``weight`` fusion (that
head's logits do not split into additive parts). ``weight`` fusion is allowed with a warning:
zeroing a modality also changes the coordinate weights of the others.

Cost: the encoders run once; the extra work is the fused head on (M - 1) x B more rows of
masked features (one call), one log-softmax shared by the CE and the confidences, and a few
element-wise ops per batch, so an epoch costs about as much as joint training (measured with
``benchmarks/bench_methods.py``, AMD EPYC with AVX512-BF16, shared 2-core machine: 0.93x on
avdigits; on synthetic, whose steps take about a millisecond, the fixed per-step kernels show,
see the documentation's cml page). Nothing is read back to the host during a step; the diagnostics are 0-d tensors. The
method keeps no state across steps (the per-epoch order is redrawn from the re-seeded RNG).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.config import Option, Search
from mmbalance.errors import UnsupportedError
from mmbalance.heads import build_head
from mmbalance.method import Method, Prediction
from mmbalance.registry import register_method

NAME = "cml"
DESCRIPTION = "CML: calibrating multimodal learning, confidence must not rise when a modality is removed (ICML 2023)"
SIGNS = ("cpm", "miwae", "bb_trick1", "none")

OPTIONS: dict[str, Option] = {
    # search range: BalanceBenchmark and the official code use 0.1
    "lam": Option(0.1, "weight of the confidence-ranking regulariser (BalanceBenchmark 0.1 = official "
                  "MIWAE beta/100 with beta 10)", type=float, min=0, search=Search(0.01, 1.0, log=True)),
    "sign": Option("cpm", "which rises are penalised: cpm (official CPM-Nets: all but wrong->right), "
                   "miwae (larger set right, plus the both-wrong term), bb_trick1 (BalanceBenchmark's "
                   "unused mask), none (every rise)", choices=SIGNS),
    "hinge": Option("per_sample", "ReLU per sample (official) or on each link's batch sum "
                    "(BalanceBenchmark)", choices=("per_sample", "batch_sum")),
    "reduction": Option("sum", "regulariser summed over samples (both official codes) or averaged",
                        choices=("sum", "mean")),
    "order": Option("per_sample", "modality removal order drawn per sample (official) or once per "
                    "epoch for all samples (BalanceBenchmark)", choices=("per_sample", "per_epoch")),
    "eps": Option(0.0, "tolerance margin: a rise must exceed it to be penalised (official 0)", type=float, min=0),
    "ce_on_subsets": Option(True, "cross-entropy averaged over every set of the chain (both sources); "
                            "false = fused CE only (an ablation)"),
    "fusion_mode": Option("concat", "fused head: concat (BalanceBenchmark), sum, or weight (warned: "
                          "removing a modality changes the others' weights)",
                          choices=("concat", "sum", "weight")),
    "removal": Option("auto", "how a removed modality leaves the head: zero_feature (zero its feature), "
                      "drop_part (drop its part, bias share included); auto = zero_feature for "
                      "concat and weight, drop_part for sum", choices=("auto", "zero_feature", "drop_part")),
}


# ---- pure mathematics (no trainer state) -------------------------------------------------------
def removal_positions(
    batch_size: int, num_modalities: int, order: str = "per_sample", epoch_order: torch.Tensor | None = None,
    device: torch.device | str = "cpu", generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``pos[i, m]``: the link at which sample i loses modality m (0 = first removed); each row
    is a permutation of ``0..M-1``, and the modality at ``M-1`` is never removed.

    ``per_sample``: the argsort of i.i.d. uniforms, a uniform random permutation per row.
    ``per_epoch``: ``epoch_order`` (one permutation) for every row.
    """
    if order == "per_epoch":
        if epoch_order is None:
            raise ValueError("order='per_epoch' needs the epoch's permutation (epoch_order)")
        return epoch_order.to(device).view(1, -1).expand(batch_size, num_modalities)
    if order != "per_sample":
        raise ValueError(f"order must be 'per_sample' or 'per_epoch', got {order!r}")
    u = torch.rand(batch_size, num_modalities, device=device, generator=generator)
    return u.argsort(dim=1)


def chain_masks(positions: torch.Tensor) -> torch.Tensor:
    """Bool ``keep[k, i, m]`` for k = 0..M-1: whether modality m is still in sample i's set S_k.

    ``S_k`` keeps what has not yet been removed after k removals: ``pos[i, m] >= k``, so the sets
    are nested and ``S_0`` is every modality.
    """
    m = positions.shape[1]
    steps = torch.arange(m, device=positions.device).view(m, 1, 1)
    return positions.unsqueeze(0) >= steps


def confidences(logits: torch.Tensor, log_probs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c, p)``: the max softmax probability (the predicted class's) and the argmax, in fp32,
    along the last axis. ``log_probs`` (the fp32 log-softmax of ``logits``) may be passed to
    share it with the cross-entropy: ``c = exp(max log p)``, one softmax less per step."""
    if log_probs is None:
        log_probs = torch.log_softmax(logits.float(), dim=-1)
    top, pred = log_probs.max(dim=-1)
    return top.exp(), pred


def link_weights(
    pred_big: torch.Tensor, pred_small: torch.Tensor, y: torch.Tensor, sign: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The masks of one link (larger set ``big`` -> its subset ``small``), fp32, no gradient.

    Returns ``(w, w_both_wrong)``: ``w`` multiplies the confidence rise in the first term; the
    second mask is MIWAE's trick 2 (both sets wrong) and None for the other rules.
    """
    with torch.no_grad():
        big_right, small_right = pred_big == y, pred_small == y
        if sign == "cpm":
            w = ~(small_right & ~big_right)
        elif sign == "bb_trick1":
            w = ~(big_right & ~small_right)
        elif sign == "miwae":
            w = big_right
        elif sign == "none":
            w = torch.ones_like(big_right)
        else:
            raise ValueError(f"sign must be one of {SIGNS}, got {sign!r}")
        both_wrong = (~big_right & ~small_right).float() if sign == "miwae" else None
        return w.float(), both_wrong


class Penalty(NamedTuple):
    """The regulariser and what it saw: ``rise`` is the share of (sample, link) pairs whose
    confidence rose after a removal, ``penalised`` the share that the hinge charged."""

    reg: torch.Tensor
    rise: torch.Tensor
    penalised: torch.Tensor


def calibration_penalty(
    conf: torch.Tensor, pred: torch.Tensor, y: torch.Tensor, sign: str = "cpm", eps: float = 0.0,
    hinge: str = "per_sample", reduction: str = "sum",
) -> Penalty:
    """CML's ranking regulariser over a chain: ``conf``, ``pred`` are ``(K, B)`` (set k of the
    chain per row), ``y`` is ``(B,)``.

    Per link k and sample i, ``t = (c_{k+1} - c_k) * w - eps`` (MIWAE adds a second term with
    ``c_k`` detached); ``per_sample``: sum of ``relu(t)``; ``batch_sum``: ``relu(sum_i t)`` per
    link. Summed over links; ``mean`` divides by the batch size.
    """
    if hinge not in ("per_sample", "batch_sum"):
        raise ValueError(f"hinge must be 'per_sample' or 'batch_sum', got {hinge!r}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    conf = conf.float()
    big, small = conf[:-1], conf[1:]
    w, both_wrong = link_weights(pred[:-1], pred[1:], y.view(1, -1), sign)
    terms = [(small - big) * w - eps]
    if both_wrong is not None:
        terms.append((small - big.detach()) * both_wrong - eps)
    reg = conf.new_zeros(())
    charged = torch.zeros_like(big, dtype=torch.bool)
    for t in terms:
        if hinge == "per_sample":
            reg = reg + F.relu(t).sum()
            charged = charged | (t > 0)
        else:
            per_link = t.sum(dim=1)
            reg = reg + F.relu(per_link).sum()
            charged = charged | ((per_link > 0).unsqueeze(1) & (t > 0))
    if reduction == "mean":
        reg = reg / conf.shape[1]
    with torch.no_grad():
        rise = (small > big).float().mean()
        penalised = charged.float().mean()
    return Penalty(reg, rise, penalised)


class CMLLoss(NamedTuple):
    loss: torch.Tensor
    ce: torch.Tensor
    reg: torch.Tensor
    rise: torch.Tensor
    penalised: torch.Tensor


def cml_loss(
    logits: torch.Tensor, y: torch.Tensor, lam: float = 0.1, sign: str = "cpm", eps: float = 0.0,
    hinge: str = "per_sample", reduction: str = "sum", ce_on_subsets: bool = True,
) -> CMLLoss:
    """CML's loss from the chain's logits ``(K, B, C)`` (k = 0 the full set): the mean CE over
    the chain (or the full set's alone) plus ``lam`` times :func:`calibration_penalty`."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    if ce_on_subsets:  # every set has the whole batch: the mean over (k, i) is the mean of the K means
        ce = F.nll_loss(log_probs.flatten(0, 1), y.repeat(log_probs.shape[0]))
    else:
        ce = F.nll_loss(log_probs[0], y)
    conf, pred = confidences(logits, log_probs)
    pen = calibration_penalty(conf, pred, y, sign, eps, hinge, reduction)
    return CMLLoss(ce + lam * pen.reg, ce, pen.reg, pen.rise, pen.penalised)


def subset_logits(
    head: nn.Module, feats: Mapping[str, torch.Tensor], keep: torch.Tensor, removal: str,
    parts: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The fused head's logits with, in row i, only the modalities where ``keep[i]`` is true
    (``keep`` is ``(B, M)`` in the order of ``feats``).

    ``zero_feature``: the head on features zeroed where removed. ``drop_part``: the sum of the
    kept parts (``parts`` may be passed to reuse them across a chain).
    """
    names = list(feats)
    if removal == "zero_feature":
        masked = {m: f.masked_fill(~keep[:, j : j + 1], 0) for j, (m, f) in enumerate(feats.items())}
        return head(masked)
    if removal != "drop_part":
        raise ValueError(f"removal must be 'zero_feature' or 'drop_part', got {removal!r}")
    if parts is None:
        parts = head.parts(feats)
    out = None
    for j, m in enumerate(names):
        term = parts[m].masked_fill(~keep[:, j : j + 1], 0)
        out = term if out is None else out + term
    assert out is not None
    return out


# ---- the plugin --------------------------------------------------------------------------------
@register_method(NAME, DESCRIPTION)
class CML(Method):
    name = NAME
    description = DESCRIPTION
    fusion = "concat"  # the default; the run's head is chosen by fusion_mode
    options = OPTIONS
    min_modalities = 2
    key_diagnostic = "conf_rise"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.fusion = str(self._opt("fusion_mode"))
        removal = str(self._opt("removal"))
        self.removal = ({"sum": "drop_part"}.get(self.fusion, "zero_feature") if removal == "auto" else removal)
        if self.fusion == "weight" and self.removal == "drop_part":
            raise UnsupportedError(
                "Method 'cml' with removal=drop_part removes a modality by dropping its additive part "
                "of the fused logits, but 'weight' fusion feeds a weighted sum of the features into one "
                "shared head, so its logits have no additive parts. Use --set removal=zero_feature (or "
                "auto) with weight fusion, or fusion_mode=concat/sum."
            )
        self.lam = float(self._opt("lam"))
        self.sign = str(self._opt("sign"))
        self.hinge = str(self._opt("hinge"))
        self.reduction = str(self._opt("reduction"))
        self.order = str(self._opt("order"))
        self.eps = float(self._opt("eps"))
        self.ce_on_subsets = bool(self._opt("ce_on_subsets"))
        self.modalities: list[str] = []
        self._epoch_order: torch.Tensor | None = None

    def _opt(self, key: str) -> Any:
        """Option value; the declared default when ``cfg`` lacks it (a method built by hand)."""
        return self.cfg.get(key, OPTIONS[key].default)

    # ---- declarations / set-up ------------------------------------------------------------
    def check_modalities(self, available: Sequence[str]) -> list[str]:
        self.modalities = super().check_modalities(available)
        return self.modalities

    def build_fusion(self, dims: Mapping[str, int], num_classes: int) -> nn.Module:
        self.modalities = list(dims)
        return build_head(self.fusion, dims, num_classes)  # weight: the default coordinate weights

    def trains_unimodal_heads(self) -> bool:
        return False  # the unimodal heads get no loss; single-modality logits come from the fused head

    def per_modality_source(self) -> str:
        return "method"  # each modality alone through the fused head, the chain's last sets

    def on_fit_start(self) -> None:
        assert self.model is not None
        self.modalities = list(self.model.modalities)
        if self.fusion == "weight":
            warnings.warn(
                "Method 'cml' with weight fusion: zeroing a removed modality's feature also changes the "
                "coordinate weights of the modalities that remain, so a subset's logits are not the "
                "remaining modalities' share of the full logits (concat and sum have no such effect).",
                stacklevel=2,
            )

    def on_train_epoch_start(self, epoch: int) -> None:
        # drawn from the global RNG the trainer has just re-seeded from (seed, epoch): a resumed
        # epoch draws the same order, so there is nothing to checkpoint
        self._epoch_order = torch.randperm(len(self.modalities)) if self.order == "per_epoch" else None

    # ---- training -------------------------------------------------------------------------
    def chain_logits(self, feats: Mapping[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        """``(K, B, C)`` fp32 logits of every set of the chains ``keep`` (``(K, B, M)``); the
        full set (k = 0) is the plain fused head."""
        assert self.model is not None
        head = self.model.fusion
        if self.removal == "zero_feature":
            # every set of the chain in one head call on K x B rows (every head here is row-wise);
            # S_0 keeps everything, so its rows are the plain fused head's
            k, b = keep.shape[:2]
            stacked = {m: (f.unsqueeze(0) * keep[:, :, j : j + 1].to(f.dtype)).flatten(0, 1)
                       for j, (m, f) in enumerate(feats.items())}
            return head(stacked).float().view(k, b, -1)
        parts = head.parts(feats)
        out = [self.model.fuse(feats)]
        out += [subset_logits(head, feats, keep[k], self.removal, parts) for k in range(1, keep.shape[0])]
        return torch.stack([o.float() for o in out])

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        assert self.model is not None
        feats = self.model.encode(batch)
        y = batch["label"]
        first = next(iter(feats.values()))
        pos = removal_positions(first.shape[0], len(feats), self.order, self._epoch_order, first.device)
        keep = chain_masks(pos)
        terms = cml_loss(self.chain_logits(feats, keep), y, self.lam, self.sign, self.eps,
                         self.hinge, self.reduction, self.ce_on_subsets)
        if self.trainer is not None:
            self.log(conf_rise=terms.rise, penalised=terms.penalised, cml_reg=terms.reg.detach(),
                     cml_ce=terms.ce.detach())
        return terms.loss

    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> Prediction:
        assert self.model is not None
        feats = self.model.encode(batch)
        first = next(iter(feats.values()))
        head = self.model.fusion
        parts = head.parts(feats) if self.removal == "drop_part" else None
        eye = torch.eye(len(feats), dtype=torch.bool, device=first.device)
        per = {m: subset_logits(head, feats, eye[j].expand(first.shape[0], -1), self.removal, parts)
               for j, m in enumerate(feats)}
        return Prediction(self.model.fuse(feats), per)

    # ---- reporting ------------------------------------------------------------------------
    def label(self) -> str:
        """'CML' at the defaults; each changed option adds a tag."""
        tags = []
        if self.lam != OPTIONS["lam"].default:
            tags.append(f"lam={self.lam:g}")
        if self.sign != "cpm":
            tags.append(f"sign {self.sign}")
        if self.hinge != "per_sample":
            tags.append("batch-sum hinge")
        if self.reduction != "sum":
            tags.append("mean over samples")
        if self.order != "per_sample":
            tags.append("order per epoch")
        if self.eps != OPTIONS["eps"].default:
            tags.append(f"eps={self.eps:g}")
        if not self.ce_on_subsets:
            tags.append("fused CE only")
        if self.fusion != "concat":
            tags.append(f"{self.fusion} fusion")
        auto = "drop_part" if self.fusion == "sum" else "zero_feature"
        if self.removal != auto:
            tags.append(self.removal.replace("_", " "))
        return "CML" if not tags else f"CML ({', '.join(tags)})"

    def record_info(self) -> dict[str, Any]:
        rule = {
            "cpm": "1 - 1[p_(k+1) = y and p_k != y] (official CPM-Nets)",
            "miwae": "1[p_k = y], plus relu((c_(k+1) - sg(c_k)) 1[both wrong] - eps) (official MIWAE)",
            "bb_trick1": "1 - 1[p_k = y and p_(k+1) != y] (BalanceBenchmark's unused mask)",
            "none": "1 (every rise)",
        }[self.sign]
        return {
            "chain": f"nested sets, one removal per link, order {self.order.replace('_', ' ')}",
            "confidence": "max softmax probability (predicted class), fp32",
            "sign": rule,
            "regulariser": (f"lam {self.lam:g} x {'sum' if self.reduction == 'sum' else 'mean'} over samples of "
                            f"{'relu per sample' if self.hinge == 'per_sample' else 'relu of each link batch sum'}"
                            f", summed over links, eps {self.eps:g}"),
            "regulariser_scale": ("grows with the batch size (sum over samples)" if self.reduction == "sum"
                                  else "independent of the batch size"),
            "classification": "mean CE over every set of the chain" if self.ce_on_subsets else "fused CE only",
            "removal": self.removal,
            "per_modality_rule": f"the fused head on that modality alone ({self.removal.replace('_', ' ')})",
        }
