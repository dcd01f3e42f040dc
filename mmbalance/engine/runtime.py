"""Where and how reproducibly a run executes: the device it asked for, and its seeds.

The global RNGs and the data-loader shuffle are re-seeded at the start of every epoch from
(seed, epoch), so a run resumed after epoch k draws exactly what an uninterrupted run draws.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from mmbalance.errors import ConfigError


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

