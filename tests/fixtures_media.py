"""Helpers shared by the paper dataset plugins' tests (CREMA-D, Kinetics-Sounds, NVGesture,
IEMOCAP, Sarcasm): real media files for fixtures, and the checks of a tiny concat run.

conftest.py already keeps the hubs offline and skips ``gpu``-marked tests without CUDA.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

# Extra overrides of the few-steps bf16 run on CUDA (NVGesture, IEMOCAP, Sarcasm).
CUDA_BF16 = {"device": "cuda", "amp": "bf16", "epochs": 2, "limit_train_batches": 2, "num_workers": 2}

# ------------------------------------------------------------------------------ media files


def write_wav(path: Path, seconds: float = 1.0, rate: int = 16000, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A real 16-bit PCM WAV of noise + a tone; returns the int16 samples written."""
    rng = np.random.default_rng(seed)
    n = int(rate * seconds)
    t = np.arange(n) / rate
    sig = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(n)
    data = (np.clip(sig, -1, 1) * 32767).astype(np.int16)
    if channels > 1:
        data = np.stack([data] + [(data // (c + 1)) for c in range(1, channels)], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, rate, subtype="PCM_16")
    return data


def write_frames(folder: Path, count: int, names: str = "{:05d}.jpg", step: int = 30, size=(40, 36)) -> None:
    """``count`` random JPEG frames named ``names.format(k * step)`` (1-fps style by default)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(count)
    for k in range(count):
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / names.format(k * step), format="JPEG")


def write_indexed_frames(folder: Path, count: int, names: str = "frame_{:05d}.jpg", size=(24, 20)) -> None:
    """``count`` flat JPEG frames whose red value encodes the index: frame k has red 20 k + 10
    (k < 12), so a loaded clip tells which frames were picked (:func:`frame_indices`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        arr = np.full((size[1], size[0], 3), 60, dtype=np.uint8)
        arr[..., 0] = 20 * k + 10
        Image.fromarray(arr).save(folder / names.format(k), format="JPEG", quality=95)


def frame_indices(visual: Any) -> list[int]:
    """The frame indices of a (3, T, H, W) ImageNet-normalised stack of :func:`write_indexed_frames`."""
    red = visual[0].mean(dim=(1, 2)) * 0.229 + 0.485  # undo Normalize on the red channel
    return [int(round((float(r) * 255 - 10) / 20)) for r in red]


# ------------------------------------------------------------------------------ tiny runs


def runner() -> Any:
    """The trainer's entry point, or a skip while it is still being written."""
    if not Path("/tmp/mmbalance_trainer_ready").exists():
        pytest.importorskip("mmbalance.runner", reason="the trainer is not written yet")
    return pytest.importorskip("mmbalance.runner")


def av_run_overrides(root: Path, tmp_path: Path, device: str) -> dict:
    """A tiny concat run on an audio + frames fixture (CREMA-D, Kinetics-Sounds)."""
    return {
        "data_root": str(root), "epochs": 1, "device": device, "records": str(tmp_path / "runs"),
        "limit_train_batches": 1, "limit_eval_batches": 1, "batch_size": 2, "check_manifest": False,
        "image_size": 32, "audio_seconds": 0.5, "val_fraction": 0.5, "embed_dim": 64,
        "checkpoint": False,
    }


def check_av_concat_step(dataset: str, root: Path, tmp_path: Path) -> None:
    """One CPU concat step through the runner on an audio + frames fixture."""
    result = runner().run("concat", dataset, overrides=av_run_overrides(root, tmp_path, "cpu"))
    final = result.record["final"]
    assert final and result.run_dir.exists()
    assert "best_test" in json.dumps(final)  # the selection rules (docs/guides/protocols.md) were recorded


def check_av_bf16_steps_on_cuda(dataset: str, root: Path, tmp_path: Path) -> None:
    """A few bf16 steps on CUDA with paper-sized audio on an audio + frames fixture."""
    over = av_run_overrides(root, tmp_path, "cuda")
    over.update({"limit_train_batches": 3, "epochs": 2, "amp": "bf16", "image_size": 64, "audio_seconds": 3.0})
    result = runner().run("concat", dataset, overrides=over)
    assert result.record["final"]


def check_cuda_bf16_steps(dataset: str, overrides: dict) -> None:
    """concat with ``overrides`` (including :data:`CUDA_BF16`) trains every epoch to a finite
    loss on CUDA in bfloat16."""
    from mmbalance.runner import run

    result = run("concat", dataset, overrides=overrides)
    assert len(result.record["epochs"]) == overrides["epochs"]
    assert all(np.isfinite(e["train_loss"]) for e in result.record["epochs"])
    assert result.record["header"]["device"].startswith("cuda")
    assert result.record["header"]["amp"] == "bfloat16"
