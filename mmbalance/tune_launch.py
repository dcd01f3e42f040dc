"""A tuned grid (``tune:``) through the submitit launchers (Slurm, or submitit's local executor).

First the studies: each method x setting whose study has fewer finished trials than the
budget gets its remaining trials split into ``--jobs`` worker tasks (default one), submitted
as one job array. Every task runs :func:`mmbalance.tune.run_worker` on the study's SQLite
database in the shared records folder (the code path of ``mmbalance tune --jobs``), so the
workers of one study share it and the budget stays exact: the quotas are split at submission
from the study's own count (finished, running, trials of dead jobs failed and re-asked), and
a study is never given more workers while one of its tasks is still queued or running. A task
killed mid-trial leaves its trial to Optuna's heartbeat (failed after ``tune.GRACE_S`` and
re-asked by the next worker); the study is then short of its budget and a rerun submits the
rest.

When every study has its budget, a rerun (or ``--wait``, which waits for the workers first)
runs :func:`mmbalance.grid.tuned_grid` (nothing left to train there: it reads each study's best
and links the study to its runs) and submits the default and the best configurations' cells
as the launcher submits any grid. ``--status`` shows each study's finished / pruned /
running trials of its budget and its workers' jobs, then every cell.

SQLite needs working POSIX file locks on the records folder's filesystem (most NFS mounts with
``lockd``, Lustre with ``flock``; not every network filesystem has them): without them
concurrent workers can corrupt the study.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mmbalance import scheduler, submissions
from mmbalance.engine import stop
from mmbalance.errors import MMBalanceError
from mmbalance.grid import Grid, bad_cells_error, check_grid, study_base, study_groups

#: The launchers that can run a tuned grid's studies (the pool launcher runs them in-process).
TUNE_LAUNCHERS = ("slurm", "local")
KEY = "study:"  # the submissions file's key prefix of a study worker: study:<name>:<worker>


class StudyTask:
    """``quota`` trials of one study, as a submitit task (one task of the study array)."""

    def __init__(self, plan: Any, quota: int, total: int, worker: int) -> None:
        self.plan, self.quota, self.total, self.worker = plan, quota, total, worker

    def __call__(self) -> str:
        from mmbalance import tune

        with stop.handled(signal.SIGTERM):
            try:
                tune.run_worker(self.plan, self.quota, self.total, self.worker)
            except stop.StopRequested as exc:
                print(f"study {self.plan.name} worker {self.worker}: stopped by {exc.signal_name}; its trial is "
                      f"re-asked once the heartbeat marks it stale; submit the grid again for the rest.",
                      file=sys.stderr, flush=True)
                raise SystemExit(128 + exc.signum) from None
        line = f"study {self.plan.name} worker {self.worker}: {self.quota} trial(s) run"
        print(line, flush=True)
        return line


@dataclass
class StudyState:
    """One study of the grid: its plan, its trial counts and its workers' jobs."""

    plan: Any
    counts: dict[str, int]
    workers: dict[str, scheduler.JobState]  # job id -> state, of the workers recorded for it

    @property
    def finished(self) -> int:
        return self.counts.get("COMPLETE", 0) + self.counts.get("PRUNED", 0)

    def complete(self, trials: int) -> bool:
        return self.finished >= trials

    @property
    def busy(self) -> list[str]:
        return [jid for jid, st in self.workers.items() if st.active]

    def line(self, trials: int) -> str:
        c = self.counts
        jobs = ", ".join(f"job {jid} {st.describe()}" for jid, st in self.workers.items() if st.active)
        what = "complete" if self.complete(trials) else "not started" if not c else "in progress"
        return (f"study {self.plan.name} ({self.plan.method} on {self.plan.dataset}): {what}, {self.finished} of "
                f"{trials} trials finished ({c.get('COMPLETE', 0)} complete, {c.get('PRUNED', 0)} pruned), "
                f"{c.get('RUNNING', 0)} running" + (f", {c['FAIL']} failed (re-asked)" if c.get("FAIL") else "")
                + (f"; workers: {jobs}" if jobs else ""))


