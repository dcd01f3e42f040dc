"""NVGesture plugin on a tiny fixture in the real layout (lists, AVIs, flow npy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_media import CUDA_BF16, check_cuda_bf16_steps
from mmbalance.datasets.nvgesture import NVGesture, parse_list_line, read_split_list

from mmbalance.data import Splits
from mmbalance.errors import DataError
from mmbalance.media import IMAGENET_MEAN, IMAGENET_STD
from mmbalance.registry import DATASETS
from mmbalance.video import read_frames, write_frames

FRAMES = 30  # frames per fixture video (the lists annotate frames 2..21)
START, END = 2, 22
FLOW_T = 12
SMALL = {"frame_size": 20, "crop_size": 16, "clip_frames": 16, "train_frames": 8}
TRAIN = [("class_01/subject3_r0", 1), ("class_01/subject3_r1", 3), ("class_02/subject4_r0", 2),
         ("class_02/subject5_r0", 2)]
TEST = [("class_01/subject9_r0", 1), ("class_02/subject9_r1", 25)]
RED, GREEN = 200, 40


def color_frames() -> np.ndarray:
    """(T, 24, 32, 3) RGB: constant red and green, blue = 4 t (frame index readable)."""
    fr = np.zeros((FRAMES, 24, 32, 3), np.uint8)
    fr[..., 0], fr[..., 1] = RED, GREEN
    fr[..., 2] = (4 * np.arange(FRAMES, dtype=np.uint8))[:, None, None]
    return fr


def depth_frames() -> np.ndarray:
    """Grey frames whose value is 5 t + 10."""
    vals = (5 * np.arange(FRAMES) + 10).astype(np.uint8)
    return np.broadcast_to(vals[:, None, None, None], (FRAMES, 24, 32, 3)).copy()


def flow_value(y: int, x: int) -> float:
    """The fixture flow's x-channel value at pixel (y, x): it tells where a crop started."""
    return y + x / 100


def flow_array(size: int, t: int) -> np.ndarray:
    """(H, W, 2, T) float32 holding flow_value(y, x) (+ 0.5 on the y-flow channel)."""
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    base = flow_value(yy, xx).astype(np.float32)[:, :, None, None]
    arr = np.broadcast_to(base, (size, size, 2, t)).copy()
    arr[:, :, 1] += 0.5
    return arr


def make_nvgesture(root: Path, list_name: str = "nvgesture_{split}_correct_cvpr2016_v2.lst",
                   flow_t: int = FLOW_T) -> Path:
    color, depth = color_frames(), depth_frames()
    for split, items in (("train", TRAIN), ("test", TEST)):
        lines = []
        for i, (rel, label) in enumerate(items):
            clip = root / "Video_data" / rel
            clip.mkdir(parents=True, exist_ok=True)
            write_frames(clip / "sk_color.avi", color)
            write_frames(clip / "sk_depth.avi", depth)
            flow_dir = root / "Video_data" / "flow_data" / split
            flow_dir.mkdir(parents=True, exist_ok=True)
            np.save(flow_dir / f"{i}.npy", flow_array(SMALL["frame_size"], flow_t))
            lines.append(
                f"path:./Video_data/{rel} depth:sk_depth:{START}:{END} color:sk_color:{START}:{END} "
                f"duo_left:duo_left:{START + 3}:{END + 9} label:{label}"
            )
        (root / list_name.format(split=split)).write_text("\r\n".join(lines) + "\r\n")
    return root


@pytest.fixture(scope="module")
def nv_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_nvgesture(tmp_path_factory.mktemp("nv") / "nvGesture")


def cfg(root: Path, **kw) -> dict:
    base = {"data_root": str(root), "check_manifest": False, "val_fraction": 0.25, **SMALL}
    base.update(kw)
    return base


def build(root: Path, mods=("rgb", "flow", "depth"), **kw) -> Splits:
    return NVGesture().build(cfg(root, **kw), mods)


