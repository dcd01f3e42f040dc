"""Grids: cells from a YAML file, finished cells skipped, parallel workers, bad files."""

from __future__ import annotations

import pytest

from mmbalance.errors import ConfigError
from mmbalance.grid import load_grid, run_grid
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
