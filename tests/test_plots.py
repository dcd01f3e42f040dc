"""Pictures drawn from real recorded runs: every PNG exists, opens, has a sane size; the
leaderboard embeds them; the statistics in the report match scipy on the recorded numbers."""

from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats as sps

from mmbalance import plots, records
from mmbalance.leaderboard import collect_runs, write_leaderboard
from mmbalance.plots import PlotError, plot_main
from mmbalance.runner import run
from mmbalance.stats import RankComparison, compare_methods

SETTINGS = (["m1", "m2"], ["m1", "m3"])  # two leaderboard columns: synthetic [m1+m2], [m1+m3]
METHODS = (("concat", {}), ("sum", {}), ("concat", {"unimodal_loss": True}))
SEEDS = (0, 1, 2)
ALPHAS = (0.5, 0.8)


@pytest.fixture(scope="session")
def grid(tmp_path_factory):
    """3 methods x 2 settings x 3 seeds (1 epoch), plus IPRM at two alphas (2 epochs, with
    per-step diagnostics) on the first setting: real records, written by the real trainer."""
    root = tmp_path_factory.mktemp("plot-records")
    base = {"records": str(root), "progress": "off", "device": "cpu", "epochs": 1, "n_train": 200,
            "n_test": 100, "num_classes": 4, "n_modalities": 3, "checkpoint": False}
    for mods in SETTINGS:
        for seed in SEEDS:
            for method, extra in METHODS:
                run(method, "synthetic", {**base, **extra, "modalities": mods, "seed": seed, "batch_size": 128})
    iprm = [run("iprm", "synthetic", {**base, "modalities": list(SETTINGS[0]), "seed": 0, "alpha": a,
                                      "epochs": 2}).run_dir for a in ALPHAS]
    concat = next(p for p in records.find_runs(root) if records.load_record(p)["header"]["method_label"] == "Concat")
    return {"root": root, "iprm": iprm, "concat": concat}


@pytest.fixture(scope="module")
def drawn(grid, tmp_path_factory):
    """plot_main on an IPRM run, on a Concat run and on the whole records folder (drawn once)."""
    out = tmp_path_factory.mktemp("pictures")
    printed = []
    for target, dest in ((grid["iprm"][0], "run"), (grid["concat"], "concat"), (grid["root"], "all")):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert plot_main(str(target), str(out / dest)) == 0
        printed.append(buf.getvalue())
    return out, "".join(printed)


def assert_png(path, min_w=300, min_h=150):
    assert path.is_file(), path
    assert path.stat().st_size > 3000, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert min_w <= w <= 5000 and min_h <= h <= 5000, (path, im.size)
        # not a blank canvas: a drawn picture has many distinct colours
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 20


def test_step_diagnostics_read_every_column_on_a_global_step(grid):
    run_dir = grid["iprm"][0]
    frame = plots.step_diagnostics(run_dir)
    files = sorted((run_dir / "diagnostics").glob("epoch_*.jsonl"))
    lines = [json.loads(ln) for f in files for ln in f.read_text().splitlines()]
    assert len(files) == 2 and len(frame) == len(lines)
    assert list(frame["global_step"]) == list(range(len(lines)))  # epochs laid end to end
    assert list(frame["epoch"]) == [int(f.stem[-4:]) for f in files for _ in f.read_text().splitlines()]
    expected = [k for k in lines[0] if k != "step"]
    assert plots.diagnostic_columns(frame) == expected and "omega_m1" in expected
    assert frame["omega_m1"].tolist() == pytest.approx([ln["omega_m1"] for ln in lines])
    assert plots.plot_step_diagnostics(grid["concat"], grid["root"] / "none.png") is None  # logs none
    assert not (grid["root"] / "none.png").exists()


def test_epoch_accuracy_of_a_run(grid):
    run_dir = grid["iprm"][0]
    rec = records.load_record(run_dir)
    frame = plots.epoch_accuracy(rec)
    assert list(frame.columns) == ["fused", "m1", "m2"] and list(frame.index) == [0, 1]
    assert frame.loc[1, "m2"] == rec["epochs"][1]["test"]["m2"]["acc"]
    with pytest.raises(PlotError, match="split"):
        plots.epoch_accuracy(rec, "train")


def test_alpha_sensitivity_from_iprm_records(grid, tmp_path):
    recs, _ = collect_runs(grid["root"])
    data = plots.alpha_sensitivity(recs)
    assert sorted(data["alpha"]) == list(ALPHAS)
    assert set(data["variant"]) == {"IPRM"} and set(data["setting"]) == {"synthetic [m1+m2]"}
    by_alpha = {r.alpha: r.acc for r in data.itertuples()}
    for a, run_dir in zip(ALPHAS, grid["iprm"], strict=True):
        final = records.load_record(run_dir)["final"]["selection"]["best_val"]["test"]["fused"]["acc"]
        assert by_alpha[a] == pytest.approx(final)
    # without IPRM records (or with one alpha only) the picture is skipped cleanly
    no_iprm = [r for r in recs if r["header"]["config"]["method"] != "iprm"]
    assert plots.plot_alpha_sensitivity(no_iprm, tmp_path / "none.png") is None
    one_alpha = [r for r in recs if r["header"]["config"].get("alpha") != ALPHAS[0]]
    assert plots.alpha_sensitivity(one_alpha).empty
    assert plots._strip_alpha("IPRM (L-Mixup, alpha=0.5)") == "IPRM (L-Mixup)"
    assert plots._strip_alpha("IPRM (w/o EMA)") == "IPRM"


