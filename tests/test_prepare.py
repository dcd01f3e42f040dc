"""``mmbalance prepare`` on tiny raw releases written under tmp_path with PyAV.

Each fake release holds real media (FLV / MP4 / AVI encoded by FFmpeg through PyAV, 16-bit
WAVs, JPEGs). Every frame of a fixture video is a flat colour whose red value encodes its
index, so the tests can check *which* source frames the extractor saved. After preparing, the
output is opened with the dataset's own loader plugin to prove the layouts match.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from mmbalance import prepare as prep  # noqa: E402
from mmbalance.config import assemble  # noqa: E402
from mmbalance.errors import ConfigError, DataError, MMBalanceError  # noqa: E402
from mmbalance.registry import DATASETS  # noqa: E402

RED_STEP = 6  # frame k of a fixture video has red = RED_STEP * k (k < 43)


# ------------------------------------------------------------------------------ fixtures


def make_video(
    path: Path,
    seconds: float = 3.0,
    fps: int = 10,
    size: tuple[int, int] = (32, 24),
    codec: str = "mpeg4",
    fmt: str | None = None,
    audio_rate: int | None = None,
    tone_hz: float = 440.0,
) -> int:
    """Encode a real video (frame k: red = 6k) with an optional stereo AAC tone; returns frames."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    n = int(round(seconds * fps))
    with av.open(str(path), "w", format=fmt) as c:
        vs = c.add_stream(codec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"qscale": "2"} if codec in ("mpeg4", "flv") else {}
        aus = c.add_stream("aac", rate=audio_rate) if audio_rate else None
        if aus is not None:
            aus.layout = "stereo"
        for k in range(n):
            img = np.full((h, w, 3), 60, np.uint8)
            img[..., 0] = RED_STEP * k
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if aus is not None:
            _encode_tone(c, aus, seconds, audio_rate, tone_hz)
    return n


def _encode_tone(c, stream, seconds: float, rate: int, tone_hz: float) -> None:
    total = int(seconds * rate)
    sig = (0.3 * np.sin(2 * np.pi * tone_hz * np.arange(total) / rate)).astype(np.float32)
    for s in range(0, total, 1024):
        chunk = sig[s : s + 1024]
        frame = av.AudioFrame.from_ndarray(np.stack([chunk, chunk]), format="fltp", layout="stereo")
        frame.sample_rate, frame.pts = rate, s
        for p in stream.encode(frame):
            c.mux(p)
    for p in stream.encode():
        c.mux(p)


def write_wav(path: Path, seconds: float = 1.0, rate: int = 16000, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    sig = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)
    sf.write(str(path), (sig * 32767).astype(np.int16), rate, subtype="PCM_16")


class _Method:
    name = "concat"
    options: dict = {}
    defaults: dict = {}


def build_splits(dataset: str, root: Path, modalities: list[str], **over):
    """Open a prepared folder with the dataset's own loader plugin."""
    cls = DATASETS.get(dataset)
    values = {"data_root": str(root), "check_manifest": False, "val_fraction": 0.0, **over}
    return cls().build(assemble(cls, _Method, overrides=values), modalities)


def red_values(folder: Path) -> list[int]:
    return [int(round(np.asarray(Image.open(p))[..., 0].mean())) for p in sorted(folder.glob("*.jpg"))]


CREMAD_IDS = ["1001_DFA_ANG_XX", "1002_IEO_ANG_LO", "1003_TIE_HAP_HI", "1004_IOM_HAP_XX"]


def make_cremad_raw(root: Path, ids=CREMAD_IDS) -> Path:
    raw = root / "CREMA-D-raw"
    for k, cid in enumerate(ids):
        make_video(raw / "VideoFlash" / f"{cid}.flv", seconds=2.5 + 0.5 * k, codec="flv", fmt="flv")
        write_wav(raw / "AudioWAV" / f"{cid}.wav", seed=k)
    return raw


# ----------------------------------------------------------------------- pure functions


def test_frame_plan_matches_hand_computed_indices():
    # 100 frames at 30 fps (3.33 s): samples at 0.5, 1.5, 2.5 s, then wrap into the last
    # partial second (frames 90..99): 105 -> 90 + 15 % 10 = 95.
    assert prep.frame_plan(100, 30, 1, 10) == [15, 45, 75] + [95] * 7
    # 150 frames = exactly 5 s: the wrap window is the full last second (120..149).
    assert prep.frame_plan(150, 30, 1, 10) == [15, 45, 75, 105, 135] + [135] * 5
    assert prep.frame_plan(30, 10, 2, 6) == [2, 7, 12, 17, 22, 27]
    # NTSC rate: last second = 2, starts at ceil(59.94) = 60, span 30; 104 -> 60 + 44 % 30.
    assert prep.frame_plan(90, Fraction(30000, 1001), 1, 4) == [14, 44, 74, 74]
    with pytest.raises(DataError):
        prep.frame_plan(0, 30, 1, 10)


