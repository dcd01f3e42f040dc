"""Greedy: balanced multi-modal learning (Wu, Jastrzębski, Cho, Geras, ICML 2022).

Full page: ``the documentation's greedy page``. Official code: nyukat/greedy_multimodal_learning
(``src/balanced_mmtm.py`` for the MMTM layer and its running averages, ``src/model.py`` for
their placement, ``src/callbacks.py`` ``Bias_Mitigation_Strong`` / ``Bias_Mitigation_Random``
for the speeds and the state machine, ``src/framework.py`` for the step).

Idea: jointly trained networks are greedy, they lean on the modality they learn fastest. Two
branches are coupled by MMTM layers (each gates every branch's channels with sigmoids computed
from all branches' pooled maps); how fast the gates into branch m learn, relative to the branch
itself, is the *conditional learning speed* of m. When the speeds of the modalities drift apart,
a *re-balancing* window of Q steps cuts the faster-leaning branch off from the others (its
gates are frozen to their running means), so it must learn from its own input.

The rule (per training step; m = 0..M-1, M = 2 in the paper):

* Model: after each of the last ``greedy_stages`` (3) stages of every encoder, an MMTM:
  ``s_m = mean of map m over all axes but (sample, channel)`` (folded video frames included),
  ``z = ReLU(W_sq [s_0; ...; s_{M-1}] + b)`` with width ``floor(2 sum_m C_m / ratio)``,
  ``g_m = sigmoid(W_m z + b_m)``, map ``m <- map m * g_m``. Each branch has its own head (the
  suite's ``uni_heads``); loss ``sum_m CE(z_m, y)``; prediction the mean of the branch logits.
* Running average per MMTM and modality (every training forward, detached, fp32):
  ``r_m <- (mean_batch(g_m) + s r_m) / (s + 1)``, s the forwards so far; in a re-balancing
  step the caring modality's gate is then replaced by ``r_m`` (updated first, as released).
* Speeds after each backward outside a window (before clipping and the optimizer step), fp32,
  on the device: ``S_byp[m] += sum ||grad||^2 / sum ||theta||^2`` over the bypass group
  (every MMTM's excitation head m and its shared squeeze layer), ``S_main[m] += ...`` over the
  branch (encoder m and head m); cumulative, never reset. ``BDR_m = log10(S_byp / S_main)``.
* State machine (``greedy_mode=guided``): in warm-up epochs (0-based epoch < ``greedy_warmup_epochs``)
  speeds accumulate and every step is regular. After it, a regular step with
  ``max_m BDR_m - min_m BDR_m > eps`` (for M = 2: ``|BDR_0 - BDR_1| > eps``) opens a window:
  the next ``greedy_window`` steps re-balance with ``caring = argmax_m BDR_m`` (M = 2:
  0 if BDR_0 > BDR_1, the official rule); speeds are frozen inside it. ``greedy_mode=random``:
  after each unlocked step, one of {regular, re-balance m for each m} uniformly (no window).

Departures from the official code, each with its switch:

* **Running-average bug fixed.** The official MMTM updates the second modality's average from
  the *first* modality's gate (and sizes it with the first's width), so a re-balancing step
  caring for modality 1 multiplies it by modality 0's mean gate. Here each modality uses its
  own gate; ``greedy_legacy_running_avg=true`` reproduces the release (two modalities of equal
  widths at every MMTM only).
* **Evaluation in the normal mode.** The official evaluation passes the current training flags
  (an epoch ending inside a window is scored with a frozen gate) and its forwards update the
  running averages. Here evaluation never re-balances and leaves the averages alone;
  ``greedy_legacy_eval=true`` restores both.
* **Checkpointed running averages.** Officially plain attributes (lost on reload); here
  buffers of the MMTM modules, saved with the model, and the speeds and state in
  ``state_dict``, so a resumed run equals an uninterrupted one.
* **Where the MMTMs sit.** Officially after layer2-4 of two ResNet-18. Here after the last
  ``greedy_stages`` stages of every encoder that implements the staged protocol
  (``mmbalance/backbones/staged.py``): ResNet-18 layer2-4, ResNet-50 layer2-4, SmallCNN blocks
  2-4, I3D's three Inception groups (ends at Mixed_3c, 4f, 5c; the paper's I3D placement is
  not published). MMTM j couples stage ``S_m - k + j`` of each encoder, so encoders with
  different stage counts still pair their last k stages. When an encoder cannot be split (an
  MLP, a transformer) or has fewer than k stages, the whole run uses the **embedding-level
  fallback** (``greedy_fusion_point=embedding``, row "Greedy (embedding-level MMTM)"): one
  MMTM on the pooled features before the heads (squeeze = the features themselves). That is a
  different method and is labelled so; ``greedy_fusion_point=staged`` refuses instead of
  falling back. AV-digits (SmallCNN audio, MLP image) therefore runs the fallback.
* Optimiser, schedule, stopping and selection are the dataset recipe's (officially plain SGD
  0.1, plateau schedule on the train loss, stop at 100 % train accuracy, best-val checkpoint).

Open questions, settled:

* *Placement and eps, Q for other datasets* (paper: NVGesture, Colored MNIST; not released):
  the official ModelNet40 values eps = 0.01, Q = 5, one warm-up epoch, ratio 4, last three
  stages, for every dataset; all are options.
* *Cumulative speeds*: the code sums over all steps since the start (early large gradients
  dominate); kept, as released.
* *Three or more modalities*: an extension (the code has two): one M-way MMTM per stage,
  trigger on the spread ``max - min`` of the BDRs, caring = argmax; equal to the official rule
  for M = 2. The label says "M-way extension" for M > 2.
* *Does a re-balancing step update one branch only?* The maintainer agreed with that reading
  in nyukat/greedy_multimodal_learning#1, but the released code updates every parameter with
  the sum of both branch CEs; released behaviour kept (no option: nothing says which branch).
* *None gradients in a window*: the caring modality's excitation heads do not reach the loss
  in a re-balancing step, so their gradients stay None (the trainer zeroes with
  ``set_to_none``): momentum and Adam-type optimisers skip them for that step (no decay),
  as the official code would with those optimisers; speeds are not measured in a window.
* *Absent modalities (Shapley diagnostics)*: the staged forward takes its inputs from
  ``model.encoder_inputs``, which the diagnostics blank like ``encode``; the linear probes
  read ``model.encode`` and so measure the un-gated encoder features.

Refuses: one modality; ``greedy_legacy_running_avg`` with M != 2 or unequal widths;
``greedy_fusion_point=staged`` when an encoder has no staged view with enough stages.

Cost: no extra pass; the MMTMs are two small linear layers per stage on pooled vectors plus one
elementwise product per gated map; per regular step 4M fused norm reductions and one host sync
(the window decision, which the next forward needs). About 1.0-1.05x joint training.

Diagnostics per step: ``curation`` (1 in a re-balancing step; its epoch mean is the share of
such steps, the key diagnostic), ``caring_<m>`` (1 when m's gate was frozen), ``bdr_<m>``.
"""

