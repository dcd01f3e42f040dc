"""Run folders cannot be turned against their user: nothing is read or written through a
symbolic link planted in (or as) a run folder, reading commands create nothing and work on
read-only media, and a run that fails validation leaves no folder behind."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mmbalance import records
from mmbalance.cli import main
from mmbalance.diagnose import probe_run
from mmbalance.diagnostics import DIAGNOSTICS_FILE
from mmbalance.grid import Cell, run_cell
from mmbalance.launchers import cell_status
from mmbalance.records import RunFolderLinkError, RunLock
from mmbalance.runner import make_trainer

SMALL = {"n_train": 200, "n_test": 100, "epochs": 1, "progress": "off", "log_epochs": False, "device": "cpu"}
CLI = ["--method", "concat", "--dataset", "synthetic", "--set", "n_train=200", "--set", "n_test=100",
       "--epochs", "1", "--device", "cpu", "--quiet"]


def digest(path: Path) -> dict[str, str]:
    """Name -> sha256 of every file under ``path`` (or of the file itself): what must not change."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished concat run (record, checkpoint, diagnostics/ not needed: concat logs none)."""
    trainer = make_trainer("concat", "synthetic", {**SMALL, "records": str(tmp_path_factory.mktemp("runs"))})
    trainer.fit()
    return trainer.run_dir


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    """A private copy of the finished run, under a records folder of its own, without DONE (so
    a rerun resumes into it) and without its LOCK."""
    dest = tmp_path / "records" / finished.name
    shutil.copytree(finished, dest)
    (dest / records.DONE).unlink()
    (dest / records.LOCK).unlink()
    return dest


@pytest.fixture
def victim(tmp_path) -> Path:
    """A user's folder of precious files, one named like a suite temp file and one like a
    diagnostics file: a planted link must leave every byte of it as it is."""
    v = tmp_path / "precious"
    v.mkdir()
    (v / "thesis.tex").write_text("\\section{Results}\n" * 50)
    (v / ".thesis.tex.abcd1234").write_text("looks like a temp file of the suite")
    (v / "epoch_0000.jsonl").write_text('{"mine": true}\n')
    return v


def rerun(run_dir: Path, *extra: str) -> int:
    return main(["run", *CLI, "--records", str(run_dir.parent), *extra])


