"""The defaults table and the tuned table side by side, from hand-made records: real tiny runs
and studies written the way a tuned grid leaves them (user attributes naming the defaults' and
the best configuration's cell keys, and the budget)."""

from __future__ import annotations

import re
import warnings

import optuna
import pandas as pd
import pytest

from mmbalance import records, tune
from mmbalance.leaderboard import write_leaderboard
from mmbalance.paper_tables import write_benchmark
from mmbalance.report_runs import cell_key
from mmbalance.runner import run

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

BASE = {"progress": "off", "epochs": 2, "n_train": 240, "n_test": 120, "log_epochs": False}


def _key(result) -> str:
    header = records.load_record(result.run_dir)["header"]
    return cell_key(header["config"], header.get("data_fingerprint"))


def _study(root, name: str, method: str, defaults: str, best: str, finished: int, seeds=(0,), budget=None) -> None:
    """A study as tune.record_protocol and tune.link_grid_cells leave it, with ``finished``
    trials (the last one pruned) and one still running."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = root / tune.STUDIES / f"{name}.db"
    db.parent.mkdir(exist_ok=True)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{db}", direction="maximize")
    dist = {"lr": optuna.distributions.FloatDistribution(1e-3, 1.0, log=True)}
    for i in range(finished):
        state = optuna.trial.TrialState.PRUNED if i == finished - 1 else optuna.trial.TrialState.COMPLETE
        study.add_trial(optuna.create_trial(state=state, value=None if state.name == "PRUNED" else 50.0 + i,
                                            params={"lr": 0.01 * (i + 1)}, distributions=dist,
                                            intermediate_values={0: 40.0}))
    study.enqueue_trial({"lr": 0.5})  # waiting: not finished, not counted
    attrs = {"method": method, "dataset": "synthetic", "budget": budget or finished, "seeds": list(seeds),
             "sampler": "TPE", "pruner": "median pruner (startup 5 trials, warm-up 0 steps)",
             "objective": "best validation accuracy of the fused prediction", tune.DEFAULTS_CELL: defaults, tune.BEST_CELL: best, "grid": "g"}
    for k, v in attrs.items():
        study.set_user_attr(k, v)


@pytest.fixture(scope="module")
def tuned_records(tmp_path_factory):
    """concat: defaults and a tuned lr (study concat_synthetic_a, 4 trials); ogm: its best is
    its defaults (study ogm_synthetic_b, 4 trials); sum: never tuned; sum with lr=0.02 and sum
    with weight_decay=0.003 (a label with an underscore): ordinary rows that merely differ from the
    defaults, never called tuned."""
    root = tmp_path_factory.mktemp("tuned")
    base = {**BASE, "records": str(root)}
    runs = {}
    for name, method, extra in (("concat", "concat", {}), ("concat_tuned", "concat", {"lr": 0.02}),
                                ("ogm", "ogm", {}), ("sum", "sum", {}), ("sum_lr", "sum", {"lr": 0.02}),
                                ("sum_wd", "sum", {"weight_decay": 0.003})):
        runs[name] = [run(method, "synthetic", {**base, **extra, "seed": s}) for s in (0, 1)]
    keys = {k: _key(v[0]) for k, v in runs.items()}
    _study(root, "concat_synthetic_a", "concat", keys["concat"], keys["concat_tuned"], 4)
    _study(root, "ogm_synthetic_b", "ogm", keys["ogm"], keys["ogm"], 4)
    return root, runs


def _acc(results) -> pd.Series:
    return pd.Series([r.record["final"]["selection"]["best_val"]["test"]["fused"]["acc"] for r in results])


def _pm(values: pd.Series) -> str:
    return f"{values.mean():.2f} ± {values.std():.2f}"


def _section(md: str) -> tuple[str, dict[str, list[str]]]:
    section = md.split("## Defaults and tuned, rule `best_val`")[1].split("\n## ")[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = dict(zip(head, cells, strict=True))
    return section, rows


def test_a_tuned_row_stands_beside_its_defaults_and_an_untuned_method_shows_a_dash(tuned_records, tmp_path):
    """Per method: the defaults' mean ± sd, the tuned mean ± sd (the runs the study's best_cell
    names), the difference and both average ranks. Variants caught here: the tuned column
    taking the defaults' runs (defaults_cell for best_cell); a run that merely differs from the
    defaults (sum, lr=0.02) called tuned; the tuned runs left in the defaults' table as a row of
    their own; the tuned ranking ignoring the tuned values."""
    root, runs = tuned_records
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md_path, csv_path = write_leaderboard(root, tmp_path, "lb", rules=("best_val",), pictures=False)
    md = md_path.read_text()
    _, rows = _section(md)
    d, t = _acc(runs["concat"]), _acc(runs["concat_tuned"])
    concat = rows["Concat"]
    assert concat["synthetic: defaults"] == _pm(d) and concat["synthetic: tuned"] == _pm(t)
    assert concat["synthetic: Δ"] == f"{t.mean() - d.mean():+.2f}"
    ogm = rows["OGM-GE"]  # its best was its defaults: the same runs on both sides
    assert ogm["synthetic: defaults"] == ogm["synthetic: tuned"] == _pm(_acc(runs["ogm"]))
    assert ogm["synthetic: Δ"] == "+0.00"
    assert rows["Sum"]["synthetic: tuned"] == "–" and rows["Sum"]["synthetic: Δ"] == "–"
    lr_row = next(k for k in rows if k.startswith("Sum (") and "lr=0.02" in k)
    assert lr_row == "Sum (lr=0.02)"
    assert rows[lr_row]["synthetic: tuned"] == "–" and rows[lr_row]["synthetic: defaults"] == _pm(_acc(runs["sum_lr"]))
    # ranks by hand: defaults of all four rows, then concat's tuned mean in place of its defaults
    uni = "Sum (weight\\_decay=0.003)"  # as markdown escapes it
    means = {"Concat": d.mean(), "OGM-GE": _acc(runs["ogm"]).mean(), "Sum": _acc(runs["sum"]).mean(),
             lr_row: _acc(runs["sum_lr"]).mean(), uni: _acc(runs["sum_wd"]).mean()}
    expect = pd.Series(means).round(10).rank(ascending=False, method="average")
    tuned_means = pd.Series({**means, "Concat": t.mean()}).round(10).rank(ascending=False, method="average")
    for label in means:
        assert rows[label]["rank, defaults"] == f"{expect[label]:.2f}"
        assert rows[label]["rank, tuned"] == f"{tuned_means[label]:.2f}"
    # the defaults' tables hold no row for the tuned configuration; the CSV names its study
    main = md.split("## Defaults and tuned")[0]
    labels = {ln.strip("|").split("|")[0].strip() for ln in main.splitlines() if ln.startswith("| ")}
    assert labels == {"method", "Concat", "OGM-GE", "Sum", lr_row, uni} and rows[uni]["synthetic: tuned"] == "–"
    df = pd.read_csv(csv_path, keep_default_na=False)
    assert sorted(df[df.tuned_study == "concat_synthetic_a"].seed) == [0, 1]
    assert set(df[df.tuned_study == "concat_synthetic_a"].run_dir) == {
        str(r.run_dir.relative_to(root)) for r in runs["concat_tuned"]}


def test_the_caption_names_the_budget_from_the_studies_records(tuned_records, tmp_path):
    """Trials finished per study (complete + pruned, a waiting trial not counted), the budget
    asked for, the seeds each trial trains, the sampler, the pruner, and that test is never
    read. Variant caught: counting every trial of the study (the waiting one too)."""
    root, _ = tuned_records
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md = write_leaderboard(root, tmp_path, "lb", rules=("best_val",), pictures=False)[0].read_text()
    section, _ = _section(md)
    assert "4 finished trials per method × setting (budget 4), 2 studies" in section
    assert "each trial trains seed(s) 0" in section and "sampler TPE, median pruner (startup 5 trials" in section
    assert "objective: best validation accuracy of the fused prediction" in section
    assert "test split is never read" in section and "WARNING" not in section


def test_unequal_budgets_are_a_warning_in_the_caption_naming_each_study(tmp_path):
    """A study with fewer finished trials: the caption says the budgets are not equal and names
    each study with its count. Variant caught: the budget read from one study only (the first)
    and printed for all."""
    root = tmp_path / "runs"
    base = {**BASE, "records": str(root), "seed": 0}
    concat, tuned, ogm = (run("concat", "synthetic", base), run("concat", "synthetic", {**base, "lr": 0.02}),
                          run("ogm", "synthetic", base))
    _study(root, "concat_synthetic_a", "concat", _key(concat), _key(tuned), 5)
    _study(root, "ogm_synthetic_b", "ogm", _key(ogm), _key(ogm), 3, seeds=(0, 1), budget=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md = write_leaderboard(root, tmp_path / "out", "lb", rules=("best_val",), pictures=False)[0].read_text()
    section, _ = _section(md)
    assert "3 to 5 finished trials per method × setting" in section
    assert "WARNING: the budgets are NOT equal" in section
    assert re.search(r"concat\\?_synthetic\\?_a: 5 finished of 5, seeds 0", section)
    assert re.search(r"ogm\\?_synthetic\\?_b: 3 finished of 5, seeds 0,1", section)


def test_the_tuned_table_in_latex_and_in_the_paper_layout(tuned_records, tmp_path):
    """LaTeX: labels and the caption escaped (the study names' underscores, ±, Δ and the dash
    as LaTeX), the paper layout shows the same section beside its tables."""
    root, runs = tuned_records
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = write_leaderboard(root, tmp_path, "lb", rules=("best_val",), pictures=False, latex=True)
        paper = write_benchmark(root, tmp_path, "bench", pictures=False, latex=True)
    tex = files.latex[0].read_text()
    part = tex.split("label{tab:tuned-best-val}")[0].rsplit("\\begin{table}", 1)[1] + tex.split("label{tab:tuned-best-val}")[1]
    assert "synthetic: $\\Delta$" in part and "$\\pm$" in part and "--" in part
    assert "±" not in part and "Δ" not in part and "–" not in part and "×" not in part
    caption = part.split("\\caption{")[1].split("}\n")[0]
    assert "rule best\\_val" in caption and "eval\\_test=false" in caption and "$\\times$ setting" in caption
    assert re.search(r"(?<!\\)_", caption) is None  # every underscore escaped
    assert "Sum (weight\\_decay=0.003) & " in part  # row labels too
    d, t = _acc(runs["concat"]), _acc(runs["concat_tuned"])
    assert f"{d.mean():.2f} $\\pm$ {d.std():.2f} & {t.mean():.2f} $\\pm$ {t.std():.2f}" in part
    bench_md = next(p for p in paper if p.name == "bench.md").read_text()
    _, rows = _section(bench_md)
    assert rows["Concat"]["synthetic: tuned"] == _pm(t)
    assert "tab:tuned-best-val" in next(p for p in paper if p.suffix == ".tex").read_text()


def test_records_without_linked_studies_give_no_tuned_section(tmp_path):
    """A study of ``mmbalance tune`` alone (no defaults' cell recorded) adds nothing."""
    root = tmp_path / "runs"
    r = run("concat", "synthetic", {**BASE, "records": str(root), "seed": 0})
    _study(root, "concat_synthetic_a", "concat", "", _key(r), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md = write_leaderboard(root, tmp_path / "out", "lb", rules=("best_val",), pictures=False)[0].read_text()
    assert "Defaults and tuned" not in md and "| Concat" in md


def test_a_study_whose_defaults_all_failed_names_its_row_by_the_method_label(tmp_path):
    """AMCo's defaults diverged on every seed of cremad-joint, so only its tuned runs exist: the
    tuned value stands in the method's row ("Weight" here), with no defaults beside it. Wrong
    variant caught: the row named by the registry name ("weight"), a second row for one method."""
    base = {**BASE, "records": str(tmp_path)}
    tuned = [run("weight", "synthetic", {**base, "lr": 0.02, "seed": s}) for s in (0, 1)]
    _study(tmp_path, "weight_synthetic_c", "weight", "0" * 12, _key(tuned[0]), 4)
    # the same method at its defaults on another setting, and a variant with its own settings
    run("weight", "synthetic", {**base, "n_train": 200, "seed": 0})
    run("weight", "synthetic", {**base, "n_train": 200, "unimodal_loss": True, "seed": 0})
    write_leaderboard(tmp_path, tmp_path / "out", name="t", rules=["best_val"], pictures=False)
    md = (tmp_path / "out" / "t.md").read_text()
    _, rows = _section(md)
    assert "Weight" in rows and "weight" not in rows and not any("lr=" in r for r in rows)
    cells = list(rows["Weight"].values())
    assert cells[1] == "–" and cells[2] == _pm(_acc(tuned))
