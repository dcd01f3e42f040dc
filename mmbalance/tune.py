"""``mmbalance tune``: one method on one dataset, searched on validation with a fixed budget.

A study is an Optuna study (TPE sampler with a fixed seed, median pruner on each epoch's
validation accuracy) over the search ranges the options declare (``Option.search``): the
trainer's learning rate and weight decay and the method's key hyper-parameters. Its objective is
the best validation accuracy of an honest run; every trial runs with ``eval_test=false``, so the
test split is never evaluated, its metrics never exist, and a method asking for a pass over it is
refused. Each trial is an ordinary recorded run (base settings + sampled values, keyed like every
run): a configuration sampled twice reuses its record, a trial stopped by the pruner leaves its
run folder resumable (no DONE).

The study lives in ``<records>/studies/<method>_<dataset>_<key>.db`` (SQLite), named from
everything that is not searched (the resolved settings that change results, the data
fingerprint and the search space), so another base configuration is another study. A study
resumes after a kill: a trial left RUNNING by a dead process of this host (or, on another host,
one whose heartbeat stopped) is marked failed and re-asked with the same values, and its run
resumes from its last checkpoint; the budget counts finished trials (complete or pruned), so
no trial is lost or run twice. The first trial of a new study is the defaults (each searched
key's configured value where it lies in its range), so the best found is never below them on
validation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from mmbalance.config import Option, Search, declared_options, identity
from mmbalance.errors import ConfigError, MMBalanceError, TrainingDiverged, UnsupportedError

#: What every trial adds to the base settings: no test evaluation (the search must not see
#: test), no diagnostics (they score test), no per-epoch lines (the study prints its own).
TRIAL_SETTINGS: dict[str, Any] = {"eval_test": False, "diagnostics": False, "progress": "off", "log_epochs": False}
STUDIES = "studies"
FINISHED = ("COMPLETE", "PRUNED")
HEARTBEAT_S = 30  # a trial whose process stopped beating for GRACE_S is stale (other hosts)
GRACE_S = 120
WORKER = "worker"  # user attribute: host:pid of the process running the trial
RUN_DIR = "run_dir"


def _print(text: str) -> None:
    """A progress line, flushed at once (a worker's output goes to a file or a pipe)."""
    print(text, flush=True)


# ---- pure helpers -------------------------------------------------------------------------------
def search_space(dataset_cls: Any, method_cls: Any, fixed: Mapping[str, Any] = ()) -> dict[str, tuple[Search, Option]]:
    """Every declared search range of the trainer, the dataset and the method, in declaration
    order, except the keys in ``fixed`` (set by the user: a fixed value is not searched)."""
    return {k: (opt.search, opt) for k, (opt, _) in declared_options(dataset_cls, method_cls).items()
            if opt.search is not None and k not in fixed}


def is_int_option(option: Option) -> bool:
    kind = option.type or (type(option.default) if option.default is not None else None)
    return kind is int


def distribution(search: Search, option: Option) -> Any:
    """The Optuna distribution of a declared range: categorical for choices, integer where the
    option holds integers, float otherwise."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if search.choices is not None:
        return CategoricalDistribution(search.choices)
    if is_int_option(option):
        return IntDistribution(int(search.low), int(search.high), log=search.log, step=int(search.step or 1))
    return FloatDistribution(float(search.low), float(search.high), log=search.log,
                             step=None if search.step is None else float(search.step))


def in_range(value: Any, search: Search) -> bool:
    if search.choices is not None:
        return value in search.choices
    return isinstance(value, int | float) and not isinstance(value, bool) and search.low <= value <= search.high


def suggest(trial: Any, space: Mapping[str, tuple[Search, Option]], fixed: Mapping[str, Any] = ()) -> dict[str, Any]:
    """The trial's values for every searched key whose condition holds (Optuna's
    ``suggest_*``); ``fixed``: the configured settings the conditions read for keys not
    searched. A key whose condition fails is not sampled (it keeps its configured value)."""
    out: dict[str, Any] = {}
    values = dict(fixed)
    for key in _ordered(space):
        search, option = space[key]
        if not search.applies(values):  # the run keeps the configured value, which dependents then read
            continue
        if search.choices is not None:
            out[key] = trial.suggest_categorical(key, list(search.choices))
        elif is_int_option(option):
            out[key] = trial.suggest_int(key, int(search.low), int(search.high), log=search.log,
                                         step=int(search.step or 1))
        else:
            out[key] = trial.suggest_float(key, float(search.low), float(search.high), log=search.log,
                                           step=None if search.step is None else float(search.step))
        values[key] = out[key]
    return out


def _ordered(space: Mapping[str, tuple[Search, Option]]) -> list[str]:
    """The searched keys, each after the searched keys its condition names (declaration order
    otherwise)."""
    done: list[str] = []
    waiting = list(space)
    while waiting:
        ready = [k for k in waiting
                 if all(dep not in space or dep in done or dep == k for dep, _ in space[k][0].when or ())]
        if not ready:
            raise ConfigError(f"The search conditions of {', '.join(waiting)} depend on each other in a cycle.")
        done += ready
        waiting = [k for k in waiting if k not in ready]
    return done


def trial_overrides(base: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's settings: the base settings, the sampled values, and the trial settings."""
    return {**base, **params, **TRIAL_SETTINGS}


