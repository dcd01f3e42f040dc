"""Grids past one machine: submitit's Slurm job array (dry run here), its local executor, status."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mmbalance import records
from mmbalance.cli import main
from mmbalance.errors import ConfigError
from mmbalance.grid import load_grid
from mmbalance.launchers import grid_status, slurm_parameters, submit_grid

GRID = """
records: {records}
seeds: [0, 1]
set: {{epochs: 1, n_train: 200, n_test: 100}}
datasets: [synthetic]
methods: [concat, sum]
slurm: {{gpus_per_task: 1, time_min: 30}}
"""


def _grid(tmp_path: Path) -> Path:
    path = tmp_path / "g.yaml"
    path.write_text(GRID.format(records=tmp_path / "runs"))
    return path


def test_slurm_dry_run_builds_the_job_array_without_slurm(tmp_path, capsys):
    assert main(["grid", str(_grid(tmp_path)), "--launcher", "slurm", "--dry-run", "--partition", "gpu",
                 "--mem-gb", "16"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-3" in out and "#SBATCH --gpus-per-task=1" in out
    assert "#SBATCH --partition=gpu" in out and "#SBATCH --mem=16G" in out and "#SBATCH --time=30" in out
    assert out.count("would submit") == 4
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*/record.jsonl"))


def test_bad_resources_are_refused():
    with pytest.raises(ConfigError, match="Unknown Slurm resource"):
        slurm_parameters({"gpu": 1})
    with pytest.raises(ConfigError, match="must be positive"):
        slurm_parameters({"time_min": 0})


def test_local_launcher_runs_the_grid_and_a_rerun_submits_nothing(tmp_path, capsys):
    grid = load_grid(_grid(tmp_path))
    assert submit_grid(grid, {"records": grid.records}, "local", {}) == 0
    runs = records.find_runs(tmp_path / "runs")
    assert len(runs) == 4 and all(records.load_record(r)["done"] for r in runs)
    capsys.readouterr()
    assert submit_grid(grid, {"records": grid.records}, "local", {}) == 0
    assert "0 of 4 cells to submit" in capsys.readouterr().out
    assert (tmp_path / "runs" / ".submitit").stat().st_mode & 0o777 == 0o700


def test_status_of_a_mixed_records_folder(tmp_path, capsys):
    from mmbalance.runner import make_trainer, run

    grid = load_grid(_grid(tmp_path))
    base = {"records": grid.records, "progress": "off", "log_epochs": False}
    cells = grid.cells
    run(cells[0].method, cells[0].dataset, {**cells[0].overrides, **base, "seed": cells[0].seed})  # done
    failed = make_trainer(cells[1].method, cells[1].dataset, {**cells[1].overrides, **base, "seed": cells[1].seed})
    failed.run_dir.mkdir(parents=True)
    (failed.run_dir / "error.txt").write_text("cell (time)\nRuntimeError: boom\n")
    held = make_trainer(cells[2].method, cells[2].dataset, {**cells[2].overrides, **base, "seed": cells[2].seed})
    with records.RunLock(held.run_dir):  # another process would hold it while training
        assert grid_status(grid, base) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert ": done — best_val test acc " in lines[0] and ", new, cpu)" in lines[0]  # its result line
    assert "failed — RuntimeError: boom" in lines[1]
    assert ": running — " in lines[2] and "pid" in lines[2]
    assert lines[3].endswith("pending — not started")


@pytest.mark.slow
def test_a_cell_killed_under_the_local_executor_resumes(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(f"records: {tmp_path / 'runs'}\nseeds: [0]\nset: {{epochs: 6, n_train: 3000, batch_size: 8}}\n"
                    "datasets: [synthetic]\nmethods: [concat]\n")
    grid = load_grid(path)
    import submitit

    from mmbalance.launchers import CellTask

    ex = submitit.LocalExecutor(folder=tmp_path / "runs" / ".submitit" / "%j")
    base = {"records": grid.records, "progress": "off", "log_epochs": False}
    job = ex.submit(CellTask(grid.cells[0], base))
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "runs").glob("*/" + records.CHECKPOINT)):
        time.sleep(0.2)
    job.cancel()
    time.sleep(1)
    run_dir = next(p.parent for p in (tmp_path / "runs").glob("*/" + records.CHECKPOINT))
    assert not (run_dir / records.DONE).exists()
    assert submit_grid(grid, {"records": grid.records}, "local", {}) == 0
    rec = records.load_record(run_dir)
    assert rec["done"] and rec["header"]["resumed_from_epoch"] >= 1
