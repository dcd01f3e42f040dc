"""``mmbalance prepare``: one-time conversion of a raw paper release into a loader layout.

The dataset plugins read the layouts the field's code reads (docs/datasets/). Some of
those layouts are derived from the raw releases by scripts that run once (frame extraction,
audio extraction, optical flow, fbank features); this package is those scripts, written with
PyAV (FFmpeg) instead of OpenCV / moviepy / ffmpeg subprocesses:

* ``cremad``: raw CREMA-D (``VideoFlash/*.flv`` + ``AudioWAV/*.wav``) -> Layout B
  (``annotations/{train,test}.csv``, ``AudioWAV/``, ``Image-01-FPS/<clip>/00000.jpg``,
  ``00030.jpg``, ...: OGM-GE's current one-frame-per-second extractor; ``extractor=ten_frames``
  writes its earlier ten ``frame_00001.jpg ...`` instead).
* ``ksounds``: a folder of Kinetics clips + ``youtube_id,label`` csvs -> Layout C
  (``annotations/*.csv``, ``{split}_wav/<id>.wav``, ``{split}_img/Image-01-FPS/<id>/``).
* ``nvgesture``: the NVIDIA release -> renamed ``*_correct_v2.lst`` lists, the AVIs verified,
  and dense optical flow ``Video_data/flow_data/{split}/<line>.npy`` (256, 256, 2, T) computed
  with OpenCV's TV-L1 where its contrib build installs, or our own pyramidal Horn-Schunck
  (``method=horn_schunck``; the official flow algorithm is unknown, docs/datasets/nvgesture.md); the method
  of every file is recorded in ``flow_data/<split>/mmbalance_flow.json``.
* ``iemocap``: IEMOCAP sentence WAVs + MLA's split lists -> MLA Layout A (kaldi fbank
  ``.npy``, BERT token ``.npy`` when a local vocab is given, 256x256 faces when face crops
  are given).
* ``iemocap_mult``: MulT's IEMOCAP feature pickles (``iemocap_data.pkl`` /
  ``iemocap_data_noalign.pkl``) -> ``iemocap_data.npz`` / ``iemocap_data_noalign.npz``
  (arrays ``<split>__<key>``), which the loaders read with ``allow_pickle=False``. This is the
  one explicit trust step of the package: the only place a pickle is unpickled, on a file the
  user chose, and then only through an allow-list unpickler (numpy arrays in plain
  containers) that refuses a pickle referencing anything else before any of it runs.

``sarcasm`` needs no preparation (its loader reads the original release as distributed), so
it is listed in :data:`NOT_OFFERED` with the reason instead of being half-done here.

``cremad`` and ``ksounds`` can also build the optional input cache of
:mod:`mmbalance.cache` (memory-mapped spectrograms / fbanks and uint8 frames, read by runs
with ``--set cache=DIR``): ``--set cache=DIR`` after the preparation (``cache=true``: a
``<out>-cache`` folder beside OUT), with the dataset's settings from ``--set
cache_set={...}`` (e.g. ``{layout: A}``; default: the dataset's defaults, which are what a
run with no other settings reads); :func:`prepare_cache` builds or checks one for an already
prepared data root.

Every preparer is resumable: outputs are written to a temporary name and renamed into place,
finished outputs are skipped unless ``overwrite=True``, and a clip that cannot be decoded is
reported in the summary instead of stopping a 7,000-clip run. The summary (also written to
``<out>/mmbalance_prepare.json``) says what was written, skipped and why anything failed.

Layout: this ``__init__`` holds the registry and :func:`prepare`; one module per dataset
(``cremad``, ``ksounds``, ``nvgesture``, ``iemocap``, ``iemocap_mult``, each with its
``RAW_LAYOUT`` text);
``flow`` the optical flow (TV-L1, Horn-Schunck, their metadata); ``common`` the shared report, file, split, worker
pool and PyAV frame / audio extraction helpers.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mmbalance.errors import ConfigError, DataError, MMBalanceError, did_you_mean
from mmbalance.prepare import cremad, iemocap, iemocap_mult, ksounds, nvgesture
from mmbalance.prepare.common import (
    FRAME_EXTRACTORS,
    Report,
    frame_plan,
    per_second_plan,
    stratified_split,
)
from mmbalance.prepare.cremad import prepare_cremad
from mmbalance.prepare.flow import (
    FLOW_METHODS,
    FlowSettings,
    flow_provenance,
    horn_schunck,
    read_flow_meta,
    tvl1_available,
    tvl1_flow,
)
from mmbalance.prepare.flow import _gaussian_blur as _gaussian_blur  # used by tests
from mmbalance.prepare.flow import warp as warp
from mmbalance.prepare.iemocap import prepare_iemocap
from mmbalance.prepare.iemocap_mult import prepare_iemocap_mult
from mmbalance.prepare.ksounds import prepare_ksounds
from mmbalance.prepare.nvgesture import prepare_nvgesture

SUMMARY_FILE = "mmbalance_prepare.json"
# Datasets whose runs can read the input cache of mmbalance.cache (the audio + frames plugins).
CACHE_DATASETS = ("cremad", "ksounds")
# What a run's cache folder is called beside the prepared OUT when --set cache=true.
CACHE_SUFFIX = "-cache"

RAW_LAYOUTS: dict[str, str] = {
    "cremad": cremad.RAW_LAYOUT,
    "ksounds": ksounds.RAW_LAYOUT,
    "nvgesture": nvgesture.RAW_LAYOUT,
    "iemocap": iemocap.RAW_LAYOUT,
    "iemocap_mult": iemocap_mult.RAW_LAYOUT,
}

NOT_OFFERED: dict[str, str] = {
    "sarcasm": (
        "Dataset 'sarcasm' needs no preparation: its loader reads the original release "
        "(text/train.txt, text/valid2.txt, text/test2.txt with images/ or dataset_image/) as "
        "distributed and applies the authors' keyword filter itself. Point --data-root at the "
        "release folder and run."
    ),
}


PREPARERS: dict[str, Callable[..., Report]] = {
    "cremad": prepare_cremad,
    "ksounds": prepare_ksounds,
    "nvgesture": prepare_nvgesture,
    "iemocap": prepare_iemocap,
    "iemocap_mult": prepare_iemocap_mult,
}


def preparer_options(dataset: str) -> dict[str, Any]:
    """Option name -> default of one preparer (for the CLI's help and for validation)."""
    fn = _preparer(dataset)
    params = inspect.signature(fn).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _preparer(dataset: str) -> Callable[..., Report]:
    key = dataset.lower()
    if key in PREPARERS:
        return PREPARERS[key]
    if key in NOT_OFFERED:
        raise MMBalanceError(NOT_OFFERED[key])
    known = sorted(PREPARERS)
    raise ConfigError(
        f"No preparation step for dataset '{dataset}'. Known: {', '.join(known)} "
        f"(and {', '.join(sorted(NOT_OFFERED))}, which needs none).{did_you_mean(key, known + sorted(NOT_OFFERED))}"
    )


def prepare(dataset: str, raw: Path | str, out: Path | str, **options: Any) -> dict[str, Any]:
    """Run one dataset's preparer; returns (and writes to OUT/mmbalance_prepare.json) a summary.

    ``options`` are the preparer's keyword options (see :func:`preparer_options`); an unknown
    one is a ConfigError listing the valid names. Two more are understood for ``cremad`` and
    ``ksounds``: ``cache`` (a folder, or true for ``<OUT>-cache``) builds the input cache of
    the prepared layout afterwards with :func:`prepare_cache`, with the dataset settings in
    ``cache_set`` (a mapping); its summary is the ``cache`` entry. Raises DataError when RAW does not hold the
    expected raw release (the message shows :data:`RAW_LAYOUTS`), or when nothing at all
    could be prepared.
    """
    fn = _preparer(dataset)
    allowed = preparer_options(dataset)
    options = dict(options)
    cache = options.pop("cache", None)
    cache_set = options.pop("cache_set", None)
    if cache not in (None, False):
        _cache_overrides(dataset, cache_set)  # bad cache settings fail before hours of work
    elif cache_set is not None:
        raise ConfigError(f"cache_set is given but cache is not: add --set cache=DIR to 'mmbalance prepare {dataset}'.")
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise ConfigError(
            f"Unknown option(s) {', '.join(unknown)} for 'mmbalance prepare {dataset}'. Valid: "
            f"{', '.join(f'{k} (default {v!r})' for k, v in allowed.items())}."
            f"{did_you_mean(unknown[0], allowed)}"
        )
    raw_p, out_p = Path(raw).expanduser(), Path(out).expanduser()
    if not raw_p.is_dir():
        raise DataError(
            f"Raw folder '{raw_p}' does not exist or is not a directory. Expected: "
            f"{RAW_LAYOUTS.get(dataset.lower(), '')}"
        )
    out_p.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    report = fn(raw_p, out_p, **options)
    report.options = {**allowed, **options}
    summary = report.summary(time.monotonic() - start)
    done = sum(report.written.values()) + sum(report.skipped.values())
    _write_summary(out_p, summary)
    if cache not in (None, False) and done:  # the layout's summary is on disk even if this fails
        folder = out_p.parent / f"{out_p.name}{CACHE_SUFFIX}" if cache is True else Path(str(cache)).expanduser()
        summary["cache"] = prepare_cache(dataset, out_p, folder, **(cache_set or {}))
        _write_summary(out_p, summary)
    if report.failures and not done:
        raise DataError(
            f"'mmbalance prepare {dataset}' could not prepare anything: {len(report.failures)} "
            f"failures, e.g. {report.failures[0]['item']}: {report.failures[0]['error']}"
        )
    return summary


def _cache_overrides(dataset: str, cache_set: Any) -> dict[str, Any]:
    """The dataset settings a cache is built with, checked (names and values) against the
    dataset's options without reading any data."""
    key = dataset.lower()
    if key not in CACHE_DATASETS:
        raise ConfigError(
            f"Dataset '{dataset}' has no input cache; it is offered for "
            f"{', '.join(CACHE_DATASETS)} (audio + frames). Drop --set cache=..."
        )
    if cache_set is None:
        cache_set = {}
    if not isinstance(cache_set, Mapping):
        raise ConfigError(
            f"cache_set must be a mapping of {dataset} settings, e.g. --set 'cache_set={{layout: A}}'; "
            f"got {cache_set!r}."
        )
    bad = [k for k in cache_set if k in ("cache", "data_root")]
    if bad:
        raise ConfigError(f"cache_set cannot set {', '.join(bad)}: they are given by --set cache= and OUT.")
    from mmbalance.runner import resolve_config

    resolve_config("concat", key, {**cache_set, "cache": "unused"})  # unknown keys / bad values
    return dict(cache_set)


def prepare_cache(
    dataset: str,
    data_root: Path | str,
    cache: Path | str,
    *,
    workers: int | None = None,
    progress: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """Build (or, when it exists, check) the input cache of a prepared ``dataset``.

    ``data_root`` is what a run's ``--data-root`` would be; ``cache`` the folder a run will
    name with ``--set cache=DIR``; ``settings`` the dataset options the runs use (layout,
    audio_seconds, frames, image_size, cache_frame_size, ...; default: the dataset's own).
    The cache is built exactly as a run would build it on first use (every clip of the
    train, test and valid lists, in ``workers`` processes, default the CPUs up to 8), so a
    run with the same settings opens it without rebuilding. A cache already there is checked
    and a stale one refused (:class:`mmbalance.cache.StaleCacheError`). Returns a summary.
    """
    from mmbalance.cache import MANIFEST
    from mmbalance.runner import resolve_config

    key = dataset.lower()
    # val_fraction 0: the cache holds every train clip whatever a run carves for validation
    overrides = {"val_fraction": 0.0, **_cache_overrides(key, settings),
                 "data_root": str(Path(data_root).expanduser()), "cache": str(Path(cache).expanduser())}
    if workers:
        overrides["num_workers"] = int(workers)
    cfg, dataset_cls, _ = resolve_config("concat", key, overrides)
    existed = (Path(overrides["cache"]) / MANIFEST).is_file()
    start = time.monotonic()
    plugin = dataset_cls()
    splits = plugin.build(cfg, list(plugin.modality_names))
    return {
        "dataset": key,
        "data_root": overrides["data_root"],
        "settings": dict(settings),
        "action": "checked (already built)" if existed else "built",
        "seconds": round(time.monotonic() - start, 2),
        "sizes": splits.info.get("sizes"),
        **splits.info["input_cache"],
        "use": f"mmbalance run --dataset {key} --data-root {overrides['data_root']} --set cache={overrides['cache']}"
        + "".join(f" --set {k}={v}" for k, v in settings.items()),
    }


def _write_summary(out: Path, summary: Mapping[str, Any]) -> None:
    path = out / SUMMARY_FILE
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    os.replace(tmp, path)


__all__ = [
    "NOT_OFFERED",
    "PREPARERS",
    "RAW_LAYOUTS",
    "FLOW_METHODS",
    "FlowSettings",
    "flow_provenance",
    "read_flow_meta",
    "tvl1_available",
    "tvl1_flow",
    "FRAME_EXTRACTORS",
    "frame_plan",
    "per_second_plan",
    "horn_schunck",
    "CACHE_DATASETS",
    "prepare",
    "prepare_cache",
    "preparer_options",
    "stratified_split",
]
