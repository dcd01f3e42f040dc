"""IEMOCAP plugin: MLA layout (lists, fbank/token npy, face JPEGs) and MulT's features
(pickles converted to .npz by ``mmbalance prepare iemocap_mult``; planted pickles refused)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_media import CUDA_BF16, check_cuda_bf16_steps
from mmbalance.datasets.iemocap import (
    CLASS_NAMES,
    IEMOCAP,
    SEPARATOR,
    IEMOCAPMulT,
    image_transform,
    mult_labels,
    parse_list_line,
)
from PIL import Image

from mmbalance.data import Splits
from mmbalance.errors import ConfigError, DataError
from mmbalance.media import IMAGENET_MEAN, IMAGENET_STD
from mmbalance.prepare import prepare
from mmbalance.registry import DATASETS

TRAIN = [("Ses01F_impro01_F000", "Excuse me.", "Neutral"),
         ("Ses01F_impro01_M013", "What do you mean [laughs]?", "Angry"),
         ("Ses02M_script01_1_F004", "Oh, right, sure ...", "Happy"),
         ("Ses03F_impro02_M010", "I miss him.", "Sad"),
         ("Ses04F_script02_2_F034", "Fine.", "Angry")]
TEST = [("Ses05M_impro03_F001", "Hello there.", "Happy"),
        ("Ses05F_script01_3_M021", "No.", "Sad")]
TOKEN_LEN = 256
FACE_COLORS = {"frame_003.jpg": (250, 10, 10), "frame_001.jpg": (10, 250, 10),
               "frame_002.jpg": (10, 10, 250)}  # sorted middle = frame_002 (blue)


def n_words(text: str) -> int:
    return len(text.split())


def make_mla(root: Path, lists_in: str = ".") -> Path:
    """The MLA layout: lists, kaldi-fbank npy, token/pm npy and a face folder per utterance."""
    (root / lists_in).mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", TRAIN), ("test", TEST)):
        lines = [f"{u}.mp4{SEPARATOR}{text}{SEPARATOR}{label}" for u, text, label in rows]
        (root / lists_in / f"my_{split}_iemo.txt").write_text("\r\n".join(lines) + "\r\n")
        for k, (utt, text, _) in enumerate(rows):
            audio = root / "audio" / f"{split}_fbank"
            audio.mkdir(parents=True, exist_ok=True)
            np.save(audio / f"{utt}.npy", np.full((1024, 128), k, dtype=np.float32))
            tok = root / "text_token" / f"{split}_token"
            tok.mkdir(parents=True, exist_ok=True)
            n = n_words(text)
            ids = np.zeros((1, TOKEN_LEN), dtype=np.int64)
            ids[0, :n] = 1000 + np.arange(n)
            pm = np.ones((1, TOKEN_LEN), dtype=np.float32)
            pm[0, :n] = 0.0  # 1.0 = padding
            np.save(tok / f"{utt}_token.npy", ids)
            np.save(tok / f"{utt}_pm.npy", pm)
            faces = root / "visual" / f"{split}_imgs" / utt
            faces.mkdir(parents=True, exist_ok=True)
            for name, color in FACE_COLORS.items():
                Image.new("RGB", (40, 40), color).save(faces / name, quality=95)
    return root


@pytest.fixture(scope="module")
def mla_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mla(tmp_path_factory.mktemp("iemo") / "IEMOCAP")


def build(root: Path, mods=("audio", "visual", "text"), plugin=IEMOCAP, **kw) -> Splits:
    cfg = {"data_root": str(root), "check_manifest": False, "val_fraction": 0.2, "image_size": 32}
    cfg.update(kw)
    return plugin().build(cfg, mods)


def test_registered_with_paper_recipe() -> None:
    assert DATASETS.get("iemocap") is IEMOCAP and DATASETS.get("iemocap_mult") is IEMOCAPMulT
    d = IEMOCAP.defaults
    assert (d["batch_size"], d["optimizer"], d["lr"], d["epochs"], d["embed_dim"]) == (16, "sgd", 1e-3, 100, 768)
    assert d["backbone"]["audio"]["name"] == "fbank_transformer"
    assert d["backbone"]["visual"] == {"name": "vit"}  # its img_size follows image_size
    assert IEMOCAP.options["image_size"].default == 256
    assert d["backbone"]["text"]["name"] == "m3ae_text"  # MLA's text encoder
    assert {b["name"] for b in IEMOCAPMulT.defaults["backbone"].values()} == {"seq_transformer"}
    assert IEMOCAP.method_defaults["iprm"]["alpha"] == 0.7
    assert IEMOCAP.modality_names == ("audio", "visual", "text")
    assert CLASS_NAMES == ["Angry", "Happy", "Neutral", "Sad"]


def test_parse_list_line_uses_the_literal_separator(tmp_path: Path) -> None:
    u = parse_list_line(f"Ses04F_script02_2_F034.mp4{SEPARATOR}Oh, right [split] sure{SEPARATOR}Happy",
                        tmp_path / "l.txt", 0)
    assert (u.utt, u.transcript, u.label) == ("Ses04F_script02_2_F034", "Oh, right [split] sure", 1)
    with pytest.raises(DataError, match="unknown emotion"):
        parse_list_line(f"x.mp4{SEPARATOR}hi{SEPARATOR}Excited", tmp_path / "l.txt", 0)
    with pytest.raises(DataError, match="separator"):
        parse_list_line("x.mp4 | hi | Sad", tmp_path / "l.txt", 0)


def test_mla_shapes_dtypes_and_labels(mla_root: Path) -> None:
    s = build(mla_root)
    assert (len(s.train), len(s.val), len(s.test)) == (4, 1, 2)
    assert s.num_classes == 4 and s.class_names == CLASS_NAMES
    assert s.modalities["audio"].shape == (1, 1024, 128) and s.modalities["audio"].kind == "spectrogram"
    assert s.modalities["visual"].shape == (3, 32, 32) and s.modalities["visual"].kind == "image"
    assert s.modalities["text"].shape == (TOKEN_LEN,) and s.modalities["text"].kind == "tokens"
    item = s.test[0]
    assert item["audio"].shape == (1, 1024, 128) and item["audio"].dtype == torch.float32
    assert item["visual"].shape == (3, 32, 32) and item["visual"].dtype == torch.float32
    ids, mask = item["text"]["input_ids"], item["text"]["attention_mask"]
    assert ids.shape == (TOKEN_LEN,) and ids.dtype == torch.long and mask.dtype == torch.long
    n = n_words(TEST[0][1])
    assert ids[:n].tolist() == [1000 + k for k in range(n)] and ids[n:].eq(0).all()
    assert mask[:n].eq(1).all() and mask[n:].eq(0).all()  # attention_mask = 1 - pm
    assert [s.test[i]["label"] for i in range(2)] == [1, 3]  # Happy, Sad
    labels = sorted(u.label for u in s.train.utts + s.val.utts)
    assert labels == [0, 0, 1, 2, 3]
    item = s.train[0]
    assert item["visual"].shape == (3, 32, 32) and item["text"]["input_ids"].shape == (TOKEN_LEN,)


def test_face_is_middle_of_sorted_listing(mla_root: Path) -> None:
    img = build(mla_root, mods=("visual",)).test[0]["visual"]
    rgb = img[:, 16, 16] * torch.tensor(IMAGENET_STD) + torch.tensor(IMAGENET_MEAN)
    assert rgb.argmax().item() == 2  # frame_002 is blue
    assert build(mla_root, mods=("visual",), frame_pick="listdir").info["frame_pick"] == "listdir"


def _brightness_factors(transform, draws: int = 60) -> list[float]:
    """Mean output level / input level of a flat grey face: the colour jitter's brightness
    factor (contrast and saturation leave a flat grey image as it is; crop and flip too)."""
    grey = Image.new("RGB", (32, 32), (80, 80, 80))
    out = []
    for _ in range(draws):
        x = transform(grey) * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        out.append(float(x.mean()) * 255 / 80)
    return out


def test_train_colour_jitter_is_mlas_timm_color_jitter_true(mla_root: Path) -> None:
    # timm 0.4.5: color_jitter=True -> (float(True),) * 3 = 1.0: brightness factor in [0, 2]
    torch.manual_seed(0)
    factors = _brightness_factors(image_transform(True, 32))
    assert max(factors) > 1.5 and min(factors) < 0.5  # outside 0.4's [0.6, 1.4]
    assert all(-0.01 <= f <= 2.01 for f in factors)
    torch.manual_seed(0)
    weak = _brightness_factors(image_transform(True, 32, color_jitter=0.4))
    assert all(0.59 <= f <= 1.41 for f in weak)
    assert all(abs(f - 1.0) < 0.01 for f in _brightness_factors(image_transform(True, 32, color_jitter=0.0), 5))
    assert all(abs(f - 1.0) < 0.01 for f in _brightness_factors(image_transform(False, 32), 3))
    s = build(mla_root, mods=("visual",))
    assert s.info["color_jitter"] == 1.0 and "ColorJitter(1, 1, 1)" in s.info["image_transform"]
    assert build(mla_root, mods=("visual",), color_jitter=0.4).info["color_jitter"] == 0.4


def test_only_requested_modalities_are_read(tmp_path: Path) -> None:
    root = make_mla(tmp_path / "IEMOCAP")
    import shutil

    shutil.rmtree(root / "visual")
    s = build(root, mods=("audio", "text"))
    assert set(s.test[0]) == {"audio", "text", "label", "index"}
    with pytest.raises(DataError, match="visual"):
        build(root)


def test_lists_in_data_folder_and_val_recorded(tmp_path: Path) -> None:
    root = make_mla(tmp_path / "IEMOCAP", lists_in="data")
    s = build(root, mods=("audio",))
    assert s.info["layout"] == "mla" and s.info["lists"]["train"].endswith("data/my_train_iemo.txt")
    assert len(s.info["val_utterances"]) == 1 and "seed 2024" in s.info["val_split"]
    assert s.info["val_utterances"] == build(root, mods=("audio",), seed=9).info["val_utterances"]


def test_manifest_mismatch_and_missing_files(tmp_path: Path) -> None:
    root = make_mla(tmp_path / "IEMOCAP")
    with pytest.raises(DataError, match="manifest expects 3318"):
        IEMOCAP().build({"data_root": str(root)}, ("audio",))
    (root / "audio" / "test_fbank" / f"{TEST[1][0]}.npy").unlink()
    s = build(root, mods=("audio", "text"))
    assert len(s.test) == 1 and any("1 listed samples lack files" in n for n in s.info["notes"])


def test_missing_root_and_unknown_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        IEMOCAP().build({"data_root": str(tmp_path / "nowhere")}, ("audio",))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="my_train_iemo.txt"):
        IEMOCAP().build({"data_root": str(tmp_path / "empty")}, ("audio",))


# ------------------------------------------------------------------ MulT pickles -> .npz

SIZES = {"train": 4, "valid": 2, "test": 3}
MULT_POS = {"train": [0, 1, 2, 3], "valid": [3, 0], "test": [1, 1, 2]}  # Neutral, Happy, Sad, Angry
TO_SORTED = [2, 1, 3, 0]  # Neutral, Happy, Sad, Angry -> sorted names Angry 0, Happy 1, Neutral 2, Sad 3


def mult_data(multi_label: bool = False) -> dict:
    """MulT's pickle content: {split: {text, audio (one -inf), vision, labels (N, 4, 2)}}."""
    rng = np.random.default_rng(0)
    data = {}
    for split, n in SIZES.items():
        labels = np.zeros((n, 4, 2), dtype=np.float32)
        labels[..., 0] = 1.0
        for i, k in enumerate(MULT_POS[split]):
            labels[i, k] = (0.0, 1.0)
        if multi_label and split == "test":
            labels[0, 3] = (0.0, 1.0)
        audio = rng.normal(size=(n, 5, 74)).astype(np.float32)
        audio[0, 0, 0] = -np.inf
        data[split] = {
            "text": rng.normal(size=(n, 5, 300)).astype(np.float32),
            "audio": audio,
            "vision": rng.normal(size=(n, 5, 35)).astype(np.float32),
            "labels": labels,
        }
    return data


