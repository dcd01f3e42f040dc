"""AGM: Adaptive Gradient Modulation (Li et al., ICCV 2023).

Documented in the documentation's agm page; official code lihong2303/AGM
(``model/CREMAD_net.py``, ``run/CREMAD_main.py``, ``model/URFunny_net.py``,
``run/URFunny_main.py``). One training step, modalities ``1..M``:

1. encode every modality (train mode): the full coalition's logits ``f(all)``; then, with the
   whole network in eval mode and autograd on, re-encode every proper coalition ``S`` with the
   absent modalities blanked (a blank gives every row the same feature, so one row is encoded
   and expanded): ``f(S)`` is the fused head on ``{m: feature of x_m if m in S else blank}``;
2. Shapley outputs (:func:`shapley_outputs`): ``phi_m = sum_{S not containing m} w(|S|) (f(S+m)
   - f(S))`` with ``w(s) = s! (M-s-1)! / M!`` and, as in the official code, ``f(empty) := 0``, so
   ``sum_m phi_m = f(all)`` exactly (M = 2: ``phi_a = (f(a,v) - f(-,v)) / 2 + f(a,-) / 2``);
3. scores ``S_m`` = batch CE of ``phi_m`` (probability floored at 1e-8), compared with their
   running means ``Sbar_m`` over all previous steps (:func:`agm_coefficients`)::

       r_m    = exp(M/(M-1) * (mean_j S_j    - S_m))          current standing
       rbar_m = exp(M/(M-1) * (mean_j Sbar_j - Sbar_m))       "mono-modal concept"
       k_m    = exp(alpha * min(rbar_m - r_m, cap))

   This is the OFFICIAL sign (``run/CREMAD_main.py``: ``exp(S_v - S_a)``): a modality whose loss is
   lower than usual relative to the others is damped (k < 1), one that lags is boosted.
   BalanceBenchmark's ``AGM_trainer.py`` flips both exponents (it boosts the leader); that is
   available as ``sign=balancebenchmark`` and is off by default. Then ``Sbar`` is updated with
   the current ``S`` (``Sbar_t = Sbar_{t-1} (t-1)/t + S_t / t``, :func:`running_mean_update`);
4. loss = CE of ``z = sum_m g_m(phi_m)``, where ``g_m`` is the identity forward and multiplies
   the incoming gradient by ``k_m`` backward (:class:`ScaleGrad`; the official full backward
   hooks on identity modules). ``z`` equals the full-input fused logits; the scaling reaches the
   fused head and every encoder through every coalition path;
5. after backward, the fused-head clip guard: if any element of the fused head's weight
   gradient leaves ``[-clip_threshold, clip_threshold]``, clip the global gradient norm of the
   whole model to ``clip_threshold`` (done on the device, no host sync).

The coefficients are set only inside the modulation window ``[modulation_start,
modulation_end]`` (0-based epochs, inclusive; default the whole run, the authors' setting);
the running means are updated at every step, as in the official code. Evaluation reports the
fused logits and, per modality, the Shapley output ``phi_m`` (the official test rule).

Departures from the official code (each switchable):

* Coalition passes: by default (``coalitions=reencode``) every proper coalition is re-encoded
  with the whole network in ``eval()`` mode (BN running statistics, no dropout) and autograd on,
  as the official code does; the full-input pass is the step's train-mode one.
  ``coalitions=reuse`` (labelled "reused train-mode coalitions") instead reuses the step's
  train-mode features of the present modalities and only adds one blank row per modality, so
  each modality is encoded once per step. With encoders that have neither BatchNorm nor dropout
  the two compute the same numbers (up to float rounding: the backward sums over other
  graphs); with them, ``reuse`` is another method (batch statistics and dropout masks in every
  coalition). The official computation is the default because a plain "AGM" row must be AGM;
  its cost, measured on an AMD EPYC CPU with AVX512-BF16 (bf16 autocast, channels-last,
  15-batch epochs alternated in one process, min of 4, a busy shared machine): 1.48x the
  ``reuse`` epoch on avdigits (whose audio CNN has BatchNorm), 1.02x on mfeat (MLPs).
* ``after_window=reset`` (default, our choice): outside the window the
  gradient scales are 1. The official code only stops *updating* them, so after the window's
  end backward keeps multiplying by the last values (``after_window=keep``).
* Scores use ``log_softmax`` clamped at ``log(prob_floor)`` instead of ``log(softmax)`` with a
  per-sample branch: the same value where softmax does not underflow. ``prob_floor=0``
  removes the floor (``URFunny_main.py`` has none).
* The clip guard watches every weight matrix of the fused head (ConcatHead: its one Linear,
  as the official ``fusion_module.fc_out``; SumHead: each modality's Linear). ``clip_rule=
  max_only`` reproduces ``MOSEI_main.py``'s mistyped condition ``max > thr and min < thr``.
* Shapley variant ``shapley=exact`` (not official): ``f(empty)`` is subtracted, so the phi's
  sum to ``f(all) - f(empty)``; the loss then uses ``sum_m g_m(phi_m) + f(empty)`` (the empty
  coalition unscaled) so the forward still equals the fused logits.
* The official ``iteration`` counter is ``(epoch - 1) * len(loader) + step + 1``; here the
  step count is kept in the method state, which is the same number (also with
  ``limit_train_batches``) and survives a resume.

Not reproduced: the official repo's test-set model selection and its CREMA-D
per-modality accuracy bug (its ``test()`` counts an audio hit under the visual condition); ``drop_rate`` and ``grad_norm_clip`` are never read by
the official code. The official runs use SGD (momentum 0.9, wd 1e-4); under Adam or
AdamW a per-step gradient scale is largely normalised away, so a warning is issued.
"""

