"""Where and how reproducibly a run executes: the device it asked for, and its seeds.

The global RNGs and the data-loader shuffle are re-seeded at the start of every epoch from
(seed, epoch), so a run resumed after epoch k draws exactly what an uninterrupted run draws.
"""

from __future__ import annotations

import os
import random
import warnings
from typing import Any

import numpy as np
import torch

from mmbalance import records
from mmbalance.errors import ConfigError


class EmulatedBf16Warning(UserWarning):
    """bf16 autocast asked for on a CPU that emulates bf16 (several times slower than fp32)."""


def resolve_amp(amp: str, device: torch.device, kernels: dict[str, Any] | None = None) -> torch.dtype | None:
    """The autocast dtype of a run: ``auto`` is bf16 on CUDA and on a CPU with bf16 hardware
    (AMX or AVX512-BF16), fp32 (None) on any other CPU, where PyTorch would emulate bf16 at
    several times the cost of fp32. ``bf16`` is obeyed everywhere, with a warning where it is
    emulated; ``none`` is fp32 everywhere.

    A CPU's choice follows its hardware, so two CPU kinds can train one ``amp=auto`` cell in
    two precisions: the run header records the resolved precision (``amp``) and the CPU
    (``cpu_kernels``), a checkpoint is only continued in its own precision, and the
    leaderboard keeps the two apart."""
    if amp == "none":
        return None
    if device.type != "cpu":
        return torch.bfloat16 if amp in ("auto", "bf16") else None
    info = kernels if kernels is not None else records.cpu_kernels()
    native = bool(info.get("bf16_native"))
    if amp == "bf16" and not native:
        warnings.warn(
            f"amp=bf16 on a CPU without bf16 hardware ({records.cpu_kernels_label(info)}): PyTorch "
            f"emulates bf16 here, measured 5-8x slower than fp32 for a training step "
            f"(benchmarks/cpu_precision.py). Use --set amp=auto (fp32 on this CPU) unless you need "
            f"bf16's rounding.",
            EmulatedBf16Warning, stacklevel=2,
        )
    return torch.bfloat16 if (amp == "bf16" or native) else None


def amp_name(dtype: torch.dtype | None) -> str:
    """The recorded name of a resolved precision: ``bfloat16`` or ``none`` (fp32)."""
    return str(dtype).replace("torch.", "") if dtype is not None else "none"


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> first CUDA device if there is one, else CPU; CUDA asked for but absent -> error."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError(f"Bad device '{spec}': use auto, cpu, cuda or cuda:N.") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"Device '{spec}' was asked for, but PyTorch sees no CUDA device on this machine. "
                f"Use --device cpu (or auto)."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"Device '{spec}' does not exist: this machine has {torch.cuda.device_count()} "
                f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}."
            )
    elif dev.type != "cpu":
        raise ConfigError(f"Unsupported device '{spec}': use auto, cpu, cuda or cuda:N.")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63 - 1)


def _worker_init(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    base = info.seed if info is not None else worker_id
    np.random.seed(base % (2**32))
    random.seed(base)



def cpu_budget() -> tuple[int, str]:
    """How many CPUs this process may use, and what says so: a Slurm job's allocation
    (``SLURM_CPUS_PER_TASK``, else ``SLURM_CPUS_ON_NODE`` for a one-task job), the affinity
    mask (``taskset``, cgroups, Slurm's task plugin), else the machine's CPU count."""
    n = os.cpu_count() or 1
    why = f"the machine's {n} CPUs"
    try:
        mask = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        mask = n
    if mask < n:
        n, why = mask, f"the affinity mask ({mask} CPU{'' if mask == 1 else 's'})"
    for var in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        if var == "SLURM_CPUS_ON_NODE" and os.environ.get("SLURM_NTASKS", "1") != "1":
            continue  # shared by several tasks of one job: the per-task figure is unknown
        try:
            slurm = int(os.environ.get(var, ""))
        except ValueError:
            continue
        if 0 < slurm < n:
            n, why = slurm, f"{var}={slurm}"
        break
    return n, why


def limit_cpu_threads() -> dict[str, Any]:
    """Lower torch's intra-op threads to :func:`cpu_budget` (never raise them: a user's
    ``OMP_NUM_THREADS`` or ``torch.set_num_threads`` stands). A Slurm task given one CPU of a
    two-core node otherwise runs two threads on it (torch counts the machine's cores), which
    is slower and sums in another order than the allocation says. Returns what was used and
    why, for the run's record."""
    budget, why = cpu_budget()
    before = torch.get_num_threads()
    if before > budget:
        torch.set_num_threads(budget)
    return {"threads": torch.get_num_threads(), "cpus_available": budget, "cpus_from": why,
            "lowered_from": before if before > budget else None}
