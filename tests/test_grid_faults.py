"""Grids under faults: bad cells caught before any trains, failing and crashing cells reported
while the others go on (in-process and in worker processes), workers that die with the grid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mmbalance.grid as grid_mod
from mmbalance.cli import main
from mmbalance.errors import ConfigError
from mmbalance.grid import Cell, load_grid, run_grid
from mmbalance.records import find_runs, load_record
from mmbalance.trainer import Trainer

FAST = "{epochs: 1, n_train: 200, n_test: 100, device: cpu}"



def _lines(out: str) -> list[str]:
    """The grid's report lines, without the progress lines printed after each finished cell."""
    return [ln for ln in out.splitlines() if not ln.startswith("  progress:")]

def write_grid(tmp_path: Path, methods: str, seeds: str = "[0]", common: str = FAST) -> Path:
    path = tmp_path / "g.yaml"
    path.write_text(f"name: faults\nrecords: {tmp_path / 'runs'}\nseeds: {seeds}\nset: {common}\n"
                    f"datasets: [synthetic]\nmethods: {methods}\n")
    return path


def record_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "runs").rglob("*")) if (tmp_path / "runs").exists() else []


# ---- bad cells are found before any cell trains -----------------------------------------------
def test_typo_in_last_cell_fails_before_any_cell_trains(tmp_path):
    path = write_grid(tmp_path, "[concat, {name: sum, set: {lrr: 0.1}}, concatt]")
    grid = load_grid(path)
    with pytest.raises(ConfigError) as info:
        run_grid(grid, {})
    msg = str(info.value)
    assert "2 of 3 cells" in msg  # every bad cell in one go
    assert "[2/3] sum on synthetic seed 0" in msg and "lrr" in msg
    assert "[3/3] concatt on synthetic seed 0" in msg and "Unknown method 'concatt'" in msg
    assert "[1/3]" not in msg
    assert record_files(tmp_path) == []  # concat, the first cell, never started


def test_cli_grid_with_bad_value_exits_2_naming_the_cell(tmp_path, capsys):
    path = write_grid(tmp_path, "[concat, {name: weight, set: {weight_mode: nonsense}}]")
    assert main(["grid", str(path)]) == 2
    err = capsys.readouterr().err
    assert "weight on synthetic seed 0" in err and "nonsense" in err
    assert record_files(tmp_path) == []


def test_backbone_key_for_a_missing_modality_fails_before_training(tmp_path):
    # Trainer.check() (when present) validates backbone keys against the dataset's modalities;
    # without it the bad key would only surface once the cell builds its model.
    if not hasattr(Trainer, "check"):
        pytest.skip("Trainer.check() not available")
    path = write_grid(tmp_path, "[concat, {name: sum, set: {backbone.m9.hidden: 8}}]")
    with pytest.raises(ConfigError, match=r"\[2/2\] sum on synthetic seed 0.*m9"):
        run_grid(load_grid(path), {})
    assert record_files(tmp_path) == []


def test_dry_run_lists_invalid_cells_and_trains_nothing(tmp_path, capsys):
    path = write_grid(tmp_path, "[concat, concatt]")
    assert run_grid(load_grid(path), {}, dry_run=True) == 1
    out = capsys.readouterr().out
    assert "[1/2] concat on synthetic seed 0: new (" in out
    assert "[2/2] concatt on synthetic seed 0: INVALID — Unknown method" in out
    assert "1 new" in out and "1 INVALID" in out
    assert record_files(tmp_path) == []


def test_two_cells_with_one_configuration_are_invalid(tmp_path):
    path = write_grid(tmp_path, "[concat, {name: concat, set: {progress: off}}]")
    with pytest.raises(ConfigError, match=r"\[2/2\].*same configuration and run folder as cell \[1/2\]"):
        run_grid(load_grid(path), {})


def test_cell_refused_by_its_method_is_not_applicable_not_failed(tmp_path, capsys):
    # iprm refuses replicate_official_head_bug on two modalities (UnsupportedError)
    path = write_grid(tmp_path, "[{name: iprm, set: {replicate_official_head_bug: true}}, concat]")
    assert run_grid(load_grid(path), {}) == 0
    out = _lines(capsys.readouterr().out)
    assert out[0].startswith("[1/2] iprm on synthetic seed 0: not applicable — Method 'iprm'")
    assert out[1].startswith("[2/2] concat on synthetic seed 0: best_val test acc")
    assert out[-1] == "grid faults: 1 done, 0 skipped (already done), 1 not applicable, 0 FAILED"


