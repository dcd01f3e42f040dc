"""The CPU datasets of the spine: avdigits, mfeat, features, synthetic."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from mmbalance.errors import DataError
from mmbalance.runner import resolve_config, run


def build(dataset, overrides=None, modalities=None):
    cfg, ds_cls, _ = resolve_config("concat", dataset, overrides or {})
    ds = ds_cls()
    return ds.build(cfg, modalities or ds.default_modalities(cfg))


@pytest.fixture(scope="module")
def avdigits(shared_data):
    return build("avdigits", {"data_root": str(shared_data)})


def test_avdigits_split_pairing_and_shapes(avdigits):
    from sklearn.datasets import load_digits

    s = avdigits
    assert (len(s.train) + len(s.val), len(s.test)) == (2700, 300)
    assert len(s.val) == 270 and s.num_classes == 10
    item = s.test[0]
    assert item["audio"].shape == (1, 64, 63) and item["audio"].dtype == torch.float32
    assert item["image"].shape == (64,) and item["label"] == 0
    # the first test pair is (0_george_0.wav, image 0); the first train pair takes image 292
    digits = load_digits()
    np.testing.assert_allclose(item["image"].numpy(), digits.images[0].reshape(-1) / 16.0)
    train_imgs = s.train.tensors["image"]
    want = torch.from_numpy((digits.images[292].reshape(-1) / 16.0).astype(np.float32))
    assert any(torch.equal(row, want) for row in train_imgs[s.train.labels == 0])
    # test: 30 clips and 30 distinct images per class
    labels = s.test.labels
    assert torch.bincount(labels).tolist() == [30] * 10
    assert len(torch.unique(s.test.tensors["image"], dim=0)) == 300


def test_avdigits_noise_is_fixed_per_image(shared_data, avdigits):
    noisy = build("avdigits-noisy", {"data_root": str(shared_data)}, ["image"])
    again = build("avdigits", {"data_root": str(shared_data), "image_noise": 0.5}, ["image"])
    assert "audio" not in noisy.modalities  # modalities not asked for are not loaded
    diff = noisy.test.tensors["image"] - avdigits.test.tensors["image"]
    assert 0.45 < float(diff.std()) < 0.55
    assert torch.equal(noisy.test.tensors["image"], again.test.tensors["image"])


def test_avdigits_corrupt_wav_names_the_file(tmp_path, shared_data):
    rec = tmp_path / "fsdd" / "recordings"
    rec.mkdir(parents=True)
    for p in sorted((shared_data / "fsdd" / "recordings").glob("[01]_george_[0-9].wav")):
        shutil.copy(p, rec / p.name)
    (rec / "1_george_7.wav").write_bytes(b"RIFF\x00\x00garbage")
    with pytest.raises(DataError, match="1_george_7.wav.*corrupt"):
        build("avdigits", {"data_root": str(tmp_path)})


def test_missing_root_names_path_and_layout(tmp_path):
    with pytest.raises(DataError, match=r"looked in .*fsdd.*recordings|did not find recordings"):
        build("avdigits", {"data_root": str(tmp_path)})
    with pytest.raises(DataError, match="does not exist"):
        build("mfeat", {"data_root": str(tmp_path / "nope")})


def test_mfeat_views_standardised_and_selectable(shared_data):
    s = build("mfeat", {"data_root": str(shared_data), "modalities": "zer,mor,pix"}, ["zer", "mor", "pix"])
    assert s.modalities["zer"].shape == (47,) and s.modalities["pix"].shape == (240,)
    assert len(s.train) + len(s.val) == 1600 and len(s.test) == 400
    full = torch.cat([s.train.tensors["mor"], s.val.tensors["mor"]])
    torch.testing.assert_close(full.mean(0), torch.zeros(6), atol=1e-4, rtol=0)
    assert set(s.test.labels.tolist()) == set(range(10))


def test_mfeat_trains_well_above_chance(shared_data, fast):
    r = run("concat", "mfeat", {**fast, "data_root": str(shared_data), "epochs": 10})
    assert r.final["best_val"]["test"]["fused"]["acc"] > 80.0


def _write_features(root, with_val):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 5)) * 3
    for split, n in (("train", 240), ("val", 60), ("test", 90)):
        if split == "val" and not with_val:
            continue
        y = rng.integers(0, 3, n)
        np.savez(root / f"{split}.npz", eeg=(centers[y] + rng.normal(size=(n, 5))).astype(np.float32),
                 text=rng.normal(size=(n, 7)).astype(np.float32), label=y)


@pytest.mark.parametrize("with_val", [True, False])
def test_features_directory_trains(tmp_path, fast, with_val):
    _write_features(tmp_path, with_val)
    r = run("concat", "features", {**fast, "data_root": str(tmp_path), "epochs": 5, "lr": 0.05})
    h = r.record["header"]
    assert h["modalities"] == ["eeg", "text"] and h["dataset_info"]["num_classes"] == 3
    assert h["dataset_info"]["sizes"]["val"] == (60 if with_val else 24)
    assert h["dataset_info"]["val_is_test"] is False and h["dataset_info"]["standardize"] is True
    assert r.final["best_val"]["test"]["fused"]["acc"] > 70.0  # eeg is informative, text is noise


def test_features_malformed_files(tmp_path):
    np.savez(tmp_path / "train.npz", a=np.zeros((4, 2), np.float32), label=np.zeros(3, np.int64))
    np.savez(tmp_path / "test.npz", a=np.zeros((4, 2), np.float32), label=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="one row per label"):
        build("features", {"data_root": str(tmp_path)})
    (tmp_path / "test.npz").unlink()
    with pytest.raises(DataError, match="test.npz"):
        build("features", {"data_root": str(tmp_path)})


def test_synthetic_is_deterministic_and_three_modal():
    a, b = build("synthetic"), build("synthetic")
    assert torch.equal(a.train.tensors["m1"], b.train.tensors["m1"])
    s3 = build("synthetic", {"n_modalities": 3})
    assert list(s3.modalities) == ["m1", "m2", "m3"]


def test_synthetic_shows_a_real_imbalance(fast):
    """Joint training leaves the weak modality's head clearly below the weak modality alone."""
    alone = run("unimodal", "synthetic", {**fast, "modality": "m2"})
    joint = run("concat", "synthetic", fast)
    weak_alone = alone.final["last"]["test"]["m2"]["acc"]
    weak_joint = joint.final["last"]["test"]["m2"]["acc"]
    assert weak_joint < weak_alone - 5.0


def test_mfeat_defaults_to_fac_mor_and_refuses_unknown_views(shared_data, fast):
    from mmbalance.errors import ConfigError
    from mmbalance.runner import make_trainer

    t = make_trainer("concat", "mfeat", {**fast, "data_root": str(shared_data)})
    t.setup()
    assert t.modalities == ["fac", "mor"]
    bad = make_trainer("concat", "mfeat", {**fast, "data_root": str(shared_data), "modalities": "fac,xyz"})
    with pytest.raises(ConfigError, match="no modality xyz.*pix, fou, fac, zer, kar, mor"):
        bad.setup()
