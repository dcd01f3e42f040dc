"""Checkpoints: the state of the last finished epoch, saved each epoch and restored on resume.

Everything a resumed run needs to draw exactly what an uninterrupted run draws: the model,
every optimizer (configured ones and those a phase plan created), the schedules, the method's
own state, the counters and the history. Read with ``weights_only=True`` (a pickle planted in a
shared run folder cannot execute); a checkpoint of other settings or other data is refused.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from mmbalance import records
from mmbalance.engine.runtime import amp_name
from mmbalance.method import EstimationCost


class Checkpoints:
    """Mixed into :class:`mmbalance.engine.loop.Trainer`."""

    _checkpoint_saved_at = 0.0  # time.monotonic() of the last save, or of the fit's start

    def _checkpoint_due(self, epoch: int) -> bool:
        """Every epoch by default. With ``checkpoint_every_s`` > 0, an epoch's checkpoint waits
        until that many seconds passed since the last one (or since this process started the
        fit), and the last epoch's is always saved (finished runs are read from it). Where epochs
        take a fraction of a second (the feature sets' MLPs) saving each was 13 % of a cell; a
        killed run resumes from an older epoch and repeats the rest to the same numbers. The
        record's epoch lines are written on the same beat (each write is a fsync'd file): a
        killed run's record then shows the epochs its checkpoint holds, which a resume keeps."""
        interval = float(self.cfg.get("checkpoint_every_s") or 0.0)
        now = time.monotonic()
        if interval <= 0 or epoch == self.cfg["epochs"] - 1 or now - self._checkpoint_saved_at >= interval:
            self._checkpoint_saved_at = now
            return True
        return False

    def _save_checkpoint(self, epoch: int) -> None:
        assert self.model is not None
        state = {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "phase_optimizers": sorted(self._phase_keys),
            "schedulers": {k: sch.state_dict() for k, sch in self.schedulers.items()},
            "estimation_cost": self.estimation_cost.as_dict(),
            "extra_batches": self.extra_batches,
            "method": self.method.state_dict(),
            "global_step": self.method.global_step,
            "optimizer_steps": self.optimizer_steps,
            "history": self.history,
            "config_hash": self.hash,
            "data_fingerprint": self.data_fingerprint,
            "amp": amp_name(self.amp_dtype),
        }
        records.atomic_torch_save(state, self.run_dir / records.CHECKPOINT)

    def restore_checkpoint(self) -> int:
        """Restore the last finished epoch; returns the next epoch to run (0 if none).

        The file is read with ``weights_only=True``: a pickle planted in a shared run folder
        cannot execute. A checkpoint of another configuration or other data is refused.
        """
        path = self.run_dir / records.CHECKPOINT
        if not path.exists():
            return 0
        assert self.model is not None
        state = records.load_checkpoint(path, self.device)
        for key, mine in (("config_hash", self.hash), ("data_fingerprint", self.data_fingerprint)):
            if key in state and state[key] != mine:
                raise records.RecordError(
                    f"The checkpoint '{path}' was written for other {'data' if key == 'data_fingerprint' else 'settings'} "
                    f"({key} {state[key]!r}, this run has {mine!r}); it will not be continued on "
                    f"these. Rerun with --fresh to start this run over."
                )
        self._check_precision(state, path)
        try:
            return self._restore(state)
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise records.RecordError(
                f"The checkpoint '{path}' does not fit this run ({type(exc).__name__}: {exc}). "
                f"Rerun with --fresh to start this run over."
            ) from exc

    def _check_precision(self, state: Mapping[str, Any], path: Any) -> None:
        """A run trains in one precision: ``amp=auto`` resolves by hardware, so a checkpoint
        written on a CPU with bf16 hardware is not continued in fp32 elsewhere (or back).
        A checkpoint from before the precision was saved trained under the rule of its time:
        bf16 on CUDA, fp32 on any CPU (checkpoints do not travel between the two)."""
        saved = state.get("amp")
        if saved is None:
            cfg_amp = self.cfg.get("amp", "auto")
            gpu = self.device.type == "cuda"
            saved = "bfloat16" if cfg_amp == "bf16" or (cfg_amp == "auto" and gpu) else "none"
        mine = amp_name(self.amp_dtype)
        if saved != mine:
            def word(name: str) -> str:
                return "bf16" if name == "bfloat16" else "fp32"

            raise records.RecordError(
                f"The checkpoint '{path}' trained in {word(saved)}, but amp={self.cfg.get('amp')} means "
                f"{word(mine)} on this device ({records.cpu_kernels_label(records.cpu_kernels()) if self.device.type == 'cpu' else self.device}); "
                f"one run is not continued in two precisions. Continue it on a machine where amp="
                f"{self.cfg.get('amp')} means {word(saved)}, or rerun with --fresh to start it over here."
            )

    def _restore(self, state: Mapping[str, Any]) -> int:
        assert self.model is not None
        self.model.load_state_dict(state["model"])
        saved = dict(state["optimizers"])
        phase_keys = set(state.get("phase_optimizers", []))
        if set(saved) - phase_keys != set(self.optimizers):
            raise ValueError(f"optimizers {sorted(set(saved) - phase_keys)} saved, {sorted(self.optimizers)} configured")
        for k, opt in self.optimizers.items():
            opt.load_state_dict(saved[k])
        # a phase's optimizer is re-created by its phase, then given its saved state
        self._pending_optimizer_states = {k: saved[k] for k in phase_keys}
        for k, sched in self.schedulers.items():
            sched.load_state_dict(state["schedulers"][k])
        self.estimation_cost = EstimationCost(**state.get("estimation_cost", {}))
        self.extra_batches = int(state.get("extra_batches", 0))
        self.method.load_state_dict(state["method"])
        self.method.global_step = state["global_step"]
        self.optimizer_steps = state["optimizer_steps"]
        self.history = list(state["history"])
        return state["epoch"] + 1


    _load_checkpoint = restore_checkpoint  # the name earlier code and tests use
