"""Run records: one directory per run, named by the hash of its configuration.

Layout of a run directory::

    record.jsonl       header line, one line per finished epoch, final line (when done)
    config.yaml        the resolved configuration, for humans and for re-running
    checkpoint.pt      model/optimizer/scheduler/method state after the last finished epoch
    diagnostics/       per-step method diagnostics, one JSON-lines file per epoch
    DONE               marker: the run finished and its record is complete
    LOCK               flock'ed by the process training the run (see RunLock); stays, empty, after

Every file is written to a temporary name and renamed, so a crash never leaves half a record
(a killed writer can leave the temporary ``.<name>.XXXXXXXX``; see clean_temp_files). A record
that is damaged anyway (copied half, edited by hand) raises RecordError naming the file; OS
refusals (read-only folder, disk full) raise RecordsIOError naming the path and the cause.

Nothing in a run folder is read or written through a symbolic link. A records folder is often
shared, and a link planted there (``LOCK -> ~/thesis.tex``, ``diagnostics -> ~/src``) would
otherwise make a run truncate, overwrite or delete whatever it points to. Files are opened
with ``O_NOFOLLOW``; a writer refuses a run folder that is a link or holds one
(:func:`check_run_folder`, and every write under a held :class:`RunLock` checks its path
again); reading commands never create or lock anything (:func:`lock_holder`), so they work on
read-only media. (The records folder itself may be a link: only what is inside a run folder
is checked.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import platform
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import torch
import yaml

from mmbalance.errors import MMBalanceError

DONE = "DONE"
RECORD = "record.jsonl"
CHECKPOINT = "checkpoint.pt"
LOCK = "LOCK"
DIAGNOSTICS = "diagnostics"

FRESH_HINT = "Rerun with `mmbalance run ... --fresh` to train it again, or remove the folder"

# names mkstemp(prefix=".<name>.") gives: ".<name>." + 8 characters of [a-z0-9_]
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}$")


class RecordError(MMBalanceError):
    """A run record or checkpoint on disk is damaged or unreadable (names the file and the fix)."""


class RecordsIOError(RecordError):
    """The operating system refused to read or write under the records folder (read-only
    folder, a file where a folder should be, disk full); names the path and the cause."""


class RunLockedError(MMBalanceError):
    """Another live process is training the same run folder; two writers would corrupt it."""


class RunFolderLinkError(RecordError):
    """A run folder, or a file or folder the suite reads or writes in it, is a symbolic link:
    following it would read, overwrite or delete something outside the run."""


#: folders the suite writes below a run folder; a link inside them is refused like one beside them
WRITTEN_FOLDERS = (DIAGNOSTICS, "plots")

# run folders whose RunLock this process holds: every atomic write below one re-checks its path
_HELD: dict[str, int] = {}


def run_dir_name(cfg: Mapping[str, Any], cfg_hash: str) -> str:
    return f"{cfg['dataset']}_{cfg['method']}_s{cfg['seed']}_{cfg_hash}"


# ---- low-level file writing ------------------------------------------------------------------
def _link_error(path: Path, folder: bool = False) -> RunFolderLinkError:
    """The error for a symbolic link met in (or as) a run folder: what it is, where it points,
    and the fix (removing a link never touches its target)."""
    try:
        target = f" (to '{os.readlink(path)}')"
    except OSError:
        target = ""
    if folder:
        return RunFolderLinkError(
            f"Run folder '{path}' is a symbolic link{target}. The suite never writes through a link: "
            f"the run would write into, or with --fresh empty, the folder it points to. Remove the link "
            f"(`rm '{path}'`; its target is left alone) and rerun, or point --records at the folder "
            f"that really holds the run."
        )
    return RunFolderLinkError(
        f"'{path}' in a run folder is a symbolic link{target}. The suite never reads or writes through "
        f"a link there: it would overwrite or delete what the link points to. Remove the link "
        f"(`rm '{path}'`; its target is left alone) and rerun."
    )


def _open_nofollow(path: Path, flags: int, mode: int = 0o666) -> int:
    """``os.open`` that refuses a symbolic link as the last component (ELOOP becomes a
    RunFolderLinkError naming it); other OS errors propagate."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _link_error(path) from None
        raise


