"""CREMA-D plugin and the shared media helpers (mmbalance/media.py), on tiny real fixtures.

Fixtures are written in the real on-disk layouts under tmp_path: 16 kHz int16 WAVs written
with soundfile, small JPEGs written with PIL, CRLF csvs with a UTF-8 BOM, MLA lists and
(1024, 128) fbank .npy files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_media import (
    check_av_bf16_steps_on_cuda,
    check_av_concat_step,
    write_frames,
    write_wav,
)
from torch.utils.data import DataLoader

from mmbalance import media
from mmbalance.config import assemble
from mmbalance.data import Splits
from mmbalance.errors import ConfigError, DataError
from mmbalance.registry import DATASETS

EMOS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
MLA_WORDS = {"ANG": "Anger", "DIS": "Disgust", "FEA": "Fear", "HAP": "Happy", "NEU": "Neutral", "SAD": "Sad"}
SENTENCES = ("DFA", "IEO", "TIE", "IOM", "IWW", "TAI")


# ---------------------------------------------------------------------------------- fixtures


def clip_ids(n_per_class: int) -> list[tuple[str, str]]:
    out = []
    for j in range(n_per_class):
        for k, emo in enumerate(EMOS):
            out.append((f"{1001 + j * 6 + k}_{SENTENCES[k]}_{emo}_XX", emo))
    return out


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    """OGM-GE csv: no header, 'id,EMO', CRLF line endings, UTF-8 BOM."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\ufeff" + "".join(f"{c},{e}\r\n" for c, e in rows)).encode("utf-8"))


def make_cremad_b(root: Path, n_train: int = 2, n_test: int = 1, frames: int = 3, wav_seconds: float = 1.0) -> Path:
    """Layout B (njustkmg/IPRM) under root/CREMA-D; returns the CREMA-D folder."""
    base = root / "CREMA-D"
    rows = clip_ids(n_train + n_test)
    train, test = rows[: 6 * n_train], rows[6 * n_train :]
    for i, (cid, _) in enumerate(rows):
        write_wav(base / "AudioWAV" / f"{cid}.wav", seconds=wav_seconds, seed=i)
        write_frames(base / "Image-01-FPS" / cid, frames)
    write_csv(base / "annotations" / "train.csv", train)
    write_csv(base / "annotations" / "test.csv", test)
    return base


class _Method:
    """Stands in for a method class when assembling a dataset-only config."""

    name = "concat"
    options: dict = {}
    defaults: dict = {}


def cfg_for(root: Path, **over) -> dict:
    values = {"data_root": str(root), "check_manifest": False, "image_size": 32, "val_fraction": 0.5}
    values.update(over)
    return assemble(DATASETS.get("cremad"), _Method, overrides=values)


def build(root: Path, modalities=("audio", "visual"), **over) -> Splits:
    return DATASETS.get("cremad")().build(cfg_for(root, **over), list(modalities))


# ------------------------------------------------------------------------------------ media


def test_tile_to_length_repeats_then_cuts():
    w = torch.tensor([1.0, 2.0, 3.0])
    assert media.tile_to_length(w, 7).tolist() == [1, 2, 3, 1, 2, 3, 1]
    assert media.tile_to_length(w, 2).tolist() == [1, 2]
    assert media.tile_to_length(torch.zeros(0), 4).tolist() == [0, 0, 0, 0]
    assert media.clip_unit(torch.tensor([-3.0, 0.5, 2.0])).tolist() == [-1.0, 0.5, 1.0]


