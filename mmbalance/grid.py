"""Method x dataset x seed grids that survive interruption.

A grid file (YAML)::

    name: iprm-small                 # optional
    records: runs/iprm-small         # optional; --records overrides it
    seeds: [0, 1, 2]
    set: {epochs: 20}                # settings for every cell
    sweep: {lr: [0.01, 0.1]}         # optional: one cell per combination of the listed values
    datasets:
      - avdigits
      - {name: mfeat, set: {modalities: [fac, mor]}}
    methods:
      - concat
      - {name: iprm, set: {mixup: linear}}

Before any cell trains, every cell's configuration is resolved and checked the way
``--dry-run`` does it (unknown method or key, bad value, modality or backbone key the dataset
lacks); one error then lists every bad cell, so a typo in the last cell costs no training.

Cells run one after another, or ``--jobs N`` at a time in worker processes, or one per GPU with
``--gpus all`` / ``--gpus 0,1``. A finished cell (DONE marker) is skipped, a killed one resumes
from its last epoch checkpoint, so rerunning the same command after an interruption finishes
the grid without redoing work. A cell the method refuses (e.g. a two-modality method on three
modalities) is reported and skipped. A cell that fails while training (or whose worker process
dies) is reported as FAILED and the others go on; the run ends with a summary line and a
non-zero exit code. Worker processes die with the grid process, so a rerun after ``kill -9``
never races orphans on the same run folders. Past one machine, hand the cells to a cluster
scheduler: each cell is an independent ``mmbalance run`` writing into a shared records folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from mmbalance.config import MAX_SEED, read_yaml_mapping
from mmbalance.errors import ConfigError, MMBalanceError, UnsupportedError

# outcome of one cell
TRAINED, SKIPPED, NOT_APPLICABLE, FAILED = "trained", "skipped", "not applicable", "failed"
ERROR_FILE = "error.txt"  # traceback of a cell's unexpected exception, in its run folder
MAX_LISTED = 10  # bad or failed cells named in one message


@dataclass
class Cell:
    method: str
    dataset: str
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)
    # where each override was written ("grid file 'g.yaml', top-level set"), for its errors
    origins: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    swept: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # this cell's sweep values
    note: str = field(default="", compare=False, repr=False)  # "tuned": its values come from a study

    def __str__(self) -> str:
        values = ", ".join(f"{k}={v}" for k, v in self.swept.items())
        shown = f" [{self.note + ': ' if self.note else ''}{values}]" if values or self.note else ""
        return f"{self.method} on {self.dataset}{shown} seed {self.seed}"


@dataclass(frozen=True)
class TuneSpec:
    """A grid's ``tune:``: ``trials`` finished trials per method x setting (one study each),
    every trial training ``seeds`` (default: the grid's first seed); then each best
    configuration runs over the grid's seeds beside the defaults."""

    trials: int
    seeds: tuple[int, ...] | None = None


@dataclass
class Grid:
    name: str
    cells: list[Cell]
    records: str | None = None
    slurm: dict[str, Any] = field(default_factory=dict)  # resources for --launcher slurm
    tune: TuneSpec | None = None


# ---- the grid file ----------------------------------------------------------------------------
def _settings(value: Any, where: str, path: Path) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"Grid file '{path}': 'set' {where} must be a mapping of settings, e.g. "
                          f"set: {{epochs: 20}}; got {value!r}.")
    for key, hint in (("seed", "list the seeds under the top-level 'seeds' key"),
                      ("records", "give the folder with the top-level 'records' key or --records"),
                      ("method", "list the methods under 'methods'"),
                      ("dataset", "list the datasets under 'datasets'")):
        if key in value:
            raise ConfigError(f"Grid file '{path}': '{key}' cannot be set per cell ({where}); {hint}.")
    return dict(value)


def _origins(settings: Mapping[str, Any], where: str, path: Path) -> dict[str, str]:
    return {k: f"grid file '{path}', {where}" for k in settings}


def _entries(items: Any, what: str, path: Path) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(items, list) or not items:
        raise ConfigError(f"Grid file '{path}' needs a non-empty list under '{what}'.")
    out = []
    for it in items:
        if isinstance(it, str):
            out.append((it, {}))
        elif isinstance(it, Mapping) and "name" in it:
            out.append((str(it["name"]), _settings(it.get("set"), f"of {what} entry {it['name']!r}", path)))
        else:
            raise ConfigError(f"Grid file '{path}': each entry of '{what}' is a name or {{name: ..., set: {{...}}}}; got {it!r}.")
    return out


