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


def probe_run(run_dir: Path, device: str = "cpu", write: bool = True) -> dict[str, Any]:
    """Diagnostics of a recorded run from its checkpoint, written to ``run_dir/diagnostics.json``
    when ``write`` (see :func:`save_diagnostics`).

    The checkpoint (the last finished epoch) is loaded with ``weights_only=True`` through the
    trainer's own restore, which refuses one of other settings or data. Computing needs no
    lock and creates nothing, so a run on read-only media can be probed; a run that is being
    trained is refused (its checkpoint changes under the probe), and so is a run folder that
    holds a symbolic link (nothing is read or written through one).
    """
    run_dir = Path(run_dir)
    _check_run_folder(run_dir)
    records.check_run_folder(run_dir, itself=False)
    if not (run_dir / records.CHECKPOINT).is_file():
        raise DiagnosticsError(
            f"The run '{run_dir}' has no {records.CHECKPOINT} (it was trained with "
            f"checkpoint=false, or the file was removed), so its trained weights are gone. "
            f"Retrain it with --set checkpoint=true --fresh to get diagnostics."
        )
    holder = records.lock_holder(run_dir)
    if holder is not None:
        raise records.RunLockedError(
            f"Run folder '{run_dir}' is being trained by another process ({holder}); its checkpoint "
            f"changes every epoch. Probe it when the run has finished (or after stopping it)."
        )
    trainer = rebuild_trainer(run_dir, device)
    h = records.load_record(run_dir)
    trainer.setup()
    next_epoch = trainer.restore_checkpoint()
    trainer.method.resumed = True
    trainer.method.on_fit_start()  # the hook that finishes a restore (pending method state)
    diag = compute_diagnostics(trainer.eval_view())
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
    if write:
        save_diagnostics(run_dir, diag)
    return diag


def save_diagnostics(run_dir: Path, diag: Mapping[str, Any]) -> Path:
    """Write ``diag`` as the run's diagnostics.json, holding the run folder's lock (the only
    write a probe makes; never through a link). A folder that cannot be written (read-only
    media) is a DiagnosticsError saying the diagnostics were computed but not saved."""
    run_dir = Path(run_dir)
    try:
        with records.RunLock(run_dir):
            records.check_run_folder(run_dir)
            return write_diagnostics(run_dir, diag)
    except records.RecordsIOError as exc:
        raise DiagnosticsError(
            f"The diagnostics were computed but not saved: {exc} (The run folder cannot be written, "
            f"e.g. read-only media; copy it to a writable folder to keep them there.)"
        ) from exc


def probe_main(run_dir: str, device: str = "cpu") -> int:
    """``mmbalance probe RUN_DIR``: compute, print and write a run's diagnostics (test split, %).

    The table is printed before diagnostics.json is written, so a read-only run folder still
    gets its diagnostics on screen (and a clear error that they were not saved)."""
    diag = probe_run(Path(run_dir), device=device, write=False)
    run = diag["run"]
    state = "finished" if run["done"] else "NOT finished (last checkpoint)"
    print(f"{run['method_label'] or run['method']} on {run['dataset']} (seed {run['seed']}, after epoch "
          f"{run['checkpoint_epoch'] + 1}, {state}) — imbalance diagnostics on the test split, in %:")
    print(format_table(diag), flush=True)
    print(f"diagnostics: {save_diagnostics(Path(run_dir), diag)}")
    return 0