from __future__ import annotations

import itertools
import math
import warnings
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

DEFAULT_ALPHA = 1.0  # the official argparse default; CREMA-D 1.5 (author reply, issue #10)
DEFAULT_CAP = 10.0  # CREMA-D (UR-Funny 7; none on AVE, MOSEI, AV-MNIST)

OPTIONS: dict[str, Option] = {
    # search range: official argparse default 1.0, CREMA-D 1.5 (author reply)
    "alpha": Option(DEFAULT_ALPHA, "modulation strength alpha in k = exp(alpha * min(rbar - r, cap))",
                    type=float, min=0, search=Search(0.1, 3.0)),
    "cap": Option(DEFAULT_CAP, "upper cap on rbar - r inside the exponent (null = no cap)", type=float),
    "modulation_start": Option(0, "first epoch (0-based, inclusive) in which the scales are set", min=0),
    "modulation_end": Option(None, "last epoch (inclusive) in which the scales are set; null = whole run",
                             type=int, min=0),
    "after_window": Option("reset", "outside the window: scales 1 (reset) or the last scales (keep, "
                           "the official code)", choices=("reset", "keep")),
    "sign": Option("official", "official: damp the modality that is ahead (exp(mean S - S_m)); "
                   "balancebenchmark: the reversed exponent of BalanceBenchmark (boosts the leader)",
                   choices=("official", "balancebenchmark")),
    "coalitions": Option("reencode", "coalition features: reencode every coalition in eval mode "
                         "(official), or reuse the step's train-mode features plus one blank row per "
                         "modality (cheaper; differs on BatchNorm/dropout encoders)",
                         choices=("reencode", "reuse")),
    "shapley": Option("official", "official: f(empty) taken as 0 (phis sum to f(all)); exact: true "
                      "Shapley values (phis sum to f(all) - f(empty))", choices=("official", "exact")),
    "prob_floor": Option(1e-8, "floor on the true-class probability in the scores (0 = none)",
                         type=float, min=0, max=1, max_open=True),
    "clip_threshold": Option(1.0, "fused-head clip guard: if a fused-head weight gradient leaves "
                             "[-t, t], clip the global grad norm to t (null = off; UR-Funny 5)",
                             type=float, min=0, min_open=True),
    "clip_rule": Option("abs", "abs: max > t or min < -t (official); max_only: max > t and min < t "
                        "(MOSEI_main.py's typo)", choices=("abs", "max_only")),
    "head": Option("concat", "fused head: concat (the official CREMA-D late fusion) or sum",
                   choices=("concat", "sum")),
    "per_modality": Option("shapley", "per-modality logits in evaluation: the Shapley outputs "
                           "(official) or the fused head's parts", choices=("shapley", "fused_parts")),
}


