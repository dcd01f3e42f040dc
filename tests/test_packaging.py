"""Installability: the wheel carries the plugins; our datasets/ folder never shadows HF datasets."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_contains_core_and_plugins(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    wheel = next(tmp_path.glob("mmbalance-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("mmbalance/trainer.py", "mmbalance/methods/concat.py", "mmbalance/methods/unimodal.py",
                 "mmbalance/datasets/avdigits.py", "mmbalance/datasets/synthetic.py", "mmbalance/backbones/resnet.py",
                 "mmbalance/prepare/cremad.py", "mmbalance/backbones/i3d.py"):
        assert path in names, path
    assert not any(n.startswith("datasets/") or n.startswith("methods/") for n in names)


def test_top_level_datasets_folder_does_not_shadow(tmp_path):
    code = (
        "import importlib.util, sys\n"
        "try:\n"
        "    import datasets\n"
        "    origin = datasets.__file__ or ''\n"
        "except ModuleNotFoundError as e:\n"
        "    origin = 'missing: ' + str(e)\n"
        f"assert not origin.startswith({str(REPO)!r}), origin\n"
        "import transformers, mmbalance.datasets\n"
        "from mmbalance.registry import DATASETS\n"
        "assert 'avdigits' in DATASETS\n"
        "print('ok', origin)\n"
    )
    # the repository root first on sys.path, as with `python -m pytest` or a REPL started there
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")
