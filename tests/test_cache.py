"""The input cache of the audio + frames datasets (mmbalance/cache.py) on generated fixtures.

CREMA-D Layout B (and Kinetics-Sounds layouts C and A) are written under tmp_path with the
real file types (16 kHz int16 WAVs, JPEG frame folders, CRLF csvs, fbank .npy). Checked: the
cached eval tensors equal the files' bit for bit; train-time draws follow the uncached path's
stream (same crop parameters and flips for a seed), applied in the loader workers (bit for bit)
or on the device (DeviceCrop, within a grey level of PIL on smooth pictures); stale caches
(other settings, changed files, missing clips) are refused; the build is atomic and built once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_media import write_frames, write_wav
from PIL import Image
from torch.utils.data import DataLoader, default_collate
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from mmbalance import cache, media
from mmbalance.config import assemble
from mmbalance.errors import ConfigError, DataError
from mmbalance.registry import DATASETS

REPO = Path(__file__).resolve().parents[1]
EMOS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
SMALL = {"check_manifest": False, "image_size": 32, "audio_seconds": 0.5, "val_fraction": 0.5}
ODD = "1003_DFA_SAD_XX"  # the train clip whose frames have another size than the others


class _Method:
    name = "concat"
    options: dict = {}
    defaults: dict = {}


def make_cremad(base: Path, n_train: int = 2, n_test: int = 1, frames: int = 3) -> Path:
    """Layout B: annotations/{train,test}.csv (CRLF, BOM), AudioWAV/, Image-01-FPS/."""
    rows = [(f"{1001 + j * 6 + k}_DFA_{e}_XX", e) for j in range(n_train + n_test) for k, e in enumerate(EMOS)]
    for i, (cid, _) in enumerate(rows):
        write_wav(base / "AudioWAV" / f"{cid}.wav", seconds=0.3 + 0.05 * (i % 4), seed=i)
        write_frames(base / "Image-01-FPS" / cid, frames, size=(48, 30) if cid == ODD else (40, 36))
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[: 6 * n_train]), ("test", rows[6 * n_train :])):
        body = "\ufeff" + "".join(f"{c},{e}\r\n" for c, e in part)
        (base / "annotations" / f"{name}.csv").write_bytes(body.encode("utf-8"))
    return base


def build(dataset: str, root: Path, **over):
    cfg = assemble(DATASETS.get(dataset), _Method, overrides={"data_root": str(root), **SMALL, **over})
    return DATASETS.get(dataset)().build(cfg, ["audio", "visual"])


@pytest.fixture(scope="module")
def cremad(tmp_path_factory):
    """(files splits, cached splits, data folder, cache folder) of one CREMA-D fixture."""
    tmp = tmp_path_factory.mktemp("cache")
    root = make_cremad(tmp / "CREMA-D")
    files = build("cremad", root)
    cached = build("cremad", root, cache=str(tmp / "cache"))
    return files, cached, root, tmp / "cache"


# ------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("hw", [(360, 480), (36, 40), (10, 400), (400, 10), (224, 224), (3, 5)])
def test_rrc_params_are_torchvisions_draws(hw):
    """Same seed, same crop: rrc_params replays RandomResizedCrop.get_params (with a generator
    and from the global RNG), and draw_flip RandomHorizontalFlip's draw."""
    h, w = hw
    img = torch.empty(3, h, w)
    for seed in range(40):
        torch.manual_seed(seed)
        ref = T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
        ref_flip = bool(torch.rand(1) < 0.5)
        g = torch.Generator().manual_seed(seed)
        assert cache.rrc_params(h, w, generator=g) == ref
        assert cache.draw_flip(generator=g) == ref_flip
        torch.manual_seed(seed)
        assert cache.rrc_params(h, w) == ref
        i, j, ch, cw = ref
        assert i >= 0 and j >= 0 and i + ch <= h and j + cw <= w


