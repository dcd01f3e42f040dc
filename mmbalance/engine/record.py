"""The run record: its header (what ran, where, with what code and data), one entry per
process that trained it (resumes included), and the atomic write of the JSON-lines file."""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from mmbalance import records
from mmbalance.engine.runtime import amp_name


class RunRecord:
    """Mixed into :class:`mmbalance.engine.loop.Trainer`."""

    def _header(self) -> dict[str, Any]:
        assert self.splits is not None
        dev = str(self.device)
        if self.device.type == "cuda":
            dev += f" ({torch.cuda.get_device_name(self.device)})"
        return {
            "type": "header",
            "config": self.cfg,
            "config_hash": self.hash,
            "method_label": self.method.label(),
            "method_info": {
                "per_modality": self.method.per_modality_source(),
                "trains_unimodal_heads": self.method.trains_unimodal_heads(),
                **self.method.record_info(),
            },
            "modalities": self.modalities,
            "dataset_info": {
                "num_classes": self.splits.num_classes,
                "class_names": self.splits.class_names,
                "sizes": {s: len(getattr(self.splits, s)) for s in ("train", "val", "test")},
                **self.splits.info,
            },
            "device": dev,
            "amp": amp_name(self.amp_dtype),  # amp=auto resolved: bf16 or fp32 ("none") on this device
            "cpu_threads": torch.get_num_threads(),  # float sums depend on it: same seed, same threads
            "cpu_allocation": getattr(self, "cpu_allocation", None) or None,  # the CPUs it was given, and why
            "thp_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),  # speed only (mmbalance/__init__.py)
            "heap": getattr(self, "heap", None) or None,  # speed only (engine/heap.py)
            "cpu_kernels": records.cpu_kernels(),  # AMX and AVX512-BF16 round bf16 sums differently
            "data_fingerprint": self.data_fingerprint,
            "weights": self.weights,  # per encoder: "random", or the path and its SHA-256
            "code_version": records.code_version(),
            "versions": records.library_versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def _write_record(self, header: dict[str, Any], final: dict[str, Any] | None) -> None:
        rows = [header] + [{"type": "epoch", **e} for e in self.history]
        if final is not None:
            rows.append({"type": "final", **final})
        records.write_jsonl(self.run_dir / records.RECORD, rows)


    def _segments(self, start: int) -> list[dict[str, Any]]:
        """One entry per process that trained this run (resumes included), with what makes
        float sums differ between them (threads, device)."""
        previous: list[dict[str, Any]] = []
        if start and (self.run_dir / records.RECORD).exists():
            old = records.load_record(self.run_dir)["header"]
            previous = list(old.get("segments") or [])
        return previous + [{
            "from_epoch": start,
            "cpu_threads": torch.get_num_threads(),
            "device": str(self.device),
            "cpu_kernels": records.cpu_kernels(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }]