def test_per_second_plan_is_ogm_ges_current_extractor():
    # one frame per started second: the first of every block of int(rate) frames
    assert prep.per_second_plan(100, 30, 1) == [0, 30, 60, 90]
    assert prep.per_second_plan(90, 30, 1) == [0, 30, 60]  # exactly 3 s: no fourth frame
    assert prep.per_second_plan(31, 30, 1) == [0, 30]
    # 2 per second: step int(30 / 2) = 15 within each second
    assert prep.per_second_plan(70, 30, 2) == [0, 15, 30, 45, 60]
    # 29.97 fps is int() 29 in OpenCV: the blocks are 29 frames long
    assert prep.per_second_plan(75, 29, 1) == [0, 29, 58]
    # 3 per second at 10 fps: step 3, kept while j < 9 (j = 9 is skipped)
    assert prep.per_second_plan(20, 10, 3) == [0, 3, 6, 10, 13, 16]
    with pytest.raises(ConfigError, match="more than the video"):
        prep.per_second_plan(10, 10, 11)
    assert set(prep.FRAME_EXTRACTORS) == {"per_second", "ten_frames"}


def test_stratified_split_is_deterministic_and_per_class():
    ids = [f"c{k}" for k in range(20)]
    labels = ["A"] * 10 + ["B"] * 6 + ["C"] * 4
    train, test = prep.stratified_split(ids, labels, 0.25, seed=3)
    assert (train, test) == prep.stratified_split(ids, labels, 0.25, seed=3)
    assert sorted(train + test) == sorted(ids) and not set(train) & set(test)
    by = dict(zip(ids, labels, strict=True))
    # round(10 * .25) = 2 (banker's rounding of 2.5), round(1.5) = 2, round(1.0) = 1
    assert [sum(by[t] == c for t in test) for c in "ABC"] == [2, 2, 1]
    assert prep.stratified_split(ids, labels, 0.25, seed=4) != (train, test)
    with pytest.raises(ConfigError):
        prep.stratified_split(ids, labels, 1.5, seed=0)


# -------------------------------------------------------------------------------- CREMA-D


def test_cremad_random_split_writes_layout_b_the_loader_reads(tmp_path):
    raw = make_cremad_raw(tmp_path)
    out = tmp_path / "CREMA-D"
    summary = prep.prepare("cremad", raw, out, test_fraction=0.5, seed=0, progress=False)
    assert summary["written"]["frame folders"] == 4 and summary["written"]["wavs"] == 4
    assert summary["failed"] == 0 and any("NOT the paper" in n for n in summary["notes"])
    assert json.loads((out / "mmbalance_prepare.json").read_text())["dataset"] == "cremad"

    # default = OGM-GE's current extractor: 2.5 s at 10 fps -> source frames 0, 10, 20
    names = sorted(p.name for p in (out / "Image-01-FPS" / CREMAD_IDS[0]).iterdir())
    assert names == ["00000.jpg", "00010.jpg", "00020.jpg"]
    with Image.open(out / "Image-01-FPS" / CREMAD_IDS[0] / "00000.jpg") as im:
        assert im.size == (32, 24) and im.mode == "RGB"
    assert np.allclose(red_values(out / "Image-01-FPS" / CREMAD_IDS[0]), [0, 60, 120], atol=3)
    # 4.0 s clip (40 frames): 0, 10, 20, 30
    assert len(list((out / "Image-01-FPS" / CREMAD_IDS[3]).glob("*.jpg"))) == 4
    assert any("per second" in n for n in summary["notes"])

    train = (out / "annotations" / "train.csv").read_text().splitlines()
    test = (out / "annotations" / "test.csv").read_text().splitlines()
    assert len(train) == 2 and len(test) == 2 and not set(train) & set(test)
    assert sorted(line.split(",")[1] for line in test) == ["ANG", "HAP"]
    assert all(line == f"{line.split(',')[0]},{line.split('_')[2]}" for line in train + test)
    assert (out / "AudioWAV" / f"{CREMAD_IDS[0]}.wav").read_bytes() == (
        raw / "AudioWAV" / f"{CREMAD_IDS[0]}.wav"
    ).read_bytes()

    splits = build_splits("cremad", tmp_path, ["audio", "visual"], image_size=32, audio_seconds=0.5)
    assert (len(splits.train), len(splits.test)) == (2, 2)
    assert "per-second extractor" in splits.info["frame_files"]  # the run records the extractor
    item = splits.test[0]
    assert item["visual"].shape == (3, 2, 32, 32) and item["audio"].shape[0] == 1

    from mmbalance.runner import run

    result = run("concat", "cremad", overrides={
        "data_root": str(out), "epochs": 1, "device": "cpu", "records": str(tmp_path / "runs"),
        "limit_train_batches": 1, "limit_eval_batches": 1, "batch_size": 2,
        "check_manifest": False, "val_fraction": 0.0, "image_size": 32, "audio_seconds": 0.5,
    })
    assert "final" in result.record and result.run_dir.is_dir()