def _fd_is_regular(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def read_bytes_nofollow(path: Path) -> bytes:
    """The bytes of a regular file in a run folder, never through a link (RunFolderLinkError)
    and never blocking on a planted FIFO (RecordError). Missing or unreadable: the OSError."""
    path = Path(path)
    fd = _open_nofollow(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not _fd_is_regular(fd):
            raise RecordError(f"'{path}' is not a regular file; it is damaged. {FRESH_HINT} '{path.parent}'.")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)


def check_run_folder(run_dir: Path, *, itself: bool = True) -> None:
    """Refuse a run folder that is a symbolic link (``itself``) or holds one, directly or in a
    folder the suite writes below it (diagnostics/, plots/): RunFolderLinkError naming the link.

    A folder this suite made never holds a link, so any link there was put by someone else;
    writers call this before their first write. Reading commands need not (they open every
    file with O_NOFOLLOW), and pass ``itself=False`` where a user's own link to a run folder
    is only read through."""
    run_dir = Path(run_dir)
    if itself and run_dir.is_symlink():
        raise _link_error(run_dir, folder=True)
    if not run_dir.is_dir():
        return
    folders = [run_dir, *(run_dir / d for d in WRITTEN_FOLDERS)]
    for folder in folders:
        if folder is not run_dir and (folder.is_symlink() or not folder.is_dir()):
            continue  # a linked sub-folder was already refused as an entry of run_dir
        try:
            entries = sorted(folder.iterdir())
        except OSError as exc:
            raise RecordsIOError(f"Cannot list '{folder}': {exc}. {_io_hint(exc)}") from exc
        for p in entries:
            if p.is_symlink():
                raise _link_error(p)


def _check_held_path(path: Path) -> None:
    """Before writing ``path``: if it lies in a run folder whose lock this process holds, no
    folder below the run folder on the way to it, nor the file itself, may be a link (one
    planted while the run trains would otherwise redirect the write)."""
    full = os.path.abspath(path)
    for root in _HELD:
        if full.startswith(root + os.sep):
            cur = Path(root)
            for part in Path(full).relative_to(root).parts:
                cur = cur / part
                if cur.is_symlink():
                    raise _link_error(cur)
            return


def _io_hint(exc: OSError) -> str:
    """The fix for an OS error, by its errno, so the user is told what to do, not only what failed."""
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "Point --records at a writable folder."
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "The disk is full (or over quota); free some space or point --records at another folder."
    if exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return "Something is in the way where a folder (or file) should be; move it away or point --records at another folder."
    return "Check that folder, or point --records at another folder."


def _write_error(path: Path, exc: OSError) -> RecordsIOError:
    return RecordsIOError(f"Cannot write '{path}': {exc}. {_io_hint(exc)}")


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask(0)-and-restore
    would briefly give every other thread's new files mode 0666)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # fallback; racy across threads for the instant it takes
    os.umask(old)
    return old


def _file_mode() -> int:
    """Mode for files we write: what open() would give (mkstemp makes 0600, which other users of
    a shared records folder cannot read)."""
    return 0o666 & ~current_umask()


def ensure_dir(path: Path) -> Path:
    """``mkdir -p`` that turns an OS refusal into a RecordsIOError naming the folder and the fix."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RecordsIOError(f"Cannot create folder '{path}': {exc}. {_io_hint(exc)}") from exc
    return path


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write`` to a temporary file beside ``path``, fsync, chmod to the umask, and
    rename over ``path``, so a crash leaves either the old file or the new one, never half. A
    killed process can leave the temporary ``.<name>.XXXXXXXX`` behind: see clean_temp_files."""
    path = Path(path)
    _check_held_path(path)
    ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as exc:
        raise _write_error(path, exc) from exc
    try:
        try:
            f = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            raise
        with f:
            os.fchmod(f.fileno(), _file_mode())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)
        os_error = _os_error_in(exc)
        if os_error is not None:
            raise _write_error(path, os_error) from exc
        raise


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``, if any. torch.save hit by a full disk raises a RuntimeError
    from its zip writer's cleanup whose __context__ is the real OSError."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically; OS errors become RecordsIOError."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save ``obj`` to ``path`` atomically (saved through a file object so a full disk is an
    OSError, hence a RecordsIOError, not an opaque RuntimeError from torch's C++ writer)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file. A damaged file (cut mid-line, not text, unreadable) raises
    RecordError naming the file and the line, instead of a bare JSONDecodeError."""
    path = Path(path)
    try:
        text = read_bytes_nofollow(path).decode("utf-8")
    except OSError as exc:
        raise RecordsIOError(f"Cannot read '{path}': {exc}. {FRESH_HINT} '{path.parent}'.") from exc
    except UnicodeDecodeError as exc:
        raise RecordError(
            f"'{path}' is not UTF-8 text (byte {exc.start}); it is damaged. {FRESH_HINT} '{path.parent}'."
        ) from exc
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecordError(
                f"'{path}' line {lineno} is not valid JSON ({exc.msg}, column {exc.colno}); the file "
                f"is damaged (cut mid-line?). {FRESH_HINT} '{path.parent}'."
            ) from exc
        if not isinstance(row, dict):
            raise RecordError(
                f"'{path}' line {lineno} is not a JSON object; the file is damaged. "
                f"{FRESH_HINT} '{path.parent}'."
            )
        rows.append(row)
    return rows


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
    """Fold a record.jsonl into {'header':..., 'epochs': [...], 'final':..., 'done': bool}.

    Raises RecordError when the record cannot be trusted: unreadable, a line that is not JSON,
    no header row, or a DONE marker without the final row (the run claims to be finished but
    its results are missing, so counting or skipping it silently would both be wrong)."""
    run_dir = Path(run_dir)
    path = run_dir / RECORD
    rows = read_jsonl(path)
    rec: dict[str, Any] = {"header": {}, "epochs": [], "final": None}
    for row in rows:
        kind = row.get("type")
        if kind == "header":
            rec["header"] = row
        elif kind == "epoch":
            rec["epochs"].append(row)
        elif kind == "final":
            rec["final"] = row
    rec["done"] = is_done(run_dir)
    rec["run_dir"] = str(run_dir)
    if not rec["header"]:
        raise RecordError(f"Record '{path}' has no header row; it is damaged. {FRESH_HINT} '{run_dir}'.")
    if rec["done"] and rec["final"] is None:
        raise RecordError(
            f"Record '{path}' is marked DONE but has no final row; it is damaged. "
            f"{FRESH_HINT} '{run_dir}'."
        )
    return rec


def is_done(run_dir: Path) -> bool:
    """Whether the run folder holds its DONE marker (a link named DONE is refused, not trusted:
    it would make an unfinished or foreign run count as finished)."""
    path = Path(run_dir) / DONE
    if path.is_symlink():
        raise _link_error(path)
    return path.exists()

def is_number(value: Any) -> bool:
    """An int or float (NaN included: a metric that is undefined, e.g. MAP without positives);
    not a bool, a string or null, which no evaluation writes."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_metrics(where: str, metrics: Any) -> str | None:
    """What is wrong with one evaluation (``{"fused": {"acc": ...}, "loss": ..., "n": ..., <m>: {...}}``)."""
    if not isinstance(metrics, Mapping):
        return f"{where} is {type(metrics).__name__}, not a table of metrics"
    if not isinstance(metrics.get("fused"), Mapping) or "acc" not in metrics["fused"]:
        return f"{where} has no fused accuracy"
    for part, values in metrics.items():
        table = values if isinstance(values, Mapping) else {None: values}
        for metric, value in table.items():
            if not is_number(value):
                name = f"{part}.{metric}" if metric is not None else str(part)
                return f"{where}.{name} is {value!r}, not a number"
    return None


