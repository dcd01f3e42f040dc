"""What a researcher sees: per-epoch lines, --quiet, and `mmbalance show` on any run state."""

from __future__ import annotations

import subprocess
import sys
import time

from mmbalance import records
from mmbalance.cli import main

ARGS = ["--set", "n_train=300", "--set", "n_test=100", "--epochs", "2"]


def test_one_line_per_epoch_with_the_recorded_numbers(tmp_path, capsys):
    assert main(["run", "--method", "iprm", "--dataset", "synthetic", "--records", str(tmp_path), *ARGS,
                 "--set", "progress=off"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("epoch ")]
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2  loss ")
    assert "val " in lines[0] and "test " in lines[0] and "[m1 " in lines[0] and "omega_m1 " in lines[0]
    rec = records.load_record(next(p for p in tmp_path.iterdir() if p.is_dir()))
    for line, e in zip(lines, rec["epochs"], strict=True):  # the printed numbers are the recorded ones
        assert f"loss {e['train_loss']:.4f}" in line and f"val {e['val']['fused']['acc']:.2f}" in line
        assert f"test {e['test']['fused']['acc']:.2f}" in line and f"m2 {e['test']['m2']['acc']:.1f}" in line
        assert f"omega_m1 {e['diagnostics']['omega_m1']:.3g}" in line


def test_epoch_lines_without_a_terminal_and_no_bar(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mmbalance.cli", "run", "--method", "concat", "--dataset",
                        "synthetic", "--records", str(tmp_path), *ARGS], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sum(ln.startswith("epoch ") for ln in r.stdout.splitlines()) == 2
    assert "it/s" not in r.stderr  # no progress bar in a log file


def test_quiet_prints_only_the_final_table(tmp_path, capsys):
    assert main(["run", "--method", "concat", "--dataset", "synthetic", "--records", str(tmp_path), *ARGS,
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert not any(ln.startswith("epoch ") for ln in out.splitlines()) and "best_val" in out


def test_show_a_finished_run(tmp_path, capsys):
    assert main(["run", "--method", "concat", "--dataset", "synthetic", "--records", str(tmp_path), *ARGS,
                 "--quiet"]) == 0
    capsys.readouterr()
    run_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert main(["show", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "state    done" in out and "final (test, %):" in out and "best_val" in out
    assert "test[m1]" in out and "pictures:" in out


def test_show_a_running_and_a_killed_run(tmp_path, capsys):
    cmd = [sys.executable, "-m", "mmbalance.cli", "run", "--method", "concat", "--dataset", "synthetic",
           "--records", str(tmp_path), "--set", "n_train=3000", "--set", "batch_size=8", "--epochs", "50",
           "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not list(tmp_path.glob("*/" + records.CHECKPOINT)):
            time.sleep(0.1)
        run_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
        assert main(["show", str(run_dir)]) == 0
        out = capsys.readouterr().out
        assert f"running (pid {proc.pid}" in out and "final (test, %)" not in out
    finally:
        proc.kill()
        proc.wait()
    assert main(["show", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "stopped before the end" in out
    finished = records.load_record(run_dir)["epochs"]
    assert finished  # the epochs it finished are shown, with their recorded numbers
    for e in finished:
        assert f"{e['train_loss']:.4f}" in out and f"{e['test']['fused']['acc']:.2f}" in out


def test_show_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["show", str(tmp_path)]) == 2
    assert "not a run folder" in " ".join(capsys.readouterr().err.split())