def make_mult(root: Path, name: str = "iemocap_data.pkl", multi_label: bool = False, data=None) -> Path:
    """MulT's pickle as downloaded (the loader refuses it until it is prepared)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / name, "wb") as f:
        pickle.dump(mult_data(multi_label) if data is None else data, f)
    return root


def make_mult_npz(root: Path, name: str = "iemocap_data.pkl", multi_label: bool = False) -> Path:
    """MulT's pickle converted by `mmbalance prepare iemocap_mult --raw ROOT --out ROOT`."""
    make_mult(root, name, multi_label)
    summary = prepare("iemocap_mult", root, root)
    assert summary["written"] == {"npz files": 1}
    return root


class PlantedPickle:
    """Unpickling it runs ``open(marker, 'w').write(...)`` (or another planted call)."""

    def __init__(self, marker: Path, how: str = "exec") -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "open":
            return open, (str(self.marker), "w")
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_mult_npz_shapes_labels_and_inf(tmp_path: Path) -> None:
    root = make_mult_npz(tmp_path / "IEMOCAP")
    s = build(root, plugin=IEMOCAPMulT)
    assert (len(s.train), len(s.val), len(s.test)) == (4, 2, 3)  # the pickle's own valid split
    assert s.modalities["text"].shape == (5, 300) and s.modalities["text"].kind == "sequence"
    assert s.modalities["audio"].shape == (5, 74) and s.modalities["visual"].shape == (5, 35)
    # Neutral, Happy, Sad, Angry -> sorted names Angry 0, Happy 1, Neutral 2, Sad 3
    assert [s.train[i]["label"] for i in range(4)] == [2, 1, 3, 0]
    assert [s.val[i]["label"] for i in range(2)] == [0, 2]
    item = s.train[0]
    assert item["audio"][0, 0].item() == 0.0 and torch.isfinite(item["audio"]).all()
    assert item["text"].dtype == torch.float32
    assert s.info["layout"] == "mult" and s.info["file"] == str(root / "iemocap_data.npz")


