"""Sarcasm plugin: BSS/IGM JSON, the original list-literal release and the AMSS TSV."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_media import CUDA_BF16, check_cuda_bf16_steps
from mmbalance.datasets.sarcasm import (
    AUGMENTS,
    CLASS_NAMES,
    CLIP_MEAN,
    CLIP_STD,
    IGM_AUGMENT_OPS,
    IGMRandomAugment,
    Sarcasm,
    clean_text,
    igm_autocontrast,
    igm_brightness,
    igm_equalize,
    igm_operation,
    igm_sharpness,
    image_transform,
    keep_original_train,
)
from PIL import Image, ImageOps

from mmbalance.data import Splits
from mmbalance.errors import ConfigError, DataError
from mmbalance.registry import DATASETS

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "i", "love", "mondays", "great", "the",
         "weather", "is", "lovely", "<", ">", "user", "num", "what", "a", "day", "so", "fun"]
POSTS = {
    "train": [("682716753374351360", "I love Mondays!!!", 1),
              ("682716753374351361", "What a day... <user>", 0),
              ("682716753374351362", "the weather is lovely #not", 1),
              ("682716753374351363", "so fun", 0)],
    "valid": [("692716753374351360", "great day", 0), ("692716753374351361", "I love the weather", 1)],
    "test": [("702716753374351360", "what a great day", 1), ("702716753374351361", "i love fun", 0)],
}
COLOR = (200, 100, 50)


def write_vocab(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return folder / "vocab.txt"


def write_images(root: Path, ids, folder: str = "images") -> None:
    (root / folder).mkdir(parents=True, exist_ok=True)
    for pid in ids:
        Image.new("RGB", (40, 30), COLOR).save(root / folder / f"{pid}.jpg", quality=95)


def make_json(root: Path, with_valid: bool = True) -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, rows in POSTS.items():
        if split == "valid" and not with_valid:
            continue
        recs = [{"image": f"/home/someone/Sarcasm/images/{pid}.jpg", "text": t, "label": y}
                for pid, t, y in rows]
        (root / "annotations" / f"{split}_data.json").write_text(json.dumps(recs))
        write_images(root, [pid for pid, _, _ in rows])
    return root


@pytest.fixture(scope="module")
def vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_vocab(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def json_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_json(tmp_path_factory.mktemp("sarc") / "Sarcasm")


def build(root: Path, vocab: Path | None, mods=("image", "text"), **kw) -> Splits:
    cfg = {"data_root": str(root), "check_manifest": False, "val_fraction": 0.25,
           "image_size": 32, "tokenizer": str(vocab) if vocab else None}
    cfg.update(kw)
    return Sarcasm().build(cfg, mods)


def test_registered_with_paper_recipe() -> None:
    assert DATASETS.get("sarcasm") is Sarcasm
    d = Sarcasm.defaults
    assert (d["batch_size"], d["optimizer"], d["lr"], d["epochs"], d["embed_dim"]) == (64, "adam", 1e-4, 100, 768)
    assert d["backbone"] == {"image": {"name": "resnet50"}, "text": {"name": "bert"}}
    assert Sarcasm.method_defaults["iprm"]["alpha"] == 0.7
    assert Sarcasm.modality_names == ("image", "text") and CLASS_NAMES[1] == "sarcastic"


def test_clean_text_follows_igm() -> None:
    assert clean_text("Wow!!! I *LOVE* Mondays... #not - great/awful;") == "wow i love mondays not great awful"
    assert clean_text("it's  (so) \"fun\" ~: ?") == "its so fun"
    assert clean_text(" ".join(str(i) for i in range(80))) == " ".join(str(i) for i in range(50))
    assert clean_text("a b c d", max_words=2) == "a b"


def test_original_keyword_filter() -> None:
    assert keep_original_train("what a lovely day <user>")
    assert not keep_original_train("this is sarcasm at its best")
    assert not keep_original_train("look at this <url>")
    assert keep_original_train("sarcasm? no")  # whitespace words only, as the authors' code


def test_json_layout_shapes_tokens_and_collate(json_root: Path, vocab: Path) -> None:
    s = build(json_root, vocab)
    assert (len(s.train), len(s.val), len(s.test)) == (4, 2, 2)  # valid_data.json is used
    assert s.num_classes == 2 and s.info["layout"] == "json"
    assert s.modalities["image"].shape == (3, 32, 32) and s.modalities["text"].kind == "tokens"
    assert s.modalities["text"].extras["pad_id"] == 0
    item = s.test[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    ids = item["text"]["input_ids"]
    assert ids.dtype == torch.long
    v = {t: i for i, t in enumerate(VOCAB)}
    assert ids.tolist() == [v["[CLS]"], v["what"], v["a"], v["great"], v["day"], v["[SEP]"]]
    assert v["[UNK]"] not in s.train[0]["text"]["input_ids"].tolist()  # "i love mondays"
    assert [s.test[i]["label"] for i in range(2)] == [1, 0]
    batch = s.collate([s.test[0], s.test[1]])
    assert batch["text"]["input_ids"].shape == (2, 6)  # padded to the longest post
    assert batch["text"]["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 1, 0]]
    assert batch["image"].shape == (2, 3, 32, 32) and batch["label"].tolist() == [1, 0]


def test_images_use_clip_statistics_and_random_train_crops(json_root: Path, vocab: Path) -> None:
    s = build(json_root, vocab, mods=("image",))
    img = s.test[0]["image"]
    rgb = img[:, 16, 16] * torch.tensor(CLIP_STD) + torch.tensor(CLIP_MEAN)
    assert torch.allclose(rgb, torch.tensor(COLOR) / 255.0, atol=0.03)
    torch.manual_seed(0)
    a = s.train[0]["image"]
    torch.manual_seed(0)
    assert torch.equal(a, s.train[0]["image"])  # torch's global RNG drives the augmentation
    assert set(s.train[0]) == {"image", "label", "index"}  # no tokenizer needed without text


def test_fixed_padding_and_max_tokens(json_root: Path, vocab: Path) -> None:
    s = build(json_root, vocab, mods=("text",), text_padding="max_length", max_tokens=5)
    assert s.collate is None
    ids = s.train[0]["text"]["input_ids"]
    assert ids.shape == (5,) and ids[-1].item() == VOCAB.index("[SEP]")  # truncated, [SEP] kept
    assert s.modalities["text"].shape == (5,)
    with pytest.raises(ConfigError, match="max_tokens"):
        build(json_root, vocab, mods=("text",), text_padding="max_length")


def test_text_is_tokenised_as_released_without_truncation(tmp_path: Path, vocab: Path) -> None:
    root = make_json(tmp_path / "Sarcasm")
    long_text = " ".join(["great day"] * 30)  # 60 words -> 60 word pieces + [CLS] [SEP]
    recs = json.loads((root / "annotations" / "train_data.json").read_text())
    recs[0]["text"] = long_text
    (root / "annotations" / "train_data.json").write_text(json.dumps(recs))
    s = build(root, vocab, mods=("text",), max_words=80)
    ids = s.train[0]["text"]["input_ids"]
    assert ids.shape == (62,)  # IGM: padding='longest', max_length=50, no truncation=True -> none
    assert ids[0].item() == VOCAB.index("[CLS]") and ids[-1].item() == VOCAB.index("[SEP]")
    assert s.modalities["text"].shape == (62,) and "not truncated" in s.info["text_rule"]
    cut = build(root, vocab, mods=("text",), max_words=80, max_tokens=50)
    assert cut.train[0]["text"]["input_ids"].shape == (50,) and "max_tokens=50" in cut.info["text_rule"]
    # IGM keeps 50 words after cleaning (its max_tokens config feeds pre_caption's max_words)
    assert build(root, vocab, mods=("text",)).train[0]["text"]["input_ids"].shape == (52,)


# ------------------------------------------------------------------- IGM's RandomAugment


def _flat(value: int, size: int = 8) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


def test_igm_colour_operations_hand_cases() -> None:
    # Brightness at level 7: factor 0.7 * 1.8 + 0.1 = 1.36, float32, clipped, truncated
    assert igm_operation(_flat(100), "Brightness", 7)[0, 0, 0] == 136
    assert igm_brightness(_flat(136), 1.36)[0, 0, 0] == 184  # 184.96 truncates
    assert igm_brightness(_flat(200), 1.36)[0, 0, 0] == 255
    # AutoContrast: a channel with minimum 0 is stretched (as PIL does) ...
    img = np.zeros((1, 3, 3), dtype=np.uint8)
    img[0, :, 0] = [0, 50, 100]
    img[0, :, 1] = [20, 70, 120]
    img[0, :, 2] = 70
    out = igm_autocontrast(img)
    assert out[0, :, 0].tolist() == [0, 127, 254]  # 100 * 2.55 = 254.99999999999997, truncated
    assert out[0, :, 0].tolist() == np.asarray(ImageOps.autocontrast(Image.fromarray(img[..., 0])))[0].tolist()
    # ... any other turns white: the release negates the uint8 minimum (-20 wraps to 236)
    assert out[0, :, 1].tolist() == [255, 255, 255]
    assert out[0, :, 2].tolist() == [70, 70, 70]  # flat: kept
    # Equalize: PIL's rule; 510 x 0, 255 x 100, 255 x 200 -> step 765 // 255 = 3
    ch = np.array([0] * 510 + [100] * 255 + [200] * 255, dtype=np.uint8).reshape(1, -1, 1).repeat(3, 2)
    assert sorted(set(igm_equalize(ch)[0, :, 0].tolist())) == [0, 170, 255]
    rng = np.random.default_rng(0)
    photo = rng.integers(30, 200, (24, 24, 3), dtype=np.uint8)
    pil = np.asarray(ImageOps.equalize(Image.fromarray(photo[..., 1])))
    assert np.array_equal(igm_equalize(photo)[..., 1], pil)
    assert np.array_equal(igm_equalize(_flat(50)), _flat(50))  # step 0: unchanged


def test_igm_sharpness_wraps_like_the_released_uint8_cast() -> None:
    img = np.full((5, 5, 3), 200, dtype=np.uint8)
    img[2, 2] = 255
    out = igm_sharpness(img, 1.36)
    # centre: smoothed (5 * 255 + 8 * 200) / 13 = 221.15 -> 221; 221 + 1.36 * 34 = 267.24
    assert out[2, 2, 0] == 267 - 256  # truncated, then wrapped modulo 256
    assert out[1, 2, 0] == 198  # (12 * 200 + 255) / 13 = 204.2 -> 204; 204 - 1.36 * 4 = 198.56
    assert (out[0] == 200).all() and (out[:, 0] == 200).all()  # the border is left as it is
    assert np.array_equal(igm_sharpness(img, 1.0), img)
    assert igm_operation(img, "Sharpness", 7)[2, 2, 0] == 11


def test_igm_geometric_operations_hand_cases() -> None:
    ramp = np.tile((np.arange(32) * 5).astype(np.uint8)[None, :, None], (32, 1, 3))
    # TranslateX at level 7: 7 pixels; the matrix [[1, 0, -7], [0, 1, 0]] moves content left
    left = igm_operation(ramp, "TranslateX", 7)
    assert np.array_equal(left[:, :25], ramp[:, 7:]) and (left[:, 25:] == 128).all()
    right = igm_operation(ramp, "TranslateX", 7, negate=True)
    assert np.array_equal(right[:, 7:], ramp[:, :25]) and (right[:, :7] == 128).all()
    down = igm_operation(ramp.transpose(1, 0, 2).copy(), "TranslateY", 7)
    assert (down[25:] == 128).all()
    # ShearX at level 7: x' = x + 0.21 y; row 0 stays, row 10 moves 2.1 px right
    sheared = igm_operation(ramp, "ShearX", 7).astype(float)
    assert np.array_equal(sheared[0], ramp[0].astype(float))
    assert np.allclose(sheared[10, 5:30, 0], 5 * (np.arange(5, 30) - 2.1), atol=1.0)
    assert (sheared[31, :6] == 128).all()  # uncovered: grey fill
    # Rotate at level 7: 21 degrees about the centre; corners uncovered, centre kept
    dot = np.zeros((33, 33, 3), dtype=np.uint8)
    dot[15:18, 15:18] = 255
    rot = igm_operation(dot, "Rotate", 7)
    assert (rot[0, 0] == 128).all() and (rot[-1, -1] == 128).all()
    assert (rot[16, 16] > 200).all()
    # the sign: +21 degrees turns the picture counter-clockwise (OpenCV, y down), so below the
    # centre the right edge shows content from further left on the ramp (darker), above it
    # from further right; -21 degrees the other way round
    ccw, cw = igm_operation(ramp, "Rotate", 7), igm_operation(ramp, "Rotate", 7, negate=True)
    assert ccw[24, 28, 0] < cw[24, 28, 0] and ccw[8, 28, 0] > cw[8, 28, 0]
    with pytest.raises(ConfigError, match="Posterise"):
        igm_operation(dot, "Posterise", 7)


def test_igm_random_augment_draws_two_ops_each_with_probability_half() -> None:
    aug = IGMRandomAugment(2, 7, ops=("Brightness",))
    torch.manual_seed(0)
    values = [int(aug(Image.fromarray(_flat(100)))[0, 0, 0]) for _ in range(400)]
    counts = {v: values.count(v) for v in set(values)}
    # none applied (1/4), one (1/2: 136), both (1/4: 136 * 1.36 = 184.96 -> 184)
    assert set(counts) == {100, 136, 184}
    assert abs(counts[100] - 100) < 40 and abs(counts[136] - 200) < 40 and abs(counts[184] - 100) < 40
    torch.manual_seed(0)
    assert values[:20] == [int(aug(Image.fromarray(_flat(100)))[0, 0, 0]) for _ in range(20)]
    assert IGM_AUGMENT_OPS == ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
                               "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
    with pytest.raises(ConfigError, match="Solarise"):
        IGMRandomAugment(ops=("Solarise",))


def test_train_transform_uses_igm_augment_by_default(json_root: Path, vocab: Path) -> None:
    names = [type(t).__name__ for t in image_transform(True, 32, "clip").transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "IGMRandomAugment", "ToTensor", "Normalize"]
    tv = [type(t).__name__ for t in image_transform(True, 32, "clip", "torchvision").transforms]
    assert "RandAugment" in tv and "IGMRandomAugment" not in tv
    assert "IGMRandomAugment" not in [type(t).__name__ for t in image_transform(False, 32, "clip").transforms]
    s = build(json_root, vocab, mods=("image",))
    assert s.info["augment"] == AUGMENTS["igm"] and "level 7 of 10" in s.info["image_transform"]
    assert build(json_root, vocab, mods=("image",), augment="none").info["augment"] == AUGMENTS["none"]
    torch.manual_seed(3)
    item = s.train[0]["image"]
    assert item.shape == (3, 32, 32) and item.dtype == torch.float32


def test_tokenizer_is_required_or_taken_from_backbone_weights(json_root: Path, vocab: Path) -> None:
    with pytest.raises(ConfigError, match="tokenizer"):
        build(json_root, None, mods=("text",))
    s = build(json_root, None, mods=("text",), backbone={"text": {"name": "bert", "weights": str(vocab.parent)}})
    assert s.info["tokenizer"] == "bert"


def test_clip_text_backbone_gets_the_clip_tokenizer(json_root: Path, tmp_path: Path) -> None:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "adgrty":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    vocab["da"], vocab["day</w>"] = len(vocab), len(vocab) + 1
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nd a\nda y</w>\n")
    s = build(json_root, tmp_path, mods=("text",), backbone={"text": {"name": "clip_text"}})
    assert s.info["tokenizer"] == "clip"
    ids = s.test[0]["text"]["input_ids"].tolist()  # "what a great day"
    assert ids[0] == 0 and ids[-1] == 1 and ids[-2] == vocab["day</w>"]
    assert s.modalities["text"].extras["pad_id"] == 1


def test_original_release_layout(tmp_path: Path, vocab: Path) -> None:
    root = tmp_path / "Sarcasm"
    (root / "text").mkdir(parents=True)
    train = [f"['{pid}', '{t.lower()}', {y}]" for pid, t, y in POSTS["train"]]
    train += ["['1', 'this is sarcasm', 1]", "['2', 'see <url> now', 0]"]  # filtered out
    (root / "text" / "train.txt").write_text("\n".join(train) + "\n")
    for split, fname in (("valid", "valid2.txt"), ("test", "test2.txt")):
        rows = [f"['{pid}', '{t.lower()}', {1 - y}, {y}]" for pid, t, y in POSTS[split]]
        rows.append("['3', 'what a joke', 1, 1]")  # valid/test keep every row
        (root / "text" / fname).write_text("\n".join(rows) + "\n")
    ids = [pid for rows in POSTS.values() for pid, _, _ in rows] + ["1", "2", "3"]
    write_images(root, ids, folder="dataset_image")
    s = build(root, vocab)
    assert s.info["layout"] == "original"
    assert (len(s.train), len(s.val), len(s.test)) == (4, 3, 3)
    assert [s.val[i]["label"] for i in range(3)] == [0, 1, 1]  # the last element is the label
    with pytest.raises(DataError, match="list literal"):
        (root / "text" / "test2.txt").write_text("__import__('os').system('true')\n")
        build(root, vocab)


def test_tsv_layout_carves_validation(tmp_path: Path, vocab: Path) -> None:
    root = tmp_path / "Sarcasm"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "test"):
        rows = ["Label\tString\tImageID"] + [f"{y}\t{t}\t{pid}.jpg" for pid, t, y in POSTS[split]]
        (root / "annotations" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
        write_images(root, [pid for pid, _, _ in POSTS[split]])
    s = build(root, vocab, mods=("text",))
    assert s.info["layout"] == "tsv" and "seed 2019" in s.info["val_split"]
    assert (len(s.train), len(s.val), len(s.test)) == (3, 1, 2)


def test_json_without_valid_file_carves_validation(tmp_path: Path, vocab: Path) -> None:
    root = make_json(tmp_path / "Sarcasm", with_valid=False)
    s = build(root, vocab)
    assert (len(s.train), len(s.val)) == (3, 1) and "train split" in s.info["val_split"]


def test_manifest_and_missing_images(tmp_path: Path, vocab: Path) -> None:
    root = make_json(tmp_path / "Sarcasm")
    with pytest.raises(DataError, match="manifest expects 19816"):
        Sarcasm().build({"data_root": str(root), "tokenizer": str(vocab)}, ("image", "text"))
    (root / "images" / f"{POSTS['test'][0][0]}.jpg").unlink()
    s = build(root, vocab)
    assert len(s.test) == 1 and any("lack files" in n for n in s.info["notes"])
    assert len(build(root, vocab, mods=("text",)).test) == 2  # text alone needs no image


def test_missing_root_and_layout(tmp_path: Path, vocab: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build(tmp_path / "nowhere", vocab)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="annotations/train_data.json"):
        build(tmp_path / "empty", vocab)


# ------------------------------------------------------------------- training through the runner

TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 64, "vocab_size": len(VOCAB)}


def tiny_overrides(root: Path, vocab: Path, records: Path, **extra) -> dict:
    """concat with the paper's ResNet-50 + BERT (a 1-layer BERT), small images."""
    ov = {"data_root": str(root), "records": str(records), "epochs": 1, "batch_size": 2,
          "limit_train_batches": 1, "limit_eval_batches": 1, "check_manifest": False,
          "embed_dim": 16, "checkpoint": False, "progress": "off", "image_size": 32,
          "tokenizer": str(vocab), "backbone.text.config": TINY_BERT}
    ov.update(extra)
    return ov


def test_one_concat_step_resnet50_bert(json_root: Path, vocab: Path, tmp_path: Path) -> None:
    from mmbalance.runner import run

    result = run("concat", "sarcasm", overrides=tiny_overrides(json_root, vocab, tmp_path / "runs", device="cpu"))
    assert {m: b["name"] for m, b in result.config["backbone"].items()} == {"image": "resnet50", "text": "bert"}
    (epoch,) = result.record["epochs"]
    assert epoch["train_batches"] == 1 and np.isfinite(epoch["train_loss"])
    assert {"fused", "image", "text"} <= set(result.final["last"]["test"])


@pytest.mark.gpu
def test_a_few_cuda_bf16_steps(json_root: Path, vocab: Path, tmp_path: Path) -> None:
    check_cuda_bf16_steps("sarcasm", tiny_overrides(json_root, vocab, tmp_path / "runs", **CUDA_BF16))
