"""The Slurm path without a cluster: fake sbatch/squeue/sinfo on PATH (Slurm's real output and
error texts), submitit's local executor for real jobs, and the signals a scheduler sends."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mmbalance import records, scheduler, submissions
from mmbalance.cli import main
from mmbalance.engine.runtime import cpu_budget, limit_cpu_threads
from mmbalance.grid import load_grid
from mmbalance.launchers import CellTask, cell_status, final_status, grid_status, submit_grid
from mmbalance.runner import make_trainer

GRID = """
records: {records}
seeds: [0, 1]
set: {{epochs: 1, n_train: 200, n_test: 100, diagnostics: false}}
datasets: [synthetic]
methods: [concat]
"""

FAKES = {
    # sbatch: keeps each script it is given; refuses with the text in ./refuse when that exists
    "sbatch": """#!/bin/bash
n=$(( $(cat "$FAKE_SLURM/count" 2>/dev/null || echo 0) + 1 )); echo $n > "$FAKE_SLURM/count"
cp "$1" "$FAKE_SLURM/script-$n.sh"
if [ -f "$FAKE_SLURM/refuse" ]; then cat "$FAKE_SLURM/refuse" >&2; exit 1; fi
echo "Submitted batch job $((4240 + n))"
""",
    "srun": "#!/bin/bash\nexit 0\n",
    # squeue -h --array -t all -o '%i|%T|%r': whatever ./squeue holds
    "squeue": "#!/bin/bash\ncat \"$FAKE_SLURM/squeue\" 2>/dev/null\nexit 0\n",
    "sacct": "#!/bin/bash\necho 'Slurm accounting storage is disabled' >&2\nexit 1\n",
    "sinfo": "#!/bin/bash\necho 'debug*|2|23081|(null)|infinite'\n",
}


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """A directory of fake Slurm commands first on PATH; returns its state folder."""
    bin_dir, state = tmp_path / "fake-bin", tmp_path / "fake-state"
    bin_dir.mkdir()
    state.mkdir()
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(state))
    return state


def _grid(tmp_path: Path, records_dir: str | Path, text: str = GRID) -> Path:
    path = tmp_path / "g.yaml"
    path.write_text(text.format(records=records_dir))
    return path


def _submitted(state: Path) -> int:
    return int((state / "count").read_text()) if (state / "count").exists() else 0


# ---- what is submitted ---------------------------------------------------------------------------
def test_dry_run_prints_the_script_that_is_then_submitted(tmp_path, fake_slurm, monkeypatch, capsys):
    """The preview is the very script sbatch receives: this interpreter and the records folder
    as absolute paths (a relative `runs` given), the resources and a 24 h limit by default
    (submitit's own default would be 5 minutes)."""
    monkeypatch.chdir(tmp_path)
    path = _grid(tmp_path, "runs")
    assert main(["grid", str(path), "--launcher", "slurm", "--dry-run", "--cpus-per-task", "1"]) == 0
    out = capsys.readouterr().out
    preview = out[out.index("#!/bin/bash"):out.index("  would submit")].rstrip("\n")
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    folder = tmp_path / "runs" / ".submitit"
    assert f"{sys.executable} -u -m submitit.core._submit {folder}/%j" in preview
    assert "#SBATCH --time=1440" in preview and "#SBATCH --cpus-per-task=1" in preview
    assert "#SBATCH --array=0-1%2" in preview
    assert main(["grid", str(path), "--launcher", "slurm", "--cpus-per-task", "1"]) == 0
    assert (fake_slurm / "script-1.sh").read_text().rstrip("\n") == preview
    assert "submitted [2/2] concat on synthetic seed 1 as job 4241_1" in capsys.readouterr().out
    saved = submissions.load(folder)
    assert sorted(e["job_id"] for e in saved.values()) == ["4241_0", "4241_1"]
    assert {e["launcher"] for e in saved.values()} == {"slurm"}


def test_a_queued_or_running_cell_is_not_submitted_again(tmp_path, fake_slurm, capsys):
    """A rerun asks squeue about the recorded jobs: a PENDING one shows as queued with its
    reason (PartitionConfig: never starts), a RUNNING one as running; neither is submitted
    again. Once squeue no longer knows them, the rerun submits the cells again. Wrong variant:
    deciding from the records alone resubmits both."""
    path = _grid(tmp_path, tmp_path / "runs")
    assert main(["grid", str(path), "--launcher", "slurm"]) == 0
    assert _submitted(fake_slurm) == 1
    (fake_slurm / "squeue").write_text("4241_0|PENDING|PartitionConfig\n4241_1|RUNNING|None\n")
    capsys.readouterr()
    assert main(["grid", str(path), "--launcher", "slurm"]) == 0
    out = capsys.readouterr().out
    assert _submitted(fake_slurm) == 1
    assert "0 of 2 cells to submit (0 done or not applicable, 2 already queued or running)" in out
    assert "[1/2] concat on synthetic seed 0: queued as job 4241_0 (PENDING, reason PartitionConfig" in out
    assert "[2/2] concat on synthetic seed 1: running as job 4241_1 (RUNNING); not submitted again" in out
    assert main(["grid", str(path), "--status"]) == 0
    status = capsys.readouterr().out.splitlines()
    assert status[0].startswith("[1/2] concat on synthetic seed 0: queued — job 4241_0, PENDING, reason "
                                "PartitionConfig: it asks more than the partition allows, so it can never start")
    assert status[1] == "[2/2] concat on synthetic seed 1: running — job 4241_1, RUNNING"
    (fake_slurm / "squeue").write_text("4241_0|CANCELLED|PartitionConfig\n")  # 4241_1: forgotten
    assert main(["grid", str(path), "--status"]) == 0
    status = capsys.readouterr().out.splitlines()
    assert "pending — not started; its job 4241_0 ended (CANCELLED)" in status[0]
    assert "pending — not started; its job 4241_1 is gone" in status[1]
    assert main(["grid", str(path), "--launcher", "slurm"]) == 0
    assert _submitted(fake_slurm) == 2
    saved = submissions.load(tmp_path / "runs" / ".submitit")
    assert sorted(e["job_id"] for e in saved.values()) == ["4242_0", "4242_1"]


@pytest.mark.parametrize(
    ("refusal", "option", "line"),
    [("sbatch: error: Memory specification can not be satisfied\n"
      "sbatch: error: Batch job submission failed: Requested node configuration is not available\n",
      ["--mem-gb", "900"], "error: sbatch refused: 900 GB memory per task (--mem-gb), but partition debug's nodes "
                           "have 23 GB."),
     ("sbatch: error: Batch job submission failed: More processors requested than permitted\n",
      ["--cpus-per-task", "8"], "error: sbatch refused: 8 CPUs per task (--cpus-per-task), but partition debug's "
                                "nodes have 2."),
     ("sbatch: error: invalid partition specified: gpu\n"
      "sbatch: error: Batch job submission failed: Invalid partition name specified\n",
      ["--partition", "gpu"], "error: sbatch refused: no partition 'gpu' (--partition); there are debug.")],
)
def test_a_refused_submission_is_one_line_and_leaves_no_pickles(tmp_path, fake_slurm, capsys, refusal, option, line):
    """Slurm's own error texts (22.05) become one line naming the resource and the node's
    limit; the task pickles and script submitit wrote for the refused array are removed and no
    job id is recorded. (It was a 35-line traceback with orphan .pkl files.)"""
    (fake_slurm / "refuse").write_text(refusal)
    path = _grid(tmp_path, tmp_path / "runs")
    assert main(["grid", str(path), "--launcher", "slurm", *option]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [line]
    folder = tmp_path / "runs" / ".submitit"
    assert sorted(p.name for p in folder.iterdir()) == ["submissions.lock"]
    assert _submitted(fake_slurm) == 1


def test_slurm_launcher_without_slurm_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    path = _grid(tmp_path, tmp_path / "runs")
    assert main(["grid", str(path), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err
    assert "needs Slurm's commands (sbatch, srun) on PATH" in err and "Traceback" not in err
    assert not list((tmp_path / "runs" / ".submitit").glob("*.pkl"))


def test_a_linked_submitit_folder_is_refused(tmp_path, fake_slurm):
    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs" / ".submitit").symlink_to(tmp_path / "elsewhere")
    path = _grid(tmp_path, tmp_path / "runs")
    assert main(["grid", str(path), "--launcher", "slurm"]) == 2
    assert list((tmp_path / "elsewhere").iterdir()) == [] and _submitted(fake_slurm) == 0


# ---- real jobs through submitit's local executor --------------------------------------------------
def test_local_launcher_does_not_submit_a_running_cell_again(tmp_path, capsys):
    path = _grid(tmp_path, tmp_path / "runs", GRID.replace("seeds: [0, 1]", "seeds: [0]"))
    grid = load_grid(path)
    base = {"records": grid.records}
    assert submit_grid(grid, base, "local", {}, wait=False) == 0
    first = capsys.readouterr().out
    job_id = first.split(" as job ")[1].split()[0]
    try:
        assert submit_grid(grid, base, "local", {}, wait=False) == 0
        out = capsys.readouterr().out
        assert f"running as job {job_id} (RUNNING); not submitted again" in out
        assert "0 of 1 cells to submit" in out and "submitted [" not in out
        grid_status(grid, base)
        assert f": running — job {job_id}" in capsys.readouterr().out
    finally:
        deadline = time.time() + 300
        while time.time() < deadline and scheduler.local_states([job_id])[job_id].active:
            time.sleep(0.2)
    assert submit_grid(grid, base, "local", {}) == 0
    assert "0 of 1 cells to submit (1 done or not applicable)" in capsys.readouterr().out


LONG = """
records: {records}
seeds: [0]
set: {{epochs: 4, n_train: 2000, batch_size: 16, diagnostics: false}}
datasets: [synthetic]
methods: [concat]
"""


def test_sigterm_stops_a_local_job_at_a_batch_and_the_cell_resumes(tmp_path, monkeypatch, capsys):
    """SIGTERM (what scancel and scontrol requeue send) reaches the task through submitit's
    local controller: the task stops at the next batch, keeps its last finished epoch and
    exits, instead of training on (submitit's wrapper ignores SIGTERM). Submitting again
    resumes the cell from that epoch. Wrong variant: SIGTERM ignored, the job trains to DONE."""
    import submitit

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    grid = load_grid(_grid(tmp_path, tmp_path / "runs", LONG))
    base = {"records": grid.records, "progress": "off", "log_epochs": False}
    ex = submitit.LocalExecutor(folder=tmp_path / "runs" / ".submitit" / "%j")
    job = ex.submit(CellTask(grid.cells[0], base))
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "runs").glob("*/" + records.CHECKPOINT)):
        time.sleep(0.05)
    run_dir = next(p.parent for p in (tmp_path / "runs").glob("*/" + records.CHECKPOINT))
    os.kill(int(job.job_id), signal.SIGTERM)  # to the controller, which forwards it to the task
    t0 = time.time()
    while not job.done() and time.time() - t0 < 60:
        time.sleep(0.05)
    assert job.done()
    rec = records.load_record(run_dir)
    assert not rec["done"] and 1 <= len(rec["epochs"]) < 4
    assert "stopped by SIGTERM; the last finished epoch is checkpointed" in (job.stderr() or "")
    assert records.lock_holder(run_dir) is None
    capsys.readouterr()
    assert submit_grid(grid, {"records": grid.records}, "local", {}) == 0
    out = capsys.readouterr().out
    assert "[1/1] concat on synthetic seed 0: best_val test acc" in out and ", resumed, cpu)" in out
    rec = records.load_record(run_dir)
    assert rec["done"] and rec["header"]["resumed_from_epoch"] >= 1


def test_a_cell_out_of_time_out_requeues_is_reported_timed_out(tmp_path, monkeypatch):
    """USR2 goes through submitit's own checkpoint-and-requeue handler, at a batch boundary; on
    the time-out that exhausts the requeues submitit refuses to requeue, and the cell is
    reported TIMED OUT (status "timed out"), never as completed or as an anonymous failure."""
    from submitit.core.job_environment import SignalHandler
    from submitit.core.utils import DelayedSubmission, JobPaths
    from submitit.local.local import LocalJobEnvironment

    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "7")
    torch.set_num_threads(1)
    grid = load_grid(_grid(tmp_path, tmp_path / "runs", LONG))
    base = {"records": grid.records, "progress": "off", "log_epochs": False}
    task = CellTask(grid.cells[0], base)
    delayed = DelayedSubmission(task)
    delayed.set_timeout(0.001, 0)  # no time-out requeue left, and any run time is past the limit
    paths = JobPaths(tmp_path / "job" / "%j", job_id="7", task_id=0)
    paths.folder.mkdir(parents=True)
    handler = SignalHandler(LocalJobEnvironment(), paths, delayed)
    previous = signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)

    def time_limit() -> None:  # what the controller does shortly before the limit
        deadline = time.time() + 300
        while time.time() < deadline and not list((tmp_path / "runs").glob("*/" + records.CHECKPOINT)):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGUSR2)

    thread = threading.Thread(target=time_limit)
    thread.start()
    try:
        outcome, line = task()
    finally:
        thread.join()
        signal.signal(signal.SIGUSR2, previous)
    assert outcome == "failed" and "the job reached its time limit" in line
    trainer = make_trainer("concat", "synthetic", {**grid.cells[0].overrides, **base, "seed": 0,
                                                  "records": os.path.abspath(grid.records)})
    rec = records.load_record(trainer.run_dir)
    assert not rec["done"] and len(rec["epochs"]) < 4
    status, info = cell_status("resume", str(trainer.run_dir))
    assert status == "timed out" and "the job reached its time limit" in info and "--time-min" in info
    from mmbalance.grid import CellState

    assert final_status(CellState("resume", str(trainer.run_dir)), scheduler.JobState("FAILED"))[1].startswith(
        "TIMED OUT — the job reached its time limit")


