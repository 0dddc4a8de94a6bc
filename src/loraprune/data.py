"""Corpora for perplexity and calibration, and supervised fine-tuning (SFT) sets.

Named sets are read from a local copy when ``$LORAPRUNE_DATA_DIR`` holds one (machines without
internet) and from the Hugging Face hub otherwise; any local text or JSONL file works too.
``datasets`` is an optional dependency, imported only when the hub is needed.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from loraprune.errors import LoraPruneError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt and padding)

# Local file names per split, best first: the raw text, else the tokenized variant (`<unk>` for rare
# words), which is fine for calibration but never for evaluation.
_WIKITEXT2_FILES = {
    "test": ("wiki.test.raw", "wiki.test.tokens"),
    "valid": ("wiki.valid.raw", "wiki.valid.tokens"),
    "train": ("wiki.train.raw", "wiki.train.tokens"),
}
_SPLIT_ALIASES = {"validation": "valid", "val": "valid", "dev": "valid"}
CORPORA = ("wikitext2", "ptb")


def resolve_data_dir() -> Path | None:
    """The local data directory named by ``$LORAPRUNE_DATA_DIR``, or None."""
    value = os.environ.get("LORAPRUNE_DATA_DIR")
    return Path(value).expanduser() if value else None


def _local_file(*parts: str) -> Path | None:
    data_dir = resolve_data_dir()
    if data_dir is None:
        return None
    path = data_dir.joinpath(*parts)
    return path if path.is_file() else None


def _normal_split(split: str) -> str:
    return _SPLIT_ALIASES.get(split, split)


def _load_hub_dataset(path: str, name: str | None, split: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise LoraPruneError(
            f"reading {path!r} from the Hugging Face hub needs the 'datasets' package: "
            "pip install 'loraprune[data]' (or point LORAPRUNE_DATA_DIR at a local copy, or pass a file)"
        ) from None
    try:
        return datasets.load_dataset(path, name, split=split)
    except Exception as error:  # the hub client raises many unrelated types (network, auth, schema)
        raise LoraPruneError(
            f"could not load {path!r} ({name}, split {split}) from the hub: {error}. Set LORAPRUNE_DATA_DIR "
            "to a directory holding a local copy, or pass the path of a text/JSONL file"
        ) from error


def load_text(name_or_path: str, split: str = "test") -> str:
    """The text of corpus `name_or_path` (``wikitext2``, ``ptb``) or of a local text file.

    WikiText-2 is the raw variant, joined as it is distributed (the rows of the hub set joined
    with "" equal the raw file read with universal newlines).
    """
    split = _normal_split(split)
    if name_or_path == "wikitext2":
        for file_name in _WIKITEXT2_FILES.get(split, ()):
            path = _local_file("wikitext2", file_name)
            if path is not None:
                logger.debug("reading wikitext2 %s split from %s", split, path)
                return path.read_text(encoding="utf-8")
        hub_split = "validation" if split == "valid" else split
        return "".join(_load_hub_dataset("wikitext", "wikitext-2-raw-v1", hub_split)["text"])
    if name_or_path == "ptb":
        hub_split = "validation" if split == "valid" else split
        return "\n".join(_load_hub_dataset("ptb_text_only", "penn_treebank", hub_split)["sentence"])
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise LoraPruneError(
            f"data {name_or_path!r} is neither a known corpus ({', '.join(CORPORA)}) nor an existing text file "
            f"({path.resolve()} not found)"
        )
    return path.read_text(encoding="utf-8")


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.LongTensor:
    """Token ids of the whole `text`, tokenised once, without special tokens (no BOS)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer puts a BOS token in front of a text it encodes with special tokens."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def token_windows(
    tokenizer: PreTrainedTokenizerBase, text: str, seq_len: int, max_tokens: int | None = None
) -> torch.LongTensor:
    """Non-overlapping windows ``[n, seq_len]`` over the first `max_tokens` tokens of `text`.

    The text is tokenised once; the incomplete tail window is dropped.
    """
    if seq_len < 1:
        raise LoraPruneError(f"seq_len must be positive, got {seq_len}")
    ids = tokenize_text(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    count = len(ids) // seq_len
    return ids[: count * seq_len].view(count, seq_len)


def calibration_batches(
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    num_samples: int,
    seq_len: int,
    seed: int,
    *,
    split: str = "valid",
) -> torch.LongTensor:
    """`num_samples` windows of `seq_len` tokens at random offsets of `source`; the same for a seed.

    `source` is a corpus name (its `split`; WikiText-2's validation split by default, which is not
    the evaluation split) or a text file.
    """
    if num_samples < 1 or seq_len < 1:
        raise LoraPruneError(f"num_samples and seq_len must be positive, got {num_samples} and {seq_len}")
    ids = tokenize_text(tokenizer, load_text(source, split))
    if len(ids) < seq_len:
        raise LoraPruneError(f"calibration text {source!r} has {len(ids)} tokens, fewer than seq_len {seq_len}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - seq_len + 1, size=num_samples)
    return torch.stack([ids[start : start + seq_len] for start in starts.tolist()])


# ---------------------------------------------------------------------------- supervised fine-tuning


@dataclass(frozen=True)
class SFTRecord:
    """One problem of a GSM8K-style set: the answer ends with ``#### <final number>``."""

    question: str
    answer: str


def _read_jsonl_records(path: Path) -> Iterator[SFTRecord]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                yield SFTRecord(question=str(row["question"]), answer=str(row["answer"]))
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise LoraPruneError(
                    f"{path}:{number}: not a JSON object with 'question' and 'answer' ({error!r})"
                ) from error


def load_sft_records(name_or_path: str, split: str = "train", limit: int | None = None) -> list[SFTRecord]:
    """The records of ``gsm8k`` (its `split`) or of a JSONL file, the first `limit` of them if given."""
    if name_or_path == "gsm8k":
        path = _local_file("gsm8k", f"{split}.jsonl")
        if path is None:
            rows = _load_hub_dataset("openai/gsm8k", "main", split)
            count = len(rows) if limit is None else min(limit, len(rows))
            return [SFTRecord(rows[i]["question"], rows[i]["answer"]) for i in range(count)]
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise LoraPruneError(
                f"SFT data {name_or_path!r} is neither 'gsm8k' nor an existing JSONL file ({path.resolve()} not found)"
            )
    return list(itertools.islice(_read_jsonl_records(path), limit))


def format_prompt(question: str) -> str:
    """The SFT prompt; the model learns (and is asked) to continue it with the answer."""
    return f"Question: {question.strip()}\nAnswer: "


def tokenize_sft(
    records: Sequence[SFTRecord], tokenizer: PreTrainedTokenizerBase, max_answer_tokens: int = 256
) -> list[dict[str, list[int]]]:
    """``input_ids`` = prompt + answer + EOS, ``labels`` = the same with the prompt masked (-100).

    Prompt and answer are tokenised separately, so the prompt tokens are exactly those a model
    sees when asked the question at inference. The answer (EOS included) is cut at
    `max_answer_tokens`.
    """
    if max_answer_tokens < 1:
        raise LoraPruneError(f"max_answer_tokens must be positive, got {max_answer_tokens}")
    if tokenizer.eos_token_id is None:
        raise LoraPruneError("the tokenizer has no EOS token to end the answers with")
    examples = []
    for record in records:
        prompt = tokenizer(format_prompt(record.question), add_special_tokens=False)["input_ids"]
        answer = tokenizer(record.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        answer = answer[:max_answer_tokens]
        examples.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
    return examples


@dataclass
class SFTCollator:
    """Pads a batch of `tokenize_sft` examples on the right: ids with `pad_token_id`, labels with -100."""

    pad_token_id: int

    def __call__(self, examples: Sequence[dict[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(example["input_ids"]) for example in examples)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            input_ids[row, :length] = torch.as_tensor(example["input_ids"])
            labels[row, :length] = torch.as_tensor(example["labels"])
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


_FINAL_ANSWER = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")


def final_answer(text: str) -> str | None:
    """The number after ``#### `` in `text`, normalised (no commas, no trailing ``.0``), or None."""
    match = _FINAL_ANSWER.search(text)
    if match is None:
        return None
    number = match.group(1).replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number