# ---- pure math ------------------------------------------------------------------------------
def coalitions(modalities: Sequence[str]) -> list[frozenset[str]]:
    """Every subset of the modalities, the empty one first and the full set last."""
    mods = list(modalities)
    return [frozenset(c) for r in range(len(mods) + 1) for c in itertools.combinations(mods, r)]


def shapley_weight(size: int, n: int) -> float:
    """Weight of a coalition of ``size`` players (not containing m) among ``n``: s!(n-s-1)!/n!."""
    return math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)


def shapley_outputs(
    values: Mapping[frozenset[str], torch.Tensor], modalities: Sequence[str], exact: bool = False
) -> dict[str, torch.Tensor]:
    """Shapley output of every modality from the coalition outputs ``values[S] = f(S)``.

    ``exact=False`` is the official form: the empty coalition counts as 0 (it need not be in
    ``values``), so the outputs sum to ``f(all)``. ``exact=True`` uses ``values[empty]``: the
    outputs sum to ``f(all) - f(empty)`` (each is the official one minus ``f(empty) / M``).
    """
    mods = list(modalities)
    n = len(mods)
    empty = frozenset()

    def f(s: frozenset[str]) -> torch.Tensor | None:
        if s == empty and not exact:
            return None
        return values[s]

    out: dict[str, torch.Tensor] = {}
    for m in mods:
        others = [o for o in mods if o != m]
        total: torch.Tensor | None = None
        for r in range(n):
            w = shapley_weight(r, n)
            for c in itertools.combinations(others, r):
                s = frozenset(c)
                with_m, without = values[s | {m}], f(s)
                term = w * (with_m if without is None else with_m - without)
                total = term if total is None else total + term
        assert total is not None
        out[m] = total
    return out


def unimodal_scores(phis: torch.Tensor, y: torch.Tensor, prob_floor: float = 1e-8) -> torch.Tensor:
    """``S_m = -(1/B) sum_i log max(p(phi_m)_i[y_i], floor)`` for stacked logits ``(M, B, C)``.

    fp32, detached: the scores only set the coefficients.
    """
    logp = F.log_softmax(phis.detach().float(), dim=-1)
    idx = y.view(1, -1, 1).expand(phis.shape[0], -1, 1)
    true = logp.gather(-1, idx).squeeze(-1)  # (M, B)
    if prob_floor > 0:
        true = true.clamp(min=math.log(prob_floor))
    return -true.mean(-1)


def agm_coefficients(
    scores: torch.Tensor,
    running: torch.Tensor,
    alpha: float,
    cap: float | None,
    sign: str = "official",
) -> torch.Tensor:
    """``k_m = exp(alpha * min(rbar_m - r_m, cap))`` from the scores and their running means.

    ``r_m = exp(s * M/(M-1) * (mean S - S_m))``, ``rbar_m`` likewise from the running means,
    with ``s = +1`` (official: the modality ahead is damped) or ``s = -1`` (BalanceBenchmark).
    """
    if sign not in ("official", "balancebenchmark"):
        raise ValueError(f"unknown sign {sign!r}")
    scores, running = scores.float(), running.float()
    n = scores.shape[0]
    c = (1.0 if sign == "official" else -1.0) * n / (n - 1)
    r = torch.exp(c * (scores.mean() - scores))
    rbar = torch.exp(c * (running.mean() - running))
    diff = rbar - r
    if cap is not None:
        diff = diff.clamp(max=cap)
    return torch.exp(alpha * diff)


