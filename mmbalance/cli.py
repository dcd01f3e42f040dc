"""The ``mmbalance`` command line: list, run, grid, leaderboard, prepare.

Problems the user can fix (unknown names, missing data, bad settings) are printed as one
paragraph with a non-zero exit code; tracebacks are kept for bugs.
"""

from __future__ import annotations

import argparse
import signal
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmbalance.errors import MMBalanceError


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the dataset's)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--data-root", help="data root (default $MMBALANCE_DATA_ROOT, ./data or ../shared/data)")
    p.add_argument("--records", help="directory for run records (default ./runs)")
    p.add_argument("--config", help="YAML file of settings (applied before --set)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting; repeatable (e.g. --set lr=0.01 --set backbone.audio=resnet18)")
    p.add_argument("--fresh", action="store_true", help="discard an earlier record/checkpoint of this exact run")
    p.add_argument("--quiet", action="store_true", help="print only the final table (no bar, no epoch lines)")
    p.add_argument("--protocol", choices=["honest", "paper"],
                   help="honest (default): select on a validation split carved from train; paper: the "
                        "official scripts' protocol (all of train, select on test, fp32, paper recipe)")


def _prepare_epilog() -> str:
    from mmbalance.prepare import RAW_LAYOUTS, preparer_options

    parts = []
    for name, layout in RAW_LAYOUTS.items():
        opts = ", ".join(f"{k}={v!r}" for k, v in preparer_options(name).items())
        parts.append(f"{name}:\n" + textwrap.indent(textwrap.fill(layout, 96), "  ")
                     + "\n" + textwrap.indent(textwrap.fill(f"options (--set): {opts}", 96), "  "))
    return "\n\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmbalance",
        description="Benchmark suite for multimodal-imbalance (modality rebalancing) methods.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p_list = sub.add_parser("list", help="list registered methods, datasets or backbones")
    p_list.add_argument("what", choices=["methods", "datasets", "backbones"])

    p_run = sub.add_parser("run", help="train one method on one dataset and record the run")
    p_run.add_argument("--method", required=True)
    p_run.add_argument("--dataset", required=True)
    _add_run_args(p_run)

    p_tune = sub.add_parser("tune", help="search a method's settings on validation (Optuna study, fixed budget)")
    p_tune.add_argument("--method", required=True)
    p_tune.add_argument("--dataset", required=True)
    p_tune.add_argument("--trials", type=int, required=True,
                        help="finished trials (complete or pruned) the study holds at the end")
    p_tune.add_argument("--jobs", type=int, default=1, help="worker processes on the study (default 1)")
    p_tune.add_argument("--seed", type=int, help="seed of every trial's run and of the sampler (default 0)")
    p_tune.add_argument("--epochs", type=int, help="training epochs of each trial (default: the dataset's)")
    p_tune.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    p_tune.add_argument("--data-root", help="data root (default $MMBALANCE_DATA_ROOT, ./data or ../shared/data)")
    p_tune.add_argument("--records", help="directory for the trials' runs and studies/ (default ./runs)")
    p_tune.add_argument("--config", help="YAML file of settings (applied before --set)")
    p_tune.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a base setting of every trial; a searched key set here is fixed, not searched")
    p_tune.add_argument("--prune-startup", type=int, default=5,
                        help="trials that finish before the median pruner stops any (default 5)")
    p_tune.add_argument("--prune-warmup", type=int, default=0,
                        help="epochs of every trial before it may be pruned (default 0)")

    p_cfg = sub.add_parser("config", help="show every setting a run would use, with its help and owner")
    p_cfg.add_argument("--method", required=True)
    p_cfg.add_argument("--dataset", required=True)
    _add_run_args(p_cfg)

    p_grid = sub.add_parser("grid", help="run every cell of a method x dataset x seed grid (YAML)")
    p_grid.add_argument("grid_file", help="YAML grid definition (see benchmarks/grids/)")
    p_grid.add_argument("--records", help="directory for run records (default: the grid's, else ./runs)")
    p_grid.add_argument("--device", help="device for every cell")
    p_grid.add_argument("--data-root", help="data root for every cell")
    p_grid.add_argument("--dry-run", action="store_true", help="list the cells and their state, run nothing")
    p_grid.add_argument("--profile", metavar="NAME",
                        help="only the cells of one of the grid file's profiles (e.g. quick: a first look whose "
                             "records the whole grid reuses)")
    p_grid.add_argument("--jobs", type=int, default=1, help="cells run at once in worker processes (default 1)")
    p_grid.add_argument("--gpus", help="one cell per GPU at a time: 'all' or a list like 0,1")
    p_grid.add_argument("--launcher", choices=["pool", "local", "slurm"], default="pool",
                        help="pool: worker processes here (default); slurm: a Slurm job array through "
                             "submitit; local: the same path through submitit's local executor")
    p_grid.add_argument("--status", action="store_true",
                        help="list each cell as done (with its result), queued or running (with its job), "
                             "failed, timed out or pending; creates nothing")
    p_grid.add_argument("--wait", action="store_true",
                        help="with --launcher slurm: wait for the submitted cells and print each one's result "
                             "(the local launcher always waits)")
    for name, help_ in (("gpus-per-task", "GPUs per Slurm task"), ("cpus-per-task", "CPUs per Slurm task"),
                        ("mem-gb", "memory per Slurm task (GB)"), ("time-min", "time limit per task (minutes)"),
                        ("partition", "Slurm partition"), ("account", "Slurm account"), ("qos", "Slurm QOS"),
                        ("array-parallelism", "tasks of the array running at once")):
        p_grid.add_argument(f"--{name}", dest=name.replace("-", "_"), help=help_)

    p_show = sub.add_parser("show", help="one run at a glance: settings, per-epoch table, final metrics")
    p_show.add_argument("run_dir", help="a run folder (finished, running or killed)")

    p_probe = sub.add_parser("probe", help="imbalance diagnostics of a recorded run (linear probes, Shapley)")
    p_probe.add_argument("run_dir", help="a run folder with a checkpoint")
    p_probe.add_argument("--device", default="cpu", help="device for the probe passes (default cpu)")

    p_plot = sub.add_parser("plot", help="draw PNG pictures of a run folder or of a records folder")
    p_plot.add_argument("target", help="RUN_DIR (its diagnostics and accuracy) or RECORDS_DIR (comparisons)")
    p_plot.add_argument("--out", help="output folder (default: <target>/plots)")
    p_plot.add_argument("--rule", default="best_val", help="selection rule of the comparisons (default best_val)")

    p_lb = sub.add_parser("leaderboard", help="write markdown + CSV leaderboards from recorded runs")
    p_lb.add_argument("--records", default="runs", help="directory holding run records (default ./runs)")
    p_lb.add_argument("--out", default="leaderboards", help="output directory (default ./leaderboards)")
    p_lb.add_argument("--name", default="leaderboard", help="file stem of the outputs")
    p_lb.add_argument("--title", help="title of the markdown report")
    p_lb.add_argument("--no-pictures", action="store_true", help="do not draw the CD diagram and cost chart")
    p_lb.add_argument("--reference", help="method label the paired tests compare with (default 'Concat + uni CE')")
    p_lb.add_argument("--format", default="markdown", choices=["markdown", "latex", "all"],
                      help="markdown (+ CSV, default), latex (booktabs .tex tables too) or all")
    p_lb.add_argument("--layout", default="generic", choices=["generic", "paper"],
                      help="generic: a table per metric and rule (default); paper: the IPRM paper's "
                           "Tables 1-4, statistics, diagnostics and pictures, for the first --rule")
    p_lb.add_argument("--rule", dest="rules", action="append",
                      help="selection rule(s): best_val, best_test, last (default: all three)")

    p_prep = sub.add_parser(
        "prepare", help="one-time preparation of a raw paper dataset",
        description="Turn a raw release into the layout a dataset plugin reads.",
        epilog=_prepare_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_prep.add_argument("dataset")
    p_prep.add_argument("--raw", help="folder of the raw release (not needed with --cache alone)")
    p_prep.add_argument("--cache", nargs="?", const=True, default=None, metavar="DIR",
                        help="also build the input cache (cremad, ksounds) in DIR (default <out>-cache); "
                             "without --raw, build only the cache of the prepared layout in --out")
    p_prep.add_argument("--out", required=True, help="data root to write the prepared layout into")
    p_prep.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="preparer option (e.g. --set fps=1)")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from mmbalance.config import parse_overrides

    out: dict[str, Any] = {}
    for key, attr in (("seed", "seed"), ("epochs", "epochs"), ("device", "device"),
                      ("data_root", "data_root"), ("records", "records"), ("protocol", "protocol")):
        value = getattr(args, attr, None)
        if value is not None:
            out[key] = value
    if getattr(args, "quiet", False):
        out.update(progress="off", log_epochs=False)
    out.update(parse_overrides(getattr(args, "sets", [])))
    return out


