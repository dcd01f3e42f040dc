"""Local-only BERT / CLIP tokenizers (mmbalance.tokenizers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmbalance.errors import ConfigError
from mmbalance.tokenizers import (
    PadTokens,
    bert_tokenizer,
    clip_tokenizer,
    encode_texts,
    pad_token_dicts,
    read_wordpiece_vocab,
    tokenizer_for_backbone,
)

BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat",
              "love", "mondays", "##s", "great", "not"]


def write_bert_vocab(folder: Path) -> Path:
    """A tiny WordPiece vocabulary in bert-base-uncased's vocab.txt format."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(BERT_VOCAB) + "\n", encoding="utf-8")
    return path


def write_clip_vocab(folder: Path) -> Path:
    """A tiny byte-level BPE vocabulary (vocab.json + merges.txt) that spells cat, dog, sat."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "acdgost":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("s", "a"), ("sa", "t</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
    )
    return folder


def test_bert_from_vocab_file_knows_real_words(tmp_path: Path) -> None:
    tok = bert_tokenizer(write_bert_vocab(tmp_path))
    assert tok.tokenize("The Cats sat on the MAT") == ["the", "cat", "##s", "sat", "on", "the", "mat"]
    assert tok.convert_tokens_to_ids(["cat", "mat"]) == [6, 9]  # id = line number
    enc = tok("the cat")
    assert enc["input_ids"] == [2, 5, 6, 3]  # [CLS] the cat [SEP]
    assert "[UNK]" not in tok.convert_ids_to_tokens(enc["input_ids"])
    assert tok.tokenize("zebra") == ["[UNK]"]  # unknown words still map to [UNK]
    assert tok.pad_token_id == 0


def test_bert_from_folder_and_saved_tokenizer(tmp_path: Path) -> None:
    write_bert_vocab(tmp_path / "plain")
    tok = bert_tokenizer(tmp_path / "plain")
    assert tok.tokenize("love mondays") == ["love", "mondays"]
    tok.save_pretrained(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "tokenizer.json").is_file()
    again = bert_tokenizer(tmp_path / "saved")
    assert again("the cat")["input_ids"] == [2, 5, 6, 3]


def test_read_wordpiece_vocab_ids_are_line_numbers(tmp_path: Path) -> None:
    vocab = read_wordpiece_vocab(write_bert_vocab(tmp_path))
    assert vocab["[PAD]"] == 0 and vocab["##s"] == 12 and len(vocab) == len(BERT_VOCAB)


@pytest.mark.parametrize("path", [None, "", "does/not/exist/vocab.txt"])
def test_bert_missing_path_is_a_config_error(tmp_path: Path, path: str | None) -> None:
    with pytest.raises(ConfigError, match="tokenizer"):
        bert_tokenizer(path)


def test_bert_rejects_non_vocab_files(tmp_path: Path) -> None:
    bad = tmp_path / "vocab.txt"
    bad.write_text("hello\nworld\n")
    with pytest.raises(ConfigError, match=r"\[UNK\]"):
        bert_tokenizer(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither tokenizer.json nor vocab.txt"):
        bert_tokenizer(tmp_path / "empty")


def test_clip_from_vocab_and_merges(tmp_path: Path) -> None:
    folder = write_clip_vocab(tmp_path / "clip")
    vocab = json.loads((folder / "vocab.json").read_text())
    for tok in (clip_tokenizer(folder), clip_tokenizer(folder / "vocab.json")):
        assert tok.tokenize("Cat DOG sat") == ["cat</w>", "dog</w>", "sat</w>"]
        ids = tok("cat dog")["input_ids"]
        assert ids == [0, vocab["cat</w>"], vocab["dog</w>"], 1]  # <|startoftext|> ... <|endoftext|>
        assert tok.pad_token_id == 1
    tok.save_pretrained(str(tmp_path / "saved"))
    assert clip_tokenizer(tmp_path / "saved")("cat")["input_ids"] == [0, vocab["cat</w>"], 1]


def test_clip_needs_merges(tmp_path: Path) -> None:
    folder = write_clip_vocab(tmp_path / "clip")
    (folder / "merges.txt").unlink()
    with pytest.raises(ConfigError, match="merges.txt"):
        clip_tokenizer(folder)


def test_tokenizer_for_backbone_picks_by_name(tmp_path: Path) -> None:
    bert = tokenizer_for_backbone("bert", write_bert_vocab(tmp_path / "b"))
    clip = tokenizer_for_backbone("clip_text", write_clip_vocab(tmp_path / "c"))
    assert bert.tokenize("cat") == ["cat"]
    assert clip.tokenize("cat") == ["cat</w>"]


def test_encode_texts_and_padding_collate(tmp_path: Path) -> None:
    tok = bert_tokenizer(write_bert_vocab(tmp_path))
    short, long = encode_texts(tok, ["the cat", "the cat sat on the mat"], max_length=6)
    assert short["input_ids"].tolist() == [2, 5, 6, 3]
    assert long["input_ids"].tolist() == [2, 5, 6, 7, 8, 3]  # truncated, [SEP] kept
    assert short["input_ids"].dtype == torch.long and short["attention_mask"].dtype == torch.long
    fixed = encode_texts(tok, ["the cat"], max_length=6, pad_to_max=True)[0]
    assert fixed["input_ids"].tolist() == [2, 5, 6, 3, 0, 0]
    assert fixed["attention_mask"].tolist() == [1, 1, 1, 1, 0, 0]
    batch = PadTokens({"text": 0})(
        [{"text": short, "label": 1, "index": 0}, {"text": long, "label": 0, "index": 1}]
    )
    assert batch["text"]["input_ids"].tolist() == [[2, 5, 6, 3, 0, 0], [2, 5, 6, 7, 8, 3]]
    assert batch["text"]["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert batch["label"].tolist() == [1, 0] and batch["index"].tolist() == [0, 1]
    padded = pad_token_dicts([short], pad_id=7)
    assert padded["input_ids"].shape == (1, 4)
