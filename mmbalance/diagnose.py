"""Imbalance diagnostics of a recorded run folder (``mmbalance probe RUN_DIR``).

The run is rebuilt from its record's configuration on the current code, its last checkpoint
restored through the trainer's own restore (``weights_only=True``; a checkpoint of other
settings or data is refused), and :func:`mmbalance.diagnostics.compute_diagnostics` run on it.
This is the run layer over the pure diagnostics: it imports the runner and the trainer, which
never import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmbalance import records
from mmbalance.config import flatten_backbone
from mmbalance.diagnostics import (
    DIAGNOSTICS_FILE,
    DiagnosticsError,
    compute_diagnostics,
    format_table,
    write_diagnostics,
)
from mmbalance.engine.loop import Trainer
from mmbalance.errors import MMBalanceError
from mmbalance.runner import make_trainer


def _check_run_folder(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise DiagnosticsError(f"'{run_dir}' is not a folder. Pass a run folder (runs/<dataset>_<method>_s<seed>_<hash>).")
    if not (run_dir / records.RECORD).is_file():
        raise DiagnosticsError(
            f"'{run_dir}' holds no {records.RECORD}, so it is not a run folder. Pass a folder "
            f"that `mmbalance run` wrote (runs/<dataset>_<method>_s<seed>_<hash>)."
        )


def rebuild_trainer(run_dir: Path, device: str = "cpu") -> Trainer:
    """The trainer of a recorded run, from its record header's configuration (not set up).

    The configuration is replayed as overrides on the current code (``records`` pointed at the
    run's parent folder, the device replaced); the rebuilt run folder must be ``run_dir``
    itself, else the run cannot be reproduced (renamed folder, other data, changed code) and
    this is an error naming the difference.
    """
    run_dir = Path(run_dir)
    _check_run_folder(run_dir)
    header = records.load_record(run_dir)["header"]
    cfg = header.get("config")
    if not isinstance(cfg, Mapping) or not cfg.get("method") or not cfg.get("dataset"):
        raise DiagnosticsError(f"The record of '{run_dir}' holds no configuration with a method and a dataset; it is damaged.")
    overrides = flatten_backbone({k: v for k, v in cfg.items() if k not in ("method", "dataset")})
    overrides.update(records=str(run_dir.parent), device=device, progress="off")
    try:
        trainer = make_trainer(cfg["method"], cfg["dataset"], overrides)
    except MMBalanceError as exc:
        raise DiagnosticsError(
            f"The run '{run_dir}' cannot be rebuilt from its recorded configuration with this "
            f"version of the suite: {exc}"
        ) from exc
    if trainer.run_dir.resolve() != run_dir.resolve():
        why = []
        if header.get("config_hash") and header["config_hash"] != trainer.hash:
            why.append(f"its settings now hash to {trainer.hash}, the record says {header['config_hash']}")
        if "data_fingerprint" in header and header["data_fingerprint"] != trainer.data_fingerprint:
            why.append("the data it reads has another fingerprint now (other files or another data root)")
        if not why:
            why.append(f"the folder is named '{run_dir.name}', not '{trainer.run_dir.name}' (renamed?)")
        raise DiagnosticsError(
            f"The recorded configuration of '{run_dir}' rebuilds the run folder "
            f"'{trainer.run_dir}', not this one: {'; '.join(why)}. Diagnostics would not "
            f"describe the recorded run; point --data-root (or $MMBALANCE_DATA_ROOT) at the "
            f"run's data, or keep the folder's original name."
        )
    return trainer


def probe_run(run_dir: Path, device: str = "cpu") -> dict[str, Any]:
    """Diagnostics of a recorded run from its checkpoint, written to ``run_dir/diagnostics.json``.

    The checkpoint (the last finished epoch) is loaded with ``weights_only=True`` through the
    trainer's own restore, which refuses one of other settings or data. The run folder's lock
    is held meanwhile, so a run still training is reported instead of read half-way.
    """
    run_dir = Path(run_dir)
    _check_run_folder(run_dir)
    if not (run_dir / records.CHECKPOINT).is_file():
        raise DiagnosticsError(
            f"The run '{run_dir}' has no {records.CHECKPOINT} (it was trained with "
            f"checkpoint=false, or the file was removed), so its trained weights are gone. "
            f"Retrain it with --set checkpoint=true --fresh to get diagnostics."
        )
    trainer = rebuild_trainer(run_dir, device)
    with records.RunLock(run_dir):
        trainer.setup()
        next_epoch = trainer.restore_checkpoint()
        trainer.method.resumed = True
        trainer.method.on_fit_start()  # the hook that finishes a restore (pending method state)
        diag = compute_diagnostics(trainer.eval_view())
        h = records.load_record(run_dir)
        diag["run"] = {
            "run_dir": str(run_dir),
            "method": trainer.cfg["method"],
            "method_label": h["header"].get("method_label"),
            "dataset": trainer.cfg["dataset"],
            "seed": trainer.cfg["seed"],
            "checkpoint_epoch": next_epoch - 1,
            "done": bool(h["done"]),
            "device": str(trainer.device),
        }
        write_diagnostics(run_dir, diag)
    return diag


def probe_main(run_dir: str, device: str = "cpu") -> int:
    """``mmbalance probe RUN_DIR``: compute, write and print a run's diagnostics (test split, %)."""
    diag = probe_run(Path(run_dir), device=device)
    run = diag["run"]
    state = "finished" if run["done"] else "NOT finished (last checkpoint)"
    print(f"{run['method_label'] or run['method']} on {run['dataset']} (seed {run['seed']}, epoch "
          f"{run['checkpoint_epoch']}, {state}) — imbalance diagnostics on the test split, in %:")
    print(format_table(diag))
    print(f"diagnostics: {Path(run_dir) / DIAGNOSTICS_FILE}")
    return 0
