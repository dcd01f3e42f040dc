"""mmbalance tune: search ranges, the study (budget, resume after a kill, pruning), the honest
objective (test never read) and the reproduction of the best configuration."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest

from mmbalance import cli, records, tune
from mmbalance.config import Option, Search, SearchRangeError, config_hash, parse_value
from mmbalance.errors import ConfigError, MMBalanceError
from mmbalance.registry import DATASETS, METHODS
from mmbalance.runner import run

# a few seconds per study on 2 slow cores: 2-3 epochs of a small synthetic set
SMALL = {"n_train": 400, "n_test": 200, "epochs": 2, "device": "cpu"}


def _study(result: tune.TuneResult) -> optuna.Study:
    return optuna.load_study(study_name=result.name, storage=f"sqlite:///{result.db}")


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state.name in tune.FINISHED]


def _quiet(_text: str) -> None:
    pass


# ---- search ranges --------------------------------------------------------------------------------
@pytest.mark.parametrize(("declare", "match"), [
    (lambda: Search(1.0, 0.1), "low must be below high"),
    (lambda: Search(0.5, 0.5), "low must be below high"),
    (lambda: Search(0.0, 1.0, log=True), "log range needs low > 0"),
    (lambda: Search(1e-3, 1.0, log=True, step=0.1), "log range takes no step"),
    (lambda: Search(0.0, 1.0, step=0), "step must be a number > 0"),
    (lambda: Search(choices=("a",)), "at least two"),
    (lambda: Search(0.1, 1.0, choices=("a", "b")), "either choices or low/high"),
    (lambda: Search("0.1", 1.0), "'low' must be a number"),
    (lambda: Option(10, "epochs per estimate", min=1, search=Search(2.0, 20.0)), "integer"),
    (lambda: Option(10, "epochs per estimate", min=1, search=Search(2, 20, step=0.5)), "integer"),
    (lambda: Option("auto", "rule", choices=("auto", "fixed"), search=Search(choices=("auto", "keep"))),
     "'keep' not among the option's values 'auto', 'fixed'"),
    (lambda: Option(0.5, "a share", min=0, max=1, search=Search(0.1, 2.0)), r"2.0 is outside the option's range \(>= 0 and <= 1\)"),
    (lambda: Option(0.1, "a rate", min=0, min_open=True, search=Search(0.0, 1.0)), r"0.0 is outside the option's range \(> 0\)"),
    (lambda: Option("mlp", "encoder", search=Search(0.1, 1.0)), "non-numeric option"),
    (lambda: Option(True, "a flag", search=Search(choices=(True, "yes"))), "'yes' not among"),
    (lambda: Option(0.1, "a rate", search=(1e-4, 1.0)), r"declare it as a Search\(...\)"),
])
def test_a_search_range_declared_wrong_is_a_clear_error(declare, match) -> None:
    """Each wrong declaration fails where it is declared, naming the fault (variants: bounds
    reversed or equal, a log range through 0, a float range on an integer option, a choice the
    option refuses, a range past the option's min/max, a range on a text option)."""
    with pytest.raises(SearchRangeError, match=match):
        declare()


def test_every_declared_range_is_sampleable_and_the_key_methods_declare_theirs() -> None:
    declared = {(e.name, k) for e in METHODS.entries() for k, o in e.obj.options.items()
                if isinstance(o, Option) and o.search is not None}
    for key in [("ogm", "alpha"), ("pmr", "alpha"), ("pmr", "momentum_coef"), ("agm", "alpha"), ("mslr", "rule"),
                ("ogr_gb", "super_epoch"), ("reconboost", "recon_epochs_a"), ("reconboost", "recon_beta_init"),
                ("lfm", "alpha_schedule"), ("iprm", "alpha"), ("dgl", "alpha"), ("cggm", "cggm_rho"), ("cml", "lam")]:
        assert key in declared, key
    space = tune.search_space(DATASETS.get("synthetic"), METHODS.get("ogr_gb"))
    assert list(space)[:2] == ["lr", "weight_decay"]
    dist = tune.distribution(*space["super_epoch"])
    assert isinstance(dist, optuna.distributions.IntDistribution) and (dist.low, dist.high) == (2, 20)
    assert isinstance(tune.distribution(*space["lr"]), optuna.distributions.FloatDistribution)
    assert tune.distribution(*space["lr"]).log
    mslr = tune.search_space(DATASETS.get("synthetic"), METHODS.get("mslr"), fixed={"lr": 0.1})
    assert "lr" not in mslr  # a key the user sets is fixed, not searched
    assert isinstance(tune.distribution(*mslr["rule"]), optuna.distributions.CategoricalDistribution)


@pytest.mark.parametrize("value", [1e-05, 0.1, 3.0, 2.5e-7, 1e20, 10, True, "fixed"])
def test_reproduce_values_read_back_exactly(value) -> None:
    """PyYAML reads '1e-05' as text: the command writes '1.0e-05' (variant: plain repr failed)."""
    assert parse_value(tune.yaml_scalar(value)) == value
    assert type(parse_value(tune.yaml_scalar(value))) is type(value)


def test_the_objective_is_the_best_validation_accuracy_and_never_a_test_number() -> None:
    """Hand-made history (val 50, 70, 60; test 90, 10, 95): the objective is 70, the best-validation
    epoch's validation accuracy (variants: the last epoch's 60, a test number 95 or 10)."""
    from mmbalance.metrics import final_metrics

    def entry(epoch: int, val: float, test: float | None) -> dict:
        return {"epoch": epoch, "val": {"fused": {"acc": val}}, "test": None if test is None else {"fused": {"acc": test}}}

    for tests in ((90.0, 10.0, 95.0), (None, None, None)):
        history = [entry(i, v, t) for i, (v, t) in enumerate(zip((50.0, 70.0, 60.0), tests, strict=True))]
        assert tune.best_val_accuracy({"final": {"selection": final_metrics(history)}}) == 70.0
    assert set(final_metrics([entry(0, 50.0, None)])) == {"best_val", "last"}  # no test selection without test


def test_study_name_changes_with_the_base_configuration_not_with_searched_values(tmp_path) -> None:
    base = {**SMALL, "records": str(tmp_path)}
    a = tune.plan_study("ogm", "synthetic", base)
    assert a.name == tune.plan_study("ogm", "synthetic", dict(base)).name
    assert a.name != tune.plan_study("ogm", "synthetic", {**base, "epochs": 3}).name
    assert a.name != tune.plan_study("pmr", "synthetic", base).name
    assert a.name != tune.plan_study("ogm", "synthetic", {**base, "lr": 0.1}).name  # lr fixed: another space
    assert a.db == tmp_path / "studies" / f"{a.name}.db"


def test_tune_refuses_a_validation_split_that_is_the_test_split(tmp_path) -> None:
    with pytest.raises(ConfigError, match="validation split apart from test"):
        tune.plan_study("ogm", "synthetic", {**SMALL, "records": str(tmp_path), "val_fraction": 0})
    with pytest.raises(ConfigError, match="validation split apart from test"):
        tune.plan_study("ogm", "synthetic", {**SMALL, "records": str(tmp_path), "protocol": "paper"})


# ---- the trainer never reads test in a trial -----------------------------------------------------------
def test_a_run_with_eval_test_false_has_no_test_metrics_and_keeps_the_folders_of_ordinary_runs(tmp_path) -> None:
    """eval_test=false: no test entry in any epoch, no test selection, no diagnostics; the
    setting enters identity only when false (variant: always in identity renamed every run
    folder recorded before; never in identity let a trial's record stand for a full run)."""
    base = {**SMALL, "records": str(tmp_path), "progress": "off", "log_epochs": False}
    trial = run("concat", "synthetic", {**base, "eval_test": False, "diagnostics": True})
    assert all(e["test"] is None for e in trial.record["epochs"])
    assert set(trial.final) == {"best_val", "last"} and trial.final["best_val"]["test"] is None
    assert "diagnostics" not in trial.record["final"]
    full = run("concat", "synthetic", base)
    assert full.run_dir != trial.run_dir and full.final["best_val"]["test"] is not None
    assert full.final["best_val"]["val"] == trial.final["best_val"]["val"]  # test evaluation changes no training
    cfg = dict(full.config)
    assert config_hash(cfg) == config_hash({k: v for k, v in cfg.items() if k != "eval_test"})


def test_a_method_pass_over_test_is_refused_in_a_trial(tmp_path) -> None:
    from mmbalance.runner import make_trainer

    trainer = make_trainer("concat", "synthetic", {**SMALL, "records": str(tmp_path), "eval_test": False})
    trainer.setup()
    with pytest.raises(MMBalanceError, match="must never read test"):
        trainer.split("test")
    assert trainer.split("val") is trainer.splits.val


# ---- the study -------------------------------------------------------------------------------------
def test_two_methods_with_the_same_budget_get_the_same_number_of_trials(tmp_path) -> None:
    """The budget counts finished trials per study; asking again with the same budget adds
    none, a larger one adds only the difference (variant: counting trials started, or adding
    the budget on every call, failed the second and third checks)."""
    base = {**SMALL, "records": str(tmp_path)}
    for method in ("ogm", "mslr"):
        result = tune.tune(method, "synthetic", 3, base, say=_quiet)
        assert len(_finished(_study(result))) == 3, method
        assert _study(result).trials[0].user_attrs.get("defaults")  # the defaults run first
        assert len(_finished(_study(tune.tune(method, "synthetic", 3, base, say=_quiet)))) == 3
    result = tune.tune("ogm", "synthetic", 4, base, say=_quiet)
    assert len(_study(result).trials) == 4


def test_a_pruned_trial_is_recorded_as_pruned_and_its_run_left_resumable(tmp_path) -> None:
    """After one complete trial at the defaults, a trial at lr 1e-4 is below the median after
    its first epoch: PRUNED in the study, its run folder checkpointed and not DONE (variants:
    reporting the epoch after the check, or the test accuracy, left it COMPLETE)."""
    base = {**SMALL, "epochs": 3, "records": str(tmp_path)}
    result = tune.tune("concat", "synthetic", 2, base, prune_startup=1,
                       enqueue=[{"lr": 1e-4, "weight_decay": 1e-4}], say=_quiet)
    first, second = _study(result).trials
    assert first.state.name == "COMPLETE" and second.state.name == "PRUNED"
    assert second.intermediate_values[0] < first.intermediate_values[0]
    assert second.user_attrs["pruned_after_epoch"] == 1
    run_dir = Path(second.user_attrs["run_dir"])
    assert (run_dir / records.CHECKPOINT).is_file() and not records.is_done(run_dir)
    assert len(records.load_record(run_dir)["epochs"]) == 1  # stopped right after the epoch it failed
    assert result.counts == {"COMPLETE": 1, "PRUNED": 1}


def _write_features(root: Path, scramble_test: bool) -> None:
    rng = np.random.default_rng(0)
    n_train, n_test, k = 240, 90, 3
    y = np.arange(n_train) % k
    centers_a, centers_b = rng.normal(size=(k, 8)), rng.normal(size=(k, 6))
    train = {"a": centers_a[y] + rng.normal(size=(n_train, 8)), "b": centers_b[y] + 2 * rng.normal(size=(n_train, 6)),
             "label": y}
    yt = np.arange(n_test) % k
    test = {"a": centers_a[yt] + rng.normal(size=(n_test, 8)), "b": centers_b[yt] + 2 * rng.normal(size=(n_test, 6)),
            "label": yt}
    if scramble_test:  # other features, other labels: a search that read test would change
        other = np.random.default_rng(1)
        test = {"a": other.normal(size=(n_test, 8)) * 5, "b": other.normal(size=(n_test, 6)),
                "label": other.permutation(yt)}
    root.mkdir(parents=True)
    np.savez(root / "train.npz", **{k_: v.astype(np.float32) if k_ != "label" else v for k_, v in train.items()})
    np.savez(root / "test.npz", **{k_: v.astype(np.float32) if k_ != "label" else v for k_, v in test.items()})


def test_test_data_never_enters_the_objective(tmp_path) -> None:
    """The same study on data whose test split is replaced (features and labels) gives the same
    values, pruning decisions and sampled parameters, and no trial record holds a test metric
    (variants: an objective reading the best_test selection, or test accuracy reported to the
    pruner, changed the values here)."""
    studies = []
    for scramble in (False, True):
        root = tmp_path / ("scrambled" if scramble else "clean")
        _write_features(root, scramble)
        base = {"data_root": str(root), "epochs": 3, "batch_size": 32, "records": str(tmp_path / f"runs-{scramble}"),
                "device": "cpu"}
        result = tune.tune("ogm", "features", 4, base, prune_startup=2, say=_quiet)
        studies.append(_study(result))
        for t in studies[-1].trials:
            rec = records.load_record(Path(t.user_attrs["run_dir"]))
            assert all(e["test"] is None for e in rec["epochs"])
    clean, scrambled = studies
    assert clean.study_name != scrambled.study_name  # other data: another study, yet ...
    assert [t.params for t in clean.trials] == [t.params for t in scrambled.trials]
    assert [t.value for t in clean.trials] == [t.value for t in scrambled.trials]
    assert [t.state for t in clean.trials] == [t.state for t in scrambled.trials]
    assert [t.intermediate_values for t in clean.trials] == [t.intermediate_values for t in scrambled.trials]


def test_the_best_configuration_rerun_reproduces_its_validation_accuracy(tmp_path, capsys) -> None:
    """The printed command, run as it is, trains the best trial's configuration with test
    evaluation: the same best validation accuracy, now with test metrics."""
    base = {**SMALL, "records": str(tmp_path)}
    result = tune.tune("pmr", "synthetic", 3, base, say=_quiet)
    argv = shlex.split(result.command)
    assert argv[:2] == ["mmbalance", "run"]
    assert cli.main([*argv[1:], "--set", "progress=off", "--quiet"]) == 0
    out = capsys.readouterr().out
    run_dir = Path(out.strip().splitlines()[-1].removeprefix("record: ")).parent
    rec = records.load_record(run_dir)
    chosen = rec["final"]["selection"]["best_val"]
    assert chosen["val"]["fused"]["acc"] == pytest.approx(result.best_value, abs=0)
    assert chosen["test"] is not None and run_dir != Path(result.best_run_dir)


def _trials_in(db: Path) -> list[tuple[int, str, bool]]:
    """(number, state, whether its run folder holds a checkpoint) of each trial, read with plain
    sqlite3: an Optuna storage opened here would race the writer creating the new database."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        rows = con.execute("SELECT t.number, t.state, a.value_json FROM trials t LEFT JOIN trial_user_attributes a "
                           "ON a.trial_id = t.trial_id AND a.key = 'run_dir'").fetchall()
    return [(n, state, bool(run) and (Path(json.loads(run)) / records.CHECKPOINT).is_file()) for n, state, run in rows]


def _poll(db: Path, until, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    """Wait until ``until(trials)`` holds in the study a running process writes."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the tune process ended before the kill: {proc.stderr.read().decode()[-2000:]}")
        try:
            if db.is_file() and until(_trials_in(db)):
                return
        except sqlite3.OperationalError:  # no tables yet, or the writer holds the lock
            pass
        time.sleep(0.05)
    raise AssertionError("the study never reached the state to kill it in")


