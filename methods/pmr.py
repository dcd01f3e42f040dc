"""PMR: Prototypical Modal Rebalance (Fan et al., CVPR 2023), two modalities.

Documented in the documentation's pmr page; written from the paper, checked against
``main_Prototype_grad.py`` of fanyunfeng-bit/Modal-Imbalance-PMR (the official code).

* **Prototypes**: class means of each modality's embedding over the first
  ``floor(n_batches * proto_fraction)`` (at least 1) batches of a shuffled pass over the
  *training* data (train-time pipeline), model in eval mode, no autograd, through the trainer's
  ``iterate("train", fraction=...)`` service (its count rule is exactly the official
  ``sample_count >= len(loader) // 10`` break). As in the official
  ``main_Prototype_grad.py``, they are computed before epoch 0 (``on_train_epoch_start``) and
  after every epoch (``on_train_epoch_end``, before the evaluation): the prototypes that
  epoch e + 1 trains with are the ones the evaluation after epoch e uses (the official
  ``valid()``), so ``per_modality=prototypes`` reports the nearest-prototype accuracy of the
  model just evaluated. The pass after epoch e draws the subset of epoch e + 1 (the order
  ``iterate`` seeds from the epoch it serves), the same subset an epoch-start pass would draw.
* **Momentum** (as the official code): ``protos = new`` in epochs 0 and 1, ``(1 - mu) * new + mu * old``
  from epoch 2 on (the official code smooths after epoch e only when e > 0).
* **Per step**: ``q_m = -cdist(e_m, protos_m) / temperature``; score ``s_m`` = sum over the batch of
  ``softmax(q_m)[y]``; the modality with the lower score gets ``alpha * CE(q_m, y)`` (the PCE)
  added to the fused CE, while ``modulation_start <= epoch <= modulation_end`` (inclusive,
  0-based). Exact tie: no PCE (official). Prototypes are constants, so the PCE only reaches the
  weaker modality's encoder. PER (the paper's entropy regulariser) is not in the released code
  and not here.

Departures from the official code (none changes a number the official code produces finite):

* Classes absent from the prototype subset (the official code divides 0 by 0 and goes NaN):
  a class that has a prototype keeps it unchanged (no EMA step); a class that has never had
  one has no prototype: its distance column is masked to -inf (no sample is drawn to it) and its
  samples are left out of the PCE and of the scores (their prototype accuracy counts as wrong).
  It gets a prototype, unsmoothed, the first time it appears in a subset.
* Distances are ``torch.cdist`` in fp32 (exact mode, no ``||a||^2 - 2ab + ||b||^2`` shortcut), the
  scores, coefficients and class sums are vectorised on the device: no Python loop over
  samples or classes, no host sync per step. Class sums use a one-hot matmul (deterministic on
  CUDA, unlike ``index_add_``).
* ``temperature`` (default 1 = official, no temperature) and ``fusion_head=sum`` are options;
  ``per_modality=prototypes`` reports the nearest-prototype classifiers (the official
  ``acc_a_p``/``acc_v_p``) as the per-modality accuracy instead of the fused head's parts.
* The prototype pass always uses train (the official AVE and CG-MNIST runs used the validation /
  test set: leakage, not reproduced).
* Three or more modalities are refused (official: one ratio, two modalities; the IPRM paper
  reports PMR as N/A on trimodal data; BalanceBenchmark's M >= 3 branch is another method).

Defaults: alpha = 1.0 (the official argparse default), mu = 0 (the scripts' value almost
everywhere), window 0-70 (the most used one). CREMA-D: alpha = 2.0, mu = 0, window 0-70, which come
from the unreleased ``main_Proto_PER.py`` runs.

Diagnostics per step: ``ratio`` = s_first / s_second (modalities in the run's order; the key
diagnostic), ``proto_acc_<m>``, ``pce_<m>``, ``coef_<m>`` (the PCE weight applied, 0 outside the
window); per epoch (logged from the epoch-start hook): ``proto_batches``,
``proto_classes_seen`` (share of classes with a prototype).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mmbalance.config import Option, Search
from mmbalance.errors import ConfigError, MMBalanceError, UnsupportedError
from mmbalance.method import Method, Prediction
from mmbalance.registry import register_method

OPTIONS: dict[str, Option] = {
    # search range: official argparse default 1.0, CREMA-D 2.0
    "alpha": Option(1.0, "PCE weight on the weaker modality (official argparse default 1.0)", min=0.0, search=Search(0.1, 3.0)),
    # search range: mu: the scripts use 0 almost everywhere; the EMA form allows up to 1
    "momentum_coef": Option(0.0, "prototype EMA momentum mu: protos = (1-mu)*new + mu*old from epoch 2 on",
                            min=0.0, max=1.0, search=Search(0.0, 0.9)),
    "modulation_start": Option(0, "first epoch (0-based, inclusive) with the PCE term", min=0),
    "modulation_end": Option(70, "last epoch (0-based, inclusive) with the PCE term", min=0),
    "proto_fraction": Option(0.1, "share of the training batches of the prototype pass (floor, at least 1)",
                             min=0.0, max=1.0, min_open=True),
    "temperature": Option(1.0, "prototype logits = -distance / temperature (1 = official, none)",
                          min=0.0, min_open=True),
    "per_modality": Option("fused_parts", "per-modality accuracy from the fused head's parts or from the "
                           "nearest-prototype classifiers", choices=("fused_parts", "prototypes")),
    "fusion_head": Option("concat", "fused head (PMR only uses the embeddings)", choices=("concat", "sum")),
}

PAPER_CREMAD = {"alpha": 2.0, "momentum_coef": 0.0, "modulation_start": 0, "modulation_end": 70}


# ---- the mathematics (pure functions) ------------------------------------------------------
def class_sums(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums (C, d) of ``feats`` (N, d) in fp32 and per-class counts (C,)."""
    onehot = F.one_hot(labels.long(), num_classes).to(torch.float32)  # (N, C)
    return onehot.t() @ feats.float(), onehot.sum(0)


