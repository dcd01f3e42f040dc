"""The records layer under damage and contention: cut records, killed writers, a second writer,
unreadable folders, foreign checkpoints. Every failure must name the file and the fix."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import pickle
import resource
import signal
import socket
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from mmbalance import records
from mmbalance.errors import MMBalanceError, UnsupportedError
from mmbalance.records import (
    RecordError,
    RecordsIOError,
    RunLock,
    RunLockedError,
    clean_temp_files,
    clear_run_dir,
    find_runs,
    load_checkpoint,
    load_record,
    read_jsonl,
)
from mmbalance.registry import METHODS


def _write_record(run_dir: pathlib.Path, final: bool = True, done: bool = True) -> pathlib.Path:
    rows = [{"type": "header", "config": {"seed": 0}}, {"type": "epoch", "epoch": 0, "loss": 1.0}]
    if final:
        rows.append({"type": "final", "selection": {}})
    records.write_jsonl(run_dir / records.RECORD, rows)
    if done:
        records.atomic_write_text(run_dir / records.DONE, "{}")
    return run_dir / records.RECORD


# ---- damaged records --------------------------------------------------------------------------
def test_record_cut_mid_line_names_file_and_line(tmp_path):
    path = _write_record(tmp_path)
    text = path.read_text()
    second_line_end = text.index("\n", text.index("\n") + 1)
    path.write_text(text[: second_line_end - 5])  # killed mid-line while copying, say
    with pytest.raises(RecordError, match="line 2") as info:
        read_jsonl(path)
    assert str(path) in str(info.value) and "--fresh" in str(info.value)
    with pytest.raises(RecordError, match="line 2"):
        load_record(tmp_path)


def test_record_unreadable_or_not_objects(tmp_path):
    with pytest.raises(RecordsIOError, match="Cannot read") as info:
        read_jsonl(tmp_path / "missing.jsonl")
    assert str(tmp_path / "missing.jsonl") in str(info.value)
    (tmp_path / "adir.jsonl").mkdir()
    with pytest.raises(RecordError, match="adir.jsonl"):
        read_jsonl(tmp_path / "adir.jsonl")
    (tmp_path / "list.jsonl").write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(RecordError, match="line 2 is not a JSON object"):
        read_jsonl(tmp_path / "list.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b'{"a": 1}\n\xff\xfe\x00')
    with pytest.raises(RecordError, match="not UTF-8"):
        read_jsonl(tmp_path / "bin.jsonl")
    assert issubclass(RecordError, MMBalanceError) and issubclass(RecordsIOError, RecordError)


def test_record_without_header_is_damaged(tmp_path):
    records.write_jsonl(tmp_path / records.RECORD, [{"type": "epoch", "epoch": 0}])
    with pytest.raises(RecordError, match="no header row") as info:
        load_record(tmp_path)
    assert str(tmp_path / records.RECORD) in str(info.value) and "--fresh" in str(info.value)


def test_done_without_final_row_is_damaged_but_unfinished_is_not(tmp_path):
    _write_record(tmp_path / "done", final=False, done=True)
    with pytest.raises(RecordError, match="marked DONE but has no final row") as info:
        load_record(tmp_path / "done")
    assert str(tmp_path / "done" / records.RECORD) in str(info.value)
    assert "--fresh" in str(info.value) and "remove the folder" in str(info.value)
    _write_record(tmp_path / "running", final=False, done=False)
    rec = load_record(tmp_path / "running")
    assert rec["done"] is False and rec["final"] is None and len(rec["epochs"]) == 1


def test_find_runs_sees_done_without_record_and_ignores_lock_only(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / records.DONE).write_text("{}")  # record.jsonl lost: damaged, must be seen
    _write_record(tmp_path / "b")
    with RunLock(tmp_path / "c"):  # died before writing anything: not a run
        pass
    assert (tmp_path / "c" / records.LOCK).exists()
    assert find_runs(tmp_path) == [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(RecordsIOError, match="Cannot read"):
        load_record(tmp_path / "a")


# ---- one writer per run folder ----------------------------------------------------------------
HOLDER = textwrap.dedent(
    """
    import sys, time
    from mmbalance.records import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
    """
)


def test_second_process_is_refused_and_killed_holder_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError) as info:
            RunLock(run_dir).acquire()
        msg = str(info.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in msg
        assert str(run_dir) in msg and "two writers would corrupt" in msg
        assert isinstance(info.value, MMBalanceError)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert str(proc.pid) in (run_dir / records.LOCK).read_text()  # stale file left behind
    with RunLock(run_dir) as lock:
        assert lock.held
        assert json.loads((run_dir / records.LOCK).read_text())["pid"] == os.getpid()


def test_lock_is_exclusive_within_a_process_and_released_on_exit(tmp_path):
    with RunLock(tmp_path) as first:
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
        assert first.held
    assert not first.held
    with pytest.raises(ValueError), RunLock(tmp_path):
        raise ValueError("training failed")
    with RunLock(tmp_path):  # released despite the exception
        pass
    assert (tmp_path / records.LOCK).read_text() == ""  # left in place, emptied


def test_lock_in_a_file_where_a_folder_should_be(tmp_path):
    (tmp_path / "records").write_text("not a folder")
    with pytest.raises(RecordsIOError, match="Cannot create folder") as info:
        RunLock(tmp_path / "records" / "run").acquire()
    assert str(tmp_path / "records" / "run") in str(info.value)


def test_clear_run_dir_keeps_the_held_lock(tmp_path):
    _write_record(tmp_path)
    records.write_jsonl(tmp_path / "diagnostics" / "epoch_0000.jsonl", [{"a": 1}])
    with RunLock(tmp_path):
        clear_run_dir(tmp_path)
        assert [p.name for p in tmp_path.iterdir()] == [records.LOCK]
        with pytest.raises(RunLockedError):
            RunLock(tmp_path).acquire()


# ---- temp files left by killed writers ---------------------------------------------------------
KILLED_WRITERS = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import torch
    from mmbalance import records
    run = Path(sys.argv[1])
    writes = [
        lambda: records.atomic_torch_save({"w": torch.zeros(10)}, run / records.CHECKPOINT),
        lambda: records.write_jsonl(run / records.RECORD, [{"type": "header"}]),
        lambda: records.write_jsonl(run / "diagnostics" / "epoch_0001.jsonl", [{"step": 0}]),
    ]
    for write in writes:
        pid = os.fork()
        if pid == 0:
            os.replace = lambda *a, **k: os._exit(9)  # killed just before the rename
            write()
            os._exit(0)
        os.waitpid(pid, 0)
    """
)