def test_registered_with_paper_recipe() -> None:
    plugin = DATASETS.get("nvgesture")
    assert plugin is NVGesture
    assert plugin.modality_names == ("rgb", "flow", "depth")  # the paper: m1 RGB, m2 OF, m3 Depth
    d = plugin.defaults
    assert (d["batch_size"], d["optimizer"], d["lr"], d["epochs"], d["embed_dim"]) == (2, "sgd", 1e-2, 100, 1024)
    assert {b["name"] for b in d["backbone"].values()} == {"i3d"}
    assert plugin.method_defaults["iprm"]["alpha"] == 0.7
    assert "check_manifest" in plugin.options and "mmbalance prepare" in plugin.layout_help


def test_parse_list_line_exact_syntax(tmp_path: Path) -> None:
    line = ("path:./Video_data/class_01/subject3_r0 depth:sk_depth:146:226 "
            "color:sk_color:146:226 duo_left:duo_left:170:263 label:4")
    clip = parse_list_line(line, tmp_path, 7, "train", tmp_path / "x.lst")
    assert clip.folder == tmp_path / "Video_data" / "class_01" / "subject3_r0"  # ./Video_data -> root
    assert clip.label == 3  # trusts label (1-based), not the class folder
    assert clip.sensors["color"] == ("sk_color", 146, 226)
    assert clip.sensors["depth"] == ("sk_depth", 146, 226)
    assert clip.video("color") == clip.folder / "sk_color.avi"
    assert clip.line == 7
    with pytest.raises(DataError, match="label"):
        parse_list_line(line.replace("label:4", "label:26"), tmp_path, 0, "train", tmp_path / "x.lst")
    with pytest.raises(DataError, match="path:"):
        parse_list_line("depth:sk_depth:1:2 label:1", tmp_path, 0, "train", tmp_path / "x.lst")


def test_read_split_list_handles_crlf(nv_root: Path) -> None:
    clips = read_split_list(nv_root / "nvgesture_test_correct_cvpr2016_v2.lst", nv_root, "test")
    assert [c.label for c in clips] == [0, 24] and [c.line for c in clips] == [0, 1]


def test_shapes_dtypes_and_labels(nv_root: Path) -> None:
    s = build(nv_root)
    assert (len(s.train), len(s.val), len(s.test)) == (3, 1, 2)
    assert s.num_classes == 25 and len(s.class_names) == 25
    assert s.modalities["rgb"].shape == (3, 8, 16, 16)
    assert s.modalities["depth"].shape == (1, 8, 16, 16)
    assert s.modalities["flow"].shape == (2, FLOW_T, 16, 16)
    assert all(spec.kind == "video" for spec in s.modalities.values())
    item = s.train[0]
    assert item["rgb"].shape == (3, 8, 16, 16) and item["rgb"].dtype == torch.float32
    assert item["depth"].shape == (1, 8, 16, 16) and item["depth"].dtype == torch.float32
    assert item["flow"].shape == (2, FLOW_T, 16, 16) and item["flow"].dtype == torch.float32
    test = s.test[1]
    assert test["rgb"].shape == (3, 16, 16, 16)  # all clip_frames, no temporal crop
    assert test["depth"].shape == (1, 16, 16, 16)
    assert test["label"] == 24 and test["index"] == 1
    assert sorted(c.label for c in s.train.clips + s.val.clips) == [0, 1, 1, 2]  # label - 1


