"""What grids and runs say: did-you-mean in grids, errors named by grid file and cell, YAML
carets, backbone options, finished / resuming / diagnostics lines, one epoch numbering, SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmbalance import records
from mmbalance.cli import INTERRUPTED, main
from mmbalance.config import assemble
from mmbalance.engine import stop
from mmbalance.engine.loop import Trainer
from mmbalance.errors import ConfigError
from mmbalance.grid import load_grid, run_grid
from mmbalance.registry import DATASETS, METHODS
from mmbalance.runner import make_trainer
from mmbalance.show import render

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TINY = {"n_train": 300, "n_test": 100, "progress": "off", "device": "cpu"}


def _write(tmp_path: Path, text: str, name: str = "g.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- grids -------------------------------------------------------------------------------------
def test_a_grid_suggests_the_method_an_alias_names(tmp_path, capsys):
    """ogm_ge (OGM-GE's paper name) suggests ogm, not ogr_gb, whose letters are closer; the
    same suggestion `run` gives. A wrong variant that drops the aliases suggests ogr_gb."""
    path = _write(tmp_path, f"records: {tmp_path / 'runs'}\nseeds: [0]\ndatasets: [synthetic]\nmethods: [concat, ogm_ge]\n")
    assert main(["grid", str(path)]) == 2
    err = capsys.readouterr().err
    assert "[2/2] ogm_ge on synthetic seed 0: Unknown method 'ogm_ge'. Did you mean 'ogm'?" in err
    assert "ogr_gb'?" not in err and "Traceback" not in err
    assert main(["run", "--method", "ogm_ge", "--dataset", "synthetic"]) == 2
    assert "Did you mean 'ogm'?" in capsys.readouterr().err
    assert METHODS.aliases_of("ogm") == ["ogm-ge", "ogm_ge"]


def test_grid_set_typos_name_the_grid_file_and_cell_each_on_its_line(tmp_path, capsys):
    """A typo in a grid's set: names the grid file and which set: it is in (not "--set"), each
    bad cell is on its own line, and the valid keys are listed once for all of them."""
    path = _write(tmp_path, f"""records: {tmp_path / 'runs'}
seeds: [0, 1]
set: {{epochs: 1, lrr: 0.1}}
datasets: [synthetic]
methods: [concat, {{name: sum, set: {{momentun: 0.5}}}}]
""")
    assert main(["grid", str(path)]) == 2
    err = capsys.readouterr().err
    assert "(from --set)" not in err
    lines = err.splitlines()
    cell_lines = [ln for ln in lines if re.match(r"^(error: )?\s*\[\d/4\]", ln)]
    assert [re.search(r"\[(\d)/4\]", ln).group(1) for ln in cell_lines] == ["1", "2", "3", "4"]
    assert f"'lrr' (from grid file '{path}', top-level set). Did you mean 'lr'?" in " ".join(err.split())
    assert f"'momentun' (from grid file '{path}', set of methods entry 'sum'). Did you mean 'momentum'?" \
        in " ".join(err.split())
    assert err.count("Valid keys of the trainer") == 1
    assert err.count("Valid keys of method concat") == 1 and err.count("Valid keys of method sum") == 1
    assert not (tmp_path / "runs").exists()  # nothing trained


def test_a_bad_value_in_a_grid_names_its_set(tmp_path):
    path = _write(tmp_path, "seeds: [0]\ndatasets: [{name: synthetic, set: {epochs: many}}]\nmethods: [concat]\n")
    with pytest.raises(ConfigError, match=r"Bad value 'many' for 'epochs'.*set in grid file .*set of datasets "
                                          r"entry 'synthetic'"):
        run_grid(load_grid(path), {"records": str(tmp_path / "runs")})


def test_yaml_syntax_errors_keep_line_column_and_caret(tmp_path, capsys):
    path = _write(tmp_path, "seeds: [0]\nmethods: [concat\ndatasets: [synthetic]\n")
    assert main(["grid", str(path)]) == 2
    err = capsys.readouterr().err
    assert "<unicode string>" not in err
    assert "line 3, column 9: expected ',' or ']', but got ':'" in err
    lines = err.splitlines()
    source = next(i for i, ln in enumerate(lines) if ln.endswith("datasets: [synthetic]"))
    assert lines[source + 1].index("^") == lines[source].index("datasets:") + 8  # under the ':'
    opened = next(i for i, ln in enumerate(lines) if ln.endswith("methods: [concat"))
    assert "starts at line 2, column 10" in lines[opened - 1]
    assert lines[opened + 1].index("^") == lines[opened].index("[")  # where the list began


# ---- backbone options --------------------------------------------------------------------------
def test_a_backbone_option_typo_gets_its_own_options(capsys, shared_data):
    code = main(["run", "--method", "concat", "--dataset", "mfeat", "--set", "modalities=fac,mor",
                 "--set", "backbone.fac.hiden=64"])
    err = capsys.readouterr().err
    assert code == 2 and "TypeError" not in err and "unexpected keyword" not in err
    assert "Backbone 'mlp' of modality 'fac' has no option 'hiden'. Did you mean 'hidden'?" in " ".join(err.split())
    assert "Options of backbone 'mlp' (backbone.fac.<option>): name, weights, hidden, layers, dropout." in " ".join(err.split())


def test_backbone_options_are_checked_before_a_grid_trains(tmp_path, shared_data):
    """The check is in Trainer.check (what a grid runs on every cell first), not only where the
    encoder is built after the data."""
    trainer = make_trainer("concat", "mfeat", {"modalities": ["fac", "mor"], "backbone.mor.layerz": 3,
                                               "records": str(tmp_path)})
    with pytest.raises(ConfigError, match="no option 'layerz'. Did you mean 'layers'"):
        trainer.check()


def test_options_for_a_modality_the_run_does_not_use_are_refused(tmp_path, shared_data):
    trainer = make_trainer("concat", "mfeat", {"modalities": ["fac", "mor"], "backbone.zer.hidden": 64,
                                               "records": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"backbone.zer.\* configures modality 'zer', which this run does not "
                                          r"use \(it trains fac, mor\)"):
        trainer.check()
    uni = make_trainer("unimodal", "synthetic", {"modality": "m1", "backbone.m2.hidden": 32, "records": str(tmp_path)})
    with pytest.raises(ConfigError, match="modality 'm2', which this run does not use"):
        uni.check()
    # the plugins' own table names every modality, and is never refused
    assert make_trainer("concat", "mfeat", {"modalities": ["fac", "mor"], "records": str(tmp_path)}).check() == ["fac", "mor"]


# ---- what a run says ---------------------------------------------------------------------------
def test_a_finished_run_says_so_and_names_fresh(tmp_path, capsys):
    args = ["run", "--method", "sum", "--dataset", "synthetic", "--epochs", "1", "--records", str(tmp_path),
            "--set", "n_train=300", "--set", "n_test=100", "--set", "progress=off", "--set", "diagnostics=false"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "already finished" not in first
    assert "(seed 0, 1 epoch, cpu)" in first  # not "1 epochs"
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "This run is already finished" in again and "nothing was trained" in again and "--fresh" in again
    assert "epoch 1/1" not in again  # it did not train


class _SignalAt(METHODS.get("concat")):
    """Concat that sends SIGTERM to its own process inside batch ``at`` of epoch ``epoch``
    (between backward and the optimizer step), and counts the steps it took per epoch."""

    def __init__(self, cfg, epoch=1, at=3):
        super().__init__(cfg)
        self.when = (epoch, at)
        self.steps: dict[int, int] = {}

    def on_after_backward(self):
        k = self.steps.get(self.epoch, 0)
        if (self.epoch, k) == self.when:
            os.kill(os.getpid(), signal.SIGTERM)
        self.steps[self.epoch] = k + 1


def _trainer(method_cls, records_dir: Path, **extra) -> Trainer:
    cfg = assemble(DATASETS.get("synthetic"), METHODS.get("concat"), None,
                   {**TINY, "epochs": 3, "batch_size": 16, "diagnostics": False, "records": str(records_dir), **extra})
    return Trainer(cfg, DATASETS.get("synthetic")(), method_cls(cfg))


def test_sigterm_stops_at_the_next_batch_and_the_run_resumes_to_the_same_record(tmp_path, capsys):
    """SIGTERM in the middle of a batch of epoch 2: that batch finishes (its optimizer step
    happens), the loop stops before the next one, the record keeps epoch 1 (intact, not DONE),
    and the rerun says "resuming from epoch 2/3" and ends equal to an uninterrupted run.
    Wrong variants: stopping at once (mid-batch) takes 3 steps fewer than 4; never stopping
    (SIGTERM ignored, as submitit does) trains all 3 epochs."""
    ref = _trainer(METHODS.get("concat"), tmp_path / "ref").fit()
    t = _trainer(_SignalAt, tmp_path / "cut")
    with stop.handled(signal.SIGTERM), pytest.raises(stop.StopRequested) as info:
        t.fit()
    assert info.value.signal_name == "SIGTERM"
    assert t.method.steps[1] == 4  # batches 0-3: the one that was signalled completed, no more
    rec = records.load_record(t.run_dir)
    assert not rec["done"] and [e["epoch"] for e in rec["epochs"]] == [0]
    assert records.lock_holder(t.run_dir) is None  # the lock was released
    capsys.readouterr()
    again = _trainer(METHODS.get("concat"), tmp_path / "cut", log_epochs=True)
    out = again.fit()
    said = capsys.readouterr().out
    assert f"resuming from epoch 2/3 (epoch 1 is in the checkpoint of {again.run_dir})" in said
    assert said.splitlines()[1].startswith("epoch 2/3 ")
    keep = ("epoch", "train_loss", "val", "test")
    assert [{k: e[k] for k in keep} for e in out["epochs"]] == [{k: e[k] for k in keep} for e in ref["epochs"]]


def test_a_stop_asked_outside_the_loop_acts_at_once():
    with stop.handled(signal.SIGTERM), pytest.raises(stop.StopRequested):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here, long before the sleep ends


def test_the_pause_after_the_last_epoch_names_the_diagnostics(tmp_path, capsys):
    t = _trainer(METHODS.get("concat"), tmp_path, epochs=1, diagnostics=True, log_epochs=True)
    t.fit()
    out = capsys.readouterr()
    line = next(ln for ln in out.out.splitlines() if ln.startswith("computing the imbalance diagnostics"))
    assert "linear probe of each frozen encoder (m1, m2)" in line and "Shapley value (4 coalitions)" in line
    assert "--set diagnostics=false skips them" in line and re.search(r" done \(\d+\.\d s\)$", line)
    assert "diagnostics:" not in out.err  # no bar off a terminal: one line
    t = _trainer(METHODS.get("concat"), tmp_path / "bar", epochs=1, diagnostics=True, log_epochs=True, progress="on")
    t.fit()
    out = capsys.readouterr()
    n = t._diagnostic_batches()
    # evaluation batches of 32: train (270 rows) 9, test (100 rows) 4 for the probes and 4 per coalition
    assert n == 9 + 4 * (1 + 4)
    assert f"/{n} [" in out.err and "diagnostics" in out.err  # a bar over them, on stderr
    assert re.search(r"^diagnostics done \(\d+\.\d s\)$", out.out, re.M)


def test_epochs_are_counted_from_one_in_every_human_output(tmp_path, capsys):
    """The epoch lines say 1/2 and 2/2; the summary's and show's epoch columns agree (the
    record's 0-based field plus one); the records keep 0 and 1."""
    args = ["run", "--method", "concat", "--dataset", "synthetic", "--epochs", "2", "--records", str(tmp_path),
            "--set", "n_train=300", "--set", "n_test=100", "--set", "progress=off", "--set", "diagnostics=false"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "epoch 1/2 " in out and "epoch 2/2 " in out and "(seed 0, 2 epochs, cpu)" in out
    run_dir = Path(out.split("record: ")[1].strip()).parent
    rec = records.load_record(run_dir)
    assert [e["epoch"] for e in rec["epochs"]] == [0, 1]
    last = next(ln for ln in out.splitlines() if ln.startswith("last "))
    assert last.split()[1] == "2"
    best = rec["final"]["selection"]["best_val"]["epoch"] + 1
    assert next(ln for ln in out.splitlines() if ln.startswith("best_val ")).split()[1] == str(best)
    shown = render(run_dir).splitlines()
    table = shown[shown.index(next(ln for ln in shown if ln.startswith("epoch "))) + 2:][:2]
    assert [row.split()[0] for row in table] == ["1", "2"]
    assert "recipe   2 epochs" in render(run_dir)
    final = shown[shown.index("final (test, %):") + 3:]
    assert next(ln for ln in final if ln.startswith("last")).split()[1] == "2"


def test_sigterm_prints_the_same_line_as_ctrl_c(tmp_path):
    args = [sys.executable, "-m", "mmbalance.cli", "run", "--method", "concat", "--dataset", "synthetic",
            "--epochs", "50", "--records", str(tmp_path), "--set", "n_train=3000", "--set", "batch_size=16",
            "--set", "progress=off", "--set", "diagnostics=false"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob("*/checkpoint.pt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert INTERRUPTED in err and "Traceback" not in err
    assert "rerun the same command to resume" in INTERRUPTED
    rec = records.load_record(next(tmp_path.iterdir()))
    assert not rec["done"] and len(rec["epochs"]) < 50


@pytest.fixture(autouse=True)
def _threads_back():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
