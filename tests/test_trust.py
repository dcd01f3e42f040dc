"""Trustworthy runs (issue 7): nothing read from a run folder executes, cached results are keyed
to their data, damaged files are clear errors, bad settings are refused with one line."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mmbalance import records
from mmbalance.cli import main
from mmbalance.errors import ConfigError, MMBalanceError
from mmbalance.runner import make_trainer, run

SMALL = {"epochs": 2, "n_train": 200, "n_test": 100}


class Planted:
    """Unpickling this writes a marker file: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmbalance.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_planted_pickle_checkpoint_never_executes(fast, tmp_path):
    overrides = {**fast, **SMALL}
    t = make_trainer("concat", "synthetic", overrides)
    t.run_dir.mkdir(parents=True)
    marker = tmp_path / "pwned"
    with open(t.run_dir / records.CHECKPOINT, "wb") as f:
        pickle.dump({"epoch": 0, "model": Planted(marker)}, f)
    with pytest.raises(records.RecordError, match="--fresh"):
        run("concat", "synthetic", overrides)
    assert not marker.exists()
    fresh = run("concat", "synthetic", overrides, fresh=True)  # the named way out works
    assert fresh.record["done"] and not marker.exists()


def test_damaged_record_and_checkpoint_give_clear_errors_from_the_command_line(tmp_path):
    args = ["run", "--method", "concat", "--dataset", "synthetic", "--records", str(tmp_path),
            "--epochs", "2", "--set", "n_train=200", "--set", "n_test=100", "--set", "progress=off"]
    assert main(args) == 0
    run_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    rec = run_dir / records.RECORD
    text = rec.read_text()
    rec.write_text(text[: len(text) - 40])  # cut mid-line, DONE still there
    r = _cli(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "record.jsonl" in r.stderr and "--fresh" in r.stderr
    assert main([*args, "--fresh"]) == 0
    (run_dir / records.DONE).unlink()
    ckpt = run_dir / records.CHECKPOINT
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated checkpoint of a killed run
    r = _cli(*args)
    assert r.returncode == 2 and "checkpoint.pt" in r.stderr and "--fresh" in r.stderr


def _features(folder: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for split, n in (("train", 200), ("test", 80)):
        y = np.arange(n) % 4
        a = rng.normal(size=(n, 6)) + y[:, None] * (1.0 + seed)
        b = rng.normal(size=(n, 5))
        np.savez(folder / f"{split}.npz", a=a.astype(np.float32), b=b.astype(np.float32), label=y)
    return folder


def test_other_data_is_another_cell_never_old_numbers(fast, tmp_path):
    one, two = _features(tmp_path / "one", 0), _features(tmp_path / "two", 1)
    base = {**fast, "epochs": 2}
    r1 = run("concat", "features", {**base, "data_root": str(one)})
    r2 = run("concat", "features", {**base, "data_root": str(two)})
    assert r1.run_dir != r2.run_dir
    assert r1.record["epochs"] != r2.record["epochs"]
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in one.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert run("concat", "features", {**base, "data_root": str(copy)}).run_dir == r1.run_dir  # same content


def test_resume_refuses_a_checkpoint_of_other_data(fast, tmp_path):
    overrides = {**fast, **SMALL}
    t = make_trainer("concat", "synthetic", overrides)
    t.setup()
    t.run_dir.mkdir(parents=True)
    t._save_checkpoint(0)
    t2 = make_trainer("concat", "synthetic", overrides)
    t2.data_fingerprint = {"files": "0123"}
    t2.setup()
    with pytest.raises(records.RecordError, match="other data"):
        t2._load_checkpoint()


def test_backbone_key_for_a_missing_modality_is_refused(fast):
    with pytest.raises(ConfigError, match="Did you mean 'fac'"):
        run("concat", "mfeat", {**fast, "backbone.fca.weights": "/tmp/w.pt"})


@pytest.mark.parametrize(("key", "value"), [
    ("epochs", 0), ("lr", -1), ("momentum", -1), ("batch_size", 0), ("step_size", 0),
    ("num_workers", -1), ("val_fraction", 1.5), ("weight_decay", -0.1), ("seed", -3), ("gamma", 0),
])
def test_settings_out_of_range_are_one_line_errors(key, value, capsys, tmp_path):
    code = main(["run", "--method", "concat", "--dataset", "synthetic", "--records", str(tmp_path),
                 "--set", f"{key}={value}"])
    err = capsys.readouterr().err
    assert code == 2 and f"'{key}'" in err and "must be" in err
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def test_val_fraction_zero_validates_on_test_and_says_so(fast):
    rec = run("concat", "mfeat", {**fast, "epochs": 1, "val_fraction": 0}).record
    assert rec["header"]["dataset_info"]["val_is_test"] is True
    assert rec["epochs"][0]["val"] == rec["epochs"][0]["test"]


def test_one_writer_per_run_folder(tmp_path):
    args = ["run", "--method", "concat", "--dataset", "synthetic", "--records", str(tmp_path),
            "--set", "n_train=3000", "--set", "batch_size=8", "--epochs", "3", "--set", "progress=off"]
    first = subprocess.Popen([sys.executable, "-m", "mmbalance.cli", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("*/LOCK")):
        time.sleep(0.05)
    second = _cli(*args)
    assert second.returncode != 0
    assert "already" in second.stderr and f"pid {first.pid}" in second.stderr
    first.kill()  # a stale lock left by a killed process is taken over
    first.wait()
    run_dir = next(p.parent for p in tmp_path.glob("*/LOCK"))
    with records.RunLock(run_dir):  # what the rerun does first; training again is not needed here
        assert (run_dir / "LOCK").exists()


def test_kill_leftovers_are_cleaned_and_files_follow_the_umask(fast):
    overrides = {**fast, **SMALL}
    t = make_trainer("concat", "synthetic", overrides)
    t.run_dir.mkdir(parents=True)
    leftovers = [t.run_dir / ".checkpoint.pt.abcd1234", t.run_dir / ".record.jsonl.x_yz9876"]
    for p in leftovers:
        p.write_bytes(b"half")
    old = os.umask(0o022)
    try:
        res = run("concat", "synthetic", overrides)
    finally:
        os.umask(old)
    assert not any(p.exists() for p in leftovers)
    assert (res.run_dir / records.RECORD).stat().st_mode & 0o777 == 0o644
    assert (res.run_dir / records.CHECKPOINT).stat().st_mode & 0o777 == 0o644


def test_every_resumed_segment_keeps_its_thread_count(fast, monkeypatch):
    import torch

    from mmbalance.trainer import Trainer

    overrides = {**fast, **SMALL, "epochs": 3}
    original = Trainer.train_epoch

    def dying(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", dying)
    with pytest.raises(KeyboardInterrupt):
        run("concat", "synthetic", overrides)
    monkeypatch.setattr(Trainer, "train_epoch", original)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rec = run("concat", "synthetic", overrides).record
    finally:
        torch.set_num_threads(threads)
    segs = rec["header"]["segments"]
    assert [s["from_epoch"] for s in segs] == [0, 1]
    assert segs[0]["cpu_threads"] == threads and segs[1]["cpu_threads"] == 1
    # and the CPU kernels (AMX or not), which change a bf16 run's numbers as the threads do
    assert rec["header"]["cpu_kernels"] == segs[1]["cpu_kernels"] == records.cpu_kernels()


@pytest.mark.parametrize("kind", ["binary", "directory"])
def test_config_that_is_not_a_yaml_file(kind, tmp_path, capsys):
    target = tmp_path / "cfg"
    if kind == "binary":
        target.write_bytes(bytes(range(256)))
    else:
        target.mkdir()
    code = main(["run", "--method", "concat", "--dataset", "synthetic", "--config", str(target),
                 "--records", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and str(target) in err and ("binary" in err or "not a text" in err or "directory" in err)


def test_missing_paper_data_root_names_the_prepare_command(tmp_path):
    from mmbalance.data import resolve_data_root

    with pytest.raises(MMBalanceError, match="mmbalance prepare cremad"):
        resolve_data_root({"data_root": str(tmp_path / "nope")}, "cremad")
    with pytest.raises(MMBalanceError) as info:
        resolve_data_root({"data_root": str(tmp_path / "nope")}, "mfeat")
    assert "prepare" not in str(info.value)


def test_broken_media_suggests_prepare_only_where_there_is_one(tmp_path):
    from mmbalance.errors import DataError
    from mmbalance.media import read_wav

    with pytest.raises(DataError) as info:
        read_wav(tmp_path / "missing.wav")
    assert "prepare" not in str(info.value)


def test_paper_protocol_is_named_and_sets_what_the_official_scripts_do(capsys):
    assert main(["config", "--method", "iprm", "--dataset", "cremad", "--protocol", "paper"]) == 0
    out = capsys.readouterr().out
    for line in ("val_fraction: 0.0", "select: best_test", "amp: none", "protocol: paper"):
        assert line in out
    from mmbalance.runner import resolve_config

    honest = resolve_config("iprm", "cremad")[0]
    assert honest["protocol"] == "honest" and honest["val_fraction"] > 0 and honest["select"] == "best_val"
    mine = resolve_config("iprm", "cremad", {"protocol": "paper", "amp": "bf16"})[0]
    assert mine["amp"] == "bf16"  # the user's own settings still win over the protocol


def test_paper_protocol_run_is_recorded(fast):
    rec = run("concat", "synthetic", {**fast, **SMALL, "protocol": "paper"}).record
    assert rec["header"]["config"]["protocol"] == "paper"
    assert rec["header"]["dataset_info"]["val_is_test"] is True


def test_random_init_of_a_pretrained_backbone_is_warned_and_recorded(tmp_path):
    import torch

    from mmbalance.model import random_init_warning, weights_record

    rec = weights_record({"image": {"name": "resnet50"}, "text": {"name": "mlp"}}, ["image", "text"])
    assert rec["image"]["weights"] == "random" and rec["text"]["pretrained_in_papers"] is None
    assert "random init: image (resnet50" in random_init_warning(rec)
    w = tmp_path / "w.pt"
    torch.save({"a": torch.ones(2)}, w)
    import hashlib

    rec = weights_record({"image": {"name": "resnet50", "weights": str(w)}}, ["image"])
    assert rec["image"]["sha256"] == hashlib.sha256(w.read_bytes()).hexdigest()
    assert random_init_warning(rec) is None