def test_a_killed_study_resumes_with_no_trial_lost_or_repeated(tmp_path) -> None:
    """SIGKILL mid-trial (its run checkpointed, not finished), then the same call: the killed
    trial is re-asked with its values and its run resumes from the checkpoint; the study ends
    with exactly the budget of finished trials, each set of values once (variants: not
    re-asking left a FAIL and lost its values; reseeding the sampler as on the first start
    drew the first trials' values again)."""
    trials = 5
    base = {**SMALL, "n_train": 3000, "epochs": 4, "records": str(tmp_path)}
    plan = tune.plan_study("ogm", "synthetic", base)
    argv = [sys.executable, "-m", "mmbalance.cli", "tune", "--method", "ogm", "--dataset", "synthetic",
            "--trials", str(trials), "--records", str(tmp_path), "--epochs", "4", "--device", "cpu",
            "--set", "n_train=3000", "--set", "n_test=200", "--prune-startup", "99"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})

    def mid_trial(trials: list[tuple[int, str, bool]]) -> bool:
        states = [state for _, state, _ in trials]
        return states.count("COMPLETE") >= 2 and any(state == "RUNNING" and ckpt for _, state, ckpt in trials)

    try:
        _poll(plan.db, mid_trial, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    study = optuna.load_study(study_name=plan.name, storage=plan.storage_url)
    killed = [t for t in study.trials if t.state.name == "RUNNING"]
    assert len(killed) == 1
    killed_run = Path(killed[0].user_attrs["run_dir"])
    assert not records.is_done(killed_run)

    lines: list[str] = []
    tune.tune("ogm", "synthetic", trials, base, say=lines.append)
    assert f"re-asking 1 left running by a killed process ({killed[0].number})" in lines[0]
    study = optuna.load_study(study_name=plan.name, storage=plan.storage_url)
    finished = _finished(study)
    assert len(finished) == trials
    assert [t.state.name for t in study.trials].count("FAIL") == 1
    values = [tuple(sorted(t.params.items())) for t in finished]
    assert len(set(values)) == trials  # none repeated
    assert tuple(sorted(killed[0].params.items())) in values  # none lost
    retried = next(t for t in finished if t.system_attrs.get("failed_trial") == killed[0].number)
    assert retried.user_attrs["run_dir"] == str(killed_run) and records.is_done(killed_run)
    rec = records.load_record(killed_run)
    assert rec["header"].get("resumed_from_epoch", 0) >= 1  # resumed, not retrained


def test_a_trial_over_several_seeds_scores_the_mean_of_their_best_validation_accuracies(tmp_path) -> None:
    """seeds=[0, 1]: one run per seed, the value is the mean of their best validation accuracies,
    and the pruner sees step seed_index * epochs + epoch (variant: the last seed's score alone,
    or both seeds reported at the same steps, failed here)."""
    base = {**SMALL, "records": str(tmp_path)}
    result = tune.tune("concat", "synthetic", 1, base, seeds=[0, 1], say=_quiet)
    (trial,) = _study(result).trials
    runs = [records.load_record(Path(d)) for d in trial.user_attrs["run_dir"]]
    assert [r["header"]["config"]["seed"] for r in runs] == [0, 1]
    best = [tune.best_val_accuracy(r) for r in runs]
    assert trial.value == pytest.approx(sum(best) / 2) and best[0] != best[1]
    assert sorted(trial.intermediate_values) == [0, 1, 2, 3]
    assert trial.intermediate_values[3] == runs[1]["epochs"][1]["val"]["fused"]["acc"]
    assert result.name != tune.tune("concat", "synthetic", 1, base, say=_quiet).name  # one seed: another study


def test_mmbalance_plot_draws_each_study_history_and_importances(tmp_path, capsys) -> None:
    """A tuned records folder (trial runs only, which reports leave out) gets Optuna's optimisation
    history and parameter importances per study; a study with one complete trial gets its
    history and a named reason instead of importances."""
    from mmbalance.plots import plot_main

    tune.tune("ogm", "synthetic", 3, {**SMALL, "records": str(tmp_path / "a")}, say=_quiet, prune_startup=99)
    assert plot_main(str(tmp_path / "a"), str(tmp_path / "pics")) == 0
    pngs = sorted(p.name for p in (tmp_path / "pics").glob("*.png"))
    assert len(pngs) == 2 and pngs[0].endswith("_history.png") and pngs[1].endswith("_importances.png")
    assert all((tmp_path / "pics" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    tune.tune("concat", "synthetic", 1, {**SMALL, "records": str(tmp_path / "b")}, say=_quiet)
    capsys.readouterr()
    assert plot_main(str(tmp_path / "b"), str(tmp_path / "pics-b")) == 0
    out = capsys.readouterr().out
    assert "_history.png" in out and "skipped importances of study" in out and "needs 2 complete trial(s)" in out


def test_jobs_split_the_budget_between_worker_processes_on_one_study(tmp_path) -> None:
    """--jobs 2: two spawned processes share the remaining budget of one study: exactly the
    budget of finished trials, run by two workers, no set of values twice (variant: every
    worker given the whole budget overshot it; workers seeded alike drew the same values)."""
    base = {**SMALL, "records": str(tmp_path)}
    result = tune.tune("ogm", "synthetic", 5, base, jobs=2, prune_startup=99, say=_quiet)
    finished = _finished(_study(result))
    states = [(t.number, t.state.name, t.params, t.user_attrs.get("worker")) for t in _study(result).trials]
    assert len(finished) == 5 == len(states), states
    assert len({t.user_attrs["worker"] for t in finished}) == 2
    assert len({tuple(sorted(t.params.items())) for t in finished}) == 5


def test_a_trial_record_is_shown_not_called_damaged_but_a_full_run_without_test_still_is(tmp_path) -> None:
    """A trial's record (eval_test=false) passes the record check and `mmbalance show` says what
    it is; the same record claiming eval_test=true is damaged (variant: accepting a missing test
    table for every record let a cut record through)."""
    import copy

    from mmbalance.show import render

    trial = run("concat", "synthetic", {**SMALL, "records": str(tmp_path), "eval_test": False, "progress": "off",
                                        "log_epochs": False})
    records.check_record(trial.record)
    assert "the test split was never evaluated" in render(trial.run_dir)
    claimed = copy.deepcopy(trial.record)
    claimed["header"]["config"]["eval_test"] = True
    with pytest.raises(records.RecordError, match="selection rule '(last|best_val)' test is NoneType"):
        records.check_record(claimed)


# ---- conditional search spaces ---------------------------------------------------------------------
def _sampled(space, fixed, n=40):
    """The params of ``n`` trials asked from an in-memory TPE study (values drawn, nothing trained)."""
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), direction="maximize")
    out = []
    for i in range(n):
        trial = study.ask()
        params = tune.suggest(trial, space, fixed)
        study.tell(trial, float(i % 7))
        out.append(params)
    return out


def test_a_conditional_option_is_sampled_only_when_its_condition_holds() -> None:
    """LFM's exp_rate acts only under alpha_schedule=exp: searched with the schedule, it is in a
    trial's values exactly when the schedule drawn is exp; with the schedule fixed by the user it
    is always (exp) or never (fitted) sampled; the defaults trial leaves it out unless the
    configured schedule is exp. Variants caught: a conditional option sampled regardless; the
    condition read from the configured value instead of the value just drawn."""
    lfm = METHODS.get("lfm")
    assert lfm.options["exp_rate"].search.when == (("alpha_schedule", ("exp",)),)
    space = tune.search_space(DATASETS.get("synthetic"), lfm)
    drawn = _sampled(space, {"alpha_schedule": "fitted", "exp_rate": 0.3})
    schedules = {p["alpha_schedule"] for p in drawn}
    assert schedules == {"fitted", "exp", "learnable"}
    for p in drawn:
        assert ("exp_rate" in p) == (p["alpha_schedule"] == "exp"), p
    for schedule, expect in (("exp", True), ("fitted", False)):
        fixed_space = tune.search_space(DATASETS.get("synthetic"), lfm, fixed={"alpha_schedule": schedule})
        assert all(("exp_rate" in p) is expect for p in _sampled(fixed_space, {"alpha_schedule": schedule}, 6))
    assert "exp_rate" not in tune.default_params({"alpha_schedule": "fitted", "exp_rate": 0.3, "lr": 0.01}, space)
    assert tune.default_params({"alpha_schedule": "exp", "exp_rate": 0.3, "lr": 0.01}, space)["exp_rate"] == 0.3


def test_a_dependent_option_declared_first_is_still_sampled_after_what_it_depends_on() -> None:
    """Order follows the dependency, not the declaration."""
    space = {"rate": (Search(0.1, 1.0, when={"mode": ("b",)}), Option(0.5, "rate", min=0)),
             "mode": (Search(choices=("a", "b")), Option("a", "mode", choices=("a", "b")))}
    for p in _sampled(space, {"mode": "a", "rate": 0.5}, 20):
        assert ("rate" in p) == (p["mode"] == "b")


@pytest.mark.parametrize(("when", "match"), [
    ({"alpha_shedule": ("exp",)}, "depends on 'alpha_shedule', which is no option here"),
    ({"alpha_schedule": ("exponential",)}, "alpha_schedule being 'exponential', not among its values"),
    ({"loss_scale": (1.0,)}, "'loss_scale', which has no fixed values"),
    ({"exp_rate": (0.3,)}, "which is itself"),
])
def test_a_condition_naming_a_wrong_option_or_value_fails_where_the_plugin_registers(when, match) -> None:
    """Validated where declared: registering a method whose search condition names a typo, a
    value outside the option's choices, a numeric option or itself is a SearchRangeError naming it."""
    from mmbalance.registry import Registry

    lfm = METHODS.get("lfm")
    options = {**lfm.options, "exp_rate": Option(0.3, "rate", min=0.0, search=Search(0.05, 1.0, log=True, when=when))}
    cls = type("BadLFM", (lfm,), {"options": options})
    with pytest.raises(SearchRangeError, match=match):
        Registry("method", "methods", "mmbalance.test").register("badlfm")(cls)


@pytest.mark.parametrize(("when", "match"), [("exp", "give a mapping of option names"), ({"a": "exp"}, "must be a tuple or list"),
                                             ({"a": ()}, "at least one value")])
def test_a_malformed_condition_is_refused(when, match) -> None:
    with pytest.raises(SearchRangeError, match=match):
        Search(0.1, 1.0, when=when)


def test_the_condition_is_part_of_the_study_s_space_key_and_its_docs_text() -> None:
    opt = Option(0.3, "rate", min=0.0)
    plain, cond = Search(0.05, 1.0, log=True), Search(0.05, 1.0, log=True, when={"alpha_schedule": ["exp"]})
    assert cond.text() == "log 0.05 .. 1, when alpha_schedule is exp" and plain.text() == "log 0.05 .. 1"
    names = {tune.study_name("lfm", "synthetic", {"epochs": 2}, {"exp_rate": (s, opt)}, None) for s in (plain, cond)}
    assert len(names) == 2


def test_a_range_without_a_condition_keeps_the_study_key_it_had_before_conditions() -> None:
    """The key hashes each range's text: a new field shown for every range (``when=None``)
    would rename every existing study, and a resumed grid would start them all again. The
    value is the key this space had before conditions existed (variant: the dataclass's own
    repr with when=None failed here)."""
    opt = Option(0.3, "rate", min=0.0)
    space = {"exp_rate": (Search(0.05, 1.0, log=True), opt),
             "mode": (Search(choices=("a", "b")), Option("a", "m", choices=("a", "b")))}
    assert tune.study_name("lfm", "synthetic", {"epochs": 2}, space, {"f": "x"}) == "lfm_synthetic_b6e0da4f61"


def test_the_reproduce_line_gives_a_list_setting_as_set_reads_it() -> None:
    """``--set modalities=zer,mor``, not a quoted Python list (variant: str(list) failed here)."""
    line = tune.reproduce_command("concat", "mfeat", {"modalities": ["zer", "mor"], "lr": 1e-05})
    assert line == "mmbalance run --method concat --dataset mfeat --set modalities=zer,mor --set lr=1.0e-05"
    assert parse_value(tune.yaml_scalar([1, 2])) == [1, 2]
    assert parse_value(tune.yaml_scalar(["a", "true"])) == ["a", "true"]


def test_a_diverged_trial_is_pruned_with_its_reason_and_the_study_goes_on(tmp_path, capsys) -> None:
    """A configuration whose loss goes non-finite is an outcome of the values drawn: the trial
    is PRUNED (counted in the budget) with the divergence recorded, and the next trial runs
    (variant: letting the error through ended the whole study, and with it a tuned grid)."""
    base = {**SMALL, "records": str(tmp_path)}
    lines: list[str] = []
    result = tune.tune("concat", "synthetic", 2, {**base, "lr": 1e6}, say=lines.append,
                       enqueue=[{"weight_decay": 1e-4}])
    first, second = _study(result).trials
    assert first.state.name == "PRUNED" and first.user_attrs["diverged"].startswith("Training diverged in epoch")
    assert second.state.name == "PRUNED" and result.counts == {"PRUNED": 2} and result.best_value is None
    assert "trial 0: weight_decay=0.0001 -> pruned: training diverged in epoch" in capsys.readouterr().out


def test_a_trial_that_failed_is_asked_again_with_its_values_when_the_study_resumes(tmp_path, monkeypatch, capsys) -> None:
    """The defaults trial raising (a crash) stops the study with that trial FAIL; the resumed
    study asks its values again (the defaults, marked so), and the budget counts only finished
    trials (variant: not re-asking lost the defaults trial for good)."""
    from mmbalance.engine.loop import Trainer

    real_fit = Trainer.fit

    def crash(self, *args, **kwargs):
        raise RuntimeError("injected crash")

    base = {**SMALL, "records": str(tmp_path)}
    monkeypatch.setattr(Trainer, "fit", crash)
    with pytest.raises(RuntimeError, match="injected crash"):
        tune.tune("concat", "synthetic", 2, base, say=_quiet)
    monkeypatch.setattr(Trainer, "fit", real_fit)
    lines: list[str] = []
    result = tune.tune("concat", "synthetic", 2, base, say=lines.append)
    trials = _study(result).trials
    assert [t.state.name for t in trials][0] == "FAIL" and "re-asking 1 that failed (0)" in lines[0]
    again = trials[1]
    assert again.params == trials[0].params and again.user_attrs.get("defaults") is True
    assert again.system_attrs["failed_trial"] == 0 and again.state.name == "COMPLETE"
    assert sum(t.state.name in tune.FINISHED for t in trials) == 2


def test_values_the_method_refuses_use_up_their_trial_and_the_study_goes_on(tmp_path, monkeypatch, capsys) -> None:
    """LFM's learnable schedule drawn on a small training split holds out too few samples and is
    refused when the run starts: that trial is pruned with the refusal as its reason and the
    study reaches its budget. Wrong variant caught: the refusal escaping the objective (it ended
    the tuned grid at LFM on cremad-joint)."""
    from mmbalance.engine.loop import Trainer
    from mmbalance.errors import ConfigError

    real = Trainer.fit

    def refuse_fast(self):
        if self.cfg["lr"] > 0.01:
            raise ConfigError("Method 'x' refuses this learning rate here.")
        return real(self)

    monkeypatch.setattr(Trainer, "fit", refuse_fast)
    result = tune.tune("concat", "synthetic", 4, {**SMALL, "records": str(tmp_path)}, say=_quiet, prune_startup=99)
    trials = _finished(_study(result))
    refused = [t for t in trials if t.user_attrs.get("refused")]
    assert len(trials) == 4 and refused and all(t.state.name == "PRUNED" for t in refused)
    assert "pruned: refused (Method 'x' refuses this learning rate here.)" in capsys.readouterr().out
    assert result.best_value is not None and result.best_params["lr"] <= 0.01


def _pop_all(plan, out) -> None:  # a spawned process: start every waiting trial it can
    study = tune.open_study(plan)
    got = []
    while (tid := study._pop_waiting_trial_id()) is not None:
        got.append(tid)
    out.put(got)


def test_two_workers_never_start_the_same_waiting_trial(tmp_path) -> None:
    """Workers popping one study's queued trials at the same moment each start a different one
    (SQLite ignores the row lock Optuna relies on; the storage serialises state changes with a
    file lock). Wrong variant caught, not on every run (it is a race): the plain RDBStorage, under
    which both workers of a tuned grid ran the defaults trial and one died on its locked run."""
    import multiprocessing as mp

    plan = tune.plan_study("concat", "synthetic", {**SMALL, "records": str(tmp_path)})
    study = tune.open_study(plan)
    for i in range(60):
        study.enqueue_trial({"lr": 0.001 * (i + 1)}, skip_if_exists=False)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_pop_all, args=(plan, out)) for _ in range(3)]
    for p in procs:
        p.start()
    got = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    started = [t for g in got for t in g]
    assert len(started) == 60 and len(set(started)) == 60
    assert Path(str(plan.db) + ".lock").exists()
