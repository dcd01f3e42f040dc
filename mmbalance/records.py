"""Run records: one directory per run, named by the hash of its configuration.

Layout of a run directory::

    record.jsonl       header line, one line per finished epoch, final line (when done)
    config.yaml        the resolved configuration, for humans and for re-running
    checkpoint.pt      model/optimizer/scheduler/method state after the last finished epoch
    diagnostics/       per-step method diagnostics, one JSON-lines file per epoch
    DONE               marker: the run finished and its record is complete

Every file is written to a temporary name and renamed, so a crash never leaves half a record.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
import yaml

DONE = "DONE"
RECORD = "record.jsonl"
CHECKPOINT = "checkpoint.pt"


def run_dir_name(cfg: Mapping[str, Any], cfg_hash: str) -> str:
    return f"{cfg['dataset']}_{cfg['method']}_s{cfg['seed']}_{cfg_hash}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_config(path: Path, cfg: Mapping[str, Any]) -> None:
    atomic_write_text(path, yaml.safe_dump(dict(cfg), sort_keys=True))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def load_record(run_dir: Path) -> dict[str, Any]:
    """Fold a record.jsonl into {'header':..., 'epochs': [...], 'final':..., 'done': bool}."""
    rows = read_jsonl(run_dir / RECORD)
    rec: dict[str, Any] = {"header": {}, "epochs": [], "final": None}
    for row in rows:
        kind = row.get("type")
        if kind == "header":
            rec["header"] = row
        elif kind == "epoch":
            rec["epochs"].append(row)
        elif kind == "final":
            rec["final"] = row
    rec["done"] = (run_dir / DONE).exists()
    rec["run_dir"] = str(run_dir)
    return rec


def code_version() -> dict[str, Any]:
    """The package version plus, in a git checkout, the commit and whether it is dirty."""
    info: dict[str, Any] = {"mmbalance": _pkg_version("mmbalance")}
    src = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True, text=True, timeout=5,
            )
            info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def library_versions() -> dict[str, Any]:
    libs = ["torch", "torchvision", "torchaudio", "timm", "transformers", "numpy", "scikit-learn", "pandas"]
    out: dict[str, Any] = {"python": platform.python_version()}
    out.update({lib: _pkg_version(lib) for lib in libs})
    out["cuda"] = torch.version.cuda
    return out


def find_runs(root: Path) -> list[Path]:
    """Every run directory under ``root`` (any depth) that holds a record."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(p.parent for p in root.rglob(RECORD))
