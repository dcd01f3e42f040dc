"""Past one machine: a grid's cells as a Slurm job array through submitit, and grid status.

``mmbalance grid GRID --launcher slurm`` submits every cell that is not finished, nor already
queued or running, as one task of a job array (one cell per task) with the resources from the
command line or the grid file's ``slurm:`` table; each task runs the same
:func:`mmbalance.grid.run_cell` a local grid runs, so records land in the shared records
folder exactly as a local run writes them. ``--launcher local`` runs the same code path through
submitit's local executor (how it is tested without Slurm).

- **No duplicates.** The job id of every submitted cell is kept beside the records
  (mmbalance.submissions); a rerun asks the scheduler (mmbalance.scheduler) and leaves a cell
  whose job is still queued or running alone. ``--status`` shows it as queued or running,
  with its job id and Slurm's pending reason.
- **Refusals.** When sbatch refuses the job (more CPUs or memory than a node has), the command
  ends with one sentence naming the resource and the node's limit, and removes the task
  pickles submitit had written for it.
- **Stopping.** submitit's job wrapper ignores SIGTERM (``scancel``, ``scontrol requeue``,
  pre-emption): the task handles it itself and stops at the next batch boundary, the last
  finished epoch checkpointed. USR2 (pre-emption, or a time limit coming) goes through
  submitit's checkpoint-and-requeue at the same boundary, and the requeued task resumes from
  the cell's checkpoint; a cell that ran out of time-out requeues is reported as timed out.
- **What runs.** ``--dry-run`` prints the sbatch script that would be submitted, with the
  absolute interpreter and records folder the job will use; ``--wait`` (the default for the
  local launcher) waits for the cells and prints each one's result line as a local grid does.

submitit pickles each task into its folder and unpickles it in the job: that folder is the
submitting user's own (``<records>/.submitit``, created 0700, refused if it is a link), never
read from data the suite did not write itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmbalance import records, scheduler, submissions
from mmbalance.engine import stop
from mmbalance.errors import ConfigError, MMBalanceError
from mmbalance.grid import (
    ERROR_FILE,
    NOT_APPLICABLE,
    Cell,
    CellState,
    Grid,
    _result_line,
    bad_cells_error,
    check_grid,
    run_cell,
)

# command-line / grid-file resource names -> sbatch options (submitit's names)
RESOURCES: dict[str, tuple[str, type]] = {
    "gpus_per_task": ("gpus_per_task", int),
    "cpus_per_task": ("cpus_per_task", int),
    "mem_gb": ("mem", int),
    "time_min": ("time", int),
    "partition": ("partition", str),
    "account": ("account", str),
    "qos": ("qos", str),
    "array_parallelism": ("array_parallelism", int),
}
DEFAULT_TIME_MIN = 24 * 60  # without --time-min (submitit's own default would be 5 minutes)
TIMED_OUT = "timed out"


class CellTimedOut(MMBalanceError):
    """The cell's job reached its time limit more often than submitit requeues it."""


class SubmissionRefused(MMBalanceError):
    """sbatch refused the job (resources beyond what a node or partition has)."""


# ---- the task a job runs -------------------------------------------------------------------------
class CellTask:
    """One grid cell as a submitit task. ``checkpoint`` makes it requeue on pre-emption or
    time-out: the cell then resumes from its last finished epoch (its own checkpoint)."""

    def __init__(self, cell: Cell, base: Mapping[str, Any]) -> None:
        self.cell = cell
        self.base = dict(base)

    def __call__(self) -> tuple[str, str]:
        from submitit.core.job_environment import JobEnvironment
        from submitit.core.utils import UncompletedJobError

        usr = JobEnvironment._usr_sig()  # USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise
        requeue = signal.getsignal(usr)  # submitit's checkpoint-and-requeue, set before the task ran
        actions = {}
        if callable(requeue):
            def preempted() -> None:  # at a batch boundary, the last epoch checkpointed
                try:
                    requeue(usr, None)  # requeues and exits (SystemExit)
                except UncompletedJobError as exc:  # out of time-out requeues
                    raise CellTimedOut(
                        f"the job reached its time limit (--time-min) more often than it may be "
                        f"requeued ({exc}). Rerun the grid to submit it again from its checkpoint, "
                        f"with a larger --time-min."
                    ) from None

            actions[usr] = preempted
        with stop.handled(signal.SIGTERM, usr, actions=actions):
            try:
                outcome, line = run_cell(self.cell, self.base)
            except stop.StopRequested as exc:
                print(f"{self.cell}: stopped by {exc.signal_name}; the last finished epoch is checkpointed, "
                      f"and the cell resumes from it when the grid is submitted again.", file=sys.stderr, flush=True)
                raise SystemExit(128 + exc.signum) from None
        print(f"{self.cell}: {line}", flush=True)  # the job's log says how it ended
        return outcome, line

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(CellTask(self.cell, self.base))