def plans(grid: Grid, base: Mapping[str, Any]) -> list[Any]:
    """The study of every method x setting of the grid (resolved, named; nothing created)."""
    return [plan for _, plan in _groups(grid, base)]


def _groups(grid: Grid, base: Mapping[str, Any]) -> list[tuple[list[Any], Any]]:
    from mmbalance import tune

    out = []
    for cells in study_groups(grid, base):
        settings, seeds = study_base(grid, cells, base)
        out.append((cells, tune.plan_study(cells[0].method, cells[0].dataset, settings, seeds=seeds)))
    return out


def study_states(grid: Grid, base: Mapping[str, Any], known: Mapping[str, Mapping[str, Any]]) -> list[StudyState]:
    from mmbalance import tune

    out = []
    for _, plan in _groups(grid, base):
        entries = {k: e for k, e in known.items() if k.startswith(f"{KEY}{plan.name}:")}
        by_launcher: dict[str, list[str]] = {}
        for e in entries.values():
            by_launcher.setdefault(str(e.get("launcher", "slurm")), []).append(str(e["job_id"]))
        workers: dict[str, scheduler.JobState] = {}
        for launcher, ids in by_launcher.items():
            workers.update(scheduler.job_states(launcher, ids))
        out.append(StudyState(plan, tune.study_progress(plan.db, plan.name) or {}, workers))
    return out


def submit_tuned_grid(grid: Grid, base: Mapping[str, Any], launcher: str, resources: Mapping[str, Any],
                      dry_run: bool = False, wait: bool | None = None, workers: int = 1) -> int:
    """Submit the studies' remaining trials; once every study has its budget, the cells (the
    defaults and each best configuration over the grid's seeds). ``wait`` (the default for
    the local launcher) waits for the study workers, then submits the cells and waits for them."""
    from mmbalance import tune
    from mmbalance.grid import tuned_grid
    from mmbalance.launchers import executor_parameters, job_base, submit_grid, submit_tasks

    if launcher not in TUNE_LAUNCHERS:
        raise MMBalanceError(f"Grid '{grid.name}' has a tune: key, which the {launcher} launcher does not run; "
                             f"use the pool (default), local or slurm launcher.")
    assert grid.tune is not None
    trials = grid.tune.trials
    wait = launcher == "local" if wait is None else wait
    base = job_base(base)
    error = bad_cells_error(grid, check_grid(grid, base), "no study and no cell was submitted")
    if error is not None:
        raise error
    folder = submissions.submitit_folder(base["records"], create=not dry_run)
    params = {**executor_parameters(grid, resources), "job_name": f"mmbalance-{grid.name}-tune"}
    jobs: list[Any] = []
    with contextlib.nullcontext() if dry_run else submissions.locked(folder):
        known = submissions.load(folder)
        studies = study_states(grid, base, known)
        tasks: list[tuple[str, StudyTask]] = []
        for st in studies:
            if st.complete(trials):
                continue
            if st.busy:
                print(f"  {st.line(trials)}; no worker submitted while these run", flush=True)
                continue
            if dry_run:
                print(f"  would submit study {st.plan.name} ({st.plan.method} on {st.plan.dataset}): "
                      f"{trials - st.finished} trial(s) left of {trials}, {workers} worker(s)", flush=True)
                continue
            quotas = tune.prepare_study(st.plan, trials, workers, say=lambda line: print(f"  {line}", flush=True))
            offset = sum(k.startswith(f"{KEY}{st.plan.name}:") for k in known)  # a fresh sampler seed per worker
            tasks += [(f"{KEY}{st.plan.name}:{offset + k}", StudyTask(st.plan, q, trials, offset + k + 1))
                      for k, q in enumerate(quotas)]
        left = [st for st in studies if not st.complete(trials)]
        if dry_run and left:
            from mmbalance.launchers import sbatch_script

            if launcher == "slurm":
                print(sbatch_script(folder, params, max(1, len(left) * workers)))
        if tasks:
            jobs = submit_tasks(launcher, folder, params, resources, [t for _, t in tasks])
            for (key, task), job in zip(tasks, jobs, strict=True):
                known[key] = submissions.entry(job.job_id, launcher, f"study {task.plan.name} worker {task.worker}")
            submissions.save(folder, known)
    for (_, task), job in zip(tasks, jobs, strict=True):
        print(f"  submitted study {task.plan.name} worker {task.worker} ({task.quota} trial(s)) as job {job.job_id} "
              f"(logs in {folder / str(job.job_id)})", flush=True)
    if left:
        print(f"grid {grid.name}: {len(left)} of {len(studies)} studies short of their {trials} trials; "
              + ("the cells are submitted once every study has its budget." if not wait or dry_run else
                 "waiting for their workers."), flush=True)
        if dry_run or not wait:
            return 0
        bad = _wait_jobs(jobs, launcher)
        still = [st for st in study_states(grid, base, submissions.load(folder)) if not st.complete(trials)]
        if still:
            for st in still:
                print(f"  {st.line(trials)}", flush=True)
            print(f"grid {grid.name}: {len(still)} studies did not reach their budget ({bad} worker job(s) failed); "
                  f"submit the grid again for the rest.", flush=True)
            return 1
    print(f"grid {grid.name}: every study has its {trials} trials; submitting the cells.", flush=True)
    expanded = tuned_grid(grid, base, say=lambda line: print(line, flush=True))
    return submit_grid(expanded, base, launcher, resources, dry_run=dry_run, wait=wait)