def test_prepared_npz_gives_the_fixture_arrays(tmp_path: Path) -> None:
    """prepare + load == the arrays put in the pickle (what the old pickle.load path gave)."""
    root = make_mult_npz(tmp_path / "IEMOCAP")
    data = mult_data()
    with np.load(root / "iemocap_data.npz", allow_pickle=False) as z:
        assert sorted(z.files) == sorted(f"{sp}__{k}" for sp in SIZES for k in ("text", "audio", "vision", "labels"))
        for split, part in data.items():
            for key, arr in part.items():
                stored = z[f"{split}__{key}"]
                assert stored.dtype == arr.dtype and np.array_equal(stored, arr)  # -inf kept as stored
    direct = build(root, plugin=IEMOCAPMulT, aligned=True)
    (root / "iemocap_data.npz").unlink()
    unpickled = build(root, plugin=IEMOCAPMulT, unsafe_unpickle=True)  # the pickle, read directly
    assert unpickled.info["file"] == str(root / "iemocap_data.pkl")
    for s in (direct, unpickled):
        for split, ds in (("train", s.train), ("valid", s.val), ("test", s.test)):
            want = data[split]
            for m, key in (("audio", "audio"), ("visual", "vision"), ("text", "text")):
                expected = want[key].copy()
                expected[np.isneginf(expected)] = 0.0
                assert ds.tensors[m].dtype == torch.float32
                assert torch.equal(ds.tensors[m], torch.from_numpy(expected))
            assert [ds[i]["label"] for i in range(len(ds))] == [TO_SORTED[k] for k in MULT_POS[split]]
    assert direct.info["notes"] == unpickled.info["notes"]