def record_problem(rec: Mapping[str, Any]) -> str | None:
    """Why a loaded record cannot be reported (the first problem found), or None when every
    field a report reads is present and has its type: the header's method, dataset, seed and
    labels; each epoch's number, loss, time and metrics; each selection rule's epoch and test
    metrics (a finished record needs at least one rule). A metric must be a number (NaN is
    one); a string, a bool or null means the file was edited or written by something else."""
    header = rec.get("header") or {}
    cfg = header.get("config")
    if not isinstance(cfg, Mapping):
        return "the header holds no configuration"
    for key, kind in (("method", str), ("dataset", str), ("seed", int)):
        if not isinstance(cfg.get(key), kind) or isinstance(cfg.get(key), bool):
            return f"the configuration's '{key}' is {cfg.get(key)!r}"
    mods = cfg.get("modalities")
    if mods is not None and not (isinstance(mods, list) and all(isinstance(m, str) for m in mods)):
        return f"the configuration's 'modalities' is {mods!r}, not a list of names"
    for key in ("method_label", "config_hash", "device"):
        if not isinstance(header.get(key), str):
            return f"the header's '{key}' is {header.get(key)!r}"
    for key in ("data_fingerprint", "dataset_info", "weights"):
        if header.get(key) is not None and not isinstance(header[key], Mapping):
            return f"the header's '{key}' is {header[key]!r}, not a table"
    if header.get("weights") and not all(isinstance(w, Mapping) for w in header["weights"].values()):
        return f"the header's 'weights' is {header['weights']!r}, not a table per modality"
    for i, entry in enumerate(rec.get("epochs") or []):
        where = f"epoch row {i + 1}"
        if not isinstance(entry.get("epoch"), int) or isinstance(entry.get("epoch"), bool):
            return f"{where} has no epoch number ('epoch' is {entry.get('epoch')!r})"
        for key in ("train_loss", "train_time_s"):
            if not is_number(entry.get(key)):
                return f"{where}'s '{key}' is {entry.get(key)!r}, not a number"
        if entry.get("peak_mem_mb") is not None and not is_number(entry["peak_mem_mb"]):
            return f"{where}'s 'peak_mem_mb' is {entry['peak_mem_mb']!r}, not a number"
        for split in ("val", "test"):
            if entry.get(split) is not None:
                problem = _check_metrics(f"{where}'s {split}", entry[split])
                if problem:
                    return problem
    final = rec.get("final")
    if final is None:
        return None  # a run in progress
    if final.get("diagnostics") is not None and not isinstance(final["diagnostics"], Mapping):
        return f"the final row's diagnostics is {final['diagnostics']!r}, not a table"
    selection = final.get("selection")
    header = rec.get("header")
    config = header.get("config") if isinstance(header, Mapping) else None
    no_test = isinstance(config, Mapping) and config.get("eval_test") is False
    if not isinstance(selection, Mapping) or not selection:
        return f"the final row's selection is {selection!r}: no selection rule has results"
    for rule, chosen in selection.items():
        if not isinstance(chosen, Mapping):
            return f"selection rule '{rule}' is {chosen!r}"
        if not isinstance(chosen.get("epoch"), int) or isinstance(chosen.get("epoch"), bool):
            return f"selection rule '{rule}' has no epoch number ('epoch' is {chosen.get('epoch')!r})"
        if chosen.get("test") is None and no_test:  # a tuning trial (eval_test=false) reads no test
            problem = _check_metrics(f"selection rule '{rule}' val", chosen.get("val"))
        else:
            problem = _check_metrics(f"selection rule '{rule}' test", chosen.get("test"))
        if problem:
            return problem
    return None


