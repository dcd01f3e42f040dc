"""Bad input to the ``features`` dataset, its standardisation, val_fraction=0 on the CPU
datasets, and the content fingerprints of the file-backed ones."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from mmbalance.datasets.features import LabelRemapWarning

from mmbalance.errors import DataError
from mmbalance.runner import resolve_config, run


def plugin(dataset, overrides=None):
    cfg, ds_cls, _ = resolve_config("concat", dataset, overrides or {})
    return cfg, ds_cls()


def build(dataset, overrides=None, modalities=None):
    cfg, ds = plugin(dataset, overrides)
    return ds.build(cfg, modalities or ds.default_modalities(cfg))


def write(root, splits=("train", "test"), n=None, seed=0, **edit):
    """Tiny informative features: 'eeg' (5 wide) tells the class, 'text' (7 wide) is noise.
    ``edit[split] = fn(arrays)`` changes one file's arrays before it is saved."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, 5)) * 3
    sizes = {"train": 60, "val": 20, "test": 30, **(n or {})}
    for split in splits:
        y = np.arange(sizes[split]) % 3
        arrays = {
            "eeg": (centers[y] + rng.normal(size=(len(y), 5))).astype(np.float32),
            "text": rng.normal(size=(len(y), 7)).astype(np.float32),
            "label": y,
        }
        if split in edit:
            edit[split](arrays)
        np.savez(root / f"{split}.npz", **arrays)
    return {"data_root": str(root)}


# ---- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val", "test"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_names_file_array_count_and_row(tmp_path, split, bad):
    def spoil(a):
        a["text"][4, 1] = bad
        a["text"][9, [0, 2]] = bad

    ov = write(tmp_path, ("train", "val", "test"), **{split: spoil})
    with pytest.raises(DataError, match=rf"{split}\.npz': array 'text' holds 3 NaN/inf values \(first at row 4"):
        build("features", ov)


def test_nan_in_a_modality_not_used_is_not_an_error(tmp_path):
    ov = write(tmp_path, train=lambda a: a["text"].__setitem__((0, 0), np.nan))
    s = build("features", ov, ["eeg"])
    assert torch.isfinite(s.train.tensors["eeg"]).all()


def test_width_mismatch_names_both_files_the_array_and_both_widths(tmp_path):
    ov = write(tmp_path, test=lambda a: a.__setitem__("eeg", np.zeros((30, 6), np.float32)))
    with pytest.raises(DataError, match=r"train\.npz' and '.*test\.npz': array 'eeg' is 5 wide .* but 6 wide"):
        build("features", ov)


def test_width_mismatch_in_val(tmp_path):
    ov = write(tmp_path, ("train", "val", "test"), val=lambda a: a.__setitem__("text", np.zeros((20, 3), np.float32)))
    with pytest.raises(DataError, match=r"val\.npz': array 'text' is 7 wide .* but 3 wide"):
        build("features", ov)


def _singleton_class(a):
    a["label"][:] = np.arange(len(a["label"])) % 2
    a["label"][5] = 2  # class 2: one training sample


def test_class_too_small_to_carve_validation_is_named(tmp_path):
    ov = write(tmp_path, train=_singleton_class)
    with pytest.raises(DataError, match=r"train\.npz': array 'label': class 2 has 1 sample.*val\.npz.*val_fraction=0"):
        build("features", ov)
    # either fix named in the message works
    s = build("features", {**ov, "val_fraction": 0})
    assert s.info["val_is_test"] and s.val is s.test
    write(tmp_path, ("train", "val", "test"), train=_singleton_class)
    s = build("features", ov)
    assert not s.info["val_is_test"] and len(s.val) == 20


def test_too_few_samples_for_the_holdout_is_a_dataerror_naming_the_file(tmp_path):
    # 6 samples, 3 classes: 10 % is one sample, fewer than the classes (sklearn refuses)
    ov = write(tmp_path, n={"train": 6})
    with pytest.raises(DataError, match=r"train\.npz'.*val_fraction.*val\.npz"):
        build("features", ov)


def test_stray_huge_label_is_refused_with_file_max_and_distinct_count(tmp_path):
    ov = write(tmp_path, test=lambda a: a["label"].__setitem__(7, 1_000_000))
    with pytest.raises(DataError, match=r"test\.npz': array 'label' holds 1000000 \(row 7\), but only 4 distinct.*0\.\.K-1"):
        build("features", ov)


