"""InfoReg: information acquisition regulation (Huang, Wei, Yang, Hu, CVPR 2025).

Docs page: ``the documentation's inforeg page``. Official code: GeWu-Lab/InfoReg_CVPR2025, ``main.py``
(``train_epoch``); the November 2025 version (commit ``939b2ed``) and the March 2025 one
(``775bde4``) differ in the rule, and both are reachable here (``rule``).

**Idea.** Early training (the *prime learning window*) is when a network acquires most of what it
will learn; an information-rich modality dominates that window and starves the others. InfoReg
slows the dominant modality down while its window is open, by pulling its encoder towards the
weights it had at the start of the epoch (a proximal term).

**Rule** (per epoch e, 0-based; modalities m = 1..M in the run's order):

* Epoch start: anchor ``theta0_m <- theta_m`` for every encoder that may be regulated; window
  score ``k_m`` from the Fisher-trace history x_0, x_1, ... of the modality whose trace opens m's
  window (:func:`window_score`): ``k = 1`` at e = 0, else, with the history pre-padded by W zeros
  (W = ``window_epochs``, official 10), ``k = (mean(last W) - mean(the W before the last)) /
  mean(last W) = (x_{e-1} - x_{e-1-W}) / sum_{j=e-W}^{e-1} x_j``, the relative change of the
  W-epoch moving sum. The window of m is open while ``k > threshold``.
* Each step: ``L = CE(o) + sum_m CE(z_m)``, o the fused logits, z_m the fused head's part of m
  (``W_m e_m + b / M``; this is the November code's ``W[:, block] e + b/2`` at M = 2).
  Confidence scores ``S_m = sum_i softmax(z_m)_i[y_i]`` (detached, fp32; ``score_reduction``).
  The dominant modality u = argmax S_m, with gap ``D = S_u - max_{m != u} S_m``, gets
  ``beta_u = c_u * exp(tanh(D))`` if D > 0, u may be regulated and u's window is open; every
  other modality gets 0 (a tie regulates nobody).
* Between backward and step (``on_after_backward``): ``grad(p) += beta_m * (p - theta0_m[p])``
  for every parameter p of encoder m (conv kernels, BN affine, biases, the projection; never a
  head), then ``F[l] += grad(W_l)^2`` for the weight W_l of every Conv/Linear layer of the traced
  encoders: the empirical Fisher of the batch-mean loss, of the *regulated* gradient, as in the
  official code. The trainer's gradient clipping (off by default, as officially) comes after.
* Epoch end: ``x_e = sum_l mean(F[l])`` is appended to that modality's history.

**Rules** (option ``rule``; each sets which modalities may be regulated, their c_m, whose trace
opens which window and the default threshold):

* ``intended`` (default): the paper's rule for every modality (and any M >= 2): whichever modality
  dominates is regulated with ``c = beta_scale`` (0.95), its window read from its own Fisher
  trace (``trace_source=own``).
* ``november`` (``939b2ed``, M = 2): the audio modality (the one named ``audio``; the first of
  the run's order when none is) gets ``c = beta_scale`` (0.95), the other ``c = beta_other`` (0.1);
  both windows are read from the audio trace; threshold 0.05.
* ``march`` (``775bde4``, M = 2): only audio can be regulated (the release's ``elif`` repeats
  its ``if`` with the operands swapped, so the branch for the other modality never runs); audio
  trace; threshold 0.04; the unimodal CEs and the scores come from separate unimodal heads (the
  model's ``uni_heads``), which then also give the per-modality accuracy.

**Open questions, settled.**

1. *Batch sum or mean in the scores; a window per modality?* Both releases sum over the batch
   (the notation of OGM-GE, from the same lab). With 64 samples |D| is usually several units, so
   tanh saturates and beta is about ``c * e`` (2.58) whenever the window is open: the adaptive
   coefficient is nearly a constant. We keep the sum by default, under its name
   (``score_reduction=sum``), because it is what every released run used; ``mean`` makes
   D lie in [-1, 1] and beta really adaptive. The releases detect the window on the audio trace
   only, also for visual; the paper describes regulating a modality during *its* information
   acquisition, so the intended rule reads each modality's window from its own trace
   (``trace_source=own``); ``trace_source=anchor`` is the releases' reading.
2. *March or November numbers in the paper?* The sources cannot say. The March code was the one
   public when the paper appeared, but it can only ever regulate audio. The default is neither
   release: it is the rule the paper describes, and both releases are options
   (``rule=march``, ``rule=november``), so either can be reported under its own label.

**Departures from the official code** (none changes the rule):

* The three extra backward passes per step that only feed tensorboard, the per-sample Python
  loop for the scores and the O(P^2) parameter identity search are not reproduced (the update is
  the same). The anchors are copies of the encoders only, not of the whole model.
* The traced layers are the Conv1d/2d/3d and Linear weights of the encoder (official: Conv2d and
  Linear of the ResNet-18, which has no Linear); the suite's encoders include their projection
  Linear. An encoder without such a layer is refused.
* A window whose moving sum is zero (no gradient at all for W epochs) counts as closed; the
  official code divides by zero there.
* beta is computed without a graph, in fp32, on the device (no host sync per step).
* Selection: the official scripts keep the best *test* epoch; the suite selects on validation.
* The March release evaluated per-modality accuracy with slices of a layer its forward never
  calls (untrained weights); here ``rule=march`` reports its trained unimodal heads.
* Recipes: the official 50 epochs, SGD lr 0.002, StepLR 30 (March: 80 / 40) are CREMA-D/KS
  settings; the suite's dataset recipes apply.

**Refuses**: ``rule=november`` / ``march`` with other than two modalities (a two-way rule), and
encoders with no Conv/Linear weight to trace.

**State**: the Fisher-trace history of every traced modality (checkpointed). The anchors are
rebuilt at every epoch start and the accumulators reset there, so a resume at an epoch boundary
needs nothing else.

**Cost**: one plain step (no extra forward or backward), plus per step one element-wise
square-and-add over the traced Conv/Linear weights, and, while a window is open, one
subtract-multiply-add over the regulated encoders' parameters; one encoder copy per epoch.
Measured (``benchmarks/bench_methods.py``, AMD EPYC with AVX512-BF16, shared machine): 1.06x
joint training with unimodal CEs on avdigits; 1.49x on synthetic, whose sub-millisecond steps
make the fixed per-step work (about 100 us of small kernels) visible.

**Diagnostics**: per step ``beta`` (the applied coefficient; key diagnostic), ``beta_<m>``,
``score_<m>``; per epoch ``window_k_<m>``, ``window_open_<m>`` and ``fisher_trace_<m>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.config import Option, Search
from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.method import Method
from mmbalance.registry import register_method

NAME = "inforeg"
RULES = ("intended", "november", "march")
RULE_THRESHOLD = {"intended": 0.05, "november": 0.05, "march": 0.04}
RULE_TRACE = {"intended": "own", "november": "anchor", "march": "anchor"}
RULE_LABEL = {"intended": "InfoReg", "november": "InfoReg (Nov 2025 code)", "march": "InfoReg (Mar 2025 code)"}
TRACED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

OPTIONS: dict[str, Option] = {
    "rule": Option("intended", "intended: the dominant modality, any of M, with its own window; "
                   "november / march: the two released versions (audio-keyed, M = 2)", choices=RULES),
    # search range: around the released 0.95
    "beta_scale": Option(0.95, "c in beta = c * exp(tanh(gap)): every modality (intended), the audio "
                         "modality (november, march)", type=float, min=0, search=Search(0.1, 2.0)),
    "beta_other": Option(0.1, "c of the non-audio modality (rule=november only)", type=float, min=0),
    "threshold": Option(None, "the window is open while k > threshold; default: the rule's "
                        "(0.05; march 0.04)", type=float),
    "window_epochs": Option(10, "W: epochs of the moving sum of the Fisher trace (history pre-padded "
                            "with W zeros, as officially)", min=1),
    "score_reduction": Option("sum", "confidence score over the batch: sum (official; saturates tanh, "
                              "beta ~ c*e) or mean", choices=("sum", "mean")),
    "trace_source": Option(None, "whose Fisher trace opens a modality's window: own, or anchor (audio, "
                           "else the first); default: the rule's (intended own, releases anchor)",
                           choices=("own", "anchor")),
}


# ---- pure mathematics --------------------------------------------------------------------------
def window_score(trace: Sequence[float], length: int = 10) -> float:
    """k at the start of the epoch that follows the ``len(trace)`` finished epochs.

    The history is pre-padded with ``length`` zeros (official), so in the first ``length``
    epochs k is the newest trace's share of the sum so far (1/e for a flat trace) and it drops
    to about 0 one epoch later. Epoch 0 (no trace yet) is open by definition: k = 1. A zero
    moving sum counts as closed (k = 0).
    """
    if not trace:
        return 1.0
    padded = [0.0] * length + [float(x) for x in trace]
    newest = sum(padded[-length:]) / length
    previous = sum(padded[-length - 1 : -1]) / length
    if newest == 0.0:
        return 0.0
    return (newest - previous) / newest


def fisher_trace(accumulators: Sequence[torch.Tensor]) -> float:
    """``sum_l mean(F_l)``: the trace of the diagonal empirical Fisher per element, summed over
    layers, as one float (one host sync, once per epoch)."""
    if not accumulators:
        return 0.0
    return float(torch.stack([f.float().mean() for f in accumulators]).double().sum())


def confidence_scores(logits: Sequence[torch.Tensor], y: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """``S_m = sum_i softmax(z_m)_i[y_i]`` (or the mean) per modality: an fp32 (M,) tensor."""
    z = torch.stack([t.detach().float() for t in logits])  # (M, B, C)
    index = y.long().view(1, -1, 1).expand(z.shape[0], -1, 1)
    p = torch.softmax(z, dim=2).gather(2, index).squeeze(2)  # (M, B)
    return p.sum(1) if reduction == "sum" else p.mean(1)


def regulation_betas(scores: torch.Tensor, coeffs: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """beta per modality: ``c_u * exp(tanh(S_u - max_{m != u} S_m))`` for the dominant u when the
    gap is positive and ``gate[u]`` (u may be regulated and its window is open), else 0.

    ``scores``, ``coeffs``: (M,) fp32; ``gate``: (M,) bool. A tie for the top regulates nobody.
    """
    best, second = torch.topk(scores, 2).values.unbind(0)
    gap = best - second
    active = (scores == best) & gate & (gap > 0)  # a unique maximum when gap > 0
    return torch.where(active, coeffs * torch.exp(torch.tanh(gap)), 0.0)


def add_proximal_(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                  anchors: Sequence[torch.Tensor], beta: torch.Tensor) -> None:
    """In place ``g += beta * (p - p0)``: the gradient of ``beta/2 * ||theta - theta0||^2``."""
    if not grads:
        return
    diffs = torch._foreach_sub(list(params), list(anchors))
    torch._foreach_mul_(diffs, beta)
    torch._foreach_add_(list(grads), diffs)


def accumulate_fisher_(accumulators: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """In place ``F += g * g`` (element-wise squared mini-batch gradient)."""
    if accumulators:
        torch._foreach_addcmul_(list(accumulators), list(grads), list(grads))


def traced_weights(encoder: nn.Module) -> list[nn.Parameter]:
    """The weights whose squared gradients make the Fisher trace: every Conv/Linear layer's."""
    return [mod.weight for mod in encoder.modules()
            if isinstance(mod, TRACED_LAYERS) and mod.weight is not None and mod.weight.requires_grad]


