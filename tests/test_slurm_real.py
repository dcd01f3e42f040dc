"""The Slurm launcher against a real Slurm (skipped where none answers).

Start a single-node Slurm to run it: ``benchmarks/slurm/start-single-node.sh`` (Debian packages
slurmctld slurmd slurm-client munge; see benchmarks/slurm/README.md). The records folder must be
one the compute nodes see (on a single node, any local folder is).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from mmbalance import records, scheduler, submissions
from mmbalance.cli import main


def _slurm_answers() -> bool:
    if not (shutil.which("sbatch") and shutil.which("srun") and shutil.which("squeue")):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and any(s.strip("*~#") in ("idle", "mixed", "allocated", "completing")
                                       for s in out.stdout.split())


pytestmark = pytest.mark.skipif(not _slurm_answers(), reason="no Slurm controller answers here (sbatch, sinfo)")

GRID = """
records: {records}
seeds: [0, 1]
set: {{epochs: {epochs}, n_train: {n_train}, n_test: 100, batch_size: {batch}, diagnostics: false}}
datasets: [synthetic]
methods: [concat]
"""


def _grid(tmp_path: Path, name: str, epochs: int = 1, n_train: int = 200, batch: int = 64) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(GRID.format(records=tmp_path / name, epochs=epochs, n_train=n_train, batch=batch))
    return path


def _wait(predicate, what: str, limit_s: float = 600) -> None:
    deadline = time.time() + limit_s
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    pytest.fail(f"waited {limit_s:.0f} s for {what} (is the Slurm node busy? `squeue`)")


def test_a_grid_on_real_slurm(tmp_path, capsys):
    """Submit, no duplicates on a rerun, --status with job ids, results once done, one CPU
    per task used and recorded; a refusal as one line without orphan pickles."""
    path = _grid(tmp_path, "runs")
    folder = tmp_path / "runs" / ".submitit"
    assert main(["grid", str(path), "--launcher", "slurm", "--cpus-per-task", "1", "--time-min", "10"]) == 0
    assert capsys.readouterr().out.count(" as job ") == 2
    ids = sorted(e["job_id"] for e in submissions.load(folder).values())
    assert main(["grid", str(path), "--launcher", "slurm", "--cpus-per-task", "1", "--time-min", "10"]) == 0
    again = capsys.readouterr().out
    assert "0 of 2 cells to submit" in again and again.count("; not submitted again") == 2  # queued or running
    assert sorted(e["job_id"] for e in submissions.load(folder).values()) == ids
    assert main(["grid", str(path), "--status"]) == 0
    status = capsys.readouterr().out
    assert all(f"job {i}" in status or ": done — " in status for i in ids)

    def finished() -> bool:
        return not any(s.active for s in scheduler.slurm_states(ids).values())

    _wait(finished, "the two cells' jobs")
    assert main(["grid", str(path), "--status"]) == 0
    status = capsys.readouterr().out.splitlines()
    assert all(": done — best_val test acc " in line for line in status[:2]), status
    for run in records.find_runs(tmp_path / "runs"):
        header = records.load_record(run)["header"]
        assert header["cpu_threads"] == 1 and header["cpu_allocation"]["threads"] == 1

    refused = _grid(tmp_path, "refused")
    assert main(["grid", str(refused), "--launcher", "slurm", "--mem-gb", "100000"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: sbatch refused: 100000 GB memory per task (--mem-gb)"), err
    assert not [p for p in (tmp_path / "refused" / ".submitit").iterdir() if p.suffix == ".pkl"]


def test_scancel_stops_a_cell_at_a_batch_and_a_resubmission_resumes(tmp_path, capsys):
    """scancel sends SIGTERM: the cell stops at once (not after KillWait) with its last epoch
    checkpointed; the next submission resumes it and --wait prints its result line."""
    path = _grid(tmp_path, "runs", epochs=4, n_train=12000, batch=8)  # long enough epochs to cancel mid-run
    path.write_text(path.read_text().replace("seeds: [0, 1]", "seeds: [0]"))
    assert main(["grid", str(path), "--launcher", "slurm", "--cpus-per-task", "1", "--time-min", "10"]) == 0
    capsys.readouterr()
    folder = tmp_path / "runs" / ".submitit"
    (job_id,) = [e["job_id"] for e in submissions.load(folder).values()]
    _wait(lambda: bool(list((tmp_path / "runs").glob("*/" + records.CHECKPOINT))), "the first epoch")
    subprocess.run(["scancel", job_id], check=True)
    t0 = time.time()
    _wait(lambda: not scheduler.slurm_states([job_id])[job_id].active, "the cancelled job to end", 60)
    assert time.time() - t0 < 25  # Slurm's KillWait is 30 s: the task stopped itself before
    run_dir = next(p.parent for p in (tmp_path / "runs").glob("*/" + records.CHECKPOINT))
    assert not records.load_record(run_dir)["done"]
    log = "".join(p.read_text() for p in (folder / job_id).glob("*_log.err"))
    assert "stopped by SIGTERM; the last finished epoch is checkpointed" in log
    assert main(["grid", str(path), "--launcher", "slurm", "--cpus-per-task", "1", "--time-min", "10", "--wait"]) == 0
    out = capsys.readouterr().out
    assert "[1/1] concat on synthetic seed 0: best_val test acc" in out and ", resumed, cpu)" in out
    rec = records.load_record(run_dir)
    assert rec["done"] and rec["header"]["resumed_from_epoch"] >= 1
    assert json.loads((folder / submissions.FILE).read_text())  # the new job is recorded