def test_cremad_user_split_files_resume_and_workers(tmp_path):
    raw = make_cremad_raw(tmp_path)
    lists = tmp_path / "ogm"
    lists.mkdir()
    # OGM-GE format: BOM, CRLF, no header; one listed clip is absent from the raw tree.
    (lists / "train.csv").write_bytes(
        "\ufeff1001_DFA_ANG_XX,ANG\r\n1003_TIE_HAP_HI,HAP\r\n1090_ITS_SAD_XX,SAD\r\n".encode()
    )
    (lists / "test.csv").write_bytes(b"1002_IEO_ANG_LO,ANG\r\n1004_IOM_HAP_XX,HAP\r\n")
    out = tmp_path / "out"
    opts = dict(train_csv=str(lists / "train.csv"), test_csv=str(lists / "test.csv"), progress=False)
    first = prep.prepare("cremad", raw, out, workers=2, audio="symlink", **opts)
    assert first["written"]["frame folders"] == 4 and first["failed"] == 0
    assert any("1090_ITS_SAD_XX" in n for n in first["notes"])
    assert (out / "annotations" / "train.csv").read_text() == (
        "1001_DFA_ANG_XX,ANG\n1003_TIE_HAP_HI,HAP\n1090_ITS_SAD_XX,SAD\n"
    )
    assert (out / "AudioWAV" / "1001_DFA_ANG_XX.wav").is_symlink()
    again = prep.prepare("cremad", raw, out, **opts)
    assert again["skipped_existing"] == {"frame folders": 4, "wavs": 4}
    assert "frame folders" not in again["written"]
    redo = prep.prepare("cremad", raw, out, overwrite=True, fps=2, **opts)
    assert redo["written"]["frame folders"] == 4
    # 2 per second at 10 fps, 25 frames: 0, 5, 10, 15, 20
    names = sorted(p.name for p in (out / "Image-02-FPS" / "1001_DFA_ANG_XX").glob("*.jpg"))
    assert names == ["00000.jpg", "00005.jpg", "00010.jpg", "00015.jpg", "00020.jpg"]
    assert not list(out.rglob("*.partial"))


def test_cremad_ten_frame_extractor_option(tmp_path):
    raw = make_cremad_raw(tmp_path, CREMAD_IDS[:2])
    out = tmp_path / "out"
    opts = dict(test_fraction=0.5, seed=0, progress=False)
    summary = prep.prepare("cremad", raw, out, extractor="ten_frames", **opts)
    assert summary["written"]["frame folders"] == 2 and summary["options"]["extractor"] == "ten_frames"
    folder = out / "Image-01-FPS" / CREMAD_IDS[0]
    assert sorted(p.name for p in folder.iterdir()) == [f"frame_{i:05d}.jpg" for i in range(1, 11)]
    # 2.5 s at 10 fps = 25 frames: plan [5, 15, 20 x 8] (wrap into frames 20..24).
    expected = [RED_STEP * k for k in prep.frame_plan(25, 10, 1, 10)]
    assert np.allclose(red_values(folder), expected, atol=3)
    loaded = build_splits("cremad", out, ["visual"], image_size=32)
    assert "10-frame extractor" in loaded.info["frame_files"]
    redo = prep.prepare("cremad", raw, out, extractor="ten_frames", fps=2, seconds=2, **opts)
    assert len(list((out / "Image-02-FPS" / CREMAD_IDS[0]).glob("*.jpg"))) == 4
    assert redo["written"]["frame folders"] == 2
    # switching back without overwrite replaces the folder (it lacks the other extractor's files)
    back = prep.prepare("cremad", raw, out, **opts)
    assert back["written"]["frame folders"] == 2
    assert sorted(p.name for p in folder.iterdir()) == ["00000.jpg", "00010.jpg", "00020.jpg"]
    with pytest.raises(ConfigError, match="per_second"):
        prep.prepare("cremad", raw, out, extractor="ogm", **opts)


def test_cremad_bad_raw_and_bad_split_file(tmp_path):
    (tmp_path / "raw" / "AudioWAV").mkdir(parents=True)
    with pytest.raises(DataError, match="VideoFlash"):
        prep.prepare("cremad", tmp_path / "raw", tmp_path / "out")
    with pytest.raises(DataError, match="does not exist"):
        prep.prepare("cremad", tmp_path / "nowhere", tmp_path / "out")
    raw = make_cremad_raw(tmp_path, CREMAD_IDS[:2])
    bad = tmp_path / "bad.csv"
    bad.write_text("1001_DFA_ANG_XX;ANG\n")
    with pytest.raises(DataError, match="clip_id,EMO"):
        prep.prepare("cremad", raw, tmp_path / "out", train_csv=str(bad), test_csv=str(bad))
    with pytest.raises(ConfigError, match="both"):
        prep.prepare("cremad", raw, tmp_path / "out", train_csv=str(bad))