from __future__ import annotations

import random as _random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.backbones.staged import per_sample, staged
from mmbalance.config import Option
from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.method import Method, Prediction
from mmbalance.registry import register_method

NAME = "greedy"
RATIO_FLOOR = 1e-30  # log10 of a ratio of two vanishing speeds stays finite

OPTIONS: dict[str, Option] = {
    "greedy_mode": Option("guided", "guided: windows triggered by the conditional learning speeds; random: each "
                          "step regular or re-balancing one modality at random (the paper's control)",
                          choices=("guided", "random")),
    "greedy_epsilon": Option(0.01, "threshold on the spread of the BDRs that opens a re-balancing window",
                             min=0.0),
    "greedy_window": Option(5, "re-balancing steps per window (Q)", min=1),
    "greedy_warmup_epochs": Option(1, "epochs of regular steps before re-balancing may start", min=0),
    "greedy_ratio": Option(4.0, "MMTM reduction ratio: squeeze width floor(2 sum C_m / ratio)", min=0.0,
                           min_open=True),
    "greedy_stages": Option(3, "MMTMs after each encoder's last k stages (staged encoders)", min=1),
    "greedy_fusion_point": Option("auto", "auto: MMTMs between encoder stages when every encoder is staged, else "
                                  "the embedding-level fallback; staged: refuse instead of falling back; "
                                  "embedding: always the fallback", choices=("auto", "staged", "embedding")),
    "greedy_legacy_running_avg": Option(False, "reproduce the release's bug: the second modality's running "
                                        "average is updated from the first modality's gate"),
    "greedy_legacy_eval": Option(False, "evaluate as released: with the current training flags, updating the "
                                 "running averages"),
}


