"""Peak memory of one training epoch: the accelerator's peak allocation on CUDA, the process's
peak resident set on a CPU.

Linux keeps the peak resident set (VmHWM) per process and resets it to the current RSS when
"5" is written to /proc/self/clear_refs, so a grid worker that trains many cells still gets
each epoch's own peak. Where that is not possible (another OS, a locked-down /proc) the figure
is the process's lifetime peak from getrusage, and its kind says so.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


def reset_peak(device: torch.device) -> str:
    """Start a new peak window; returns the kind of figure :func:`peak_mb` will give."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_allocated"
    try:
        CLEAR_REFS.write_text("5")
        return "rss_peak_epoch"
    except OSError:
        return "rss_peak_process"


def _vm_hwm_kb() -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_mb(device: torch.device, kind: str) -> float | None:
    """The peak since :func:`reset_peak` (MiB)."""
    if kind == "cuda_max_allocated":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if kind == "rss_peak_epoch":
        kb = _vm_hwm_kb()
        if kb is not None:
            return kb / 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return maxrss / (2**20 if sys.platform == "darwin" else 1024)