def test_cd_cost_and_per_dataset_accuracy_inputs(grid, tmp_path):
    recs, _ = collect_runs(grid["root"])
    from mmbalance.leaderboard import runs_frame
    from mmbalance.stats import score_table

    df = runs_frame(recs)
    comp = compare_methods(score_table(df, "best_val.fused.acc"))
    assert comp.cd is not None and comp.n_settings == 2 and comp.n_methods == 3  # IPRM: one setting only
    assert comp.excluded == ["IPRM", "IPRM (alpha=0.5)"]
    few = compare_methods(score_table(df[df.method.isin(["Concat", "Sum"])], "best_val.fused.acc"))
    assert isinstance(few, RankComparison) and plots.plot_critical_difference(few, tmp_path / "no.png") is None
    assert plots.plot_cost(df.iloc[:0], tmp_path / "nocost.png") is None
    assert plots.plot_methods_epoch_accuracy(recs, "no such dataset", tmp_path / "x.png") is None
    assert list(tmp_path.iterdir()) == []
    assert plots.slug("mfeat [fac+mor]") == "mfeat_fac+mor"


def test_plot_main_on_a_run_and_on_a_records_folder(grid, drawn, tmp_path):
    out, printed = drawn
    for name in ("diagnostics.png", "accuracy.png"):  # per-step diagnostics, per-epoch accuracy
        assert_png(out / "run" / name)
    assert "skipped per-step diagnostics: Concat logged no per-step diagnostics" in printed
    assert sorted(p.name for p in (out / "concat").iterdir()) == ["accuracy.png"]
    assert_png(out / "concat" / "accuracy.png")
    made = sorted(p.name for p in (out / "all").iterdir())
    assert made == ["accuracy_synthetic_m1+m2.png", "accuracy_synthetic_m1+m3.png", "alpha_sensitivity.png",
                    "cd_best_val.png", "cost.png"]
    for name in made:
        assert_png(out / "all" / name)
    assert f"wrote {out / 'all' / 'cost.png'} (cost per epoch)" in printed

    with pytest.raises(PlotError, match="does not exist"):
        plot_main(str(tmp_path / "nowhere"), None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlotError, match="neither a run folder"):
        plot_main(str(tmp_path / "empty"), None)
    with pytest.raises(PlotError, match="Unknown selection rule"):
        plot_main(str(grid["root"]), str(tmp_path / "x"), rule="best")


def test_leaderboard_embeds_pictures_and_statistics_match_scipy(grid, tmp_path):
    files = write_leaderboard(grid["root"], tmp_path, "lb", rules=("best_val", "last"))
    md, csv = files
    text = md.read_text()
    assert sorted(p.name for p in files.pictures) == ["lb_cd.png", "lb_cost.png"]
    for name in ("lb_cd.png", "lb_cost.png"):
        assert f"]({name})" in text  # a relative link beside the markdown
        assert_png(tmp_path / name)
    assert text.index("## Statistics, rule `best_val`") < text.index("](lb_cd.png)") < text.index("## Cost")
    assert text.index("## Cost") < text.index("](lb_cost.png)")

    # the report's Friedman p and paired p-values equal scipy's on the recorded numbers
    df = pd.read_csv(csv)
    col = "best_val.fused.acc"
    means = df.groupby(["method", "dataset"])[col].mean().unstack()
    block = means.loc[["Concat", "Concat + uni CE", "Sum"]]
    p = sps.friedmanchisquare(*block.to_numpy()).pvalue
    assert re.search(rf"p = {p:.2g} \((not )?significant", text)
    paired = text.split("**Difference from Concat + uni CE per setting**")[1].split("## Cost")[0]
    row = next(ln for ln in paired.splitlines() if ln.startswith("| Sum "))
    for setting, cell in zip(("synthetic [m1+m2]", "synthetic [m1+m3]"), row.split("|")[2:4], strict=True):
        sub = df[df.dataset == setting].pivot_table(index="seed", columns="method", values=col)
        diff = (sub["Sum"] - sub["Concat + uni CE"]).mean()
        pv = sps.ttest_rel(sub["Sum"], sub["Concat + uni CE"]).pvalue
        assert f"{diff:+.2f}" in cell
        if not np.isnan(pv):
            assert f"p={pv:.2g}" in cell or f"p={pv:.1e}" in cell
            assert ("†" in cell or "‡" in cell) == (pv < 0.05)

    # pictures can be skipped (the markdown then links none)
    files = write_leaderboard(grid["root"], tmp_path, "lb", rules=("best_val",), pictures=False)
    assert files.pictures == [] and "![" not in files[0].read_text()
    assert "## Statistics" in files[0].read_text()
    # without statistics there is no CD diagram, and the stale one is removed
    files = write_leaderboard(grid["root"], tmp_path, "lb", rules=("best_val",), statistics=False)
    assert [p.name for p in files.pictures] == ["lb_cost.png"] and not (tmp_path / "lb_cd.png").exists()
    assert "## Statistics" not in files[0].read_text() and "](lb_cost.png)" in files[0].read_text()
