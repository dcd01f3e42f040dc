"""AMCo: Adaptive Mask Co-optimization for modal dependence (Zhou et al., ICASSP 2023).

Full page: ``the documentation's amco page``. Idea (the paper's abstract): a multimodal model leans on
the modality that is easiest to learn (the "dependent" modality) and under-fits the others; an
**adaptive mask** makes the dependent modality harder to learn, so the model has to fit the
others, and **co-optimization** keeps a unimodal objective on every modality so the dependent
one does not degrade. The paper's full text and code were not available; the only code is
BalanceBenchmark's reimplementation (GeWu-Lab/BalanceBenchmark, ``balancemm/trainer/AMCo_trainer.py``
and ``BaseClassifierAMCoModel`` in ``balancemm/models/avclassify_model.py``), which this
module follows where it runs and departs from where it does not (listed below).

Model: the concat head of the suite (its per-modality parts are
``z_m = W_m e_m + b / M``, exactly BalanceBenchmark's) plus one extra ``Linear(C, C)``
``L*`` in ``model.extra["lstar"]`` (BalanceBenchmark's ``linear_star``, default initialisation).

One training step (automatic optimisation; t = the run's optimizer step, 0-based):

1. ``p = ratio(t)``, the mask ratio: ``sin(pi/2 * min(1, t / (eps * T)))`` with T the run's
   total steps (``amco_schedule=global``, default), so the ratio ramps from 0 to 1 over the
   first ``eps`` share of the run and stays at 1.
2. For every modality a keep-mask with exactly ``n_m = floor(p * width_m)`` zeros at random
   positions, one per batch (``amco_mask_scope=batch``, default) or one per sample, drawn from
   a generator seeded from (seed, t), so a resumed run draws the same masks.
3. The modalities flagged dependent at the previous step get their **features** multiplied by
   their mask (``amco_mask_on=features``, default; width = the feature width d_m); the others
   are untouched. ``z_m = parts_m(e~)``; ``o = L*(sum_m z_m)``.
4. ``loss = CE(o, y) + sum_m CE(z_m, y)`` (the co-optimization: every modality, the masked one
   included, keeps its own CE on its part of the fused head).
5. Dependence test, no gradient, fp32: ``mass_m = (1/B) sum_i sum_{c in block m}
   softmax([z_1; ...; z_M])_{i,c}`` (one softmax over all M*C logits of a sample; the masses
   sum to 1); ``d_m = mass_m > sigma`` with ``sigma = 1/M`` by default (0.5 for two
   modalities, BalanceBenchmark's value). The flags take effect at the NEXT step. Several
   modalities may be flagged at once (each then gets its own mask), none is possible.

Inference: no mask. Fused ``L*(sum_m z_m)``; per modality the parts ``z_m`` (L* is not applied
to them; ``per_modality_source() == "method"``). Features come from ``model.encode``, so the
absent-modality diagnostics (Shapley values) work.

Open questions, settled (each a guess, each switchable):

* **What the mask acts on.** The paper says it makes the dependent modality harder to learn;
  BalanceBenchmark's HEAD masks that modality's C logits (after its fused-head part), but an
  earlier BalanceBenchmark version (before commit ``2f2b8b5``) masked its pooled U = 512
  features, and HEAD still reads the unused ``U: 512``. Masking features is our reading of the
  paper (dropping feature channels makes the modality harder to fit; zeroing logits only
  silences it); ``amco_mask_on=logits_bb`` masks the logits instead.
* **The schedule.** BalanceBenchmark restarts the ramp every epoch with a counter that grows by
  epoch/10 per batch, so from epoch 1 on the ratio reaches 1 within four batches and, with
  logit masking, every logit of the dependent modality is zeroed for the rest of the epoch
  (its encoder then gets no gradient at all). We read the sine ramp as a warm-up over the run:
  ``global`` with ``eps`` = 0.3 of the run (BalanceBenchmark's eps value, read as a share).
  ``amco_schedule=per_epoch_bb`` reproduces BalanceBenchmark (eps is then its epsilon in units
  of its counter; the flags are also reset to False at every epoch start, as there).
* **The dependence test.** BalanceBenchmark's mass-share test, on the outputs of the masked
  step (``amco_flag_on=masked``, default, as BalanceBenchmark computes it). Because a masked
  modality's share falls, the flag tends to flip between modalities from one step to the
  next; ``amco_flag_on=clean`` tests the unmasked parts of the same step instead (one more
  small matmul), so a modality that stays dominant stays flagged. sigma = 1/M ("more than an
  equal share"; with sigma = 0.5 three modalities are almost never flagged).
* **Co-optimization** is ``sum_m CE(z_m)`` on the (masked) parts, as BalanceBenchmark trains.
* **Rescaling.** No rescaling of the kept entries (BalanceBenchmark HEAD). The early feature
  version rescaled them by 1/(1 - p) (x10 near p = 1); ``amco_rescale=true`` rescales by the
  exact ``width / (width - n)`` (inverted dropout; the early rule would diverge at p = 1).

Departures from BalanceBenchmark (all but the first switchable):

* Its mask is a (2, C) tensor multiplied into (B, C) logits; on one device this fails for any
  batch size but 1 and 2 (it was written for two-GPU data parallelism, where each replica's
  (1, C) slice broadcasts over its half batch). Here the batch mask is one (1, width) row shared
  by every sample, which is what the two-GPU run computed. Not an option (the original crashes).
* Masks on features, global schedule (above): ``amco_mask_on``, ``amco_schedule``.
* Evaluation: BalanceBenchmark trains on ``CE(L*(sum z))`` but scores ``argmax sum_m z_m`` (its
  evaluation rebuilds the output as the plain sum of parts, so L* reaches no reported number);
  here L* is applied at evaluation too, matching training; ``amco_eval=sum_parts_bb`` scores
  the plain sum. ``amco_lstar=false`` drops L* altogether (the plain concat head).
* The modulation window (``modulation_starts/ends`` 0-80) is not an option: it covers every
  epoch of BalanceBenchmark's runs (30 epochs), so AMCo is always on here.
* BalanceBenchmark calls ``backward`` once per loss term; one backward of the sum here (the
  same gradients).

Refuses: one modality (needs M >= 2). Any M >= 2 works. The fused head is always concat (its
parts are what the method masks and trains).

Cost: no extra pass; per step one C x C linear, M small CEs, one softmax over M*C logits, the
mask draw (M rows of random numbers and an argsort) and an elementwise product per modality.
No host sync: the flags stay on the device and select the mask with ``torch.where``; the mask
ratio and the number of zeros depend only on the step count. About 1.0x joint training.

Diagnostics per step: ``mask_ratio`` (p), ``dependent_<m>`` (1 if m was masked at this step;
its epoch mean is the share of masked steps, the key diagnostic), ``mass_<m>`` (the share that
set the flags for the next step).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.config import Option, Search
from mmbalance.errors import ConfigError
from mmbalance.method import Method, Prediction
from mmbalance.registry import register_method

NAME = "amco"

OPTIONS: dict[str, Option] = {
    "amco_mask_on": Option("features", "what the dependent modality's mask zeroes: its features (our reading "
                           "of the paper) or its fused-head logits (BalanceBenchmark)",
                           choices=("features", "logits_bb")),
    "amco_schedule": Option("global", "mask-ratio ramp sin(pi/2 min(1, t/(eps T))) over the run (global) or "
                            "BalanceBenchmark's ramp restarted every epoch (per_epoch_bb)",
                            choices=("global", "per_epoch_bb")),
    # search range: around BalanceBenchmark's 0.3
    "amco_eps": Option(0.3, "ramp length: share of the run's steps (global) or BalanceBenchmark's epsilon "
                       "in units of its per-epoch counter (per_epoch_bb)", min=0.0, min_open=True, search=Search(0.1, 0.9)),
    "amco_sigma": Option(None, "dependence threshold on a modality's softmax mass share (default 1/M)",
                         type=float, min=0.0, max=1.0, min_open=True, max_open=True),
    "amco_mask_scope": Option("batch", "one random mask per batch shared by its samples, or one per sample",
                              choices=("batch", "sample")),
    "amco_flag_on": Option("masked", "dependence test on this step's masked parts (BalanceBenchmark) or on "
                           "its unmasked parts", choices=("masked", "clean")),
    "amco_rescale": Option(False, "rescale the kept entries by width / (width - n) (inverted dropout)"),
    "amco_lstar": Option(True, "the extra Linear(C, C) on the sum of parts (BalanceBenchmark's linear_star)"),
    "amco_eval": Option("lstar", "evaluation: L*(sum of parts), as trained, or the plain sum of parts "
                        "(what BalanceBenchmark scores)", choices=("lstar", "sum_parts_bb")),
}


# ---- the mathematics (pure functions) ------------------------------------------------------
def ratio_global(step: int, total_steps: int, eps: float) -> float:
    """``sin(pi/2 * min(1, step / (eps * total_steps)))``: 0 at the first step, 1 from
    ``eps * total_steps`` on."""
    ramp = eps * total_steps
    if ramp <= 0:
        return 1.0
    return math.sin(math.pi / 2 * min(1.0, step / ramp))


def ratio_per_epoch_bb(counter: float, eps: float) -> float:
    """BalanceBenchmark's ``sin(pi/2 * min(eps, l) / eps)``; its counter ``l`` starts at 0 each
    epoch and grows by epoch/10 after every batch."""
    return math.sin(math.pi / 2 * min(eps, counter) / eps)


def masked_count(ratio: float, width: int) -> int:
    """Entries zeroed: ``floor(ratio * width)`` (BalanceBenchmark's ``int(pt * n)``)."""
    return min(width, max(0, int(ratio * width)))


def keep_masks(width: int, n: int, rows: int, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """(rows, width) fp32 masks, each row with exactly ``n`` zeros at random positions."""
    keep = torch.ones(rows, width, dtype=torch.float32, device=device)
    scores = torch.rand(rows, width, generator=generator, device=device)
    if n > 0:
        keep.scatter_(1, scores.argsort(dim=1)[:, :n], 0.0)
    return keep


def apply_mask(x: torch.Tensor, keep: torch.Tensor, flagged: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``x * keep * scale`` where ``flagged`` (a 0-d bool tensor), else ``x`` unchanged.

    ``keep`` is (1, width) (one mask for the batch) or (B, width) (one per sample).
    """
    kept = keep * scale if scale != 1.0 else keep
    return x * torch.where(flagged, kept, 1.0).to(x.dtype)


def dependence_masses(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """(M,) fp32: each modality's batch-mean share of one softmax over all M*C logits of a
    sample (the shares sum to 1)."""
    z = torch.stack([p.detach().float() for p in parts], dim=1)  # (B, M, C)
    soft = torch.softmax(z.flatten(1), dim=1).view_as(z)
    return soft.sum(2).mean(0)


def amco_loss(fused: torch.Tensor, parts: Sequence[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """The co-optimised objective ``CE(o) + sum_m CE(z_m)``."""
    loss = F.cross_entropy(fused, y)
    for z in parts:
        loss = loss + F.cross_entropy(z, y)
    return loss


def step_seed(seed: int, step: int) -> int:
    """The mask generator's seed at optimizer step ``step`` (independent of the global RNG)."""
    return (seed * 1_000_003 + step * 7_919 + 0xA3C0) % (2**63 - 1)


# ---- the plugin ----------------------------------------------------------------------------
@register_method(NAME, "AMCo: adaptive mask on the dependent modality + unimodal co-optimization (ICASSP 2023)")
class AMCo(Method):
    name = NAME
    description = "AMCo: adaptive mask on the dependent modality + unimodal co-optimization (ICASSP 2023)"
    options = OPTIONS
    fusion = "concat"
    min_modalities = 2
    key_diagnostic = "dependent_"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.mask_on = str(self._opt("amco_mask_on"))
        self.schedule = str(self._opt("amco_schedule"))
        self.eps = float(self._opt("amco_eps"))
        self.scope = str(self._opt("amco_mask_scope"))
        self.flag_on = str(self._opt("amco_flag_on"))
        self.rescale = bool(self._opt("amco_rescale"))
        self.lstar = bool(self._opt("amco_lstar"))
        self.eval_rule = str(self._opt("amco_eval"))
        if not self.lstar and self.eval_rule != "lstar":
            raise ConfigError(
                "Method 'amco': amco_eval=sum_parts_bb only chooses to leave L* out at evaluation, but "
                "amco_lstar=false builds no L*, so evaluation already scores the plain sum of parts. "
                "Drop amco_eval, or keep L* (amco_lstar=true)."
            )
        self.modalities: list[str] = []
        self.sigma = 0.5
        self.flags: torch.Tensor | None = None  # (M,) bool on the device: masked at the next step
        self.counter = 0.0  # BalanceBenchmark's per-epoch ramp counter (per_epoch_bb)
        self._generator: torch.Generator | None = None

    def _opt(self, key: str) -> Any:
        """Option value; the declared default when ``cfg`` lacks it (a method built by hand)."""
        return self.cfg.get(key, OPTIONS[key].default)

    # ---- set-up ---------------------------------------------------------------------------
    def check_modalities(self, available: Sequence[str]) -> list[str]:
        used = super().check_modalities(available)
        self.modalities = list(used)
        sigma = self._opt("amco_sigma")
        self.sigma = 1.0 / len(used) if sigma is None else float(sigma)
        return used

    def configure_model(self, model: Any) -> None:
        self.modalities = list(model.modalities)
        if self.lstar:
            model.extra["lstar"] = nn.Linear(model.num_classes, model.num_classes)
        self.flags = torch.zeros(len(self.modalities), dtype=torch.bool)

    def on_fit_start(self) -> None:
        if self.flags is not None and self.trainer is not None:
            self.flags = self.flags.to(self.trainer.device)

    def trains_unimodal_heads(self) -> bool:
        return False  # the co-optimised CEs sit on the concat head's parts, not on uni_heads

    def per_modality_source(self) -> str:
        return "method"  # the parts z_m (L* is not applied to them)

    def on_train_epoch_start(self, epoch: int) -> None:
        if self.schedule == "per_epoch_bb":  # BalanceBenchmark resets both every epoch
            self.counter = 0.0
            if self.flags is not None:
                self.flags = torch.zeros_like(self.flags)

    # ---- training -------------------------------------------------------------------------
    def mask_ratio(self) -> float:
        """p of this step (advances BalanceBenchmark's counter in per_epoch_bb)."""
        if self.schedule == "global":
            total = int(self.cfg.get("epochs", 1)) * max(1, self.num_training_batches)
            return ratio_global(self.global_step, total, self.eps)
        p = ratio_per_epoch_bb(self.counter, self.eps)
        self.counter += self.epoch / 10
        return p

    def draw_masks(self, widths: Mapping[str, int], p: float, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        """One keep-mask per modality for this step, from a generator seeded from (seed, step).

        A ratio that masks nothing or everything needs no random draw (the ramp's first step,
        and every step once it has reached 1)."""
        rows = 1 if self.scope == "batch" else batch
        counts = {m: masked_count(p, w) for m, w in widths.items()}
        if all(n in (0, widths[m]) for m, n in counts.items()):
            return {m: torch.full((1, w), float(counts[m] == 0), device=device) for m, w in widths.items()}
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        self._generator.manual_seed(step_seed(int(self.cfg.get("seed", 0)), self.global_step))
        return {m: keep_masks(w, counts[m], rows, self._generator, device) for m, w in widths.items()}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        assert self.model is not None
        model = self.model
        y = batch["label"]
        feats = model.encode(batch)
        device = y.device
        p = self.mask_ratio()
        if self.flags is None or self.flags.device != device:
            self.flags = (self.flags if self.flags is not None
                          else torch.zeros(len(self.modalities), dtype=torch.bool)).to(device)
        flags = self.flags
        on_features = self.mask_on == "features"
        widths = {m: (feats[m].shape[1] if on_features else model.num_classes) for m in self.modalities}
        counts = {m: masked_count(p, w) for m, w in widths.items()}
        active = any(counts.values())  # a zero ratio masks nothing: no mask to draw or apply
        masks = self.draw_masks(widths, p, y.shape[0], device) if active else {}
        scale = {m: (w / (w - counts[m]) if self.rescale and 0 < counts[m] < w else 1.0) for m, w in widths.items()}

        def masked(values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            if not active:
                return dict(values)
            return {m: apply_mask(values[m], masks[m], flags[k], scale[m]) for k, m in enumerate(self.modalities)}

        if on_features:
            parts = model.fusion.parts(masked(feats))
        else:
            clean = model.fusion.parts(feats)
            parts = masked(clean)
        ordered = [parts[m] for m in self.modalities]
        loss = amco_loss(self.fuse_parts(ordered), ordered, y)
        with torch.no_grad():
            if self.flag_on == "clean" and active:
                base = clean if not on_features else model.fusion.parts({m: f.detach() for m, f in feats.items()})
                tested = [base[m] for m in self.modalities]
            else:
                tested = ordered
            masses = dependence_masses(tested)
            self.flags = masses > self.sigma
        if self.trainer is not None:
            logs: dict[str, Any] = {"mask_ratio": p}
            for m, flag, mass in zip(self.modalities, flags.float().unbind(0), masses.unbind(0), strict=True):
                logs[f"dependent_{m}"] = flag
                logs[f"mass_{m}"] = mass
            self.log(**logs)
        return loss

    def fuse_parts(self, parts: Sequence[torch.Tensor], evaluation: bool = False) -> torch.Tensor:
        """``L*(sum_m z_m)``, or the plain sum (no L*, or ``amco_eval=sum_parts_bb`` at evaluation)."""
        total = parts[0]
        for z in parts[1:]:
            total = total + z
        if not self.lstar or (evaluation and self.eval_rule == "sum_parts_bb"):
            return total
        assert self.model is not None
        return self.model.extra["lstar"](total)

    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> Prediction:
        assert self.model is not None
        parts = self.model.fusion.parts(self.model.encode(batch))
        per = {m: parts[m] for m in self.modalities}
        return Prediction(self.fuse_parts(list(per.values()), evaluation=True), per)

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        flags = None if self.flags is None else self.flags.detach().cpu().clone()
        return {"modalities": list(self.modalities), "flags": flags, "counter": self.counter}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if list(state["modalities"]) != self.modalities:
            raise ConfigError(
                f"Method 'amco': the checkpoint holds dependence flags for {list(state['modalities'])}, "
                f"this run has {self.modalities}. Resume with the same modalities, or start fresh."
            )
        dev = self.trainer.device if self.trainer is not None else torch.device("cpu")
        if state["flags"] is not None:
            self.flags = torch.as_tensor(state["flags"]).to(dev, torch.bool)
        self.counter = float(state.get("counter", 0.0))

    # ---- reporting ------------------------------------------------------------------------
    def label(self) -> str:
        tags = []
        if self.mask_on == "logits_bb":
            tags.append("logit mask (BB)")
        if self.schedule == "per_epoch_bb":
            tags.append("per-epoch ramp (BB)")
        if abs(self.eps - float(OPTIONS["amco_eps"].default)) > 1e-12:
            tags.append(f"eps={self.eps:g}")
        if self._opt("amco_sigma") is not None:
            tags.append(f"sigma={float(self._opt('amco_sigma')):g}")
        if self.scope == "sample":
            tags.append("per-sample mask")
        if self.flag_on == "clean":
            tags.append("flags on clean parts")
        if self.rescale:
            tags.append("rescaled")
        if not self.lstar:
            tags.append("no L*")
        if self.eval_rule == "sum_parts_bb":
            tags.append("eval sum of parts (BB)")
        return "AMCo" if not tags else f"AMCo ({', '.join(tags)})"

    def record_info(self) -> dict[str, Any]:
        ramp = (f"sin(pi/2 min(1, t / ({self.eps:g} T))) over the run's T steps" if self.schedule == "global"
                else f"BalanceBenchmark per epoch: sin(pi/2 min({self.eps:g}, l) / {self.eps:g}), l += epoch/10 "
                     f"per batch, flags reset each epoch")
        return {
            "mask_on": "features of the dependent modality" if self.mask_on == "features"
            else "fused-head logits (parts) of the dependent modality",
            "mask_ratio": ramp,
            "mask_scope": f"one mask per {self.scope}",
            "dependence_test": f"softmax mass share of {'masked' if self.flag_on == 'masked' else 'unmasked'} "
                               f"parts > {self.sigma:g}, applied at the next step",
            "inference_rule": "L*(sum of parts)" if self.lstar and self.eval_rule == "lstar" else "sum of parts",
            "per_modality_rule": "the concat head's parts z_m (no L*)",
        }