def test_crop_box_store_shape_and_train_candidates_by_hand():
    assert cache.crop_box((10, 20, 30, 40), (100, 200), (50, 100)) == (10.0, 5.0, 30.0, 20.0)
    assert cache.crop_box((0, 0, 36, 40), (36, 40), (36, 40)) == (0.0, 0.0, 40.0, 36.0)
    assert cache.store_shape([(360, 480)] * 3 + [(720, 1280)], 360) == (360, 480)
    assert cache.store_shape([(720, 1280)] * 2 + [(360, 480)], 360) == (360, 640)
    assert cache.store_shape([(100, 80)], 360) == (100, 80)  # never upscaled
    assert media.train_candidates(5, 2, "random") == [0, 1, 2, 3, 4]
    assert media.train_candidates(10, 3, "first") == [0, 1, 2]
    assert media.train_candidates(10, 3, "ogm_fixed") == [1, 4, 7]
    assert media.train_candidates(6, 3, "segments") == [1]
    assert media.train_candidates(10, 3, "segments") == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert media.train_candidates(7, 3, "segments") == [1, 2, 3, 4, 5, 6]
    with pytest.raises(DataError):
        media.train_candidates(2, 3, "random")
    for n, k, rule in ((10, 3, "segments"), (7, 3, "segments"), (5, 2, "random")):
        for seed in range(30):
            torch.manual_seed(seed)
            assert set(media.choose_frames(n, k, True, rule)) <= set(media.train_candidates(n, k, rule))