def test_negative_label_is_refused(tmp_path):
    ov = write(tmp_path, train=lambda a: a["label"].__setitem__(3, -1))
    with pytest.raises(DataError, match=r"train\.npz': array 'label' holds -1 \(row 3\).*0\.\.K-1"):
        build("features", ov)


def test_label_range_rule_remaps_moderate_gaps_and_refuses_a_stray_label(tmp_path):
    """Labels {0, 1, 2, 13}: 14 = 4 distinct + 10, the largest range the rule allows, so they are
    renumbered (test_degenerate_data covers the remapping); one more and 14 is a stray label.
    A test-only class is no longer fine: test_degenerate_data shows its error."""
    def add(label):
        def edit(a):
            a["label"][:2] = label
        return edit

    ov = write(tmp_path, train=add(13), test=add(13))
    with pytest.warns(LabelRemapWarning, match="0, 1, 2, 13, not 0..3"):
        s = build("features", ov)
    assert s.num_classes == 4 and s.class_names == ["0", "1", "2", "13"]
    write(tmp_path, train=add(14), test=add(14))
    with pytest.raises(DataError, match="holds 14 .*only 4 distinct.*stray"):
        build("features", ov)


# ---- standardisation ----------------------------------------------------------------------


def test_standardize_is_the_default_and_uses_train_statistics(tmp_path):
    def scale(a):
        a["eeg"] = a["eeg"] * 1e-3 + 5.0
        a["eeg"][:, 2] = 0.25  # constant in train: no inf/NaN, just shifted

    ov = write(tmp_path, train=scale, test=scale)
    s = build("features", {**ov, "val_fraction": 0})
    x = s.train.tensors["eeg"]
    torch.testing.assert_close(x.mean(0), torch.zeros(5), atol=1e-4, rtol=0)
    torch.testing.assert_close(x[:, [0, 1, 3, 4]].std(0, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)
    assert torch.isfinite(s.test.tensors["eeg"]).all() and (s.test.tensors["eeg"][:, 2] == 0).all()
    assert s.info["standardize"] is True and s.info["constant_features"]["eeg"] == 1

    raw = build("features", {**ov, "val_fraction": 0, "standardize": False})
    stored = np.load(tmp_path / "train.npz")["eeg"]
    assert torch.equal(raw.train.tensors["eeg"], torch.from_numpy(stored))
    assert raw.info["standardize"] is False


def test_statistics_come_from_the_kept_training_rows(tmp_path):
    ov = write(tmp_path)
    s = build("features", ov)  # 10 % of train held out as val
    torch.testing.assert_close(s.train.tensors["eeg"].mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    assert s.val.tensors["eeg"].mean(0).abs().max() > 1e-3  # val is scaled by train's stats


def _write_histograms(root, seed=0, bins=400, counts=4000):
    """Histogram-like features that sum to 1 (per-bin std ~1e-3) with class-dependent shapes;
    classes 50/30/20 % so "majority class" is a distinct, visible failure."""
    rng = np.random.default_rng(seed)
    base = rng.dirichlet(np.ones(bins) * 5)
    profiles = {m: base * np.exp(0.4 * rng.standard_normal((3, bins))) for m in ("a", "b")}
    for split, n in (("train", 300), ("test", 150)):
        y = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
        arrays = {}
        for m, p in profiles.items():
            p = p / p.sum(1, keepdims=True)
            arrays[m] = (np.stack([rng.multinomial(counts, p[c]) for c in y]) / counts).astype(np.float32)
        np.savez(root / f"{split}.npz", label=y, **arrays)
    return float((y == 0).mean() * 100)


def test_histogram_features_train_above_chance_only_when_standardised(tmp_path, fast):
    data = tmp_path / "hist"
    data.mkdir()
    majority = _write_histograms(data)
    ov = {**fast, "data_root": str(data), "epochs": 3, "checkpoint": False}
    on = run("concat", "features", ov).final["last"]["test"]["fused"]["acc"]
    off = run("concat", "features", {**ov, "standardize": False}).final["last"]["test"]["fused"]["acc"]
    assert on > majority + 25.0
    assert off < majority + 5.0


# ---- val_fraction=0 -----------------------------------------------------------------------


def _assert_val_is_test(s):
    assert s.val is s.test
    assert s.info["val_is_test"] is True
    assert "val is the test split" in s.info["val_rule"]


def test_val_fraction_zero_features(tmp_path):
    ov = write(tmp_path)
    s = build("features", {**ov, "val_fraction": 0})
    _assert_val_is_test(s)
    assert len(s.train) == 60
    carved = build("features", ov)
    assert carved.info["val_is_test"] is False and len(carved.train) + len(carved.val) == 60


def test_features_own_val_split_ignores_val_fraction(tmp_path):
    ov = write(tmp_path, ("train", "val", "test"))
    for frac in (0, 0.2):
        s = build("features", {**ov, "val_fraction": frac})
        assert s.val is not s.test and len(s.val) == 20 and len(s.train) == 60
        assert s.info["val_is_test"] is False and "val_fraction is ignored" in s.info["val_rule"]


def test_val_fraction_zero_synthetic():
    s = build("synthetic", {"val_fraction": 0, "n_train": 200, "n_test": 100})
    _assert_val_is_test(s)
    assert len(s.train) == 200
    d = build("synthetic", {"n_train": 200, "n_test": 100})
    assert d.info["val_is_test"] is False and (len(d.train), len(d.val)) == (180, 20)


def test_val_fraction_zero_mfeat(shared_data):
    s = build("mfeat", {"data_root": str(shared_data), "val_fraction": 0})
    _assert_val_is_test(s)
    assert len(s.train) == 1600 and len(s.test) == 400
    assert build("mfeat", {"data_root": str(shared_data)}).info["val_is_test"] is False


@pytest.mark.parametrize("dataset", ["avdigits", "avdigits-noisy"])
def test_val_fraction_zero_avdigits(shared_data, dataset):
    s = build(dataset, {"data_root": str(shared_data), "val_fraction": 0}, ["image"])
    _assert_val_is_test(s)
    assert (len(s.train), len(s.test)) == (2700, 300)
    d = build(dataset, {"data_root": str(shared_data)}, ["image"])
    assert d.info["val_is_test"] is False and len(d.val) == 270


# ---- data fingerprints --------------------------------------------------------------------


def fingerprint(dataset, root):
    cfg, ds = plugin(dataset, {"data_root": str(root)})
    return ds.data_fingerprint(cfg)


def test_features_fingerprint_follows_content_not_folder(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    write(a)
    shutil.copytree(a, b)
    assert fingerprint("features", a) == fingerprint("features", b)
    assert set(fingerprint("features", a)) == {"files"}
    write(b, ("train", "val", "test"))  # val.npz added: another cell
    with_val = fingerprint("features", b)
    assert with_val != fingerprint("features", a)
    raw = bytearray((b / "test.npz").read_bytes())
    raw[-30] ^= 1
    (b / "test.npz").write_bytes(bytes(raw))
    assert fingerprint("features", b) != with_val


def test_mfeat_fingerprint_is_a_content_hash(tmp_path, shared_data):
    src = shared_data / "handwritten_6views" / "handwritten_6views.mat"
    copy = tmp_path / "handwritten_6views"
    copy.mkdir()
    shutil.copy(src, copy / src.name)
    assert fingerprint("mfeat", shared_data) == fingerprint("mfeat", tmp_path) == fingerprint("mfeat", copy)
    raw = bytearray((copy / src.name).read_bytes())
    raw[len(raw) // 2] ^= 1
    (copy / src.name).write_bytes(bytes(raw))
    assert fingerprint("mfeat", tmp_path) != fingerprint("mfeat", shared_data)


def test_avdigits_fingerprint_hashes_the_wavs(tmp_path, shared_data):
    rec = tmp_path / "a" / "fsdd" / "recordings"
    rec.mkdir(parents=True)
    for p in sorted((shared_data / "fsdd" / "recordings").glob("[01]_george_*.wav")):
        shutil.copy(p, rec / p.name)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    first = fingerprint("avdigits", tmp_path / "a")
    assert first == fingerprint("avdigits", tmp_path / "b") == fingerprint("avdigits", tmp_path / "b" / "fsdd")
    assert fingerprint("avdigits-noisy", tmp_path / "a") == first  # same files; noise is in the config
    wav = tmp_path / "b" / "fsdd" / "recordings" / "1_george_7.wav"
    raw = bytearray(wav.read_bytes())
    raw[-1] ^= 1
    wav.write_bytes(bytes(raw))
    assert fingerprint("avdigits", tmp_path / "b") != first
    (rec / "1_george_7.wav").unlink()  # a clip fewer: another cell
    assert fingerprint("avdigits", tmp_path / "a") != first
    assert fingerprint("synthetic", tmp_path) == {}


def test_avdigits_fingerprint_is_fast(shared_data):
    import time

    fingerprint("avdigits", shared_data)  # warm the file cache
    t = time.perf_counter()
    fingerprint("avdigits", shared_data)
    assert time.perf_counter() - t < 1.0