def _wait_jobs(jobs: Sequence[Any], launcher: str, poll_s: float = 2.0, max_poll_s: float = 30.0) -> int:
    """Wait until every study worker's job ended; returns how many did not end well."""
    import time

    left = {str(j.job_id): j for j in jobs}
    bad = 0
    delay = poll_s
    while left:
        states = scheduler.job_states(launcher, list(left))
        for jid in [j for j, st in states.items() if not st.active]:
            job = left.pop(jid)
            if launcher == "local":
                with contextlib.suppress(Exception):
                    job.result()
                    continue
                bad += 1
            elif states[jid].state not in ("COMPLETED", "FINISHED"):
                bad += 1
        if left:
            time.sleep(delay)
            delay = min(max_poll_s, delay * 1.5)
    return bad


def tuned_status(grid: Grid, base: Mapping[str, Any]) -> Grid:
    """Print every study's progress of its budget and its workers' jobs; return the grid with
    the best configurations' cells of the complete studies added (read from the studies;
    nothing is created or written), for the cells' status."""
    import optuna

    from mmbalance.grid import best_cells, check_cell
    from mmbalance.launchers import job_base

    assert grid.tune is not None
    base = job_base(base)
    known = submissions.load(submissions.submitit_folder(base["records"], create=False))
    have = {check_cell(c, base).detail for c in grid.cells}
    extra = []
    groups = _groups(grid, base)
    states = study_states(grid, base, known)
    for (cells, plan), st in zip(groups, states, strict=True):
        print(st.line(grid.tune.trials))
        if st.complete(grid.tune.trials):
            study = optuna.load_study(study_name=plan.name, storage=f"sqlite:///{plan.db.resolve()}")
            with contextlib.suppress(ValueError):  # no complete trial: nothing to add
                extra += best_cells(cells, base, plan.name, study.best_trial.params, have)
    done = sum(st.complete(grid.tune.trials) for st in states)
    print(f"grid {grid.name}: {done} of {len(states)} studies have their {grid.tune.trials} trials"
          + ("" if done == len(states) else "; the best configurations' cells are listed once their study is"))
    return Grid(grid.name, grid.cells + extra, grid.records, grid.slurm, None)