def smooth_frame(h: int = 72, w: int = 96) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([127 + 100 * np.sin(xx / 9.0 + c) * np.cos(yy / 12.0 - c) for c in range(3)], -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def denorm(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) ImageNet-normalised -> (H, W, 3) grey levels."""
    mean = torch.tensor(media.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(media.IMAGENET_STD).view(3, 1, 1)
    return ((x * std + mean) * 255).permute(1, 2, 0).numpy()


def test_device_crop_matches_torchvisions_pil_crop_on_smooth_frames():
    """roi_align crops = PIL's RandomResizedCrop output within a grey level (smooth pictures),
    flips where drawn, and leaves finished batches alone."""
    arr = smooth_frame()
    pil = Image.fromarray(arr)
    g = torch.Generator().manual_seed(3)
    params = [cache.rrc_params(72, 96, generator=g) for _ in range(12)]
    flips = [k % 3 == 0 for k in range(12)]
    batch = {
        "visual": torch.from_numpy(np.stack([arr] * 12)).view(6, 2, 72, 96, 3),
        "visual_box": torch.tensor([cache.crop_box(p, (72, 96), (72, 96)) for p in params]).view(6, 2, 4),
        "visual_flip": torch.tensor(flips).view(6, 2),
        "label": torch.arange(6),
    }
    out = cache.DeviceCrop(32)(batch)
    assert set(out) == {"visual", "label"} and out["visual"].shape == (6, 3, 2, 32, 32)
    assert out["visual"].dtype == torch.float32
    for k, (p, f) in enumerate(zip(params, flips, strict=True)):
        ref = TF.resized_crop(pil, *p, [32, 32], InterpolationMode.BILINEAR, antialias=True)
        ref = np.asarray(TF.hflip(ref) if f else ref, dtype=np.float64)
        got = denorm(out["visual"][k // 2, :, k % 2])
        diff = np.abs(got - ref)
        assert diff.mean() < 0.6 and diff.max() < 3.5, (k, p, diff.mean(), diff.max())
    done = {"visual": out["visual"], "label": out["label"]}
    assert cache.DeviceCrop(32)(done) is done  # not raw: untouched
    assert not cache.is_raw_batch({"visual": torch.zeros(2, 3, 2, 4, 4)})


# --------------------------------------------------------------------- cached vs uncached


def test_cached_eval_tensors_are_the_files_bit_for_bit(cremad):
    files, cached, _, _ = cremad
    assert type(cached.test).__name__ == "CachedAVClipDataset" and type(files.test).__name__ == "AVClipDataset"
    for split in ("val", "test"):
        a, b = getattr(files, split), getattr(cached, split)
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            x, y = a[i], b[i]
            for m in ("audio", "visual"):
                assert x[m].dtype == y[m].dtype and torch.equal(x[m], y[m]), (split, i, m)
            assert (x["label"], x["index"]) == (y["label"], y["index"])
    assert cached.info["input_cache"]["clips"] == 18
    assert cached.modalities == files.modalities and cached.info["sizes"] == files.info["sizes"]


def test_cached_train_items_follow_the_uncached_stream(cremad):
    """CPU mode: same seed, same train tensors as the files (bit for bit where a frame is
    stored at its own size; the odd-sized clip's are resized copies, so close)."""
    files, cached, _, _ = cremad
    for i in range(len(files.train)):
        torch.manual_seed(100 + i)
        x = files.train[i]
        torch.manual_seed(100 + i)
        y = cached.train[i]
        assert torch.equal(x["audio"], y["audio"])
        if files.train.clips[i].clip_id == ODD:
            assert x["visual"].shape == y["visual"].shape
            assert (x["visual"] - y["visual"]).abs().mean() < 0.5  # noise frames, another resampling
        else:
            assert torch.equal(x["visual"], y["visual"]), i


def test_device_mode_draws_the_same_crop_parameters(cremad):
    """Device mode hands on uint8 frames with boxes and flips; for a seed they are exactly what
    the uncached transforms draw (frame picks, then RandomResizedCrop and flip per frame)."""
    _, cached, root, _ = cremad
    ds = cached.train
    ds.raw = True
    try:
        for i in range(len(ds)):
            clip = ds.clips[i]
            torch.manual_seed(7 + i)
            item = ds[i]
            torch.manual_seed(7 + i)
            picks = media.choose_frames(len(clip.frame_names), 2, True, "random")
            boxes, flips = [], []
            for t in picks:
                img = media.load_rgb(clip.frame_dir / clip.frame_names[t])
                p = T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
                flips.append(bool(torch.rand(1) < 0.5))
                boxes.append(cache.crop_box(p, (img.height, img.width), (36, 40)))
            assert item["visual"].dtype == torch.uint8 and item["visual"].shape == (2, 36, 40, 3)
            np.testing.assert_allclose(item["visual_box"].numpy(), np.asarray(boxes), rtol=0, atol=1e-5)
            assert item["visual_flip"].tolist() == flips
        batch = default_collate([ds[i] for i in range(4)])
        out = cached.device_transform(batch, None)
        assert out["visual"].shape == (4, 3, 2, 32, 32) and "visual_box" not in out
    finally:
        ds.raw = False


def test_loaders_and_wrap_loader(cremad):
    """Worker processes read the cache (CPU mode: finished batches); wrap_loader leaves CPU
    runs and uncached splits alone, and in device mode yields finished batches."""
    files, cached, _, _ = cremad
    loader = DataLoader(cached.train, batch_size=4, shuffle=True, num_workers=2,
                        generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert sum(len(b["label"]) for b in batches) == len(cached.train)
    assert all(b["visual"].shape[1:] == (3, 2, 32, 32) and b["visual"].dtype == torch.float32 for b in batches)
    assert cache.wrap_loader(loader, cached, "cpu") is loader
    plain = DataLoader(files.train, batch_size=4)
    assert cache.wrap_loader(plain, files, "cpu", enable=True) is plain
    assert cache.enable_device_transform(files) is None
    try:
        wrapped = cache.wrap_loader(DataLoader(cached.train, batch_size=4), cached, "cpu", enable=True)
        assert isinstance(wrapped, cache.DeviceLoader) and len(wrapped) == 2
        assert cache.wrap_loader(wrapped, cached, "cpu") is wrapped
        assert cached.train.raw and not cached.val.raw
        for b in wrapped:
            assert b["visual"].shape[1:] == (3, 2, 32, 32) and b["visual"].dtype == torch.float32
            assert set(b) == {"audio", "visual", "label", "index"}
        for b in cache.wrap_loader(DataLoader(cached.test, batch_size=3), cached, "cpu"):
            assert b["visual"].shape[1:] == (3, 2, 32, 32)
    finally:
        cached.train.raw = False


# ----------------------------------------------------------------------- stale and broken


def test_stale_cache_is_refused(tmp_path):
    root = make_cremad(tmp_path / "CREMA-D", n_train=2, n_test=1, frames=2)
    folder = tmp_path / "c"
    build("cremad", root, cache=str(folder))
    with pytest.raises(cache.StaleCacheError, match=r"other preprocessing settings \(audio:.*audio_shape"):
        build("cremad", root, cache=str(folder), audio_seconds=0.25)
    with pytest.raises(cache.StaleCacheError, match="frames: 2 there, 1 now"):
        build("cremad", root, cache=str(folder), frames=1)
    clip = root / "Image-01-FPS" / "1001_DFA_NEU_XX"
    frame = clip / "00030.jpg"
    Image.fromarray(np.zeros((36, 40, 3), np.uint8)).save(frame)  # the picture changed
    with pytest.raises(cache.StaleCacheError, match="changed since it was built.*1001_DFA_NEU_XX"):
        build("cremad", root, cache=str(folder))
    write_frames(clip, 3)  # one frame more: another listing
    with pytest.raises(cache.StaleCacheError, match="other frame files"):
        build("cremad", root, cache=str(folder))
    extra = "1999_DFA_ANG_XX"
    write_wav(root / "AudioWAV" / f"{extra}.wav", seconds=0.3)
    write_frames(root / "Image-01-FPS" / extra, 2)
    (root / "annotations" / "test.csv").write_text(
        (root / "annotations" / "test.csv").read_text(encoding="utf-8-sig") + f"{extra},ANG\r\n")
    with pytest.raises(cache.StaleCacheError, match="are not in it"):
        build("cremad", root, cache=str(folder))


def test_bad_cache_folders_are_refused(tmp_path):
    root = make_cremad(tmp_path / "CREMA-D", n_train=2, n_test=1, frames=2)
    with pytest.raises(cache.CacheError, match="inside the data folder"):
        build("cremad", root, cache=str(root / "cache"))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(cache.CacheError, match="not an input cache"):
        build("cremad", root, cache=str(junk))
    (tmp_path / "file").write_text("x")
    with pytest.raises(cache.CacheError, match="is a file"):
        build("cremad", root, cache=str(tmp_path / "file"))
    folder = tmp_path / "c"
    build("cremad", root, cache=str(folder))
    (folder / "audio.npy").write_bytes(b"\x93NUMPY broken")
    splits = build("cremad", root, cache=str(folder))  # the arrays are mapped on first read
    with pytest.raises(cache.CacheError, match="missing or damaged"):
        splits.test[0]
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(cache.CacheError, match="cannot be read"):
        build("cremad", root, cache=str(folder))


def test_build_is_atomic_and_happens_once(tmp_path):
    root = make_cremad(tmp_path / "CREMA-D", n_train=2, n_test=1, frames=2)
    folder = tmp_path / "c"
    leftover = tmp_path / ".c.partial-1-dead"
    leftover.mkdir()
    (leftover / "audio.npy").write_bytes(b"half")
    bad = root / "Image-01-FPS" / "1002_DFA_HAP_XX" / "00000.jpg"
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) * 2 // 3])  # its header reads; decoding fails mid-build
    with pytest.raises(DataError, match="1002_DFA_HAP_XX"):
        build("cremad", root, cache=str(folder))
    assert not folder.exists() and not list(tmp_path.glob(".c.partial-*"))  # nothing half-written
    bad.write_bytes(good)
    build("cremad", root, cache=str(folder))
    manifest = json.loads((folder / "manifest.json").read_text())
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    assert sorted(p.name for p in folder.iterdir()) == sorted([*cache.ARRAY_FILES.values(), "manifest.json", "clips.json"])
    assert manifest["settings"]["audio_shape"] == [1, 257, 32] and manifest["clips"] == 18
    assert manifest["data_fingerprint"]["root"] == str(root.resolve())
    build("cremad", root, cache=str(folder))  # opened, not rebuilt
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp


def test_version_change_warns(tmp_path, monkeypatch):
    root = make_cremad(tmp_path / "CREMA-D", n_train=2, n_test=1, frames=2)
    build("cremad", root, cache=str(tmp_path / "c"))
    real = cache._versions
    monkeypatch.setattr(cache, "_versions", lambda: {**real(), "torch": "0.0-other"})
    with pytest.warns(cache.CacheVersionWarning, match="torch"):
        build("cremad", root, cache=str(tmp_path / "c"))


# -------------------------------------------------------------------- Kinetics-Sounds


def make_ks(base: Path, layout: str) -> Path:
    classes = ("bowling", "tap dancing")
    base.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 4), ("test", 1)):
        rows = [(f"{split}{j}{k}abcdefghijk", name) for j in range(n) for k, name in enumerate(classes)]
        if layout == "C":
            (base / "annotations").mkdir(parents=True, exist_ok=True)
            body = "youtube_id,label\r\n" + "".join(f"{c},{lab}\r\n" for c, lab in rows)
            (base / "annotations" / f"{split}.csv").write_bytes(body.encode())
        else:
            (base / f"my_{split}.txt").write_text("".join(f"{c},10,{classes.index(lab)}\r\n" for c, lab in rows))
        for i, (cid, _) in enumerate(rows):
            if layout == "C":
                write_wav(base / f"{split}_wav" / f"{cid}.wav", seconds=0.4, seed=i)
                write_frames(base / f"{split}_img" / "Image-01-FPS" / cid, 5, "frame_{:05d}.jpg", step=1)
            else:
                fb = base / "audio" / f"{split}_fbank" / f"{cid}.npy"
                fb.parent.mkdir(parents=True, exist_ok=True)
                np.save(fb, np.random.default_rng(i).standard_normal((1024, 128)).astype(np.float32))
                write_frames(base / "visual" / f"{split}_imgs" / cid, 10, "frame_0000{}.jpg", step=1)
    return base


