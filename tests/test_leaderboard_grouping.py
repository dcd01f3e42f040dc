"""Reports that cannot mislead: a table cell holds only runs that computed the same thing.

Real runs (a few seconds of training on generated data and on small `features` arrays written
here in the real .npz layout), then the reports read them back: one column per data set (two
versions of the same .npz are two columns), one row per result-relevant configuration (logging
and path settings never split a row), a copied run folder counted once, every method of the
paper layout in a table (a plugin registered here too), damaged metrics skipped and named by
the leaderboard and by `mmbalance show`, NaN visible, labels escaped.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

from mmbalance import records
from mmbalance.cli import main
from mmbalance.config import config_hash
from mmbalance.leaderboard import (
    DamagedRecordWarning,
    DuplicateRunWarning,
    pivot,
    write_leaderboard,
)
from mmbalance.method import Method
from mmbalance.paper_tables import LeftOutWarning, write_benchmark
from mmbalance.registry import METHODS, register_method
from mmbalance.report_runs import collect_runs, runs_frame
from mmbalance.runner import run

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

QUICK = {"progress": "off", "log_epochs": False, "epochs": 1, "batch_size": 32, "diagnostics": False}
SYNTH = {**QUICK, "n_train": 160, "n_test": 80}


def write_features(folder, seed: int, n: int = 120) -> None:
    """DIR/train.npz and DIR/test.npz in the `features` layout: two float modalities + label."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", n), ("test", n // 2)):
        y = rng.integers(0, 3, size)
        a = rng.normal(size=(size, 4)) + y[:, None]
        b = rng.normal(size=(size, 6))
        np.savez(folder / f"{split}.npz", a=a.astype(np.float32), b=b.astype(np.float32), label=y.astype(np.int64))


def acc(result) -> float:
    return result.final["best_val"]["test"]["fused"]["acc"]


def first_table(md: str, heading: str) -> list[list[str]]:
    part = md.split(heading, 1)[1]
    block = []
    started = False
    for ln in part.splitlines():
        if ln.startswith("|"):
            started = True
            if not set(ln) <= set("|:- "):
                block.append([c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]])
        elif started:
            break
    return block


# ---- data versions and data roots ----------------------------------------------------------------
@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    """Concat and Sum, seeds 0 and 1, on version 1 of DIR/A's .npz, then on version 2 of the
    same files (same folder, same settings), and on a second folder B."""
    base = tmp_path_factory.mktemp("versions")
    root, data = base / "runs", base / "data"
    results = {}
    write_features(data / "A", seed=1)
    for method in ("concat", "sum"):
        for seed in (0, 1):
            results[("v1", method, seed)] = run(method, "features", {**QUICK, "records": str(root),
                                                                     "data_root": str(data / "A"), "seed": seed})
    write_features(data / "B", seed=3)
    for method in ("concat", "sum", "iprm"):
        for seed in (0, 1):
            results[("B", method, seed)] = run(method, "features", {**QUICK, "records": str(root),
                                                                    "data_root": str(data / "B"), "seed": seed})
    write_features(data / "A", seed=2)  # a second version of the same files
    for method in ("concat", "sum"):
        for seed in (0, 1):
            results[("v2", method, seed)] = run(method, "features", {**QUICK, "records": str(root),
                                                                     "data_root": str(data / "A"), "seed": seed})
    return root, results


