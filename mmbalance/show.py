"""``mmbalance show RUN_DIR``: one run at a glance, finished, still running or killed.

Reads only the run folder (record.jsonl, LOCK, DONE, pictures), never through a symbolic link
and without creating anything in it: the configuration summary, the per-epoch table, the final
metrics under every selection rule and where the pictures are. Epochs are counted from 1, as
the per-epoch lines of a run count them (the record's ``epoch`` field counts from 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmbalance import records
from mmbalance.errors import MMBalanceError


def plural(n: object, word: str) -> str:
    """'1 epoch', '3 epochs' (every human count of epochs, runs, cells)."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def run_state(run_dir: Path) -> str:
    """done | running (pid N) | stopped (killed or interrupted; rerun to resume).

    Reads only: no LOCK is created or locked for writing (records.lock_holder), so a run
    folder on read-only media, or one being trained, is shown as it is."""
    if records.is_done(run_dir):
        return "done"
    holder = records.lock_holder(run_dir)
    if holder is not None:
        return f"running ({holder.split(',')[0]})"
    return "stopped before the end (killed or interrupted): rerun the same command to resume"


def _number(value: Any) -> str:
    """A metric as the tables print it; '–' where the record has none (e.g. no MAP)."""
    return "–" if value is None else f"{value:.2f}"


def epoch_rows(rec: dict[str, Any]) -> list[list[Any]]:
    """One printed row per recorded epoch (records.check_record has vouched for the fields)."""
    mods = rec["header"].get("modalities") or []
    rows = []
    for e in rec["epochs"]:
        val, test = e.get("val"), e.get("test")
        row = [e["epoch"] + 1, f"{e['train_loss']:.4f}",
               _number(val["fused"]["acc"]) if val else "–", _number(test["fused"]["acc"]) if test else "–"]
        row += [_number(test[m].get("acc")) if test and isinstance(test.get(m), dict) else "–" for m in mods]
        row.append(f"{e['train_time_s']:.1f}")
        rows.append(row)
    return rows


def render(run_dir: Path) -> str:
    from tabulate import tabulate

    run_dir = Path(run_dir)
    if not (run_dir / records.RECORD).exists():
        raise MMBalanceError(
            f"'{run_dir}' holds no {records.RECORD}: it is not a run folder (or the run has not "
            f"finished its set-up yet). Run folders are under --records, named "
            f"<dataset>_<method>_s<seed>_<hash>."
        )
    rec = records.load_record(run_dir)  # a running or killed run has no final row yet
    records.check_record(rec)  # one line naming the damage, the reason a leaderboard skips the run
    h = rec["header"]
    cfg = h.get("config", {})
    mods = h.get("modalities") or []
    info = h.get("dataset_info") or {}
    out = [
        f"run      {run_dir}",
        f"state    {run_state(run_dir)}",
        f"method   {h.get('method_label', cfg.get('method'))}   dataset {cfg.get('dataset')}   seed {cfg.get('seed')}"
        f"   protocol {cfg.get('protocol', 'honest')}",
        f"recipe   {plural(cfg.get('epochs'), 'epoch')}, batch {cfg.get('batch_size')}, {cfg.get('optimizer')} lr "
        f"{cfg.get('lr')}, {cfg.get('scheduler')} schedule, amp {h.get('amp')}, device {h.get('device')}",
        f"data     {', '.join(map(str, mods))}; sizes {info.get('sizes')}"
        + ("; validation is the test split" if info.get("val_is_test") else ""),
        "",
        tabulate(epoch_rows(rec), headers=["epoch", "loss", "val", "test", *[f"test[{m}]" for m in mods], "s"],
                 disable_numparse=True),
    ]
    if rec["final"] is not None:
        sel = []
        for rule, chosen in rec["final"]["selection"].items():
            t = chosen["test"]
            if t is None:  # a tuning trial (eval_test=false): no test metrics exist
                sel.append([rule, chosen["epoch"] + 1, "–", "–", "–", *["–" for _ in mods]])
                continue
            fused = [_number(t["fused"].get(k)) for k in ("acc", "map", "f1")]
            sel.append([rule, chosen["epoch"] + 1, *fused,
                        *[_number(t[m].get("acc")) if isinstance(t.get(m), dict) else "–" for m in mods]])
        if cfg.get("eval_test") is False:
            out += ["", "a tuning trial (eval_test=false): the test split was never evaluated"]
        out += ["", "final (test, %):", tabulate(sel, headers=["rule", "epoch", "acc", "MAP", "macro-F1",
                                                                *[f"acc[{m}]" for m in mods]], disable_numparse=True)]
    pictures = sorted(run_dir.glob("*.png")) + sorted((run_dir / "plots").glob("*.png"))
    diag = run_dir / "diagnostics.json"
    out.append("")
    out.append("pictures: " + (", ".join(str(p) for p in pictures) if pictures
                               else f"none yet (draw them with `mmbalance plot {run_dir}`)"))
    if diag.exists():
        out.append(f"imbalance diagnostics: {diag}")
    return "\n".join(out)
