"""Sample- and modality-level valuation (Wei, Feng, Wang, Hu, CVPR 2024, "Enhancing multimodal
cooperation via sample-level modality valuation"). Docs page: ``the documentation's valuation page``.

Official code: GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation, ``code/sample_level.py``
and ``code/modality_level.py`` (valuation, schedule), ``code/datasets/dataloader.py`` (the
resampled data sets and their thresholds), ``code/models/models.py`` (the drop flag applied to
the pooled features). BalanceBenchmark's reimplementation (GeWu-Lab/BalanceBenchmark,
``balancemm/trainer/Sample_trainer.py``, ``balancemm/datasets/__init__.py``,
``balancemm/evaluation/modalitys.py``) supplies the M-modality Shapley value and the input-level
drop offered as options.

**Rule.** The loss is never changed: it is the fused cross-entropy. What changes is the data.
From epoch ``warmup`` on, at the start of every epoch (with the model that finished the previous
one, the official timing), each training sample i is valued, model in eval mode, no autograd,
one encoder pass: for every coalition S of modalities the fused head scores the sample with the
features outside S replaced by the absent value (zeros), ``c_S = 1[argmax head(z_S) = y_i]``,
``v(S) = |S| c_S`` (``v(empty) = 0``) and the exact Shapley value

    phi_m = sum_{S not containing m} |S|! (M - |S| - 1)! / M! * (v(S + m) - v(S)),

which for two modalities is ``phi_a = (v_a + v_av - v_v) / 2``. The epoch then trains on every
original sample once plus copies in which only one modality is kept (the others' features
zeroed after the encoder):

* ``level=sample`` (``sample_level.py``): sample i gets ``k(phi_{i,m})`` copies keeping only m,
  ``k = 1`` for ``0.4 < phi < 1``, 2 for ``-0.1 < phi < 0.4``, 3 for ``phi < -0.1``, else 0
  (:func:`copy_counts`). Worked cases (fused, a-only, v-only correct) -> (phi_a, phi_v):
  (1,1,1) -> (1, 1), no copies; (0,0,1) -> (-0.5, 0.5), 3 audio-only + 1 visual-only copies.
* ``level=modality`` (``modality_level.py``): Z = floor(part_ratio * N) indices drawn with
  replacement; ``gap_m = 1 - mean_Z phi_m``; ``diff = (2/3) |gap_a - gap_v| alpha`` (``func``
  linear; tanh of it; or ``((2/3)|gap_a - gap_v|)^1.5 alpha``); floor(diff * N) indices drawn with
  replacement are copied keeping only the modality with the larger gap (on a tie the last
  modality in the run's order is kept: the official audio/visual tie keeps visual).

The originals and copies are one row plan (``Phase.rows``), shuffled as one set; each batch
keeps ``index`` (the sample) and ``row`` (which copy), and the step looks up the row's kept
modalities, ``z_m <- z_m * keep[row, m]`` (out of place; the dropped encoder still runs on the
row, so its BatchNorm sees it, and its gradient for that row is zero: official).

**Cost.** The valuation pass (one eval forward over train, or over the distinct rows of Z, plus
2^M - 1 head evaluations per batch) runs inside ``trainer.estimation()``: its time and batches
are the method's estimation cost, reported apart from the epoch's training time. Training epochs
grow by the copies (at most 5 rows per sample at M = 2 under the official values); as training
accuracy saturates most samples reach phi = 1 and get none. No extra memory. No state to
checkpoint: the plan is recomputed at the start of each epoch from the checkpointed model, and
every draw is seeded from (seed, epoch), so a resumed run repeats it exactly. The valuation pass
runs with the global RNGs forked, so it never shifts the training epoch's own draws.

**Departures from the official code** (each with the option that restores the official one
where one exists):

* The official scripts do not run as released (a ``loader=`` keyword the data sets reject, an
  unbound loader in ``modality_level.py`` epoch 0, undefined ``args.dynamic``/``args.method``);
  this is the intended algorithm, with those bugs left out.
* Modality level values only the distinct indices of Z and weights each by its multiplicity (the
  official script values all of train and then averages Z): the same estimate in distribution,
  ~1/part_ratio cheaper. |Z| is at least 1 (the official code divides by 0 when
  floor(part_ratio N) = 0).
* No valuation during warm-up epochs: officially they are valued too, for logging only
  (``value_in_warmup=true`` logs them; training is unchanged either way).
* Draws come from NumPy generators seeded from (seed, epoch) instead of the global NumPy RNG.
* ``limit_train_batches`` (a smoke-test cap) caps the sample-level valuation pass as it caps
  training: samples past the cap are not valued and get no copies.
* ``drop=input`` is BalanceBenchmark's rule (the absent modality's *input* is blanked: for
  valuation the encoder's blank feature, as ``model.encode(drop=...)``; for the copies the raw
  input rows are zeroed before the train-mode encoder). Default ``feature`` (official).
* ``value=correct`` is BalanceBenchmark's value function ``v(S) = 1[correct]``. Default
  ``size_weighted`` (official). BalanceBenchmark's other deviations (its coalition cache reusing
  batch 0's values, its 4/3 modality-level factor with two copies per draw, a 1-epoch warm-up,
  the last partial batch left out) are not reproduced.
* Three or more modalities: the exact Shapley value over all 2^M coalitions with the same
  thresholds (sample level), and ``diff = (2/3) alpha (max_m gap_m - min_m gap_m)`` with copies
  keeping the modality of the largest gap (modality level). Both reduce to the official rules at
  M = 2; both are unverified extensions (the official code has two modalities).

**Valuation inputs.** The official valuation loader is built in the training mode of the data
set, so valuation reads *augmented* inputs (random crops, flips, frame draws; ``sample_level.py``
``train_val_dataset``): ``valuation_augment=true`` (default) does the same through the
trainer's training pipeline; ``false`` reads the evaluation pipeline. In-memory data sets
(avdigits, mfeat, synthetic, features) never augment, so the option changes nothing there.

**Open questions settled.**

* v(full) = 2 (``v(S) = |S| 1[correct]``): kept as the default because it is what the official
  code computes and what its thresholds were tuned on. Under it a sample that every coalition
  gets right has ``phi_m = 1`` for every m and any M (efficiency: the phi sum to v(full) = M),
  which is exactly where the copy count reaches 0; with ``value=correct`` such a sample has
  ``phi = 1/M`` and gets one copy per modality, every epoch. Settled as the official rule,
  BalanceBenchmark's reachable.
* Three modalities: the thresholds stay those of the two-modality values. Under the size-weighted
  value phi ranges over multiples of 1/6 at M = 3, none of which lies on a threshold (0.4, -0.1,
  1), so the rule is unambiguous; "phi >= 1 means a modality pulls its fair share" still holds
  (above). The run record marks three-modality runs as an unverified extension.
* The modality-level tie (gap_a = gap_v) also gives diff = 0, so at M = 2 it never acts; at
  M >= 3 a tie for the largest gap keeps the last tied modality, the official two-modality
  direction.

**Refused.** Fewer than two modalities; ``drop=input`` on a modality whose inputs are not a
float tensor (token inputs: no per-row blank), naming ``drop=feature``. The options of the
other level (``part_ratio``, ``alpha``, ``func`` at ``level=sample``) are refused rather than
silently ignored.

Diagnostics: per epoch (from the epoch hook) ``phi_<m>`` (mean Shapley value of m over the
valued samples, or over Z), ``copies_<m>`` (rows keeping only m), ``epoch_rows`` (rows / N);
at modality level also ``diff``; per step ``kept_<m>`` (share of the batch's rows keeping m).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmbalance.config import Option, Search
from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.method import Method, Phase
from mmbalance.registry import register_method

NAME = "valuation"

#: The official copy thresholds on phi (``dataloader.py``): (low, high, copies), open intervals.
THRESHOLDS: tuple[tuple[float, float, int], ...] = (
    (0.4, 1.0, 1),
    (-0.1, 0.4, 2),
    (-math.inf, -0.1, 3),
)

#: The option keys that only the modality level reads.
MODALITY_ONLY = ("part_ratio", "alpha", "func")

#: Streams of the seeded draws: Z, and the copies of the modality level.
STREAM_Z, STREAM_COPIES = 1, 2

OPTIONS: dict[str, Option] = {
    "level": Option("sample", "sample: copies per sample from its own Shapley values; modality: "
                    "copies of random samples keeping the weaker modality, from the mean values "
                    "on a random part Z of train", choices=("sample", "modality")),
    # search range: official 5 plain epochs before the first resampling
    "warmup": Option(5, "plain epochs before the first resampled one (official 5): the valuation "
                     "runs at the start of every epoch >= warmup", min=0, search=Search(1, 10)),
    "value": Option("size_weighted", "coalition value: size_weighted v(S) = |S| 1[correct] "
                    "(official), correct v(S) = 1[correct] (BalanceBenchmark)",
                    choices=("size_weighted", "correct")),
    "drop": Option("feature", "how a modality is absent, in valuation and in the copies: feature "
                   "= its pooled feature zeroed after the encoder (official), input = its input "
                   "blanked before the encoder (BalanceBenchmark)", choices=("feature", "input")),
    "valuation_augment": Option(True, "valuation reads train with the training augmentation "
                                "(official: its loader is built in train mode); false = the "
                                "evaluation pipeline"),
    "part_ratio": Option(0.2, "modality level: |Z| = floor(part_ratio * N) samples drawn with "
                         "replacement", min=0.0, max=1.0, min_open=True),
    "alpha": Option(1.0, "modality level: scale of the copy share diff", min=0.0),
    "func": Option("linear", "modality level: diff = (2/3) |gap gap| alpha (linear), tanh of it, "
                   "or ((2/3) |gap gap|)^1.5 alpha (square)", choices=("linear", "tanh", "square")),
    "value_in_warmup": Option(False, "also value during warm-up epochs, for the phi diagnostics "
                              "only (official; costs a valuation pass per epoch)",
                              changes_results=False),
}


# ---- the mathematics (pure functions) --------------------------------------------------------
def coalition_sizes(num_modalities: int) -> torch.Tensor:
    """|S| of every coalition, coalitions numbered by bit mask (bit j = modality j)."""
    masks = torch.arange(2**num_modalities)
    return torch.stack([(masks >> j) & 1 for j in range(num_modalities)]).sum(0)


def shapley_weights(num_modalities: int) -> torch.Tensor:
    """The (2^M, M) matrix W with ``phi = V @ W`` for coalition values V (B, 2^M).

    Column m: +|S|!(M-|S|-1)!/M! on the coalitions S + m (|S| counted without m), and the same
    weight negated on S itself, for every S not containing m: the exact Shapley value.
    """
    n = num_modalities
    w = torch.zeros(2**n, n, dtype=torch.float64)
    for m in range(n):
        for s in range(2**n):
            if s >> m & 1:
                continue
            size = bin(s).count("1")
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            w[s | 1 << m, m] += weight
            w[s, m] -= weight
    return w


def coalition_values(correct: torch.Tensor, value: str = "size_weighted") -> torch.Tensor:
    """``v(S)`` (B, 2^M) from ``correct`` (B, 2^M) bool: |S| 1[correct] or 1[correct];
    ``v(empty) = 0`` whatever column 0 holds."""
    num = int(round(math.log2(correct.shape[1])))
    v = correct.to(torch.float32)
    if value == "size_weighted":
        v = v * coalition_sizes(num).to(v.device, torch.float32)
    elif value != "correct":
        raise ValueError(f"unknown value function {value!r}")
    v[:, 0] = 0.0
    return v


def shapley_values(correct: torch.Tensor, value: str = "size_weighted") -> torch.Tensor:
    """Per-sample Shapley value of each modality, (B, M) fp32, from coalition correctness."""
    num = int(round(math.log2(correct.shape[1])))
    v = coalition_values(correct, value)
    return (v.double() @ shapley_weights(num).to(v.device)).float()


def copy_counts(phi: torch.Tensor) -> torch.Tensor:
    """Copies keeping only m for each phi (any shape), the official thresholds: 1 on (0.4, 1),
    2 on (-0.1, 0.4), 3 below -0.1, 0 elsewhere (phi >= 1, and the thresholds themselves)."""
    out = torch.zeros(phi.shape, dtype=torch.long, device=phi.device)
    for low, high, k in THRESHOLDS:
        out = torch.where((phi > low) & (phi < high), torch.full_like(out, k), out)
    return out


def sample_plan(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and kept modalities of a sample-level epoch from ``counts`` (N, M) copies.

    Rows: every sample once (all modalities kept), then per sample i and modality m (the official
    order) ``counts[i, m]`` copies keeping only m. Returns ``(rows (R,), keep (R, M) bool)``.
    """
    n, m = counts.shape
    flat = np.repeat(np.arange(n * m), counts.reshape(-1))
    return _plan(n, m, flat // m, flat % m)


def modality_copies(
    phi_mean: Sequence[float], num_samples: int, alpha: float = 1.0, func: str = "linear"
) -> tuple[float, int, int]:
    """The modality-level rule from the mean Shapley values on Z: ``(diff, copies, weak)``.

    ``gap_m = 1 - phi_mean_m``; ``diff = range(gap) / 3 * 2 * alpha`` (the official order of
    operations; at M = 2 the range is |gap_a - gap_v|), tanh of it, or ``(range / 3 * 2)^1.5 *
    alpha``; ``copies = floor(diff * N)``; ``weak`` = the modality with the largest gap, the last
    one on a tie.
    """
    gaps = [1.0 - float(p) for p in phi_mean]
    spread = max(gaps) - min(gaps)
    if func == "linear":
        diff = spread / 3 * 2 * alpha
    elif func == "tanh":
        diff = math.tanh(spread / 3 * 2 * alpha)
    elif func == "square":
        diff = (spread / 3 * 2) ** 1.5 * alpha
    else:
        raise ValueError(f"unknown func {func!r}")
    weak = max(range(len(gaps)), key=lambda j: (gaps[j], j))
    return diff, int(diff * num_samples), weak


def modality_plan(num_samples: int, num_modalities: int, drawn: np.ndarray, weak: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and kept modalities of a modality-level epoch: every sample once, then one copy per
    ``drawn`` index keeping only ``weak``."""
    drawn = np.asarray(drawn, dtype=np.int64)
    return _plan(num_samples, num_modalities, drawn, np.full(len(drawn), weak, dtype=np.int64))


def _plan(n: int, m: int, copy_rows: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.concatenate([np.arange(n, dtype=np.int64), np.asarray(copy_rows, dtype=np.int64)])
    keep = np.ones((len(rows), m), dtype=bool)
    keep[n:] = False
    keep[np.arange(n, len(rows)), kept] = True
    return rows, keep


def draw_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    """The generator of one draw of one epoch: the same (seed, epoch) draws the same rows."""
    return np.random.default_rng([int(seed), int(epoch), int(stream)])


def mask_rows(x: torch.Tensor, keep: torch.Tensor, blank: torch.Tensor) -> torch.Tensor:
    """``x`` with the rows where ``keep`` (B,) is false replaced by ``blank`` (broadcast)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    return torch.where(keep.view(shape), x, blank.to(dtype=x.dtype, device=x.device))


@contextlib.contextmanager
def forked_rng(device: torch.device) -> Iterator[None]:
    """Run a block (the valuation pass) without moving Python's, NumPy's or torch's RNGs."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


# ---- the plugin ------------------------------------------------------------------------------
@register_method(NAME, "Valuation: Shapley value of each modality per sample, copies keeping the "
                 "weak one (CVPR 2024; level=modality)")
class Valuation(Method):
    name = NAME
    description = "Sample-/modality-level valuation: resample the weak modality (CVPR 2024)"
    options = OPTIONS
    fusion = "concat"
    min_modalities = 2
    key_diagnostic = "phi_"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.level = str(self._opt("level"))
        if self.level == "sample":
            changed = [k for k in MODALITY_ONLY if self._opt(k) != OPTIONS[k].default]
            if changed:
                raise ConfigError(
                    f"Method '{NAME}': {', '.join(changed)} only act at level=modality, but the run "
                    f"has level=sample. Add --set level=modality, or drop those settings."
                )
        self.warmup = int(self._opt("warmup"))
        self.value = str(self._opt("value"))
        self.drop = str(self._opt("drop"))
        self.modalities: list[str] = []
        self.rows: np.ndarray | None = None  # the epoch's row plan (positions in train)
        self.keep: torch.Tensor | None = None  # (rows, M) 0/1 on the device

    def _opt(self, key: str) -> Any:
        """Option value; the declared default when ``cfg`` lacks it (a method built by hand)."""
        return self.cfg.get(key, OPTIONS[key].default)

    def configure_model(self, model: Any) -> None:
        self.modalities = list(model.modalities)

    # ---- valuation ------------------------------------------------------------------------
    def absent_features(self, batch: Mapping[str, Any], feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each modality's feature when it is absent: zeros (feature drop) or the encoder's
        feature of a blank input (input drop, = ``model.encode(batch, drop=[m])[m]``)."""
        assert self.model is not None
        if self.drop == "feature":
            return {m: torch.zeros_like(f) for m, f in feats.items()}
        return {m: self.model.blank_feature(m, batch[m]).expand_as(f).to(f.dtype) for m, f in feats.items()}

    def coalition_correct(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """(B, 2^M) bool: is the fused head right on each sample with only coalition S present."""
        assert self.model is not None and self.trainer is not None
        y = batch["label"]
        with self.trainer.autocast():
            feats = self.model.encode(batch)
            absent = self.absent_features(batch, feats)
            cols = [torch.zeros_like(y, dtype=torch.bool)]  # the empty coalition: never scored
            for s in range(1, 2 ** len(self.modalities)):
                present = {m: feats[m] if s >> j & 1 else absent[m] for j, m in enumerate(self.modalities)}
                cols.append(self.model.fuse(present).float().argmax(1) == y)
        return torch.stack(cols, dim=1)

    def value_rows(self, rows: Sequence[int] | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Shapley values (n, M) of the train rows ``rows`` (None: the whole pass over train, as
        ``limit_train_batches`` caps it) and which rows were valued (n,) bool; eval mode, no
        grad, charged as estimation, the RNGs forked."""
        assert self.trainer is not None
        dev = self.trainer.device
        phi = torch.zeros(n, len(self.modalities), device=dev)
        valued = torch.zeros(n, dtype=torch.bool, device=dev)
        augment = None if self._opt("valuation_augment") else False
        with self.trainer.estimation(), forked_rng(dev), torch.no_grad():
            for batch in self.trainer.iterate("train", rows=rows, grad=False, train_mode=False,
                                              shuffle=False, augment=augment, tag="valuation"):
                index = batch["index"]
                phi[index] = shapley_values(self.coalition_correct(batch), self.value)
                valued[index] = True
        return phi, valued

    def on_train_epoch_start(self, epoch: int) -> None:
        assert self.trainer is not None
        self.rows, self.keep = None, None
        if epoch < self.warmup and not self._opt("value_in_warmup"):
            return
        n = len(self.trainer.split("train"))
        if self.level == "sample":
            phi, valued = self.value_rows(None, n)
            mean = phi[valued].mean(0) if bool(valued.any()) else phi.new_zeros(len(self.modalities))
            if epoch >= self.warmup:
                counts = torch.where(valued.unsqueeze(1), copy_counts(phi), 0)
                rows, keep = sample_plan(counts.cpu().numpy())
        else:
            z = draw_rng(self.cfg["seed"], epoch, STREAM_Z).integers(0, n, size=max(1, int(n * float(self._opt("part_ratio")))))
            distinct, multiplicity = np.unique(z, return_counts=True)
            phi, _ = self.value_rows(distinct.tolist(), n)
            weights = torch.as_tensor(multiplicity, dtype=torch.float32, device=phi.device)
            mean = (phi[torch.as_tensor(distinct, device=phi.device)] * weights.unsqueeze(1)).sum(0) / len(z)
            if epoch >= self.warmup:
                diff, n_copies, weak = modality_copies(mean.tolist(), n, float(self._opt("alpha")),
                                                       str(self._opt("func")))
                drawn = draw_rng(self.cfg["seed"], epoch, STREAM_COPIES).integers(0, n, size=n_copies)
                rows, keep = modality_plan(n, len(self.modalities), drawn, weak)
                self.log(diff=float(diff))
        self.log(**{f"phi_{m}": mean[j] for j, m in enumerate(self.modalities)})
        if epoch < self.warmup:
            return
        self.rows = rows
        self.keep = torch.as_tensor(keep, dtype=torch.float32, device=self.trainer.device)
        copies = keep[n:].sum(0)
        self.log(epoch_rows=len(rows) / max(1, n), **{f"copies_{m}": float(copies[j]) for j, m in enumerate(self.modalities)})

    def epoch_plan(self, epoch: int) -> list[Phase] | None:
        return None if self.rows is None else [Phase(rows=self.rows)]

    # ---- training -------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        assert self.model is not None
        if self.keep is None or "row" not in batch:  # warm-up: plain joint training
            return F.cross_entropy(self.model.fuse(self.model.encode(batch)), batch["label"])
        keep = self.keep[batch["row"]]  # (B, M) of this batch's rows
        if self.drop == "input":
            feats = self.model.encode(self.blanked_inputs(batch, keep))
        else:
            feats = self.model.encode(batch)
            feats = {m: f * keep[:, j : j + 1].to(f.dtype) for j, (m, f) in enumerate(feats.items())}
        self.log(**{f"kept_{m}": keep[:, j].mean() for j, m in enumerate(self.modalities)})
        return F.cross_entropy(self.model.fuse(feats), batch["label"])

    def blanked_inputs(self, batch: Mapping[str, Any], keep: torch.Tensor) -> dict[str, Any]:
        """The batch with each row's absent modalities' inputs blanked (input drop)."""
        assert self.model is not None
        out = dict(batch)
        for j, m in enumerate(self.modalities):
            x = batch[m]
            if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
                raise UnsupportedError(
                    f"Method '{NAME}' with drop=input blanks the inputs of single rows, but modality "
                    f"'{m}' has non-float inputs ({type(x).__name__}). Use --set drop=feature (the "
                    f"official rule: zero the feature after the encoder)."
                )
            enc = self.model.encoders[m]
            blank = enc.blank_input(x) if hasattr(enc, "blank_input") else torch.zeros_like(x[:1])
            out[m] = mask_rows(x, keep[:, j] > 0, blank)
        return out

    # ---- reporting ------------------------------------------------------------------------
    def label(self) -> str:
        tags = []
        if self.warmup != OPTIONS["warmup"].default:
            tags.append(f"warmup {self.warmup}")
        if self.value != OPTIONS["value"].default:
            tags.append("v = 1[correct]")
        if self.drop != OPTIONS["drop"].default:
            tags.append("input drop")
        if not self._opt("valuation_augment"):
            tags.append("un-augmented valuation")
        if self.level == "modality":
            for key, short in (("part_ratio", "Z"), ("alpha", "alpha")):
                if self._opt(key) != OPTIONS[key].default:
                    tags.append(f"{short}={self._opt(key):g}")
            if self._opt("func") != OPTIONS["func"].default:
                tags.append(f"{self._opt('func')} diff")
        if self.level == "modality":
            tags.insert(0, "modality")
        return "Valuation" if not tags else f"Valuation ({', '.join(tags)})"

    def record_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "level": self.level,
            "value_function": "v(S) = |S| 1[correct] (official)" if self.value == "size_weighted"
            else "v(S) = 1[correct] (BalanceBenchmark)",
            "absent_modality": "pooled feature zeroed after the encoder (official)" if self.drop == "feature"
            else "input blanked before the encoder (BalanceBenchmark)",
            "valuation_inputs": "training pipeline, augmented (official)" if self._opt("valuation_augment")
            else "evaluation pipeline, un-augmented",
            "valuation_cost": "charged as estimation (estimation_cost), apart from training time",
            "first_resampled_epoch": self.warmup,
        }
        if len(self.modalities) > 2:
            info["three_or_more_modalities"] = ("unverified extension: exact Shapley over all "
                                                "coalitions, the two-modality thresholds")
        return info