def test_two_data_versions_with_the_same_settings_are_two_columns_never_one_cell(two_versions, tmp_path):
    """Wrong variant caught: grouping columns by dataset name and settings without the data
    fingerprint (the two versions' 4 seeds pooled as one cell of n=4)."""
    root, results = two_versions
    recs, skipped = collect_runs(root)
    assert not skipped and len(recs) == 14
    df = runs_frame(recs)
    columns = sorted(set(df["dataset"]))
    assert len(columns) == 3 and "features:B" in columns
    versions = [c for c in columns if c.startswith("features:A (data ")]
    assert len(versions) == 2  # same folder name, same settings: told apart by their data
    assert set(df["method"]) == {"Concat", "Sum", "IPRM"}  # no row per data root
    for version in ("v1", "v2"):
        label = df[df["run_dir"] == results[(version, "concat", 0)].run_dir.name]["dataset"].item()
        cell = df[(df["dataset"] == label) & (df["method"] == "Concat")]["best_val.fused.acc"]
        assert sorted(cell) == pytest.approx(sorted(acc(results[(version, "concat", s)]) for s in (0, 1)))
    files = write_leaderboard(root, tmp_path, "lb", rules=("best_val",), pictures=False)
    md = files[0].read_text()
    table = first_table(md, "## accuracy, rule `best_val`")
    header, body = table[0], table[1:]
    assert len(header) == 4 and all(len(r) == 4 for r in body)
    for row in body:  # every cell a mean over 2 seeds, none over 4
        assert all("(n=" not in c for c in row[1:] if c), row
    v1 = np.mean([acc(results[("v1", "concat", s)]) for s in (0, 1)])
    v2 = np.mean([acc(results[("v2", "concat", s)]) for s in (0, 1)])
    concat = next(r for r in body if r[0] == "Concat")
    assert any(c.strip("*<u>/").startswith(f"{v1:.2f}") for c in concat)
    assert any(c.strip("*<u>/").startswith(f"{v2:.2f}") for c in concat)
    pooled = np.mean([acc(results[(v, "concat", s)]) for v in ("v1", "v2") for s in (0, 1)])
    if abs(pooled - v1) > 0.005 and abs(pooled - v2) > 0.005:
        assert f"{pooled:.2f} ±" not in md


def test_paper_layout_on_two_data_roots_keeps_every_method(two_versions, tmp_path):
    """Wrong variant caught: rows chosen by matching label text ('Concat (data_root=...)' is in
    no table, so every multimodal method vanished without a warning)."""
    root, _ = two_versions
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files = write_benchmark(root, tmp_path, "bench", pictures=False)
    assert not [w for w in caught if issubclass(w.category, LeftOutWarning)]
    md = files[0].read_text()
    t1 = first_table(md, "## Table 1.")
    assert [r[0] for r in t1[1:]] == ["Concat", "Sum", "IPRM"] and len(t1[0]) == 4
    assert all(c for r in t1[1:3] for c in r)  # Concat and Sum have a cell in every column
    t2 = first_table(md, "## Table 2.")
    assert [r[0] for r in t2[1:]] == ["Concat", "IPRM"]
    assert "Left out" not in md


# ---- settings that do not change results -------------------------------------------------------
def test_non_result_settings_keep_the_identity_and_do_not_split_a_row(tmp_path, capsys):
    """Wrong variants caught: a logging or path option declared result-relevant (a second run
    folder, a second row); a result-relevant one (lr) left out of the identity."""
    first = run("concat", "synthetic", {**SYNTH, "records": str(tmp_path / "runs" / "a"), "seed": 0})
    second = run("concat", "synthetic", {**SYNTH, "records": str(tmp_path / "runs" / "b"), "seed": 0,
                                         "progress": "on", "log_epochs": True, "checkpoint": False,
                                         "eval_batch_size": 7, "select": "last", "num_workers": 0,
                                         "wandb_project": "other"})
    assert first.run_dir.name == second.run_dir.name  # the same run: same identity, same folder name
    assert acc(first) == pytest.approx(acc(second), abs=1e-9)
    assert main(["run", "--method", "concat", "--dataset", "synthetic", "--records", str(tmp_path / "runs" / "c"),
                 "--seed", "1", "--quiet", *[a for k, v in SYNTH.items() if k not in ("progress", "log_epochs")
                                              for a in ("--set", f"{k}={v}")]]) == 0
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = runs_frame(collect_runs(tmp_path / "runs")[0])
    # a and b hold the same run (seed 0) twice: counted once; c is seed 1 of the same row
    assert [w for w in caught if issubclass(w.category, DuplicateRunWarning)] == []  # collect_runs does not warn
    assert list(df["method"].unique()) == ["Concat"] and sorted(df["seed"]) == [0, 1]
    cfg = dict(first.config)
    assert config_hash({**cfg, "progress": "off", "records": "x", "device": "cuda"}) == config_hash(cfg)
    assert config_hash({**cfg, "lr": cfg["lr"] * 2}) != config_hash(cfg)


