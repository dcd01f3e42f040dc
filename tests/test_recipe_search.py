"""The rules of the validation-only recipe search (benchmarks/recipe_search.py), by hand, and one
tiny real search."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "recipe_search.py"
spec = importlib.util.spec_from_file_location("recipe_search", PATH)
rs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rs)


def cand(epochs, lr, mean, se=0.2):
    return {"epochs": epochs, "lr": lr, "mean": mean, "se": se}


def test_batch_size_rule():
    """64 unless an epoch would have fewer than ~10 steps: image-seg's 168 -> 16, CREMA-D's 503
    -> 32, reuters' 810 -> 64; never below 16."""
    assert [rs.batch_size_rule(n) for n in (3991, 810, 640, 639, 503, 168, 40)] == [64, 64, 64, 32, 32, 16, 16]


def test_choose_the_fewest_epochs_within_noise_of_the_best():
    """Best 82.9 (se 0.7): within max(1.0, 0.7) are 82.07 at 20 epochs and 82.9 at 80 -> 20.
    With a larger se (3.0) 10 epochs at 80.0 qualifies too. Among equally short ones the higher
    mean. Wrong variants caught: the best mean (80 epochs), the margin as a fraction of the mean."""
    c = [cand(10, 0.1, 74.7), cand(20, 0.1, 82.07), cand(20, 0.05, 76.8), cand(80, 0.1, 82.9, se=0.7)]
    chosen = rs.choose(c)
    assert (chosen["epochs"], chosen["lr"]) == (20, 0.1) and chosen["margin"] == 1.0
    assert chosen["best"] == {"epochs": 80, "lr": 0.1}
    noisy = [cand(10, 0.05, 80.0), cand(10, 0.01, 79.5), cand(40, 0.05, 82.9, se=3.0)]
    assert (rs.choose(noisy)["epochs"], rs.choose(noisy)["lr"]) == (10, 0.05)
    assert rs.choose(c, tol=0.5)["epochs"] == 80
    with pytest.raises(ValueError):
        rs.choose([])


def test_extend_the_grid_where_the_choice_is_on_its_edge():
    e, lr = (10, 20, 40, 80), (0.01, 0.05)
    assert rs.extend(cand(40, 0.05, 0), e, lr) == ([10, 20, 40, 80], [0.01, 0.05, 0.1])
    assert rs.extend(cand(10, 0.01, 0), e, lr) == ([5, 10, 20, 40, 80], [0.005, 0.01, 0.05])
    assert rs.extend(cand(80, 0.05, 0), e, lr) == ([10, 20, 40, 80, 160], [0.01, 0.05, 0.1])
    assert rs.extend(cand(5, 0.05, 0), (5, 10), lr) == ([5, 10], [0.01, 0.05, 0.1])  # not below 5 epochs


def test_summarise():
    s = rs.summarise([80.0, 82.0, 84.0])
    assert s["mean"] == 82.0 and s["std"] == 2.0 and s["se"] == pytest.approx(2.0 / 3**0.5)


def test_a_tiny_real_search(tmp_path, shared_data, monkeypatch, one_intra_op_thread):
    """One candidate (1 epoch, lr 0.05) x one seed on image-seg, widened once (it is on every
    edge: 2 epochs, lr 0.1), then each view alone: the result file holds validation accuracies
    only, the choice and the batch size the rule gives."""
    monkeypatch.setenv("MMBALANCE_DATA_ROOT", str(shared_data))
    out = tmp_path / "r.json"
    assert rs.main(["image-seg", "--epochs", "1", "--lrs", "0.05", "--seeds", "0", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["batch_size"] == 16 and r["n_train"] == 168 and r["val_fraction"] == 0.2
    assert r["first_choice"] == {"epochs": 1, "lr": 0.05}
    assert {(c["epochs"], c["lr"]) for c in r["candidates"]} == {(1, 0.05), (1, 0.1), (2, 0.05), (2, 0.1)}
    assert r["views_recipe"]["epochs"] == r["chosen"]["epochs"]
    assert set(r["views_alone"]) == {"shape", "color"}
    assert all(0 <= c["mean"] <= 100 for c in r["candidates"])