@pytest.mark.slow
def test_preemption_requeues_the_local_job_and_it_resumes(tmp_path, monkeypatch, capsys):
    """USR2 (pre-emption) through submitit's local executor: checkpoint, requeue (the controller
    restarts the task), resume from the cell's last epoch, finish."""
    import submitit

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    grid = load_grid(_grid(tmp_path, tmp_path / "runs", LONG))
    base = {"records": os.path.abspath(grid.records), "progress": "off", "log_epochs": False}
    ex = submitit.LocalExecutor(folder=tmp_path / "runs" / ".submitit" / "%j")
    ex.update_parameters(timeout_min=60)
    job = ex.submit(CellTask(grid.cells[0], base))
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "runs").glob("*/" + records.CHECKPOINT)):
        time.sleep(0.05)
    job._interrupt()  # USR2, as Slurm's pre-emption through submitit
    outcome, line = job.result()
    assert outcome == "trained"
    run_dir = next(p.parent for p in (tmp_path / "runs").glob("*/" + records.CHECKPOINT))
    rec = records.load_record(run_dir)
    assert rec["done"] and rec["header"]["resumed_from_epoch"] >= 1 and len(rec["header"]["segments"]) == 2


# ---- threads ---------------------------------------------------------------------------------------
def test_threads_follow_the_slurm_allocation_and_the_affinity_mask(tmp_path, monkeypatch):
    """A task given 1 CPU by Slurm trains on 1 thread and records it and why; so does a process
    whose affinity mask holds 1 CPU. Threads are lowered, never raised. Wrong variant: torch's
    default (the machine's cores) recorded cpu_threads 2 for a 1-CPU task."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(os, "cpu_count", lambda: 2)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
        t = make_trainer("concat", "synthetic", {"epochs": 1, "n_train": 200, "n_test": 100, "progress": "off",
                                                 "diagnostics": False, "records": str(tmp_path)})
        rec = t.fit()
        assert rec["header"]["cpu_threads"] == 1 and rec["header"]["segments"][0]["cpu_threads"] == 1
        assert rec["header"]["cpu_allocation"] == {"threads": 1, "cpus_available": 1,
                                                   "cpus_from": "SLURM_CPUS_PER_TASK=1", "lowered_from": 2}
        monkeypatch.delenv("SLURM_CPUS_PER_TASK")
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1})
        torch.set_num_threads(2)
        assert cpu_budget() == (1, "the affinity mask (1 CPU)")
        assert limit_cpu_threads()["threads"] == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
        assert limit_cpu_threads() == {"threads": 1, "cpus_available": 2, "cpus_from": "the machine's 2 CPUs",
                                       "lowered_from": None}  # a user's lower setting stands
        monkeypatch.setenv("SLURM_CPUS_ON_NODE", "1")  # a one-task job without --cpus-per-task
        assert cpu_budget() == (1, "SLURM_CPUS_ON_NODE=1")
    finally:
        torch.set_num_threads(before)


def test_submissions_file_is_never_read_or_written_through_a_link(tmp_path):
    folder = submissions.submitit_folder(tmp_path / "runs")
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (folder / submissions.FILE).symlink_to(target)
    with pytest.raises(records.RunFolderLinkError):
        submissions.load(folder)
    submissions.save(folder, {"x": submissions.entry("1", "slurm", "cell")})
    assert target.read_text() == "keep me" and not (folder / submissions.FILE).is_symlink()
    assert json.loads((folder / submissions.FILE).read_text())["x"]["job_id"] == "1"


# ---- tuned grids ---------------------------------------------------------------------------------
TUNED = """
records: {records}
seeds: [0]
set: {{epochs: 1, n_train: 200, n_test: 100, diagnostics: false}}
tune: {{trials: 3}}
datasets: [synthetic]
methods: [concat, ogm]
"""


def _study_counts(records_dir: Path) -> dict[str, dict[str, int]]:
    import optuna

    from mmbalance import tune

    out = {}
    for db in tune.study_databases(records_dir):
        study = optuna.load_study(study_name=db.stem, storage=f"sqlite:///{db}")
        out[db.stem.split("_")[0]] = tune.count_states(study)
    return out


def test_slurm_submits_each_study_s_workers_as_one_array_and_never_twice_while_they_run(tmp_path, fake_slurm, capsys):
    """tune: grids on Slurm: the first submission is the studies' workers only (--jobs 2: two
    tasks per study, quotas 2 + 1 of the 3 trials, one array), each recorded under its study;
    a rerun while squeue says they run submits nothing (neither workers nor cells), and
    --status shows each study's progress of its budget with its workers. Variants caught:
    submitting the cells before the studies have their budget; resubmitting a study whose
    workers still run."""
    path = _grid(tmp_path, tmp_path / "runs", TUNED)
    assert main(["grid", str(path), "--launcher", "slurm", "--dry-run", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-3" in out and "would submit study concat_synthetic_" in out
    assert "3 trial(s) left of 3, 2 worker(s)" in out and _submitted(fake_slurm) == 0
    assert main(["grid", str(path), "--launcher", "slurm", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert _submitted(fake_slurm) == 1  # one array for the four workers
    assert "#SBATCH --array=0-3" in (fake_slurm / "script-1.sh").read_text()
    assert "(2 trial(s)) as job 4241_0" in out and "(1 trial(s)) as job 4241_1" in out
    assert "2 of 2 studies short of their 3 trials; the cells are submitted once every study has its budget" in out
    saved = submissions.load(tmp_path / "runs" / ".submitit")
    assert sorted(saved) == sorted(f"study:{n}:{k}" for n in {k.split(":")[1] for k in saved} for k in (0, 1))
    assert len({k.split(":")[1] for k in saved}) == 2
    (fake_slurm / "squeue").write_text("".join(f"4241_{i}|RUNNING|None\n" for i in range(4)))
    assert main(["grid", str(path), "--launcher", "slurm", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert _submitted(fake_slurm) == 1 and "no worker submitted while these run" in out
    assert main(["grid", str(path), "--status"]) == 0
    status = capsys.readouterr().out
    assert re.search(r"study concat_synthetic_\w+ \(concat on synthetic\): in progress, 0 of 3 trials finished "
                     r"\(0 complete, 0 pruned\), 0 running; workers: job 4241_[01] RUNNING", status)
    assert "grid g: 0 of 2 studies have their 3 trials" in status
    assert "[1/2] concat on synthetic seed 0: pending" in status


@pytest.mark.slow  # about 40 s of job start-ups; the submission logic is tested above without them
def test_local_launcher_runs_the_studies_with_exact_budgets_then_the_cells(tmp_path, capsys):
    """The same through submitit's local executor, for real: two workers per study share its
    SQLite database and finish exactly its 2 trials (none lost, none extra), then the default
    and best cells run, the study is linked to its runs (the leaderboard's tuned table), and
    a rerun submits nothing. Variant caught: each worker running the whole budget (4 trials)."""
    from mmbalance.leaderboard import write_leaderboard

    records_dir = tmp_path / "runs"
    path = _grid(tmp_path, records_dir, TUNED.replace("trials: 3", "trials: 2").replace("[concat, ogm]", "[ogm]"))
    grid = load_grid(path)
    assert submit_grid_tuned(grid, {"records": grid.records}, workers=2) == 0
    out = capsys.readouterr().out
    counts = _study_counts(records_dir)
    assert sorted(counts) == ["ogm"]
    for c in counts.values():
        assert c.get("COMPLETE", 0) + c.get("PRUNED", 0) == 2 and not c.get("RUNNING") and not c.get("WAITING")
    assert "every study has its 2 trials; submitting the cells" in out
    assert re.search(r"grid g: \d+ finished, 0 FAILED or timed out", out)
    md = write_leaderboard(records_dir, tmp_path / "lb", "lb", rules=("best_val",), pictures=False)[0].read_text()
    assert "2 finished trials per method × setting (budget 2), 1 study" in md
    assert submit_grid_tuned(grid, {"records": grid.records}, workers=2) == 0
    again = capsys.readouterr().out
    assert "submitted study" not in again and "cells to submit (" in again and " 0 of " in again


def submit_grid_tuned(grid, base, workers):
    from mmbalance.tune_launch import submit_tuned_grid

    return submit_tuned_grid(grid, base, "local", {}, workers=workers)