def test_a_setting_of_a_whole_column_describes_it_and_one_that_differs_in_it_splits_rows(tmp_path):
    """A grid's per-dataset setting (epochs here) must not split a method into one row per
    column; a setting that differs within a column must, labelled only where it differs from
    the defaults. Wrong variants caught: rows keyed by every non-default setting ('Concat
    (epochs=1)' and 'Concat (epochs=2)' as two half-empty rows); labels naming the default
    value ('Concat (lr=...)' for the default run)."""
    root = tmp_path / "runs"
    for method in ("concat", "sum"):
        run(method, "synthetic", {**SYNTH, "records": str(root), "epochs": 1})
        run(method, "synthetic", {**SYNTH, "records": str(root), "epochs": 2, "modalities": ["m1", "m2"]})
    run("concat", "synthetic", {**SYNTH, "records": str(root), "epochs": 2, "modalities": ["m1", "m2"], "lr": 0.0123})
    df = runs_frame(collect_runs(root)[0])
    assert sorted(set(df["method"])) == ["Concat", "Concat (lr=0.0123)", "Sum"]
    assert sorted(df[df["method"] == "Concat"]["dataset"]) == ["synthetic", "synthetic [m1+m2]"]
    files = write_leaderboard(root, tmp_path / "out", "lb", rules=("best_val",), pictures=False)
    md = files[0].read_text()
    settings = md.splitlines()[4]
    assert settings.startswith("Settings that differ from each method's defaults")
    assert "every run: `batch_size=32, n_test=80, n_train=160`" in settings
    assert "column synthetic: `epochs=1`" in settings and "column synthetic [m1+m2]: `epochs=2`" in settings
    assert "row Concat (lr=0.0123): `lr=0.0123`" in settings and "row Concat:" not in settings


def test_declared_options_decide_the_identity():
    """Dataset options declared changes_results=False (how files are read) leave the hash; an
    undeclared key (a plugin not installed here) counts."""
    from mmbalance.registry import DATASETS
    from mmbalance.runner import resolve_config

    cfg, dataset_cls, method_cls = resolve_config("concat", "cremad")
    assert not dataset_cls.options["check_manifest"].changes_results
    assert config_hash({**cfg, "check_manifest": "warn"}) == config_hash(cfg)
    assert config_hash({**cfg, "image_size": 112}) != config_hash(cfg)
    assert config_hash({**cfg, "cache": "/elsewhere"}) == config_hash(cfg)
    assert config_hash({**cfg, "not_installed_option": 1}) != config_hash(cfg)
    features = DATASETS.get("features")
    assert not features.options["name"].changes_results


# ---- a copied run folder -----------------------------------------------------------------------
def test_a_copied_run_folder_counts_once_and_both_folders_are_named(tmp_path):
    """Wrong variant caught: counting every DONE folder (3 'seeds' from 2)."""
    root = tmp_path / "runs"
    results = [run("concat", "synthetic", {**SYNTH, "records": str(root), "seed": s}) for s in (0, 1)]
    backup = root / "backup" / results[0].run_dir.name
    shutil.copytree(results[0].run_dir, backup)
    with pytest.warns(DuplicateRunWarning) as caught:
        files = write_leaderboard(root, tmp_path / "out", "lb", rules=("best_val",), pictures=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, DuplicateRunWarning)]
    assert len(messages) == 1
    assert str(results[0].run_dir) in messages[0] and str(backup) in messages[0]
    assert files.duplicates == [(results[0].run_dir, backup)]
    df = pd.read_csv(files[1])
    assert len(df) == 2 and sorted(df["seed"]) == [0, 1]
    md = files[0].read_text()
    header = md.splitlines()[2]
    assert "counted once" in header and f"backup/{results[0].run_dir.name}" in header
    mean, std = np.mean([acc(r) for r in results]), np.std([acc(r) for r in results], ddof=1)
    assert f"{mean:.2f} ± {std:.2f}" in md and "(n=3)" not in md
    # the paper layout and the command line say it too
    with pytest.warns(DuplicateRunWarning):
        write_benchmark(root, tmp_path / "out", "bench", pictures=False)


# ---- the paper layout keeps every method -------------------------------------------------------
class _PluginMethod(Method):
    """A third party's method: joint training with the default step, nothing else."""

    name = "thirdparty_test"
    fusion = "sum"

    def trains_unimodal_heads(self) -> bool:
        return True


