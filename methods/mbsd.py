"""MBSD: modality-balanced late-fusion self-distillation (as BalanceBenchmark implements it).

Full page: ``the documentation's mbsd page``. BalanceBenchmark (GeWu-Lab/BalanceBenchmark,
``balancemm/trainer/MBSD_trainer.py``) lists MBSD among its objective-level methods; the paper
behind it could not be identified and no other code exists. Idea, read from that trainer: per
sample, the modality that is more confident on the true class teaches the less confident one,
weighted by how far apart they are, only on samples where at least one of them is right; a
second term pulls the two modalities' outputs together with the same weight. Both are added to
the fused CE and a CE on each modality's part of the fused head.

Notation: z_m = the concat head's part of modality m (``W_m e_m + b / M``), p_m = softmax(z_m),
q_m = p_m[y] (true-class probability), yhat_m = argmax z_m, C classes, B samples.

``mbsd_variant=distill`` (default; our reading of the intent, a guess). For every pair (a, b)
of modalities and every sample i:

    strong = a if q_a >= q_b else b,  weak = the other
    g_i    = |q_a - q_b| if (yhat_a = y or yhat_b = y) else 0      (detached: a weight, not a target)
    KD_ab  = (1/B) sum_i g_i KL(p_strong,i (detached) || p_weak,i)  (full class distributions)
    RS_ab  = (1/B) sum_i g_i (1/C) ||z_a,i - z_b,i||^2             (logits, both sides trained)

KD and RS are averaged over the M(M-1)/2 pairs (one pair for two modalities), and

    loss = CE(o) + sum_m CE(z_m) + kd_weight * KD + rs_weight * RS

``mbsd_variant=bb``: BalanceBenchmark's numbers, vectorised (no loop over the batch). With
s_i = max(q_a, q_b) and w_i = min(q_a, q_b) (first modality on ties) and gap_i = s_i - w_i on
samples where one of the pair is right (else 0), all three left IN the graph:

    KDb_ab = (1/B) sum_i gap_i * w_i (log w_i - s_i)   (torch's kl_div given a probability
                                                        where a log-probability belongs)
    RSb_ab = (1/B) sum_i gap_i (1/C) ||x_a,i - x_b,i||^2, x = logits for two modalities,
                                                        x = probabilities for three

Three modalities average the three pairs' KDb and RSb; more are refused (BalanceBenchmark
defines two and three only). The KDb term is always <= 0, so through its weight it is lowered
by widening the gap, while RS is lowered by narrowing it.

Open questions, settled:

* **The paper** is unidentified: everything is read from BalanceBenchmark's trainer; the default
  is what that code appears to intend (a true KL divergence from the stronger modality's
  distribution, detached teacher, detached weights) and ``bb`` reproduces what it computes.
* **The distillation term**: a KL divergence between the two modalities' full class
  distributions (BalanceBenchmark's term involves the true-class probabilities only, and is no
  divergence), the teacher side and the weight detached (a self-distillation must not move the
  teacher towards the student, nor shrink its own weight).
* **The alignment term**: one rule for any number of modalities, on logits (BalanceBenchmark
  uses logits for two modalities and probabilities for three; ``bb`` keeps that).
* **Weights**: 1 for both terms, as BalanceBenchmark hard-codes (``mbsd_kd_weight``,
  ``mbsd_rs_weight``).

Departures from BalanceBenchmark:

* Its trainer calls ``model.Unimodality_Calculate()``, which no model defines, so it crashes as
  released; the quantities are those of its concat head's parts, which this method computes.
* ``distill`` is the default (above); ``mbsd_variant=bb`` restores its loss.
* In ``bb``, ``log w`` uses ``w`` clamped at 1e-8: torch's kl_div takes the value 0 at w = 0 but
  its gradient there is 0/0 (NaN); the clamp keeps the value and gives a finite gradient.
* Its epoch window (``modulation_starts/ends`` 0-80) covers every epoch of its runs, so the
  terms are always on here (no option).
* All terms are computed in fp32 (bf16 autocast leaves the forward passes in bf16).

Refuses: one modality; ``bb`` with more than three. Fusion is concat (the parts are the
per-modality outputs; ``per_modality_source() == "fused_parts"``, and the unimodal CEs train the
fused head's blocks, never the model's separate unimodal heads).

Cost: no extra pass; per step M small CEs, one softmax per modality and O(M^2) pairwise terms on
B x C tensors, no host sync: about 1.0x joint training.

Diagnostics per step: ``kd``, ``rs`` (the averaged terms before their weights), ``gap`` (mean
per-sample weight; the key diagnostic), ``teacher_<m>`` (share of (sample, pair) slots with a
non-zero weight in which m is the stronger side; with two modalities the two shares add up to
the share of weighted samples).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import torch
import torch.nn.functional as F

from mmbalance.config import Option, Search
from mmbalance.errors import UnsupportedError
from mmbalance.method import Method
from mmbalance.registry import register_method

NAME = "mbsd"
LOG_CLAMP = 1e-8  # the bb variant's log w uses max(w, 1e-8)

OPTIONS: dict[str, Option] = {
    "mbsd_variant": Option("distill", "distill: true KL from the stronger modality (detached teacher and "
                           "weights), logit alignment for any M; bb: BalanceBenchmark's loss as it computes it",
                           choices=("distill", "bb")),
    # search range: around the release's 1.0
    "mbsd_kd_weight": Option(1.0, "weight of the distillation term", min=0.0, search=Search(0.1, 3.0, log=True)),
    "mbsd_rs_weight": Option(1.0, "weight of the output-alignment term", min=0.0),
}


# ---- the mathematics (pure functions) ------------------------------------------------------
def modality_stats(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log p, q, right)`` of one modality in fp32: log-probabilities, the true-class
    probability (with its gradient) and whether the argmax is the label. Computed once per
    modality and shared by its CE and by every pair it is in."""
    logp = torch.log_softmax(z.float(), dim=1)
    q = logp.gather(1, y.long().view(-1, 1)).squeeze(1).exp()
    return logp, q, z.argmax(1) == y


