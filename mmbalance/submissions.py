"""Which job runs which grid cell: ``<records>/.submitit/submissions.json``.

A cell submitted to Slurm may wait in the queue for hours before it writes anything into its
run folder, so the records alone cannot tell a queued cell from one never submitted: a rerun
of the grid would submit it again, and two jobs would then train the same run folder (the
second waits on its lock, or trains it again after the first finished). The job id of each
submitted cell is therefore kept here, keyed by the cell's run-folder name, and the scheduler
is asked about it before the cell is submitted again (mmbalance.scheduler).

The file lives in the submitting user's ``.submitit`` folder (mode 0700, where submitit keeps
its task pickles). It is JSON, read without following a link and written atomically (a
temporary file renamed over it, which replaces a planted link instead of writing through it);
the whole read-check-submit-write sequence holds an flock on ``submissions.lock`` beside it,
so two grid commands started at once cannot both submit a cell.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mmbalance import records
from mmbalance.errors import MMBalanceError

FOLDER = ".submitit"
FILE = "submissions.json"
LOCK = "submissions.lock"


def submitit_folder(records_dir: str | Path, create: bool = True) -> Path:
    """``<records>/.submitit`` as an absolute path (the job reads it from another directory),
    created 0700 when ``create``; a link there is refused (task pickles and this file would be
    written wherever it points)."""
    folder = Path(os.path.abspath(records_dir)) / FOLDER
    if folder.is_symlink():
        raise records.RunFolderLinkError(
            f"'{folder}' is a symbolic link. Job files (task pickles, the submissions list) are never "
            f"written through a link; remove it (`rm '{folder}'`; its target is left alone) and rerun."
        )
    if create:
        records.ensure_dir(folder)
        os.chmod(folder, 0o700)  # task pickles live here: the submitting user's alone
    return folder


def load(folder: Path) -> dict[str, dict[str, Any]]:
    """Run-folder name -> {job_id, launcher, cell, submitted}; {} when nothing was submitted."""
    path = folder / FILE
    try:
        raw = records.read_bytes_nofollow(path)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise records.RecordsIOError(f"Cannot read '{path}': {exc}.") from exc
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise records.RecordError(
            f"'{path}' is damaged ({exc}); it lists which job runs which cell. Check squeue for jobs "
            f"of this grid still queued, then remove the file and rerun."
        ) from exc
    if not isinstance(data, dict):
        raise records.RecordError(f"'{path}' is damaged (not a JSON object); remove it and rerun.")
    return {str(k): dict(v) for k, v in data.items() if isinstance(v, Mapping) and v.get("job_id")}


def save(folder: Path, entries: Mapping[str, Mapping[str, Any]]) -> None:
    records.atomic_write_text(folder / FILE, json.dumps(dict(entries), indent=1, sort_keys=True) + "\n")


def entry(job_id: str, launcher: str, cell: str) -> dict[str, Any]:
    return {"job_id": str(job_id), "launcher": launcher, "cell": cell,
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold ``submissions.lock`` (flock, exclusive; waits for another grid command submitting
    into the same records folder)."""
    path = folder / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise records.RunFolderLinkError(f"'{path}' is a symbolic link; remove it and rerun.") from None
        raise records.RecordsIOError(f"Cannot open '{path}': {exc}.") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise MMBalanceError(f"Cannot lock '{path}': {exc}.") from exc
        yield
    finally:
        os.close(fd)  # closing drops the flock
