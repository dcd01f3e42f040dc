"""IPRM: instantaneous probe-and-rebalance with geodesic multimodal mixup (IJCAI 2025).

Documented on the IPRM page of the mmbalance documentation; official code github.com/njustkmg/IJCAI25-IPRM ``main_av.py``,
``main_trimodal.py``. One iteration, two modalities (a, b):

1. encoders run once; unimodal heads see the raw features; ``L_uni = CE(u_a) + CE(u_b)``;
2. probe (no autograd): fuse with GMM at the EMA weight ``lambda_t`` (Eq. 4), compare each
   unimodal prediction with the fused one (KL), turn the two KLs into the instantaneous weight
   ``omega_t`` (Eq. 2: the modality closer to the fusion gets more weight);
3. rebalance (with grad): fuse again at ``omega_t``; ``loss = CE(fused) + L_uni``.

The state (lambda, omega per modality pair) lives in buffers of the fused-head module, so it
stays on the device (no per-step host sync), moves with the model, and is also returned by
:meth:`IPRM.state_dict` for checkpoints.

Cost: the encoders run once; the two fused passes of a pair share its normalised features,
angle and denominator (:func:`mmbalance.fusion.sphere_geometry`, computed once with autograd;
the probe reads them without), the unimodal log-softmaxes serve both the CEs and the probe
KLs, each fused pass computes one log-softmax, and the per-step diagnostics are kept as the
tensors the step already made and handed to the trainer at the epoch's end (one host copy).
Every number is the one the plain formulation computes, bit for bit on CPU (tests/test_iprm.py
pins both a plain reference step and values recorded before this sharing).

Inference sums the unimodal and fused logits, the fused branch at the last EMA weight (the
official rule; ``inference=fused_only`` drops the unimodal logits).

Three or more modalities (official ``main_trimodal.py``): ``pair_mode=tri_cls`` gives every unordered pair its own
fused head, probe and EMA; ``pair_mode=single_cls`` shares one fused head and trains one
randomly drawn ordered pair per step. The paper's ablations are options of this one
plugin and show in :meth:`IPRM.label`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.config import Option, Search
from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.fusion import MIXER_PARTS, PairGeometry
from mmbalance.method import Method, Prediction
from mmbalance.probe import INIT_WEIGHT, ema, kl_pair_to_fused, log_probs, pair_strength_weight
from mmbalance.registry import register_method

DEFAULT_ALPHA = 0.8

OPTIONS: dict[str, Option] = {
    # search range: the paper's per-dataset 0.7 / 0.8; 0 is the w/o-EMA ablation, not a setting
    "alpha": Option(DEFAULT_ALPHA, "EMA momentum of the probing weight, Eq. (4); 0 = w/o EMA", search=Search(0.5, 0.95)),
    "ema": Option(True, "false = the 'w/o EMA' ablation (same as alpha=0: probe at the last omega)"),
    "probe_lambda": Option(
        "ema", "probe at the EMA weight (ema) or always at 0.5 (fixed; an alternative w/o-EMA reading)",
        choices=("ema", "fixed"),
    ),
    "mixup": Option("gmm", "fusion of the normalised features: geodesic (gmm) or linear (L-Mixup)",
                    choices=("gmm", "linear")),
    "gmm_safe": Option(False, "safe GMM numerics (eps norm, clamped cosine, linear at tiny sin)"),
    "one_pass": Option(False, "One-Pass ablation: one fused pass at the EMA weight, with grad"),
    "unpaired": Option(False, "unpaired sampling: permute the second modality, soft-label fused CE"),
    "fixed_weight": Option(
        None, "freeze probe and rebalance weights at this value (plain GMM fusion; a sanity check)",
        type=float,
    ),
    "inference": Option("sum", "sum of unimodal and fused logits (official) or the fused logits only",
                        choices=("sum", "fused_only")),
    "pair_mode": Option("tri_cls", "3+ modalities: a fused head per pair (tri_cls) or one shared "
                        "head on a random pair per step (single_cls)", choices=("tri_cls", "single_cls")),
    "replicate_official_head_bug": Option(
        False, "3 modalities only: the third modality's logits come from the second's head, as in "
        "the official NVGesture code (njustkmg/IJCAI25-IPRM main_trimodal.py)",
    ),
}


class IPRMFusion(nn.Module):
    """Fused linear head(s) on the mixed features, plus the per-pair probe state.

    ``lam[k]`` / ``omega[k]`` hold the EMA and instantaneous weight of the LOWER-index modality
    of pair k (the other modality's weight is one minus it); an ordered draw (j, i) with j > i
    reads ``1 - lam[k]``. Both start at 0.5, the official initialisation.
    """

    def __init__(
        self, modalities: Sequence[str], dim: int, num_classes: int, shared: bool, mixup: str, safe: bool
    ) -> None:
        super().__init__()
        self.modalities = list(modalities)
        self.pairs = list(itertools.combinations(range(len(self.modalities)), 2))
        self.shared = shared
        self.mixup = mixup
        self.safe = safe
        self._prepare, self._mix = MIXER_PARTS[mixup]
        n_heads = 1 if shared else len(self.pairs)
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(n_heads))
        self.register_buffer("lam", torch.full((len(self.pairs),), INIT_WEIGHT))
        self.register_buffer("omega", torch.full((len(self.pairs),), INIT_WEIGHT))

    def pair_name(self, k: int) -> str:
        i, j = self.pairs[k]
        return f"{self.modalities[i]}+{self.modalities[j]}"

    def head(self, k: int) -> nn.Linear:
        return self.heads[0 if self.shared else k]

    def geometry(self, z_first: torch.Tensor, z_second: torch.Tensor) -> PairGeometry:
        """The weight-independent part of this run's mix (normalised rows; GMM: angle too)."""
        return self._prepare(z_first, z_second, self.safe)

    def mix_at(self, geom: PairGeometry, w_first: Any) -> torch.Tensor:
        """This run's mix (GMM or L-Mixup) of a prepared pair at the first modality's weight."""
        return self._mix(geom, w_first)

    def mix(self, z_first: torch.Tensor, z_second: torch.Tensor, w_first: Any) -> torch.Tensor:
        return self.mix_at(self.geometry(z_first, z_second), w_first)

    def pair_logits(self, k: int, z_first: torch.Tensor, z_second: torch.Tensor, w_first: Any) -> torch.Tensor:
        """Fused logits of pair k: its head on the mix of the two features at ``w_first``."""
        return self.head(k)(self.mix(z_first, z_second, w_first))

    def forward(self, feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean over pairs of the fused logits at each pair's last EMA weight (inference)."""
        logits = []
        for k, (i, j) in enumerate(self.pairs):
            z_i, z_j = feats[self.modalities[i]], feats[self.modalities[j]]
            logits.append(self.pair_logits(k, z_i, z_j, self.lam[k]))
        return logits[0] if len(logits) == 1 else torch.stack(logits).mean(0)


@register_method("iprm", "IPRM: probe-and-rebalance with geodesic multimodal mixup (IJCAI 2025)")
class IPRM(Method):
    name = "iprm"
    fusion = "iprm"  # informational: build_fusion is overridden
    description = "IPRM: probe-and-rebalance with geodesic multimodal mixup (IJCAI 2025)"
    options = OPTIONS
    key_diagnostic = "omega_"  # the first modality's strength weight, shown per epoch

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        alpha = float(self._opt("alpha"))
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"Method 'iprm': alpha must lie in [0, 1], got {alpha}. Use e.g. --set alpha=0.8.")
        fixed = self._opt("fixed_weight")
        if fixed is not None and not 0.0 <= float(fixed) <= 1.0:
            raise ConfigError(f"Method 'iprm': fixed_weight must lie in [0, 1], got {fixed}.")
        self.alpha = alpha if self._opt("ema") else 0.0
        self.fixed_weight = None if fixed is None else float(fixed)
        # the options the training step branches on, read once
        self._unpaired = bool(self._opt("unpaired"))
        self._one_pass = bool(self._opt("one_pass"))
        self._probe_fixed = self._opt("probe_lambda") == "fixed"
        self._single_cls = self._opt("pair_mode") == "single_cls"
        self._head_bug = bool(self._opt("replicate_official_head_bug"))
        self.modalities: list[str] = []
        self._pending_state: Mapping[str, Any] | None = None
        # this epoch's per-step diagnostics: the step's tensors (see training_step) and, for
        # Single-CLS, the drawn (pair, first, second); logged at the epoch's end
        self._step_rows: list[tuple[torch.Tensor, ...]] = []
        self._step_pairs: list[tuple[int, int, int] | None] = []

    def _opt(self, key: str) -> Any:
        """Option value; the declared default when ``cfg`` lacks it (a method built by hand)."""
        return self.cfg.get(key, OPTIONS[key].default)

    # ---- set-up ---------------------------------------------------------------------------
    def check_modalities(self, available: Sequence[str]) -> list[str]:
        used = super().check_modalities(available)
        if self._opt("replicate_official_head_bug") and len(used) != 3:
            raise UnsupportedError(
                f"Method 'iprm': replicate_official_head_bug reproduces the official NVGesture "
                f"code (three modalities, depth logits from the flow head), but the run has "
                f"{len(used)} modalities ({', '.join(used)}). Drop that option."
            )
        self.modalities = used
        return used

    def build_fusion(self, dims: Mapping[str, int], num_classes: int) -> nn.Module:
        """Linear(d, K) fused head(s) on the GMM output; slerp needs one common width d."""
        widths = set(dims.values())
        if len(widths) != 1:
            raise ConfigError(
                f"Method 'iprm' mixes features on the unit sphere, so every encoder must emit the "
                f"same width, but they emit {dict(dims)}. Set a common width with "
                f"--set embed_dim=N (a projection is added) or choose backbones of equal width."
            )
        self.modalities = list(dims)
        return IPRMFusion(
            self.modalities,
            widths.pop(),
            num_classes,
            shared=self._opt("pair_mode") == "single_cls",
            mixup=self._opt("mixup"),
            safe=bool(self._opt("gmm_safe")),
        )

    @property
    def heads(self) -> IPRMFusion:
        """The model's IPRM fused-head module (heads and probe state)."""
        assert self.model is not None and isinstance(self.model.fusion, IPRMFusion)
        return self.model.fusion

    def trains_unimodal_heads(self) -> bool:
        return True  # the unimodal CEs are part of IPRM's loss (and of its probe)

    # ---- training -------------------------------------------------------------------------
    def unimodal_logits(self, feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unimodal heads on the raw features (with the official head bug if asked for)."""
        assert self.model is not None
        uni = self.model.unimodal_logits(feats)
        if self._head_bug:
            _, second, third = self.modalities
            uni[third] = self.model.uni_heads[second](feats[third])
        return uni

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        """Encoders once; per trained pair: probe at lambda_t, rebalance at omega_t (the documentation's IPRM page).

        The work each pair shares between its two fused passes is done once: the unimodal
        log-softmaxes (in their CEs and in the probe KLs), the pair's normalised features,
        angle and denominator (:func:`mmbalance.fusion.sphere_geometry`), and one
        log-softmax per fused pass. The per-step diagnostics are kept as the tensors the step
        made and logged at the end of the epoch. Nothing here waits for the device.
        """
        model = self.model
        assert model is not None
        feats = model.encode(batch)
        uni = self.unimodal_logits(feats)
        y = batch["label"]
        logp = {m: log_probs(logits) for m, logits in uni.items()}  # once: CE and probe KL
        loss: Any = None
        for lp in logp.values():  # == the sum of F.cross_entropy, bit for bit
            ce = F.nll_loss(lp, y)
            loss = ce if loss is None else loss + ce
        fusion: IPRMFusion = model.fusion
        lam_buf, omega_buf = fusion.lam, fusion.omega
        lam_all = self._next_lambdas(lam_buf, omega_buf)  # lambda_t of each pair's lower modality
        drawn = self._pairs_this_step()
        n_pairs = len(fusion.pairs)
        every_pair = len(drawn) == n_pairs
        omegas, stats = [], []
        for k, first, second in drawn:
            lam_low = lam_all if n_pairs == 1 else lam_all[k : k + 1]
            pair_loss, omega_low, d, guarded = self._pair_loss(fusion, k, first, second, lam_low, feats, logp, y)
            loss = loss + pair_loss
            omegas.append(omega_low)
            stats += (d, guarded)
        # the state holds no autograd history (buffers; weights from no-grad passes)
        if every_pair:
            omega_buf_new = omegas[0] if n_pairs == 1 else torch.cat(omegas)
            lam_buf.copy_(lam_all)
            omega_buf.copy_(omega_buf_new)
        else:  # Single-CLS: only the drawn pair's state advances
            k = drawn[0][0]
            lam_buf[k : k + 1] = lam_all[k : k + 1]
            omega_buf[k : k + 1] = omegas[0]
        if self.trainer is not None:  # driven by hand (tests): nothing to log into
            # the step's diagnostics, kept as the tensors they already are (no op): lam and
            # omega of every pair (the fresh tensors just stored; Single-CLS copies the state,
            # which later steps overwrite in place), then per trained pair its two KLs (first,
            # second) and its guard flag
            state = (lam_all, omega_buf_new) if every_pair else (torch.cat((lam_buf, omega_buf)),)
            self._step_rows.append((*state, *stats))
            self._step_pairs.append(None if every_pair else drawn[0])
        return loss

    def _pairs_this_step(self) -> list[tuple[int, int, int]]:
        """(pair index, first modality, second modality) trained in this step.

        tri_cls: every unordered pair in index order. single_cls with 3+ modalities: one
        ordered pair drawn uniformly with torch's CPU RNG (re-seeded by the trainer every
        epoch, so seeds and resumes reproduce; the draw never touches the accelerator).
        """
        pairs = self.model.fusion.pairs
        if not self._single_cls or len(pairs) == 1:
            return [(k, i, j) for k, (i, j) in enumerate(pairs)]
        ordered = [(k, i, j) for k, (i, j) in enumerate(pairs)] + [(k, j, i) for k, (i, j) in enumerate(pairs)]
        return [ordered[int(torch.randint(len(ordered), ()).item())]]

    def _pair_loss(
        self,
        fusion: IPRMFusion,
        k: int,
        first: int,
        second: int,
        lam_low: torch.Tensor,
        feats: Mapping[str, torch.Tensor],
        logp: Mapping[str, torch.Tensor],
        y: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Probe and rebalance pair k. Returns ``(fused CE, omega_low, KLs, guarded)``.

        ``lam_low``/``omega_low`` are the ``(1,)`` weights of the pair's lower-index modality
        (the stored convention); ``first``/``second`` is the order of this step's mix, so a
        reversed Single-CLS draw (first > second) mixes at ``1 - lam_low`` and stores
        ``1 - w_first``. ``KLs`` is ``(2,)``: first, second.
        """
        m_a, m_b = self.modalities[first], self.modalities[second]
        flip = first > second  # the state holds the lower-index modality's weight
        lam_a = 1.0 - lam_low if flip else lam_low
        z_a, z_b, lp_a, lp_b, y_b = feats[m_a], feats[m_b], logp[m_a], logp[m_b], y
        if self._unpaired:
            perm = torch.randperm(len(y), device=y.device)
            z_b, y_b = z_b[perm], y[perm]
            with torch.no_grad():
                lp_b = lp_b[perm]  # rows of a row-wise log-softmax: == log_softmax(u_b[perm])
        geom = fusion.geometry(z_a, z_b)  # with autograd; the probe reads it without
        head = fusion.head(k)
        weight, bias = head.weight, head.bias  # F.linear on them == head(...), without the call
        mix_at = fusion.mix_at
        if self._one_pass:
            fused = F.linear(mix_at(geom, lam_a), weight, bias)  # the one fused pass, with grad
            log_r = log_probs(fused)
            with torch.no_grad():
                d = kl_pair_to_fused(lp_a, lp_b, log_r)
                w_a, guarded = pair_strength_weight(d)
            mix_w = lam_a
        else:
            with torch.no_grad():  # the probe at lambda_t
                d = kl_pair_to_fused(lp_a, lp_b, log_probs(F.linear(mix_at(geom, lam_a), weight, bias)))
                w_a, guarded = pair_strength_weight(d)
            if self.fixed_weight is not None:
                w_a = torch.full_like(w_a, 1.0 - self.fixed_weight if flip else self.fixed_weight)
            fused = F.linear(mix_at(geom, w_a), weight, bias)  # the rebalanced pass at omega_t
            log_r = log_probs(fused)
            mix_w = w_a
        if self._unpaired:  # soft target mix_w * onehot(y) + (1 - mix_w) * onehot(y[perm])
            # the second term keeps its own log-softmax node: summing both gradients before one
            # log-softmax backward would round differently from the recorded runs
            mix_w = mix_w.reshape(())
            loss = mix_w * F.nll_loss(log_r, y) + (1.0 - mix_w) * F.nll_loss(log_probs(fused), y_b)
        else:
            loss = F.nll_loss(log_r, y)
        omega_low = 1.0 - w_a if flip else w_a
        if self.fixed_weight is not None:
            omega_low = torch.full_like(omega_low, self.fixed_weight)
        return loss, omega_low, d, guarded

    def _next_lambdas(self, lam: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
        """Probing weights of step t for every pair, ``(P,)``: Eq. (4) from the stored state, or
        a constant (``fixed_weight``; ``probe_lambda=fixed``). Single-CLS stores only the drawn
        pair's entry, so the others' values are computed but not kept."""
        if self.fixed_weight is not None:
            return torch.full_like(lam, self.fixed_weight)
        if self._probe_fixed:
            return torch.full_like(lam, INIT_WEIGHT)
        return ema(lam, omega, self.alpha)

    @torch.no_grad()
    def probe(
        self,
        k: int,
        z_a: torch.Tensor,
        z_b: torch.Tensor,
        u_a: torch.Tensor,
        u_b: torch.Tensor,
        lam_a: torch.Tensor | float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The probe pass of pair k on its own, without autograd: fused logits at ``lam_a``,
        then Eq. (2). Returns ``(w_a, kl_a, kl_b, guarded)``, all detached 0-d tensors.

        :meth:`training_step` runs the same computation inline, sharing the pair's geometry
        and the unimodal log-softmaxes with the rebalanced pass and the CEs.
        """
        fusion = self.heads
        log_q = log_probs(fusion.head(k)(fusion.mix_at(fusion.geometry(z_a, z_b), lam_a)))
        d = kl_pair_to_fused(log_probs(u_a), log_probs(u_b), log_q)
        w_a, guarded = pair_strength_weight(d)
        return w_a.reshape(()), d[0], d[1], guarded.reshape(())

    # ---- per-step diagnostics --------------------------------------------------------------
    def on_train_epoch_start(self, epoch: int) -> None:
        super().on_train_epoch_start(epoch)
        self._step_rows, self._step_pairs = [], []

    def on_train_epoch_end(self, epoch: int) -> None:
        super().on_train_epoch_end(epoch)
        self._flush_step_logs()

    def _flush_step_logs(self) -> None:
        """Expand the epoch's per-step tensors into the logged keys, one ``log`` call per step.

        Keys, order and values are those the step used to log itself (``omega_<m>``,
        ``lambda_<m>``, ``kl_<m>`` per modality, suffixed ``@<pair>`` with several pairs, then
        ``probe_guarded``): the second modality's weights are ``1 - first`` in float32, the KL
        of a pair not drawn in a Single-CLS step is NaN, and every step keeps its row. The
        values reach the trainer as floats after one device-to-host copy per epoch, made
        after the last step, so the steps themselves never wait for the device.
        """
        rows, pairs = self._step_rows, self._step_pairs
        self._step_rows, self._step_pairs = [], []
        if not rows or self.trainer is None:
            return
        steps = len(rows)
        # (steps, 2P + 3 per trained pair): lam, omega of every pair, then per trained pair
        # KL first, KL second, guard (bool promotes to float); one stack per field
        fields = [torch.stack(f).reshape(steps, -1) for f in zip(*rows, strict=True)]
        table = torch.cat(fields, dim=1).cpu()  # the epoch's only host sync here
        fusion = self.heads
        n = len(fusion.pairs)
        suffixes = [""] if n == 1 else [f"@{fusion.pair_name(k)}" for k in range(n)]
        every_pair = pairs[0] is None
        as_list = table.tolist()
        cols: dict[str, list[float]] = {}
        for k, (i, j) in enumerate(fusion.pairs):
            lam, omega = table[:, k], table[:, n + k]
            if every_pair:  # all pairs trained each step, in index order (first = i)
                kl_i, kl_j = table[:, 2 * n + 3 * k].tolist(), table[:, 2 * n + 3 * k + 1].tolist()
            else:  # Single-CLS: a row holds the drawn pair's KLs, in the drawn order
                nan = float("nan")
                kl_i = [row[2 * n + (f != i)] if kt == k else nan for row, (kt, f, _) in zip(as_list, pairs, strict=True)]
                kl_j = [row[2 * n + (f == i)] if kt == k else nan for row, (kt, f, _) in zip(as_list, pairs, strict=True)]
            for m, second, kl in ((self.modalities[i], False, kl_i), (self.modalities[j], True, kl_j)):
                cols[f"omega_{m}{suffixes[k]}"] = (1.0 - omega if second else omega).tolist()
                cols[f"lambda_{m}{suffixes[k]}"] = (1.0 - lam if second else lam).tolist()
                cols[f"kl_{m}{suffixes[k]}"] = kl
        guards = [2 * n + 3 * k + 2 for k in range(n)] if every_pair else [2 * n + 2]
        cols["probe_guarded"] = table[:, guards].mean(dim=1).tolist()  # mean over trained pairs
        for t in range(steps):
            self.log(**{key: col[t] for key, col in cols.items()})

    # ---- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> Prediction:
        """Official rule: sum of unimodal logits + mean fused logits at the last EMA weights."""
        assert self.model is not None
        feats = self.model.encode(batch)
        uni = self.unimodal_logits(feats)
        fused = self.heads(feats)
        if self._opt("inference") == "sum":
            fused = fused + torch.stack(list(uni.values())).sum(0)
        return Prediction(fused, uni)

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.model is None or self.model.fusion is None:
            return dict(self._pending_state or {})
        fusion = self.heads
        return {
            "pairs": [fusion.pair_name(k) for k in range(len(fusion.pairs))],
            "lam": fusion.lam.detach().cpu().clone(),
            "omega": fusion.omega.detach().cpu().clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if self.model is None or self.model.fusion is None:
            self._pending_state = state  # applied once the model exists
            return
        fusion = self.heads
        names = [fusion.pair_name(k) for k in range(len(fusion.pairs))]
        if list(state["pairs"]) != names:
            raise ConfigError(
                f"Method 'iprm': the checkpoint holds probe state for the modality pairs "
                f"{list(state['pairs'])}, but this run has {names}. Resume with the same "
                f"modalities, or start fresh."
            )
        with torch.no_grad():
            fusion.lam.copy_(torch.as_tensor(state["lam"]))
            fusion.omega.copy_(torch.as_tensor(state["omega"]))

    def on_fit_start(self) -> None:
        if self._pending_state is not None:
            pending, self._pending_state = self._pending_state, None
            self.load_state_dict(pending)

    # ---- reporting ------------------------------------------------------------------------
    def _paper_alpha(self) -> float:
        """The alpha the paper uses on this run's dataset (its method_defaults), else 0.8."""
        try:
            from mmbalance.registry import DATASETS

            ds = DATASETS.get(self.cfg["dataset"]) if self.cfg.get("dataset") else None
        except Exception:  # label() must never fail the run
            ds = None
        value = getattr(ds, "method_defaults", {}).get(self.name, {}).get("alpha", DEFAULT_ALPHA)
        return float(value)

    def label(self) -> str:
        """'IPRM' for the paper's setting; each variant adds its tag (leaderboard rows)."""
        tags = []
        if self._opt("mixup") == "linear":
            tags.append("L-Mixup")
        if self.alpha == 0.0:
            tags.append("w/o EMA")
        elif abs(self.alpha - self._paper_alpha()) > 1e-12:
            tags.append(f"alpha={self.alpha:g}")
        if self._opt("probe_lambda") == "fixed":
            tags.append("probe at 0.5")
        if self._opt("one_pass"):
            tags.append("One-Pass")
        if self._opt("unpaired"):
            tags.append("unpaired")
        if self.fixed_weight is not None:
            tags.append(f"fixed w={self.fixed_weight:g}")
        if self._opt("gmm_safe"):
            tags.append("safe GMM")
        if self._opt("pair_mode") == "single_cls":
            tags.append("Single-CLS")
        if self._opt("inference") == "fused_only":
            tags.append("fused-only")
        if self._opt("replicate_official_head_bug"):
            tags.append("official head bug")
        return "IPRM" if not tags else f"IPRM ({', '.join(tags)})"

    def record_info(self) -> dict[str, Any]:
        rule = (
            "sum of unimodal logits + mean fused logits at the last EMA weights (official)"
            if self._opt("inference") == "sum"
            else "fused logits only (mean over pairs at the last EMA weights)"
        )
        return {
            "inference_rule": rule,
            "gmm_numerics": "safe" if self._opt("gmm_safe") else "official",
            "mixup": self._opt("mixup"),
            "alpha": self.alpha,
            "pair_mode": self._opt("pair_mode") if len(self.modalities) > 2 else "pair",
            "modality_order": list(self.modalities),
        }
