"""Leaderboards are computed from real recorded runs: means, stds, ranks, captions, CSV."""

from __future__ import annotations

import pandas as pd
import pytest

from mmbalance.cli import main
from mmbalance.errors import MMBalanceError
from mmbalance.leaderboard import write_leaderboard
from mmbalance.runner import run


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    base = {"records": str(root), "progress": "off", "epochs": 2, "n_train": 300, "n_test": 150}
    results = {}
    for method in ("concat", "sum"):
        for seed in (0, 1):
            results[(method, seed)] = run(method, "synthetic", {**base, "seed": seed})
    run("concat", "synthetic", {**base, "seed": 5, "epochs": 3}).run_dir  # noqa: B018 - different config
    # an unfinished run must be ignored
    (root / "junk").mkdir()
    return root, results


def test_leaderboard_from_records(recorded, tmp_path):
    root, results = recorded
    md, csv = write_leaderboard(root, tmp_path, "lb", rules=("best_val",))
    df = pd.read_csv(csv)
    assert len(df) == 5
    accs = [results[("concat", s)].final["best_val"]["test"]["fused"]["acc"] for s in (0, 1)]
    assert set(df.method) == {"Concat (epochs=2)", "Concat (epochs=3)", "Sum"}
    sub = df[df.method == "Concat (epochs=2)"]
    assert sorted(sub["best_val.fused.acc"]) == pytest.approx(sorted(accs))
    text = md.read_text()
    mean, std = pd.Series(accs).mean(), pd.Series(accs).std()
    assert f"{mean:.2f} ± {std:.2f}" in text
    assert "rule `best_val`" in text and "seeds per dataset" not in text
    assert "**" in text and "<u>" in text
    assert "test metrics at the epoch of best validation accuracy" in text
    assert "Per-modality" in text and "Training time per epoch" in text


def test_cli_writes_files_and_reports_empty_dirs(recorded, tmp_path, capsys):
    root, _ = recorded
    assert main(["leaderboard", "--records", str(root), "--out", str(tmp_path), "--name", "x"]) == 0
    assert (tmp_path / "x.md").exists() and (tmp_path / "x.csv").exists()
    text = (tmp_path / "x.md").read_text()
    assert "best_test" in text and "papers' protocol" in text
    with pytest.raises(MMBalanceError, match="No finished runs"):
        write_leaderboard(tmp_path / "empty", tmp_path)
