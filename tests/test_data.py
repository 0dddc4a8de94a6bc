"""Corpora, windows, calibration batches and the GSM8K-style SFT pipeline."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from loraprune.data import (
    IGNORE_INDEX,
    SFTCollator,
    SFTRecord,
    calibration_batches,
    final_answer,
    format_prompt,
    load_sft_records,
    load_text,
    resolve_data_dir,
    token_windows,
    tokenize_sft,
)
from loraprune.errors import LoraPruneError

TEXT = "The quick brown fox jumps over the lazy dog.\n" * 40


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def test_wikitext2_test_is_the_raw_file_with_universal_newlines(data_dir):
    text = load_text("wikitext2")
    assert resolve_data_dir() == data_dir
    assert len(text) == 1_285_622 and "\r" not in text
    assert text.startswith(" = Robert Boulter = \n Robert Boulter is an English film")


def test_wikitext2_valid_falls_back_to_the_tokenized_variant(data_dir):
    text = load_text("wikitext2", "validation")
    assert text == (data_dir / "wikitext2" / "wiki.valid.tokens").read_text()


def test_missing_text_file_names_the_path(tmp_path):
    with pytest.raises(LoraPruneError, match=f"neither a known corpus.*{re.escape(str(tmp_path / 'nope.txt'))}"):
        load_text(str(tmp_path / "nope.txt"))


def test_hub_fallback_without_datasets_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPRUNE_DATA_DIR", str(tmp_path))  # no local copy there
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(LoraPruneError, match=r"pip install 'loraprune\[data\]'"):
        load_text("wikitext2")


def test_token_windows_are_consecutive_slices_of_one_tokenisation(tiny_tokenizer):
    ids = tiny_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    windows = token_windows(tiny_tokenizer, TEXT, seq_len=16)
    assert windows.dtype == torch.long and windows.shape == (len(ids) // 16, 16)
    assert windows.flatten().tolist() == ids[: windows.numel()]
    limited = token_windows(tiny_tokenizer, TEXT, seq_len=16, max_tokens=70)
    assert limited.shape == (4, 16) and torch.equal(limited, windows[:4])


def test_calibration_batches_are_seeded_random_windows(tiny_tokenizer, text_file):
    ids = tiny_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    batch = calibration_batches(tiny_tokenizer, str(text_file), num_samples=6, seq_len=20, seed=3)
    assert batch.shape == (6, 20) and batch.dtype == torch.long
    assert torch.equal(batch, calibration_batches(tiny_tokenizer, str(text_file), 6, 20, seed=3))
    assert not torch.equal(batch, calibration_batches(tiny_tokenizer, str(text_file), 6, 20, seed=4))
    starts = [next(s for s in range(len(ids) - 19) if ids[s : s + 20] == row) for row in batch.tolist()]
    assert len(set(starts)) > 1  # random offsets, not a fixed window


def test_calibration_text_shorter_than_a_window_is_an_error(tiny_tokenizer, tmp_path):
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(LoraPruneError, match="fewer than seq_len"):
        calibration_batches(tiny_tokenizer, str(tmp_path / "short.txt"), 2, 64, seed=0)


def test_gsm8k_records_come_from_the_local_copy(data_dir):
    records = load_sft_records("gsm8k", "test", limit=3)
    first = json.loads((data_dir / "gsm8k" / "test.jsonl").open().readline())
    assert len(records) == 3 and records[0] == SFTRecord(first["question"], first["answer"])
    assert final_answer(records[0].answer) == "18"


def test_malformed_jsonl_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"question": "q", "answer": "a #### 1"}\n\n{"question": "q2"}\n')
    with pytest.raises(LoraPruneError, match=re.escape(f"{path}:3: not a JSON object with 'question' and 'answer'")):
        load_sft_records(str(path))
    path.write_text('{"question": "q", "answer": "a"}\n{oops\n')
    with pytest.raises(LoraPruneError, match=re.escape(f"{path}:2:")):
        load_sft_records(str(path))
    assert load_sft_records(str(path), limit=1) == [SFTRecord("q", "a")]  # stops before the bad line


def test_missing_sft_file_is_an_error(tmp_path):
    with pytest.raises(LoraPruneError, match="neither 'gsm8k' nor an existing JSONL file"):
        load_sft_records(str(tmp_path / "missing.jsonl"))


def test_sft_labels_mask_the_prompt_and_end_with_eos(tiny_tokenizer):
    record = SFTRecord("How many apples?", "There are 12 apples.\n#### 12")
    (example,) = tokenize_sft([record], tiny_tokenizer)
    prompt = tiny_tokenizer(format_prompt(record.question), add_special_tokens=False)["input_ids"]
    answer = tiny_tokenizer(record.answer, add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == prompt + answer + [tiny_tokenizer.eos_token_id]
    assert example["labels"] == [IGNORE_INDEX] * len(prompt) + answer + [tiny_tokenizer.eos_token_id]
    (cut,) = tokenize_sft([record], tiny_tokenizer, max_answer_tokens=5)
    assert cut["input_ids"] == prompt + answer[:5] and cut["labels"][len(prompt) :] == answer[:5]


def test_format_prompt():
    assert format_prompt(" What is 2+2? ") == "Question: What is 2+2?\nAnswer: "


def test_collator_pads_right_and_masks_padding():
    batch = SFTCollator(pad_token_id=0)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so 5 + 7 = 12\n#### 12", "12"),
        ("#### 1,234", "1234"),
        ("#### -3.50 dollars", "-3.5"),
        ("#### $7.00", "7"),
        ("the answer is 12", None),
        ("#### none", None),
    ],
)
def test_final_answer(text, expected):
    assert final_answer(text) == expected