# ---- parameters and the script -----------------------------------------------------------------
def slurm_parameters(resources: Mapping[str, Any]) -> dict[str, Any]:
    """sbatch options (submitit's names) from the resources table, every value checked."""
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


def executor_parameters(grid: Grid, resources: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the sbatch script is made from: the job name, a time limit, the resources."""
    return {"job_name": f"mmbalance-{grid.name}", "time": DEFAULT_TIME_MIN, **slurm_parameters(resources)}


def job_command(folder: Path) -> str:
    """The command a job runs, as submitit writes it: this interpreter, absolute."""
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder / "%j"))])


def sbatch_script(folder: Path, params: Mapping[str, Any], count: int) -> str:
    """The sbatch script submitit writes for ``count`` cells (an array when more than one),
    made by submitit's own function from the same parameters (no Slurm needed)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=job_command(folder), folder=folder / "%j",
                               map_count=count if count > 1 else None, **params)


def job_base(base: Mapping[str, Any]) -> dict[str, Any]:
    """A cell's settings as the job gets them: quiet, and the records folder and data root
    absolute (a job may start in another directory than the one it was submitted from)."""
    out = {"progress": "off", "log_epochs": False, **base}
    out["records"] = os.path.abspath(out.get("records") or "runs")
    if out.get("data_root"):
        out["data_root"] = os.path.abspath(out["data_root"])
    return out


# ---- submitting ---------------------------------------------------------------------------------
def _run_name(state: CellState) -> str:
    return Path(state.detail).name


def busy_cells(grid: Grid, states: Sequence[CellState], todo: Sequence[int],
               known: Mapping[str, Mapping[str, Any]]) -> dict[int, str]:
    """Cells of ``todo`` that must not be submitted again: their run folder is being trained
    (its lock is held), or the job recorded for them is still queued or running."""
    busy: dict[int, str] = {}
    jobs = job_states_of(known, [_run_name(states[i]) for i in todo])
    for i in todo:
        holder = records.lock_holder(Path(states[i].detail))
        name = _run_name(states[i])
        job = jobs.get(name)
        entry = known.get(name, {})
        if job is not None and job.active:
            verb = "queued" if job.state == "PENDING" else "running"
            busy[i] = f"{verb} as job {entry['job_id']} ({job.describe()})"
        elif holder is not None:
            busy[i] = f"being trained ({holder})"
    return busy