def check_record(rec: Mapping[str, Any]) -> None:
    """Raise RecordError naming the record file and its first problem (see record_problem): the
    one reason ``mmbalance show`` prints and ``mmbalance leaderboard`` skips the run for."""
    problem = record_problem(rec)
    if problem:
        run_dir = Path(str(rec.get("run_dir", ".")))
        raise RecordError(
            f"Record '{run_dir / RECORD}' is damaged: {problem}. {FRESH_HINT} '{run_dir}'."
        )


def _short_cause(exc: BaseException) -> str:
    """The informative part of a torch.load error. torch's own text suggests switching the
    weights-only guard off, which is exactly what must not be done with a file of unknown
    origin, so that advice is cut from the message."""
    skip = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.strip().startswith(skip)]
    text = " ".join(lines)[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_checkpoint(path: Path, map_location: Any = None) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers/scalars only, so
    a planted or foreign pickle cannot run code. Any failure (truncated file, refused class,
    not a dict) is a RecordError naming the file and the fix.

    Refused types, among those a training loop might store: numpy scalars (np.float32,
    np.float64, np.int64...) and numpy arrays; keep history to python int/float/str/None and
    tensors. Allowed: dict/OrderedDict, list, tuple, set, str, bytes, int, float, complex, bool,
    None, tensors, torch.Size, torch.dtype, torch.device."""
    path = Path(path)
    hint = (
        "the checkpoint is damaged or not a checkpoint this suite wrote; rerun with --fresh to "
        "start this run over"
    )
    try:
        fd = _open_nofollow(path, os.O_RDONLY | os.O_NONBLOCK)  # never read through a planted link
    except OSError as exc:
        raise RecordError(f"Cannot load checkpoint '{path}' ({exc}); {hint}.") from exc
    try:
        with os.fdopen(fd, "rb") as f:
            if not _fd_is_regular(f.fileno()):
                raise RecordError(f"Cannot load checkpoint '{path}' (not a regular file); {hint}.")
            # weights_only=True: a planted or foreign pickle in a shared run folder cannot run code
            state = torch.load(f, map_location=map_location, weights_only=True)
    except (torch.cuda.OutOfMemoryError, RecordError):
        raise  # OOM is not damage (the state does not fit on the device); RecordError says it all
    except Exception as exc:
        raise RecordError(f"Cannot load checkpoint '{path}' ({_short_cause(exc)}); {hint}.") from exc
    if not isinstance(state, dict):
        raise RecordError(f"Cannot load checkpoint '{path}' (it holds a {type(state).__name__}, not a dict); {hint}.")
    return state


# ---- one writer per run folder ---------------------------------------------------------------
class RunLock:
    """Exclusive lock on a run folder: ``with RunLock(run_dir): train...``.

    Two processes training the same cell (a grid started twice, a run resumed while the first
    still trains) would interleave checkpoints and records. The lock is ``flock`` on
    ``run_dir/LOCK``; the kernel drops it when the holder dies, however it dies, so a LOCK file
    left by a killed process is stale and simply taken over. The file holds the holder's pid and
    host for the error message; it is left in place on release (unlinking a flock'ed file races
    with a process about to lock it). flock is per open file: a second RunLock on the same folder
    in the same process is refused too. Child processes started by fork share the lock.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._fd: int | None = None
        self._key = ""
        self._writes = False  # whether LOCK is ours to write (no other hard link)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock or raise RunLockedError naming the live holder (never waits).

        Refuses a run folder or a LOCK that is a link (RunFolderLinkError), and a LOCK that is
        not a regular file (RecordError). A LOCK with other hard links (a ``cp -al`` backup, or planted) is
        locked but never written: the holder's pid would be written into every copy."""
        if self._fd is not None:
            raise RuntimeError(f"RunLock on '{self.run_dir}' is already held by this object")
        ensure_dir(self.run_dir)
        if self.run_dir.is_symlink():
            raise _link_error(self.run_dir, folder=True)
        try:  # no O_TRUNC: the holder's pid must survive our opening it
            fd = _open_nofollow(self.path, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise _write_error(self.path, exc) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise RecordError(
                    f"'{self.path}' is not a regular file; taking the lock could block or write into "
                    f"it. Remove it (`rm '{self.path}'`) and rerun."
                )
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"Run folder '{self.run_dir}' is already being trained by another process "
                f"({holder}). Wait for it to finish, or stop it; two writers would corrupt the record."
            ) from None
        except RecordError:
            os.close(fd)
            raise
        except OSError as exc:
            os.close(fd)
            raise RecordsIOError(f"Cannot lock '{self.path}': {exc}. {_io_hint(exc)}") from exc
        self._writes = st.st_nlink == 1
        if self._writes:
            try:
                info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            except OSError as exc:
                os.close(fd)  # closing releases the flock
                raise _write_error(self.path, exc) from exc
        self._fd = fd
        self._key = os.path.abspath(self.run_dir)
        _HELD[self._key] = _HELD.get(self._key, 0) + 1
        return self

    def release(self) -> None:
        """Drop the lock (idempotent). The LOCK file stays, emptied."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        left = _HELD.pop(self._key, 1) - 1
        if left > 0:
            _HELD[self._key] = left
        with contextlib.suppress(OSError):
            if self._writes:
                os.ftruncate(fd, 0)
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def lock_holder(run_dir: Path) -> str | None:
    """Who trains the run folder now ('pid N on host H, since T'), or None when nobody does.

    For reading commands (show, probe, grid --status): LOCK is opened read-only, never created
    and never through a link, so this works on read-only media and leaves nothing behind. A
    shared flock is tried and dropped at once; it fails only while a writer holds the lock."""
    path = Path(run_dir) / LOCK
    try:
        fd = _open_nofollow(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None  # a writer creates LOCK before it locks it: nobody holds it
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            return None
        raise RecordsIOError(f"Cannot read '{path}': {exc}.") from exc
    try:
        if not _fd_is_regular(fd):
            raise RecordError(f"'{path}' is not a regular file; remove it (`rm '{path}'`).")
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        except OSError:
            return None  # a file system without flock: no writer can hold one either
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> str:
    """'pid N on host H' from a held LOCK file; the holder writes it just after locking, so an
    empty file is retried briefly before giving up."""
    for _ in range(20):
        try:
            raw = os.pread(fd, 4096, 0)
        except OSError:
            break
        if raw.strip():
            try:
                info = json.loads(raw)
                return f"pid {info['pid']} on host {info['host']}, since {info.get('since', '?')}"
            except (ValueError, KeyError, TypeError):
                break
        time.sleep(0.01)
    return "pid unknown; see the LOCK file"


def clean_temp_files(run_dir: Path) -> list[Path]:
    """Remove the ``.<name>.XXXXXXXX`` temporary files that atomic writes leave when the process
    is killed mid-write, in ``run_dir`` and its diagnostics/ folder; returns what was removed.

    Only safe while holding the run's RunLock: without it, a temp file may belong to a live
    writer that is about to rename it into place. Never descends into a linked folder: a
    ``diagnostics`` link would otherwise make it delete temp-like names wherever it points."""
    run_dir = Path(run_dir)
    removed: list[Path] = []
    for folder in (run_dir, run_dir / DIAGNOSTICS):
        if folder.is_symlink() or not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if _TEMP_NAME.match(p.name) and (p.is_file() or p.is_symlink()):
                try:
                    p.unlink()
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise RecordsIOError(f"Cannot remove '{p}': {exc}. {_io_hint(exc)}") from exc
                removed.append(p)
    return removed


def clear_run_dir(run_dir: Path) -> None:
    """Remove everything in ``run_dir`` except its LOCK file (what ``--fresh`` needs).

    Call while holding the RunLock. ``shutil.rmtree(run_dir)`` would also unlink LOCK, and a
    process that then locks a new LOCK file would train beside the one still holding the old.
    A linked run folder is refused (it would empty the folder the link points to); links inside
    are removed, never followed."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink():
        raise _link_error(run_dir, folder=True)
    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        if p.name == LOCK:
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError as exc:
            raise RecordsIOError(f"Cannot remove '{p}': {exc}. {_io_hint(exc)}") from exc


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


def cpu_kernels() -> dict[str, Any]:
    """What chooses a CPU run's kernels, and with them the rounding of its float sums.

    oneDNN runs bf16 convolutions and matmuls on AMX tiles where the CPU has them and on
    AVX512-BF16 otherwise; the two round differently, so the same seed gives other numbers on
    the two kinds of CPU (measured: every cell of the benchmark grid). The caps a user can set
    (``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``) change the kernels too, so they are
    recorded with them, and so is MKL's (``MKL_ENABLE_INSTRUCTIONS``), which picks the fp32
    matmul kernels of the linear layers (capped to AVX2, an fp32 feature-set cell trained to other
    bits on mfeat, synthetic and landuse21). (Capping an AMX CPU at AVX512-BF16 reproduced an AVX512-BF16 CPU's
    synthetic cell to the bit but not its AV-digits cell: the label is a warning, not a recipe.)
    """
    # a private torch API: a torch without it records "unknown" (None), never fails a run
    probe = getattr(getattr(torch._C, "_cpu", None), "_get_cpu_capability", None)
    caps = probe() if callable(probe) else None
    info = {
        "aten": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": bool(caps.get("avx512_bf16")) if caps else None,
        "amx_bf16": bool(caps.get("amx_bf16")) if caps else None,
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"),
        "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY"),
        "mkl_enable_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS"),
    }
    info["bf16_native"] = bf16_native(info)
    return info