def test_rgb_is_imagenet_normalised_and_depth_scaled(nv_root: Path) -> None:
    item = build(nv_root).test[0]
    red = (RED / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    green = (GREEN / 255 - IMAGENET_MEAN[1]) / IMAGENET_STD[1]
    assert item["rgb"][0].mean().item() == pytest.approx(red, abs=0.05)
    assert item["rgb"][1].mean().item() == pytest.approx(green, abs=0.05)
    blue = item["rgb"][2, :, 8, 8] * IMAGENET_STD[2] + IMAGENET_MEAN[2]
    expected = torch.tensor([4 * (START + k) / 255 for k in range(16)])
    assert torch.allclose(blue, expected, atol=0.03)  # frames start .. start+15, in order
    depth = item["depth"][0, :, 8, 8]
    assert torch.allclose(depth, torch.tensor([(5 * (START + k) + 10) / 255 for k in range(16)]), atol=0.02)
    assert item["depth"].min() >= 0.0 and item["depth"].max() <= 1.0


def test_bgr_option_keeps_official_channel_order(nv_root: Path) -> None:
    item = build(nv_root, mods=("rgb",), color_order="bgr").test[0]
    first = item["rgb"][0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # holds blue now
    assert first[0, 8, 8].item() == pytest.approx(4 * START / 255, abs=0.03)


def test_test_crop_is_centred_and_flow_not_time_cropped(nv_root: Path) -> None:
    flow = build(nv_root).test[0]["flow"]
    off = (SMALL["frame_size"] - SMALL["crop_size"]) // 2
    assert flow[0, 0, 0, 0].item() == pytest.approx(flow_value(off, off))
    assert flow[1, 0, 0, 0].item() == pytest.approx(flow_value(off, off) + 0.5)  # y-flow
    assert flow[0, 5, 3, 4].item() == pytest.approx(flow_value(off + 3, off + 4))  # (C, T, H, W)


def test_train_window_and_crop_are_random_and_shared(nv_root: Path) -> None:
    s = build(nv_root)
    torch.manual_seed(123)
    item = s.train[0]
    torch.manual_seed(123)  # the draw order: window start, then y, then x
    t0 = int(torch.randint(0, SMALL["clip_frames"] - SMALL["train_frames"] + 1, ()))
    y, x = int(torch.randint(0, 5, ())), int(torch.randint(0, 5, ()))
    assert item["flow"][0, 0, 0, 0].item() == pytest.approx(flow_value(y, x))  # shared offset
    depth = item["depth"][0, :, 3, 3]
    expected = torch.tensor([(5 * (START + t0 + k) + 10) / 255 for k in range(8)])
    assert torch.allclose(depth, expected, atol=0.02)
    torch.manual_seed(123)
    again = s.train[0]
    assert torch.equal(again["rgb"], item["rgb"]) and torch.equal(again["flow"], item["flow"])


def test_val_split_is_carved_with_fixed_seed_and_recorded(nv_root: Path) -> None:
    a, b = build(nv_root, seed=0), build(nv_root, seed=5)
    assert a.info["val_lines"] == b.info["val_lines"] and len(a.info["val_lines"]) == 1
    assert "seed 2016" in a.info["val_split"]
    val_line = a.info["val_lines"][0]
    assert val_line not in [c.line for c in a.train.clips]
    assert a.val.train is False  # eval-mode: all frames, centre crop
    assert a.val[0]["rgb"].shape == (3, 16, 16, 16)
    whole = build(nv_root, val_fraction=0.0)
    assert len(whole.train) == 4 and whole.val.clips == whole.test.clips


def test_renamed_lists_are_accepted(tmp_path: Path) -> None:
    root = make_nvgesture(tmp_path / "nv", list_name="nvgesture_{split}_correct_v2.lst")
    s = build(root, mods=("depth",))
    assert len(s.train) + len(s.val) == 4 and len(s.test) == 2


def test_only_requested_modalities_are_read(tmp_path: Path) -> None:
    root = make_nvgesture(tmp_path / "nv")
    for f in (root / "Video_data" / "flow_data").rglob("*.npy"):
        f.unlink()  # no flow on disk: fine when flow is not asked for
    s = build(root, mods=("rgb", "depth"))
    item = s.test[0]
    assert set(item) == {"rgb", "depth", "label", "index"}
    assert set(s.modalities) == {"rgb", "depth"}
    with pytest.raises(DataError, match="none of the 4 listed samples"):
        build(root, mods=("flow",))


def test_manifest_mismatch_is_an_error_by_default(nv_root: Path) -> None:
    with pytest.raises(DataError, match="manifest expects 1050") as err:
        NVGesture().build({"data_root": str(nv_root), **SMALL}, ("rgb",))
    assert "check_manifest=false" in str(err.value)
    s = build(nv_root, mods=("rgb",))
    assert any("1050" in n for n in s.info["notes"])


def test_missing_clip_files_are_reported(tmp_path: Path) -> None:
    root = make_nvgesture(tmp_path / "nv")
    (root / "Video_data" / "class_02" / "subject9_r1" / "sk_depth.avi").unlink()
    s = build(root, mods=("rgb", "depth"))
    assert len(s.test) == 1
    assert any("test: 1 listed samples lack files" in n for n in s.info["notes"])
    assert len(build(root, mods=("rgb",)).test) == 2


def test_missing_and_half_prepared_roots(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        NVGesture().build({"data_root": str(tmp_path / "nowhere")}, ("rgb",))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="nvgesture_train_correct_cvpr2016_v2.lst"):
        NVGesture().build({"data_root": str(tmp_path / "empty")}, ("rgb",))
    root = make_nvgesture(tmp_path / "nv")
    (root / "nvgesture_test_correct_cvpr2016_v2.lst").unlink()
    with pytest.raises(DataError, match="nvgesture_test_correct_cvpr2016_v2.lst"):
        build(root)


def test_flow_length_checked_for_the_official_pool(tmp_path: Path) -> None:
    root = make_nvgesture(tmp_path / "nv", flow_t=128)
    with pytest.raises(DataError, match="T < 128"):
        build(root, mods=("flow",))
    adaptive = {"flow": {"name": "i3d", "pool": "adaptive"}}
    s = build(root, mods=("flow",), backbone=adaptive)
    assert s.modalities["flow"].shape == (2, 128, 16, 16)


def test_flow_spatial_size_must_match_frame_size(nv_root: Path) -> None:
    with pytest.raises(DataError, match="frame_size"):
        build(nv_root, mods=("flow",), frame_size=24)


def test_read_frames_matches_the_written_video(tmp_path: Path) -> None:
    write_frames(tmp_path / "c.avi", color_frames())
    frames = read_frames(tmp_path / "c.avi", 3, 7, size=(12, 10))
    assert frames.shape == (4, 12, 10, 3) and frames.dtype == np.uint8
    assert np.abs(frames[:, 5, 5, 2].astype(int) - [12, 16, 20, 24]).max() <= 3
    padded = read_frames(tmp_path / "c.avi", 25, 40, size=8, buffer_len=10)
    assert padded.shape == (10, 8, 8, 3) and padded[5:].max() == 0  # official zero buffer


# ------------------------------------------------------------------- training through the runner

TINY_RUN = {"frame_size": 20, "crop_size": 8, "clip_frames": 8, "train_frames": 4}


def tiny_overrides(root: Path, records: Path, **extra) -> dict:
    """concat with the paper's I3D encoders on tiny clips (adaptive pool: the official (8,7,7)
    pool needs 64-frame 224-px clips)."""
    ov = {"data_root": str(root), "records": str(records), "epochs": 1, "batch_size": 2,
          "limit_train_batches": 1, "limit_eval_batches": 1, "check_manifest": False,
          "val_fraction": 0.25, "embed_dim": 16, "checkpoint": False, "progress": "off",
          **TINY_RUN}
    for m in NVGesture.modality_names:
        ov[f"backbone.{m}.pool"] = "adaptive"
    ov.update(extra)
    return ov


def test_one_concat_step_with_i3d_backbones(nv_root: Path, tmp_path: Path) -> None:
    from mmbalance.runner import run

    result = run("concat", "nvgesture", overrides=tiny_overrides(nv_root, tmp_path / "runs", device="cpu"))
    assert result.config["backbone"]["rgb"]["name"] == "i3d"
    (epoch,) = result.record["epochs"]
    assert epoch["train_batches"] == 1 and np.isfinite(epoch["train_loss"])
    test = result.final["last"]["test"]
    assert {"fused", "rgb", "flow", "depth"} <= set(test)
    assert result.record["header"]["dataset_info"]["val_lines"] is not None


@pytest.mark.gpu
def test_a_few_cuda_bf16_steps(nv_root: Path, tmp_path: Path) -> None:
    check_cuda_bf16_steps("nvgesture", tiny_overrides(nv_root, tmp_path / "runs", **CUDA_BF16))