def err_text(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


# ---- LOCK ----------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["run", "run --fresh", "show", "probe"])
def test_planted_lock_link_leaves_its_target_byte_identical(run_copy, victim, capsys, command):
    """Wrong variant caught here: RunLock / show opening LOCK with O_RDWR|O_CREAT and no
    O_NOFOLLOW (today's truncation of the link's target to 0 bytes)."""
    target = victim / "thesis.tex"
    before = digest(victim)
    (run_copy / records.LOCK).symlink_to(target)
    if command.startswith("run"):
        code = rerun(run_copy, *command.split()[1:])
    else:
        code = main([command, str(run_copy)])
    assert code == 2
    err = err_text(capsys)
    assert f"'{run_copy / records.LOCK}' in a run folder is a symbolic link" in err
    assert "rm '" in err and "its target is left alone" in err
    assert digest(victim) == before


def test_runlock_itself_refuses_a_lock_link(tmp_path, victim):
    """The lock alone, without the read-only check fit() makes first (wrong variant caught:
    RunLock opening LOCK without O_NOFOLLOW, which truncated the target)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / records.LOCK).symlink_to(victim / "thesis.tex")
    before = digest(victim)
    with pytest.raises(RunFolderLinkError, match="LOCK' in a run folder is a symbolic link"):
        RunLock(run_dir).acquire()
    with pytest.raises(RunFolderLinkError):
        records.lock_holder(run_dir)
    assert digest(victim) == before


def test_lock_that_is_a_hard_link_is_locked_but_never_written(tmp_path, victim):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.link(victim / "thesis.tex", run_dir / records.LOCK)
    before = digest(victim)
    with RunLock(run_dir) as lock:
        assert lock.held
        with pytest.raises(records.RunLockedError):
            RunLock(run_dir).acquire()  # still an exclusive lock
    assert digest(victim) == before


def test_lock_that_is_a_fifo_is_refused_and_never_blocks(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.mkfifo(run_dir / records.LOCK)
    with pytest.raises(records.RecordError, match="not a regular file"):
        RunLock(run_dir).acquire()
    with pytest.raises(records.RecordError, match="not a regular file"):
        records.lock_holder(run_dir)


# ---- diagnostics/ and other folders --------------------------------------------------------
@pytest.mark.parametrize("fresh", [False, True])
def test_planted_diagnostics_link_leaves_the_folder_it_points_to_untouched(tmp_path, victim, capsys, fresh):
    """OGM-GE writes diagnostics/epoch_0000.jsonl in its first epoch. Wrong variants caught:
    no check of the run folder before writing and no re-check at the write (the target's
    epoch_0000.jsonl overwritten), clean_temp_files descending into the link (the target's
    .thesis.tex.abcd1234 deleted)."""
    args = ["--method", "ogm", "--dataset", "synthetic", "--set", "n_train=200", "--set", "n_test=100",
            "--epochs", "1", "--device", "cpu", "--quiet", "--records", str(tmp_path / "records")]
    trainer = make_trainer("ogm", "synthetic", {**SMALL, "records": str(tmp_path / "records")})
    trainer.run_dir.mkdir(parents=True)
    (trainer.run_dir / ".record.jsonl.k2j4h5g6").write_text("left by a killed writer")
    before = digest(victim)
    (trainer.run_dir / records.DIAGNOSTICS).symlink_to(victim, target_is_directory=True)
    assert main(["run", *args, *(["--fresh"] if fresh else [])]) == 2
    link = trainer.run_dir / records.DIAGNOSTICS
    assert f"'{link}' in a run folder is a symbolic link (to '{victim}')" in err_text(capsys)
    assert digest(victim) == before
    assert not (trainer.run_dir / records.DONE).exists()
    link.unlink()  # the fix the message names: the same command now trains
    assert main(["run", *args]) == 0
    assert (trainer.run_dir / records.DIAGNOSTICS / "epoch_0000.jsonl").is_file()
    assert digest(victim) == before


def test_temp_cleanup_never_descends_into_a_linked_folder(tmp_path, victim):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / records.DIAGNOSTICS).symlink_to(victim, target_is_directory=True)
    (run_dir / ".record.jsonl.k2j4h5g6").write_text("left by a killed writer")
    before = digest(victim)
    assert records.clean_temp_files(run_dir) == [run_dir / ".record.jsonl.k2j4h5g6"]
    assert digest(victim) == before


def test_a_link_planted_while_the_run_holds_its_lock_is_refused_at_the_write(tmp_path, victim):
    """The check at the start of a run is not the only guard: every write below a locked run
    folder re-checks its path (a link planted mid-run)."""
    run_dir = tmp_path / "run"
    before = digest(victim)
    with RunLock(run_dir):
        (run_dir / records.DIAGNOSTICS).symlink_to(victim, target_is_directory=True)
        with pytest.raises(RunFolderLinkError, match="diagnostics' in a run folder is a symbolic link"):
            records.write_jsonl(run_dir / records.DIAGNOSTICS / "epoch_0000.jsonl", [{"step": 0}])
        (run_dir / records.RECORD).symlink_to(victim / "thesis.tex")
        with pytest.raises(RunFolderLinkError, match="record.jsonl' in a run folder is a symbolic link"):
            records.write_jsonl(run_dir / records.RECORD, [{"type": "header"}])
    assert digest(victim) == before
    # outside a held run folder (a leaderboard's --out, say) a linked folder is the user's choice
    out = tmp_path / "out"
    out.symlink_to(victim, target_is_directory=True)
    records.atomic_write_text(out / "leaderboard.md", "table")
    assert (victim / "leaderboard.md").read_text() == "table"


@pytest.mark.parametrize("name", [records.RECORD, records.CHECKPOINT, "config.yaml", records.DONE])
def test_planted_file_links_are_refused_by_run_show_and_probe(run_copy, victim, capsys, name):
    """A record, checkpoint, config or DONE that is a link to a user's file: never read, never
    replaced, the link named (wrong variant caught: torch.load / read_bytes following it)."""
    target = victim / "thesis.tex"
    before = digest(victim)
    (run_copy / name).unlink(missing_ok=True)
    (run_copy / name).symlink_to(target)
    assert rerun(run_copy) == 2
    assert f"'{run_copy / name}' in a run folder is a symbolic link" in err_text(capsys)
    assert main(["probe", str(run_copy)]) == 2
    assert f"'{run_copy / name}' in a run folder is a symbolic link" in err_text(capsys)
    if name in (records.RECORD, records.DONE):  # what show reads
        assert main(["show", str(run_copy)]) == 2
        assert f"'{run_copy / name}' in a run folder is a symbolic link" in err_text(capsys)
    assert digest(victim) == before
    assert (run_copy / name).is_symlink()  # left for the user to inspect


def test_checkpoint_and_record_readers_refuse_links(tmp_path, run_copy):
    link = tmp_path / "elsewhere.pt"
    link.symlink_to(run_copy / records.CHECKPOINT)
    with pytest.raises(RunFolderLinkError, match="symbolic link"):
        records.load_checkpoint(link)
    assert isinstance(records.load_checkpoint(run_copy / records.CHECKPOINT), dict)  # the real one loads
    rec_link = tmp_path / "record.jsonl"
    rec_link.symlink_to(run_copy / records.RECORD)
    with pytest.raises(RunFolderLinkError):
        records.read_jsonl(rec_link)


def test_a_run_folder_that_is_a_link_is_never_written_nor_emptied(finished, tmp_path, victim, capsys):
    """The worst case: records/<run> -> ~/precious, then --fresh would empty it."""
    records_dir = tmp_path / "records"
    records_dir.mkdir()
    shutil.copy(finished / records.RECORD, victim / records.RECORD)  # make it look like a run
    before = digest(victim)
    (records_dir / finished.name).symlink_to(victim, target_is_directory=True)
    for extra in ([], ["--fresh"]):
        assert main(["run", *CLI, "--records", str(records_dir), *extra]) == 2
        assert f"Run folder '{records_dir / finished.name}' is a symbolic link" in err_text(capsys)
        assert digest(victim) == before
    with pytest.raises(RunFolderLinkError):
        records.clear_run_dir(records_dir / finished.name)
    assert digest(victim) == before


def test_grid_never_writes_its_error_file_through_a_link(run_copy, victim):
    before = digest(victim)
    (run_copy / records.LOCK).symlink_to(victim / "thesis.tex")
    (run_copy / "error.txt").symlink_to(victim / "epoch_0000.jsonl")
    cell = Cell("concat", "synthetic", 0, {"n_train": 200, "n_test": 100, "epochs": 1})
    outcome, line = run_cell(cell, {"records": str(run_copy.parent), "progress": "off", "log_epochs": False,
                                    "device": "cpu"})
    assert outcome == "failed" and "symbolic link" in line
    status, detail = cell_status("resume", str(run_copy))  # grid --status reads nothing through them
    assert status == "failed" and "symbolic link" in detail
    assert digest(victim) == before


def test_grid_does_not_skip_a_cell_whose_done_marker_is_a_link(run_copy, victim):
    (run_copy / records.DONE).symlink_to(victim / "thesis.tex")
    cell = Cell("concat", "synthetic", 0, {"n_train": 200, "n_test": 100, "epochs": 1})
    outcome, line = run_cell(cell, {"records": str(run_copy.parent), "progress": "off", "log_epochs": False,
                                    "device": "cpu"})
    assert outcome == "failed" and "DONE' in a run folder is a symbolic link" in line


def test_plot_refuses_a_linked_plots_folder(run_copy, victim, capsys):
    before = digest(victim)
    (run_copy / "plots").symlink_to(victim, target_is_directory=True)
    assert main(["plot", str(run_copy)]) == 2
    assert "plots' in a run folder is a symbolic link" in err_text(capsys)
    assert digest(victim) == before


# ---- reading commands create nothing and need no write access ------------------------------
def read_only_media(monkeypatch, root: Path) -> None:
    """Make every creation or write under ``root`` fail as on a read-only mount (EROFS). Root
    ignores file modes, so chmod alone cannot simulate it in this container."""
    real_open, real_mkdir = os.open, os.mkdir
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    inside = str(root.resolve()) + os.sep

    def guarded_open(path, flags, *args, **kwargs):
        if flags & writing and os.path.abspath(path).startswith(inside):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if os.path.abspath(path).startswith(inside):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


def test_show_leaderboard_and_probe_read_create_nothing_on_read_only_media(finished, tmp_path, monkeypatch, capsys):
    """Wrong variants caught here: show taking the RunLock to tell a killed run from a running
    one, and probe computing under it (either creates LOCK, and fails on read-only media)."""
    records_dir = tmp_path / "ro"
    run_dir = records_dir / finished.name
    shutil.copytree(finished, run_dir)
    (run_dir / records.LOCK).unlink()
    (run_dir / DIAGNOSTICS_FILE).unlink(missing_ok=True)
    killed = records_dir / "killed" / finished.name  # no DONE: show must look at the lock state
    shutil.copytree(run_dir, killed)
    (killed / records.DONE).unlink()
    os.system(f"chmod -R a-w '{records_dir}'")  # real read-only for a non-root user
    listing = sorted(str(p.relative_to(records_dir)) for p in records_dir.rglob("*"))
    read_only_media(monkeypatch, records_dir)
    try:
        assert main(["show", str(run_dir)]) == 0
        assert "state    done" in capsys.readouterr().out
        assert main(["show", str(killed)]) == 0
        assert "state    stopped before the end" in capsys.readouterr().out
        assert main(["leaderboard", "--records", str(records_dir), "--out", str(tmp_path / "lb"),
                     "--no-pictures"]) == 0
        assert "Concat" in (tmp_path / "lb" / "leaderboard.md").read_text()
        diag = probe_run(run_dir, write=False)
        assert diag["run"]["done"] and set(diag["probe"]) == {"m1", "m2"}
        capsys.readouterr()
        # the command prints the diagnostics, then says clearly that they could not be saved
        assert main(["probe", str(run_dir)]) == 2
        captured = capsys.readouterr()
        assert "probe acc" in captured.out
        assert "computed but not saved" in " ".join(captured.err.split())
    finally:
        monkeypatch.undo()
        os.system(f"chmod -R u+w '{records_dir}'")
    assert sorted(str(p.relative_to(records_dir)) for p in records_dir.rglob("*")) == listing
    assert not (run_dir / records.LOCK).exists() and not (killed / records.LOCK).exists()


def test_grid_status_creates_no_lock(run_copy, tmp_path):
    assert cell_status("resume", str(run_copy)) == ("pending", "resumes from its checkpoint")
    assert not (run_copy / records.LOCK).exists()


# ---- a failed validation leaves no folder ---------------------------------------------------
def test_failed_validation_leaves_no_run_folder(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        a = rng.normal(size=(20, 3)).astype(np.float32)
        a[4, 1] = np.nan  # found when the data is built, after the configuration was resolved
        np.savez(data / f"{split}.npz", a=a, b=rng.normal(size=(20, 2)).astype(np.float32),
                 label=np.arange(20) % 2)
    out = tmp_path / "runs"
    assert main(["run", "--method", "concat", "--dataset", "features", "--data-root", str(data),
                 "--records", str(out), "--epochs", "1", "--quiet"]) == 2
    assert "NaN/inf" in err_text(capsys)
    assert not out.exists() or not any(out.iterdir())
    # a modality the dataset lacks, found while setting up: no folder either
    assert main(["run", *CLI, "--records", str(out), "--set", "modalities=m1,m9"]) == 2
    assert not out.exists() or not any(out.iterdir())
