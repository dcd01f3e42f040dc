"""``mmbalance prepare iemocap_mult``: MulT's IEMOCAP feature pickles -> safe ``.npz`` files.

MulT (yaohungt/Multimodal-Transformer) ships IEMOCAP as ``iemocap_data.pkl`` (word-aligned)
and ``iemocap_data_noalign.pkl``: ``{'train' | 'valid' | 'test': {'text', 'audio', 'vision',
'labels', ...}}`` with numpy arrays (docs/datasets/iemocap_mult.md). Loading a pickle can run
arbitrary code, and a data root is often a shared, user-writable folder, so the ``iemocap`` /
``iemocap_mult`` loaders do not unpickle by default: they read the ``.npz`` this preparer
writes, with ``np.load(..., allow_pickle=False)``.

Trust step: this preparer is the one place a MulT pickle is unpickled, once, on a file the
user chose to convert (justified: the MulT release exists only as pickles), and only through
:class:`RestrictedUnpickler`, never the plain loader; it resolves only the globals a pickle of numpy arrays in plain containers needs (numpy's array /
dtype / scalar reconstructors, ``_codecs.encode`` for latin-1 bytes, builtin containers) and
refuses every other one (``os.system``, ``builtins.exec``, ``subprocess.*``, any class), so a
planted pickle fails with a DataError before any of its code runs. It is an allow-list, not
a sandbox (a crafted file can still ask for a lot of memory), so convert files you chose.

Output, per pickle found in RAW: ``OUT/<stem>.npz`` (``iemocap_data.npz`` /
``iemocap_data_noalign.npz``), one array per split and key named ``<split>__<key>`` for the
splits train / valid / test and the keys the loader reads (``text``, ``audio``, ``vision``,
``labels``), stored with their original dtype and values (the loader's float32 cast and
``-inf`` zeroing happen at load time, as before). Other keys (e.g. ``id``) are left out and
named in the summary. Written to ``<name>.partial`` and renamed into place; an existing
``.npz`` is skipped unless ``overwrite=True``. This module imports numpy only (no torch).
"""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mmbalance.errors import DataError
from mmbalance.prepare.common import Report

PICKLES = ("iemocap_data.pkl", "iemocap_data_noalign.pkl")  # aligned, unaligned
SPLITS = ("train", "valid", "test")
KEYS = ("text", "audio", "vision", "labels")  # what the iemocap loader reads
SEP = "__"  # array name = f"{split}{SEP}{key}"

RAW_LAYOUT = (
    "RAW = a folder holding MulT's IEMOCAP feature pickles iemocap_data.pkl (word-aligned) "
    "and/or iemocap_data_noalign.pkl ({'train','valid','test'} -> {'text','audio','vision',"
    "'labels'} numpy arrays). Writes OUT/iemocap_data.npz / OUT/iemocap_data_noalign.npz "
    "(arrays '<split>__<key>'), which the iemocap and iemocap_mult loaders read with "
    "allow_pickle=False; OUT may be RAW itself. TRUST STEP: this is the one place the pickles "
    "are unpickled (a pickle can run arbitrary code when loaded), so run it only on files you "
    "chose; its restricted unpickler accepts only numpy arrays in plain containers and "
    "refuses a pickle that references anything else."
)


def npz_name(pickle_name: str) -> str:
    """``iemocap_data.pkl`` -> ``iemocap_data.npz``."""
    return Path(pickle_name).stem + ".npz"


# --------------------------------------------------------------------- restricted unpickler


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside :data:`RestrictedUnpickler`'s allow-list."""

    def __init__(self, module: str, name: str) -> None:
        self.global_name = f"{module}.{name}"
        super().__init__(
            f"global '{self.global_name}' is not allowed (only numpy arrays, dtypes, scalars "
            f"and builtin containers may be unpickled)"
        )


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as pickle protocols < 3 use it for bytes: latin-1 of a str only."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError(
            f"_codecs.encode is only allowed as pickle's latin-1 bytes encoding, not "
            f"encode({type(obj).__name__}, {encoding!r}, {errors!r})"
        )
    return obj.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("collections", "OrderedDict"): OrderedDict,
    }
    for core in ("numpy.core", "numpy._core"):  # numpy 1.x and 2.x pickles name either
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    for mod in ("builtins", "__builtin__"):  # Python 3 and Python 2 pickles
        for cls in (dict, list, tuple, set, frozenset, bytearray, complex):
            allowed[(mod, cls.__name__)] = cls
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that only rebuilds numpy arrays / scalars / dtypes in plain containers.

    ``find_class`` is the only way a pickle reaches code (every REDUCE / BUILD / NEWOBJ needs a
    callable or class from it), so answering it from a fixed allow-list refuses ``os.system``,
    ``builtins.eval`` / ``exec`` / ``open``, ``subprocess.Popen``, ``getattr`` and every class
    before anything runs. Persistent ids and out-of-band buffers are refused too (pickle's
    defaults without ``persistent_load`` / ``buffers``).
    """

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _allowed_globals()
        try:
            return RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(module, name) from None


def load_mult_pickle(path: Path) -> Mapping[str, Any]:
    """Unpickle one MulT file through :class:`RestrictedUnpickler` (latin-1 for Python 2 str).

    Raises DataError when the pickle references anything but numpy arrays and containers
    (nothing of it has run then), cannot be read, or is not a dict of splits.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # The one deliberate unpickle (the user's own conversion step): the allow-list
            # unpickler refuses every global but numpy's array reconstructors and builtins.
            # safe by design: an allow-list of numpy reconstructors, every other global refused
            data = RestrictedUnpickler(f, encoding="latin1").load()
    except ForbiddenGlobal as exc:
        raise DataError(
            f"Refused to unpickle '{path}': it references '{exc.global_name}', which is not a "
            f"numpy array or a plain container, so loading it could run code. MulT's IEMOCAP "
            f"pickles hold only dicts of numpy arrays: check where this file came from."
        ) from exc
    except Exception as exc:
        raise DataError(f"Could not read the pickle '{path}': {exc}. Is it MulT's IEMOCAP file?") from exc
    if not isinstance(data, Mapping):
        raise DataError(f"'{path}' holds a {type(data).__name__}; expected a dict of splits.")
    return data