def test_unknown_dataset_option_and_not_offered():
    with pytest.raises(ConfigError, match="cremad.*ksounds") as err:
        prep.prepare("cremd", ".", ".")
    assert "Did you mean 'cremad'" in str(err.value)
    with pytest.raises(MMBalanceError, match="needs no preparation"):
        prep.prepare("sarcasm", ".", ".")
    with pytest.raises(ConfigError, match="fps \\(default 1\\)"):
        prep.prepare("cremad", ".", ".", fsp=2)
    assert set(prep.PREPARERS) <= set(prep.RAW_LAYOUTS)
    assert prep.preparer_options("ksounds")["sample_rate"] == 35400


# -------------------------------------------------------------------------- Kinetics-Sounds


def test_ksounds_frames_mono_audio_and_layout_c(tmp_path):
    raw = tmp_path / "kinetics"
    make_video(raw / "-abc123" ".mp4", seconds=3.0, audio_rate=16000, tone_hz=440)
    make_video(raw / "dog" / "xyz_000010_000020.mp4", seconds=2.0, audio_rate=16000, tone_hz=440)
    make_video(raw / "q1.mp4", seconds=3.0, audio_rate=16000, tone_hz=440)
    make_video(raw / "silent.mp4", seconds=1.0)
    (raw / "train.csv").write_text("youtube_id,label\n-abc123,playing drums\nxyz,dog barking\nsilent,dog barking\n")
    (raw / "test.csv").write_text("q1,playing drums\nmissing_id,dog barking\n")
    out = tmp_path / "kinetics_sound"
    summary = prep.prepare("ksounds", raw, out, sample_rate=8000, progress=False)
    assert summary["written"]["clips"] == 3
    assert summary["failed"] == 1 and "no audio stream" in summary["failures"][0]["error"]
    assert any("missing_id" in n for n in summary["notes"])

    assert (out / "annotations" / "test.csv").read_text() == (
        "youtube_id,label\nq1,playing drums\nmissing_id,dog barking\n"
    )
    frames = out / "train_img" / "Image-01-FPS" / "xyz"
    assert len(list(frames.glob("frame_*.jpg"))) == 10
    assert np.allclose(red_values(frames), [RED_STEP * k for k in prep.frame_plan(20, 10, 1, 10)], atol=3)
    wave, rate = sf.read(str(out / "train_wav" / "-abc123.wav"))
    assert rate == 8000 and wave.ndim == 1 and abs(len(wave) / rate - 3.0) < 0.15
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * rate / len(wave) - 440) < 5
    assert 0.25 < np.abs(wave[4000:20000]).max() < 0.35  # channel mean, not a louder downmix
    assert sf.info(str(out / "test_wav" / "q1.wav")).subtype == "PCM_16"

    splits = build_splits("ksounds", out, ["audio", "visual"], image_size=32, audio_seconds=1.0)
    assert (len(splits.train), len(splits.test)) == (2, 1)
    assert splits.class_names == ["dog barking", "playing drums"]
    assert splits.test[0]["visual"].shape == (3, 3, 32, 32)


def test_ksounds_without_split_csvs_is_a_clear_error(tmp_path):
    make_video(tmp_path / "raw" / "a.mp4", seconds=1.0)
    with pytest.raises(DataError, match="train / test split csv"):
        prep.prepare("ksounds", tmp_path / "raw", tmp_path / "out")


# ------------------------------------------------------------------------ Horn-Schunck