def _onednn_bf16_supported() -> bool:
    """oneDNN's own answer (it honours ``ONEDNN_MAX_CPU_ISA``); True where torch cannot say."""
    probe = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else True
    except RuntimeError:
        return True


def bf16_native(info: Mapping[str, Any]) -> bool:
    """Whether bf16 matmuls and convolutions run on bf16 hardware here (AMX-BF16 or
    AVX512-BF16 instructions, not capped away by ``ONEDNN_MAX_CPU_ISA``).

    Without them PyTorch emulates bf16 with fp32 instructions plus conversions: measured on an
    AMD EPYC capped at AVX2, one training step of AV-digits' audio CNN in bf16 took 5-8x the
    fp32 step (``benchmarks/cpu_precision.py``). oneDNN's report alone is not enough: it also
    says yes on AVX-512 CPUs without the bf16 instructions, where it emulates them."""
    hardware = bool(info.get("amx_bf16") or info.get("avx512_bf16"))
    cap = str(info.get("onednn_max_cpu_isa") or "").upper()
    capped_away = bool(cap) and cap != "ALL" and "BF16" not in cap and "AMX" not in cap
    aten_cap = str(info.get("aten_cpu_capability") or "").lower()
    return hardware and not capped_away and aten_cap not in ("avx2", "default") and _onednn_bf16_supported()