def test_clean_temp_files_removes_what_killed_writers_left(tmp_path):
    run = tmp_path / "run"
    _write_record(run)
    records.write_jsonl(run / "diagnostics" / "epoch_0000.jsonl", [{"step": 0}])
    records.atomic_torch_save({"w": torch.ones(1)}, run / records.CHECKPOINT)
    (run / ".gitignore").write_text("*\n")
    (run / "notes.txt").write_text("mine")
    with RunLock(run):
        subprocess.run([sys.executable, "-c", KILLED_WRITERS, str(run)], check=True, timeout=120)
        before = {p.relative_to(run) for p in run.rglob("*")}
        temps = {p for p in before if p.name.startswith(".") and p.name != ".gitignore"}
        assert len(temps) == 3, before  # one leftover per killed write
        removed = clean_temp_files(run)
    assert {p.relative_to(run) for p in removed} == temps
    after = {p.relative_to(run) for p in run.rglob("*")}
    assert after == before - temps
    assert load_record(run)["done"]
    assert torch.equal(load_checkpoint(run / records.CHECKPOINT)["w"], torch.ones(1))
    assert clean_temp_files(run) == [] and clean_temp_files(tmp_path / "nothing") == []


# ---- permissions ------------------------------------------------------------------------------
@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        records.write_jsonl(tmp_path / records.RECORD, [{"type": "header"}])
        records.write_config(tmp_path / "config.yaml", {"a": 1})
        records.atomic_torch_save({"w": torch.zeros(2)}, tmp_path / records.CHECKPOINT)
        records.atomic_write_text(tmp_path / "diagnostics" / "epoch_0000.jsonl", "{}\n")
        with RunLock(tmp_path):
            pass
    finally:
        os.umask(old)
    for name in (records.RECORD, "config.yaml", records.CHECKPOINT, "diagnostics/epoch_0000.jsonl", records.LOCK):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert records.current_umask() == old


# ---- OS refusals -----------------------------------------------------------------------------
def test_file_where_a_folder_should_be(tmp_path):
    (tmp_path / "records").write_text("oops, a file")
    target = tmp_path / "records" / "run" / records.RECORD
    with pytest.raises(RecordsIOError) as info:
        records.write_jsonl(target, [{"type": "header"}])
    msg = str(info.value)
    assert str(tmp_path / "records" / "run") in msg and "Errno" in msg and "--records" in msg
    with pytest.raises(RecordsIOError, match="Errno"):
        records.atomic_torch_save({}, tmp_path / "records" / records.CHECKPOINT)  # parent is a file
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / records.RECORD).mkdir()  # a folder where the file should be
    with pytest.raises(RecordsIOError, match="Cannot write"):
        records.write_jsonl(tmp_path / "out" / records.RECORD, [{"type": "header"}])
    assert [p.name for p in (tmp_path / "out").iterdir()] == [records.RECORD]  # no temp left