def _texture(size: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    noise = torch.tensor(rng.random((1, 1, size, size)), dtype=torch.float32)
    tex = prep._gaussian_blur(noise, 2.0)[0, 0]
    return (tex - tex.min()) / (tex.max() - tex.min())


@pytest.mark.parametrize("shift", [(2.0, -1.0), (-4.0, 3.0), (0.5, 0.0)])
def test_horn_schunck_recovers_a_known_translation(shift):
    dx, dy = shift
    big = _texture(96)
    # frame 2 = frame 1 moved by (dx, dy): I2(x) = I1(x - d)  =>  flow = +d everywhere
    moved = prep.warp(big[None, None], torch.tensor([-dx, -dy]).view(1, 2, 1, 1).expand(1, 2, 96, 96))
    i1, i2 = big[16:80, 16:80][None], moved[0, :, 16:80, 16:80]
    flow = prep.horn_schunck(i1, i2, prep.FlowSettings(iterations=30))
    assert flow.shape == (1, 2, 64, 64)
    centre = flow[0, :, 12:-12, 12:-12]
    assert abs(centre[0].median().item() - dx) < 0.15
    assert abs(centre[1].median().item() - dy) < 0.15
    still = prep.horn_schunck(i1, i1.clone())
    assert still.abs().max().item() < 1e-4


# ------------------------------------------------------------------------------ NVGesture


def make_nvgesture_raw(root: Path, frames: int = 8, size: int = 64) -> Path:
    """Two train clips and one test clip; the colour pattern moves 2 px right per frame."""
    from mmbalance.video import write_frames

    raw = root / "nvGesture"
    tex = (_texture(size + 3 * frames, seed=1).numpy() * 255).astype(np.uint8)
    colour = np.stack([np.repeat(tex[:size, 2 * (frames - t) : 2 * (frames - t) + size, None], 3, 2) for t in range(frames)])
    depth = np.repeat(colour[..., :1], 3, axis=3)
    lines = {"train": [], "test": []}
    for split, cls, subj in (("train", 1, 3), ("train", 2, 4), ("test", 1, 5)):
        folder = raw / "Video_data" / f"class_{cls:02d}" / f"subject{subj}_r0"
        folder.mkdir(parents=True)
        write_frames(folder / "sk_color.avi", colour)
        write_frames(folder / "sk_depth.avi", depth)
        lines[split].append(
            f"path:./Video_data/class_{cls:02d}/subject{subj}_r0 depth:sk_depth:1:5 "
            f"color:sk_color:1:5 duo_left:duo_left:2:7 label:{cls}"
        )
    for split, rows in lines.items():
        (raw / f"nvgesture_{split}_correct_cvpr2016_v2.lst").write_text("\r\n".join(rows) + "\r\n")
    return raw


def test_tvl1_recovers_a_known_translation():
    if not prep.tvl1_available():
        pytest.skip("OpenCV's contrib build (cv2.optflow) is not installed")
    tex = (_texture(96, seed=3).numpy() * 255).astype(np.uint8)
    # frame 2 = frame 1 moved 3 px right and 1 px up: flow = (+3, -1)
    a, b = tex[16:80, 16:80], tex[17:81, 13:77]
    flow = prep.tvl1_flow(np.stack([a, b]))
    assert flow.shape == (1, 64, 64, 2) and flow.dtype == np.float32
    centre = flow[0, 12:-12, 12:-12]
    assert abs(np.median(centre[..., 0]) - 3.0) < 0.2 and abs(np.median(centre[..., 1]) + 1.0) < 0.2
    still = prep.tvl1_flow(np.stack([a, a]))
    assert np.abs(still).max() < 0.05
    with pytest.raises(DataError, match="at least 2"):
        prep.tvl1_flow(a[None])


def test_flow_method_choice_and_fallback(monkeypatch):
    from mmbalance.prepare import flow as flow_mod

    monkeypatch.setattr(flow_mod, "tvl1_available", lambda: False)
    method, note = flow_mod.resolve_flow_method("auto")
    assert method == "horn_schunck" and "opencv-contrib-python-headless" in note
    with pytest.raises(ConfigError, match="opencv-contrib-python-headless"):
        flow_mod.resolve_flow_method("tvl1")
    with pytest.raises(ConfigError, match="farneback"):
        flow_mod.resolve_flow_method("farneback")
    monkeypatch.setattr(flow_mod, "tvl1_available", lambda: True)
    assert flow_mod.resolve_flow_method("auto") == ("tvl1", None)
    assert flow_mod.resolve_flow_method("horn_schunck") == ("horn_schunck", None)


def test_nvgesture_tvl1_is_the_default_and_every_file_records_its_method(tmp_path):
    if not prep.tvl1_available():
        pytest.skip("OpenCV's contrib build (cv2.optflow) is not installed")
    import cv2

    raw = make_nvgesture_raw(tmp_path)
    summary = prep.prepare("nvgesture", raw, raw, frame_size=64, progress=False)
    assert summary["written"]["flow files"] == 3 and summary["failed"] == 0
    assert summary["options"]["method"] == "auto" and any("TV-L1" in n for n in summary["notes"])
    flow = np.load(raw / "Video_data" / "flow_data" / "train" / "0.npy")
    assert flow.shape == (64, 64, 2, 4) and flow.dtype == np.float32
    assert abs(np.median(flow[12:-12, 12:-12, 0, :3]) - 2.0) < 0.3  # moves right 2 px per frame
    meta = json.loads((raw / "Video_data" / "flow_data" / "train" / "mmbalance_flow.json").read_text())
    (mid,) = set(meta["files"].values())
    assert sorted(meta["files"]) == ["0", "1"] and mid.startswith("tvl1-")
    record = meta["methods"][mid]
    assert record["method"] == "tvl1" and cv2.__version__ in record["library"]
    assert record["parameters"]["lambda"] == pytest.approx(0.15)  # OpenCV's default
    splits = build_splits("nvgesture", raw, ["rgb", "flow"], frame_size=64, crop_size=48, clip_frames=4, train_frames=4)
    assert splits.info["flow"]["method"] == mid and splits.info["flow"]["counts"] == {mid: 3}
    assert splits.info["flow"]["methods"][mid]["library"] == record["library"]

    # one file redone with Horn-Schunck: the loader reports a mix
    (raw / "Video_data" / "flow_data" / "test" / "0.npy").unlink()
    prep.prepare("nvgesture", raw, raw, frame_size=64, method="horn_schunck", device="cpu", progress=False)
    test_meta = prep.read_flow_meta(raw / "Video_data" / "flow_data" / "test")
    assert test_meta["files"]["0"].startswith("horn_schunck-")
    mixed = build_splits("nvgesture", raw, ["rgb", "flow"], frame_size=64, crop_size=48, clip_frames=4, train_frames=4)
    assert mixed.info["flow"]["method"] == "mixed" and any("several methods" in n for n in mixed.info["notes"])
    assert mixed.info["flow"]["counts"] == {mid: 2, test_meta["files"]["0"]: 1}
    # flow made elsewhere: unrecorded
    for split in ("train", "test"):
        (raw / "Video_data" / "flow_data" / split / "mmbalance_flow.json").unlink()
    bare = build_splits("nvgesture", raw, ["flow"], frame_size=64, crop_size=48, clip_frames=4, train_frames=4)
    assert bare.info["flow"]["method"] == "unrecorded" and any("unknown" in n for n in bare.info["notes"])
    (raw / "Video_data" / "flow_data" / "train" / "mmbalance_flow.json").write_text("{not json")
    with pytest.raises(DataError, match="mmbalance_flow.json"):
        build_splits("nvgesture", raw, ["flow"], frame_size=64, crop_size=48, clip_frames=4, train_frames=4)


def test_nvgesture_lists_links_and_horn_schunck_flow(tmp_path):
    raw = make_nvgesture_raw(tmp_path)
    out = tmp_path / "prepared"
    summary = prep.prepare("nvgesture", raw, out, frame_size=64, method="horn_schunck", device="cpu", progress=False)
    assert summary["written"]["flow files"] == 3 and summary["failed"] == 0
    meta = prep.read_flow_meta(out / "Video_data" / "flow_data" / "train")
    (mid,) = set(meta["files"].values())
    assert meta["methods"][mid]["parameters"]["alpha"] == 0.03 and mid.startswith("horn_schunck-")
    assert (out / "nvgesture_train_correct_v2.lst").read_bytes() == (
        raw / "nvgesture_train_correct_cvpr2016_v2.lst"
    ).read_bytes()
    assert (out / "Video_data" / "class_01").is_symlink()
    flow = np.load(out / "Video_data" / "flow_data" / "train" / "1.npy")
    assert flow.shape == (64, 64, 2, 4) and flow.dtype == np.float32
    centre = flow[12:-12, 12:-12]
    assert abs(np.median(centre[:, :, 0, :3]) - 2.0) < 0.3  # moves right 2 px per frame
    assert abs(np.median(centre[:, :, 1, :3])) < 0.3
    assert np.array_equal(flow[..., 3], flow[..., 2])  # padded to the frame count

    splits = build_splits(
        "nvgesture", out, ["rgb", "flow", "depth"], frame_size=64, crop_size=48,
        clip_frames=4, train_frames=4,
    )
    assert (len(splits.train), len(splits.test)) == (2, 1)
    item = splits.test[0]
    assert item["flow"].shape == (2, 4, 48, 48) and item["rgb"].shape == (3, 4, 48, 48)


def test_nvgesture_missing_avi_and_flow_off(tmp_path):
    raw = make_nvgesture_raw(tmp_path, frames=6)
    (raw / "Video_data" / "class_02" / "subject4_r0" / "sk_depth.avi").unlink()
    with pytest.raises(DataError, match="1 listed AVIs are missing.*strict=false"):
        prep.prepare("nvgesture", raw, raw, flow=False)
    summary = prep.prepare("nvgesture", raw, raw, flow=False, strict=False, progress=False)
    assert (raw / "nvgesture_test_correct_v2.lst").is_file()
    assert any("flow=false" in n for n in summary["notes"])
    assert not (raw / "Video_data" / "flow_data").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not the NVGesture release"):
        prep.prepare("nvgesture", tmp_path / "empty", tmp_path / "o")


# -------------------------------------------------------------------------------- IEMOCAP


def test_iemocap_fbank_tokens_faces(tmp_path):
    raw = tmp_path / "IEMOCAP_full_release"
    utts = {"train": ["Ses01F_impro01_F000", "Ses01F_impro01_M001"], "test": ["Ses05M_script02_2_F034"]}
    texts = {"Ses01F_impro01_F000": "Oh, right, sure.", "Ses01F_impro01_M001": "I am angry",
             "Ses05M_script02_2_F034": "Hello there"}
    faces = tmp_path / "faces"
    for k, (split, names) in enumerate(utts.items()):
        rows = []
        for j, u in enumerate(names):
            write_wav(raw / "Session1" / "sentences" / "wav" / u.rsplit("_", 1)[0] / f"{u}.wav", seconds=0.5 + j, seed=k)
            (faces / u).mkdir(parents=True)
            Image.fromarray(np.full((40, 30, 3), 100 + j, np.uint8)).save(faces / u / "0001.jpg")
            rows.append(f"{u}.mp4 [split|sign] {texts[u]} [split|sign] {['Angry', 'Happy'][j]}")
        (raw / f"my_{split}_iemo.txt").write_text("\n".join(rows) + "\n")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "oh", ",", "right", "sure", ".", "i", "am", "angry", "hello", "there"]) + "\n")
    out = tmp_path / "IEMOCAP"
    summary = prep.prepare("iemocap", raw, out, vocab=str(vocab), faces_dir=str(faces), progress=False)
    assert summary["failed"] == 0 and summary["written"]["fbank files"] == 3

    fb = np.load(out / "audio" / "train_fbank" / "Ses01F_impro01_F000.npy")
    assert fb.shape == (1024, 128) and fb.dtype == np.float32
    assert np.all(fb[60:] == 0) and np.all(fb[:40] != 0)  # 0.5 s = 48 frames, then zero padding
    ids = np.load(out / "text_token" / "train_token" / "Ses01F_impro01_F000_token.npy")
    pm = np.load(out / "text_token" / "train_token" / "Ses01F_impro01_F000_pm.npy")
    assert ids.shape == (1, 256) and ids.dtype == np.int64 and pm.dtype == np.float32
    assert ids[0, :6].tolist() == [5, 6, 7, 6, 8, 9]  # real words, no [UNK] (1), no [CLS]
    assert pm[0, :6].tolist() == [0.0] * 6 and pm[0, 6:].min() == 1.0
    with Image.open(next((out / "visual" / "test_imgs" / "Ses05M_script02_2_F034").iterdir())) as im:
        assert im.size == (256, 256)
    assert (out / "stat_iemo.txt").read_text().split() == ["Neutral", "Angry", "Sad", "Happy"]

    splits = build_splits("iemocap", out, ["audio", "visual", "text"], layout="mla", image_size=32)
    assert (len(splits.train), len(splits.test)) == (2, 1)