def test_log_stft_matches_a_hand_written_librosa_recipe():
    """Centred zero-padded frames, periodic Hann, |rfft|, log(. + 1e-7), as librosa >= 0.10."""
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, 2000).astype(np.float64)
    n_fft, hop = 64, 23
    padded = np.pad(x, n_fft // 2)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    n_frames = 1 + len(x) // hop
    ref = np.stack(
        [np.abs(np.fft.rfft(padded[t * hop : t * hop + n_fft] * window)) for t in range(n_frames)], axis=1
    )
    got = media.log_stft(torch.tensor(x, dtype=torch.float32), n_fft, hop)
    assert got.shape == (n_fft // 2 + 1, n_frames)
    np.testing.assert_allclose(got.numpy(), np.log(ref + 1e-7), atol=2e-3)
    assert media.spectrogram_shape(22050, 20.0) == (1, 257, 1250)
    assert media.spectrogram_shape(22050, 3.0) == (1, 257, 188)
    assert media.spectrogram_shape(35400, 10.0) == (1, 257, 1003)


def test_load_audio_mono_and_resampled(tmp_path):
    data = write_wav(tmp_path / "s.wav", seconds=1.0, rate=16000, channels=2)
    raw = media.load_audio(tmp_path / "s.wav", sample_rate=None)
    expect = data.astype(np.float32).mean(axis=1) / 32768.0
    np.testing.assert_allclose(raw.numpy(), expect, atol=1e-6)
    wave = media.load_audio(tmp_path / "s.wav", sample_rate=22050)
    assert wave.dtype == torch.float32 and wave.shape == (22050,)
    spec = media.wav_to_log_spectrogram(tmp_path / "s.wav", 22050, 3.0)
    assert spec.shape == (1, 257, 188) and spec.dtype == torch.float32


def test_corrupt_wav_is_a_data_error_naming_the_file(tmp_path):
    bad = tmp_path / "1001_DFA_ANG_XX.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    with pytest.raises(DataError, match="1001_DFA_ANG_XX.wav"):
        media.load_audio(bad, 22050)


def test_kaldi_fbank_shape_and_padding():
    wave = torch.sin(torch.arange(16000) * 0.05) * 0.5
    feats = media.kaldi_fbank(wave, 16000)
    assert feats.shape == (1024, 128) and feats.dtype == torch.float32
    # 1 s at a 10 ms shift and 25 ms window: 98 real frames, the rest zero padding
    assert torch.all(feats[98:] == 0) and not torch.all(feats[97] == 0)
    assert media.kaldi_fbank(wave, 16000, target_frames=None).shape == (98, 128)
    x = torch.tensor([[-4.503877]])
    assert media.normalise_fbank(x, -4.503877, 5.141276).item() == pytest.approx(0.0)


def test_frame_listing_and_choice(tmp_path):
    write_frames(tmp_path / "clip", 4)
    (tmp_path / "clip" / "notes.txt").write_text("x")
    assert media.list_frames(tmp_path / "clip") == ["00000.jpg", "00030.jpg", "00060.jpg", "00090.jpg"]
    raw = [n for n in os.listdir(tmp_path / "clip") if n.endswith(".jpg")]
    assert media.list_frames(tmp_path / "clip", sort=False) == raw
    assert media.choose_frames(5, 2, train=False) == [0, 1]
    torch.manual_seed(3)
    a = media.choose_frames(5, 3, train=True)
    torch.manual_seed(3)
    assert media.choose_frames(5, 3, train=True) == a
    assert a == sorted(a) and len(set(a)) == 3 and all(0 <= i < 5 for i in a)
    img = media.load_rgb(tmp_path / "clip" / "00000.jpg")
    assert img.mode == "RGB"
    with pytest.raises(DataError, match="notes.txt"):
        media.load_rgb(tmp_path / "clip" / "notes.txt")


# ---------------------------------------------------------------------------------- CREMA-D


def test_layout_b_batches_shapes_dtypes_and_labels(tmp_path):
    make_cremad_b(tmp_path)
    splits = build(tmp_path, audio_seconds=1.0)
    assert splits.num_classes == 6 and splits.class_names == list(EMOS)
    assert splits.modalities["audio"].kind == "spectrogram"
    assert splits.modalities["audio"].shape == (1, 257, 63)  # 1 + 22050 // 353
    assert splits.modalities["visual"].kind == "video"
    assert splits.modalities["visual"].shape == (3, 2, 32, 32)
    assert len(splits.train) == 6 and len(splits.val) == 6 and len(splits.test) == 6
    batch = next(iter(DataLoader(splits.test, batch_size=6)))
    assert batch["audio"].shape == (6, 1, 257, 63) and batch["audio"].dtype == torch.float32
    assert batch["visual"].shape == (6, 3, 2, 32, 32) and batch["visual"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64
    assert batch["label"].tolist() == [0, 1, 2, 3, 4, 5]  # NEU, HAP, SAD, FEA, DIS, ANG rows
    assert batch["index"].tolist() == list(range(6))
    torch.manual_seed(0)
    item = splits.train[0]
    assert isinstance(item["label"], int) and item["visual"].shape == (3, 2, 32, 32)


def test_paper_default_shape_is_1x257x1250_and_two_224_frames(tmp_path):
    make_cremad_b(tmp_path, n_train=1, n_test=1)
    splits = build(tmp_path, image_size=224, val_fraction=0.0)
    assert splits.modalities["audio"].shape == (1, 257, 1250)
    item = splits.test[0]
    assert item["audio"].shape == (1, 257, 1250)
    assert item["visual"].shape == (3, 2, 224, 224)
    assert "no holdout" in splits.info["val_rule"] and splits.val is splits.test


def test_sorted_class_order_option(tmp_path):
    make_cremad_b(tmp_path, n_train=2, n_test=1)
    splits = build(tmp_path, class_order="sorted", audio_seconds=0.5)
    assert splits.class_names == ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
    labels = [splits.test[i]["label"] for i in range(6)]
    assert labels == [4, 3, 5, 2, 1, 0]  # rows NEU, HAP, SAD, FEA, DIS, ANG
    assert splits.info["label_map"]["ANG"] == 0


def test_validation_is_carved_with_a_fixed_seed(tmp_path):
    make_cremad_b(tmp_path, n_train=4, n_test=1)
    a = build(tmp_path, seed=0, audio_seconds=0.5, val_fraction=0.25)
    b = build(tmp_path, seed=123, audio_seconds=0.5, val_fraction=0.25)
    ids = [c.clip_id for c in a.val.clips]
    assert ids == [c.clip_id for c in b.val.clips]
    assert len(a.val) == 6 and len(a.train) == 18
    assert sorted(c.label for c in a.val.clips) == list(range(6))  # stratified
    assert not set(ids) & {c.clip_id for c in a.train.clips}
    assert "fixed seed" in a.info["val_rule"]
    assert a.val.train is False and a.train.train is True
    torch.manual_seed(0)
    v1 = a.val[0]["visual"]
    torch.manual_seed(99)
    assert torch.equal(v1, a.val[0]["visual"])  # eval mode: deterministic


def test_train_frame_choice_follows_torch_seed(tmp_path):
    make_cremad_b(tmp_path, n_train=2, n_test=1, frames=5)
    splits = build(tmp_path, modalities=("visual",), val_fraction=0.5)
    torch.manual_seed(7)
    x = splits.train[0]["visual"]
    torch.manual_seed(7)
    assert torch.equal(x, splits.train[0]["visual"])


def test_modalities_are_honoured(tmp_path):
    make_cremad_b(tmp_path)
    splits = build(tmp_path, modalities=("visual",))
    item = splits.test[0]
    assert set(item) == {"visual", "label", "index"}
    assert list(splits.modalities) == ["visual"]
    with pytest.raises(ConfigError, match="text"):
        build(tmp_path, modalities=("audio", "text"))


def test_unsorted_frame_order_option(tmp_path):
    base = make_cremad_b(tmp_path, frames=4)
    splits = build(tmp_path, sort_frames=False, modalities=("visual",))
    clip = splits.test.clips[0]
    listed = [n for n in os.listdir(base / "Image-01-FPS" / clip.clip_id) if n.endswith(".jpg")]
    assert list(clip.frame_names) == listed
    assert "os.listdir" in splits.info["frame_order"]


def test_layout_a_ogm_ge(tmp_path):
    base = tmp_path / "CREMA-D"
    rows = clip_ids(3)
    for i, (cid, _) in enumerate(rows):
        write_wav(base / "AudioWAV" / f"{cid}.wav", seconds=1.5, seed=i)
        write_frames(base / "Image-01-FPS" / cid, 1 + i % 2)
    write_csv(base / "data" / "CREMAD" / "train.csv", rows[:12])
    write_csv(base / "data" / "CREMAD" / "test.csv", rows[12:])
    splits = build(tmp_path, layout="A")
    assert splits.modalities["audio"].shape == (1, 257, 188)
    assert splits.modalities["visual"].shape == (3, 1, 32, 32)
    item = splits.test[0]
    assert item["audio"].shape == (1, 257, 188) and item["visual"].shape == (3, 1, 32, 32)
    assert splits.info["layout"] == "A" and splits.info["split"] == "ogm"


def test_layout_d_mla_fbank_lists(tmp_path):
    base = tmp_path / "CREMA-D"
    rows = clip_ids(3)
    for split, part in (("train", rows[:12]), ("test", rows[12:])):
        lines = "".join(f"{cid}.flv {MLA_WORDS[emo]}\r\n" for cid, emo in part)
        (base / "data").mkdir(parents=True, exist_ok=True)
        (base / "data" / f"my_{split}_cre.txt").write_bytes(lines.encode())
        for cid, _ in part:
            fb = base / "audio" / f"{split}_fbank" / f"{cid}.npy"
            fb.parent.mkdir(parents=True, exist_ok=True)
            np.save(fb, np.full((1024, 128), 0.25, dtype=np.float32))
            write_frames(base / "visual" / f"{split}_imgs" / "Image-01-FPS" / cid, 3)
    splits = build(tmp_path, layout="D")
    assert splits.info["split"] == "mla"
    assert splits.modalities["audio"].shape == (1, 1024, 128)
    batch = next(iter(DataLoader(splits.test, batch_size=6)))
    assert batch["audio"].shape == (6, 1, 1024, 128)
    assert torch.all(batch["audio"] == 0.25)
    assert batch["visual"].shape == (6, 3, 3, 32, 32)
    assert batch["label"].tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match="split must be mla"):
        build(tmp_path, layout="D", split="ogm")


def test_mla_split_lists_over_layout_b_media(tmp_path):
    base = make_cremad_b(tmp_path, n_train=2, n_test=1)
    rows = clip_ids(3)
    (base / "data").mkdir()
    (base / "data" / "my_train_cre.txt").write_text("".join(f"{c}.flv {MLA_WORDS[e]}\n" for c, e in rows[6:]))
    (base / "data" / "my_test_cre.txt").write_text("".join(f"{c}.flv {MLA_WORDS[e]}\n" for c, e in rows[:6]))
    splits = build(tmp_path, split="mla", audio_seconds=0.5)
    assert {c.clip_id for c in splits.test.clips} == {c for c, _ in rows[:6]}
    assert splits.test[5]["label"] == 5  # ANG under the official order


def test_manifest_reports_missing_and_extra_samples(tmp_path, monkeypatch):
    base = make_cremad_b(tmp_path, n_train=3)
    missing = clip_ids(1)[2][0]
    (base / "AudioWAV" / f"{missing}.wav").unlink()
    with pytest.raises(DataError) as err:
        build(tmp_path, check_manifest=True)
    msg = str(err.value)
    assert "6698" in msg and missing in msg and "check_manifest=false" in msg
    splits = build(tmp_path, check_manifest=False, audio_seconds=0.5)
    assert len(splits.train) + len(splits.val) == 17
    assert any(missing in n for n in splits.info["notes"])
    from mmbalance.datasets import cremad

    monkeypatch.setitem(cremad.MANIFEST, "ogm", {"train": 15, "test": 6})
    with pytest.raises(DataError, match="2 more than expected"):
        build(tmp_path, check_manifest=True)


def test_check_manifest_warn_skips_missing_clips_and_counts_them(tmp_path):
    base = make_cremad_b(tmp_path, n_train=3)
    gone = [clip_ids(3)[k][0] for k in (2, 7)]
    (base / "AudioWAV" / f"{gone[0]}.wav").unlink()
    for f in (base / "Image-01-FPS" / gone[1]).iterdir():
        f.unlink()  # an empty frame folder: unusable too
    with pytest.warns(media.MissingSamplesWarning, match="2 of 18 listed samples have no files") as rec:
        splits = build(tmp_path, check_manifest="warn", audio_seconds=0.5, val_fraction=0.0)
    assert len(splits.train) == 16 and len(splits.test) == 6
    assert not {c.clip_id for c in splits.train.clips} & set(gone)
    assert any(gone[0] in str(w.message) for w in rec)
    assert splits.info["check_manifest"] == "warn"
    assert any("2 of 18" in n for n in splits.info["notes"])
    # the default stays strict, and its message offers warn
    with pytest.raises(DataError, match="check_manifest=warn"):
        build(tmp_path, audio_seconds=0.5, check_manifest=True)
    with pytest.raises(ConfigError, match="warn"):
        build(tmp_path, check_manifest="skip")


def test_root_may_be_named_as_ogm_ge_or_iprm(tmp_path):
    for name in ("CREMAD", "CREMA"):
        parent = tmp_path / name.lower()
        make_cremad_b(parent, n_train=1, n_test=1)
        (parent / "CREMA-D").rename(parent / name)
        splits = build(parent, audio_seconds=0.5, val_fraction=0.0)
        assert len(splits.test) == 6
        assert splits.test.clips[0].audio.parent.parent.name == name


def test_missing_split_csvs_name_list_dir_and_warn_about_layout_a(tmp_path):
    base = make_cremad_b(tmp_path)
    ogm = tmp_path / "OGM-GE_CVPR2022" / "data" / "CREMAD"
    ogm.mkdir(parents=True)
    for f in ("train.csv", "test.csv"):
        (base / "annotations" / f).rename(ogm / f)
    with pytest.raises(DataError) as err:
        build(tmp_path)
    msg = str(err.value)
    assert "--set list_dir=DIR" in msg and "data/CREMAD" in msg
    assert "layout=A" in msg and "1 frame, 3 s of audio" in msg
    assert "2 frame(s), 20 s of audio" in msg  # what list_dir keeps (layout B, IPRM)
    # the advice works: layout B's recipe with OGM-GE's csvs from the code checkout
    splits = build(tmp_path, list_dir=str(ogm), audio_seconds=0.5, val_fraction=0.0)
    assert len(splits.train) == 12 and splits.modalities["visual"].shape[1] == 2
    # files present: no list_dir advice in other errors
    (ogm / "train.csv").rename(base / "annotations" / "train.csv")
    (ogm / "test.csv").rename(base / "annotations" / "test.csv")
    (base / "Image-01-FPS").rename(base / "frames")
    with pytest.raises(DataError) as err:
        build(tmp_path)
    assert "list_dir" not in str(err.value) and "Image-01-FPS" in str(err.value)


def test_audio_rule_records_the_resampler(tmp_path):
    make_cremad_b(tmp_path, n_train=1, n_test=1)
    splits = build(tmp_path, audio_seconds=0.5, val_fraction=0.0)
    assert "soxr" in splits.info["audio"] and splits.info["resampler"] == media.RESAMPLER
    assert splits.info["frame_choice"] == "random"


def test_manifest_checks_per_class_counts(tmp_path, monkeypatch):
    make_cremad_b(tmp_path)
    from mmbalance.datasets import cremad

    monkeypatch.setitem(cremad.MANIFEST, "ogm", {"train": 12, "test": 6})
    per_class = {e: 2 for e in EMOS}
    test_counts = {e: 1 for e in EMOS}
    monkeypatch.setitem(cremad.CLASS_COUNTS, "ogm", {"train": dict(per_class), "test": test_counts})
    assert len(build(tmp_path, check_manifest=True, audio_seconds=0.5).test) == 6
    monkeypatch.setitem(
        cremad.CLASS_COUNTS, "ogm", {"train": {**per_class, "ANG": 3, "NEU": 1}, "test": test_counts}
    )
    with pytest.raises(DataError, match="ANG 2 \\(expected 3\\)"):
        build(tmp_path, check_manifest=True)


def test_corrupt_wav_in_a_split_names_the_file(tmp_path):
    base = make_cremad_b(tmp_path)
    cid = clip_ids(3)[12][0]  # first test clip
    (base / "AudioWAV" / f"{cid}.wav").write_bytes(b"\x00\x01garbage" * 10)
    splits = build(tmp_path)
    with pytest.raises(DataError, match=f"{cid}.wav"):
        splits.test[0]


def test_missing_root_and_half_prepared_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build(tmp_path / "nowhere")
    base = tmp_path / "CREMA-D"
    write_csv(base / "annotations" / "train.csv", clip_ids(1))
    write_csv(base / "annotations" / "test.csv", clip_ids(1))
    (base / "Image-01-FPS").mkdir()
    with pytest.raises(DataError) as err:
        build(tmp_path)
    msg = str(err.value)
    assert "AudioWAV" in msg and "mmbalance prepare cremad --raw RAW --out ROOT" in msg
    assert str(base) in msg


def test_bad_csv_row_is_reported_with_its_line(tmp_path):
    base = make_cremad_b(tmp_path)
    (base / "annotations" / "test.csv").write_text("1001_DFA_ANG_XX,ANG\n1002_DFA_XXX_XX,XXX\n")
    with pytest.raises(DataError, match="line 2"):
        build(tmp_path)


def test_plugin_declares_the_iprm_recipe():
    cls = DATASETS.get("cremad")
    assert cls.modality_names == ("audio", "visual")
    d = cls.defaults
    assert (d["batch_size"], d["optimizer"], d["lr"], d["epochs"], d["embed_dim"]) == (64, "sgd", 1e-2, 100, 512)
    assert (d["scheduler"], d["step_size"], d["gamma"], d["momentum"], d["weight_decay"]) == ("step", 70, 0.1, 0.9, 1e-4)
    assert d["backbone"] == {"audio": {"name": "resnet18"}, "visual": {"name": "resnet18"}}
    assert cls.method_defaults == {"iprm": {"alpha": 0.8}}
    assert "mmbalance prepare cremad --raw RAW --out ROOT" in cls.layout_help
    assert all(o.help for o in cls.options.values())


# ------------------------------------------------------------------------------ with trainer


def test_concat_one_step_through_runner(tmp_path):
    make_cremad_b(tmp_path / "data")
    check_av_concat_step("cremad", tmp_path / "data", tmp_path)


@pytest.mark.gpu
def test_concat_bf16_steps_on_cuda(tmp_path):
    make_cremad_b(tmp_path / "data", n_train=4)
    check_av_bf16_steps_on_cuda("cremad", tmp_path / "data", tmp_path)
