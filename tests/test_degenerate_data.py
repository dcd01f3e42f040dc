"""Degenerate data and settings give errors (or an announced, recorded remapping), never a run
that trains and reports as normal: one class, test labels train never has, gaps in the label
range, seeds outside numpy's 32 bits, a modality listed twice, a method or dataset given as a
setting, and a validation split that would leave a class on one side only."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from mmbalance.datasets.features import LabelRemapWarning

from mmbalance import records
from mmbalance.cli import main
from mmbalance.config import MAX_SEED
from mmbalance.data import carve_validation, every_class_on_both_sides, stratified_holdout
from mmbalance.errors import ConfigError, DataError
from mmbalance.grid import load_grid
from mmbalance.runner import resolve_config, run


def write(root: Path, labels: dict[str, np.ndarray], seed: int = 0) -> dict:
    """features files whose 'a' modality tells the class (centre per label), 'b' is noise."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(100, 4)) * 3
    for split, y in labels.items():
        y = np.asarray(y, dtype=np.int64)
        np.savez(root / f"{split}.npz", a=(centres[y] + rng.normal(size=(len(y), 4))).astype(np.float32),
                 b=rng.normal(size=(len(y), 3)).astype(np.float32), label=y)
    return {"data_root": str(root)}


def build(overrides: dict):
    cfg, ds_cls, _ = resolve_config("concat", "features", overrides)
    ds = ds_cls()
    return ds.build(cfg, ds.default_modalities(cfg))


FAST = {"epochs": 3, "progress": "off", "log_epochs": False, "device": "cpu", "diagnostics": False}


# ---- features: classes ------------------------------------------------------------------------
def test_one_class_is_an_error(tmp_path):
    """Wrong variant caught: the one-class check removed (the run trained and reported accuracy,
    MAP and F1 of 100)."""
    ov = write(tmp_path, {"train": np.full(40, 3), "test": np.full(20, 3)})
    with pytest.raises(DataError, match=r"train\.npz': array 'label' holds one class \(3\) in all 40 samples.*at least two classes"):
        build(ov)
    # one class in train, others only in test: still one class to learn
    write(tmp_path, {"train": np.full(40, 0), "test": np.arange(20) % 2})
    with pytest.raises(DataError, match="one class"):
        build(ov)


def test_test_label_never_seen_in_training_is_an_error(tmp_path):
    """Wrong variant caught: checking only the train split's labels against 0..K-1 (the old rule,
    under which a test-only class trained on and was scored)."""
    ov = write(tmp_path, {"train": np.arange(60) % 3, "test": np.r_[np.arange(27) % 3, [3, 3, 3]]})
    with pytest.raises(DataError, match=r"test\.npz': array 'label' holds class 3 \(3 rows, first at row 27\), "
                                        r"which train\.npz never has.*into train\.npz, or drop those rows"):
        build(ov)
    write(tmp_path, {"train": np.arange(60) % 3, "val": np.r_[np.arange(9) % 3, [7]], "test": np.arange(30) % 3})
    with pytest.raises(DataError, match=r"val\.npz': array 'label' holds class 7"):
        build(ov)
    # a class absent from test (present in train) is fine: it is learnt, just not tested
    (tmp_path / "val.npz").unlink()
    write(tmp_path, {"train": np.arange(60) % 3, "test": np.arange(20) % 2})
    assert build(ov).num_classes == 3


def test_label_gap_is_remapped_announced_and_recorded(tmp_path):
    """Labels 5..7: a 3-way classifier, a LabelRemapWarning, the mapping and the original names in
    the record. Wrong variants caught: no remapping (an 8-way head), the mapping applied to
    train only (test labels out of range), class names of the new indices."""
    ov = write(tmp_path / "d", {"train": 5 + np.arange(90) % 3, "test": 5 + np.arange(45) % 3})
    with pytest.warns(LabelRemapWarning, match=r"labels in '.*' are 5, 6, 7, not 0\.\.2; .*label_map"):
        s = build(ov)
    assert s.num_classes == 3 and s.class_names == ["5", "6", "7"]
    assert s.info["label_map"] == {"5": 0, "6": 1, "7": 2}
    assert sorted(set(s.train.labels.tolist())) == [0, 1, 2]
    assert s.test.labels.tolist() == (np.arange(45) % 3).tolist() and s.val.labels.max() <= 2
    # a real run trains a 3-way model, records the mapping, and learns (chance is 33 %)
    with pytest.warns(LabelRemapWarning):
        result = run("concat", "features", {**ov, **FAST, "records": str(tmp_path / "runs"), "epochs": 10})
    info = result.record["header"]["dataset_info"]
    assert info["num_classes"] == 3 and info["class_names"] == ["5", "6", "7"]
    assert info["label_map"] == {"5": 0, "6": 1, "7": 2}
    assert result.final["last"]["test"]["fused"]["acc"] > 70.0
    # 1-based labels with a missing class in the middle: sorted order, original names kept
    write(tmp_path / "e", {"train": np.r_[np.full(20, 1), np.full(20, 2), np.full(20, 4)],
                           "test": np.r_[np.full(5, 4), np.full(5, 1)]})
    with pytest.warns(LabelRemapWarning, match="1, 2, 4, not 0..2"):
        s = build({"data_root": str(tmp_path / "e")})
    assert s.info["label_map"] == {"1": 0, "2": 1, "4": 2}
    assert s.test.labels.tolist() == [2] * 5 + [0] * 5