def default_params(cfg: Mapping[str, Any], space: Mapping[str, tuple[Search, Option]]) -> dict[str, Any]:
    """The configured value of each searched key that lies in its range and whose condition
    the configuration meets: the defaults trial."""
    return {k: cfg[k] for k, (search, _) in space.items() if in_range(cfg.get(k), search) and search.applies(cfg)}


def study_name(method: str, dataset: str, cfg: Mapping[str, Any], space: Mapping[str, tuple[Search, Option]],
               data: Mapping[str, Any] | None, dataset_cls: Any = None, method_cls: Any = None) -> str:
    """``<method>_<dataset>_<key>``: the key hashes what is not searched (the settings that change
    results, the data fingerprint) and the space, so a different base is a different study."""
    fixed = {k: v for k, v in identity(cfg, dataset_cls, method_cls).items() if k not in space}
    blob = json.dumps({"settings": fixed, "data": dict(data or {}),
                       "space": {k: repr(s) for k, (s, _) in space.items()}}, sort_keys=True, default=str)
    return f"{method}_{dataset}_{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def best_val_accuracy(record: Mapping[str, Any]) -> float:
    """The objective: validation accuracy of the fused prediction at the best-validation epoch.
    Reads only the validation entry (a trial's record has no test metrics at all)."""
    chosen = record["final"]["selection"].get("best_val")
    if chosen is None:
        raise MMBalanceError("the trial's run evaluated no epoch on validation, so it has no objective value.")
    return float(chosen["val"]["fused"]["acc"])


