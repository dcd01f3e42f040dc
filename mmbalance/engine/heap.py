"""Keep the memory a training step frees in the process, so the next step does not fault it in.

A CPU training step allocates and frees the same large activations every step (the AV-digits
CNN's first block: 16 MB per tensor). glibc's malloc hands blocks above its mmap threshold
(128 KiB at first, rising to at most 32 MiB as it sees them freed) straight back to the kernel
and trims the top of its heap past 128 KiB, so every step maps fresh pages and the kernel zeroes
each one on first touch: about 4,200 page faults per AV-digits step, measured here. Raising the
two thresholds and padding the heap's growth keeps the freed blocks for reuse: 0 faults per step,
and a step 1/0.9 as fast on both an AVX512 CPU and the same CPU capped to AVX2
(``benchmarks/bench_speed.py::test_retained_heap``).

Only where memory comes from changes, never an arithmetic result (a test trains one cell both ways
and compares the records). The cost is memory: a process keeps its largest step's working set
after the step ends, up to :data:`TRIM_THRESHOLD` of freed memory at the top of its heap; one
block above 32 MiB still comes from and goes back to the kernel. ``MMBALANCE_HEAP=default``
leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Any

# mallopt(3) parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 1024 * 1024 * 1024
TOP_PAD = 64 * 1024 * 1024

_state: dict[str, Any] | None = None


def retain_freed_memory() -> dict[str, Any]:
    """Set glibc malloc's thresholds once per process (later calls return the first answer).
    Returns what was done, for the run's header: ``{"heap": "retained", ...}``, or
    ``{"heap": "default", "why": ...}`` where the user opted out or the C library is not glibc."""
    global _state
    if _state is not None:
        return _state
    if os.environ.get("MMBALANCE_HEAP", "").strip().lower() == "default":
        _state = {"heap": "default", "why": "MMBALANCE_HEAP=default"}
        return _state
    if not sys.platform.startswith("linux"):
        _state = {"heap": "default", "why": f"not Linux ({sys.platform})"}
        return _state
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only; musl's mallopt is a no-op
    except (OSError, AttributeError) as exc:
        _state = {"heap": "default", "why": f"no glibc mallopt ({exc})"}
        return _state
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = {"mmap_threshold": (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                "trim_threshold": (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                "top_pad": (_M_TOP_PAD, TOP_PAD)}
    failed = [name for name, (param, value) in settings.items() if mallopt(param, value) != 1]
    if failed:
        _state = {"heap": "default", "why": f"mallopt refused {', '.join(failed)}"}
    else:
        _state = {"heap": "retained", **{name: value for name, (_, value) in settings.items()}}
    return _state