def test_labels_already_0_to_k_are_not_remapped(tmp_path):
    ov = write(tmp_path, {"train": np.arange(60) % 3, "test": np.arange(30) % 3})
    with warnings.catch_warnings():
        warnings.simplefilter("error", LabelRemapWarning)
        s = build(ov)
    assert s.class_names == ["0", "1", "2"] and "label_map" not in s.info


# ---- validation carve-out ---------------------------------------------------------------------
def test_every_class_stays_on_both_sides_of_the_validation_split():
    """A class of 3 among classes of 105: sklearn's rounding gives it no validation sample at
    val_fraction 0.1 and no training sample at 0.9. Wrong variant caught: moving a sample only
    when the held-out side lacks the class (the 0.9 case keeps a class with nothing to train on)."""
    labels = np.r_[np.zeros(105, int), np.ones(105, int), np.full(3, 2)]
    keep, hold = stratified_holdout(labels, 0.1, seed=0)
    assert 2 not in set(labels[hold].tolist())  # what sklearn alone gives
    keep, hold = stratified_holdout(labels, 0.9, seed=0)
    assert 2 not in set(labels[keep].tolist())
    for fraction in (0.1, 0.9):
        train, val, rule = carve_validation(list(range(len(labels))), fraction, 0, "toy", labels=labels)
        for side in (train, val):
            assert set(labels[side]) == {0, 1, 2}
        assert "moved one sample of class 2" in rule
        assert sorted(train + val) == list(range(len(labels)))  # a partition, nothing lost
    # deterministic, and a split that already has every class on both sides is unchanged
    first = carve_validation(list(range(len(labels))), 0.1, 0, "toy", labels=labels)
    assert carve_validation(list(range(len(labels))), 0.1, 0, "toy", labels=labels) == first
    even = np.arange(300) % 3
    keep, hold = stratified_holdout(even, 0.1, seed=0)
    k2, h2, moved = every_class_on_both_sides(even, keep, hold, 0)
    assert moved == [] and np.array_equal(k2, keep) and np.array_equal(h2, hold)


def test_a_class_too_small_to_split_is_a_clear_error(tmp_path):
    labels = np.r_[np.zeros(50, int), np.ones(50, int), [2]]
    with pytest.raises(DataError, match="toy.*val_fraction=0.2"):
        carve_validation(list(range(len(labels))), 0.2, 0, "toy", labels=labels)
    with pytest.raises(ValueError, match="class 2 has a single sample"):
        every_class_on_both_sides(labels, np.arange(100), np.array([100]), 0)
    # through features: the class and the fixes are named
    ov = write(tmp_path, {"train": np.r_[np.arange(60) % 2, [2]], "test": np.arange(30) % 3})
    with pytest.raises(DataError, match=r"class 2 has 1 sample.*val\.npz.*val_fraction=0"):
        build(ov)


def test_features_validation_keeps_a_small_class_on_both_sides(tmp_path):
    ov = write(tmp_path, {"train": np.r_[np.arange(210) % 2, [2, 2, 2]], "test": np.arange(30) % 3})
    s = build({**ov, "val_fraction": 0.1})
    assert set(s.train.labels.tolist()) == set(s.val.labels.tolist()) == {0, 1, 2}
    assert "moved one sample of class 2" in s.info["val_rule"]