def yaml_scalar(value: Any) -> str:
    """A value as ``--set key=<text>`` reads it back exactly (PyYAML reads ``1e-05`` as text, so
    a float's exponent gets its decimal point: ``1.0e-05``); a list of words as ``a,b`` (what a
    list option reads from ``--set``), any other list in YAML's flow form ``[1,2]``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):  # modalities=zer,mor (what --set reads into a list option)
        from mmbalance.config import parse_value

        words = all(isinstance(v, str) and v and "," not in v and parse_value(v) == v for v in value)
        inner = ",".join(json.dumps(v) if isinstance(v, str) and (parse_value(v) != v or "," in v) else yaml_scalar(v)
                         for v in value)  # a word YAML reads as another type stays quoted text
        return inner if words and value else f"[{inner}]"
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text
    return str(value)


def reproduce_command(method: str, dataset: str, sets: Mapping[str, Any], records: str | None = None) -> str:
    """One ``mmbalance run`` line that trains the configuration (with test evaluation)."""
    parts = ["mmbalance", "run", "--method", method, "--dataset", dataset]
    for key, value in sets.items():
        parts += ["--set", f"{key}={yaml_scalar(value)}"]
    if records:
        parts += ["--records", str(records)]
    return shlex.join(parts)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive_here(worker: str | None) -> bool:
    """Whether ``worker`` (host:pid) is a live process of this host (True for another host:
    only its heartbeat can tell)."""
    if not worker or ":" not in worker:
        return True
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


# ---- the study ----------------------------------------------------------------------------------
@dataclass
class Plan:
    """What a tune call works on: the base settings, the space, where the study lives."""

    method: str
    dataset: str
    base: dict[str, Any]  # the user's settings (--set, --seed, --records ...), without the trial settings
    cfg: dict[str, Any]  # the resolved base config of a trial
    space: dict[str, tuple[Search, Option]]
    name: str
    db: Path
    seed: int
    yaml_path: str | None = None
    prune_startup: int = 5
    prune_warmup: int = 0
    seeds: tuple[int, ...] = ()  # the runs of one trial: one per seed (default: the base seed)

    @property
    def storage_url(self) -> str:
        return f"sqlite:///{self.db.resolve()}"


def plan_study(method: str, dataset: str, base: Mapping[str, Any] | None = None, seed: int | None = None,
               yaml_path: str | None = None, prune_startup: int = 5, prune_warmup: int = 0,
               seeds: list[int] | None = None) -> Plan:
    """Resolve and check the base settings (a bad setting fails here, before any study exists)
    and name the study. ``seeds``: every trial trains one run per seed and scores their mean
    best validation accuracy (default: one run at the base seed)."""
    from mmbalance.runner import make_trainer

    base = dict(base or {})
    trainer = make_trainer(method, dataset, trial_overrides(base, {}), yaml_path)
    cfg = trainer.cfg
    if cfg["protocol"] == "paper" or not cfg["val_fraction"]:
        raise ConfigError(
            "mmbalance tune selects on a validation split apart from test; this configuration validates on "
            "the test split (protocol=paper or val_fraction=0). Use the honest protocol with val_fraction > 0.")
    trainer.check()
    dataset_cls, method_cls = type(trainer.dataset), type(trainer.method)
    space = search_space(dataset_cls, method_cls, fixed={**(_yaml_keys(yaml_path)), **base})
    if not space:
        raise ConfigError(f"Nothing to search: every searched option of {method} on {dataset} is fixed by the "
                          f"settings given. Drop a --set of a searched key (lr, weight_decay, ...).")
    seeds = tuple(seeds) if seeds else (int(cfg["seed"]),)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"The seeds of a tuning trial must differ; got {list(seeds)}.")
    if seeds != (int(cfg["seed"]),):
        cfg = {**cfg, "seed": list(seeds)}  # names the study by all of its seeds
    name = study_name(method, dataset, cfg, space, trainer.data_fingerprint, dataset_cls, method_cls)
    db = Path(cfg["records"]) / STUDIES / f"{name}.db"
    seed = seeds[0] if seed is None else seed  # the sampler's seed: the runs' seed unless given
    return Plan(method, dataset, base, cfg, space, name, db, seed, yaml_path, prune_startup, prune_warmup, seeds)


def _yaml_keys(yaml_path: str | None) -> dict[str, Any]:
    if not yaml_path:
        return {}
    from mmbalance.config import load_yaml

    return load_yaml(yaml_path)


def _locked_storage_class(base: type) -> type:
    """``base`` (Optuna's RDBStorage) whose trial state changes hold a file lock beside the
    database. Optuna starts a waiting trial by reading its state and setting it to RUNNING in
    one transaction ``FOR UPDATE``, which SQLite ignores: two workers asking at the same moment
    both started the study's first (defaults) trial, and the second's run folder was locked by
    the first. Under the lock the check and the update are one step for every process."""

    class LockedRDBStorage(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, lock_path: str, **kwargs: Any) -> None:
            self._lock_path = lock_path
            super().__init__(*args, **kwargs)

        def set_trial_state_values(self, trial_id: int, state: Any, values: Any = None) -> bool:
            import fcntl

            with open(self._lock_path, "a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    return super().set_trial_state_values(trial_id, state, values)
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)

    return LockedRDBStorage


def storage(plan: Plan) -> Any:
    """The study's SQLite storage with a heartbeat: a trial of another host whose process died
    goes stale after GRACE_S and is re-asked with its values (Optuna's stale-trial retry)."""
    import warnings

    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    from mmbalance.records import ensure_dir

    ensure_dir(plan.db.parent)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import sqlalchemy.exc

    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # the heartbeat API is marked experimental; it is what we need
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return _locked_storage_class(RDBStorage)(
                    plan.storage_url, engine_kwargs={"connect_args": {"timeout": 120}},
                    heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
                    lock_path=str(plan.db) + ".lock")
        except sqlalchemy.exc.DBAPIError:  # another process created the new database's tables meanwhile
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def open_study(plan: Plan, worker: int = 0) -> Any:
    """The study with its sampler seeded from (seed, trials so far, worker): a resumed or
    parallel process draws new values, never those drawn before."""
    import optuna

    store = storage(plan)
    study = optuna.create_study(study_name=plan.name, storage=store, direction="maximize", load_if_exists=True)
    drawn = len(study.get_trials(deepcopy=False))
    seed = int.from_bytes(hashlib.sha256(f"{plan.seed}/{drawn}/{worker}".encode()).digest()[:4], "little")
    return optuna.load_study(
        study_name=plan.name, storage=store,
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=plan.prune_startup, n_warmup_steps=plan.prune_warmup),
    )


def reclaim_dead_trials(study: Any) -> list[int]:
    """Trials left RUNNING by a process of this host that no longer exists (killed): marked
    failed and re-asked with the same values (their run resumes from its checkpoint). Trials of
    other hosts are left to the heartbeat. Returns the numbers reclaimed."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    store = study._storage
    reclaimed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _alive_here(t.user_attrs.get(WORKER)) or WORKER not in t.user_attrs:
            continue
        try:
            if not store.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # another process got there first
            continue
        reask(study, store.get_trial(t._trial_id))
        reclaimed.append(t.number)
    return reclaimed


def reask_failed(study: Any, max_retry: int = 3) -> list[int]:
    """Trials that failed (their process raised: a crash, a full disk) and were never asked
    again: re-asked once with the same values, at most ``max_retry`` times in a row, so a
    study resumed after an error loses no configuration (the defaults trial included)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    out = []
    for t in trials:
        if (t.state.name == "FAIL" and t.number not in retried
                and len(t.system_attrs.get("retry_history", [])) < max_retry):
            reask(study, t)
            out.append(t.number)
    return out


def reask(study: Any, failed: Any) -> None:
    """Queue a failed trial's values again (Optuna's retry, without the dead worker's name)."""
    import optuna

    history = [*failed.system_attrs.get("retry_history", []), failed.number]
    study.add_trial(optuna.create_trial(
        state=optuna.trial.TrialState.WAITING, params=failed.params, distributions=failed.distributions,
        user_attrs={k: v for k, v in failed.user_attrs.items() if k != WORKER},
        system_attrs={**failed.system_attrs, "failed_trial": failed.number, "retry_history": history}))


def count_states(study: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def make_objective(plan: Plan, total: int, say: Callable[[str], None] = _print) -> Callable[[Any], float]:
    """A trial: sample, train the run (resuming it if it exists), report each epoch's validation
    accuracy to the pruner, return the best validation accuracy."""
    import optuna

    from mmbalance.engine.loop import FINISHED_BEFORE
    from mmbalance.runner import make_trainer

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr(WORKER, worker_id())
        params = suggest(trial, plan.space, plan.cfg)
        scores, run_dirs = [], []
        for i, seed in enumerate(plan.seeds):  # the pruner compares step (seed i, epoch e) across trials
            overrides = {**trial_overrides(plan.base, params), "seed": seed}
            try:
                trainer = make_trainer(plan.method, plan.dataset, overrides, plan.yaml_path)
            except (ConfigError, UnsupportedError) as exc:  # values drawn that the method refuses
                _refused(trial, exc)
            run_dirs.append(str(trainer.run_dir))
            trial.set_user_attr(RUN_DIR, run_dirs[0] if len(plan.seeds) == 1 else run_dirs)
            offset = i * int(trainer.cfg["epochs"])
            reporter = _reporter(trial, trainer, offset)
            trainer.epoch_callbacks.append(reporter)
            try:
                record = trainer.fit()
            except TrainingDiverged as exc:  # an outcome of the values drawn, not a broken study
                trial.set_user_attr("diverged", str(exc).split(":")[0])
                raise optuna.TrialPruned(f"diverged: {exc}") from None
            except (ConfigError, UnsupportedError) as exc:  # e.g. LFM's learnable schedule on a small split
                _refused(trial, exc)
            if trainer.outcome == FINISHED_BEFORE:  # a configuration recorded before: its epochs
                trainer.history = list(record["epochs"])
                reporter(prune=False)
            scores.append(best_val_accuracy(record))
        return sum(scores) / len(scores)

    return objective


def _refused(trial: Any, exc: MMBalanceError) -> NoReturn:
    """A configuration the method or the data refuses uses up its trial as a pruned one with
    the reason (the defaults were checked before the study started, so it is the values drawn):
    retrying the same values would only be refused again."""
    import optuna

    trial.set_user_attr("refused", str(exc).splitlines()[0][:300])
    raise optuna.TrialPruned(f"refused: {exc}") from None


def _reporter(trial: Any, trainer: Any, offset: int) -> Callable[..., None]:
    """The epoch callback of one run of a trial: reports each evaluated epoch's validation
    accuracy (restored epochs of a resumed run too) at step offset + epoch, then asks the pruner."""
    import optuna

    reported: set[int] = set()

    def report(_entry: Mapping[str, Any] | None = None, prune: bool = True) -> None:
        for e in trainer.history:
            if e.get("val") is None or e["epoch"] in reported:
                continue
            trial.report(float(e["val"]["fused"]["acc"]), offset + e["epoch"])
            reported.add(e["epoch"])
        if prune and trial.should_prune():
            trial.set_user_attr("pruned_after_epoch", max(reported) + 1)
            raise optuna.TrialPruned(f"validation accuracy below the median after epoch {max(reported) + 1}")

    return report


def progress_callback(plan: Plan, total: int, say: Callable[[str], None] = _print) -> Callable[[Any, Any], None]:
    def callback(study: Any, trial: Any) -> None:
        counts = count_states(study)
        done = sum(counts.get(s, 0) for s in FINISHED)
        values = ", ".join(f"{k}={yaml_scalar(v) if not isinstance(v, float) else f'{v:.4g}'}"
                           for k, v in trial.params.items())
        if trial.state.name == "COMPLETE":
            what = f"val {trial.value:.2f}"
        elif trial.state.name == "PRUNED" and trial.user_attrs.get("diverged"):
            what = f"pruned: {trial.user_attrs['diverged'].lower()}"
        elif trial.state.name == "PRUNED" and trial.user_attrs.get("refused"):
            what = f"pruned: refused ({trial.user_attrs['refused']})"
        elif trial.state.name == "PRUNED":
            what = f"pruned after epoch {trial.user_attrs.get('pruned_after_epoch', '?')}"
        else:
            what = trial.state.name.lower()
        try:
            best = study.best_trial
            best_text = f"best {best.value:.2f} (trial {best.number})"
        except ValueError:
            best_text = "no complete trial yet"
        say(f"[{done}/{total}] trial {trial.number}: {values} -> {what}; {best_text}")

    return callback


def run_worker(plan: Plan, quota: int, total: int, worker: int = 0) -> None:
    """Run ``quota`` trials of the study in this process (WAITING re-asks first)."""
    if quota <= 0:
        return
    study = open_study(plan, worker)
    study.optimize(make_objective(plan, total), n_trials=quota, catch=(),
                   callbacks=[progress_callback(plan, total)])


def _worker_main(plan: Plan, quota: int, total: int, worker: int) -> None:  # spawned process
    try:
        run_worker(plan, quota, total, worker)
    except MMBalanceError as exc:
        print(f"error (tune worker {worker}): {exc}", file=sys.stderr)
        sys.exit(2)


@dataclass
class TuneResult:
    name: str
    db: Path
    counts: dict[str, int]
    best_value: float | None
    best_params: dict[str, Any]
    best_run_dir: str | None
    command: str | None


def tune(method: str, dataset: str, trials: int, base: Mapping[str, Any] | None = None, jobs: int = 1,
         seed: int | None = None, yaml_path: str | None = None, prune_startup: int = 5, prune_warmup: int = 0,
         enqueue: list[dict[str, Any]] | None = None, say: Callable[[str], None] = _print,
         seeds: list[int] | None = None) -> TuneResult:
    """Bring the study to ``trials`` finished trials (complete or pruned) with ``jobs`` processes,
    then report the best configuration. ``enqueue``: values of the first trials of a new study
    (after the defaults trial)."""
    if trials < 1:
        raise ConfigError(f"--trials must be at least 1 (got {trials}).")
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1 (got {jobs}).")
    plan = plan_study(method, dataset, base, seed, yaml_path, prune_startup, prune_warmup, seeds)
    quotas = prepare_study(plan, trials, jobs, enqueue, say)
    if len(quotas) == 1:
        run_worker(plan, quotas[0], trials)
    elif quotas:
        _run_processes(plan, quotas, trials)
    return summarize(plan, say)


def split_budget(remaining: int, workers: int) -> list[int]:
    """``remaining`` trials shared by at most ``workers`` workers, as evenly as possible (no
    worker with nothing to do): the quotas sum to exactly ``remaining``."""
    return [remaining // workers + (1 if i < remaining % workers else 0) for i in range(min(workers, remaining))]


def prepare_study(plan: Plan, trials: int, workers: int = 1, enqueue: list[dict[str, Any]] | None = None,
                  say: Callable[[str], None] = _print) -> list[int]:
    """Create or resume the study (a new one gets the defaults trial first), record its
    protocol, re-ask trials a killed process of this host left running, and split what is
    left of the budget between ``workers``: the quotas each worker runs (:func:`run_worker`,
    in this process, in spawned processes, or in scheduler jobs alike)."""
    study = open_study(plan)
    if not study.get_trials(deepcopy=False):  # a new study: the defaults first
        study.enqueue_trial(default_params(plan.cfg, plan.space), user_attrs={"defaults": True})
        for params in enqueue or []:
            study.enqueue_trial(params)
    record_protocol(study, plan, trials)
    reclaimed = reclaim_dead_trials(study)
    _fail_stale(study)  # trials of another host whose heartbeat stopped: failed and re-asked
    failed = reask_failed(study)
    counts = count_states(study)
    done = sum(counts.get(s, 0) for s in FINISHED)
    running = counts.get("RUNNING", 0)
    say(f"study {plan.name} ({plan.db}): {done} of {trials} trials finished"
        + (f", {running} running elsewhere" if running else "")
        + (f", re-asking {len(reclaimed)} left running by a killed process ({', '.join(map(str, reclaimed))})"
           if reclaimed else "")
        + (f", re-asking {len(failed)} that failed ({', '.join(map(str, failed))})" if failed else "")
        + f"; searching {', '.join(f'{k} ({s.text()})' for k, (s, _) in plan.space.items())}")
    return split_budget(max(0, trials - done - running), workers)


def _fail_stale(study: Any) -> None:
    """Optuna's stale-trial check (a trial whose heartbeat stopped GRACE_S ago is marked failed
    and re-asked), run before the budget is split: otherwise a trial of a killed job on
    another host would count as running until a worker next starts, and no worker would be
    given its place."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def study_progress(db: Path, name: str) -> dict[str, int] | None:
    """The trial counts by state of an existing study (None when its database does not
    exist); reads only, so a status command creates nothing."""
    import optuna

    if not Path(db).is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{Path(db).resolve()}")
    except KeyError:
        return None
    return count_states(study)


#: The study's user attributes a report reads its budget from (``record_protocol``), and those a
#: tuned grid adds (``link_grid_cells``): the cell keys of the defaults' and the best runs.
PROTOCOL_KEYS = ("method", "dataset", "budget", "seeds", "sampler", "pruner", "objective")
DEFAULTS_CELL, BEST_CELL = "defaults_cell", "best_cell"


def record_protocol(study: Any, plan: Plan, trials: int) -> None:
    """Write what the study searched with into the study itself, so a report names the budget
    from the study's own record: the budget asked for (the largest so far), the seeds each
    trial trains, the sampler, the pruner and the objective."""
    attrs = study.user_attrs
    values = {
        "method": plan.method, "dataset": plan.dataset, "budget": max(int(attrs.get("budget", 0)), trials),
        "seeds": list(plan.seeds), "sampler": "TPE",
        "pruner": f"median pruner (startup {plan.prune_startup} trials, warm-up {plan.prune_warmup} steps)",
        "objective": "best validation accuracy of the fused prediction",
    }
    for key, value in values.items():
        if attrs.get(key) != value:
            study.set_user_attr(key, value)


def link_grid_cells(db: Path, name: str, defaults_cell: str, best_cell: str, grid: str) -> None:
    """Record in the study which runs are its defaults and its best configuration (their cell
    keys, ``report_runs.cell_key``) and which grid ran them: what the leaderboard's defaults
    vs tuned table reads."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{Path(db).resolve()}")
    for key, value in ((DEFAULTS_CELL, defaults_cell), (BEST_CELL, best_cell), ("grid", grid)):
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)


def _run_processes(plan: Plan, quotas: list[int], total: int) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(plan, q, total, i)) for i, q in enumerate(quotas)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [i for i, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise MMBalanceError(f"tune worker(s) {', '.join(map(str, failed))} failed (see above); rerun the same "
                             f"command to resume the study.")


def summarize(plan: Plan, say: Callable[[str], None] = _print) -> TuneResult:
    study = open_study(plan)
    counts = count_states(study)
    try:
        best = study.best_trial
    except ValueError:
        say("no trial completed yet.")
        return TuneResult(plan.name, plan.db, counts, None, {}, None, None)
    sets = {**plan.base, **best.params}
    shown = {k: v for k, v in sets.items() if k not in ("records", "progress", "log_epochs")}  # display only
    command = reproduce_command(plan.method, plan.dataset, shown, plan.base.get("records"))
    say(f"finished: {counts.get('COMPLETE', 0)} complete, {counts.get('PRUNED', 0)} pruned"
        + (f", {counts['FAIL']} failed (re-asked)" if counts.get("FAIL") else ""))
    say(f"best validation accuracy {best.value:.2f} (trial {best.number}): "
        + ", ".join(f"{k}={yaml_scalar(v)}" for k, v in best.params.items()))
    say(f"trial run: {best.user_attrs.get(RUN_DIR)}")
    say(f"reproduce (with test metrics): {command}")
    return TuneResult(plan.name, plan.db, counts, best.value, dict(best.params), best.user_attrs.get(RUN_DIR), command)


# ---- pictures -----------------------------------------------------------------------------------
def study_databases(records_dir: Path) -> list[Path]:
    """The studies of a records folder (``<records>/studies/*.db``)."""
    folder = Path(records_dir) / STUDIES
    return sorted(p for p in folder.glob("*.db") if p.is_file() and not p.is_symlink()) if folder.is_dir() else []


def study_pictures(records_dir: Path, dest: Path) -> list[tuple[str, Path | None, str]]:
    """Optuna's own matplotlib pictures of every study under ``records_dir``: the optimisation
    history and the parameter importances, ``<dest>/<study>_history.png`` and
    ``_importances.png``. Returns (what, path or None, why not) per picture."""
    import warnings

    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ov

    from mmbalance.plots import save_png

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    made: list[tuple[str, Path | None, str]] = []
    for db in study_databases(records_dir):
        try:
            study = optuna.load_study(study_name=db.stem, storage=f"sqlite:///{db.resolve()}")
        except KeyError:
            made.append((f"study {db.stem}", None, f"{db} holds no study named {db.stem}"))
            continue
        complete = [t for t in study.trials if t.state.name == "COMPLETE"]
        for kind, draw, need in (("history", ov.plot_optimization_history, 1),
                                 ("importances", ov.plot_param_importances, 2)):
            what = f"{kind} of study {db.stem}"
            if len(complete) < need:
                made.append((what, None, f"it needs {need} complete trial(s), the study has {len(complete)}"))
                continue
            with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                try:
                    ax = draw(study)
                except (ValueError, RuntimeError) as exc:  # e.g. no parameter varied
                    made.append((what, None, str(exc)))
                    continue
            fig = ax.figure
            try:
                made.append((what, save_png(fig, dest / f"{db.stem}_{kind}.png"), ""))
            finally:
                plt.close(fig)
    return made