def anchor_modality(modalities: Sequence[str]) -> str:
    """The releases' reference modality: the one named audio, else the first (the documentation's inforeg page)."""
    return "audio" if "audio" in modalities else modalities[0]


# ---- the plugin --------------------------------------------------------------------------------
@register_method(NAME, "InfoReg: proximal slow-down of the dominant modality in its prime learning window (CVPR 2025)")
class InfoReg(Method):
    name = NAME
    description = "InfoReg: proximal slow-down of the dominant modality in its prime learning window (CVPR 2025)"
    options = OPTIONS
    fusion = "concat"
    min_modalities = 2
    key_diagnostic = "beta"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.rule = str(self._opt("rule"))
        threshold = self._opt("threshold")
        self.threshold = RULE_THRESHOLD[self.rule] if threshold is None else float(threshold)
        trace = self._opt("trace_source")
        self.trace_source = RULE_TRACE[self.rule] if trace is None else str(trace)
        self.beta_scale = float(self._opt("beta_scale"))
        self.beta_other = float(self._opt("beta_other"))
        self.window = int(self._opt("window_epochs"))
        self.reduction = str(self._opt("score_reduction"))
        self.modalities: list[str] = []
        self.anchor = ""
        self.traces: dict[str, list[float]] = {}  # finished epochs' Fisher traces (no padding)
        self._anchors: dict[str, list[torch.Tensor]] = {}
        self._fisher: dict[str, list[torch.Tensor]] = {}
        self._gate: dict[str, bool] = {}
        self._params: dict[str, list[nn.Parameter]] = {}  # per epoch: regulated encoders' parameters
        self._weights: dict[str, list[nn.Parameter]] = {}  # per epoch: traced Conv/Linear weights
        self._gate_tensor: torch.Tensor | None = None
        self._coeffs: torch.Tensor | None = None
        self._betas: torch.Tensor | None = None

    def _opt(self, key: str) -> Any:
        """Option value; the declared default when ``cfg`` lacks it (a method built by hand)."""
        return self.cfg.get(key, OPTIONS[key].default)

    # ---- declarations / set-up ------------------------------------------------------------
    def check_modalities(self, available: Sequence[str]) -> list[str]:
        if self.rule != "intended" and len(available) != 2:
            raise UnsupportedError(
                f"Method 'inforeg' with rule={self.rule} is the released two-modality code (audio "
                f"against the other modality), but the run has {len(available)} modalities "
                f"({', '.join(available)}). Use rule=intended (any number of modalities) or pick two "
                f"with --set modalities=a,b."
            )
        self._set_modalities(super().check_modalities(available))
        return self.modalities

    def _set_modalities(self, modalities: Sequence[str]) -> None:
        self.modalities = list(modalities)
        self.anchor = anchor_modality(self.modalities)

    def trains_unimodal_heads(self) -> bool:
        return self.rule == "march"

    def per_modality_source(self) -> str:
        return "unimodal_heads" if self.rule == "march" else "fused_parts"

    def regulated(self) -> list[str]:
        """Modalities the rule may regulate."""
        return [self.anchor] if self.rule == "march" else list(self.modalities)

    def trace_of(self, m: str) -> str:
        """The modality whose Fisher trace opens m's window."""
        return m if self.trace_source == "own" else self.anchor

    def traced(self) -> list[str]:
        return sorted({self.trace_of(m) for m in self.regulated()}, key=self.modalities.index)

    def coefficients(self) -> list[float]:
        """c_m per modality in the run's order (0 for modalities the rule never regulates)."""
        out = []
        for m in self.modalities:
            if m not in self.regulated():
                out.append(0.0)
            elif self.rule == "november" and m != self.anchor:
                out.append(self.beta_other)
            else:
                out.append(self.beta_scale)
        return out

    def configure_model(self, model: Any) -> None:
        self._set_modalities(model.modalities)

    def on_fit_start(self) -> None:
        assert self.model is not None
        for m in self.traced():
            if not traced_weights(self.model.encoders[m]):
                raise UnsupportedError(
                    f"Method 'inforeg' traces the Fisher information of the Conv/Linear weights of "
                    f"encoder '{m}', which has none ({type(self.model.encoders[m]).__name__}). Use a "
                    f"backbone with convolution or linear layers for {m}, or --set trace_source=anchor."
                )

    # ---- epoch hooks ----------------------------------------------------------------------
    def on_train_epoch_start(self, epoch: int) -> None:
        assert self.model is not None
        self._gate = {}
        logs: dict[str, float] = {}
        for m in self.traced():
            k = window_score(self.traces.get(m, []), self.window)
            logs[f"window_k_{m}"] = k
            logs[f"window_open_{m}"] = float(k > self.threshold)
        for m in self.regulated():
            self._gate[m] = logs[f"window_open_{self.trace_of(m)}"] > 0
        self._params = {m: [p for p in self.model.encoder_params(m) if p.requires_grad]
                        for m in self.regulated() if self._gate[m]}
        self._anchors = {m: [p.detach().clone() for p in ps] for m, ps in self._params.items()}
        self._weights = {m: traced_weights(self.model.encoders[m]) for m in self.traced()}
        self._fisher = {m: [torch.zeros_like(w, dtype=torch.float32) for w in ws] for m, ws in self._weights.items()}
        device = next(self.model.parameters()).device
        self._gate_tensor = torch.tensor([self._gate.get(m, False) for m in self.modalities], device=device)
        self._coeffs = torch.tensor(self.coefficients(), dtype=torch.float32, device=device)
        if self.trainer is not None:
            self.log(**logs)

    def on_train_epoch_end(self, epoch: int) -> None:
        logs = {}
        for m, acc in self._fisher.items():
            x = fisher_trace(acc)
            self.traces.setdefault(m, []).append(x)
            logs[f"fisher_trace_{m}"] = x
        self._fisher, self._weights, self._anchors, self._params = {}, {}, {}, {}
        if self.trainer is not None:
            self.log(**logs)

    # ---- training -------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        assert self.model is not None
        if self._coeffs is None or self._gate_tensor is None:
            raise RuntimeError("Method 'inforeg': on_train_epoch_start must run before a training step.")
        model = self.model
        feats = model.encode(batch)
        y = batch["label"]
        loss = F.cross_entropy(model.fuse(feats), y)
        uni = model.unimodal_logits(feats) if self.rule == "march" else model.fusion.parts(feats)
        for m in self.modalities:
            loss = loss + F.cross_entropy(uni[m], y)
        with torch.no_grad():
            scores = confidence_scores(self._score_logits(feats, uni), y, self.reduction)
            self._betas = regulation_betas(scores, self._coeffs, self._gate_tensor)
        if self.trainer is not None:
            self.log(beta=self._betas.sum(), **{f"beta_{m}": b for m, b in zip(self.modalities, self._betas, strict=True)},
                     **{f"score_{m}": s for m, s in zip(self.modalities, scores, strict=True)})
        return loss

    def _score_logits(self, feats: Mapping[str, torch.Tensor], uni: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The logits the scores come from, in fp32: the training logits themselves, or under
        autocast recomputed from detached fp32 features (so bf16 does not round the scores)."""
        assert self.model is not None
        device = next(iter(feats.values())).device
        if not torch.is_autocast_enabled(device.type):
            return [uni[m] for m in self.modalities]
        detached = {m: f.detach().float() for m, f in feats.items()}
        with torch.autocast(device_type=device.type, enabled=False):
            out = (self.model.unimodal_logits(detached) if self.rule == "march"
                   else self.model.fusion.parts(detached))
        return [out[m] for m in self.modalities]

    def on_after_backward(self) -> None:
        betas, self._betas = self._betas, None
        if betas is None:
            return
        for i, m in enumerate(self.modalities):
            if m not in self._anchors:  # not regulated by the rule, or its window is closed
                continue
            pairs = [(p, a) for p, a in zip(self._params[m], self._anchors[m], strict=True) if p.grad is not None]
            add_proximal_([p.grad for p, _ in pairs], [p.detach() for p, _ in pairs], [a for _, a in pairs], betas[i])
        for m, acc in self._fisher.items():  # after the regulation: the regulated gradient
            have = [(f, w.grad) for f, w in zip(acc, self._weights[m], strict=True) if w.grad is not None]
            accumulate_fisher_([f for f, _ in have], [g.float() for _, g in have])

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"traces": {m: list(v) for m, v in self.traces.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        traces = dict(state.get("traces", {}))
        unknown = set(traces) - set(self.modalities) if self.modalities else set()
        if unknown:
            raise ConfigError(
                f"Method 'inforeg': the checkpoint holds Fisher traces of {sorted(unknown)}, which this "
                f"run ({', '.join(self.modalities)}) does not have. Resume with the same modalities, or "
                f"start fresh with --fresh."
            )
        self.traces = {m: [float(x) for x in v] for m, v in traces.items()}

    # ---- reporting ------------------------------------------------------------------------
    def label(self) -> str:
        tags = []
        if abs(self.threshold - RULE_THRESHOLD[self.rule]) > 1e-12:
            tags.append(f"threshold={self.threshold:g}")
        if abs(self.beta_scale - OPTIONS["beta_scale"].default) > 1e-12:
            tags.append(f"c={self.beta_scale:g}")
        if self.rule == "november" and abs(self.beta_other - OPTIONS["beta_other"].default) > 1e-12:
            tags.append(f"c_other={self.beta_other:g}")
        if self.window != OPTIONS["window_epochs"].default:
            tags.append(f"W={self.window}")
        if self.reduction != "sum":
            tags.append("mean scores")
        if self.trace_source != RULE_TRACE[self.rule]:
            tags.append("own traces" if self.trace_source == "own" else "anchor trace")
        head = RULE_LABEL[self.rule]
        if not tags:
            return head
        if head.endswith(")"):
            return f"{head[:-1]}, {', '.join(tags)})"
        return f"{head} ({', '.join(tags)})"

    def record_info(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "anchor_modality": f"{self.anchor} ({'named audio' if self.anchor == 'audio' else 'first; no audio modality'})",
            "regulated": self.regulated(),
            "coefficients": dict(zip(self.modalities, self.coefficients(), strict=True)),
            "window_trace": {m: self.trace_of(m) for m in self.regulated()},
            "threshold": self.threshold,
            "window_epochs": self.window,
            "scores": f"batch {self.reduction} of the true-class probability of the "
                      + ("unimodal heads" if self.rule == "march" else "fused head's parts (b/M)"),
            "beta_saturation": "sum over the batch: tanh(gap) is nearly always +-1, beta ~ c*e"
            if self.reduction == "sum" else "mean over the batch: gap in [-1, 1]",
        }