def cmd_list(args: argparse.Namespace) -> int:
    from mmbalance.registry import BACKBONES, DATASETS, METHODS

    reg = {"methods": METHODS, "datasets": DATASETS, "backbones": BACKBONES}[args.what]
    entries = reg.entries()
    width = max(len(e.name) for e in entries)
    for e in entries:
        print(f"{e.name:<{width}}  {e.description}")
    return 0


def summary_table(record: dict[str, Any]) -> str:
    from tabulate import tabulate

    header = record["header"]
    rows = []
    for rule, chosen in record["final"]["selection"].items():
        test = chosen["test"] or {}  # none when the run did not evaluate test (eval_test=false)
        if not test:
            rows.append([rule, chosen["epoch"] + 1, "–", "–", "–"] + ["–" for _ in header["modalities"]])
            continue
        row = [rule, chosen["epoch"] + 1, f"{test['fused']['acc']:.2f}", f"{test['fused']['map']:.2f}",
               f"{test['fused']['f1']:.2f}"]
        row += [f"{test[m]['acc']:.2f}" if m in test else "–" for m in header["modalities"]]
        rows.append(row)
    cols = ["rule", "epoch", "acc", "MAP", "macro-F1"] + [f"acc[{m}]" for m in header["modalities"]]
    return tabulate(rows, headers=cols)