class _EvilLabel(Method):
    """A plugin whose label holds a table separator and HTML."""

    name = "evil_label_test"

    def label(self) -> str:
        return "Evil | <b>bold</b> & 50%_x $\\nope$"


@pytest.fixture
def plugins():
    register_method(_PluginMethod.name, "test plugin")(_PluginMethod)
    register_method(_EvilLabel.name, "test plugin")(_EvilLabel)
    yield
    for name in (_PluginMethod.name, _EvilLabel.name):
        METHODS._entries.pop(name, None)


def test_a_plugin_method_is_in_table_2_of_the_paper_layout_and_its_tex(plugins, tmp_path, capsys):
    """Wrong variant caught: Table 2 listing the built-in rebalancing labels only."""
    root = tmp_path / "runs"
    for method in ("concat", "sum", _PluginMethod.name):
        for seed in (0, 1):
            run(method, "synthetic", {**SYNTH, "records": str(root), "seed": seed})
    assert main(["leaderboard", "--records", str(root), "--out", str(tmp_path / "out"), "--name", "b",
                 "--layout", "paper", "--format", "all", "--no-pictures"]) == 0
    out = capsys.readouterr().out
    assert "b.tex" in out
    md = (tmp_path / "out" / "b.md").read_text()
    table2 = md.split("## Table 2.")[1].split("## Table")[0]
    assert "| thirdparty\\_test " in table2 and "| Concat " in table2
    tex = (tmp_path / "out" / "b.tex").read_text()
    assert "thirdparty\\_test" in tex and "Table 2" in tex and "\\toprule" in tex and "\\begin{table}" in tex
    assert tex.count("\\begin{table}") >= 3  # Tables 1, 2 and 4
    # read where the plugin is not installed: its options are unknown, its runs still one row
    METHODS._entries.pop(_PluginMethod.name)
    df = runs_frame(collect_runs(root)[0])
    assert sorted(set(df["method"])) == ["Concat", "Sum", "thirdparty_test"] and set(df["dataset"]) == {"synthetic"}
    assert (df["method"] == "thirdparty_test").sum() == 2


def test_a_row_no_table_shows_and_a_picture_not_drawn_are_named(tmp_path):
    """Wrong variant caught: a row with no result under the rule silently absent from the
    layout; a picture that cannot be drawn silently missing."""
    root = tmp_path / "runs"
    for method in ("concat", "sum", "ogm"):
        run(method, "synthetic", {**SYNTH, "records": str(root), "seed": 0})
    ogm = next(p for p in records.find_runs(root) if "_ogm_" in p.name)
    path = ogm / records.RECORD
    rows = [json.loads(ln) for ln in path.read_text().splitlines()]
    rows[-1]["selection"] = {"last": rows[-1]["selection"]["last"]}  # no best_val result
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files = write_benchmark(root, tmp_path / "out", "bench", rule="best_val")
    messages = [str(w.message) for w in caught if issubclass(w.category, LeftOutWarning)]
    assert any("OGM-GE" in m and "no run of it has a result under rule best_val" in m for m in messages)
    assert any("critical-difference diagram was not drawn" in m for m in messages)
    md = files[0].read_text()
    assert "Left out of Tables 1-3: OGM-GE (no run of it has a result under rule best\\_val)" in md
    assert "Pictures not drawn: the critical-difference diagram" in md


