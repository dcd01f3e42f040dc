"""CUDA cells: bf16 autocast, peak memory, a resumed run on the GPU. Run with `pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch

from mmbalance.runner import run

pytestmark = pytest.mark.gpu

SMALL = {"n_train": 600, "n_test": 200, "epochs": 2, "progress": "off", "device": "cuda"}


@pytest.mark.parametrize("method", ["concat", "sum", "weight", "iprm"])
def test_cell_runs_on_cuda_with_bf16(method, tmp_path):
    r = run(method, "synthetic", {**SMALL, "records": str(tmp_path)})
    h = r.record["header"]
    assert h["device"].startswith("cuda") and h["amp"] == "bfloat16"
    e = r.record["epochs"][-1]
    assert e["peak_mem_mb"] > 0 and e["train_loss"] == e["train_loss"]
    assert r.final["last"]["test"]["fused"]["acc"] > 20.0


def test_avdigits_on_cuda_beats_chance(tmp_path, shared_data):
    r = run("concat", "avdigits", {"records": str(tmp_path), "device": "cuda", "epochs": 5, "progress": "off",
                                   "data_root": str(shared_data)})
    assert r.final["best_val"]["test"]["fused"]["acc"] > 60.0


def test_cuda_index_and_amp_off(tmp_path):
    r = run("concat", "synthetic", {**SMALL, "device": f"cuda:{torch.cuda.device_count() - 1}", "amp": "none",
                                    "records": str(tmp_path)})
    assert r.record["header"]["amp"] == "none"