def running_mean_update(running: torch.Tensor, scores: torch.Tensor, step: int) -> torch.Tensor:
    """Cumulative mean after the ``step``-th value (1-based): ``Sbar (t-1)/t + S/t``."""
    if step < 1:
        raise ValueError("step counts from 1")
    return running * ((step - 1) / step) + scores.float() / step


class ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``k`` (a 0-d tensor)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(k)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (k,) = ctx.saved_tensors
        return grad * k.to(grad.dtype), None


def modulated_output(phis: Mapping[str, torch.Tensor], coefs: torch.Tensor, modalities: Sequence[str]) -> torch.Tensor:
    """``sum_m g_m(phi_m)``: equal to ``sum_m phi_m`` forward, gradient of ``phi_m`` times ``k_m``."""
    parts = [ScaleGrad.apply(phis[m], coefs[i].detach()) for i, m in enumerate(modalities)]
    return torch.stack(parts).sum(0)


def clip_guard_(
    head_weight_grads: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    threshold: float,
    rule: str = "abs",
) -> torch.Tensor:
    """The official guard, on the device: when a fused-head weight gradient leaves
    ``[-t, t]`` (``rule=abs``; ``max_only``: ``max > t and min < t``), scale ``grads`` in place
    as ``clip_grad_norm_(max_norm=t)`` does. Returns whether it fired (0-d bool tensor)."""
    gmax = torch.stack([g.detach().float().amax() for g in head_weight_grads]).amax()
    gmin = torch.stack([g.detach().float().amin() for g in head_weight_grads]).amin()
    fired = (gmax > threshold) | (gmin < -threshold) if rule == "abs" else (gmax > threshold) & (gmin < threshold)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))
    coef = torch.clamp(threshold / (norm + 1e-6), max=1.0)
    coef = torch.where(fired, coef, torch.ones_like(coef))
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return fired