def _seeds(value: Any, path: Path) -> list[int]:
    """A non-empty list of distinct ints in [0, MAX_SEED]; one int stands for a list of one."""
    def is_int(s: Any) -> bool:
        return isinstance(s, int) and not isinstance(s, bool)

    def is_seed(s: Any) -> bool:
        return is_int(s) and 0 <= s <= MAX_SEED

    seeds = [value] if is_int(value) else value
    if not isinstance(seeds, list) or not seeds:
        raise ConfigError(f"Grid file '{path}': 'seeds' must be a non-empty list of integers from 0 to "
                          f"{MAX_SEED} (or one such integer), e.g. seeds: [0, 1, 2]; got {value!r}.")
    bad = [s for s in seeds if not is_seed(s)]
    if bad:
        raise ConfigError(f"Grid file '{path}': every seed must be an integer from 0 to {MAX_SEED} "
                          f"(numpy seeds take 32 bits); {', '.join(map(repr, bad))} in seeds: {value!r} is not.")
    dups = sorted({s for s in seeds if seeds.count(s) > 1})
    if dups:
        raise ConfigError(f"Grid file '{path}': seeds: {value!r} lists {', '.join(map(str, dups))} "
                          f"more than once; each seed is one cell, list it once.")
    return seeds


BLOCK_KEYS = ("seeds", "set", "sweep", "datasets", "methods")