def test_pickle_only_root_asks_to_run_prepare(tmp_path: Path) -> None:
    root = make_mult(tmp_path / "IEMOCAP")
    for plugin, extra in ((IEMOCAPMulT, {}), (IEMOCAP, {"backbone": {m: {"name": "seq_transformer"} for m in IEMOCAP.modality_names}})):
        with pytest.raises(DataError, match="mmbalance prepare iemocap_mult --raw") as err:
            build(root, plugin=plugin, **extra)
        assert str(root / "iemocap_data.pkl") in str(err.value) and "unsafe_unpickle" in str(err.value)
    assert IEMOCAP.options["unsafe_unpickle"].default is False
    assert "arbitrary code" in IEMOCAP.options["unsafe_unpickle"].help
    assert len(build(root, plugin=IEMOCAPMulT, unsafe_unpickle=True).train) == 4


@pytest.mark.parametrize(("how", "name"), [("exec", "builtins.exec"), ("open", "io.open")])
def test_planted_pickle_never_runs(tmp_path: Path, how: str, name: str) -> None:
    """A pickle whose unpickling writes a marker: refused by the loader and by the preparer."""
    probe = tmp_path / "probe.txt"
    pickle.loads(pickle.dumps(PlantedPickle(probe, how)))  # the fixture really runs code ...
    assert probe.exists()
    marker = tmp_path / "marker.txt"
    data = mult_data()
    data["train"]["audio"] = PlantedPickle(marker, how)
    root = make_mult(tmp_path / "IEMOCAP", data=data)
    with pytest.raises(DataError, match="mmbalance prepare iemocap_mult"):  # ... not here
        build(root, plugin=IEMOCAPMulT)
    with pytest.raises(DataError, match=f"Refused to unpickle.*'{name}'"):  # opt-in: still refused
        build(root, plugin=IEMOCAPMulT, unsafe_unpickle=True)
    with pytest.raises(DataError, match=f"Refused to unpickle.*'{name}'"):
        prepare("iemocap_mult", root, root)
    assert not marker.exists()
    assert sorted(p.name for p in root.iterdir()) == ["iemocap_data.pkl"]  # no .npz, no .partial


