"""Grids: cells from a YAML file, finished cells skipped, parallel workers, bad files."""

from __future__ import annotations

import pytest

from mmbalance.errors import ConfigError
from mmbalance.grid import TuneSpec, load_grid, run_grid
from mmbalance.records import find_runs, load_record

GRID = """
records: {records}
seeds: [0, 1]
set: {{epochs: 1, n_train: 200, n_test: 100}}
datasets:
  - synthetic
  - {{name: synthetic, set: {{n_modalities: 3}}}}
methods:
  - concat
  - {{name: unimodal, set: {{modality: m2}}}}
"""


def test_grid_runs_every_cell_then_skips_them(tmp_path, capsys):
    path = tmp_path / "g.yaml"
    path.write_text(GRID.format(records=tmp_path / "runs"))
    grid = load_grid(path)
    assert len(grid.cells) == 8
    assert run_grid(grid, {}, jobs=2) == 0
    runs = find_runs(tmp_path / "runs")
    assert len(runs) == 8 and all(load_record(r)["done"] for r in runs)
    capsys.readouterr()
    assert run_grid(grid, {}) == 0
    assert capsys.readouterr().out.count("done, skipped") == 8


def test_bad_grid_files(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("seeds: [0]\nmethods: [concat]\n")
    with pytest.raises(ConfigError, match="datasets"):
        load_grid(path)
    path.write_text("seeds: [0]\nmethods: [concat]\ndatasets: [synthetic]\nepochs: 3\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        load_grid(path)


@pytest.mark.parametrize(
    ("seeds", "shown"),
    [("[]", "[]"), ("'0,1'", "'0,1'"), ("[0, 1.5]", "1.5"), ("[0, true]", "True"), ("[-1]", "-1"),
     ("[0, 1, 1]", "1"), ("2.0", "2.0"), ("{a: 1}", "{'a': 1}"), ("null", "None"), ("[[0]]", "[0]")],
)
def test_bad_seeds(tmp_path, seeds, shown):
    path = tmp_path / "g.yaml"
    path.write_text(f"seeds: {seeds}\nmethods: [concat]\ndatasets: [synthetic]\n")
    with pytest.raises(ConfigError, match="seeds") as info:
        load_grid(path)
    assert str(path) in str(info.value) and shown in str(info.value)


def test_seeds_forms(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("seeds: 3\nmethods: [concat, sum]\ndatasets: [synthetic]\n")
    assert [c.seed for c in load_grid(path).cells] == [3, 3]
    path.write_text("methods: [concat]\ndatasets: [synthetic]\n")
    assert [c.seed for c in load_grid(path).cells] == [0]
    path.write_text("seeds: [2, 0]\nmethods: [concat]\ndatasets: [synthetic]\n")
    assert [c.seed for c in load_grid(path).cells] == [2, 0]


def test_bad_cell_settings(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("seeds: [0]\nmethods: [{name: concat, set: {seed: 3}}]\ndatasets: [synthetic]\n")
    with pytest.raises(ConfigError, match="'seed' cannot be set per cell"):
        load_grid(path)
    path.write_text("seeds: [0]\nset: [epochs, 3]\nmethods: [concat]\ndatasets: [synthetic]\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_grid(path)


def test_progress_line_counts_and_eta():
    from mmbalance.grid import FAILED, TRAINED, progress_line

    line = progress_line({0: TRAINED, 1: TRAINED, 2: FAILED, 3: "skipped"}, to_train=10, eta_s=700.0, jobs=2)
    assert line == "  progress: 2 trained, 2 running, 1 failed, 5 waiting of 10; ETA 11.7 min"
    assert progress_line({}, 4, float("nan"), 2).endswith("ETA –")
    assert progress_line({0: TRAINED}, 4, 42.0, 2).endswith("ETA 42 s")


def test_eta_predicts_each_cell_from_the_finished_cells_most_like_it():
    from mmbalance.grid import Cell, cost_keys, eta_seconds

    cells = [
        Cell("concat", "avdigits", 0), Cell("concat", "avdigits", 1),  # finished: 60 s, 80 s
        Cell("concat", "synthetic", 0),  # finished: 2 s
        Cell("concat", "avdigits", 2),  # running for 30 s: same config, 70 - 30 = 40 s left
        Cell("concat", "avdigits", 0, {"unimodal_loss": True}),  # same method and dataset: 70 s
        Cell("iprm", "synthetic", 0),  # same dataset: 2 s
        Cell("iprm", "mfeat", 0),  # nothing alike: the mean of all, (60 + 80 + 2) / 3
    ]
    took = {0: 60.0, 1: 80.0, 2: 2.0}
    cells = [cost_keys(c) for c in cells]
    eta = eta_seconds(cells, took, running={3: 30.0}, waiting=[4, 5, 6], jobs=2)
    assert eta == pytest.approx((40.0 + 70.0 + 2.0 + 142.0 / 3) / 2)
    # a running cell past its expected time adds nothing (never a negative ETA)
    assert eta_seconds(cells, took, running={3: 500.0}, waiting=[], jobs=1) == 0.0
    assert eta_seconds(cells, {}, running={}, waiting=[4], jobs=1) != eta_seconds(cells, {}, running={}, waiting=[4], jobs=1)


def test_grid_prints_progress_after_each_trained_cell(tmp_path, capsys):
    path = tmp_path / "g.yaml"
    path.write_text(f"records: {tmp_path / 'runs'}\nseeds: [0, 1]\nset: {{epochs: 1, n_train: 200, n_test: 100}}\n"
                    "datasets: [synthetic]\nmethods: [concat]\n")
    assert run_grid(load_grid(path), {}) == 0
    lines = capsys.readouterr().out.splitlines()
    progress = [ln for ln in lines if ln.startswith("  progress:")]
    assert len(progress) == 2 and "1 trained, 1 running, 0 failed, 0 waiting of 2" in progress[0]
    assert progress[1].startswith("  progress: 2 trained, 0 running, 0 failed, 0 waiting of 2; ETA 0 s")


BLOCKS = """
records: runs
seeds: [0, 1]
set: {epochs: 1}
blocks:
  - datasets: [synthetic, {name: synthetic, set: {n_modalities: 3}}]
    methods: [concat, sum]
  - datasets: [synthetic]
    seeds: [4]
    set: {epochs: 2}
    methods: [{name: unimodal, set: {modality: m1}}, concat]
  - datasets: [synthetic]
    methods: [concat]
"""


def test_grid_blocks_give_per_setting_rows_and_run_a_repeated_cell_once(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(BLOCKS)
    cells = load_grid(path).cells
    # block 1: 2 datasets x 2 methods x 2 seeds; block 2: 2 methods x seed 4; block 3 repeats block 1
    assert len(cells) == 8 + 2
    uni = [c for c in cells if c.method == "unimodal"]
    assert [(c.seed, c.overrides) for c in uni] == [(4, {"epochs": 2, "modality": "m1"})]
    three = [c for c in cells if c.overrides.get("n_modalities") == 3]
    assert len(three) == 4 and all(c.overrides["epochs"] == 1 for c in three)
    assert [str(c) for c in cells[:2]] == ["concat on synthetic seed 0", "concat on synthetic seed 1"]


@pytest.mark.parametrize("text, match", [
    ("blocks: [{datasets: [synthetic], methods: [concat]}]\ndatasets: [synthetic]\n", "both 'blocks'"),
    ("blocks: []\n", "non-empty list"),
    ("blocks: [{datasets: [synthetic], methods: [concat], epochs: 3}]\n", "block 1 must be a mapping"),
    ("blocks: [{datasets: [synthetic]}]\n", r"methods \(block 1\)"),
])
def test_bad_grid_blocks(tmp_path, text, match):
    path = tmp_path / "g.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_grid(path)


def test_the_benchmark_ablation_grid_adds_table_3_on_avdigits_noisy_to_the_same_records():
    from pathlib import Path

    grids = Path(__file__).resolve().parents[1] / "benchmarks" / "grids"
    main, extra = (load_grid(grids / f) for f in ("benchmark.yaml", "benchmark-ablations-avdigits-noisy.yaml"))
    assert extra.records == main.records and len(extra.cells) == 20
    assert {(c.method, c.dataset) for c in extra.cells} == {("iprm", "avdigits-noisy")}
    ablations = [c for c in main.cells if c.method == "iprm" and c.dataset == "mfeat"
                 and set(c.overrides) & {"mixup", "ema", "one_pass", "unpaired"}]
    noisy = [c for c in main.cells if c.dataset == "avdigits-noisy"]
    shared = {k: v for k, v in noisy[0].overrides.items() if k in ("amp", "memory_format", "eval_batch_size")}
    assert all({**c.overrides, **shared} == c.overrides for c in extra.cells)  # the same cells as before
    assert len(ablations) == 40 and not [c for c in noisy if "mixup" in c.overrides]


def test_the_benchmark_grid_file_loads():
    from pathlib import Path

    grid = load_grid(Path(__file__).resolve().parents[1] / "benchmarks" / "grids" / "benchmark.yaml")
    assert len(grid.cells) == 565  # 540 + MLA as released (mla_gm=none) on 5 settings x 5 seeds
    assert all(c.overrides["amp"] == "none" for c in grid.cells)  # fp32 on every CPU kind
    labels = {(c.method, c.dataset) for c in grid.cells}
    for method in ("concat", "sum", "weight", "iprm", "ogr_gb", "mslr", "ogm", "pmr", "agm", "mmpareto",
                   "reconboost", "mla", "lfm", "unimodal"):
        assert all((method, d) in labels for d in ("avdigits", "avdigits-noisy", "mfeat", "synthetic"))


def test_a_profile_keeps_a_subset_of_the_cells(tmp_path):
    """--profile NAME keeps the grid's own cells (same settings, so the same run folders) whose
    seed, dataset and method it lists; a profile the file lacks, or one that keeps nothing, is
    an error that names the file's profiles."""
    path = tmp_path / "g.yaml"
    path.write_text(
        "seeds: [0, 1, 2]\nset: {epochs: 1}\n"
        "profiles:\n  quick: {seeds: [0, 1], datasets: [mfeat]}\n  none: {methods: [iprm]}\n"
        "  bad: {seeds: 3}\n"
        "blocks:\n  - datasets: [synthetic, {name: mfeat, set: {modalities: [fac, mor]}}]\n"
        "    methods: [concat, sum]\n"
    )
    full = load_grid(path)
    quick = load_grid(path, profile="quick")
    assert len(full.cells) == 12 and len(quick.cells) == 4
    assert {(c.dataset, c.seed) for c in quick.cells} == {("mfeat", 0), ("mfeat", 1)}
    assert all(c in full.cells for c in quick.cells)  # the same cells: the full grid reuses their records
    with pytest.raises(ConfigError, match=r"no profile 'fast' \(its profiles: bad, none, quick\)"):
        load_grid(path, profile="fast")
    with pytest.raises(ConfigError, match="profile 'none' keeps no cell"):
        load_grid(path, profile="none")
    with pytest.raises(ConfigError, match="'seeds' must be a non-empty list"):
        load_grid(path, profile="bad")


def test_the_second_edition_grid_loads_with_its_quick_profile():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "grids" / "benchmark-v2.yaml"
    grid, quick = load_grid(path), load_grid(path, profile="quick")
    columns = {(c.dataset, tuple(c.overrides.get("modalities") or ())) for c in grid.cells}
    assert len(columns) >= 13
    assert {c.seed for c in quick.cells} == {0, 1, 2} and "avdigits" not in {c.dataset for c in quick.cells}
    assert all(c.overrides["amp"] == "none" for c in grid.cells)


# ---- sweeps ----------------------------------------------------------------------------------------
SWEEP = """
records: {records}
seeds: [0]
set: {{epochs: 1, n_train: 200, n_test: 100}}
sweep: {{lr: [0.01, 0.1], alpha: [0.5, 1.0]}}
datasets: [synthetic]
methods: [ogm, pmr]
"""


def test_a_sweep_expands_into_one_cell_per_combination_each_its_own_run(tmp_path):
    """sweep: {lr: [0.01, 0.1], alpha: [0.5, 1.0]} gives four cells per method and dataset,
    each with its values (variants: zip instead of product gave two; the sweep dropped by the
    cell's own settings gave one run folder)."""
    from mmbalance.grid import check_cell

    path = tmp_path / "g.yaml"
    path.write_text(SWEEP.format(records=tmp_path / "runs"))
    grid = load_grid(path)
    assert len(grid.cells) == 8
    ogm = [c for c in grid.cells if c.method == "ogm"]
    assert [(c.overrides["lr"], c.overrides["alpha"]) for c in ogm] == [(0.01, 0.5), (0.01, 1.0), (0.1, 0.5), (0.1, 1.0)]
    assert str(ogm[1]) == "ogm on synthetic [lr=0.01, alpha=1.0] seed 0"
    folders = {check_cell(c, {"records": str(tmp_path / "runs")}).detail for c in grid.cells}
    assert len(folders) == 8
    assert run_grid(load_grid(path), {}, jobs=1) == 0
    runs = find_runs(tmp_path / "runs")
    got = sorted((load_record(r)["header"]["config"]["method"], load_record(r)["header"]["config"]["lr"],
                  load_record(r)["header"]["config"]["alpha"]) for r in runs)
    assert got == sorted((m, lr, a) for m in ("ogm", "pmr") for lr in (0.01, 0.1) for a in (0.5, 1.0))


def test_a_block_sweep_combines_with_the_top_level_one(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("sweep: {lr: [0.01, 0.1]}\nblocks:\n"
                    "  - {datasets: [synthetic], methods: [ogm], sweep: {alpha: [0.5, 1.0, 2.0]}}\n"
                    "  - {datasets: [synthetic], methods: [concat]}\n"
                    "  - {datasets: [synthetic], methods: [sum], sweep: {lr: [0.5]}}\n")
    cells = load_grid(path).cells
    assert [c.method for c in cells].count("ogm") == 6 and [c.method for c in cells].count("concat") == 2
    assert [c.overrides["lr"] for c in cells if c.method == "sum"] == [0.5]  # the block's own list wins


def test_a_typo_in_a_sweep_key_fails_every_cell_before_any_trains(tmp_path):
    """Validated like set: the unknown key is named with its did-you-mean and where it was
    written, and nothing is trained; a swept value out of range is one bad cell."""
    path = tmp_path / "g.yaml"
    path.write_text(SWEEP.format(records=tmp_path / "runs").replace("alpha:", "alpah:"))
    with pytest.raises(ConfigError, match="8 of 8 cells") as info:
        run_grid(load_grid(path), {})
    text = str(info.value)
    assert "Unknown config key 'alpah' (from grid file" in text and "top-level sweep). Did you mean 'alpha'?" in text
    assert find_runs(tmp_path / "runs") == []
    path.write_text(SWEEP.format(records=tmp_path / "runs").replace("alpha: [0.5, 1.0]", "alpha: [0.5, -1.0]"))
    with pytest.raises(ConfigError, match="4 of 8 cells") as info:
        run_grid(load_grid(path), {})
    assert "Bad value -1.0 for 'alpha'" in str(info.value) and "top-level sweep" in str(info.value)
    assert find_runs(tmp_path / "runs") == []


@pytest.mark.parametrize(("sweep", "match"), [
    ("{lr: 0.1}", "sweep key 'lr' at the top level must list its values"),
    ("{lr: []}", "must list its values"),
    ("[lr, 0.1]", "must be a mapping of settings to lists"),
    ("{}", "must be a mapping of settings to lists"),
    ("{seed: [0, 1]}", "'seed' cannot be set per cell"),
    ("{lr: [0.1, 0.1]}", "lists 0.1 more than once"),
])
def test_bad_sweeps(tmp_path, sweep, match):
    path = tmp_path / "g.yaml"
    path.write_text(f"sweep: {sweep}\nmethods: [concat]\ndatasets: [synthetic]\n")
    with pytest.raises(ConfigError, match=match):
        load_grid(path)


def test_a_swept_value_is_blamed_on_the_sweep_even_over_an_entry_set(tmp_path):
    """The sweep's value wins over a methods entry's set of the same key, and its error names the
    sweep (variant: the entry's origin kept, pointing at the line that did not give the value)."""
    path = tmp_path / "g.yaml"
    path.write_text("sweep: {alpha: [-1.0]}\nmethods: [{name: ogm, set: {alpha: 2.0}}]\ndatasets: [synthetic]\n")
    grid = load_grid(path)
    assert grid.cells[0].overrides["alpha"] == -1.0
    with pytest.raises(ConfigError, match="top-level sweep"):
        run_grid(grid, {"records": str(tmp_path / "runs")})


# ---- tuned grids -------------------------------------------------------------------------------------
def test_a_tuned_grid_gives_every_method_the_same_budget_then_runs_each_best_over_the_seeds(tmp_path):
    """tune: {trials: 3}: one study per method x setting, each with exactly 3 finished trials;
    each best configuration then runs over the grid's seeds beside the defaults (none added where
    the defaults were best). Variants: a budget per grid instead of per study, or the best cells
    trained at the tuning seed only, failed here."""
    import optuna

    from mmbalance import tune
    from mmbalance.leaderboard import write_leaderboard
    from mmbalance.report_runs import cell_key

    records = tmp_path / "runs"
    path = tmp_path / "g.yaml"
    path.write_text(f"records: {records}\nseeds: [0, 1]\nset: {{epochs: 2, n_train: 400, n_test: 200}}\n"
                    "tune: {trials: 3}\ndatasets: [synthetic]\nmethods: [ogm, mslr]\n")
    grid = load_grid(path)
    assert grid.tune == TuneSpec(3, None)
    assert run_grid(grid, {}) == 0
    dbs = sorted((records / tune.STUDIES).glob("*.db"))
    assert [db.name.split("_")[0] for db in dbs] == ["mslr", "ogm"]
    for db in dbs:
        study = optuna.load_study(study_name=db.stem, storage=f"sqlite:///{db}")
        assert sum(t.state.name in tune.FINISHED for t in study.trials) == 3
        best = study.best_trial
        ran = [load_record(r)["header"]["config"] for r in find_runs(records) if records_done(r)]
        method = db.stem.split("_")[0]
        full = [c for c in ran if c["method"] == method and c.get("eval_test", True)]
        if best.user_attrs.get("defaults"):
            assert sorted(c["seed"] for c in full) == [0, 1]
        else:
            tuned = [c for c in full if all(c[k] == v for k, v in best.params.items())]
            assert sorted(c["seed"] for c in tuned) == [0, 1] and len(full) == 4
        # the study names its defaults' and its best runs by the keys their records give
        keys = {cell_key(h["config"], h.get("data_fingerprint")) for h in (
            load_record(r)["header"] for r in find_runs(records) if records_done(r))
            if h["config"]["method"] == method and h["config"].get("eval_test", True)
            and (best.user_attrs.get("defaults") or all(h["config"][k] == v for k, v in best.params.items()))}
        assert [study.user_attrs[tune.BEST_CELL]] == sorted(keys)
        assert study.user_attrs["budget"] == 3 and study.user_attrs["seeds"] == [0]
        assert (study.user_attrs[tune.DEFAULTS_CELL] == study.user_attrs[tune.BEST_CELL]) == bool(
            best.user_attrs.get("defaults"))
    md = write_leaderboard(records, tmp_path / "lb", "lb", rules=("best_val",), pictures=False)[0].read_text()
    section = md.split("## Defaults and tuned")[1]
    assert "3 finished trials per method × setting (budget 3), 2 studies" in section
    assert "| OGM-GE " in section and "| MSLR " in section and "WARNING" not in section


def records_done(run_dir):
    from mmbalance.records import is_done

    return is_done(run_dir)


@pytest.mark.parametrize(("tune", "match"), [
    ("{trials: 0}", "trials must be an integer >= 1"), ("{seeds: [0]}", "'tune' must be a mapping with 'trials'"),
    ("{trials: 2, budget: 3}", "'tune' must be a mapping"), ("{trials: 2, seeds: [0, 0]}", "more than once"),
])
def test_bad_tune_keys(tmp_path, tune, match):
    path = tmp_path / "g.yaml"
    path.write_text(f"tune: {tune}\nmethods: [concat]\ndatasets: [synthetic]\n")
    with pytest.raises(ConfigError, match=match):
        load_grid(path)


def test_a_tuned_grid_adds_each_non_default_best_over_every_seed_of_its_setting(tmp_path, monkeypatch):
    """The expansion alone, with a stand-in study result: a best configuration other than the
    defaults becomes one tuned cell per grid seed with the best values (the study's seeds
    are not the grid's), a best equal to the defaults adds nothing, and a method refusing the
    setting is not tuned."""
    from mmbalance import grid as grid_mod
    from mmbalance import tune

    calls = []

    import optuna

    def fake_tune(method, dataset, trials, base, jobs=1, seeds=None, say=print):
        calls.append((method, trials, seeds))
        best = {"lr": 0.2, "alpha": 1.2} if method == "ogm" else {"lr": 0.05, "weight_decay": 1e-4}
        name = f"{method}_{len(calls)}"
        db = tmp_path / "runs" / tune.STUDIES / f"{name}.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        optuna.create_study(study_name=name, storage=f"sqlite:///{db}")
        return tune.TuneResult(name, db, {"COMPLETE": trials}, 50.0, best, None, None)

    monkeypatch.setattr(tune, "tune", fake_tune)
    path = tmp_path / "g.yaml"
    path.write_text(f"records: {tmp_path / 'runs'}\nseeds: [3, 4]\nset: {{epochs: 2, n_train: 400, n_test: 200}}\n"
                    "tune: {trials: 5, seeds: [7]}\ndatasets: [synthetic, {name: synthetic, set: {n_modalities: 3}}]\n"
                    "methods: [ogm, concat]\n")
    grid = load_grid(path)
    tuned = grid_mod.tuned_grid(grid, {"records": str(tmp_path / "runs")}, say=lambda _: None)
    assert calls == [("ogm", 5, [7]), ("concat", 5, [7]), ("concat", 5, [7])]  # OGM-GE refuses 3 modalities
    extra = tuned.cells[len(grid.cells):]
    assert [(c.method, c.seed, c.overrides["lr"], c.overrides["alpha"]) for c in extra] == [("ogm", 3, 0.2, 1.2), ("ogm", 4, 0.2, 1.2)]
    assert str(extra[0]) == "ogm on synthetic [tuned: lr=0.2, alpha=1.2] seed 3"
    assert tuned.tune is None and tuned.cells[:len(grid.cells)] == grid.cells
    # the study records the keys the defaults' and the tuned runs' records give (a variant
    # linking the defaults' key as the best, or the best without its values, fails here)
    from mmbalance.report_runs import cell_key
    from mmbalance.runner import run

    def key_of(cell):
        header = run(cell.method, cell.dataset, grid_mod.cell_config(cell, {"records": str(tmp_path / "runs"),
                                                                             "progress": "off"})).record["header"]
        return cell_key(header["config"], header.get("data_fingerprint"))

    ogm = optuna.load_study(study_name="ogm_1", storage=f"sqlite:///{tmp_path / 'runs' / tune.STUDIES / 'ogm_1.db'}")
    assert ogm.user_attrs[tune.BEST_CELL] == key_of(extra[0]) != ogm.user_attrs[tune.DEFAULTS_CELL]
    assert ogm.user_attrs[tune.DEFAULTS_CELL] == key_of(grid.cells[0]) and ogm.user_attrs["grid"] == "g"
