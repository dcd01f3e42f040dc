"""Finding a finished recorded run by its identity, to reuse what it trained (UMT's teachers).

A run is found only where it must be: the folder its configuration hash names, the hash of the
settings the wanted run would have (the asking run's trainer and dataset settings, the other
method's defaults, the given overrides) and of the data it reads. Nothing is guessed from
folder names or taken because it is the newest: a run of other settings has another hash and
is simply not there, and a folder whose record, DONE marker or checkpoint disagrees with that
identity (other data, other settings, unfinished) is refused with the reason. The checkpoint is
read with ``weights_only=True``, so a planted pickle cannot run code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mmbalance import records
from mmbalance.config import config_hash, declared_options
from mmbalance.errors import MMBalanceError


class RecordedRunError(MMBalanceError):
    """No finished run with the wanted identity, or one whose files disagree with it."""


@dataclass
class RecordedRun:
    """A finished run found by identity: its folder, hash, folded record and final model state."""

    run_dir: Path
    config_hash: str
    record: dict[str, Any]
    model_state: dict[str, Any]


def identity_config(cfg: Mapping[str, Any], dataset_cls: Any, method_cls: Any,
                    overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration a run of ``method_cls`` with the same trainer and dataset settings as
    ``cfg`` (the method's own options at their defaults, then ``overrides``) would hold."""
    shared = declared_options(dataset_cls, None)
    out = {k: v for k, v in cfg.items() if k in shared}
    for k, opt in (getattr(method_cls, "options", None) or {}).items():
        out[k] = getattr(opt, "default", opt)
    unknown = [k for k in overrides if k not in out]
    if unknown:
        raise RecordedRunError(f"method {method_cls.name} has no setting {', '.join(map(repr, unknown))}.")
    out.update(overrides)
    out["method"], out["dataset"] = method_cls.name, dataset_cls.name
    return out


def find_recorded_run(records_root: Path, cfg: Mapping[str, Any], fingerprint: Mapping[str, Any],
                      dataset_cls: Any, method_cls: Any, command: str,
                      map_location: Any = None) -> RecordedRun:
    """The finished run of configuration ``cfg`` on the data of ``fingerprint`` under
    ``records_root``; ``command`` is what the error tells the user to run when it is missing."""
    digest = config_hash(cfg, data=fingerprint, dataset_cls=dataset_cls, method_cls=method_cls)
    run_dir = Path(records_root) / records.run_dir_name(cfg, digest)
    where = f"a finished '{method_cls.name}' run of {cfg['dataset']} (seed {cfg['seed']}) with these settings"
    if not run_dir.is_dir() or not records.is_done(run_dir):
        state = "is unfinished" if run_dir.is_dir() else "does not exist"
        raise RecordedRunError(
            f"Found no {where}: its folder '{run_dir}' {state}. {_others(records_root, cfg)}"
            f"Train it first with `{command}`, or let the method train what it needs in the cell."
        )
    records.check_run_folder(run_dir, itself=False)
    rec = records.load_record(run_dir)
    header = rec["header"]
    _same(run_dir, "record", "config_hash", header.get("config_hash"), digest)
    _same(run_dir, "record", "data_fingerprint", header.get("data_fingerprint"), dict(fingerprint))
    path = run_dir / records.CHECKPOINT
    if not path.exists():
        raise RecordedRunError(
            f"The {where} in '{run_dir}' kept no checkpoint (it ran with checkpoint=false), so its "
            f"weights cannot be reused. Rerun it with `{command} --fresh`."
        )
    state = records.load_checkpoint(path, map_location)
    _same(run_dir, "checkpoint", "config_hash", state.get("config_hash"), digest)
    _same(run_dir, "checkpoint", "data_fingerprint", state.get("data_fingerprint"), dict(fingerprint))
    return RecordedRun(run_dir, digest, rec, dict(state["model"]))


def _same(run_dir: Path, what: str, key: str, found: Any, wanted: Any) -> None:
    if found != wanted:
        kind = "data" if key == "data_fingerprint" else "settings"
        raise RecordedRunError(
            f"The run folder '{run_dir}' has the name of the wanted run, but its {what} was written for "
            f"other {kind} ({key} {found!r}, wanted {wanted!r}); it will not be reused. Remove the "
            f"folder, or retrain it with --fresh."
        )


def _others(records_root: Path, cfg: Mapping[str, Any]) -> str:
    """Which recorded runs of the same method, dataset and seed exist, and how their settings
    differ from the wanted ones (a hint, never a substitute)."""
    prefix = f"{cfg['dataset']}_{cfg['method']}_s{cfg['seed']}_"
    root = Path(records_root)
    found = sorted(p for p in root.glob(prefix + "*") if p.is_dir()) if root.is_dir() else []
    notes = []
    for p in found[:3]:
        try:
            theirs = yaml.safe_load(records.read_bytes_nofollow(p / "config.yaml")) or {}
        except (OSError, yaml.YAMLError, records.RecordError):
            continue
        diff = sorted(k for k in set(cfg) | set(theirs)
                      if k not in ("records", "progress", "log_epochs") and theirs.get(k) != cfg.get(k))
        notes.append(f"'{p.name}' differs in {', '.join(diff) if diff else 'the data it read'}")
    return ("Recorded runs of that method, dataset and seed, not reused: " + "; ".join(notes) + ". ") if notes else ""
