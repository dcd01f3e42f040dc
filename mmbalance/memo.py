"""Per-process reuse of what the cells of one grid worker share: built in-memory splits and
file content hashes.

A grid worker trains many cells of the same dataset one after another (seeds, methods).
Building AV-digits' splits decodes 3,000 WAV files and computes their spectrograms (about 2 s,
as long as three of its training epochs); hashing the files for the run identity reads them
again. Both results are pure functions of their inputs, so a worker computes them once.

Reuse never changes a number: a build is reused only when every config key it read has the
same value (the keys are recorded while it runs), for the same modalities and the same data
fingerprint, and only for plugins that declare ``pure_build`` (no global RNG, nothing read
outside the config and the fingerprinted files). A file hash is reused only while the file's
size, modification time and inode are unchanged and the modification is older than
:data:`RACY_SECONDS` (git's "racy" rule: a write within the clock's granularity of the first
hash could leave the time unchanged).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

MAX_SPLITS = 4  # built datasets kept per process (AV-digits: about 50 MB each)
RACY_SECONDS = 2.0

_splits: OrderedDict[tuple[Any, ...], list[tuple[dict[str, str], Any]]] = OrderedDict()
_file_hashes: dict[tuple[Any, ...], str] = {}  # a few entries: one per dataset file list


class ReadTracker(Mapping):
    """A read-only view of a config that records which keys were read. Iterating it (``dict(cfg)``,
    ``cfg.items()``) counts as reading every key."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self._cfg = cfg
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return self._cfg[key]

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.read.add(key)
        return key in self._cfg

    def __iter__(self) -> Iterator[str]:
        self.read.update(self._cfg)
        return iter(self._cfg)

    def __len__(self) -> int:
        return len(self._cfg)


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def _matches(reads: Mapping[str, str], cfg: Mapping[str, Any]) -> bool:
    return all(_canon(cfg.get(k, KeyError)) == v for k, v in reads.items())


def reuse_splits(
    build: Callable[[Mapping[str, Any], Sequence[str]], Any],
    owner: str,
    cfg: Mapping[str, Any],
    modalities: Sequence[str],
    fingerprint: Mapping[str, Any],
) -> Any:
    """``build(cfg, modalities)``, or a copy of an earlier result for the same inputs. The copy
    shares the (never modified) datasets and owns its ``info`` dict and split attributes, so a
    cell that re-carves train (a held-out slice) or annotates ``info`` leaves the kept one alone."""
    key = (owner, tuple(modalities), _canon(fingerprint))
    for reads, splits in _splits.get(key, []):
        if _matches(reads, cfg):
            _splits.move_to_end(key)
            return dataclasses.replace(splits, info=copy.deepcopy(splits.info))
    tracker = ReadTracker(cfg)
    splits = build(tracker, modalities)
    reads = {k: _canon(cfg.get(k, KeyError)) for k in tracker.read}
    _splits.setdefault(key, []).append((reads, splits))
    _splits.move_to_end(key)
    while sum(len(v) for v in _splits.values()) > MAX_SPLITS:
        oldest = next(iter(_splits))
        _splits[oldest].pop(0)
        if not _splits[oldest]:
            del _splits[oldest]
    return dataclasses.replace(splits, info=copy.deepcopy(splits.info))


def files_hash(paths: Sequence[Path], root: Path, compute: Callable[[], str]) -> str:
    """``compute()`` (a hash of ``paths``), reused while every file is provably unchanged (see
    the module notes)."""
    stats = [os.stat(p) for p in paths]
    key = (str(root), *((str(p), s.st_size, s.st_mtime_ns, s.st_ino, s.st_dev) for p, s in zip(paths, stats, strict=True)))
    hit = _file_hashes.get(key)
    if hit is not None:
        return hit
    digest = compute()
    newest = max((s.st_mtime for s in stats), default=0.0)
    if time.time() - newest > RACY_SECONDS:
        _file_hashes[key] = digest
    return digest


def clear() -> None:
    """Forget everything (tests; a long-lived process that wants its memory back)."""
    _splits.clear()
    _file_hashes.clear()
