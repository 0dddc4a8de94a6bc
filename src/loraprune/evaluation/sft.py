"""Answer-token NLL on a supervised (GSM8K-style) test set: the quality measure of adapter fine-tuning.

Each problem is the SFT prompt `Question: ...\\nAnswer: ` followed by its answer and EOS, tokenised
exactly as for training (`loraprune.data.tokenize_sft`); only the answer tokens are scored, and the
mean is token-weighted over all answer tokens of the evaluated problems.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from loraprune.config import check, option
from loraprune.data import SFTCollator, load_sft_records, tokenize_sft


@dataclass
class SFTEvalConfig:
    """Which SFT test problems the answer-token NLL is measured on."""

    data: str = option("gsm8k", help="test data: 'gsm8k' (its test split) or a JSONL file of {question, answer}")
    problems: int = option(64, help="evaluate on N problems (file order), after the first `skip`")
    skip: int = option(
        0, help="leave out the first N problems (e.g. 64: a second set for confirming choices made on the first 64)"
    )
    max_answer_tokens: int = option(256, help="answers are cut at this many tokens (EOS included), as in training")
    batch_size: int = option(8, help="problems per forward pass")

    def __post_init__(self) -> None:
        check(self.problems >= 1, f"problems must be >= 1, got {self.problems}")
        check(self.skip >= 0, f"skip must be >= 0, got {self.skip}")
        check(self.max_answer_tokens >= 1, f"max_answer_tokens must be >= 1, got {self.max_answer_tokens}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


@torch.no_grad()
def answer_nll(model: torch.nn.Module, examples: list[dict], pad_id: int, batch_size: int) -> dict[str, float]:
    """Mean NLL (nats) over all answer tokens (labels != -100) of `examples`, token-weighted."""
    collate = SFTCollator(pad_id)
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="sum"
        )
        total += float(losses)
        count += int((labels != -100).sum())
    return {"nll": total / count, "tokens": count}


def evaluate_answer_nll(model: torch.nn.Module, tokenizer: Any, config: SFTEvalConfig) -> dict[str, Any]:
    """`answer_nll` on `config.problems` test problems after the first `config.skip`, with the settings used."""
    records = load_sft_records(config.data, split="test", limit=config.skip + config.problems)[config.skip :]
    examples = tokenize_sft(records, tokenizer, config.max_answer_tokens)
    model.eval()
    result = answer_nll(model, examples, tokenizer.pad_token_id, config.batch_size)
    return {
        **result,
        "problems": len(records),
        "skip": config.skip,
        "data": config.data,
        "max_answer_tokens": config.max_answer_tokens,
    }