def test_iemocap_without_lists_or_wavs(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(DataError, match="my_train_iemo.txt"):
        prep.prepare("iemocap", tmp_path / "raw", tmp_path / "out")
    (tmp_path / "raw" / "my_train_iemo.txt").write_text("u1.mp4 [split|sign] hi [split|sign] Sad\n")
    (tmp_path / "raw" / "my_test_iemo.txt").write_text("u2.mp4 [split|sign] hi [split|sign] Sad\n")
    with pytest.raises(DataError, match="has a <utt>.wav"):
        prep.prepare("iemocap", tmp_path / "raw", tmp_path / "out")


# ------------------------------------------------------------------- IEMOCAP MulT pickles


def mult_pickle(path: Path, n: int = 2, protocol: int = pickle.HIGHEST_PROTOCOL, extra=None) -> dict:
    """A tiny MulT-style pickle ({split: {text, audio, vision, labels, id}}); returns its data."""
    rng = np.random.default_rng(n)
    data = {}
    for split in ("train", "valid", "test"):
        labels = np.zeros((n, 4, 2), np.float32)
        labels[..., 0] = 1.0
        labels[:, 1] = (0.0, 1.0)  # everyone Happy
        data[split] = {"text": rng.normal(size=(n, 3, 300)).astype(np.float32),
                       "audio": rng.normal(size=(n, 4, 74)), "vision": rng.normal(size=(n, 5, 35)),
                       "labels": labels, "id": np.array([[f"{split}{i}"] for i in range(n)])}
    if extra is not None:
        data["train"]["audio"] = extra
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    return data


class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_iemocap_mult_converts_pickles_to_npz_resumes_and_loads(tmp_path):
    from mmbalance.prepare.iemocap_mult import RestrictedUnpickler

    raw, out = tmp_path / "mult", tmp_path / "IEMOCAP"
    aligned = mult_pickle(raw / "iemocap_data.pkl", protocol=2)  # bytes via _codecs.encode
    unaligned = mult_pickle(raw / "iemocap_data_noalign.pkl", n=3, protocol=5)  # _frombuffer
    assert "iemocap_mult" in prep.RAW_LAYOUTS and "TRUST STEP" in prep.RAW_LAYOUTS["iemocap_mult"]
    assert prep.preparer_options("iemocap_mult") == {"overwrite": False}
    summary = prep.prepare("iemocap_mult", raw, out)
    assert summary["written"] == {"npz files": 2} and summary["failed"] == 0
    assert any("left out: id" in n for n in summary["notes"])
    assert json.loads((out / "mmbalance_prepare.json").read_text())["dataset"] == "iemocap_mult"
    for name, data in (("iemocap_data.npz", aligned), ("iemocap_data_noalign.npz", unaligned)):
        with np.load(out / name, allow_pickle=False) as z:
            assert len(z.files) == 12 and not any(f.endswith("__id") for f in z.files)
            for split, part in data.items():
                for key in ("text", "audio", "vision", "labels"):
                    assert z[f"{split}__{key}"].dtype == part[key].dtype
                    assert np.array_equal(z[f"{split}__{key}"], part[key])
    assert sorted(p.name for p in out.iterdir()) == [
        "iemocap_data.npz", "iemocap_data_noalign.npz", "mmbalance_prepare.json"]
    assert prep.prepare("iemocap_mult", raw, out)["skipped_existing"] == {"npz files": 2}
    assert prep.prepare("iemocap_mult", raw, out, overwrite=True)["written"] == {"npz files": 2}
    splits = build_splits("iemocap_mult", out, ["audio", "visual", "text"], aligned=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3, 3, 3)
    assert splits.modalities["visual"].shape == (5, 35) and splits.train[0]["label"] == 1
    assert torch.equal(splits.test.tensors["audio"], torch.from_numpy(unaligned["test"]["audio"].astype(np.float32)))
    # a Python 2 / numpy 1.x protocol-0 array pickle (numpy.core names, latin-1 str data)
    py2 = (b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(I0\ntS'b'\ntR(I1\n(I2\ntcnumpy\n"
           b"dtype\n(S'f4'\nI0\nI1\ntR(I3\nS'<'\nNNNI-1\nI-1\nI0\ntbI00\nS'\\x00\\x00\\x80?"
           b"\\x00\\x00\\x00@'\ntb.")
    assert RestrictedUnpickler(io.BytesIO(py2), encoding="latin1").load().tolist() == [1.0, 2.0]


def test_iemocap_mult_refuses_a_planted_pickle(tmp_path):
    from mmbalance.prepare.iemocap_mult import ForbiddenGlobal, RestrictedUnpickler

    raw, marker = tmp_path / "mult", tmp_path / "marker.txt"
    mult_pickle(raw / "iemocap_data.pkl", extra=_Planted(marker))
    with pytest.raises(DataError, match="Refused to unpickle .*'builtins.exec'"):
        prep.prepare("iemocap_mult", raw, raw)
    assert not marker.exists()
    assert sorted(p.name for p in raw.iterdir()) == ["iemocap_data.pkl"]  # no .npz, no .partial
    for payload in (_Planted(marker), os.system, getattr, dict.update, _Planted):
        with pytest.raises(ForbiddenGlobal):
            RestrictedUnpickler(io.BytesIO(pickle.dumps(payload))).load()
    with pytest.raises(pickle.UnpicklingError, match="latin-1"):  # allowed global, only as pickle uses it
        RestrictedUnpickler(io.BytesIO(pickle.dumps(_Rot13()))).load()
    assert not marker.exists()


class _Rot13:
    def __reduce__(self):
        import _codecs

        return _codecs.encode, ("abc", "rot13")


def test_iemocap_mult_bad_raw(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(DataError, match="iemocap_data.pkl nor iemocap_data_noalign.pkl"):
        prep.prepare("iemocap_mult", tmp_path / "raw", tmp_path / "out")
    (tmp_path / "raw" / "iemocap_data.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(DataError, match="expected a dict of splits"):
        prep.prepare("iemocap_mult", tmp_path / "raw", tmp_path / "out")
    (tmp_path / "raw" / "iemocap_data.pkl").write_bytes(pickle.dumps({"train": {}, "test": {}}))
    with pytest.raises(DataError, match="no 'valid' split"):
        prep.prepare("iemocap_mult", tmp_path / "raw", tmp_path / "out")
    assert not (tmp_path / "out" / "iemocap_data.npz").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_horn_schunck_on_cuda_matches_cpu():
    big = _texture(96)
    moved = prep.warp(big[None, None], torch.tensor([-3.0, 1.0]).view(1, 2, 1, 1).expand(1, 2, 96, 96))
    i1, i2 = big[16:80, 16:80][None], moved[0, :, 16:80, 16:80]
    cpu = prep.horn_schunck(i1, i2)
    gpu = prep.horn_schunck(i1.cuda(), i2.cuda()).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-3)
