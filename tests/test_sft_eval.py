"""Answer-token NLL (`loraprune.evaluation.sft`): the number the adapter benchmark and sweeps report."""

import json

import pytest
import torch

from loraprune.data import SFTRecord, tokenize_sft
from loraprune.errors import ConfigError
from loraprune.evaluation.sft import SFTEvalConfig, answer_nll, evaluate_answer_nll

RECORDS = [
    SFTRecord("How many apples?", "There are 12 apples. #### 12"),
    SFTRecord("And the dog?", "The lazy dog. #### 1"),
]


def test_answer_nll_is_the_token_weighted_mean_of_the_models_own_loss(tiny_llama, tiny_tokenizer, one_thread):
    examples = tokenize_sft(RECORDS, tiny_tokenizer, max_answer_tokens=64)
    losses, counts = [], []
    with torch.no_grad():
        for example in examples:  # one example at a time: the model's loss is the mean over its answer tokens
            ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
            losses.append(tiny_llama(input_ids=ids, labels=labels).loss.item())
            counts.append(int((labels[0, 1:] != -100).sum()))
    expected = sum(loss * count for loss, count in zip(losses, counts)) / sum(counts)
    result = answer_nll(tiny_llama, examples, pad_id=tiny_tokenizer.eos_token_id, batch_size=2)  # padded batch
    assert result["tokens"] == sum(counts)
    assert result["nll"] == pytest.approx(expected, rel=1e-5)


def test_evaluate_answer_nll_reads_the_first_problems_of_a_file(tiny_llama, tiny_tokenizer, tmp_path, one_thread):
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps({"question": r.question, "answer": r.answer}) + "\n" for r in RECORDS))
    tiny_tokenizer.pad_token = tiny_tokenizer.eos_token
    result = evaluate_answer_nll(tiny_llama, tiny_tokenizer, SFTEvalConfig(data=str(path), problems=1))
    alone = answer_nll(tiny_llama, tokenize_sft(RECORDS[:1], tiny_tokenizer), tiny_tokenizer.pad_token_id, 1)
    assert result["problems"] == 1 and result["nll"] == alone["nll"] and result["tokens"] == alone["tokens"]


def test_evaluate_answer_nll_skips_the_first_problems(tiny_llama, tiny_tokenizer, tmp_path, one_thread):
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps({"question": r.question, "answer": r.answer}) + "\n" for r in RECORDS))
    tiny_tokenizer.pad_token = tiny_tokenizer.eos_token
    result = evaluate_answer_nll(tiny_llama, tiny_tokenizer, SFTEvalConfig(data=str(path), problems=1, skip=1))
    alone = answer_nll(tiny_llama, tokenize_sft(RECORDS[1:2], tiny_tokenizer), tiny_tokenizer.pad_token_id, 1)
    assert result["skip"] == 1 and result["nll"] == alone["nll"] and result["tokens"] == alone["tokens"]
    with pytest.raises(ConfigError, match="skip must be >= 0"):
        SFTEvalConfig(skip=-1)


def test_config_refuses_no_problems():
    with pytest.raises(ConfigError, match="problems must be >= 1"):
        SFTEvalConfig(problems=0)