def cpu_kernels_label(info: Mapping[str, Any] | None) -> str | None:
    """A short name of :func:`cpu_kernels` for captions: ``AMX-BF16``, ``AVX512-BF16`` or the
    ATen level, with any cap."""
    if not info:
        return None
    cap = info.get("onednn_max_cpu_isa")
    allowed = str(cap or "AMX").upper()  # oneDNN's caps name the ISA they allow up to
    if info.get("amx_bf16") and "AMX" in allowed:
        name = "AMX-BF16"
    elif info.get("avx512_bf16") and ("AMX" in allowed or "BF16" in allowed):
        name = "AVX512-BF16"
    else:
        name = str(info.get("aten") or "unknown")
    caps = [f"ONEDNN_MAX_CPU_ISA={cap}"] if cap else []
    if info.get("mkl_enable_instructions"):
        caps.append(f"MKL_ENABLE_INSTRUCTIONS={info['mkl_enable_instructions']}")
    return name + (f" ({', '.join(caps)})" if caps else "")


def library_versions() -> dict[str, Any]:
    libs = ["torch", "torchvision", "torchaudio", "timm", "transformers", "numpy", "scikit-learn", "pandas"]
    out: dict[str, Any] = {"python": platform.python_version()}
    out.update({lib: _pkg_version(lib) for lib in libs})
    out["cuda"] = torch.version.cuda
    return out


def find_runs(root: Path) -> list[Path]:
    """Every run directory under ``root`` (any depth) that holds a record or a DONE marker (a
    DONE run whose record.jsonl is gone is damaged, and must be reported, not overlooked). A
    folder holding only a LOCK file (a run that died before writing anything) is not a run."""
    root = Path(root)
    if not root.exists():
        return []
    found = {p.parent for name in (RECORD, DONE) for p in root.rglob(name) if p.is_file()}
    return sorted(found)