# ---- failures while training: reported, the rest goes on --------------------------------------
def fail_for(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make Trainer.fit raise a RuntimeError for cells of one method (in this process)."""
    real_fit = Trainer.fit

    def fit(self, *args, **kwargs):
        if self.cfg["method"] == method:
            raise RuntimeError("injected failure")
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", fit)


def test_failing_cell_in_process_does_not_stop_the_grid(tmp_path, capsys, monkeypatch):
    # cell 2 raises a programming error in fit; cell 3 really diverges (lr 1e30: NaN loss, an
    # MMBalanceError raised by the trainer after its first epoch); cells 1 and 4 still train
    path = write_grid(tmp_path, "[concat, sum, {name: weight, set: {lr: 1.0e+30}}, "
                                "{name: unimodal, set: {modality: m2}}]")
    fail_for("sum", monkeypatch)
    assert run_grid(load_grid(path), {}) == 1
    cap = capsys.readouterr()
    lines = _lines(cap.out)
    assert lines[1].startswith("[2/4] sum on synthetic seed 0: FAILED — RuntimeError: injected failure")
    assert lines[2].startswith("[3/4] weight on synthetic seed 0: FAILED — Training diverged")
    assert lines[3].startswith("[4/4] unimodal on synthetic seed 0: best_val test acc")
    assert lines[-1] == ("grid faults: 2 done, 0 skipped (already done), 0 not applicable, 2 FAILED: "
                         "[2/4] sum on synthetic seed 0; [3/4] weight on synthetic seed 0")
    assert "Traceback" in cap.err and "injected failure" in cap.err
    errors = sorted((tmp_path / "runs").rglob(grid_mod.ERROR_FILE), key=lambda p: p.read_text())
    assert len(errors) == 2  # the traceback of the bug, the message of the divergence
    assert "injected failure" in errors[0].read_text() + errors[1].read_text()
    assert any("Training diverged" in e.read_text() for e in errors)
    assert sorted(load_record(r)["header"]["config"]["method"] for r in find_runs(tmp_path / "runs")
                  if load_record(r)["done"]) == ["concat", "unimodal"]

    # the rerun skips the finished cells and retries the failed ones
    monkeypatch.undo()
    assert run_grid(load_grid(path), {}) == 1
    out = capsys.readouterr().out
    assert out.count("done, skipped") == 2 and "[2/4] sum on synthetic seed 0: best_val" in out
    assert _lines(out)[-1].startswith("grid faults: 1 done, 2 skipped (already done), 0 not applicable, 1 FAILED")
    left = list((tmp_path / "runs").rglob(grid_mod.ERROR_FILE))  # sum's cleared by its success
    assert len(left) == 1 and "Training diverged" in left[0].read_text()


def faulty_run_cell(cell: Cell, base: dict) -> tuple[str, str]:
    """Shipped to worker processes in place of run_cell: 'sum' raises inside fit, 'weight'
    kills its worker outright (as the OOM killer would); the other cells run for real."""
    if cell.method == "weight":
        os.kill(os.getpid(), signal.SIGKILL)
    if cell.method != "sum":
        return REAL_RUN_CELL(cell, base)
    real_fit = Trainer.fit

    def fit(self, *args, **kwargs):
        raise RuntimeError("injected failure")

    Trainer.fit = fit  # this worker runs other cells afterwards: restore it
    try:
        return REAL_RUN_CELL(cell, base)
    finally:
        Trainer.fit = real_fit


REAL_RUN_CELL = grid_mod.run_cell


def test_failing_and_crashing_cells_in_workers(tmp_path, capsys, monkeypatch):
    # cell 1 kills its worker (a fresh one takes the slot), cell 3 raises in fit, cell 4 really
    # diverges; cells 2 and 5 train
    path = write_grid(tmp_path, "[weight, concat, sum, {name: concat, set: {lr: 1.0e+30}}, "
                                "{name: unimodal, set: {modality: m2}}]")
    monkeypatch.setattr(grid_mod, "run_cell", faulty_run_cell)
    assert run_grid(load_grid(path), {}, jobs=2) == 1
    out = capsys.readouterr().out
    lines = {line.split(":")[0]: line for line in _lines(out)[:-1]}
    assert len(lines) == 5
    assert "FAILED — the worker process running this cell died (killed by SIGKILL" in lines["[1/5] weight on synthetic seed 0"]
    assert "best_val test acc" in lines["[2/5] concat on synthetic seed 0"]
    assert "FAILED — RuntimeError: injected failure (traceback in" in lines["[3/5] sum on synthetic seed 0"]
    assert "FAILED — Training diverged" in lines["[4/5] concat on synthetic seed 0"]
    assert "best_val test acc" in lines["[5/5] unimodal on synthetic seed 0"]
    summary = _lines(out)[-1]
    assert summary.startswith("grid faults: 2 done, 0 skipped (already done), 0 not applicable, 3 FAILED: ")
    for tag in ("[1/5] weight", "[3/5] sum", "[4/5] concat"):
        assert tag in summary
    assert len([r for r in find_runs(tmp_path / "runs") if load_record(r)["done"]]) == 2


# ---- workers die with the grid process --------------------------------------------------------
def proc_state(pid: int) -> tuple[int, str] | None:
    """(parent pid, state letter) of a live process, None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in "ZX" else (int(fields[1]), fields[0])


def children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and (st := proc_state(int(p.name))) and st[0] == pid:
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
                out.append(int(p.name))
    return out


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    end = time.monotonic() + timeout
    while (alive := [p for p in pids if proc_state(p)]) and time.monotonic() < end:
        time.sleep(0.1)
    return alive


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        if proc_state(pid):
            os.kill(pid, signal.SIGKILL)


WATCHED = """
import sys, time
from mmbalance.grid import die_with_parent
die_with_parent(int(sys.argv[1]), prctl=sys.argv[2] == "1", watchdog=sys.argv[3] == "1", interval=0.2)
print("armed", flush=True)
time.sleep(60)
"""
MIDDLE = """
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), *sys.argv[2:]],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
assert child.stdout.readline().strip() == "armed"
print(child.pid, flush=True)
os._exit(0)  # orphan the child
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(("prctl", "watchdog", "dies"), [(True, False, True), (False, True, True), (False, False, False)],
                         ids=["prctl", "watchdog", "neither"])
def test_die_with_parent(prctl, watchdog, dies):
    res = subprocess.run([sys.executable, "-c", MIDDLE, WATCHED, str(int(prctl)), str(int(watchdog))],
                         capture_output=True, text=True, timeout=60, check=True)
    pid = int(res.stdout.strip())
    try:
        alive = wait_gone([pid], 3.0)
        assert (alive == []) is dies  # 'neither' shows that the child would otherwise live on
    finally:
        kill_all([pid])


def torch_loaded(pid: int) -> bool:
    try:
        return b"libtorch" in Path(f"/proc/{pid}/maps").read_bytes()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("moment", ["initialised", pytest.param("training", marks=pytest.mark.slow)])
def test_workers_exit_when_the_grid_process_is_killed(tmp_path, moment):
    """kill -9 the grid once both workers are initialised (torch is imported right after they
    are tied to the parent; their first cell is already queued to them, so without the tie they
    would train it as orphans), or, slower, once both cells train."""
    path = write_grid(tmp_path, "[concat]", seeds="[0, 1]",
                      common="{epochs: 100000, n_train: 200, n_test: 100, device: cpu}")
    with open(tmp_path / "out.txt", "w") as log:
        parent = subprocess.Popen([sys.executable, "-m", "mmbalance.cli", "grid", str(path), "--jobs", "2"],
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    workers: list[int] = []

    def ready() -> bool:
        if len(workers) != 2:
            return False
        if moment == "initialised":
            return all(torch_loaded(pid) for pid in workers)
        return len(list((tmp_path / "runs").glob("*/config.yaml"))) == 2

    try:
        end = time.monotonic() + 90
        while time.monotonic() < end and parent.poll() is None and not ready():
            workers = sorted(set(workers) | set(children(parent.pid)))
            time.sleep(0.1)
        assert parent.poll() is None, (tmp_path / "out.txt").read_text()
        assert ready(), f"workers did not get going: {workers}"
        parent.kill()
        parent.wait()
        assert wait_gone(workers, 5.0) == []
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        kill_all(workers)


def test_unexpected_error_before_fit_is_reported_with_its_traceback(tmp_path, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyError("kaput")

    monkeypatch.setattr("mmbalance.runner.make_trainer", boom)
    cell = Cell("concat", "synthetic", 0)
    outcome, line = grid_mod.run_cell(cell, {"records": str(tmp_path / "runs")})
    assert outcome == grid_mod.FAILED and line.startswith("FAILED — KeyError: 'kaput' (traceback in ")
    saved = tmp_path / "runs" / "grid-errors" / "synthetic_concat_s0.txt"
    assert "kaput" in saved.read_text() and "Traceback" in capsys.readouterr().err