# ---- the mathematics (pure functions) ------------------------------------------------------
def sum_sq(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Sum of squared entries over ``tensors`` (None skipped), fp32, 0-d, on the device."""
    present = [t for t in tensors if t is not None]
    if not present:
        return torch.zeros(())
    norms = torch._foreach_norm(present)
    return torch.stack([n.float() for n in norms]).square().sum()


def speed(params: Sequence[nn.Parameter]) -> torch.Tensor:
    """One step's learning speed of a parameter group: ``sum ||grad||^2 / sum ||theta||^2``."""
    g = sum_sq([p.grad for p in params])
    w = sum_sq([p.detach() for p in params])
    return g.to(w.device) / w.clamp_min(RATIO_FLOOR)


def bdr(s_byp: torch.Tensor, s_main: torch.Tensor) -> torch.Tensor:
    """``log10(S_byp / S_main)`` per modality (floored so it stays finite)."""
    return torch.log10(s_byp.clamp_min(RATIO_FLOOR) / s_main.clamp_min(RATIO_FLOOR))


def spread_and_caring(bdrs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The imbalance ``max_m BDR_m - min_m BDR_m`` and the modality to care for
    (``argmax_m BDR_m``). For two modalities: ``|d|`` with ``d = BDR_0 - BDR_1`` and caring
    0 when ``d > 0``, else 1 (the official rule)."""
    return bdrs.max() - bdrs.min(), bdrs.argmax()


@dataclass(frozen=True)
class Balance:
    """The state machine: ``curation`` (re-balancing), ``caring`` (whose gate is frozen), ``k``
    (re-balancing steps taken in the current window)."""

    curation: bool = False
    caring: int = 0
    k: int = 0


def advance(state: Balance, unlocked: bool, fire: bool, caring: int, window: int) -> Balance:
    """The state after a step's backward. Inside a window the step is counted and the window
    closes after ``window`` steps; outside one, an unlocked step that fires opens a window
    for the next steps (the firing step itself was regular)."""
    if not unlocked:
        return Balance()
    if state.curation:
        k = state.k + 1
        return replace(state, k=k, curation=k < window)
    if fire:
        return Balance(True, caring, 0)
    return Balance()


def running_average(avg: torch.Tensor, steps: torch.Tensor, gate_mean: torch.Tensor) -> torch.Tensor:
    """Cumulative mean over forwards: ``(gate_mean + s * avg) / (s + 1)``."""
    return (gate_mean + steps * avg) / (steps + 1)


# ---- the MMTM layer ------------------------------------------------------------------------
class MMTM(nn.Module):
    """Multi-modal transfer module over M maps (channels at axis 1; folded frames grouped by
    :func:`per_sample`), with a running average of each modality's batch-mean gate (buffers,
    so they are checkpointed with the model)."""

    def __init__(self, channels: Sequence[int], ratio: float) -> None:
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        total = sum(self.channels)
        self.squeeze = nn.Linear(total, int(2 * total / ratio))
        self.excite = nn.ModuleList(nn.Linear(self.squeeze.out_features, c) for c in self.channels)
        for i, c in enumerate(self.channels):
            self.register_buffer(f"avg{i}", torch.zeros(c))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def averages(self) -> list[torch.Tensor]:
        return [getattr(self, f"avg{i}") for i in range(len(self.channels))]

    def gates(self, maps: Sequence[torch.Tensor], batch: int) -> list[torch.Tensor]:
        """(B, C_m) sigmoid gates from the per-sample squeeze of every map."""
        squeezed = [per_sample(h, batch).reshape(batch, -1, h.shape[1], int(h[0, 0].numel())).mean(dim=(1, 3))
                    for h in maps]
        z = F.relu(self.squeeze(torch.cat(squeezed, 1)))
        return [torch.sigmoid(head(z)) for head in self.excite]

    @torch.no_grad()
    def update_averages(self, gates: Sequence[torch.Tensor], legacy: bool = False) -> None:
        """Fold this forward's batch-mean gates into the running averages. ``legacy``: the
        release's bug, the second average fed from the first modality's gate."""
        for i, avg in enumerate(self.averages()):
            source = gates[0] if legacy and i == 1 else gates[i]
            avg.copy_(running_average(avg, self.steps, source.detach().float().mean(0)))
        self.steps += 1

    def forward(self, maps: Sequence[torch.Tensor], batch: int, caring: int | None = None,
                update: bool = True, legacy: bool = False) -> list[torch.Tensor]:
        gates = self.gates(maps, batch)
        if update:
            self.update_averages(gates, legacy)
        if caring is not None:  # re-balancing: the caring branch gets its mean gate, no cross-modal signal
            gates[caring] = self.averages()[caring].clone().to(gates[caring].dtype).expand(batch, -1)
        out = []
        for h, g in zip(maps, gates, strict=True):
            grouped = per_sample(h, batch)
            shape = (batch, 1, g.shape[1]) + (1,) * (h.dim() - 2)
            out.append((grouped * g.to(h.dtype).view(shape)).reshape(h.shape))
        return out


# ---- the plugin ----------------------------------------------------------------------------
@register_method(NAME, "Greedy: MMTM-coupled branches re-balanced by conditional learning speeds (ICML 2022)")
class Greedy(Method):
    name = NAME
    description = "Greedy: MMTM-coupled branches re-balanced by conditional learning speeds (ICML 2022)"
    options = OPTIONS
    min_modalities = 2
    key_diagnostic = "curation"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.mode = str(self._opt("greedy_mode"))
        self.eps = float(self._opt("greedy_epsilon"))
        self.window = int(self._opt("greedy_window"))
        self.warmup = int(self._opt("greedy_warmup_epochs"))
        self.ratio = float(self._opt("greedy_ratio"))
        self.k_stages = int(self._opt("greedy_stages"))
        self.requested_point = str(self._opt("greedy_fusion_point"))
        self.legacy_avg = bool(self._opt("greedy_legacy_running_avg"))
        self.legacy_eval = bool(self._opt("greedy_legacy_eval"))
        self.modalities: list[str] = []
        self.fusion_point = "embedding"
        self.state = Balance()
        self.unlocked = False
        self.s_byp: torch.Tensor | None = None
        self.s_main: torch.Tensor | None = None
        self._groups: list[tuple[list[nn.Parameter], list[nn.Parameter]]] = []

    def _opt(self, key: str) -> Any:
        """Option value; the declared default when ``cfg`` lacks it (a method built by hand)."""
        return self.cfg.get(key, OPTIONS[key].default)

    # ---- set-up ---------------------------------------------------------------------------
    def build_fusion(self, dims: Mapping[str, int], num_classes: int) -> nn.Module | None:
        return None  # the prediction is the mean of the branch heads

    def trains_unimodal_heads(self) -> bool:
        return True

    def per_modality_source(self) -> str:
        return "method"  # branch heads on gated features: conditional, not unimodal

    def configure_model(self, model: Any) -> None:
        self.modalities = list(model.modalities)
        m_count = len(self.modalities)
        views = {m: staged(enc) for m, enc in model.encoders.items()}
        short = [m for m, v in views.items() if v is None or len(v.stages) < self.k_stages]
        if self.requested_point == "staged" and short:
            raise UnsupportedError(
                f"Method 'greedy': greedy_fusion_point=staged needs every encoder to expose at least "
                f"{self.k_stages} stages (mmbalance/backbones/staged.py), but {', '.join(short)} "
                f"do not. Use greedy_fusion_point=auto (the embedding-level fallback), lower greedy_stages, "
                f"or choose staged backbones (cnn, resnet18, resnet50, i3d)."
            )
        self.fusion_point = "staged" if self.requested_point != "embedding" and not short else "embedding"
        if self.fusion_point == "staged":
            widths = [[views[m].stage_channels[len(views[m].stages) - self.k_stages + j] for m in self.modalities]
                      for j in range(self.k_stages)]
        else:
            widths = [[model.dims[m] for m in self.modalities]]
        if self.legacy_avg and (m_count != 2 or any(w[0] != w[1] for w in widths)):
            raise UnsupportedError(
                f"Method 'greedy': greedy_legacy_running_avg reproduces a two-modality bug that needs equal "
                f"widths at every MMTM, but this run has {m_count} modalities with widths {widths}. "
                f"Drop greedy_legacy_running_avg (the fixed averages)."
            )
        model.extra["mmtm"] = nn.ModuleList(MMTM(w, self.ratio) for w in widths)
        self.s_byp = torch.zeros(m_count)
        self.s_main = torch.zeros(m_count)

    def on_fit_start(self) -> None:
        assert self.model is not None
        dev = self.trainer.device if self.trainer is not None else torch.device("cpu")
        self.s_byp = self.s_byp.to(dev)
        self.s_main = self.s_main.to(dev)
        self._groups = self.speed_groups()

    def speed_groups(self) -> list[tuple[list[nn.Parameter], list[nn.Parameter]]]:
        """Per modality (bypass, main): every MMTM's excitation head m plus the shared squeeze
        layers; the encoder and head of m."""
        assert self.model is not None
        mmtms = self.model.extra["mmtm"]
        shared = [p for mm in mmtms for p in mm.squeeze.parameters()]
        return [([p for mm in mmtms for p in mm.excite[i].parameters()] + shared,
                 self.model.encoder_params(m) + self.model.uni_head_params(m))
                for i, m in enumerate(self.modalities)]

    # ---- the model's forward ----------------------------------------------------------------
    def gated_features(self, batch: Mapping[str, Any], caring: int | None, update: bool) -> dict[str, torch.Tensor]:
        """Pooled features of every branch after the MMTMs (inputs from ``encoder_inputs``, so
        absent modalities are blanked)."""
        assert self.model is not None
        model = self.model
        inputs = model.encoder_inputs(batch)
        n = batch["label"].shape[0]
        mmtms = model.extra["mmtm"]
        mods = self.modalities
        if self.fusion_point == "embedding":
            feats = [model.encoders[m](inputs[m]) for m in mods]
            return dict(zip(mods, mmtms[0](feats, n, caring, update, self.legacy_avg), strict=True))
        views = [staged(model.encoders[m]) for m in mods]
        k = len(mmtms)
        h = [v.stem(inputs[m]) for v, m in zip(views, mods, strict=True)]
        for i, v in enumerate(views):
            for stage in v.stages[: len(v.stages) - k]:
                h[i] = stage(h[i])
        for j, mmtm in enumerate(mmtms):
            h = [v.stages[len(v.stages) - k + j](x) for v, x in zip(views, h, strict=True)]
            h = mmtm(h, n, caring, update, self.legacy_avg)
        return {m: v.pool(x, n) for m, v, x in zip(mods, views, h, strict=True)}

    # ---- training -------------------------------------------------------------------------
    def on_train_epoch_start(self, epoch: int) -> None:
        self.unlocked = epoch >= self.warmup

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        assert self.model is not None
        caring = self.state.caring if self.state.curation else None
        logits = self.model.unimodal_logits(self.gated_features(batch, caring, update=True))
        y = batch["label"]
        loss = sum(F.cross_entropy(z, y) for z in logits.values())
        if self.trainer is not None:
            self.log(curation=float(self.state.curation),
                     **{f"caring_{m}": float(caring == i) for i, m in enumerate(self.modalities)})
        return loss

    def on_after_backward(self) -> None:
        if self.mode == "random":
            self.state = self.random_state()
            return
        if self.state.curation:  # inside a window: count it, speeds frozen
            self.state = advance(self.state, self.unlocked, False, 0, self.window)
            return
        if not self._groups:
            self._groups = self.speed_groups()
        assert self.s_byp is not None and self.s_main is not None
        dev = self.s_byp.device
        self.s_byp = self.s_byp + torch.stack([speed(b).to(dev) for b, _ in self._groups])
        self.s_main = self.s_main + torch.stack([speed(mn).to(dev) for _, mn in self._groups])
        bdrs = bdr(self.s_byp, self.s_main)
        if self.trainer is not None:
            self.log(**{f"bdr_{m}": bdrs[i] for i, m in enumerate(self.modalities)})
        if not self.unlocked:
            self.state = Balance()
            return
        spread, caring = spread_and_caring(bdrs)
        fire = bool(spread > self.eps)  # the step's one host sync: the next forward depends on it
        self.state = advance(self.state, True, fire, int(caring) if fire else 0, self.window)

    def random_state(self) -> Balance:
        """The random control: after each unlocked step, regular or one modality's re-balancing
        step with equal probability, from a generator seeded by (seed, step) so resumes match."""
        if not self.unlocked:
            return Balance()
        draw = _random.Random(int(self.cfg.get("seed", 0)) * 1_000_003 + self.global_step).randrange(
            len(self.modalities) + 1)
        return Balance() if draw == 0 else Balance(True, draw - 1, 0)

    # ---- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> Prediction:
        assert self.model is not None
        if self.legacy_eval:  # as released: the training flags, and the averages keep moving
            caring = self.state.caring if self.state.curation else None
            feats = self.gated_features(batch, caring, update=True)
        else:
            feats = self.gated_features(batch, None, update=False)
        per = self.model.unimodal_logits(feats)
        return Prediction(torch.stack(list(per.values())).mean(0), per)

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "modalities": list(self.modalities), "fusion_point": self.fusion_point,
            "s_byp": None if self.s_byp is None else self.s_byp.detach().cpu().clone(),
            "s_main": None if self.s_main is None else self.s_main.detach().cpu().clone(),
            "curation": self.state.curation, "caring": self.state.caring, "k": self.state.k,
            "unlocked": self.unlocked,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if list(state["modalities"]) != self.modalities or state["fusion_point"] != self.fusion_point:
            raise ConfigError(
                f"Method 'greedy': the checkpoint holds speeds for {list(state['modalities'])} with MMTMs at "
                f"'{state['fusion_point']}', this run has {self.modalities} at '{self.fusion_point}'. Resume "
                f"with the same modalities and backbones, or start fresh."
            )
        dev = self.trainer.device if self.trainer is not None else torch.device("cpu")
        self.s_byp = torch.as_tensor(state["s_byp"]).to(dev)
        self.s_main = torch.as_tensor(state["s_main"]).to(dev)
        self.state = Balance(bool(state["curation"]), int(state["caring"]), int(state["k"]))
        self.unlocked = bool(state["unlocked"])

    # ---- reporting ------------------------------------------------------------------------
    def label(self) -> str:
        base = "Greedy (embedding-level MMTM)" if self.fusion_point == "embedding" else "Greedy"
        tags = []
        if self.mode == "random":
            tags.append("random")
        for key, text in (("greedy_epsilon", "eps"), ("greedy_window", "Q"), ("greedy_warmup_epochs", "warm-up"),
                          ("greedy_ratio", "ratio"), ("greedy_stages", "stages")):
            if self._opt(key) != OPTIONS[key].default:
                tags.append(f"{text}={self._opt(key):g}")
        if self.legacy_avg:
            tags.append("running-average bug as released")
        if self.legacy_eval:
            tags.append("eval in training flags as released")
        if len(self.modalities) > 2:
            tags.append("M-way extension")
        if not tags:
            return base
        return f"{base[:-1]}, {', '.join(tags)})" if base.endswith(")") else f"{base} ({', '.join(tags)})"

    def record_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "fusion_point": self.fusion_point,
            "inference_rule": "mean of the branch heads' logits, gates computed (no re-balancing)"
            if not self.legacy_eval else "mean of the branch heads' logits in the training flags (as released)",
            "per_modality_rule": "branch heads on MMTM-gated features (conditional on the other branches)",
            "probes": "linear probes read the un-gated encoder features",
        }
        if self.fusion_point == "staged" and self.model is not None:
            info["mmtm_after_stages"] = {
                m: list(range(len(v.stages) - self.k_stages, len(v.stages)))
                for m in self.modalities if (v := staged(self.model.encoders[m])) is not None}
        return info