def test_npz_is_read_without_pickle(tmp_path: Path) -> None:
    """An .npz holding a pickled object array (planted) is refused, not unpickled."""
    root = tmp_path / "IEMOCAP"
    root.mkdir()
    marker = tmp_path / "marker.txt"
    arrays = {f"{sp}__{k}": v for sp, part in mult_data().items() for k, v in part.items()}
    arrays["train__text"] = np.array([PlantedPickle(marker)], dtype=object)
    np.savez(root / "iemocap_data.npz", **arrays)
    with pytest.raises(DataError, match="without pickle"):
        build(root, plugin=IEMOCAPMulT, mods=("text",))
    assert not marker.exists()
    (root / "iemocap_data.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        build(root, plugin=IEMOCAPMulT)


def test_mult_unaligned_and_manifest(tmp_path: Path) -> None:
    root = make_mult_npz(tmp_path / "IEMOCAP", name="iemocap_data_noalign.pkl")
    assert (root / "iemocap_data_noalign.npz").is_file()
    with pytest.raises(DataError, match="iemocap_data.npz.*aligned=false"):
        build(root, plugin=IEMOCAPMulT)
    assert len(build(root, plugin=IEMOCAPMulT, aligned=False).test) == 3
    with pytest.raises(DataError, match="manifest expects 2717"):
        IEMOCAPMulT().build({"data_root": str(root), "aligned": False}, ("text",))


def test_mult_multi_label_is_a_clear_error(tmp_path: Path) -> None:
    root = make_mult_npz(tmp_path / "IEMOCAP", multi_label=True)
    with pytest.raises(DataError, match="more than one"):
        build(root, plugin=IEMOCAPMulT)
    assert mult_labels(np.array([[0, 0, 0, 1]]), tmp_path, "x").tolist() == [0]


def test_iemocap_on_mult_files_asks_for_sequence_backbones(tmp_path: Path) -> None:
    root = make_mult_npz(tmp_path / "IEMOCAP")
    table = {m: dict(b) for m, b in IEMOCAP.defaults["backbone"].items()}
    with pytest.raises(ConfigError, match="iemocap_mult"):
        build(root, backbone=table)
    seq = {m: {"name": "seq_transformer"} for m in IEMOCAP.modality_names}
    assert len(build(root, backbone=seq).train) == 4


# ------------------------------------------------------------------- training through the runner

TINY_VIT = {"embed_dim": 32, "depth": 1, "num_heads": 2}
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 64, "vocab_size": 1100}