@pytest.mark.parametrize("layout", ["C", "A"])
def test_ksounds_cache_gives_the_files_tensors(tmp_path, layout):
    root = make_ks(tmp_path / "kinetics_sound", layout)
    files = build("ksounds", root, layout=layout)
    cached = build("ksounds", root, layout=layout, cache=str(tmp_path / "c"))
    for split in ("val", "test"):
        a, b = getattr(files, split), getattr(cached, split)
        for i in range(len(a)):
            assert torch.equal(a[i]["audio"], b[i]["audio"]) and torch.equal(a[i]["visual"], b[i]["visual"])
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    # only what a train draw can pick is stored: first 3 (C) or frames 1, 4, 7 (A) of train clips
    assert manifest["train_frames"] == 8 * 3
    assert manifest["settings"]["frame_rule"] == ("first" if layout == "C" else "ogm_fixed")
    for i in range(len(files.train)):
        torch.manual_seed(i)
        x = files.train[i]
        torch.manual_seed(i)
        assert torch.equal(x["visual"], cached.train[i]["visual"])


# ------------------------------------------------------------------- runs and preparation


def test_device_mode_wired_in_trainer_loader(tmp_path, monkeypatch):
    """A run with --set cache=DIR and the one-line wiring proposed for Trainer.loader (every
    loader through wrap_loader, device mode forced on although this is a CPU): training,
    evaluation and the end-of-run diagnostics (probes over the train split) all get finished
    batches, and the record names the cache."""
    from mmbalance.runner import run
    from mmbalance.trainer import Trainer

    original = Trainer.loader
    wrapped: list[bool] = []

    def loader(self, ds, train, epoch=0, seed=None, batch_size=None):
        out = cache.wrap_loader(original(self, ds, train, epoch, seed, batch_size), self.splits, self.device,
                                enable=True)
        wrapped.append(isinstance(out, cache.DeviceLoader))
        return out

    monkeypatch.setattr(Trainer, "loader", loader)
    root = make_cremad(tmp_path / "CREMA-D", n_train=2, n_test=1, frames=2)
    over = {"data_root": str(root), "records": str(tmp_path / "runs"), "device": "cpu", "progress": "off",
            "epochs": 1, "limit_train_batches": 2, "limit_eval_batches": 1, "batch_size": 2, "embed_dim": 16,
            "checkpoint": False, "diagnostics": True, "cache": str(tmp_path / "c"), **SMALL}
    result = run("concat", "cremad", over)
    assert wrapped and all(wrapped)
    assert result.record["final"]["diagnostics"]["probe"]
    assert result.record["header"]["dataset_info"]["input_cache"]["dir"] == str(tmp_path / "c")


