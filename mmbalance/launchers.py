"""Past one machine: a grid's cells as a Slurm job array through submitit, and grid status.

``mmbalance grid GRID --launcher slurm`` submits every cell that is not finished as one task
of a job array (one cell per task) with the resources from the command line or the grid
file's ``slurm:`` table; each task runs the same :func:`mmbalance.grid.run_cell` a local grid
runs, so records land in the shared records folder exactly as a local run writes them. A
task that Slurm pre-empts or times out is requeued by submitit's checkpointing and resumes
from the cell's last epoch checkpoint. ``--launcher local`` runs the same code path through
submitit's local executor (how it is tested here). ``--dry-run`` prints what would be
submitted, without a Slurm installation.

submitit pickles each task into its folder and unpickles it in the job: that folder is the
submitting user's own (``<records>/.submitit``, created 0700), never read from data the suite
did not write itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmbalance import records
from mmbalance.errors import ConfigError, MMBalanceError
from mmbalance.grid import ERROR_FILE, FAILED, NOT_APPLICABLE, Cell, Grid, check_grid, run_cell

# command-line / grid-file resource names -> submitit's slurm_* parameters
RESOURCES: dict[str, tuple[str, type]] = {
    "gpus_per_task": ("slurm_gpus_per_task", int),
    "cpus_per_task": ("slurm_cpus_per_task", int),
    "mem_gb": ("slurm_mem", int),
    "time_min": ("slurm_time", int),
    "partition": ("slurm_partition", str),
    "account": ("slurm_account", str),
    "qos": ("slurm_qos", str),
    "array_parallelism": ("slurm_array_parallelism", int),
}


class CellTask:
    """One grid cell as a submitit task. ``checkpoint`` makes it requeue on pre-emption or
    time-out: the cell then resumes from its last finished epoch (its own checkpoint)."""

    def __init__(self, cell: Cell, base: Mapping[str, Any]) -> None:
        self.cell = cell
        self.base = dict(base)

    def __call__(self) -> tuple[str, str]:
        return run_cell(self.cell, self.base)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(CellTask(self.cell, self.base))


def slurm_parameters(resources: Mapping[str, Any]) -> dict[str, Any]:
    """submitit parameters from the resources table, every value checked."""
    params: dict[str, Any] = {}
    for key, value in resources.items():
        if value is None:
            continue
        if key not in RESOURCES:
            raise ConfigError(f"Unknown Slurm resource '{key}'; known: {', '.join(RESOURCES)}.")
        name, kind = RESOURCES[key]
        try:
            v = kind(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"Bad value {value!r} for Slurm resource '{key}': expected {kind.__name__}.") from exc
        if kind is int and v < (0 if key == "gpus_per_task" else 1):
            raise ConfigError(f"Bad value {value!r} for Slurm resource '{key}': it must be positive.")
        params[name] = f"{v}G" if key == "mem_gb" else v
    return params


def _folder(base: Mapping[str, Any]) -> Path:
    folder = Path(base.get("records") or "runs") / ".submitit"
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)  # task pickles live here: the submitting user's alone
    return folder


def pending_cells(grid: Grid, base: Mapping[str, Any]) -> list[int]:
    """Indices of the cells to submit: checked first (one error lists every bad cell), done and
    not-applicable ones left out."""
    states = check_grid(grid, base)
    bad = [f"[{i + 1}] {grid.cells[i]}: {d}" for i, (s, d) in enumerate(states) if s == "invalid"]
    if bad:
        raise ConfigError(f"Grid '{grid.name}': {len(bad)} cells have a bad configuration, so nothing "
                          f"was submitted: {'; '.join(bad[:10])}.")
    return [i for i, (s, _) in enumerate(states) if s in ("new", "resume")]


def submit_grid(grid: Grid, base: Mapping[str, Any], launcher: str, resources: Mapping[str, Any],
                dry_run: bool = False, wait: bool | None = None) -> int:
    """Submit the unfinished cells; with the local launcher (or ``wait``) wait and report."""
    import submitit

    base = {"progress": "off", "log_epochs": False, **base}
    todo = pending_cells(grid, base)
    n = len(grid.cells)
    print(f"grid {grid.name}: {len(todo)} of {n} cells to submit ({n - len(todo)} done or not applicable)",
          flush=True)
    if not todo:
        return 0
    params = slurm_parameters(resources)
    if dry_run:
        if launcher == "slurm":
            print(sbatch_preview(grid, base, params, len(todo)))
        for i in todo:
            print(f"  would submit [{i + 1}/{n}] {grid.cells[i]}")
        return 0
    folder = _folder(base)
    if launcher == "slurm":
        executor: Any = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
        executor.update_parameters(name=f"mmbalance-{grid.name}", **params)
    elif launcher == "local":
        executor = submitit.LocalExecutor(folder=folder / "%j")
        executor.update_parameters(timeout_min=int(resources.get("time_min") or 24 * 60))
    else:
        raise ConfigError(f"Unknown launcher '{launcher}': use pool (default), local or slurm.")
    with executor.batch():
        jobs = [executor.submit(CellTask(grid.cells[i], base)) for i in todo]
    for i, job in zip(todo, jobs, strict=True):
        print(f"  submitted [{i + 1}/{n}] {grid.cells[i]} as job {job.job_id} (logs in {folder / str(job.job_id)})",
              flush=True)
    if not (launcher == "local" if wait is None else wait):
        return 0
    failed = 0
    for i, job in zip(todo, jobs, strict=True):
        try:
            outcome, line = job.result()
        except Exception as exc:  # the task itself crashed (killed, out of memory...)
            outcome, line = FAILED, f"FAILED — the job died: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        failed += outcome == FAILED
        print(f"[{i + 1}/{n}] {grid.cells[i]}: {line}", flush=True)
    print(f"grid {grid.name}: {len(todo) - failed} finished, {failed} FAILED", flush=True)
    return 1 if failed else 0


def sbatch_preview(grid: Grid, base: Mapping[str, Any], params: Mapping[str, Any], count: int) -> str:
    """The sbatch script submitit would write for the job array (no Slurm needed)."""
    from submitit.slurm.slurm import _make_sbatch_string

    plain = {k.removeprefix("slurm_"): v for k, v in params.items()}
    plain.setdefault("time", 60 * 24)
    folder = Path(base.get("records") or "runs") / ".submitit" / "%j"
    return _make_sbatch_string(command=f"python -u -m submitit.core._submit {folder}", folder=folder,
                               job_name=f"mmbalance-{grid.name}", map_count=count, **plain)


# ---- status -----------------------------------------------------------------------------------
def lock_holder(run_dir: Path) -> str | None:
    """Who holds the run folder's lock (its recorded pid/host), or None when nobody does; reads
    only (records.lock_holder), so --status creates nothing and works on read-only media."""
    return records.lock_holder(run_dir)


def cell_status(state: str, detail: str) -> tuple[str, str]:
    """done | running | failed | pending | not applicable | invalid, from the records alone."""
    if state in ("invalid", NOT_APPLICABLE):
        return state, detail
    run_dir = Path(detail)
    if state == "done":
        return "done", str(run_dir)
    try:
        holder = lock_holder(run_dir) if run_dir.exists() else None
        err = run_dir / ERROR_FILE
        text = records.read_bytes_nofollow(err).decode("utf-8", "replace") if err.exists() else None
    except records.RecordError as exc:  # a planted link or a damaged LOCK: say so, read nothing
        return "failed", str(exc)
    except OSError:
        text = None
    if holder:
        return "running", holder
    if text is not None:
        lines = [ln for ln in text.splitlines()[1:] if ln.strip()]
        return "failed", (lines[-1] if lines else "see " + str(err))
    return "pending", "resumes from its checkpoint" if state == "resume" else "not started"


def grid_status(grid: Grid, base: Mapping[str, Any]) -> int:
    """Print each cell's status (any launcher: it reads only the records folder)."""
    states = check_grid(grid, base)
    n = len(grid.cells)
    counts: dict[str, int] = {}
    for i, ((state, detail), cell) in enumerate(zip(states, grid.cells, strict=True)):
        status, info = cell_status(state, detail)
        counts[status] = counts.get(status, 0) + 1
        print(f"[{i + 1}/{n}] {cell}: {status}" + (f" — {info}" if info and status != "done" else ""))
    print(f"grid {grid.name}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return 0


def require_submitit() -> None:
    try:
        import submitit  # noqa: F401
    except ImportError as exc:  # pragma: no cover - a pinned dependency
        raise MMBalanceError("The slurm and local launchers need submitit: pip install submitit.") from exc
