"""``mmbalance prepare iemocap``: IEMOCAP WAVs + MLA's lists -> MLA Layout A (fbank, tokens, faces)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mmbalance.errors import DataError
from mmbalance.prepare.common import Report, _progress, _save_npy, place_file

IEMOCAP_LABELS = ("Neutral", "Angry", "Sad", "Happy")  # MLA's stat_iemo.txt order
IEMOCAP_SEP = " [split|sign] "

RAW_LAYOUT = (
    "RAW = the IEMOCAP release (Session1..5/sentences/wav/<dialog>/<utt>.wav, searched "
    "recursively) plus MLA's lists RAW/my_train_iemo.txt and RAW/my_test_iemo.txt (or "
    "--set train_list=... test_list=...; lines '<utt>.mp4 [split|sign] <text> [split|sign] "
    "<Label>'). Writes MLA Layout A into OUT: the lists, stat_iemo.txt, "
    "audio/{split}_fbank/<utt>.npy (1024, 128); text_token/{split}_token/<utt>_token.npy "
    "and _pm.npy when --set vocab=/path/to/bert-base-uncased/vocab.txt is given; "
    "visual/{split}_imgs/<utt>/*.jpg (256x256) when --set faces_dir=DIR holds one folder "
    "of face crops per utterance (MLA's face detector is not published)."
)


def read_iemocap_list(path: Path) -> list[tuple[str, str, str]]:
    """MLA list lines '<utt>.mp4 [split|sign] <transcript> [split|sign] <Label>'."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(IEMOCAP_SEP)
        if len(parts) != 3 or parts[2].strip() not in IEMOCAP_LABELS:
            raise DataError(
                f"Line {n} of '{path}' is not an MLA IEMOCAP line ('<utt>.mp4{IEMOCAP_SEP}<text>"
                f"{IEMOCAP_SEP}<Label>', Label one of {', '.join(IEMOCAP_LABELS)})."
            )
        out.append((Path(parts[0].strip()).stem, parts[1], parts[2].strip()))
    return out


def iemocap_fbank(wav: Path) -> np.ndarray:
    """MLA's audio input: 16 kHz mono, mean removed, kaldi fbank 128 x 10 ms -> (1024, 128).

    IEMOCAP's sentence WAVs are 16 kHz already; a file at another rate is resampled with
    soxr HQ (:func:`mmbalance.media.load_audio`, as librosa.load).
    """
    from mmbalance.media import kaldi_fbank, load_audio

    wave = load_audio(wav, sample_rate=16000, mono=True)
    return kaldi_fbank(wave, 16000, target_frames=1024).numpy().astype(np.float32)