Stats = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _distill(z_a: torch.Tensor, z_b: torch.Tensor, sa: Stats, sb: Stats) -> tuple[torch.Tensor, ...]:
    (la, qa, ra), (lb, qb, rb) = sa, sb
    diff = qa - qb
    a_strong = diff >= 0  # ties: a teaches (its weight is 0 anyway)
    g = (diff.abs() * (ra | rb)).detach()
    strong = a_strong.unsqueeze(1)
    teacher = torch.where(strong, la, lb).detach()
    student = torch.where(strong, lb, la)
    kl = (teacher.exp() * (teacher - student)).sum(1)
    rs = (z_a.float() - z_b.float()).pow(2).mean(1)
    n = g.shape[0]
    return g.dot(kl) / n, g.dot(rs) / n, g, a_strong


def _bb(z_a: torch.Tensor, z_b: torch.Tensor, sa: Stats, sb: Stats, rs_on_probs: bool) -> tuple[torch.Tensor, ...]:
    (la, qa, ra), (lb, qb, rb) = sa, sb
    a_strong = qa >= qb
    s = torch.where(a_strong, qa, qb)
    w = torch.where(qa <= qb, qa, qb)  # ties: a, like Python's min
    gap = (s - w) * (ra | rb)
    kd = w * torch.log(w.clamp_min(LOG_CLAMP)) - w * s
    x_a, x_b = (la.exp(), lb.exp()) if rs_on_probs else (z_a.float(), z_b.float())
    rs = (x_a - x_b).pow(2).sum(1) / z_a.shape[1]
    n = gap.shape[0]
    return gap.dot(kd) / n, gap.dot(rs) / n, gap, a_strong