def test_prepare_cache_builds_then_checks(tmp_path):
    from mmbalance.prepare import prepare, prepare_cache

    root = make_cremad(tmp_path / "CREMA-D", n_train=2, n_test=1, frames=2)
    opts = {"check_manifest": False, "image_size": 32, "audio_seconds": 0.5}
    first = prepare_cache("cremad", root, tmp_path / "c", workers=1, **opts)
    assert first["action"] == "built" and first["clips"] == 18 and "--set cache=" in first["use"]
    again = prepare_cache("cremad", root, tmp_path / "c", **opts)
    assert again["action"].startswith("checked")
    build("cremad", root, cache=str(tmp_path / "c"))  # a run with the same settings opens it
    with pytest.raises(cache.StaleCacheError):
        prepare_cache("cremad", root, tmp_path / "c", check_manifest=False, image_size=48)
    with pytest.raises(ConfigError, match="offered for cremad, ksounds"):
        prepare("nvgesture", tmp_path, tmp_path / "o", cache=str(tmp_path / "c2"))
    with pytest.raises(ConfigError, match="Unknown|unknown"):
        prepare("cremad", tmp_path, tmp_path / "o", cache=str(tmp_path / "c2"), cache_set={"no_such_key": 1})
    with pytest.raises(ConfigError, match="cache_set is given but cache is not"):
        prepare("cremad", tmp_path, tmp_path / "o", cache_set={"layout": "A"})


