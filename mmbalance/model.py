"""Model assembly: one encoder and one unimodal head per modality, plus a method-built fusion.

Parameters are addressed by group (``encoder_params(m)``, ``uni_head_params(m)``,
``fusion_params()``), never by substring-matching names, so gradient methods modulate exactly
the encoder whatever its architecture (the documentation's ogm page, departures).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmbalance.data import ModalitySpec
from mmbalance.errors import ConfigError, UnsupportedError, did_you_mean
from mmbalance.registry import BACKBONES


@dataclass
class Outputs:
    feats: dict[str, torch.Tensor]
    uni: dict[str, torch.Tensor]
    fused: torch.Tensor | None


class MultimodalModel(nn.Module):
    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        num_classes: int,
        fusion: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.modalities = list(encoders)
        self.num_classes = num_classes
        self.encoders = nn.ModuleDict(dict(encoders))
        self.uni_heads = nn.ModuleDict(
            {m: nn.Linear(enc.out_dim, num_classes) for m, enc in encoders.items()}
        )
        self.fusion = fusion
        self.extra = nn.ModuleDict()  # method-owned modules/parameters (e.g. a learnable beta)

    @property
    def dims(self) -> dict[str, int]:
        return {m: enc.out_dim for m, enc in self.encoders.items()}

    def encode(self, batch: Mapping[str, Any], drop: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """Features of every modality; those in ``drop`` are encoded from a blank input.

        Blank input (for Shapley coalitions and imbalance diagnostics): an encoder may define
        ``blank_input(x)``; otherwise floating tensors become zeros. Token inputs have no
        default blank (id 0 is a real token), so their backbone must define one. A blank
        gives every row the same feature (in eval mode), so one row is encoded and expanded.
        """
        dropped = set(drop)
        unknown = dropped - set(self.modalities)
        if unknown:
            raise ValueError(f"cannot drop {sorted(unknown)}: the model has {self.modalities}")
        out: dict[str, torch.Tensor] = {}
        for m, enc in self.encoders.items():
            if m in dropped:
                x = batch[m]
                n = _batch_len(x)
                row = self.blank_feature(m, x)
                out[m] = row.expand(n, *row.shape[1:])
            else:
                out[m] = enc(batch[m])
        return out

    def encoder_inputs(self, batch: Mapping[str, Any], drop: Iterable[str] = ()) -> dict[str, Any]:
        """What each encoder receives: ``batch[m]``, or for ``m`` in ``drop`` its blank input
        repeated over the batch (see :meth:`encode`). For methods that run the encoders
        themselves, e.g. through their staged view (mmbalance/backbones/staged.py); the
        absent-modality diagnostics shadow it as they shadow ``encode``."""
        dropped = set(drop)
        unknown = dropped - set(self.modalities)
        if unknown:
            raise ValueError(f"cannot drop {sorted(unknown)}: the model has {self.modalities}")
        out: dict[str, Any] = {}
        for m in self.modalities:
            x = batch[m]
            if m in dropped:
                blank = self.blank_input(m, x)
                x = blank.expand(_batch_len(x), *blank.shape[1:])
            out[m] = x
        return out

    def blank_input(self, m: str, x: Any) -> Any:
        """One row of modality ``m``'s blank input (see :meth:`encode`)."""
        enc = self.encoders[m]
        if hasattr(enc, "blank_input"):
            return enc.blank_input(x)
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return torch.zeros_like(x[:1])
        raise UnsupportedError(
            f"Modality '{m}' has non-float inputs ({type(x).__name__}) and its backbone "
            f"{type(enc).__name__} defines no blank_input(); an absent-modality pass "
            f"cannot blank it."
        )

    def blank_feature(self, m: str, x: Any) -> torch.Tensor:
        """The (1, d) feature of modality ``m``'s blank input (see :meth:`encode`)."""
        enc = self.encoders[m]
        blank = self.blank_input(m, x)
        was = enc.training
        enc.eval()  # batch statistics of one blank row would be meaningless
        try:
            return enc(blank)
        finally:
            enc.train(was)

    def unimodal_logits(self, feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.uni_heads[m](feats[m]) for m in self.modalities}

    def fuse(self, feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.fusion is None:
            raise RuntimeError("this model has no fused head")
        return self.fusion(feats)

    def forward(self, batch: Mapping[str, Any]) -> Outputs:
        feats = self.encode(batch)
        fused = self.fuse(feats) if self.fusion is not None else None
        return Outputs(feats, self.unimodal_logits(feats), fused)

    # parameter groups -------------------------------------------------------------------
    def encoder_params(self, m: str) -> list[nn.Parameter]:
        return list(self.encoders[m].parameters())

    def uni_head_params(self, m: str) -> list[nn.Parameter]:
        return list(self.uni_heads[m].parameters())

    def fusion_params(self) -> list[nn.Parameter]:
        return list(self.fusion.parameters()) if self.fusion is not None else []

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = {}
        for m in self.modalities:
            groups[f"encoder.{m}"] = self.encoder_params(m)
            groups[f"uni_head.{m}"] = self.uni_head_params(m)
        groups["fusion"] = self.fusion_params()
        groups["extra"] = list(self.extra.parameters())
        return groups


# Backbones the official code of the papers starts from pretrained weights (docs/datasets/*.md):
# without backbone.<m>.weights they start from random weights here, which the run must say.
PRETRAINED_IN_PAPERS: dict[str, str] = {
    "i3d": "Kinetics-400 I3D (NVGesture)",
    "resnet50": "ImageNet ResNet-50 (Sarcasm)",
    "bert": "bert-base-uncased (Sarcasm, IEMOCAP)",
    "clip_vision": "CLIP ViT-B/32 vision tower",
    "clip_text": "CLIP text tower",
    "vit": "M3AE / CAV-MAE visual branch (IEMOCAP)",
    "fbank_transformer": "CAV-MAE audio branch (IEMOCAP)",
    "m3ae_text": "M3AE text branch (IEMOCAP)",
}


def sha256_of(path: Path) -> str:
    """Content hash of a weights file, or of every file in a weights folder (sorted names)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def weights_record(table: Mapping[str, Any], modalities: Iterable[str]) -> dict[str, Any]:
    """Per encoder: ``{"backbone", "weights": "random"}`` or the weights' path and SHA-256,
    and whether the papers' code starts that backbone pretrained."""
    out: dict[str, Any] = {}
    for m in modalities:
        entry = dict(table.get(m) or {})
        name = entry.get("name")
        weights = entry.get("weights")
        rec: dict[str, Any] = {"backbone": name, "pretrained_in_papers": PRETRAINED_IN_PAPERS.get(str(name))}
        if weights:
            p = Path(weights).expanduser()
            rec.update(weights=str(p.resolve()), sha256=sha256_of(p) if p.exists() else None)
        else:
            rec["weights"] = "random"
        out[m] = rec
    return out


def random_init_warning(record: Mapping[str, Any]) -> str | None:
    """The warning for encoders the papers start pretrained that this run starts at random."""
    random = [f"{m} ({r['backbone']}: the papers load {r['pretrained_in_papers']})"
              for m, r in record.items() if r["weights"] == "random" and r["pretrained_in_papers"]]
    if not random:
        return None
    return ("random init: " + "; ".join(random) + ". Numbers will not be comparable with the papers'. "
            "Set --set backbone.<modality>.weights=PATH to start from local pretrained weights.")


def _batch_len(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.shape[0]
    if isinstance(x, Mapping):
        return _batch_len(next(iter(x.values())))
    return len(x)


def backbone_options(builder: Any) -> list[str] | None:
    """The options a backbone builder takes (its parameters after ``spec`` and ``out_dim``), or
    None when it takes any (``**options``)."""
    params = list(inspect.signature(builder).parameters.values())[2:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def check_backbone_options(modality: str, name: str, options: Mapping[str, Any]) -> None:
    """Refuse a ``backbone.<modality>.<option>`` the backbone does not take, with the closest
    of its own options, before anything is built (a typo would otherwise be a TypeError from
    deep inside the builder, or, through a grid, a failed cell after the others trained)."""
    builder = BACKBONES.get(name)
    accepted = backbone_options(builder)
    if accepted is None:
        return
    unknown = [k for k in options if k != "name" and k not in accepted]
    if unknown:
        bad = " ".join(f"'{k}'.{did_you_mean(k, accepted)}" for k in unknown)
        raise ConfigError(
            f"Backbone '{name}' of modality '{modality}' has no option {bad}",
            choices=f"Options of backbone '{name}' (backbone.{modality}.<option>): name, {', '.join(accepted)}.",
        )


def build_encoder(
    modality: str, spec: ModalitySpec, table: Mapping[str, Any], embed_dim: int | None
) -> nn.Module:
    """Build one encoder from its ``backbone.<modality>`` config entry."""
    entry = dict(table.get(modality) or {})
    name = entry.pop("name", None) or spec.extras.get("default_backbone")
    if not name:
        raise ConfigError(
            f"No backbone is configured for modality '{modality}'. Set one with "
            f"--set backbone.{modality}.name=NAME (see 'mmbalance list backbones')."
        )
    builder = BACKBONES.get(name)
    check_backbone_options(modality, name, entry)
    weights = entry.pop("weights", None)
    try:
        enc = builder(spec, embed_dim, weights=weights, **entry)
    except TypeError as exc:
        raise ConfigError(
            f"Backbone '{name}' for modality '{modality}' rejected its settings {entry}: {exc}. "
            f"Check the backbone.{modality}.* keys."
        ) from exc
    if not hasattr(enc, "out_dim"):
        raise TypeError(f"backbone {name} did not set out_dim on the module it built")
    return enc
