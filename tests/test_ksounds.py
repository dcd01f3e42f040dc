"""Kinetics-Sounds plugin on tiny fixtures in its real layouts (written under tmp_path).

Layout C: njustkmg csvs with a youtube_id,label header, 16 kHz int16 WAVs, 1-fps JPEG folders.
Layouts A/B: OGM-GE '{clip},10,{label}' CRLF lists / BalanceMM 'clip label' lists, (1024, 128)
float32 fbank .npy files and frame_0000k.jpg frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_media import (
    check_av_bf16_steps_on_cuda,
    check_av_concat_step,
    frame_indices,
    write_frames,
    write_indexed_frames,
    write_wav,
)
from torch.utils.data import DataLoader

from mmbalance import media
from mmbalance.config import assemble
from mmbalance.data import Splits
from mmbalance.errors import ConfigError, DataError
from mmbalance.registry import DATASETS

# Names given in an unsorted, first-appearance order on purpose.
CLASSES = ("playing bagpipes", "bowling", "tap dancing")
IDS = ("--4-0ihtnBU_000058_000068", "-a1B2c3D4e5_000010_000020", "Zx9_yW8vU7t_000003_000013",
       "abcdefghijk_000000_000010", "-Qq_Ww-Ee_r_000100_000110", "mnopqrstuvw_000020_000030")


def clips(split: str, per_class: int) -> list[tuple[str, str]]:
    """(clip id, class name) rows, classes cycling in CLASSES order."""
    rows = []
    for j in range(per_class):
        for k, name in enumerate(CLASSES):
            base = IDS[(j * len(CLASSES) + k) % len(IDS)]
            rows.append((f"{split}{j}{k}{base}", name))
    return rows


def make_layout_c(root: Path, per_class: int = 2, frames: int = 5, valid: bool = False) -> Path:
    base = root / "kinetics_sound"
    (base / "annotations").mkdir(parents=True)
    splits = ["train", "test"] + (["valid"] if valid else [])
    for s in splits:
        rows = clips(s, per_class if s == "train" else 1)
        body = "youtube_id,label\r\n" + "".join(f"{cid},{name}\r\n" for cid, name in rows)
        (base / "annotations" / f"{s}.csv").write_bytes(body.encode())
        media = "train" if s == "valid" else s
        for i, (cid, _) in enumerate(rows):
            write_wav(base / f"{media}_wav" / f"{cid}.wav", seed=i)
            write_frames(base / f"{media}_img" / "Image-01-FPS" / cid, frames, "frame_{:05d}.jpg", step=1)
    return base


def make_fbank_layout(root: Path, layout: str, per_class: int = 2, n_classes: int = 3) -> Path:
    """Layout A (OGM-GE lists) or B (BalanceMM lists) with integer labels and .npy fbanks."""
    base = root / "kinetics_sound"
    for s in ("train", "test"):
        lines = []
        for j in range(per_class if s == "train" else 1):
            for label in reversed(range(n_classes)):  # first appearance: 2, 1, 0
                cid = f"{s}{j}{label}{IDS[label % len(IDS)]}"
                lines.append(f"{cid},10,{label}\r\n" if layout == "A" else f"{cid} {label}\n")
                fb = base / "audio" / f"{s}_fbank" / f"{cid}.npy"
                fb.parent.mkdir(parents=True, exist_ok=True)
                np.save(fb, np.full((1024, 128), float(label), dtype=np.float32))
                write_frames(base / "visual" / f"{s}_imgs" / cid, 10, "frame_0000{}.jpg", step=1)
        name = f"my_{s}.txt" if layout == "A" else f"{s}.txt"
        (base / name).write_bytes("".join(lines).encode())
    return base


class _Method:
    name = "concat"
    options: dict = {}
    defaults: dict = {}


def build(root: Path, modalities=("audio", "visual"), **over) -> Splits:
    values = {"data_root": str(root), "check_manifest": False, "image_size": 32, "val_fraction": 0.5}
    values.update(over)
    cfg = assemble(DATASETS.get("ksounds"), _Method, overrides=values)
    return DATASETS.get("ksounds")().build(cfg, list(modalities))


def test_layout_c_batches_and_sorted_class_index(tmp_path):
    make_layout_c(tmp_path)
    splits = build(tmp_path, audio_seconds=1.0)
    assert splits.class_names == sorted(CLASSES)
    assert splits.num_classes == 3 and splits.info["num_classes"] == 3
    assert any("3 classes" in n and "31" in n for n in splits.info["notes"])
    assert splits.modalities["audio"].shape == (1, 257, 101)  # 1 + 35400 // 353
    assert splits.modalities["visual"].shape == (3, 3, 32, 32)
    batch = next(iter(DataLoader(splits.test, batch_size=3)))
    assert batch["audio"].shape == (3, 1, 257, 101) and batch["audio"].dtype == torch.float32
    assert batch["visual"].shape == (3, 3, 3, 32, 32) and batch["visual"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64
    # rows are bagpipes, bowling, tap dancing -> sorted index 1, 0, 2
    assert batch["label"].tolist() == [1, 0, 2]
    assert splits.info["label_map"] == {"bowling": 0, "playing bagpipes": 1, "tap dancing": 2}
    assert "stratified" in splits.info["val_rule"]
    torch.manual_seed(0)
    assert splits.train[0]["visual"].shape == (3, 3, 32, 32)


def test_paper_default_audio_shape_1x257x1003(tmp_path):
    make_layout_c(tmp_path, per_class=1)
    splits = build(tmp_path, image_size=224, val_fraction=0.0)
    assert splits.modalities["audio"].shape == (1, 257, 1003)
    item = splits.test[0]
    assert item["audio"].shape == (1, 257, 1003) and item["visual"].shape == (3, 3, 224, 224)


def test_first_appearance_class_order(tmp_path):
    make_layout_c(tmp_path)
    splits = build(tmp_path, class_order="first_appearance", modalities=("visual",))
    assert splits.class_names == list(CLASSES)
    assert [splits.test[i]["label"] for i in range(3)] == [0, 1, 2]


def test_layout_c_valid_split_is_used_when_shipped(tmp_path):
    make_layout_c(tmp_path, valid=True)
    splits = build(tmp_path, modalities=("audio",), audio_seconds=0.5)
    assert len(splits.train) == 6 and len(splits.val) == 3 and len(splits.test) == 3
    assert "valid split" in splits.info["val_rule"]
    assert splits.val.train is False
    assert set(splits.val[0]) == {"audio", "label", "index"}


def test_clips_with_too_few_frames_are_dropped(tmp_path):
    base = make_layout_c(tmp_path, frames=4)
    cid = clips("test", 1)[0][0]
    (base / "test_img" / "Image-01-FPS" / cid / "frame_00003.jpg").unlink()  # 3 left: not > 3
    splits = build(tmp_path, modalities=("visual",))
    assert len(splits.test) == 2
    assert any(cid in n for n in splits.info["notes"])
    assert len(build(tmp_path, modalities=("visual",), min_frames=3).test) == 3


def test_layout_a_ogm_lists_with_fbank(tmp_path):
    make_fbank_layout(tmp_path, "A")
    splits = build(tmp_path, layout="A")
    assert splits.class_names == ["0", "1", "2"]
    assert splits.modalities["audio"].shape == (1, 1024, 128)
    batch = next(iter(DataLoader(splits.test, batch_size=3)))
    assert batch["audio"].shape == (3, 1, 1024, 128)
    assert batch["label"].tolist() == [2, 1, 0]
    # the stored fbank value equals the label in this fixture: audio really is read per clip
    assert batch["audio"][:, 0, 0, 0].tolist() == [2.0, 1.0, 0.0]
    assert batch["visual"].shape == (3, 3, 3, 32, 32)
    first = build(tmp_path, layout="A", class_order="first_appearance")
    assert first.class_names == ["2", "1", "0"]


def test_frame_rules_hand_cases():
    # OGM-GE: (n // k) * i + 1 -> 1, 4, 7 of 10, in train and eval alike
    assert media.choose_frames(10, 3, train=True, rule="ogm_fixed") == [1, 4, 7]
    assert media.choose_frames(12, 3, train=False, rule="ogm_fixed") == [1, 5, 9]
    assert media.choose_frames(5, 3, train=False, rule="ogm_fixed") == [1, 2, 3]
    # IGM: the first k, whatever the mode
    assert media.choose_frames(10, 3, train=True, rule="first") == [0, 1, 2]
    # BalanceMM: eval = each segment's middle; n <= 6 -> index 1 everywhere
    assert media.choose_frames(10, 3, train=False, rule="segments") == [1, 4, 7]
    assert media.choose_frames(12, 3, train=False, rule="segments") == [2, 6, 10]
    assert media.choose_frames(6, 3, train=True, rule="segments") == [1, 1, 1]
    torch.manual_seed(0)
    draws = [media.choose_frames(12, 3, train=True, rule="segments") for _ in range(200)]
    assert {d[0] for d in draws} == {1, 2, 3, 4} and {d[1] for d in draws} == {5, 6, 7, 8}
    assert {d[2] for d in draws} == {9}  # [9, 12] capped at 9, as the one-digit file names force
    with pytest.raises(DataError, match="needs at least 4"):
        media.choose_frames(3, 3, train=False, rule="ogm_fixed")
    with pytest.raises(ConfigError, match="segments"):
        media.choose_frames(10, 3, train=False, rule="middle")


def _picks(ds, i: int = 0) -> list[int]:
    return frame_indices(ds[i]["visual"])


def test_frame_choice_follows_each_layouts_loader(tmp_path):
    base = make_layout_c(tmp_path / "c", frames=10)
    for folder in (base / "train_img" / "Image-01-FPS").iterdir():
        write_indexed_frames(folder, 10)  # overwrite the fixture's frames with indexed ones
    for folder in (base / "test_img" / "Image-01-FPS").iterdir():
        write_indexed_frames(folder, 10)
    c = build(tmp_path / "c", modalities=("visual",), val_fraction=0.0)
    assert c.info["frame_choice"] == "first" and "IGM" in c.info["frame_rule"]
    torch.manual_seed(1)
    assert _picks(c.test) == [0, 1, 2] and _picks(c.train) == [0, 1, 2] and _picks(c.train, 1) == [0, 1, 2]

    # the former rule, IPRM's CREMA-D one, stays available
    r = build(tmp_path / "c", modalities=("visual",), val_fraction=0.0, frame_choice="random")
    assert r.info["frame_choice"] == "random" and _picks(r.test) == [0, 1, 2]
    torch.manual_seed(1)
    seen = {tuple(_picks(r.train)) for _ in range(8)}
    assert len(seen) > 1 and all(list(p) == sorted(set(p)) for p in seen)

    for layout in ("A", "B"):
        fb = make_fbank_layout(tmp_path / layout, layout, per_class=1)
        for s in ("train", "test"):
            for folder in (fb / "visual" / f"{s}_imgs").iterdir():
                write_indexed_frames(folder, 10, "frame_0000{}.jpg")
        splits = build(tmp_path / layout, layout=layout, modalities=("visual",), val_fraction=0.0)
        assert _picks(splits.test) == [1, 4, 7]  # OGM-GE's fixed frames; BalanceMM's middles
        torch.manual_seed(2)
        train = [_picks(splits.train) for _ in range(12)]
        if layout == "A":
            assert splits.info["frame_choice"] == "ogm_fixed"
            assert all(p == [1, 4, 7] for p in train)
        else:
            assert splits.info["frame_choice"] == "segments"
            assert all(1 <= a <= 3 and 4 <= b <= 6 and 7 <= c <= 9 for a, b, c in train)
            assert len({tuple(p) for p in train}) > 1


def test_layout_a_manifest_counts(tmp_path):
    make_fbank_layout(tmp_path, "A")
    with pytest.raises(DataError, match="14799"):
        build(tmp_path, layout="A", check_manifest=True)


def test_layout_b_balancemm_lists_and_more_classes(tmp_path):
    make_fbank_layout(tmp_path, "B", per_class=2, n_classes=33)
    splits = build(tmp_path, layout="B", val_fraction=0.5, modalities=("audio",))
    assert splits.num_classes == 33 and splits.info["num_classes"] == 33
    assert any("33 classes" in n for n in splits.info["notes"])
    assert splits.test[0]["audio"].shape == (1, 1024, 128)


def test_bad_npy_and_corrupt_wav_are_data_errors(tmp_path):
    base = make_fbank_layout(tmp_path / "a", "A")
    cid = next(iter((base / "audio" / "test_fbank").iterdir()))
    np.save(cid, np.zeros((10, 128), dtype=np.float32))
    splits = build(tmp_path / "a", layout="A", modalities=("audio",))
    with pytest.raises(DataError, match="expected \\(1024, 128\\)"):
        for i in range(len(splits.test)):
            splits.test[i]
    base = make_layout_c(tmp_path / "c")
    bad = clips("test", 1)[1][0]
    (base / "test_wav" / f"{bad}.wav").write_bytes(b"RIFF....WAVEfmt broken")
    splits = build(tmp_path / "c", modalities=("audio",))
    with pytest.raises(DataError, match=f"{bad}.wav"):
        splits.test[1]


def test_missing_and_half_prepared_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build(tmp_path / "absent")
    base = tmp_path / "kinetics_sound"
    (base / "annotations").mkdir(parents=True)
    (base / "annotations" / "train.csv").write_text("youtube_id,label\nabc,bowling\n")
    (base / "annotations" / "test.csv").write_text("youtube_id,label\nabd,bowling\n")
    (base / "train_wav").mkdir()
    with pytest.raises(DataError) as err:
        build(tmp_path)
    msg = str(err.value)
    assert "train_img/Image-01-FPS" in msg and "mmbalance prepare ksounds --raw RAW --out ROOT" in msg


def test_bad_lists_are_reported(tmp_path):
    base = make_layout_c(tmp_path)
    (base / "annotations" / "test.csv").write_text("id,class\nabc,bowling\n")
    with pytest.raises(DataError, match="youtube_id and label"):
        build(tmp_path)
    (base / "annotations" / "test.csv").write_text("youtube_id,label\nabc,juggling\n")
    with pytest.raises(DataError, match="juggling"):
        build(tmp_path)
    base = make_fbank_layout(tmp_path / "a", "A")
    (base / "my_test.txt").write_text("clip_without_label\n")
    with pytest.raises(DataError, match="line 1"):
        build(tmp_path / "a", layout="A")


def test_options_and_recipe():
    cls = DATASETS.get("ksounds")
    assert cls.modality_names == ("audio", "visual")
    assert cls.defaults["backbone"] == {"audio": {"name": "resnet18"}, "visual": {"name": "resnet18"}}
    assert (cls.defaults["batch_size"], cls.defaults["lr"], cls.defaults["step_size"]) == (64, 1e-2, 70)
    assert cls.method_defaults == {"iprm": {"alpha": 0.8}}
    assert all(o.help for o in cls.options.values())
    assert "mmbalance prepare ksounds --raw RAW --out ROOT" in cls.layout_help


def test_unknown_modality_is_refused(tmp_path):
    make_layout_c(tmp_path, per_class=1)
    with pytest.raises(ConfigError, match="depth"):
        build(tmp_path, modalities=("depth",))


# ------------------------------------------------------------------------------ with trainer


def test_concat_one_step_through_runner(tmp_path):
    make_layout_c(tmp_path / "data")
    check_av_concat_step("ksounds", tmp_path / "data", tmp_path)


@pytest.mark.gpu
def test_concat_bf16_steps_on_cuda(tmp_path):
    make_layout_c(tmp_path / "data", per_class=4)
    check_av_bf16_steps_on_cuda("ksounds", tmp_path / "data", tmp_path)