# ---------------------------------------------------------------------- the device check


@pytest.mark.slow
def test_gpu_epoch_script_smoke_on_cpu(tmp_path):
    """benchmarks/gpu_epoch.py --device cpu --steps 2: every method and input path runs
    through the real trainer and one JSON of figures comes out."""
    out = tmp_path / "fig.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_epoch.py"), "--device", "cpu",
                           "--steps", "2", "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads(out.read_text())
    assert fig["device"] == "cpu" and fig["shapes"] == "tiny" and fig["steps"] == 2
    for m in ("joint", "iprm"):
        for path in ("random", "cache", "files"):
            r = fig["methods"][m][path]
            assert r["batches"] == 2 and r["s_per_epoch"] > 0
    assert fig["methods"]["joint"]["label"] == "Concat + uni CE" and fig["methods"]["iprm"]["label"] == "IPRM"
    assert set(fig["ratio_iprm_to_joint"]) == {"random", "cache", "files"}
    assert fig["input"]["cache"]["samples"] == 4 and fig["input"]["ratio_cache_to_files"] > 0


def test_gpu_epoch_input_path_on_cpu(tmp_path):
    """The script's clip writer and input-path measurement (fast part of the smoke run)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_epoch
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    data = gpu_epoch.write_cremad_clips(tmp_path / "CREMA-D", 4, 6, "tiny", workers=1)
    assert len(list((data / "AudioWAV").glob("*.wav"))) == 10
    assert Image.open(next((data / "Image-01-FPS").rglob("*.jpg"))).size == (40, 30)
    files = gpu_epoch.overrides(data, tmp_path / "runs", "cpu", "tiny")
    cached = gpu_epoch.overrides(data, tmp_path / "runs", "cpu", "tiny", cache=tmp_path / "c")
    res = gpu_epoch.measure_input(files, cached)
    assert res["files"]["samples"] == res["cache"]["samples"] == 4
    assert (tmp_path / "c" / "manifest.json").is_file()


@pytest.mark.gpu
def test_device_crop_and_loader_on_cuda(cremad):
    """On CUDA the wrapped loader's crops equal the same crops computed on the CPU (within a
    rounding level) and come out on the device."""
    _, cached, _, _ = cremad
    try:
        cache.enable_device_transform(cached)
        torch.manual_seed(0)
        raw = default_collate([cached.train[i] for i in range(6)])
        on_cpu = cached.device_transform(raw)
        on_gpu = cached.device_transform(cache.to_device(raw, torch.device("cuda")))
        assert on_gpu["visual"].is_cuda
        assert (on_gpu["visual"].cpu() - on_cpu["visual"]).abs().max() < 2.0 / 255 / 0.224
        loader = cache.wrap_loader(DataLoader(cached.train, batch_size=3, num_workers=2, pin_memory=True),
                                   cached, "cuda")
        seen = 0
        for b in loader:
            assert b["visual"].is_cuda and b["visual"].shape[1:] == (3, 2, 32, 32) and b["audio"].is_cuda
            seen += len(b["label"])
        assert seen == len(cached.train)
    finally:
        cached.train.raw = False