def tiny_overrides(root: Path, records: Path, **extra) -> dict:
    """concat with the paper's encoder kinds (fbank ViT, image ViT, M3AE text), shrunk."""
    ov = {"data_root": str(root), "records": str(records), "epochs": 1, "batch_size": 2,
          "limit_train_batches": 1, "limit_eval_batches": 1, "check_manifest": False,
          "val_fraction": 0.2, "embed_dim": 16, "checkpoint": False, "progress": "off",
          "image_size": 32, "backbone.text.vocab_size": TINY_BERT["vocab_size"]}
    for field, value in TINY_VIT.items():
        ov[f"backbone.audio.{field}"] = value
        ov[f"backbone.visual.{field}"] = value
        ov[f"backbone.text.{field}"] = value
    ov.update(extra)
    return ov


def test_one_concat_step_mla_layout(mla_root: Path, tmp_path: Path) -> None:
    from mmbalance.runner import run

    result = run("concat", "iemocap", overrides=tiny_overrides(mla_root, tmp_path / "runs", device="cpu"))
    assert {m: b["name"] for m, b in result.config["backbone"].items()} == {
        "audio": "fbank_transformer", "visual": "vit", "text": "m3ae_text"}
    (epoch,) = result.record["epochs"]
    assert epoch["train_batches"] == 1 and np.isfinite(epoch["train_loss"])
    assert {"fused", "audio", "visual", "text"} <= set(result.final["last"]["test"])


def test_one_concat_step_mult_layout(tmp_path: Path) -> None:
    from mmbalance.runner import run

    root = make_mult_npz(tmp_path / "IEMOCAP")
    ov = {"data_root": str(root), "records": str(tmp_path / "runs"), "epochs": 1, "batch_size": 2,
          "limit_train_batches": 1, "limit_eval_batches": 1, "check_manifest": False,
          "embed_dim": 16, "checkpoint": False, "progress": "off", "device": "cpu"}
    for m in IEMOCAPMulT.modality_names:
        ov.update({f"backbone.{m}.d_model": 16, f"backbone.{m}.depth": 1, f"backbone.{m}.num_heads": 2})
    result = run("concat", "iemocap_mult", overrides=ov)
    assert np.isfinite(result.record["epochs"][0]["train_loss"])
    assert result.record["header"]["dataset_info"]["layout"] == "mult"


@pytest.mark.gpu
def test_a_few_cuda_bf16_steps(mla_root: Path, tmp_path: Path) -> None:
    check_cuda_bf16_steps("iemocap", tiny_overrides(mla_root, tmp_path / "runs", **CUDA_BF16))