def cmd_run(args: argparse.Namespace) -> int:
    from mmbalance.engine.loop import FINISHED_BEFORE
    from mmbalance.runner import run
    from mmbalance.show import plural

    result = run(args.method, args.dataset, _overrides(args), yaml_path=args.config, fresh=args.fresh)
    rec = result.record
    h = rec["header"]
    if result.outcome == FINISHED_BEFORE:
        print(f"This run is already finished ({result.run_dir}); nothing was trained. Its results are "
              f"below; add --fresh to train it again.")
    print(f"{h['method_label']} on {h['dataset_info'].get('name', h['config']['dataset'])} "
          f"(seed {h['config']['seed']}, {plural(len(rec['epochs']), 'epoch')}, {h['device']}) — test metrics in %:")
    print(summary_table(rec))
    if h["config"].get("protocol") == "paper":
        print("protocol paper: trained on all of train and validated on the test split, so best_val is "
              "best_test (selection on the test set, the official scripts' protocol; optimistic).")
    else:
        print("best_test selects on the test set (the papers' protocol, optimistic); prefer best_val.")
    print(f"record: {result.run_dir / 'record.jsonl'}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from mmbalance.tune import tune

    result = tune(args.method, args.dataset, args.trials, _overrides(args), jobs=args.jobs, yaml_path=args.config,
                  prune_startup=args.prune_startup, prune_warmup=args.prune_warmup)
    return 0 if result.best_value is not None else 1


def cmd_config(args: argparse.Namespace) -> int:
    from mmbalance.config import describe
    from mmbalance.runner import resolve_config

    cfg, dataset_cls, method_cls = resolve_config(args.method, args.dataset, _overrides(args), args.config)
    print(describe(cfg, dataset_cls, method_cls))
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from mmbalance.grid import load_grid, run_grid

    grid = load_grid(args.grid_file, profile=args.profile)
    shared = {k: v for k, v in (("records", args.records), ("device", args.device), ("data_root", args.data_root)) if v}
    base = {"records": grid.records or "runs", **shared}
    if args.status:
        from mmbalance.launchers import grid_status

        if grid.tune is not None:
            from mmbalance.tune_launch import tuned_status

            grid = tuned_status(grid, {"progress": "off", "log_epochs": False, **base})
        return grid_status(grid, {"progress": "off", "log_epochs": False, **base})
    if args.launcher != "pool":
        from mmbalance.launchers import RESOURCES, submit_grid

        resources = {**grid.slurm, **{k: getattr(args, k) for k in RESOURCES if getattr(args, k, None) is not None}}
        if grid.tune is not None:
            from mmbalance.tune_launch import submit_tuned_grid

            return submit_tuned_grid(grid, base, args.launcher, resources, dry_run=args.dry_run,
                                     wait=args.wait or None, workers=args.jobs)
        return submit_grid(grid, base, args.launcher, resources, dry_run=args.dry_run, wait=args.wait or None)
    gpus = None
    if args.gpus:
        import torch

        gpus = ([str(i) for i in range(torch.cuda.device_count())] if args.gpus == "all"
                else [g.strip() for g in args.gpus.split(",") if g.strip()])
        if not gpus:
            raise MMBalanceError("--gpus all was given, but PyTorch sees no CUDA device; drop --gpus.")
        shared["device"] = "cuda"
    return run_grid(grid, shared, dry_run=args.dry_run, jobs=args.jobs, gpus=gpus)


def cmd_leaderboard(args: argparse.Namespace) -> int:
    import warnings

    from mmbalance.leaderboard import write_leaderboard
    from mmbalance.records import ensure_dir

    ensure_dir(Path(args.out))
    with warnings.catch_warnings(record=True) as caught:
        # every report warning (a damaged record, a copy of a run, a row or picture left out)
        # is printed below, once, as one line
        warnings.simplefilter("always")
        if args.layout == "paper":
            from mmbalance.paper_tables import write_benchmark

            written = write_benchmark(Path(args.records), Path(args.out), args.name, args.title,
                                      (args.rules or ["best_val"])[0], pictures=not args.no_pictures,
                                      latex=args.format in ("latex", "all"))
        else:
            extra = {"reference": args.reference} if args.reference else {}
            files = write_leaderboard(Path(args.records), Path(args.out), args.name,
                                      tuple(args.rules or ("best_val", "best_test", "last")), args.title,
                                      pictures=not args.no_pictures, latex=args.format in ("latex", "all"), **extra)
    from mmbalance.paper_tables import LeftOutWarning
    from mmbalance.report_runs import DamagedRecordWarning, DuplicateRunWarning

    report_warnings = (DamagedRecordWarning, DuplicateRunWarning, LeftOutWarning)
    for w in caught:
        if issubclass(w.category, report_warnings):
            print(f"warning: {w.message}", file=sys.stderr)
    if args.layout == "paper":
        for path in written:
            print(f"wrote {path}")
        return 0
    md, csv = files
    skipped = len(getattr(files, "skipped", []))
    print(f"wrote {md} and {csv}" + (f" ({skipped} damaged record(s) skipped)" if skipped else ""))
    for extra_file in [*getattr(files, "pictures", []), *getattr(files, "latex", [])]:
        print(f"wrote {extra_file}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from mmbalance.diagnose import probe_main

    return probe_main(args.run_dir, args.device)


def cmd_plot(args: argparse.Namespace) -> int:
    from mmbalance.plots import plot_main

    return plot_main(args.target, args.out, args.rule)


def cmd_show(args: argparse.Namespace) -> int:
    from mmbalance.show import render

    print(render(Path(args.run_dir)))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from mmbalance.config import parse_overrides
    from mmbalance.prepare import prepare

    sets = parse_overrides(args.sets)
    if args.raw is None:
        if args.cache is None:
            raise MMBalanceError("mmbalance prepare needs --raw RAW (the raw release), or --cache to build only "
                                 "the input cache of an already prepared --out folder.")
        from mmbalance.prepare import prepare_cache

        cache = Path(args.out + "-cache") if args.cache is True else Path(args.cache)
        summary = prepare_cache(args.dataset, Path(args.out), cache, **sets)
    else:
        if args.cache is not None:
            sets["cache"] = args.cache
        summary = prepare(args.dataset, Path(args.raw), Path(args.out), **sets)
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


COMMANDS = {"list": cmd_list, "config": cmd_config, "run": cmd_run, "tune": cmd_tune, "grid": cmd_grid, "show": cmd_show, "probe": cmd_probe, "plot": cmd_plot,
            "leaderboard": cmd_leaderboard, "prepare": cmd_prepare}


def _fill(text: str, indent: str) -> str:
    """A message wrapped at 100 columns that never splits a word or a path at its hyphens, so a
    file named in it can be copied from the terminal as it is. Each line of the message is
    wrapped on its own (a grid's bad cells, one per line); a line that starts with spaces is a
    quotation (a YAML line and its caret) and is kept exactly, only indented."""
    out = []
    for i, line in enumerate(text.split("\n")):
        if line.startswith(" "):
            out.append(indent + line)
        else:
            out.append(textwrap.fill(line, width=100, initial_indent="" if i == 0 else indent,
                                     subsequent_indent=indent, break_on_hyphens=False,
                                     break_long_words=False))
    return "\n".join(out)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return "warning: " + _fill(str(message), "         ") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import warnings

    warnings.formatwarning = _format_warning  # one readable paragraph, no source line
    from mmbalance.engine import stop

    try:
        with stop.handled(signal.SIGTERM):  # like Ctrl-C, at the next batch boundary
            return COMMANDS[args.command](args)
    except MMBalanceError as exc:
        print("error: " + _fill(str(exc), "       "), file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"\n{INTERRUPTED}", file=sys.stderr)
        return 128 + exc.signum if isinstance(exc, stop.StopRequested) else 130


INTERRUPTED = "interrupted: the last finished epoch is checkpointed; rerun the same command to resume."


if __name__ == "__main__":
    sys.exit(main())