# ---- escaping ----------------------------------------------------------------------------------
def test_labels_with_pipes_and_html_are_escaped_in_markdown_and_latex(plugins, tmp_path):
    """Wrong variants caught: labels written into the tables as they are (a '|' adds a cell,
    '<b>' is HTML in the rendered page, '&' and '%' break LaTeX); '$...$' read as math by
    matplotlib (an unknown command fails the cost chart, and with it the leaderboard)."""
    root, data = tmp_path / "runs", tmp_path / "data"
    write_features(data / "D", seed=5)
    for method in ("concat", _EvilLabel.name):
        run(method, "features", {**QUICK, "records": str(root), "data_root": str(data / "D"), "seed": 0,
                                 "name": "my|data <i>x</i>"})
    files = write_leaderboard(root, tmp_path / "out", "lb", rules=("best_val",), latex=True)
    assert [p.name for p in files.pictures] == ["lb_cost.png"]
    md = files[0].read_text()
    assert "<b>" not in md and "<i>" not in md
    table = first_table(md, "## accuracy, rule `best_val`")
    assert all(len(r) == 2 for r in table)  # method + one column, in every row
    assert table[0][1] == "features:my\\|data &lt;i&gt;x&lt;/i&gt;"
    assert "Evil \\| &lt;b&gt;bold&lt;/b&gt; &amp; 50%\\_x \\$\\\\nope\\$" in [r[0] for r in table]
    stats = md.split("## Statistics")[1]
    assert "<b>" not in stats and "Evil \\|" in stats
    tex = files.latex[0].read_text()
    assert ("Evil \\textbar{} \\textless{}b\\textgreater{}bold\\textless{}/b\\textgreater{} \\& 50\\%\\_x "
            "\\$\\textbackslash{}nope\\$") in tex
    assert "<b>" not in tex and "my\\textbar{}data" in tex
    # the paper layout: the plugin's row in Table 2, escaped in both formats
    written = write_benchmark(root, tmp_path / "paper", "bench", pictures=False, latex=True)
    paper_md = written[0].read_text()
    table2 = first_table(paper_md, "## Table 2.")
    assert all(len(r) == 4 for r in table2) and "<b>" not in paper_md
    assert [r[0][:17] for r in table2[1:]] == ["Concat", "Evil \\| &lt;b&gt;"]
    paper_tex = next(p for p in written if p.suffix == ".tex").read_text()
    assert "Evil \\textbar{} \\textless{}b" in paper_tex and "<b>" not in paper_tex
    assert "features:my\\textbar{}data \\textless{}i\\textgreater{}" in paper_tex


