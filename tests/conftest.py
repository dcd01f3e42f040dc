"""Test-wide settings: offline hubs, no wandb by default, the shared data root, GPU skipping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# amp=auto trains in bf16 on a CPU with bf16 hardware and in fp32 on others; tests of
# hand-computed values must mean the same on every CI machine, so oneDNN is capped below its
# bf16 instructions for the whole session (subprocesses inherit it): auto then resolves to
# fp32 everywhere, with the same fp32 kernels. tests/test_cpu_precision.py tests the
# resolution itself through the kernels dict and in capped subprocesses.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MMBALANCE_TEST_DATA", REPO.parent / "shared" / "data"))
os.environ.setdefault("MMBALANCE_DATA_ROOT", str(SHARED_DATA))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "fsdd" / "recordings").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def fast(tmp_path: Path) -> dict:
    """Overrides for quick CPU runs writing records under tmp_path."""
    return {"records": str(tmp_path / "runs"), "progress": "off", "device": "cpu"}


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny models on a shared 2-core machine: extra OpenMP threads only add barrier waits.
    Method test modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