# ------------------------------------------------------------------------------- conversion


def mult_arrays(data: Mapping[str, Any], source: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """A MulT dict of splits -> ({'<split>__<key>': array}, keys left out).

    Every split must be there (a dict); of :data:`KEYS` the ones present are kept with their
    dtype, so the loader's checks (shapes, labels) still see the original values. An object
    array (e.g. a list of same-shape arrays) is stacked to float32, because ``.npz`` files
    read with ``allow_pickle=False`` cannot hold objects.
    """
    arrays: dict[str, np.ndarray] = {}
    dropped: set[str] = set()
    for split in SPLITS:
        if split not in data:
            raise DataError(f"'{source}' has no '{split}' split (keys: {sorted(map(str, data))}).")
        part = data[split]
        if not isinstance(part, Mapping):
            raise DataError(f"'{source}' split '{split}' is a {type(part).__name__}; expected a dict of arrays.")
        dropped.update(str(k) for k in part if k not in KEYS)
        for key in KEYS:
            if key in part:
                arrays[f"{split}{SEP}{key}"] = _plain_array(part[key], source, split, key)
    return arrays, sorted(dropped)


def _plain_array(value: Any, source: Path, split: str, key: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            arr = np.array(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"'{source}' split '{split}': '{key}' is not a numeric array ({exc}); MulT's "
            f"files hold (N, L, D) features and (N, 4, 2) labels."
        ) from exc
    return arr


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez`` to ``<path>.partial``, check it reads back without pickle, rename into place."""
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:  # a file object: savez adds no second '.npz'
            np.savez(f, **arrays)
        with np.load(tmp, allow_pickle=False) as check:
            if sorted(check.files) != sorted(arrays):
                raise DataError(f"'{tmp}' did not read back the arrays written to it.")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def prepare_iemocap_mult(raw: Path, out: Path, *, overwrite: bool = False) -> Report:
    """MulT's IEMOCAP pickles in RAW -> ``OUT/<stem>.npz`` (see the module docstring).

    TRUST STEP: this is the one place MulT's pickles are unpickled; run it on files you
    chose. The unpickler is :class:`RestrictedUnpickler` (numpy arrays in plain containers
    only): a pickle that references any other global is refused with a DataError before any
    of its code runs, and no ``.npz`` is written for it. Converts every one of
    ``iemocap_data.pkl`` / ``iemocap_data_noalign.pkl`` present in RAW; an existing ``.npz``
    in OUT is kept unless ``overwrite=True``.
    """
    raw, out = Path(raw), Path(out)
    found = [raw / name for name in PICKLES if (raw / name).is_file()]
    if not found:
        raise DataError(f"'{raw}' holds neither {' nor '.join(PICKLES)}. Expected: {RAW_LAYOUT}")
    out.mkdir(parents=True, exist_ok=True)
    report = Report("iemocap_mult", raw, out)
    for src in found:
        dst = out / npz_name(src.name)
        report.paths[src.name] = str(dst)
        if dst.is_file() and not overwrite:
            report.skipped["npz files"] += 1
            report.notes.append(f"{dst.name} exists: kept (--set overwrite=true re-converts {src.name})")
            continue
        arrays, dropped = mult_arrays(load_mult_pickle(src), src)
        save_npz(dst, arrays)
        report.written["npz files"] += 1
        if dropped:
            report.notes.append(f"{src.name}: keys not read by the loader left out: {', '.join(dropped)}")
    report.notes.append(
        "trust step: the pickles were unpickled here, through the restricted unpickler "
        "(numpy arrays and plain containers only); the loaders read the .npz without pickle"
    )
    return report