def job_states_of(known: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> dict[str, scheduler.JobState]:
    """The scheduler's state of the job recorded for each run-folder name that has one."""
    wanted = {n: known[n] for n in names if n in known}
    by_launcher: dict[str, list[str]] = {}
    for e in wanted.values():
        by_launcher.setdefault(str(e.get("launcher", "slurm")), []).append(str(e["job_id"]))
    found: dict[tuple[str, str], scheduler.JobState] = {}
    for launcher, ids in by_launcher.items():
        for jid, st in scheduler.job_states(launcher, ids).items():
            found[(launcher, jid)] = st
    return {n: found[(str(e.get("launcher", "slurm")), str(e["job_id"]))] for n, e in wanted.items()}


def _make_executor(launcher: str, folder: Path, params: Mapping[str, Any], resources: Mapping[str, Any]) -> Any:
    import submitit

    if launcher == "slurm":
        try:
            executor: Any = submitit.SlurmExecutor(folder=folder / "%j")
        except RuntimeError as exc:  # submitit looks for srun
            raise MMBalanceError(
                "--launcher slurm needs Slurm's commands (sbatch, srun) on PATH, and this machine has "
                "none. Run it on a machine of the cluster; --dry-run prints the script without Slurm."
            ) from exc
        executor.update_parameters(**params)
    elif launcher == "local":
        executor = submitit.LocalExecutor(folder=folder / "%j")
        executor.update_parameters(timeout_min=int(resources.get("time_min") or DEFAULT_TIME_MIN))
    else:
        raise ConfigError(f"Unknown launcher '{launcher}': use pool (default), local or slurm.")
    return executor


def _remove_new_files(folder: Path, before: set[str]) -> None:
    """What a refused submission left in the submitit folder: its task pickles and script."""
    for p in folder.iterdir():
        if p.name not in before and p.is_file() and (p.suffix == ".pkl" or p.name.startswith(".submission_file_")):
            with contextlib.suppress(OSError):
                p.unlink()


def submit_cells(launcher: str, folder: Path, params: Mapping[str, Any], resources: Mapping[str, Any],
                 cells: Sequence[Cell], base: Mapping[str, Any]) -> list[Any]:
    """Submit ``cells`` as one batch (a job array on Slurm); a refusal is a SubmissionRefused
    naming the resource and the limit, with the batch's pickles removed."""
    return submit_tasks(launcher, folder, params, resources, [CellTask(c, base) for c in cells])


def submit_tasks(launcher: str, folder: Path, params: Mapping[str, Any], resources: Mapping[str, Any],
                 tasks: Sequence[Any]) -> list[Any]:
    """Submit ``tasks`` (callables submitit pickles) as one batch, as :func:`submit_cells`."""
    from submitit.core.utils import FailedJobError

    executor = _make_executor(launcher, folder, params, resources)
    before = {p.name for p in folder.iterdir()}
    captured = io.StringIO()  # submitit prints sbatch's error text too: it is in the message
    try:
        with contextlib.redirect_stderr(captured), executor.batch():
            jobs = [executor.submit(task) for task in tasks]
    except FailedJobError as exc:
        _remove_new_files(folder, before)
        raise SubmissionRefused(scheduler.refusal_message(str(exc) or captured.getvalue(), resources)) from None
    except OSError as exc:  # sbatch vanished, a full disk...
        _remove_new_files(folder, before)
        raise MMBalanceError(f"Submitting to {launcher} failed: {exc}. Nothing was submitted.") from None
    except BaseException:
        _remove_new_files(folder, before)
        raise
    return jobs


def submit_grid(grid: Grid, base: Mapping[str, Any], launcher: str, resources: Mapping[str, Any],
                dry_run: bool = False, wait: bool | None = None) -> int:
    """Submit the cells that are not finished, queued or running; with the local launcher (or
    ``wait``) wait for them and print each one's result line."""
    base = job_base(base)
    n = len(grid.cells)
    states = check_grid(grid, base)
    error = bad_cells_error(grid, states, "nothing was submitted")
    if error is not None:
        raise error
    params = executor_parameters(grid, resources)
    todo = [i for i, st in enumerate(states) if st.state in ("new", "resume")]
    folder = submissions.submitit_folder(base["records"], create=not dry_run)
    jobs: list[Any] = []
    with contextlib.nullcontext() if dry_run else submissions.locked(folder):
        known = submissions.load(folder)
        busy = busy_cells(grid, states, todo, known)
        send = [i for i in todo if i not in busy]
        print(f"grid {grid.name}: {len(send)} of {n} cells to submit ({n - len(todo)} done or not applicable"
              + (f", {len(busy)} already queued or running" if busy else "") + ")", flush=True)
        for i, what in busy.items():
            print(f"  [{i + 1}/{n}] {grid.cells[i]}: {what}; not submitted again", flush=True)
        if not send:
            return 0
        if dry_run:
            if launcher == "slurm":
                print(sbatch_script(folder, params, len(send)))
            for i in send:
                print(f"  would submit [{i + 1}/{n}] {grid.cells[i]}")
            return 0
        jobs = submit_cells(launcher, folder, params, resources, [grid.cells[i] for i in send], base)
        for i, job in zip(send, jobs, strict=True):
            known[_run_name(states[i])] = submissions.entry(job.job_id, launcher, str(grid.cells[i]))
        submissions.save(folder, known)
    for i, job in zip(send, jobs, strict=True):
        print(f"  submitted [{i + 1}/{n}] {grid.cells[i]} as job {job.job_id} (logs in {folder / str(job.job_id)})",
              flush=True)
    if not (launcher == "local" if wait is None else wait):
        return 0
    return wait_for(grid, states, dict(zip(send, jobs, strict=True)), launcher)


def wait_for(grid: Grid, states: Sequence[CellState], jobs: Mapping[int, Any], launcher: str,
             poll_s: float = 2.0, max_poll_s: float = 30.0) -> int:
    """Wait until every job in ``jobs`` (cell index -> submitit job) has ended, printing each
    cell's result line as it does (from its records: what the cell wrote, not what the job
    says); returns 1 when any cell failed or timed out."""
    n = len(grid.cells)
    left = dict(jobs)
    bad = 0
    delay = poll_s
    while left:
        if launcher == "slurm":
            live = scheduler.slurm_states(str(j.job_id) for j in left.values())
            ended = {i: live[str(j.job_id)] for i, j in left.items() if not live[str(j.job_id)].active}
        else:
            ended = {i: scheduler.JobState("FINISHED") for i, j in left.items() if j.done()}
        for i, job_state in ended.items():
            status, info = final_status(states[i], job_state)
            bad += status != "done"
            print(f"[{i + 1}/{n}] {grid.cells[i]}: {info}", flush=True)
            del left[i]
        if left:
            time.sleep(delay)
            delay = min(max_poll_s, delay * 1.5)
    done = len(jobs) - bad
    print(f"grid {grid.name}: {done} finished, {bad} FAILED or timed out", flush=True)
    return 1 if bad else 0


# ---- status -----------------------------------------------------------------------------------
def lock_holder(run_dir: Path) -> str | None:
    """Who holds the run folder's lock (its recorded pid/host), or None when nobody does; reads
    only (records.lock_holder), so --status creates nothing and works on read-only media."""
    return records.lock_holder(run_dir)


def _stamp(text: Any) -> float | None:
    try:
        return time.mktime(time.strptime(str(text), "%Y-%m-%dT%H:%M:%S"))
    except (TypeError, ValueError, OverflowError):
        return None


def done_line(run_dir: Path) -> str:
    """A finished cell's result line, as a local grid prints it: best-val test accuracy, wall
    seconds (its last process from start to DONE, plus the epochs earlier ones trained),
    whether it resumed, the device."""
    rec = records.load_record(run_dir)
    h = rec["header"]
    segments = h.get("segments") or [{"from_epoch": 0, "started": h.get("started")}]
    try:
        finished = _stamp(json.loads(records.read_bytes_nofollow(run_dir / records.DONE)).get("finished"))
    except (OSError, ValueError, AttributeError):
        finished = None
    start = _stamp(segments[-1].get("started"))
    first = int(segments[-1].get("from_epoch") or 0)
    earlier = sum(float(e.get("train_time_s") or 0) + float(e.get("eval_time_s") or 0)
                  for e in rec["epochs"] if e["epoch"] < first)
    if finished is not None and start is not None:
        seconds = earlier + max(0.0, finished - start)
    else:
        seconds = sum(float(e.get("train_time_s") or 0) + float(e.get("eval_time_s") or 0) for e in rec["epochs"])
    how = "resumed" if len(segments) > 1 else "new"
    return f"{_result_line(rec)} ({seconds:.0f} s, {how}, {h.get('device', '?')})"


def _error_text(run_dir: Path) -> str | None:
    err = run_dir / ERROR_FILE
    if not err.exists():
        return None
    lines = [ln for ln in records.read_bytes_nofollow(err).decode("utf-8", "replace").splitlines()[1:] if ln.strip()]
    return "\n".join(lines) if lines else f"see {err}"


def cell_status(state: str, detail: str, job: scheduler.JobState | None = None, job_id: str | None = None) -> tuple[str, str]:
    """done | queued | running | failed | timed out | pending | not applicable | invalid,
    from the records and, for a submitted cell, the scheduler's state of its job."""
    if state in ("invalid", NOT_APPLICABLE):
        return state, detail
    run_dir = Path(detail)
    on = f"job {job_id}" if job_id else ""
    try:
        if state == "done" or records.is_done(run_dir):
            return "done", done_line(run_dir)
        holder = lock_holder(run_dir) if run_dir.exists() else None
        text = _error_text(run_dir)
    except records.RecordError as exc:  # a planted link or a damaged LOCK: say so, read nothing
        return "failed", str(exc)
    except OSError:
        holder, text = None, None
    if job is not None and job.active:
        if job.state == "PENDING":
            return "queued", f"{on}, {job.describe()}"
        return "running", f"{on}" + (f", {holder}" if holder else f", {job.describe()}")
    if holder:
        return "running", holder + (f" ({on})" if on else "")
    if text is not None:
        last = text.splitlines()[-1]
        if CellTimedOut.__name__ in text:
            return TIMED_OUT, last.split(": ", 1)[-1] + (f" ({on})" if on else "")
        return "failed", last + (f" ({on})" if on else "")
    if job is not None and job.state == "TIMEOUT":
        return TIMED_OUT, f"{on} reached its time limit; rerun the grid to submit it again from its checkpoint"
    what = "resumes from its checkpoint" if state == "resume" else "not started"
    if job is not None and job_id:  # its job ended without the cell finishing, or is forgotten
        ended = "is gone" if job.state == scheduler.GONE else f"ended ({job.state})"
        what += f"; its {on} {ended}, so submitting the grid again submits it"
    return "pending", what


def final_status(state: CellState, job: scheduler.JobState) -> tuple[str, str]:
    """A submitted cell's line once its job ended: its result, or why it has none."""
    status, info = cell_status(state.state, state.detail, job)
    if status == "done":
        return status, info
    if status == "failed":
        return status, f"FAILED — {info}"
    if status == TIMED_OUT:
        return status, f"TIMED OUT — {info}"
    return "failed", (f"FAILED — the job ended ({job.state}) before the cell finished (killed, out of memory?). "
                      f"Rerun the grid to resume it from its checkpoint.")


def grid_status(grid: Grid, base: Mapping[str, Any]) -> int:
    """Print each cell's status (any launcher): the records, and the scheduler's word on the
    cells that were submitted. Creates nothing, so it works on read-only media."""
    base = job_base(base)
    states = check_grid(grid, base)
    n = len(grid.cells)
    folder = submissions.submitit_folder(base["records"], create=False)
    known = submissions.load(folder)
    names = [_run_name(st) for st in states if st.state in ("new", "resume")]
    jobs = job_states_of(known, names)
    counts: dict[str, int] = {}
    for i, (st, cell) in enumerate(zip(states, grid.cells, strict=True)):
        name = _run_name(st) if st.state in ("new", "resume") else ""
        status, info = cell_status(st.state, st.detail, jobs.get(name), known.get(name, {}).get("job_id"))
        counts[status] = counts.get(status, 0) + 1
        print(f"[{i + 1}/{n}] {cell}: {status}" + (f" — {info}" if info else ""))
    print(f"grid {grid.name}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return 0


def require_submitit() -> None:
    try:
        import submitit  # noqa: F401
    except ImportError as exc:  # pragma: no cover - a pinned dependency
        raise MMBalanceError("The slurm and local launchers need submitit: pip install submitit.") from exc