def distill_pair(z_a: torch.Tensor, z_b: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(KD, RS, g, a_strong)`` of the ``distill`` variant for one pair; KD and RS batch means."""
    return _distill(z_a, z_b, modality_stats(z_a, y), modality_stats(z_b, y))


def bb_pair(z_a: torch.Tensor, z_b: torch.Tensor, y: torch.Tensor, rs_on_probs: bool) -> tuple[torch.Tensor, ...]:
    """``(KDb, RSb, gap, a_strong)`` of BalanceBenchmark's loss for one pair (gap, s and w keep
    their gradients); RS on logits, or on probabilities (its three-modality branch)."""
    return _bb(z_a, z_b, modality_stats(z_a, y), modality_stats(z_b, y), rs_on_probs)


def mbsd_terms(parts: Sequence[torch.Tensor], y: torch.Tensor, variant: str = "distill",
               stats: Sequence[Stats] | None = None) -> dict[str, Any]:
    """KD and RS averaged over all pairs of ``parts`` (run order), the mean weight, and per
    modality the share of weighted (sample, pair) slots it teaches in."""
    if variant not in ("distill", "bb"):
        raise ValueError(f"unknown MBSD variant {variant!r}")
    stats = stats or [modality_stats(z, y) for z in parts]
    kds, rss, gaps = [], [], []
    teach: list[Any] = [0 for _ in parts]
    slots = [0 for _ in parts]
    for a, b in combinations(range(len(parts)), 2):
        if variant == "distill":
            kd, rs, g, a_strong = _distill(parts[a], parts[b], stats[a], stats[b])
        else:
            kd, rs, g, a_strong = _bb(parts[a], parts[b], stats[a], stats[b], rs_on_probs=len(parts) >= 3)
        kds.append(kd)
        rss.append(rs)
        g = g.detach()
        gaps.append(g)
        weighted = g > 0
        teach[a] = teach[a] + (weighted & a_strong).sum()
        teach[b] = teach[b] + (weighted & ~a_strong).sum()
        slots[a] += y.shape[0]
        slots[b] += y.shape[0]
    return {
        "kd": torch.stack(kds).mean(),
        "rs": torch.stack(rss).mean(),
        "gap": torch.stack(gaps).mean(),
        "teacher": [t / n for t, n in zip(teach, slots, strict=True)],
    }


def mbsd_loss(fused: torch.Tensor, parts: Sequence[torch.Tensor], y: torch.Tensor, variant: str = "distill",
              kd_weight: float = 1.0, rs_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, Any]]:
    """``CE(o) + sum_m CE(z_m) + kd_weight * KD + rs_weight * RS`` and the terms."""
    stats = [modality_stats(z, y) for z in parts]
    terms = mbsd_terms(parts, y, variant, stats)
    loss = F.cross_entropy(fused.float(), y)
    for logp, _, _ in stats:
        loss = loss + F.nll_loss(logp, y)  # CE(z_m), from the log-probabilities already computed
    return loss + kd_weight * terms["kd"] + rs_weight * terms["rs"], terms


# ---- the plugin ----------------------------------------------------------------------------
@register_method(NAME, "MBSD: confidence-gap-weighted self-distillation between modality outputs (BalanceBenchmark)")
class MBSD(Method):
    name = NAME
    description = "MBSD: confidence-gap-weighted self-distillation between modality outputs (BalanceBenchmark)"
    options = OPTIONS
    fusion = "concat"
    min_modalities = 2
    key_diagnostic = "gap"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.variant = str(self._opt("mbsd_variant"))
        self.kd_weight = float(self._opt("mbsd_kd_weight"))
        self.rs_weight = float(self._opt("mbsd_rs_weight"))
        self.modalities: list[str] = []

    def _opt(self, key: str) -> Any:
        """Option value; the declared default when ``cfg`` lacks it (a method built by hand)."""
        return self.cfg.get(key, OPTIONS[key].default)

    def check_modalities(self, available: Sequence[str]) -> list[str]:
        used = super().check_modalities(available)
        if self.variant == "bb" and len(used) > 3:
            raise UnsupportedError(
                f"Method 'mbsd' with mbsd_variant=bb reproduces BalanceBenchmark's loss, which is defined "
                f"for two and three modalities only, but the run has {len(used)} ({', '.join(used)}). "
                f"Use mbsd_variant=distill (any number of modalities) or pick three with --set modalities=a,b,c."
            )
        self.modalities = list(used)
        return used

    def trains_unimodal_heads(self) -> bool:
        return False  # the unimodal CEs sit on the concat head's parts

    def per_modality_source(self) -> str:
        return "fused_parts"

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        assert self.model is not None
        model = self.model
        y = batch["label"]
        feats = model.encode(batch)
        parts = model.fusion.parts(feats)
        ordered = [parts[m] for m in model.modalities]
        loss, terms = mbsd_loss(model.fuse(feats), ordered, y, self.variant, self.kd_weight, self.rs_weight)
        if self.trainer is not None:
            logs: dict[str, Any] = {"kd": terms["kd"].detach(), "rs": terms["rs"].detach(), "gap": terms["gap"]}
            for m, share in zip(model.modalities, terms["teacher"], strict=True):
                logs[f"teacher_{m}"] = share
            self.log(**logs)
        return loss

    def label(self) -> str:
        tags = []
        if self.variant == "bb":
            tags.append("BB loss")
        if self.kd_weight != OPTIONS["mbsd_kd_weight"].default:
            tags.append(f"kd={self.kd_weight:g}")
        if self.rs_weight != OPTIONS["mbsd_rs_weight"].default:
            tags.append(f"rs={self.rs_weight:g}")
        return "MBSD" if not tags else f"MBSD ({', '.join(tags)})"

    def record_info(self) -> dict[str, Any]:
        if self.variant == "distill":
            kd = "gap-weighted KL(p_strong (detached) || p_weak), weights detached"
            rs = "gap-weighted mean squared logit difference"
        else:
            kd = "BalanceBenchmark: gap * w (log w - s) on true-class probabilities, gap in the graph, w clamped at 1e-8 in the log"
            rs = ("gap-weighted squared " + ("probability" if len(self.modalities) >= 3 else "logit")
                  + " difference / C (BalanceBenchmark)")
        return {"variant": self.variant, "distillation": kd, "alignment": rs, "pairs": "all pairs, averaged",
                "weights": {"kd": self.kd_weight, "rs": self.rs_weight}}
