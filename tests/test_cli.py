"""The command line: listings, one-paragraph errors with non-zero exits, a real kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmbalance.cli import main

REPO = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "mmbalance.cli", *args], capture_output=True, text=True, cwd=cwd,
        env={**os.environ, **(env or {})}, timeout=600,
    )


def test_list_has_descriptions(capsys):
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    assert "concat" in out and "unimodal" in out and "late fusion" in out
    assert main(["list", "backbones"]) == 0
    assert "resnet18" in capsys.readouterr().out


def test_config_shows_layers_and_help(capsys):
    assert main(["config", "--method", "iprm", "--dataset", "avdigits-noisy", "--set", "alpha=0.6"]) == 0
    out = capsys.readouterr().out
    assert "alpha: 0.6  # EMA momentum" in out and "image_noise: 0.5" in out
    assert "backbone.audio: {name: cnn, widths: [16, 32, 64, 128]}" in out


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--method", "concatt", "--dataset", "synthetic"], "Unknown method 'concatt'. Did you mean 'concat'"),
        (["--method", "concat", "--dataset", "cifar"], "Unknown dataset 'cifar'.*Known datasets: .*avdigits"),
        (["--method", "concat", "--dataset", "synthetic", "--set", "lrr=0.1"], "Unknown config key 'lrr'"),
        (["--method", "concat", "--dataset", "synthetic", "--set", "epochs=many"], "Bad value 'many' for 'epochs'"),
        (["--method", "concat", "--dataset", "avdigits", "--data-root", "/nonexistent/dir"], "'/nonexistent/dir'.*does not exist"),
    ],
)
def test_errors_are_one_paragraph_and_nonzero(args, pattern, capsys, tmp_path):
    code = main(["run", *args, "--records", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "Traceback" not in err
    import re

    assert re.search(pattern, " ".join(err.split())), err


def test_corrupt_wav_error_from_the_command_line(tmp_path, shared_data):
    rec = tmp_path / "fsdd" / "recordings"
    rec.mkdir(parents=True)
    for p in sorted((shared_data / "fsdd" / "recordings").glob("[0-9]_george_[0-9].wav")):
        (rec / p.name).write_bytes(p.read_bytes())
    (rec / "3_george_8.wav").write_bytes(b"not a wav at all")
    r = cli("run", "--method", "concat", "--dataset", "avdigits", "--data-root", str(tmp_path),
            "--records", str(tmp_path / "runs"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "3_george_8.wav" in r.stderr and "corrupt" in r.stderr


def test_run_prints_summary_and_record_path(tmp_path, capsys):
    code = main(["run", "--method", "sum", "--dataset", "synthetic", "--epochs", "2", "--records", str(tmp_path),
                 "--set", "n_train=300", "--set", "n_test=100", "--set", "progress=off"])
    out = capsys.readouterr().out
    assert code == 0
    assert "best_val" in out and "acc[m2]" in out and "record: " in out
    assert Path(out.split("record: ")[1].strip()).exists()


def _epochs(path: Path):
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    keep = ("epoch", "train_loss", "val", "test")
    return [{k: r[k] for k in keep} for r in rows if r["type"] == "epoch"], rows[-1]


def test_killed_process_resumes_to_the_same_record(tmp_path):
    """SIGKILL a real run mid-epoch, rerun the same command, compare with an uninterrupted run."""
    args = ["run", "--method", "concat", "--dataset", "synthetic", "--epochs", "4", "--set", "progress=off",
            "--set", "n_train=3000", "--set", "batch_size=16"]
    ref = cli(*args, "--records", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mmbalance.cli", *args, "--records", str(killed_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(killed_dir.glob("*/checkpoint.pt")):
        time.sleep(0.05)
    assert list(killed_dir.glob("*/checkpoint.pt")), "no checkpoint appeared"
    time.sleep(0.3)  # now inside the second epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = next(killed_dir.iterdir())
    assert not (run_dir / "DONE").exists()
    again = cli(*args, "--records", str(killed_dir))
    assert again.returncode == 0, again.stderr
    ref_epochs, ref_final = _epochs(next((tmp_path / "ref").iterdir()) / "record.jsonl")
    got_epochs, got_final = _epochs(run_dir / "record.jsonl")
    assert got_epochs == ref_epochs
    assert got_final["selection"] == ref_final["selection"]