def _sweep(value: Any, where: str, p: Path) -> dict[str, list[Any]]:
    """A ``sweep:`` mapping, each key a non-empty list of values (keys checked as ``set:``'s)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"Grid file '{p}': 'sweep' {where} must be a mapping of settings to lists of values, "
                          f"e.g. sweep: {{lr: [0.01, 0.1], alpha: [0.5, 1.0]}}; got {value!r}.")
    _settings(value, f"in the sweep {where}", p)  # seed, records, method, dataset are refused as in set:
    for key, values in value.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"Grid file '{p}': sweep key '{key}' {where} must list its values, e.g. "
                              f"{key}: [{values!r}, ...]; got {values!r}.")
        twice = [v for i, v in enumerate(values) if v in values[:i]]
        if twice:
            raise ConfigError(f"Grid file '{p}': sweep key '{key}' {where} lists {twice[0]!r} more than once.")
    return {str(k): list(v) for k, v in value.items()}


def sweep_combinations(sweep: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """One settings dict per combination of the swept values, the first key varying slowest
    ({} when nothing is swept: one cell)."""
    import itertools

    keys = list(sweep)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(sweep[k] for k in keys))]


def _block_cells(block: Mapping[str, Any], seeds: list[int], common: Mapping[str, Any], where: str, p: Path,
                 top_sweep: Mapping[str, list[Any]] | None = None) -> list[Cell]:
    """Cells of one methods x datasets x sweep x seeds product (the file itself, or one of its
    blocks). Each cell remembers which ``set:`` or ``sweep:`` each of its settings came from,
    for its errors."""
    seeds = _seeds(block["seeds"], p) if "seeds" in block else seeds
    own = _settings(block.get("set"), f"of {where}", p)
    own_sweep = _sweep(block.get("sweep"), f"of {where}", p) if where else {}
    sweep = {**(top_sweep or {}), **own_sweep}
    origins = {**_origins(common, "top-level set", p), **_origins(own, f"set of {where}", p),
               **_origins({k: 0 for k in sweep if k not in own_sweep}, "top-level sweep", p),
               **_origins(own_sweep, f"sweep of {where}", p)}
    common = {**common, **own}
    tag = f" ({where})" if where else ""
    inside = f" in {where}" if where else ""
    return [
        Cell(m, d, s, {**common, **dset, **mset, **combo},
             {**origins, **_origins(dset, f"set of datasets entry '{d}'{inside}", p),
              **_origins(mset, f"set of methods entry '{m}'{inside}", p),
              **{k: origins[k] for k in combo}}, combo)
        for d, dset in _entries(block.get("datasets"), f"datasets{tag}", p)
        for m, mset in _entries(block.get("methods"), f"methods{tag}", p)
        for combo in sweep_combinations(sweep)
        for s in seeds
    ]


PROFILE_KEYS = ("seeds", "datasets", "methods")


def _profile_filter(data: Mapping[str, Any], name: str, p: Path) -> dict[str, set[Any]]:
    """A profile of the grid file: a subset of its cells (seeds, dataset names, method names),
    so a first look trains cells the full grid then reuses instead of retraining."""
    profiles = data.get("profiles") or {}
    if not isinstance(profiles, Mapping) or name not in profiles:
        known = ", ".join(sorted(profiles)) if isinstance(profiles, Mapping) and profiles else "none"
        raise ConfigError(f"Grid file '{p}' has no profile '{name}' (its profiles: {known}). "
                          f"Drop --profile to run the whole grid.")
    spec = profiles[name]
    if not isinstance(spec, Mapping) or not spec or set(spec) - set(PROFILE_KEYS):
        raise ConfigError(f"Grid file '{p}': profile '{name}' must be a mapping with keys among "
                          f"{', '.join(PROFILE_KEYS)} (each a list); got {spec!r}.")
    out: dict[str, set[Any]] = {}
    for key, values in spec.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"Grid file '{p}': profile '{name}': '{key}' must be a non-empty list.")
        out[key] = set(_seeds(values, p)) if key == "seeds" else {str(v) for v in values}
    return out


def load_grid(path: str | Path, profile: str | None = None) -> Grid:
    """Read a grid file: one methods x datasets x seeds product, or a list of ``blocks`` (each
    its own datasets, methods and optionally seeds and settings, on top of the file's), for
    comparisons whose rows differ per setting (each dataset's unimodal runs, ablations on some
    settings only). Cells run in file order; a cell listed twice runs once. ``profile`` keeps
    the cells of one of the file's ``profiles`` (seeds, dataset and method names)."""
    p = Path(path)
    data = read_yaml_mapping(p, "Grid file")
    allowed = ("name", "records", "seeds", "set", "sweep", "tune", "datasets", "methods", "blocks", "slurm", "profiles")
    unknown = set(data) - set(allowed)
    if unknown:
        raise ConfigError(f"Grid file '{p}' has unknown keys {sorted(unknown)}; allowed: {', '.join(allowed)}.")
    slurm = data.get("slurm") or {}
    if not isinstance(slurm, Mapping):
        raise ConfigError(f"Grid file '{p}': 'slurm' must be a mapping of resources, e.g. {{gpus_per_task: 1}}.")
    seeds = _seeds(data.get("seeds", [0]), p)
    common = _settings(data.get("set"), "at the top level", p)
    top_sweep = _sweep(data.get("sweep"), "at the top level", p)
    blocks = data.get("blocks")
    if blocks is None:
        cells = _block_cells({k: data.get(k) for k in ("datasets", "methods")}, seeds, common, "", p, top_sweep)
    else:
        if "datasets" in data or "methods" in data:
            raise ConfigError(f"Grid file '{p}' has both 'blocks' and top-level datasets/methods; "
                              f"move the top-level ones into a block.")
        if not isinstance(blocks, list) or not blocks:
            raise ConfigError(f"Grid file '{p}': 'blocks' must be a non-empty list of {{datasets: [...], methods: [...]}}.")
        cells = []
        for i, block in enumerate(blocks, 1):
            if not isinstance(block, Mapping) or set(block) - set(BLOCK_KEYS):
                raise ConfigError(f"Grid file '{p}': block {i} must be a mapping with keys among "
                                  f"{', '.join(BLOCK_KEYS)}; got {block!r}.")
            cells += _block_cells(block, seeds, common, f"block {i}", p, top_sweep)
    if profile is not None:
        keep = _profile_filter(data, profile, p)
        cells = [c for c in cells if c.seed in keep.get("seeds", {c.seed}) and c.dataset in keep.get("datasets", {c.dataset})
                 and c.method in keep.get("methods", {c.method})]
        if not cells:
            raise ConfigError(f"Grid file '{p}': profile '{profile}' keeps no cell (its seeds, datasets and "
                              f"methods must be among the grid's).")
    unique: dict[str, Cell] = {}
    for c in cells:
        unique.setdefault(repr((c.method, c.dataset, c.seed, sorted(c.overrides.items(), key=str))), c)
    return Grid(str(data.get("name", p.stem)), list(unique.values()), data.get("records"), dict(slurm),
                _tune_spec(data.get("tune"), p))


def _tune_spec(value: Any, p: Path) -> TuneSpec | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or "trials" not in value or set(value) - {"trials", "seeds"}:
        raise ConfigError(f"Grid file '{p}': 'tune' must be a mapping with 'trials' (and optionally 'seeds'), "
                          f"e.g. tune: {{trials: 20, seeds: [0]}}; got {value!r}.")
    trials = value["trials"]
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise ConfigError(f"Grid file '{p}': tune: trials must be an integer >= 1; got {trials!r}.")
    return TuneSpec(trials, tuple(_seeds(value["seeds"], p)) if "seeds" in value else None)


# ---- one cell ---------------------------------------------------------------------------------
def cell_config(cell: Cell, base: Mapping[str, Any]) -> dict[str, Any]:
    return {**cell.overrides, **base, "seed": cell.seed}


def cell_trainer(cell: Cell, base: Mapping[str, Any]) -> Any:
    """The cell's trainer (configuration resolved and checked, nothing built); an error names
    the grid file and the ``set:`` a bad setting came from."""
    from mmbalance.runner import make_trainer

    sources = {k: v for k, v in cell.origins.items() if k not in base}
    return make_trainer(cell.method, cell.dataset, cell_config(cell, base), sources=sources)


@dataclass(frozen=True)
class CellState:
    """What :func:`check_cell` found; unpacks as ``state, detail``. ``choices`` is the list of
    valid choices an invalid cell's error named (printed once per grid, not once per cell)."""

    state: str
    detail: str
    choices: str = ""

    def __iter__(self) -> Iterator[str]:
        return iter((self.state, self.detail))


def check_cell(cell: Cell, base: Mapping[str, Any]) -> CellState:
    """Resolve and validate one cell without training it (nor loading its data).

    Returns (state, detail): state "new", "resume" or "done" with the run folder as detail,
    "not applicable" with the method's refusal, or "invalid" with the problem.
    """
    from mmbalance.records import CHECKPOINT, DONE

    try:
        trainer = cell_trainer(cell, base)
        check = getattr(trainer, "check", None)  # modalities and backbone keys vs. the dataset
        if callable(check):
            check()
    except UnsupportedError as exc:
        return CellState(NOT_APPLICABLE, str(exc))
    except MMBalanceError as exc:
        return CellState("invalid", getattr(exc, "short", "") or str(exc), getattr(exc, "choices", ""))
    except Exception as exc:  # a plugin's bug: still a bad cell, and its traceback is shown
        traceback.print_exc(file=sys.stderr)
        return CellState("invalid", f"{type(exc).__name__}: {exc}")
    run_dir = trainer.run_dir
    state = "done" if (run_dir / DONE).exists() else "resume" if (run_dir / CHECKPOINT).exists() else "new"
    return CellState(state, str(run_dir))


def _choice_lines(states: Iterable[CellState]) -> list[str]:
    """Each distinct line of valid choices once, the valid keys before the known names."""
    lines = dict.fromkeys(ln for st in states for ln in st.choices.splitlines() if ln)
    return sorted(lines, key=lambda ln: not ln.startswith("Valid keys"))


def bad_cells_error(grid: Grid, states: Sequence[CellState], consequence: str) -> ConfigError | None:
    """One error for every invalid cell: each on its own line, then each distinct list of
    valid choices (config keys, method names) once; None when every cell is valid."""
    n = len(grid.cells)
    bad = [(i, st) for i, st in enumerate(states) if st.state == "invalid"]
    if not bad:
        return None
    lines = [f"[{i + 1}/{n}] {grid.cells[i]}: {st.detail.rstrip()}" for i, st in bad[:MAX_LISTED]]
    if len(bad) > MAX_LISTED:
        lines.append(f"... and {len(bad) - MAX_LISTED} more (run with --dry-run to list them all)")
    choices = _choice_lines(st for _, st in bad)
    return ConfigError("\n".join([f"Grid '{grid.name}': {len(bad)} of {n} cells have a bad configuration, so "
                                   f"{consequence}. Fix them and rerun:", *lines, *choices]))


def _result_line(rec: Mapping[str, Any]) -> str:
    try:
        return f"best_val test acc {rec['final']['selection']['best_val']['test']['fused']['acc']:.2f}"
    except (KeyError, TypeError, ValueError):
        return "finished"


def _save_traceback(cell: Cell, base: Mapping[str, Any], run_dir: Path | None, text: str) -> str:
    """Write a traceback into the cell's run folder (else the records folder); returns where."""
    folder = run_dir if run_dir is not None else Path(base.get("records") or "runs") / "grid-errors"
    path = folder / (ERROR_FILE if run_dir is not None else
                     f"{cell.dataset}_{cell.method}_s{cell.seed}.txt")
    from mmbalance import records

    try:
        if run_dir is not None:  # never through a link planted in (or as) the run folder
            records.check_run_folder(run_dir)
        records.atomic_write_text(path, f"{cell} ({time.strftime('%Y-%m-%dT%H:%M:%S')})\n{text}")
        return str(path)
    except (OSError, MMBalanceError):
        return "stderr"


def run_cell(cell: Cell, base: Mapping[str, Any]) -> tuple[str, str]:
    """Run (or skip, or resume) one cell; returns (outcome, one-line report).

    Never raises an Exception: a refusal by the method is ``NOT_APPLICABLE``, any error while
    resolving or training is ``FAILED`` (an unexpected one with its type, and its traceback on
    stderr and in the run folder's error.txt).
    """
    from mmbalance.records import CHECKPOINT, is_done

    run_dir: Path | None = None
    try:
        trainer = cell_trainer(cell, base)
        run_dir = trainer.run_dir
        if is_done(run_dir):  # a DONE that is a planted link is refused, not trusted
            return SKIPPED, "done, skipped"
        state = "resume" if (run_dir / CHECKPOINT).exists() else "new"
        t0 = time.perf_counter()
        rec = trainer.fit()
        (run_dir / ERROR_FILE).unlink(missing_ok=True)  # from an earlier failed attempt
        return TRAINED, f"{_result_line(rec)} ({time.perf_counter() - t0:.0f} s, {state}, {trainer.device})"
    except UnsupportedError as exc:
        return NOT_APPLICABLE, f"not applicable — {exc}"
    except MMBalanceError as exc:
        if run_dir is not None and run_dir.exists():  # so `grid --status` can say why
            _save_traceback(cell, base, run_dir, f"{type(exc).__name__}: {exc}")
        return FAILED, f"FAILED — {exc}"
    except Exception as exc:
        text = traceback.format_exc()
        print(f"Traceback of grid cell {cell}:\n{text}", file=sys.stderr, flush=True)
        where = _save_traceback(cell, base, run_dir, text)
        return FAILED, f"FAILED — {type(exc).__name__}: {exc} (traceback in {where})"


# ---- worker processes -------------------------------------------------------------------------
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _watch_parent(parent_pid: int, interval: float) -> None:
    while True:
        time.sleep(interval)
        if os.getppid() != parent_pid:
            os._exit(1)


def die_with_parent(parent_pid: int, prctl: bool = True, watchdog: bool = True, interval: float = 1.0) -> None:
    """End this process when the process ``parent_pid`` (its parent) dies, even by kill -9.

    On Linux the kernel sends SIGKILL (prctl PR_SET_PDEATHSIG); everywhere a daemon thread
    polls the parent pid every ``interval`` seconds and exits when the process was re-parented.
    """
    if prctl and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog still covers it
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    if watchdog:
        threading.Thread(target=_watch_parent, args=(parent_pid, interval), daemon=True,
                         name="mmbalance-parent-watchdog").start()


def _init_worker(slot: int, gpus: list[str] | None, threads: int, parent_pid: int) -> None:
    """Tie this worker to the grid process, pin it to one GPU (before CUDA starts) and a share
    of the CPU threads."""
    die_with_parent(parent_pid)
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[slot]
    import torch

    torch.set_num_threads(threads)


def _worker_main(conn: Any, slot: int, gpus: list[str] | None, threads: int, parent_pid: int) -> None:
    """A worker: runs the tasks (index, function, args) it receives until it gets None."""
    try:
        _init_worker(slot, gpus, threads, parent_pid)
        while True:
            try:
                task = conn.recv()
            except EOFError:
                return
            if task is None:
                return
            index, fn, args = task
            try:
                result = fn(*args)
            except Exception as exc:  # run_cell catches its own; this is a last resort
                traceback.print_exc(file=sys.stderr)
                result = (FAILED, f"FAILED — {type(exc).__name__}: {exc}")
            conn.send((index, result))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the parent reports it
        return


class _Worker:
    def __init__(self, ctx: Any, slot: int, gpus: list[str] | None, threads: int) -> None:
        self.slot = slot
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, slot, gpus, threads, os.getpid()),
                                name=f"mmbalance-grid-worker-{slot}")
        self.proc.start()
        child.close()
        self.task: int | None = None  # index of the cell it runs

    def poll(self) -> tuple[str, str] | None:
        """The finished task's result, a FAILED result if the process died, else None."""
        for _ in range(2):  # a result sent just before the process ended is still read
            if self.conn.poll():
                try:
                    index, result = self.conn.recv()
                    if index == self.task:
                        return result
                except (EOFError, OSError):
                    break
                except Exception as exc:  # a result that cannot be unpickled
                    return FAILED, f"FAILED — the worker's result could not be read ({type(exc).__name__}: {exc})"
            if self.proc.is_alive():
                return None
        self.proc.join(timeout=5)
        code = self.proc.exitcode
        how = f"exit code {code}"
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        return FAILED, (f"FAILED — the worker process running this cell died ({how}; out of memory?). "
                        f"Rerun the grid to resume it from its last checkpoint.")

    def retire(self) -> None:
        """Ask an idle worker to exit (it is joined by :meth:`stop`)."""
        self.task = None
        with contextlib.suppress(OSError):  # already gone
            self.conn.send(None)

    def stop(self, terminate: bool) -> None:
        if terminate and self.proc.is_alive():
            self.proc.terminate()
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def run_in_workers(
    tasks: list[tuple[int, Callable[..., tuple[str, str]], tuple[Any, ...]]],
    jobs: int,
    report: Callable[[int, tuple[str, str]], None],
    gpus: list[str] | None = None,
    started: Callable[[int], None] | None = None,
) -> None:
    """Run ``tasks`` (index, fn, args), ``jobs`` at a time, in spawned worker processes.

    ``report(index, result)`` is called in this process as each finishes (``started(index)``
    as each is handed to a worker). A worker that dies
    mid-task (segfault, OOM killer) costs only its own task, reported FAILED; a fresh worker takes
    its slot (its GPU) and the other tasks go on.
    """
    from mmbalance.engine.runtime import cpu_budget

    ctx = mp.get_context("spawn")
    threads = max(1, cpu_budget()[0] // max(1, jobs))  # this process's CPUs (Slurm, affinity)
    queue = deque(tasks)
    workers: list[_Worker] = []
    done = False

    def feed(w: _Worker) -> None:
        if not queue:
            w.retire()
            return
        index, fn, args = queue.popleft()
        w.task = index
        if started is not None:
            started(index)
        with contextlib.suppress(OSError):  # died while idle: its poll() reports the task FAILED
            w.conn.send((index, fn, args))

    try:
        for slot in range(min(jobs, len(queue))):
            workers.append(_Worker(ctx, slot, gpus, threads))
        for w in workers:
            feed(w)
        while busy := [w for w in workers if w.task is not None]:
            wait([w.conn for w in busy] + [w.proc.sentinel for w in busy])
            for w in busy:
                result = w.poll()
                if result is None:
                    continue
                assert w.task is not None
                report(w.task, result)
                w.task = None
                if w.proc.is_alive():
                    feed(w)
                    continue
                w.stop(terminate=True)  # died: a fresh worker takes its slot
                workers.remove(w)
                if queue:
                    fresh = _Worker(ctx, w.slot, gpus, threads)
                    workers.append(fresh)
                    feed(fresh)
        done = True
    finally:
        for w in workers:
            w.stop(terminate=not done)


# ---- the grid ---------------------------------------------------------------------------------
def _listed(items: list[str], sep: str = "; ") -> str:
    extra = f"{sep}... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return sep.join(items[:MAX_LISTED]) + extra


def check_grid(grid: Grid, base: Mapping[str, Any]) -> list[CellState]:
    """(state, detail) of every cell, as :func:`check_cell`; two cells that resolve to the same
    run folder are invalid too (they would train into each other's records)."""
    states = [check_cell(cell, base) for cell in grid.cells]
    n = len(grid.cells)
    first: dict[str, int] = {}
    for i, (state, detail) in enumerate(states):
        if state in ("new", "resume", "done"):
            if detail in first:
                j = first[detail]
                states[i] = CellState("invalid", f"it resolves to the same configuration and run folder as "
                                                 f"cell [{j + 1}/{n}] ({grid.cells[j]}); list each cell once.")
            else:
                first[detail] = i
    return states


def cost_keys(cell: Cell) -> tuple[tuple[Any, ...], ...]:
    """What a cell's cost is predicted from, most specific first: the same configuration (any
    seed), the same method on the same dataset, the same dataset."""
    same = json.dumps(cell.overrides, sort_keys=True, default=str)
    return (("config", cell.method, cell.dataset, same), ("method", cell.method, cell.dataset), ("dataset", cell.dataset))


def eta_seconds(
    keys: Sequence[tuple[tuple[Any, ...], ...]], took: Mapping[int, float], running: Mapping[int, float],
    waiting: Iterable[int], jobs: int,
) -> float:
    """Wall seconds left: each unfinished cell costs the mean wall time of the finished cells
    most like it (``keys[i]``, cell i's :func:`cost_keys`, computed once per grid; the mean of
    all of them when none is alike), less what a
    running cell has already run (``running``: its seconds so far), shared by ``jobs`` workers.

    Per kind rather than one mean, because a grid's cells differ by orders of magnitude (an
    AV-digits cell costs thirty synthetic ones) and run in file order, so one mean overstates
    or understates for most of the grid. NaN before any cell finished."""
    if not took:
        return float("nan")
    seen: dict[tuple[Any, ...], list[float]] = {}
    for i, t in took.items():
        for key in keys[i]:
            seen.setdefault(key, []).append(t)
    overall = sum(took.values()) / len(took)

    def expected(i: int) -> float:
        return next((sum(v) / len(v) for key in keys[i] if (v := seen.get(key))), overall)

    left = sum(max(0.0, expected(i) - ran) for i, ran in running.items()) + sum(expected(i) for i in waiting)
    return left / max(1, jobs)


def progress_line(outcomes: Mapping[int, str], to_train: int, eta_s: float, jobs: int) -> str:
    """Cells done / running / failed / remaining, and the ETA (:func:`eta_seconds`)."""
    finished = sum(o in (TRAINED, FAILED) for o in outcomes.values())
    failed = sum(o == FAILED for o in outcomes.values())
    left = max(0, to_train - finished)
    running = min(jobs, left)
    eta_text = "–" if eta_s != eta_s else (f"{eta_s / 60:.1f} min" if eta_s >= 90 else f"{eta_s:.0f} s")
    return (f"  progress: {finished - failed} trained, {running} running, {failed} failed, "
            f"{left - running} waiting of {to_train}; ETA {eta_text}")


def _cell_key(cell: Cell, base: Mapping[str, Any]) -> str:
    """The key its runs carry in a report (``report_runs.cell_key``: the configuration without
    the seed, and the data fingerprint)."""
    from mmbalance.report_runs import cell_key

    trainer = cell_trainer(cell, base)
    return cell_key(trainer.cfg, trainer.data_fingerprint)


def study_groups(grid: Grid, base: Mapping[str, Any]) -> list[list[Cell]]:
    """The cells of each method x setting a tuned grid gives one study (seeds apart), those
    the method refuses left out."""
    groups: dict[str, list[Cell]] = {}
    for c in grid.cells:
        groups.setdefault(repr((c.method, c.dataset, sorted(c.overrides.items(), key=str))), []).append(c)
    return [cells for cells in groups.values() if check_cell(cells[0], base).state != NOT_APPLICABLE]


def study_base(grid: Grid, cells: Sequence[Cell], base: Mapping[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """The base settings of the study of ``cells`` and the seeds each of its trials trains."""
    assert grid.tune is not None
    seeds = list(grid.tune.seeds or [cells[0].seed])
    return {**cells[0].overrides, **base, "seed": seeds[0]}, seeds


def best_cells(cells: Sequence[Cell], base: Mapping[str, Any], name: str, best: Mapping[str, Any],
               have: set[str]) -> list[Cell]:
    """The best configuration of a study over every seed of its setting, except the cells
    whose run folder is already in ``have`` (a best equal to the defaults adds nothing)."""
    out = []
    for c in cells:
        tuned = Cell(c.method, c.dataset, c.seed, {**c.overrides, **best},
                     {**c.origins, **{k: f"study {name}" for k in best}}, dict(best), "tuned")
        state = check_cell(tuned, base)
        if state.detail not in have:
            have.add(state.detail)
            out.append(tuned)
    return out


def tuned_grid(grid: Grid, base: Mapping[str, Any], jobs: int = 1, say: Callable[[str], None] | None = None) -> Grid:
    """Tune every method x setting of the grid with the same budget (one study each, on
    validation), then add its best configuration over the grid's seeds. A best configuration
    equal to the defaults adds no cell (its runs are the defaults' runs). Each study records
    the cell keys of its defaults' and its best runs (what the leaderboard pairs them by)."""
    from mmbalance import tune as tuning

    say = say or tuning._print
    assert grid.tune is not None
    spec = grid.tune
    groups = study_groups(grid, base)
    have = {check_cell(c, base).detail for c in grid.cells}
    extra: list[Cell] = []
    for i, cells in enumerate(groups, 1):
        first = cells[0]
        settings, seeds = study_base(grid, cells, base)
        say(f"tune [{i}/{len(groups)}] {first.method} on {first.dataset}: {spec.trials} trials, seeds {seeds}")
        result = tuning.tune(first.method, first.dataset, spec.trials, settings,
                             jobs=jobs, seeds=seeds, say=lambda line: say(f"  {line}"))
        if result.best_value is None:
            continue
        extra += best_cells(cells, base, result.name, result.best_params, have)
        if result.db.is_file():
            tuning.link_grid_cells(result.db, result.name, _cell_key(first, base),
                                   _cell_key(Cell(first.method, first.dataset, first.seed,
                                                  {**first.overrides, **result.best_params}), base), grid.name)
    return Grid(grid.name, grid.cells + extra, grid.records, grid.slurm, None)


def run_grid(
    grid: Grid, shared: Mapping[str, Any], dry_run: bool = False, jobs: int = 1, gpus: list[str] | None = None
) -> int:
    """Check every cell, then run them; returns 0 when every cell trained, was already done or
    is not applicable, 1 when any failed (or, with ``dry_run``, is invalid).

    Raises ConfigError naming every invalid cell before any trains. ``jobs > 1`` runs that many
    cells at once in worker processes; with ``gpus`` each worker owns one GPU (one cell per
    listed GPU at a time). Cells never share a run directory, so parallel workers cannot
    corrupt each other's records.
    """
    base = {"records": grid.records or "runs", "progress": "off", "log_epochs": False, **shared}
    if grid.tune is not None and not dry_run:
        invalid = bad_cells_error(grid, check_grid(grid, base), "no study and no cell was trained")
        if invalid:
            raise invalid
        grid = tuned_grid(grid, base, jobs)
    elif grid.tune is not None:
        print(f"grid {grid.name}: tune: {grid.tune.trials} trials per method x setting, then each best "
              f"configuration over the grid's seeds (not listed in a dry run)", flush=True)
    n = len(grid.cells)
    tags = [f"[{i}/{n}] {c}" for i, c in enumerate(grid.cells, 1)]
    states = check_grid(grid, base)
    invalid = bad_cells_error(grid, states, "no cell was trained")

    if dry_run:
        for tag, (state, detail) in zip(tags, states, strict=True):
            what = {"invalid": "INVALID — ", NOT_APPLICABLE: "not applicable — "}.get(state)
            print(f"{tag}: {what}{detail}" if what else f"{tag}: {state} ({detail})", flush=True)
        for line in _choice_lines(st for st in states if st.state == "invalid"):
            print(line, flush=True)
        counts = {s: sum(st == s for st, _ in states) for s in ("new", "resume", "done", NOT_APPLICABLE, "invalid")}
        print(f"grid {grid.name} (dry run): {n} cells: {counts['new']} new, {counts['resume']} to resume, "
              f"{counts['done']} done, {counts[NOT_APPLICABLE]} not applicable, {counts['invalid']} INVALID",
              flush=True)
        return 1 if invalid else 0
    if invalid:
        raise invalid

    outcomes: dict[int, str] = {}
    to_train = sum(st not in ("done", NOT_APPLICABLE) for st, _ in states)
    width = max(1, jobs if not gpus else len(gpus))
    begun: dict[int, float] = {}  # running cells: when they started
    took: dict[int, float] = {}  # trained cells: their wall seconds
    keys = [cost_keys(c) for c in grid.cells]

    def start(i: int) -> None:
        begun[i] = time.perf_counter()

    def report(i: int, result: tuple[str, str]) -> None:
        outcomes[i] = result[0]
        now = time.perf_counter()
        if i in begun and result[0] == TRAINED:
            took[i] = now - begun[i]
        begun.pop(i, None)
        print(f"{tags[i]}: {result[1]}", flush=True)
        if result[0] in (TRAINED, FAILED) and to_train:
            waiting = [j for j in todo if j not in outcomes and j not in begun]
            eta = eta_seconds(keys, took, {j: now - t for j, t in begun.items()}, waiting, width)
            print(progress_line(outcomes, to_train, eta, width), flush=True)

    if gpus:
        jobs = len(gpus)
    in_process = jobs <= 1 and not gpus  # a single listed GPU still gets a worker, pinned to it
    todo = [i for i, (state, _) in enumerate(states) if state not in ("done", NOT_APPLICABLE)]
    for i, (state, detail) in enumerate(states):
        if state == "done":
            report(i, (SKIPPED, "done, skipped"))
        elif state == NOT_APPLICABLE:
            report(i, (NOT_APPLICABLE, f"not applicable — {detail}"))
        elif in_process:
            start(i)
            report(i, run_cell(grid.cells[i], base))
    if todo and not in_process:
        run_in_workers([(i, run_cell, (grid.cells[i], base)) for i in todo], jobs, report, gpus, start)

    failed = [tags[i] for i in range(n) if outcomes.get(i) == FAILED]
    count = {s: sum(o == s for o in outcomes.values()) for s in (TRAINED, SKIPPED, NOT_APPLICABLE)}
    summary = (f"grid {grid.name}: {count[TRAINED]} done, {count[SKIPPED]} skipped (already done), "
               f"{count[NOT_APPLICABLE]} not applicable, {len(failed)} FAILED")
    print(summary + (f": {_listed(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0
