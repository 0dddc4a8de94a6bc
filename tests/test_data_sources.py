"""Hugging Face datasets as `--data` (ID[:CONFIG[:SPLIT[:COLUMN]]]), their cache and offline errors, and
chat-format SFT data (the tokenizer's chat template, the loss on the assistant turns only)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

import loraprune.data as data
from loraprune.cli import main
from loraprune.data import (
    IGNORE_INDEX,
    ChatRecord,
    DatasetSource,
    load_sft_records,
    load_text,
    tokenize_chat,
    tokenize_sft,
)
from loraprune.errors import LoraPruneError

DOCUMENTS = [f"Document {i}: the quick brown fox jumps over the lazy dog {i} times." for i in range(40)]
#: a template in the usual shape: every turn opened by a header, closed by an end marker
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
CONVERSATION = ChatRecord(
    (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How many apples?"},
        {"role": "assistant", "content": "There are 12 apples."},
        {"role": "user", "content": "And dogs?"},
        {"role": "assistant", "content": "One lazy dog."},
    )
)


@pytest.fixture
def json_dataset(tmp_path: Path) -> Path:
    """A local dataset directory that `datasets.load_dataset` reads (one JSONL file per split)."""
    directory = tmp_path / "json-dataset"
    directory.mkdir()
    for split, rows in (("validation", DOCUMENTS[:20]), ("test", DOCUMENTS[20:])):
        with (directory / f"{split}.jsonl").open("w") as out:
            for text in rows:
                out.write(json.dumps({"content": text, "id": len(text)}) + "\n")
    return directory


@pytest.fixture
def saved_dataset(tmp_path: Path) -> Path:
    """A dataset written with `save_to_disk` (a DatasetDict with two splits)."""
    directory = tmp_path / "saved-dataset"
    splits = {"validation": DOCUMENTS[:20], "test": DOCUMENTS[20:]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(
        directory
    )
    return directory


def test_dataset_specs_parse_with_defaults(tmp_path):
    assert DatasetSource.parse("allenai/c4:en:validation:text") == DatasetSource("allenai/c4", "en", "validation")
    assert DatasetSource.parse("HuggingFaceFW/fineweb-edu") == DatasetSource("HuggingFaceFW/fineweb-edu")
    assert DatasetSource.parse(f"{tmp_path}::test:body") == DatasetSource(str(tmp_path), None, "test", "body")
    (tmp_path / "notes").mkdir()
    for not_a_dataset in ("wikitext", "a:b:c:d:e", str(tmp_path / "missing")):
        assert DatasetSource.parse(not_a_dataset) is None


def test_a_mistyped_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpora").mkdir()
    with pytest.raises(LoraPruneError, match="not found"):
        load_text("corpora/notes.txt")


def test_a_local_json_dataset_gives_its_column_joined(json_dataset):
    expected = data.DOCUMENT_SEPARATOR.join(DOCUMENTS[:20])
    assert load_text(f"{json_dataset}::validation:content") == expected
    assert load_text(f"{json_dataset}:::content", "valid") == expected  # 'valid' is asked for as 'validation'
    assert load_text(f"{json_dataset}:::content", "test") == data.DOCUMENT_SEPARATOR.join(DOCUMENTS[20:])
    with pytest.raises(LoraPruneError, match=r"no column 'text'; its columns are content, id"):
        load_text(f"{json_dataset}::validation")


def test_a_dataset_saved_to_disk_is_read_by_split(saved_dataset):
    assert load_text(str(saved_dataset), "test") == data.DOCUMENT_SEPARATOR.join(DOCUMENTS[20:])
    with pytest.raises(LoraPruneError, match="has no split 'train'; it has validation, test"):
        load_text(str(saved_dataset), "train")


def test_hub_datasets_are_streamed_once_then_read_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "STREAM_DOCUMENTS", 5)
    calls = []

    def fake_load_dataset(path, name, split, streaming):
        calls.append((path, name, split, streaming))
        return iter({"text": text} for text in DOCUMENTS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    expected = data.DOCUMENT_SEPARATOR.join(DOCUMENTS[:5])
    assert load_text("allenai/c4:en:validation:text") == expected
    assert load_text("allenai/c4:en:validation:text") == expected
    assert calls == [("allenai/c4", "en", "validation", True)]
    assert len(list((tmp_path / "cache" / "data").glob("*.txt"))) == 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # cached: offline is fine
    assert load_text("allenai/c4:en:validation:text") == expected


def test_offline_hub_datasets_are_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoraPruneError, match=r"not in the cache and the Hugging Face hub is offline"):
        load_text("allenai/c4:en:validation:text")
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def unreachable(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(LoraPruneError, match=r"hub cannot be reached \(offline\?\).*save_to_disk"):
        load_text("allenai/c4:en:validation:text")


def test_commands_read_a_dataset_id(tiny_model_dir, json_dataset, tmp_path, one_thread):
    """prune-model calibrates and trains on a dataset and eval scores one: the same numbers as the text itself."""
    text_file = tmp_path / "validation.txt"
    text_file.write_text(data.DOCUMENT_SEPARATOR.join(DOCUMENTS[:20]))
    reports = {}
    for name, source in (("dataset", f"{json_dataset}:::content"), ("file", str(text_file))):
        out = tmp_path / name
        argv = ["prune-model", "--model", str(tiny_model_dir), "--output", str(out), "--method", "wanda-sp"]
        argv += ["--sparsity", "0.25", "--data", source, "--seq-len", "16", "--calibration-samples", "2"]
        argv += ["--steps", "1", "--batch-size", "2", "--eval-data", f"{json_dataset}::validation:content"]
        argv += ["--eval-seq-len", "16"]
        assert main(argv) == 0
        reports[name] = json.loads((out / "loraprune_report.json").read_text())
    assert reports["dataset"]["masks"] == reports["file"]["masks"]
    assert reports["dataset"]["perplexity_after"]["perplexity"] == pytest.approx(
        reports["file"]["perplexity_after"]["perplexity"]
    )
    result = tmp_path / "eval.json"
    argv = ["eval", "--model", str(tiny_model_dir), "--data", f"{json_dataset}::validation:content", "--seq-len", "16"]
    assert main([*argv, "--no-progress", "--json", str(result)]) == 0
    assert json.loads(result.read_text())["perplexity"] == pytest.approx(
        reports["file"]["perplexity_before"]["perplexity"]
    )


# -------------------------------------------------------------------------------------- chat-format SFT


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    tiny_tokenizer.chat_template = CHAT_TEMPLATE
    return tiny_tokenizer


def _labelled_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


def test_chat_labels_are_the_assistant_turns_only(chat_tokenizer):
    example = tokenize_chat(CONVERSATION, chat_tokenizer)
    rendered = chat_tokenizer.apply_chat_template(list(CONVERSATION.messages), tokenize=False)
    assert chat_tokenizer.decode(example["input_ids"]) == rendered
    assert len(example["input_ids"]) == len(example["labels"])
    labelled = _labelled_text(chat_tokenizer, example)
    assert labelled == "There are 12 apples.</s>\nOne lazy dog.</s>\n"
    masked = chat_tokenizer.decode([t for t, lab in zip(example["input_ids"], example["labels"]) if lab == -100])
    assert "How many apples?" in masked and "Be brief." in masked and "apples." not in masked.split("?")[-1]


def test_chat_examples_are_cut_at_max_answer_tokens(chat_tokenizer):
    full = tokenize_chat(CONVERSATION, chat_tokenizer)
    labelled = sum(label != IGNORE_INDEX for label in full["labels"])
    cut = tokenize_chat(CONVERSATION, chat_tokenizer, max_answer_tokens=labelled - 3)
    assert sum(label != IGNORE_INDEX for label in cut["labels"]) == labelled - 3
    assert cut["input_ids"] == full["input_ids"][: len(cut["input_ids"])] and cut["labels"][-1] != IGNORE_INDEX


def test_chat_data_needs_a_chat_template(tiny_tokenizer):
    tiny_tokenizer.chat_template = None
    with pytest.raises(LoraPruneError, match="needs a tokenizer with a chat template"):
        tokenize_sft([CONVERSATION], tiny_tokenizer)


def test_chat_jsonl_is_read_beside_the_gsm8k_format(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": list(CONVERSATION.messages)}, {"question": "1+1?", "answer": "#### 2"}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    records = load_sft_records(str(path))
    assert records[0] == CONVERSATION and records[1].answer == "#### 2"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(LoraPruneError, match=r"chat.jsonl:1: .*no assistant turn"):
        load_sft_records(str(path))
    path.write_text(json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n")
    with pytest.raises(LoraPruneError, match=r"chat.jsonl:1: .*role in"):
        load_sft_records(str(path))


def test_the_default_models_template_labels_its_assistant_turns(default_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    example = tokenize_chat(CONVERSATION, tokenizer)
    assert _labelled_text(tokenizer, example) == "There are 12 apples.<|im_end|>\nOne lazy dog.<|im_end|>\n"


def test_prune_adapter_trains_on_chat_jsonl(tiny_model_dir, chat_tokenizer, tmp_path, one_thread):
    chat_tokenizer.save_pretrained(tiny_model_dir)  # the tiny model's tokenizer, with a chat template
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": list(CONVERSATION.messages)}) for _ in range(4)) + "\n")
    out = tmp_path / "adapter"
    argv = ["prune-adapter", "--model", str(tiny_model_dir), "--data", str(path), "--r0", "4", "--rank", "2"]
    argv += ["--steps", "2", "--batch-size", "2", "--prune-every", "1", "--output", str(out), "--device", "cpu"]
    assert main(argv) == 0
    report = json.loads((out / "loraprune_report.json").read_text())
    assert report["settings"]["run"]["data"] == str(path) and report["total_rank_after"] == 2 * 7 * 2


def test_a_text_is_tokenised_once_per_tokenizer(tiny_tokenizer, monkeypatch):
    calls = []
    real_call = type(tiny_tokenizer).__call__

    def counted(self, *args, **kwargs):
        calls.append(args[0][:10])
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_tokenizer), "__call__", counted)
    text = " ".join(DOCUMENTS)
    first = data.tokenize_text(tiny_tokenizer, text)
    first[:] = 0  # a copy: changing it changes nothing kept
    again = data.tokenize_text(tiny_tokenizer, text)
    assert len(calls) == 1 and int(again.count_nonzero()) > 0
    assert torch.equal(again, torch.tensor(real_call(tiny_tokenizer, text, add_special_tokens=False)["input_ids"]))
    data.tokenize_text(tiny_tokenizer, "another text")
    data.tokenize_text(tiny_tokenizer, "a third text")  # the first text is forgotten (two are kept)
    data.tokenize_text(tiny_tokenizer, text)
    assert len(calls) == 4