def update_prototypes(
    old: torch.Tensor,
    seen: torch.Tensor,
    sums: torch.Tensor,
    counts: torch.Tensor,
    epoch: int,
    momentum: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prototypes of ``epoch`` from the subset's class sums/counts (as the official code).

    Class means of the classes present; ``new`` unsmoothed in epochs 0 and 1, else
    ``(1 - momentum) * new + momentum * old`` for classes that already had a prototype (a class
    seen for the first time takes its mean). Absent classes keep ``old`` and their ``seen`` flag.
    Returns ``(prototypes, seen)``.
    """
    present = counts > 0
    mean = sums / counts.clamp_min(1).unsqueeze(1)
    if epoch >= 2 and momentum != 0.0:
        smoothed = (1.0 - momentum) * mean + momentum * old
        mean = torch.where(seen.unsqueeze(1), smoothed, mean)
    return torch.where(present.unsqueeze(1), mean, old), seen | present


def prototype_logits(
    feats: torch.Tensor, protos: torch.Tensor, seen: torch.Tensor | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """``q[i, c] = -||e_i - p_c||_2 / temperature`` in fp32; classes without a prototype
    (``seen[c]`` false) get -inf. ``seen=None``: every class has one."""
    dist = torch.cdist(feats.float(), protos.float(), compute_mode="donot_use_mm_for_euclid_dist")
    q = -dist / temperature if temperature != 1.0 else -dist
    return q if seen is None else q.masked_fill(~seen.unsqueeze(0), float("-inf"))


def pce_and_score(
    q: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prototypical CE ``mean_i -log softmax(q_i)[y_i]`` and the (detached) score
    ``s = sum_i softmax(q_i)[y_i]``, from one log-softmax.

    ``valid`` (N,) bool leaves out the samples whose class has no prototype: the CE is their
    complement's mean (0 if none is left), the score their complement's sum. ``None`` = all.
    """
    logp_y = torch.log_softmax(q, dim=1).gather(1, labels.long().unsqueeze(1)).squeeze(1)
    if valid is None:
        return -logp_y.mean(), logp_y.detach().exp().sum()
    logp_y = torch.where(valid, logp_y, torch.zeros_like(logp_y))  # -inf rows never reach the sum
    pce = -logp_y.sum() / valid.sum().clamp_min(1).to(logp_y.dtype)
    score = torch.where(valid, logp_y.detach().exp(), torch.zeros_like(logp_y)).sum()
    return pce, score


def rebalance_coefficients(
    s_first: torch.Tensor, s_second: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PCE weights (first, second): ``alpha`` on the modality with the lower score, 0 on the
    other; both 0 at an exact tie. Same as the official ``ratio = s_a / s_v`` switch."""
    first = torch.where(s_first < s_second, alpha, 0.0).to(torch.float32)
    second = torch.where(s_first > s_second, alpha, 0.0).to(torch.float32)
    return first, second


def in_window(epoch: int, start: int, end: int) -> bool:
    return start <= epoch <= end


def prototype_pass_batches(n_batches: int, fraction: float = 0.1) -> int:
    """Batches the official prototype pass reads: ``floor(n * fraction)``, at least 1 (as the official code).
    The trainer's ``iterate(fraction=...)`` applies the same rule; the plugin checks it does."""
    return min(n_batches, max(1, int(n_batches * fraction)))


# ---- the plugin ----------------------------------------------------------------------------
@register_method("pmr", "PMR: prototypical CE on the weaker modality (CVPR 2023)")
class PMR(Method):
    name = "pmr"
    description = "PMR: prototypical CE on the weaker modality (CVPR 2023)"
    options = OPTIONS
    dataset_defaults = {"cremad": dict(PAPER_CREMAD)}
    min_modalities = 2
    max_modalities = 2
    key_diagnostic = "ratio"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        start, end = int(self._opt("modulation_start")), int(self._opt("modulation_end"))
        if end < start:
            raise ConfigError(
                f"Method 'pmr': modulation_end ({end}) is before modulation_start ({start}); the "
                f"window is inclusive on both ends, e.g. --set modulation_start=0 modulation_end=70."
            )
        self.alpha = float(self._opt("alpha"))
        self.momentum = float(self._opt("momentum_coef"))
        self.temperature = float(self._opt("temperature"))
        self.fraction = float(self._opt("proto_fraction"))
        self.window = (start, end)
        self.fusion = str(self._opt("fusion_head"))  # read by the default build_fusion
        self.modalities: list[str] = []
        self.num_classes = 0
        self.protos: dict[str, torch.Tensor] = {}
        self.seen: torch.Tensor | None = None
        self.updated_epoch: int | None = None  # the epoch the current prototypes serve
        self.proto_batches = 0  # batches of the pass that made them
        self._all_seen = False

    def _opt(self, key: str) -> Any:
        """Option value; the declared default when ``cfg`` lacks it (a method built by hand)."""
        return self.cfg.get(key, OPTIONS[key].default)

    # ---- set-up ---------------------------------------------------------------------------
    def check_modalities(self, available: Sequence[str]) -> list[str]:
        if len(available) != 2:
            raise UnsupportedError(
                f"Method 'pmr' works with exactly 2 modalities (one prototype-score ratio, a "
                f"beta/lambda switch between two modalities, as in the official code), but the run "
                f"has {len(available)} ({', '.join(available)}). Pick two with --set "
                f"modalities=a,b or choose another method; PMR on trimodal data is N/A in the "
                f"literature (BalanceBenchmark's M >= 3 branch is a different method)."
            )
        self.modalities = list(available)
        return self.modalities

    def configure_model(self, model: Any) -> None:
        self.modalities = list(model.modalities)
        self.num_classes = int(model.num_classes)

    def per_modality_source(self) -> str:
        return "method" if self._opt("per_modality") == "prototypes" else super().per_modality_source()

    def on_fit_start(self) -> None:
        """Put restored prototypes on the run's device."""
        assert self.trainer is not None
        dev = self.trainer.device
        self.protos = {m: p.to(dev) for m, p in self.protos.items()}
        if self.seen is not None:
            self.seen = self.seen.to(dev)

    # ---- prototypes -----------------------------------------------------------------------
    def on_train_epoch_start(self, epoch: int) -> None:
        """Prototypes before epoch 0 (or from a checkpoint written before the pass moved to the
        epoch's end); then log what this epoch trains with."""
        if self.updated_epoch != epoch:
            self._prototype_pass(epoch)
        assert self.seen is not None
        self.log(proto_batches=float(self.proto_batches), proto_classes_seen=self.seen.float().mean())

    def on_train_epoch_end(self, epoch: int) -> None:
        """The official order: after epoch e, before its evaluation, the prototypes of the model
        that finished it; epoch e + 1 trains with them."""
        self._prototype_pass(epoch + 1)

    def _prototype_pass(self, epoch: int) -> None:
        """Class sums over the prototype subset of ``epoch`` (the epoch that trains with them)."""
        assert self.trainer is not None and self.model is not None
        dims = self.model.dims
        dev = self.trainer.device
        sums = {m: torch.zeros(self.num_classes, dims[m], device=dev) for m in self.modalities}
        counts = torch.zeros(self.num_classes, device=dev)
        n = 0
        current, self.epoch = self.epoch, epoch  # iterate() seeds its order from self.epoch
        try:
            with torch.no_grad():
                batches = self.trainer.iterate("train", fraction=self.fraction, grad=False, train_mode=False,
                                               tag="pmr-prototypes")
                for batch in batches:
                    with self.trainer.autocast():
                        feats = self.model.encode(batch)
                    for m in self.modalities:
                        s, c = class_sums(feats[m], batch["label"], self.num_classes)
                        sums[m] += s
                    counts += c
                    n += 1
        finally:
            self.epoch = current
        expected = prototype_pass_batches(self.num_training_batches, self.fraction)
        if self.num_training_batches and n != expected:
            raise MMBalanceError(
                f"Method 'pmr': the prototype pass read {n} batches, but the official rule "
                f"(floor({self.fraction:g} x {self.num_training_batches}), at least 1) asks for "
                f"{expected}; the trainer's iterate(fraction=...) no longer follows it."
            )
        self._update(sums, counts, epoch)
        self.proto_batches = n

    def _update(self, sums: Mapping[str, torch.Tensor], counts: torch.Tensor, epoch: int) -> None:
        if self.seen is None:
            self.seen = torch.zeros(self.num_classes, dtype=torch.bool, device=counts.device)
        seen_before = self.seen
        for m in self.modalities:
            old = self.protos.get(m)
            if old is None:
                old = torch.zeros_like(sums[m])
            self.protos[m], seen = update_prototypes(old, seen_before, sums[m], counts, epoch, self.momentum)
        self.seen = seen
        self.updated_epoch = epoch
        self._all_seen = bool(seen.all())  # one host sync per epoch

    def _require_prototypes(self) -> None:
        if self.seen is None:
            raise MMBalanceError(
                "Method 'pmr' has no class prototypes yet: they are computed in "
                "on_train_epoch_start (or restored from a checkpoint) before any step."
            )

    # ---- training -------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        assert self.model is not None
        self._require_prototypes()
        assert self.seen is not None
        feats = self.model.encode(batch)
        y = batch["label"]
        loss = F.cross_entropy(self.model.fuse(feats), y)
        seen = None if self._all_seen else self.seen  # a host-side flag, set once per epoch
        valid = None if seen is None else seen[y]
        first, second = self.modalities
        q, pce, scores = {}, {}, {}
        for m in self.modalities:
            q[m] = prototype_logits(feats[m], self.protos[m], seen, self.temperature)
            pce[m], scores[m] = pce_and_score(q[m], y, valid)
        if in_window(self.epoch, *self.window):
            c_first, c_second = rebalance_coefficients(scores[first], scores[second], self.alpha)
            coef = {first: c_first, second: c_second}
            loss = loss + c_first * pce[first] + c_second * pce[second]
        else:
            zero = torch.zeros((), device=loss.device)
            coef = {first: zero, second: zero}
        if self.trainer is not None:
            logs: dict[str, torch.Tensor] = {"ratio": scores[first] / scores[second]}
            for m in self.modalities:
                logs[f"proto_acc_{m}"] = (q[m].detach().argmax(1) == y).float().mean()
                logs[f"pce_{m}"] = pce[m].detach()
                logs[f"coef_{m}"] = coef[m]
            self.log(**logs)
        return loss

    # ---- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> Prediction:
        if self._opt("per_modality") != "prototypes":
            return super().predict(batch)
        assert self.model is not None
        self._require_prototypes()
        assert self.seen is not None
        feats = self.model.encode(batch)
        seen = None if self._all_seen else self.seen
        per = {m: prototype_logits(feats[m], self.protos[m], seen, self.temperature) for m in self.modalities}
        return Prediction(self.model.fuse(feats), per)

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.seen is None:
            return {}
        return {
            "modalities": list(self.modalities),
            "protos": {m: p.detach().cpu().clone() for m, p in self.protos.items()},
            "seen": self.seen.detach().cpu().clone(),
            "updated_epoch": self.updated_epoch,
            "proto_batches": self.proto_batches,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if self.modalities and list(state["modalities"]) != self.modalities:
            raise ConfigError(
                f"Method 'pmr': the checkpoint holds prototypes for {list(state['modalities'])}, but "
                f"this run has {self.modalities}. Resume with the same modalities, or start fresh."
            )
        dev = self.trainer.device if self.trainer is not None else torch.device("cpu")
        self.protos = {m: torch.as_tensor(p).to(dev) for m, p in state["protos"].items()}
        self.seen = torch.as_tensor(state["seen"]).to(dev, dtype=torch.bool)
        self.updated_epoch = state.get("updated_epoch")
        self.proto_batches = int(state.get("proto_batches", 0))
        self._all_seen = bool(self.seen.all())

    # ---- reporting ------------------------------------------------------------------------
    def _paper_value(self, key: str) -> Any:
        """The option's value for this dataset: the dataset plugin's, then ours, then the default."""
        dataset = self.cfg.get("dataset")
        ours = self.dataset_defaults.get(dataset, {}) if dataset else {}
        theirs: Mapping[str, Any] = {}
        try:
            from mmbalance.registry import DATASETS

            theirs = getattr(DATASETS.get(dataset), "method_defaults", {}).get(self.name, {}) if dataset else {}
        except Exception:  # label() must never fail the run
            theirs = {}
        return {**ours, **theirs}.get(key, OPTIONS[key].default)

    def _differs(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if self._opt(k) != self._paper_value(k)]

    def label(self) -> str:
        tags = []
        for key in self._differs(("alpha", "momentum_coef", "temperature", "proto_fraction")):
            short = {"momentum_coef": "mu", "proto_fraction": "subset"}.get(key, key)
            tags.append(f"{short}={self._opt(key):g}")
        if self._differs(("modulation_start", "modulation_end")):
            tags.append(f"window {self.window[0]}-{self.window[1]}")
        if self.fusion != "concat":
            tags.append(f"{self.fusion} fusion")
        if self._opt("per_modality") == "prototypes":
            tags.append("prototype per-modality")
        return "PMR" if not tags else f"PMR ({', '.join(tags)})"

    def record_info(self) -> dict[str, Any]:
        info = {
            "ratio": f"s_{self.modalities[0]} / s_{self.modalities[1]}" if len(self.modalities) == 2 else None,
            "prototype_pass": (f"floor({self.fraction:g} x training batches), at least 1, of the training "
                               f"data, eval mode, no grad; before epoch 0 and after every epoch, before "
                               f"its evaluation (official order)"),
            "unseen_classes": "keep the old prototype; never seen: masked out (no prototype)",
            "per_modality_rule": (
                "nearest-prototype classifier" if self._opt("per_modality") == "prototypes"
                else "fused head's per-modality parts"
            ),
        }
        if self.cfg.get("dataset") == "cremad":
            info["defaults_source"] = "alpha 2.0, mu 0, window 0-70: from the unreleased PER runs (the documentation's pmr page)"
        return info