# ---- damaged metrics ---------------------------------------------------------------------------
DAMAGE = {
    "string metric": (lambda rows: rows[-1]["selection"]["best_val"]["test"]["fused"].__setitem__("acc", "90.1"),
                      "selection rule 'best_val' test.fused.acc is '90.1', not a number"),
    "null metric": (lambda rows: rows[-1]["selection"]["last"]["test"]["m1"].__setitem__("f1", None),
                    "selection rule 'last' test.m1.f1 is None, not a number"),
    "missing epoch": (lambda rows: rows[-1]["selection"]["best_val"].pop("epoch"),
                      "selection rule 'best_val' has no epoch number"),
    "null selection": (lambda rows: rows[-1].__setitem__("selection", None), "the final row's selection is None"),
    "empty selection": (lambda rows: rows[-1].__setitem__("selection", {}), "the final row's selection is {}"),
    "epoch row without its number": (lambda rows: rows[1].pop("epoch"), "epoch row 1 has no epoch number"),
}


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("damage")
    return [run("concat", "synthetic", {**SYNTH, "records": str(root), "seed": s}).run_dir for s in (0, 1)]


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_metric_is_skipped_and_named_and_show_says_why(kind, one_run, tmp_path, capsys):
    """Wrong variant caught: a string metric reaching the means (TypeError for the whole
    leaderboard), `show` tracing back on a missing epoch or selection."""
    root = tmp_path / "runs"
    good = root / one_run[0].name
    bad = root / one_run[1].name
    shutil.copytree(one_run[0], good)
    shutil.copytree(one_run[1], bad)
    path = bad / records.RECORD
    rows = [json.loads(ln) for ln in path.read_text().splitlines()]
    damage, reason = DAMAGE[kind]
    damage(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(DamagedRecordWarning) as caught:
        files = write_leaderboard(root, tmp_path / "out", "lb", rules=("best_val", "last"), pictures=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, DamagedRecordWarning)]
    assert len(messages) == 1 and str(bad) in messages[0] and reason in messages[0]
    assert files.skipped[0][0] == bad and len(pd.read_csv(files[1])) == 1
    assert bad.name in files[0].read_text().splitlines()[2]
    assert main(["show", str(bad)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("error: Record") and reason in err and "Traceback" not in err
    assert main(["show", str(good)]) == 0  # the intact one is shown


def test_show_and_plot_report_the_damage_without_a_traceback(one_run, tmp_path):
    root = tmp_path / "runs"
    bad = root / one_run[0].name
    shutil.copytree(one_run[0], bad)
    path = bad / records.RECORD
    rows = [json.loads(ln) for ln in path.read_text().splitlines()]
    rows[-1]["selection"]["best_val"]["test"]["fused"]["acc"] = "90.1"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, "-m", "mmbalance.cli", "show", str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "not a number" in proc.stderr


def test_a_setting_no_plugin_declares_splits_the_row_not_the_column(one_run, tmp_path):
    """A record holding an option its method no longer declares (an older version) is another
    configuration of that method: another row, on the same data set's column. Wrong variant
    caught: undeclared keys taken as dataset settings (a column of its own)."""
    root = tmp_path / "runs"
    for run_dir in one_run:
        shutil.copytree(run_dir, root / run_dir.name)
    path = root / one_run[1].name / records.RECORD
    rows = [json.loads(ln) for ln in path.read_text().splitlines()]
    rows[0]["config"]["retired_option"] = 3
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    df = runs_frame(collect_runs(root)[0])
    assert set(df["dataset"]) == {"synthetic"}
    assert sorted(df["method"]) == ["Concat", "Concat (retired_option=3)"]


# ---- NaN ---------------------------------------------------------------------------------------
def test_a_nan_metric_keeps_its_seed_count_visible(one_run, tmp_path):
    """Wrong variant caught: NaN dropped by the mean and the count (a 2-seed cell shown as a
    complete 1-seed cell, or an all-NaN cell shown empty)."""
    root = tmp_path / "runs"
    copies = []
    for run_dir in one_run:
        copies.append(root / run_dir.name)
        shutil.copytree(run_dir, copies[-1])
    path = copies[1] / records.RECORD
    rows = [json.loads(ln) for ln in path.read_text().splitlines()]
    kept = rows[-1]["selection"]["best_val"]["test"]["fused"]["acc"]
    other = json.loads((copies[0] / records.RECORD).read_text().splitlines()[-1])["selection"]["best_val"]["test"]
    rows[-1]["selection"]["best_val"]["test"]["fused"]["acc"] = float("nan")
    rows[-1]["selection"]["best_val"]["test"]["fused"]["map"] = float("nan")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json writes NaN
    assert kept == kept
    other_copy = copies[0] / records.RECORD
    rows0 = [json.loads(ln) for ln in other_copy.read_text().splitlines()]
    rows0[-1]["selection"]["best_val"]["test"]["fused"]["map"] = float("nan")
    other_copy.write_text("".join(json.dumps(r) + "\n" for r in rows0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DamagedRecordWarning)  # NaN is a number: not damage
        files = write_leaderboard(root, tmp_path / "out", "lb", rules=("best_val",), pictures=False, latex=True)
    md = files[0].read_text()
    accuracy = md.split("## accuracy")[1].split("## MAP")[0]
    assert f"{other['fused']['acc']:.2f} (n=1 of 2, 1 NaN)" in accuracy
    mean_ap = md.split("## MAP")[1].split("## macro-F1")[0]
    assert "NaN (n=2)" in mean_ap
    assert "(n=1 of 2, 1 NaN)" in files.latex[0].read_text()


def test_pivot_counts_nan_and_ranks_finite_means():
    df = pd.DataFrame({"method": ["A", "A", "B", "B", "C"], "dataset": ["d"] * 5,
                       "best_val.epoch": [1, 1, 1, 1, 1],
                       "best_val.fused.acc": [80.0, float("nan"), 70.0, 72.0, float("nan")]})
    table, seeds = pivot(df, "best_val.fused.acc")
    assert seeds == {"d": 2}
    assert table.loc["A", "d"] == "**80.00 (n=1 of 2, 1 NaN)**"
    assert table.loc["B", "d"] == "<u>71.00 ± 1.41</u>"
    assert table.loc["C", "d"] == "NaN (n=1)"


# ---- module layering ---------------------------------------------------------------------------
def test_leaderboard_and_plots_do_not_import_each_other():
    """plots reads runs through report_runs; leaderboard imports plots only to draw."""
    code = ("import sys, mmbalance.plots; bad = 'mmbalance.leaderboard' in sys.modules; "
            "import mmbalance.leaderboard, mmbalance.report_runs; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
    code = "import sys, mmbalance.leaderboard; print('mmbalance.plots' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
    from mmbalance import leaderboard, report_runs

    assert leaderboard.collect_runs is report_runs.collect_runs and leaderboard.runs_frame is report_runs.runs_frame