def iemocap_tokens(tokenizer: Any, text: str, length: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """MLA's text input: WordPiece ids without [CLS]/[SEP], padded/cut to ``length``.

    Returns int64 ids (1, length) and the float32 padding mask (1, length), 1.0 = padding.
    """
    enc = tokenizer(
        text, padding="max_length", truncation=True, max_length=length,
        add_special_tokens=False, return_tensors="np",
    )
    ids = enc["input_ids"][0].astype(np.int64)[None]
    mask = (1.0 - enc["attention_mask"][0].astype(np.float32))[None]
    return ids, mask


def _iemocap_lists(raw: Path, given: Mapping[str, str | None]) -> dict[str, Path]:
    lists = {}
    for split, path in given.items():
        p = Path(path) if path is not None else raw / f"my_{split}_iemo.txt"
        if path is None and not p.is_file() and (raw / "data" / p.name).is_file():
            p = raw / "data" / p.name
        if p.is_file():
            lists[split] = p
        elif path is not None or split != "dev":
            raise DataError(
                f"IEMOCAP {split} list '{p}' does not exist. MLA commits my_train_iemo.txt and "
                f"my_test_iemo.txt under its data/ folder; expected: {RAW_LAYOUT}"
            )
    return lists


def _iemocap_faces(src: Path, dst: Path, size: int) -> int:
    """Resize every face crop of one utterance to size x size (bilinear), as MLA does."""
    from PIL import Image

    from mmbalance.media import IMAGE_EXTENSIONS

    names = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not names:
        raise DataError(f"Face folder '{src}' holds no images.")
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in names:
        with Image.open(p) as im:
            im.convert("RGB").resize((size, size), Image.BILINEAR).save(tmp / f"{p.stem}.jpg", quality=95)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return len(names)


def prepare_iemocap(
    raw: Path,
    out: Path,
    *,
    train_list: str | None = None,
    test_list: str | None = None,
    dev_list: str | None = None,
    vocab: str | None = None,
    faces_dir: str | None = None,
    face_size: int = 256,
    max_tokens: int = 256,
    overwrite: bool = False,
    progress: bool = True,
) -> Report:
    """IEMOCAP -> MLA Layout A (docs/datasets/iemocap.md); only the mechanical parts.

    Raw layout: the IEMOCAP release, whose sentence WAVs ``<utt>.wav`` are found anywhere
    under RAW (``Session*/sentences/wav/<dialog>/<utt>.wav``), and MLA's split lists
    (``train_list`` / ``test_list`` / optional ``dev_list``; default ``RAW/my_{split}_iemo.txt``
    or ``RAW/data/...``). Writes the lists and ``stat_iemo.txt`` into OUT and per utterance:
    ``audio/{split}_fbank/<utt>.npy`` (1024, 128) float32 (MLA's extract_fbank recipe at
    16 kHz); with ``vocab`` (a bert-base-uncased vocab.txt or tokenizer folder, local)
    ``text_token/{split}_token/<utt>_token.npy`` int64 (1, max_tokens) and ``<utt>_pm.npy``
    float32 (1, max_tokens), 1.0 = padding; with ``faces_dir`` (one folder of face crops
    per utterance) ``visual/{split}_imgs/<utt>/*.jpg`` resized to ``face_size``. MLA's face
    crops come from an unpublished detector, so without ``faces_dir`` no visual modality is
    written (the summary says so).
    """
    raw, out = Path(raw), Path(out)
    if not raw.is_dir():
        raise DataError(f"Raw IEMOCAP folder '{raw}' does not exist.")
    lists = _iemocap_lists(raw, {"train": train_list, "test": test_list, "dev": dev_list})
    wavs = {p.stem: p for p in sorted(raw.rglob("*.wav"))}
    report = Report("iemocap", raw, out)
    tokenizer = None
    if vocab is not None:
        from mmbalance.tokenizers import bert_tokenizer

        tokenizer = bert_tokenizer(vocab, lowercase=True)
    faces = Path(faces_dir) if faces_dir is not None else None
    if faces is not None and not faces.is_dir():
        raise DataError(f"faces_dir '{faces}' is not a folder of per-utterance face crops.")
    (out).mkdir(parents=True, exist_ok=True)
    (out / "stat_iemo.txt").write_text("".join(f"{n}\n" for n in IEMOCAP_LABELS), encoding="utf-8")
    for split, path in lists.items():
        place_file(path, out / f"my_{split}_iemo.txt", "copy")
        utts = read_iemocap_list(path)
        if not any(u in wavs for u, _, _ in utts):
            raise DataError(
                f"None of the {len(utts)} utterances of '{path}' has a <utt>.wav under '{raw}'. "
                f"Expected: {RAW_LAYOUT}"
            )
        for utt, text, _ in _progress(utts, len(utts), f"iemocap {split}", progress):
            _iemocap_utterance(report, out, split, utt, text, wavs, tokenizer, faces, int(face_size), int(max_tokens), bool(overwrite))
    if tokenizer is None:
        report.notes.append("no vocab given: text_token/ not written (--set vocab=/path/to/vocab.txt)")
    if faces is None:
        report.notes.append(
            "no faces_dir given: visual/ not written (MLA's face crops come from an unpublished "
            "detector; pass --set faces_dir=DIR with one folder of crops per utterance)"
        )
    report.notes.append("audio: mono 16 kHz (WAVs at another rate resampled by soxr HQ, as librosa.load) -> kaldi fbank")
    report.paths.update(audio=str(out / "audio"), lists=str(out))
    return report


def _iemocap_utterance(
    report: Report, out: Path, split: str, utt: str, text: str, wavs: Mapping[str, Path],
    tokenizer: Any, faces: Path | None, face_size: int, max_tokens: int, overwrite: bool,
) -> None:
    try:
        fbank = out / "audio" / f"{split}_fbank" / f"{utt}.npy"
        if utt not in wavs:
            raise DataError(f"no {utt}.wav under RAW")
        if overwrite or not fbank.is_file():
            _save_npy(fbank, iemocap_fbank(wavs[utt]))
            report.written["fbank files"] += 1
        else:
            report.skipped["fbank files"] += 1
        if tokenizer is not None:
            ids, mask = iemocap_tokens(tokenizer, text, max_tokens)
            folder = out / "text_token" / f"{split}_token"
            _save_npy(folder / f"{utt}_token.npy", ids)
            _save_npy(folder / f"{utt}_pm.npy", mask)
            report.written["token files"] += 1
        if faces is not None:
            dst = out / "visual" / f"{split}_imgs" / utt
            if overwrite or not dst.is_dir():
                report.written["face images"] += _iemocap_faces(faces / utt, dst, face_size)
    except (DataError, OSError, ValueError, RuntimeError) as exc:
        report.fail(f"{split}/{utt}", f"{type(exc).__name__}: {exc}")
