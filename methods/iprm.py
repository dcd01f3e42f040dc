"""IPRM: instantaneous probe-and-rebalance with geodesic multimodal mixup (IJCAI 2025).

Spec: reference/iprm.md (sections 1-9, 11, 12). One iteration, two modalities (a, b):

1. encoders run once; unimodal heads see the raw features; ``L_uni = CE(u_a) + CE(u_b)``;
2. probe (no autograd): fuse with GMM at the EMA weight ``lambda_t`` (Eq. 4), compare each
   unimodal prediction with the fused one (KL), turn the two KLs into the instantaneous weight
   ``omega_t`` (Eq. 2: the modality closer to the fusion gets more weight);
3. rebalance (with grad): fuse again at ``omega_t``; ``loss = CE(fused) + L_uni``.

The state (lambda, omega per modality pair) lives in buffers of the fused-head module, so it
stays on the device (no per-step host sync), moves with the model, and is also returned by
:meth:`IPRM.state_dict` for checkpoints. Inference sums the unimodal and fused logits, the
fused branch at the last EMA weight (the official rule; ``inference=fused_only`` drops the
unimodal logits).

Three or more modalities (section 7): ``pair_mode=tri_cls`` gives every unordered pair its own
fused head, probe and EMA; ``pair_mode=single_cls`` shares one fused head and trains one
randomly drawn ordered pair per step. The ablations of section 8 are options of this one
plugin and show in :meth:`IPRM.label`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.config import Option
from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.fusion import MIXERS
from mmbalance.method import Method, Prediction
from mmbalance.probe import INIT_WEIGHT, ema, kl_to_fused, strength_weights
from mmbalance.registry import register_method

DEFAULT_ALPHA = 0.8

OPTIONS: dict[str, Option] = {
    "alpha": Option(DEFAULT_ALPHA, "EMA momentum of the probing weight, Eq. (4); 0 = w/o EMA"),
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
        "the official NVGesture code (iprm.md 12.1)",
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
        n_heads = 1 if shared else len(self.pairs)
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(n_heads))
        self.register_buffer("lam", torch.full((len(self.pairs),), INIT_WEIGHT))
        self.register_buffer("omega", torch.full((len(self.pairs),), INIT_WEIGHT))

    def pair_name(self, k: int) -> str:
        i, j = self.pairs[k]
        return f"{self.modalities[i]}+{self.modalities[j]}"

    def head(self, k: int) -> nn.Linear:
        return self.heads[0 if self.shared else k]

    def mix(self, z_first: torch.Tensor, z_second: torch.Tensor, w_first: Any) -> torch.Tensor:
        return MIXERS[self.mixup](z_first, z_second, w_first, safe=self.safe)

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
        self.modalities: list[str] = []
        self._pending_state: Mapping[str, Any] | None = None

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
        if self._opt("replicate_official_head_bug"):
            _, second, third = self.modalities
            uni[third] = self.model.uni_heads[second](feats[third])
        return uni

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        assert self.model is not None
        feats = self.model.encode(batch)
        uni = self.unimodal_logits(feats)
        y = batch["label"]
        loss = sum(F.cross_entropy(logits, y) for logits in uni.values())
        logs: dict[str, torch.Tensor] = {}
        for k, first, second in self._pairs_this_step():
            loss = loss + self._pair_loss(k, first, second, feats, uni, y, logs)
        self._log_state(logs)
        return loss

    def _pairs_this_step(self) -> list[tuple[int, int, int]]:
        """(pair index, first modality, second modality) trained in this step.

        tri_cls: every unordered pair in index order. single_cls with 3+ modalities: one
        ordered pair drawn uniformly with torch's CPU RNG (re-seeded by the trainer every
        epoch, so seeds and resumes reproduce; the draw never touches the accelerator).
        """
        pairs = self.heads.pairs
        if self._opt("pair_mode") != "single_cls" or len(pairs) == 1:
            return [(k, i, j) for k, (i, j) in enumerate(pairs)]
        ordered = [(k, i, j) for k, (i, j) in enumerate(pairs)] + [(k, j, i) for k, (i, j) in enumerate(pairs)]
        return [ordered[int(torch.randint(len(ordered), ()).item())]]

    def _pair_loss(
        self,
        k: int,
        first: int,
        second: int,
        feats: Mapping[str, torch.Tensor],
        uni: Mapping[str, torch.Tensor],
        y: torch.Tensor,
        logs: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Probe, rebalance and advance the state of pair k; returns its fused CE."""
        fusion = self.heads
        m_a, m_b = self.modalities[first], self.modalities[second]
        flip = first > second  # the state holds the lower-index modality's weight
        lam_low = self._next_lambda(k)
        lam_a = 1.0 - lam_low if flip else lam_low
        z_a, z_b, u_a, u_b, y_b = feats[m_a], feats[m_b], uni[m_a], uni[m_b], y
        if self._opt("unpaired"):
            perm = torch.randperm(len(y), device=y.device)
            z_b, u_b, y_b = z_b[perm], u_b[perm], y[perm]
        if self._opt("one_pass"):
            fused = fusion.pair_logits(k, z_a, z_b, lam_a)
            w_a, d_a, d_b, guarded = self._weights(u_a, u_b, fused.detach())
            mix_w = lam_a
        else:
            w_a, d_a, d_b, guarded = self.probe(k, z_a, z_b, u_a, u_b, lam_a)
            if self.fixed_weight is not None:
                w_a = torch.full_like(w_a, 1.0 - self.fixed_weight if flip else self.fixed_weight)
            fused = fusion.pair_logits(k, z_a, z_b, w_a)
            mix_w = w_a
        if self._opt("unpaired"):  # soft target mix_w * onehot(y) + (1 - mix_w) * onehot(y[perm])
            loss = mix_w * F.cross_entropy(fused, y) + (1.0 - mix_w) * F.cross_entropy(fused, y_b)
        else:
            loss = F.cross_entropy(fused, y)
        omega_low = 1.0 - w_a if flip else w_a
        if self.fixed_weight is not None:
            omega_low = torch.full_like(omega_low, self.fixed_weight)
        with torch.no_grad():
            fusion.lam[k] = lam_low
            fusion.omega[k] = omega_low
        logs[f"kl_{m_a}@{k}"] = d_a
        logs[f"kl_{m_b}@{k}"] = d_b
        logs[f"guarded@{k}"] = guarded.float()
        return loss

    def _next_lambda(self, k: int) -> torch.Tensor:
        """Probing weight of step t for pair k: Eq. (4) from the stored state, or a constant."""
        fusion = self.heads
        if self.fixed_weight is not None:
            return torch.full_like(fusion.lam[k], self.fixed_weight)
        if self._opt("probe_lambda") == "fixed":
            return torch.full_like(fusion.lam[k], INIT_WEIGHT)
        return ema(fusion.lam[k], fusion.omega[k], self.alpha)

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
        """The probe pass of pair k, without autograd: fused logits at ``lam_a``, then Eq. (2).

        Reuses the step's features and unimodal logits (no encoder re-run). Returns
        ``(w_a, kl_a, kl_b, guarded)``, all detached 0-d tensors.
        """
        probe_logits = self.heads.pair_logits(k, z_a, z_b, lam_a)
        return self._weights(u_a, u_b, probe_logits)

    @staticmethod
    def _weights(
        u_a: torch.Tensor, u_b: torch.Tensor, fused: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            d_a = kl_to_fused(u_a.detach(), fused.detach())
            d_b = kl_to_fused(u_b.detach(), fused.detach())
            w_a, _, guarded = strength_weights(d_a, d_b)
        return w_a, d_a, d_b, guarded

    def _log_state(self, step_logs: Mapping[str, torch.Tensor]) -> None:
        """Per-step omega/lambda/KL per modality (per pair when there are several pairs).

        Every key is logged at every step (NaN KL for a pair not drawn in Single-CLS), so the
        trainer's per-epoch columns stay aligned step by step.
        """
        if self.trainer is None:  # driven by hand (tests): nothing to log into
            return
        fusion = self.heads
        single = len(fusion.pairs) == 1
        values: dict[str, torch.Tensor] = {}
        guarded = []
        for k, (i, j) in enumerate(fusion.pairs):
            suffix = "" if single else f"@{fusion.pair_name(k)}"
            lam, omega = fusion.lam[k].detach(), fusion.omega[k].detach()
            for m, sign in ((self.modalities[i], False), (self.modalities[j], True)):
                values[f"omega_{m}{suffix}"] = 1.0 - omega if sign else omega.clone()
                values[f"lambda_{m}{suffix}"] = 1.0 - lam if sign else lam.clone()
                kl = step_logs.get(f"kl_{m}@{k}")
                values[f"kl_{m}{suffix}"] = kl if kl is not None else torch.full_like(lam, float("nan"))
            g = step_logs.get(f"guarded@{k}")
            if g is not None:
                guarded.append(g)
        values["probe_guarded"] = torch.stack(guarded).mean()
        self.log(**values)

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
