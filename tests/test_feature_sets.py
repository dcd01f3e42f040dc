"""The six published feature sets as named datasets: their splits from the real files, their
defaults, fingerprints and errors, and Concat learning on two of them."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from mmbalance.errors import ConfigError, DataError
from mmbalance.runner import make_trainer, resolve_config, run

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# name: folder, views (width), train / test rows, classes, default pair, val_fraction
SETS = {
    "cremad-joint": ("cremad_joint_emb", {"audio": 512, "visual": 512}, (559, 185), 6, ["audio", "visual"], 0.1),
    "cremad-unimodal": ("cremad_unimodal_emb", {"audio": 512, "visual": 512}, (541, 179), 6, ["audio", "visual"], 0.1),
    "landsat": ("landsat", {"visible": 18, "infrared": 18}, (4435, 2000), 6, ["visible", "infrared"], 0.1),
    "image-seg": ("image_segmentation", {"shape": 9, "color": 10}, (210, 2100), 7, ["color", "shape"], 0.2),
    "landuse21": ("landuse21", {"gist": 20, "phog": 59, "lbp": 40}, (1575, 525), 21, ["phog", "gist"], 0.1),
    "reuters": ("reuters_multilingual", {v: 2000 for v in ("en", "fr", "de", "it", "es")}, (900, 300), 6,
                ["es", "en"], 0.1),
}


def plugin(name, overrides=None):
    cfg, ds_cls, _ = resolve_config("concat", name, overrides or {})
    return cfg, ds_cls()


@pytest.mark.parametrize("name", list(SETS))
def test_splits_from_the_real_files(name, shared_data):
    """Sizes, classes, widths and the default pair as the data README states them; validation
    is a stratified share of train, and every view is standardised with train statistics."""
    folder, views, (n_train, n_test), k, pair, frac = SETS[name]
    cfg, ds = plugin(name, {"data_root": str(shared_data)})
    assert ds.available_modalities(cfg) == list(views) and ds.default_modalities(cfg) == pair
    assert cfg["val_fraction"] == frac and cfg["scheduler"] == "cosine"
    s = ds.build(cfg, list(views))
    assert (len(s.train) + len(s.val), len(s.test)) == (n_train, n_test)
    assert len(s.val) == pytest.approx(frac * n_train, abs=k)  # stratified: rounded per class
    assert s.num_classes == k and len(s.class_names) == k
    assert {m: spec.shape for m, spec in s.modalities.items()} == {v: (w,) for v, w in views.items()}
    assert set(np.unique(s.test.labels.numpy())) == set(range(k))
    assert set(np.unique(s.val.labels.numpy())) == set(range(k))
    full = torch.cat([s.train.tensors[pair[0]], s.val.tensors[pair[0]]])
    kept = s.train.tensors[pair[0]]
    torch.testing.assert_close(kept.mean(0), torch.zeros(views[pair[0]]), atol=1e-4, rtol=0)
    assert full.shape == (n_train, views[pair[0]])
    assert s.info["views"] == list(views) and s.info["val_is_test"] is False
    assert s.info["root"].endswith(folder)


def test_image_seg_keeps_the_constant_pixel_count_finite(shared_data):
    """region-pixel-count is 9 in every row: standardisation only shifts it (no 0/0)."""
    cfg, ds = plugin("image-seg", {"data_root": str(shared_data)})
    s = ds.build(cfg, ["shape", "color"])
    assert s.info["constant_features"]["shape"] == 1
    assert torch.isfinite(s.test.tensors["shape"]).all()


def test_defaults_reach_the_run_and_views_are_checked(shared_data, fast):
    t = make_trainer("concat", "landuse21", {**fast, "data_root": str(shared_data)})
    t.setup()
    assert t.modalities == ["phog", "gist"]
    three = make_trainer("concat", "landuse21", {**fast, "data_root": str(shared_data), "modalities": "gist,phog,lbp"})
    three.setup()
    assert three.modalities == ["gist", "phog", "lbp"]
    bad = make_trainer("concat", "landsat", {**fast, "data_root": str(shared_data), "modalities": "visible,thermal"})
    with pytest.raises(ConfigError, match="thermal"):
        bad.setup()


def test_fingerprint_is_the_content_of_the_files(tmp_path, shared_data):
    """A copy elsewhere is the same data; another set or one changed byte is not."""
    copy = tmp_path / "landsat"
    shutil.copytree(shared_data / "landsat", copy)

    def fp(name, root):
        cfg, ds = plugin(name, {"data_root": str(root)})
        return ds.data_fingerprint(cfg)

    assert fp("landsat", shared_data) == fp("landsat", tmp_path) == fp("landsat", copy)
    assert fp("landsat", shared_data) != fp("image-seg", shared_data)
    (copy / "test.npz").chmod(0o644)
    raw = bytearray((copy / "test.npz").read_bytes())
    raw[len(raw) // 2] ^= 1
    (copy / "test.npz").write_bytes(bytes(raw))
    assert fp("landsat", copy) != fp("landsat", shared_data)


def test_missing_file_names_the_path_and_the_layout(tmp_path, shared_data):
    root = tmp_path / "landsat"
    root.mkdir()
    shutil.copy(shared_data / "landsat" / "train.npz", root / "train.npz")
    cfg, ds = plugin("landsat", {"data_root": str(tmp_path)})
    with pytest.raises(DataError, match=r"did not find test\.npz.*'visible' \(N x 18\).*2000 rows in test\.npz"):
        ds.build(cfg, ["visible", "infrared"])
    with pytest.raises(DataError, match="does not exist"):
        plugin("reuters", {"data_root": str(tmp_path / "nope")})[1].data_fingerprint(
            plugin("reuters", {"data_root": str(tmp_path / "nope")})[0])


def test_other_features_under_a_known_name_are_refused(tmp_path):
    """A folder of other features named like a published set: refused before training, with
    what differs and the pointer to --dataset features."""
    root = tmp_path / "landsat"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 20)):
        np.savez(root / f"{split}.npz", visible=rng.normal(size=(n, 18)).astype(np.float32),
                 infrared=rng.normal(size=(n, 4)).astype(np.float32), label=rng.integers(0, 6, n))
    cfg, ds = plugin("landsat", {"data_root": str(tmp_path)})
    with pytest.raises(DataError, match=r"not the landsat feature set: 'infrared' is 4 wide, not 18; 40 rows, "
                                        r"not 4435.*--dataset features"):
        ds.build(cfg, ["visible", "infrared"])


def test_list_datasets_shows_them(capsys):
    from mmbalance.cli import main

    assert main(["list", "datasets"]) == 0
    out = capsys.readouterr().out
    for name in SETS:
        assert f"\n{name} " in "\n" + out


@pytest.mark.parametrize(("name", "epochs", "floor"), [("landsat", 3, 75.0), ("image-seg", 6, 60.0)])
def test_concat_learns_well_above_chance(name, epochs, floor, shared_data, fast):
    """Chance (the majority class) is 23.6 % on landsat's test split and 14.3 % on image-seg's;
    a few epochs of the plugin's recipe get far above it."""
    r = run("concat", name, {**fast, "data_root": str(shared_data), "epochs": epochs, "diagnostics": False})
    assert r.final["best_val"]["test"]["fused"]["acc"] > floor