# ---- the plugin -----------------------------------------------------------------------------
@register_method("agm", "AGM: Shapley-output gradient modulation against the mono-modal concept (ICCV 2023)")
class AGM(Method):
    name = "agm"
    description = "AGM: Shapley-output gradient modulation against the mono-modal concept (ICCV 2023)"
    options = OPTIONS
    fusion = "concat"
    # The authors' values per dataset (lihong2303/AGM issue #10, the documentation's agm page): CREMA-D alpha 1.5, cap 10, clip 1.
    dataset_defaults = {"cremad": {"alpha": 1.5, "cap": 10.0, "clip_threshold": 1.0}}
    key_diagnostic = None  # set per run: "coef_<first modality>"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        start, end = int(self._opt("modulation_start")), self._opt("modulation_end")
        if end is not None and int(end) < start:
            raise ConfigError(
                f"Method 'agm': the modulation window ends (modulation_end={end}) before it starts "
                f"(modulation_start={start}). Set modulation_end >= modulation_start, or null for "
                f"the whole run."
            )
        self.alpha = float(self._opt("alpha"))
        cap = self._opt("cap")
        self.cap = None if cap is None else float(cap)
        self.start, self.end = start, (None if end is None else int(end))
        self.modalities: list[str] = []
        self.running: torch.Tensor | None = None  # Sbar_m, fp32 on the device
        self.last_coef: torch.Tensor | None = None  # k of the last step inside the window
        self.steps = 0  # score updates so far (the official 'iteration' of the last step)
        self._active = False
        self._pending_state: Mapping[str, Any] | None = None
        if cfg.get("optimizer") in ("adam", "adamw"):
            warnings.warn(
                f"Method 'agm' scales gradients; under {cfg['optimizer']} a per-step scale is largely "
                f"normalised away (the documentation's agm page). The official runs use SGD: --set optimizer=sgd.",
                stacklevel=2,
            )

    def _opt(self, key: str) -> Any:
        return self.cfg.get(key, OPTIONS[key].default)

    # ---- set-up ---------------------------------------------------------------------------
    def check_modalities(self, available: Sequence[str]) -> list[str]:
        used = super().check_modalities(available)
        self.modalities = list(used)
        self.key_diagnostic = f"coef_{used[0]}"
        return used

    def build_fusion(self, dims: Mapping[str, int], num_classes: int) -> nn.Module:
        self.modalities = list(dims)
        self.key_diagnostic = f"coef_{self.modalities[0]}"
        return build_head(self._opt("head"), dims, num_classes)

    def per_modality_source(self) -> str:
        return "method" if self._opt("per_modality") == "shapley" else "fused_parts"

    def _state_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The running means and last scales, created on the run's device on first use."""
        if self.running is None or self.last_coef is None:
            dev = self.trainer.device if self.trainer is not None else torch.device("cpu")
            self.running = torch.zeros(len(self.modalities), device=dev)
            self.last_coef = torch.ones(len(self.modalities), device=dev)
        return self.running, self.last_coef

    # ---- loop hooks -----------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self._pending_state is not None:
            pending, self._pending_state = self._pending_state, None
            self.load_state_dict(pending)
        self._state_tensors()

    def on_train_epoch_start(self, epoch: int) -> None:
        self._active = self.in_window(epoch)

    def in_window(self, epoch: int) -> bool:
        return self.start <= epoch and (self.end is None or epoch <= self.end)

    def coalition_logits(self, batch: Mapping[str, Any], feats: Mapping[str, torch.Tensor]) -> dict[frozenset[str], torch.Tensor]:
        """``f(S)`` for every coalition the Shapley outputs need (fp32 logits).

        ``reuse``: the fused head on the step's features, absent modalities replaced by their
        blank feature (one encoded row each, eval mode, autograd on). ``reencode``: the whole
        model in eval mode re-encodes every proper coalition, as the official code does.
        """
        assert self.model is not None
        model, mods = self.model, self.modalities
        exact = self._opt("shapley") == "exact"
        full = frozenset(mods)
        wanted = [s for s in coalitions(mods) if s or exact]
        out: dict[frozenset[str], torch.Tensor] = {full: model.fuse(feats).float()}
        if self._opt("coalitions") == "reencode" and model.training:
            model.eval()
            try:
                for s in wanted:
                    if s != full:
                        out[s] = model.fuse(model.encode(batch, drop=full - s)).float()
            finally:
                model.train()
            return out
        n = next(iter(feats.values())).shape[0]
        blank = {m: model.blank_feature(m, batch[m]) for m in mods}
        for s in wanted:
            if s == full:
                continue
            if not s:  # every row is the same: fuse one row and expand
                row = model.fuse({m: blank[m] for m in mods}).float()
                out[s] = row.expand(n, -1)
                continue
            mixed = {m: feats[m] if m in s else blank[m].expand(n, *blank[m].shape[1:]) for m in mods}
            out[s] = model.fuse(mixed).float()
        return out

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        assert self.model is not None
        mods = self.modalities
        y = batch["label"]
        feats = self.model.encode(batch)
        values = self.coalition_logits(batch, feats)
        exact = self._opt("shapley") == "exact"
        phis = shapley_outputs(values, mods, exact=exact)
        stacked = torch.stack([phis[m].detach() for m in mods])  # (M, B, C)
        scores = unimodal_scores(stacked, y, float(self._opt("prob_floor")))
        running, last = self._state_tensors()
        with torch.no_grad():
            if self._active:
                coef = agm_coefficients(scores, running, self.alpha, self.cap, self._opt("sign"))
                self.last_coef = coef
            elif self._opt("after_window") == "keep":
                coef = last  # the official hooks keep the last scales (1 before the window)
            else:
                coef = torch.ones_like(scores)
            self.steps += 1
            self.running = running_mean_update(running, scores, self.steps)
        z = modulated_output(phis, coef, mods)
        if exact:
            z = z + values[frozenset()]
        loss = F.cross_entropy(z, y)
        if self.trainer is not None:
            logs: dict[str, torch.Tensor] = {}
            true = stacked.float().gather(-1, y.view(1, -1, 1).expand(len(mods), -1, 1)).squeeze(-1).mean(-1)
            for i, m in enumerate(mods):
                logs[f"coef_{m}"] = coef[i]
                logs[f"score_{m}"] = scores[i]
                logs[f"concept_{m}"] = self.running[i]
                logs[f"shapley_{m}"] = true[i]  # mean true-class Shapley logit
            self.log(**logs)
        return loss

    def on_after_backward(self) -> None:
        threshold = self._opt("clip_threshold")
        if threshold is None:
            return
        assert self.model is not None
        head = [p.grad for p in self.model.fusion_params() if p.grad is not None and p.dim() >= 2]
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not head:
            return
        fired = clip_guard_(head, grads, float(threshold), self._opt("clip_rule"))
        if self.trainer is not None:
            self.log(clip_fired=fired.float())

    # ---- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> Prediction:
        """Fused logits; per modality the Shapley outputs (official test rule) or head parts.

        In eval mode reusing the features is exactly the official masked-pass computation."""
        assert self.model is not None
        feats = self.model.encode(batch)
        if self._opt("per_modality") == "fused_parts":
            return Prediction(self.model.fuse(feats), self.model.fusion.parts(feats))
        values = self.coalition_logits(batch, feats)
        phis = shapley_outputs(values, self.modalities, exact=self._opt("shapley") == "exact")
        return Prediction(values[frozenset(self.modalities)], phis)

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.running is None or self.last_coef is None:
            return dict(self._pending_state or {})
        return {
            "modalities": list(self.modalities),
            "running": self.running.detach().cpu().clone(),
            "last_coef": self.last_coef.detach().cpu().clone(),
            "steps": int(self.steps),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if not self.modalities:
            self._pending_state = state
            return
        if list(state["modalities"]) != self.modalities:
            raise ConfigError(
                f"Method 'agm': the checkpoint holds running scores for the modalities "
                f"{list(state['modalities'])}, but this run has {self.modalities}. Resume with "
                f"the same modalities, or start fresh."
            )
        dev = self.trainer.device if self.trainer is not None else torch.device("cpu")
        self.running = torch.as_tensor(state["running"], dtype=torch.float32).to(dev)
        self.last_coef = torch.as_tensor(state["last_coef"], dtype=torch.float32).to(dev)
        self.steps = int(state["steps"])

    # ---- reporting ------------------------------------------------------------------------
    def _paper(self, key: str) -> Any:
        return self.dataset_defaults.get(self.cfg.get("dataset") or "", {}).get(key, OPTIONS[key].default)

    def label(self) -> str:
        tags = []
        if self.alpha != float(self._paper("alpha")):
            tags.append(f"alpha={self.alpha:g}")
        if self._opt("sign") == "balancebenchmark":
            tags.append("BalanceBenchmark sign")
        if self._opt("coalitions") == "reuse":
            tags.append("reused train-mode coalitions")
        if self._opt("shapley") == "exact":
            tags.append("exact Shapley")
        if self._opt("after_window") == "keep":
            tags.append("scales kept after window")
        if self.start != 0 or self.end is not None:
            tags.append(f"window {self.start}-{'end' if self.end is None else self.end}")
        if self._opt("clip_threshold") is None:
            tags.append("no clip guard")
        return "AGM" if not tags else f"AGM ({', '.join(tags)})"

    def record_info(self) -> dict[str, Any]:
        return {
            "sign": self._opt("sign"),
            "coalitions": self._opt("coalitions"),
            "shapley": self._opt("shapley"),
            "per_modality_rule": (
                "Shapley outputs of the coalition passes (official)"
                if self._opt("per_modality") == "shapley" else "fused head parts"
            ),
            "modality_order": list(self.modalities),
        }