def test_read_only_folder(tmp_path, monkeypatch):
    path = tmp_path / records.RECORD
    records.write_jsonl(path, [{"type": "header", "v": 1}])

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(RecordsIOError) as info:
        records.write_jsonl(path, [{"type": "header", "v": 2}])
    assert str(info.value).startswith(f"Cannot write '{path}': [Errno 30] Read-only file system")
    assert "Point --records at a writable folder" in str(info.value)
    with pytest.raises(RecordsIOError, match="Read-only file system"):
        records.atomic_torch_save({"w": torch.zeros(1)}, tmp_path / records.CHECKPOINT)
    monkeypatch.undo()
    assert read_jsonl(path) == [{"type": "header", "v": 1}]  # the old record is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == [records.RECORD]  # temps removed

    monkeypatch.setattr(os, "fdopen", read_only)
    with pytest.raises(RecordsIOError, match="Read-only file system"):
        records.atomic_write_text(path, "x")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [records.RECORD]


def test_disk_full_inside_torch_save(tmp_path):
    """A real short write (file-size limit, EFBIG) from inside torch.save, not a patched call."""
    path = tmp_path / records.CHECKPOINT
    records.atomic_torch_save({"w": torch.ones(4)}, path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(RecordsIOError, match=f"Cannot write '{path}'.*File too large"):
            records.atomic_torch_save({"w": torch.zeros(1_000_000)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == [records.CHECKPOINT]


# ---- checkpoint loading ------------------------------------------------------------------------
def _trainer_like_state() -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    sched.step()
    history = [{"epoch": 0, "loss": 0.5, "lr": 1e-3, "peak_mem_mb": None, "diagnostics": {"ratio": 1.5},
                "val": {"fused": {"acc": 50.0, "per_class": [1.0, 0.0]}, "n": 10}, "note": "ok"}]
    return {"epoch": 0, "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "method": {"pairs": ["m1+m2"], "lam": torch.ones(1)}, "global_step": 7, "optimizer_steps": 7,
            "history": history}


def test_trainer_like_checkpoint_loads(tmp_path):
    state = _trainer_like_state()
    records.atomic_torch_save(state, tmp_path / records.CHECKPOINT)
    loaded = load_checkpoint(tmp_path / records.CHECKPOINT, map_location="cpu")
    assert loaded["history"] == state["history"] and loaded["global_step"] == 7
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model.load_state_dict(loaded["model"])
    torch.optim.Adam(model.parameters()).load_state_dict(loaded["optimizer"])


BUILTIN_METHODS = [e.name for e in METHODS.entries() if e.obj.__module__.startswith("mmbalance.methods.")]


@pytest.mark.parametrize("method", BUILTIN_METHODS)
def test_real_trainer_checkpoints_load_with_weights_only(method, fast):
    """Every built-in method's checkpoint (model, optimizer, scheduler, method state, history)
    holds only what weights_only=True accepts, so resuming never needs the unsafe loader."""
    from mmbalance.runner import run

    try:
        r = run(method, "synthetic", {**fast, "epochs": 1, "n_train": 120, "n_test": 60, "checkpoint": True})
    except UnsupportedError as exc:
        pytest.skip(str(exc))
    state = load_checkpoint(r.run_dir / records.CHECKPOINT, map_location="cpu")
    assert state["epoch"] == 0 and len(state["history"]) == 1


def test_numpy_scalars_in_history_are_refused(tmp_path):
    """Documents the limit of weights_only: history must hold python floats, not numpy ones."""
    torch.save({"history": [{"loss": np.float64(0.5)}]}, tmp_path / "c.pt")
    with pytest.raises(RecordError, match="damaged or not a checkpoint this suite wrote"):
        load_checkpoint(tmp_path / "c.pt")


def test_damaged_checkpoints(tmp_path):
    path = tmp_path / records.CHECKPOINT
    records.atomic_torch_save(_trainer_like_state(), path)
    data = path.read_bytes()
    for damaged in (data[: len(data) // 2], b"", b"garbage" * 10):
        path.write_bytes(damaged)
        with pytest.raises(RecordError) as info:
            load_checkpoint(path)
        msg = str(info.value)
        assert str(path) in msg and "--fresh" in msg and "damaged or not a checkpoint this suite wrote" in msg
    torch.save(torch.zeros(3), path)
    with pytest.raises(RecordError, match="not a dict"):
        load_checkpoint(path)
    with pytest.raises(RecordError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


class _Planted:
    marker: pathlib.Path

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_planted_pickle_does_not_run(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / records.CHECKPOINT
    payload = {"model": {}, "history": [_Planted(marker)]}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with path.open("wb") as f:
            pickle.dump(payload, f)
    # the plant is live: loading it the unsafe way runs it
    torch.load(path, weights_only=False) if writer == "torch.save" else pickle.loads(path.read_bytes())
    assert marker.exists()
    marker.unlink()
    with pytest.raises(RecordError, match="damaged or not a checkpoint this suite wrote") as info:
        load_checkpoint(path, map_location="cpu")
    assert str(path) in str(info.value) and "weights_only=False" not in str(info.value)
    assert not marker.exists()