# ---- bounds of settings -----------------------------------------------------------------------
@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 2**63])
def test_seeds_outside_32_bits_are_refused_by_run_and_config(seed, tmp_path, capsys):
    """A seed >= 2**63 passed `config` and crashed the run; now both refuse every seed outside
    [0, 2**32 - 1] (wrong variant caught: only the lower bound declared)."""
    for command in ("run", "config"):
        code = main([command, "--method", "concat", "--dataset", "synthetic", "--seed", str(seed),
                     "--records", str(tmp_path / "runs")])
        assert code == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"Bad value {seed} for 'seed'" in err and "<= 4294967295" in err
    assert not (tmp_path / "runs").exists()


def test_largest_seed_runs(tmp_path):
    result = run("concat", "synthetic", {"seed": MAX_SEED, "n_train": 120, "n_test": 60, "epochs": 1,
                                        "records": str(tmp_path), "progress": "off", "log_epochs": False,
                                        "diagnostics": False})
    assert result.record["header"]["config"]["seed"] == MAX_SEED and result.record["done"]


@pytest.mark.parametrize("seeds", ["[0, -1]", f"[{MAX_SEED + 1}]", f"{2**63}", f"[1, {2**63}]"])
def test_grid_seeds_outside_32_bits_are_refused_by_dry_run_and_status(seeds, tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text(f"seeds: {seeds}\ndatasets: [synthetic]\nmethods: [concat]\n")
    with pytest.raises(ConfigError, match=f"every seed must be an integer from 0 to {MAX_SEED}"):
        load_grid(grid)
    for flag in ("--dry-run", "--status"):
        assert main(["grid", str(grid), flag, "--records", str(tmp_path / "runs")]) == 2
        assert "every seed must be an integer from 0 to 4294967295" in " ".join(capsys.readouterr().err.split())


def test_modality_listed_twice_is_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"m1 is listed more than once.*modalities=m1"):
        resolve_config("concat", "synthetic", {"modalities": "m1,m1"})
    with pytest.raises(ConfigError, match="m2 is listed more than once"):
        resolve_config("concat", "synthetic", {"modalities": ["m1", "m2", "m2"]})
    assert main(["run", "--method", "concat", "--dataset", "synthetic", "--set", "modalities=m1,m1",
                 "--records", str(tmp_path / "runs")]) == 2
    assert "listed more than once" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("key", ["dataset", "method"])
def test_method_or_dataset_as_a_setting_is_refused_everywhere(key, tmp_path, capsys):
    """`--set dataset=...` was silently ignored (the run used --dataset). Refused from --set, a
    YAML config and a grid cell's set:, each naming the argument to use."""
    other = "mfeat" if key == "dataset" else "iprm"
    base = ["run", "--method", "concat", "--dataset", "synthetic", "--records", str(tmp_path / "runs")]
    assert main([*base, "--set", f"{key}={other}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"'{key}' cannot be set from --set" in err and f"--{key} NAME" in err
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"{key}: {other}\nepochs: 1\n")
    assert main([*base, "--config", str(yaml_file)]) == 2
    assert f"'{key}' cannot be set from the YAML file" in " ".join(capsys.readouterr().err.split())
    setting = f"{{{key}: {other}}}"
    for top, cell in ((f"set: {setting}\n", "synthetic"), ("", f"{{name: synthetic, set: {setting}}}")):
        grid = tmp_path / "g.yaml"
        grid.write_text(f"{top}datasets: [{cell}]\nmethods: [concat]\n")
        with pytest.raises(ConfigError, match=f"'{key}' cannot be set per cell.*'{key}s'"):
            load_grid(grid)
        assert main(["grid", str(grid), "--dry-run", "--records", str(tmp_path / "runs")]) == 2
        capsys.readouterr()
    assert not (tmp_path / "runs").exists()


def test_failed_data_validation_records_nothing(tmp_path):
    ov = write(tmp_path / "d", {"train": np.full(30, 1), "test": np.full(10, 1)})
    with pytest.raises(DataError, match="one class"):
        run("concat", "features", {**ov, **FAST, "records": str(tmp_path / "runs")})
    assert not (tmp_path / "runs").exists()  # not even a folder holding only LOCK


def test_recorded_label_map_is_plain_json(tmp_path):
    ov = write(tmp_path / "d", {"train": 2 + np.arange(60) % 2, "test": 2 + np.arange(20) % 2})
    with pytest.warns(LabelRemapWarning):
        result = run("concat", "features", {**ov, **FAST, "epochs": 1, "records": str(tmp_path / "runs")})
    header = json.loads((result.run_dir / records.RECORD).read_text().splitlines()[0])
    assert header["dataset_info"]["label_map"] == {"2": 0, "3": 1}
