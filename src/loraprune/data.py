"""Corpora for perplexity and calibration, and supervised fine-tuning (SFT) sets.

Named sets are read from a local copy when ``$LORAPRUNE_DATA_DIR`` holds one (machines without
internet) and from the Hugging Face hub otherwise; any local text or JSONL file works too, and
so does any Hugging Face dataset with a text column, named ``ID[:CONFIG[:SPLIT[:COLUMN]]]``
(e.g. ``allenai/c4:en:validation:text``; a local directory works as ID). Hub datasets are
streamed: the first `STREAM_DOCUMENTS` documents, joined, are kept in the cache
(``$LORAPRUNE_CACHE/data``), so later runs read them offline. SFT data is GSM8K-style
(``question``/``answer``) or chat-format (``messages``, rendered with the tokenizer's chat template,
the loss on the assistant turns only). ``datasets`` is an optional dependency, imported only when
needed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from loraprune.errors import LoraPruneError
from loraprune.safety.user_errors import read_text_file

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


#: documents streamed from a hub dataset (C4's validation documents average ~2,000 characters: ~20M)
STREAM_DOCUMENTS = 10_000
#: how documents of a dataset are joined into one text
DOCUMENT_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class DatasetSource:
    """A Hugging Face dataset named ``ID[:CONFIG[:SPLIT[:COLUMN]]]``: hub id (or local directory), config,
    split (None: the split the caller asks for) and text column; empty parts take their default."""

    path: str
    name: str | None = None
    split: str | None = None
    column: str = "text"

    @classmethod
    def parse(cls, spec: str) -> DatasetSource | None:
        """The dataset `spec` names, or None when it is not of that form (a hub id or an existing directory)."""
        parts = spec.split(":")
        local = Path(parts[0]).expanduser().is_dir()
        hub = bool(_HUB_ID.match(parts[0])) and not Path(parts[0].split("/")[0]).is_dir()  # not a mistyped path
        if len(parts) > 4 or not (local or hub):
            return None
        parts += [""] * (4 - len(parts))
        return cls(parts[0], parts[1] or None, parts[2] or None, parts[3] or "text")

    @property
    def is_local(self) -> bool:
        return Path(self.path).expanduser().is_dir()


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_offline() -> bool:
    """Whether the Hugging Face clients are told to stay offline (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)."""
    return any(
        os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _is_connection_error(error: BaseException) -> bool:
    """Whether `error` (or what caused it) says the hub could not be reached."""
    while error is not None:
        name = type(error).__name__
        if any(word in name for word in ("Connection", "Offline", "Timeout", "LocalEntryNotFound")):
            return True
        if any(
            word in str(error) for word in ("offline", "Failed to resolve", "Max retries", "Network is unreachable")
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def _offline_error(source: DatasetSource, reason: str) -> LoraPruneError:
    return LoraPruneError(
        f"cannot stream dataset {source.path!r}: {reason}. On a machine with internet run the command once (the "
        f"first {STREAM_DOCUMENTS:,} documents are then cached), or save the dataset with "
        "datasets' save_to_disk and pass its directory, or pass a text file"
    )


def _dataset_rows(source: DatasetSource, split: str) -> Iterator[dict[str, Any]]:
    """The rows of `split` of `source`: read from a `save_to_disk` directory, else streamed with `load_dataset`."""
    try:
        import datasets
    except ImportError:
        raise LoraPruneError(
            f"reading dataset {source.path!r} needs the 'datasets' package: pip install 'loraprune[data]'"
        ) from None
    directory = Path(source.path).expanduser()
    if (directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file():
        saved = datasets.load_from_disk(str(directory))
        if isinstance(saved, datasets.DatasetDict):
            if split not in saved:
                raise LoraPruneError(f"dataset {source.path} has no split {split!r}; it has {', '.join(saved)}")
            saved = saved[split]
        return iter(saved)
    if not source.is_local and _hub_offline():
        raise _offline_error(source, "it is not in the cache and the Hugging Face hub is offline (HF_HUB_OFFLINE)")
    return iter(datasets.load_dataset(source.path, source.name, split=split, streaming=True))


def _stream_text(source: DatasetSource, split: str) -> str:
    """The first `STREAM_DOCUMENTS` texts of column `source.column` of `split`, joined."""
    texts = []
    try:
        for row in itertools.islice(_dataset_rows(source, split), STREAM_DOCUMENTS):
            if source.column not in row:
                raise LoraPruneError(
                    f"dataset {source.path} has no column {source.column!r}; its columns are {', '.join(row)} "
                    "(name one as ID:CONFIG:SPLIT:COLUMN)"
                )
            texts.append(str(row[source.column]))
    except LoraPruneError:
        raise
    except Exception as error:  # datasets and the hub client raise many unrelated types (network, schema, auth)
        if _is_connection_error(error):
            raise _offline_error(source, f"the Hugging Face hub cannot be reached (offline?): {error}") from error
        raise LoraPruneError(
            f"could not read dataset {source.path!r} ({source.name}, split {split}): {error}"
        ) from error
    if not texts:
        raise LoraPruneError(f"dataset {source.path} (split {split}) has no rows")
    return DOCUMENT_SEPARATOR.join(texts)


def _text_cache_file(source: DatasetSource, split: str) -> Path:
    from loraprune.models import cache_dir

    key = json.dumps([source.path, source.name, split, source.column, STREAM_DOCUMENTS])
    slug = re.sub(r"[^\w.-]+", "_", f"{source.path}-{source.name}-{split}-{source.column}")
    return cache_dir() / "data" / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.txt"


def load_dataset_text(source: DatasetSource, split: str) -> str:
    """The text of a Hugging Face dataset: its first `STREAM_DOCUMENTS` documents, joined.

    `source.split` overrides `split` (hub names: 'valid' is asked for as 'validation'). Hub
    datasets are streamed once and cached as text; local directories are read each time.
    """
    split = source.split or ("validation" if split == "valid" else split)
    if source.is_local:
        return _stream_text(source, split)
    cached = _text_cache_file(source, split)
    if cached.is_file():
        logger.debug("reading %s (%s) from the cache %s", source.path, split, cached)
        return cached.read_text(encoding="utf-8")
    logger.info("streaming %s (%s, split %s, column %s)", source.path, source.name, split, source.column)
    text = _stream_text(source, split)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=cached.parent, delete=False, suffix=".tmp") as out:
        out.write(text)
    os.replace(out.name, cached)
    return text


def load_text(name_or_path: str, split: str = "test") -> str:
    """The text of corpus `name_or_path` (``wikitext2``, ``ptb``), of a local text file, or of a dataset.

    WikiText-2 is the raw variant, joined as it is distributed (the rows of the hub set joined
    with "" equal the raw file read with universal newlines). A dataset is named
    ``ID[:CONFIG[:SPLIT[:COLUMN]]]`` (`DatasetSource`, `load_dataset_text`).
    """
    split = _normal_split(split)
    if name_or_path == "wikitext2":
        for file_name in _WIKITEXT2_FILES.get(split, ()):
            path = _local_file("wikitext2", file_name)
            if path is not None:
                logger.debug("reading wikitext2 %s split from %s", split, path)
                return read_text_file(path, "data file")
        hub_split = "validation" if split == "valid" else split
        return "".join(_load_hub_dataset("wikitext", "wikitext-2-raw-v1", hub_split)["text"])
    if name_or_path == "ptb":
        hub_split = "validation" if split == "valid" else split
        return "\n".join(_load_hub_dataset("ptb_text_only", "penn_treebank", hub_split)["sentence"])
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return read_text_file(path, "data file")
    source = DatasetSource.parse(name_or_path)
    if source is not None:
        return load_dataset_text(source, split)
    raise LoraPruneError(
        f"data {name_or_path!r} is neither a known corpus ({', '.join(CORPORA)}), nor an existing text file "
        f"({path.resolve()} not found), nor a dataset ID[:CONFIG[:SPLIT[:COLUMN]]] (e.g. allenai/c4:en:validation:text)"
    )


#: per tokenizer (while it lives), the token ids of the last `_TOKENIZED_TEXTS` texts it tokenised
_TOKENIZED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOKENIZED_TEXTS = 2


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.LongTensor:
    """Token ids of the whole `text`, tokenised once, without special tokens (no BOS).

    The ids of the last texts a tokenizer tokenised are kept (`_TOKENIZED`), so a run that
    calibrates and trains on the same text (a streamed dataset: millions of tokens) tokenises it
    once; each call gets its own copy.
    """
    key = hashlib.sha256(text.encode("utf-8")).digest()
    known = _TOKENIZED.setdefault(tokenizer, {})
    if key not in known:
        while len(known) >= _TOKENIZED_TEXTS:
            known.pop(next(iter(known)))
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        known[key] = torch.tensor(ids, dtype=torch.long)
    return known[key].clone()


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


@dataclass(frozen=True)
class ChatRecord:
    """One conversation of a chat-format set: ``messages`` of ``{role, content}``, with at least one
    assistant turn; the model learns the assistant turns."""

    messages: tuple[dict[str, str], ...]


CHAT_ROLES = ("system", "user", "assistant", "tool")


def _chat_record(row: Any) -> ChatRecord:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise TypeError("'messages' must be a non-empty list")
    parsed = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES or not isinstance(content, str):
            raise TypeError(f"a message needs a role in {CHAT_ROLES} and a string content, got {message!r}")
        parsed.append({"role": role, "content": content})
    if not any(message["role"] == "assistant" for message in parsed):
        raise TypeError("the conversation has no assistant turn to learn")
    return ChatRecord(tuple(parsed))


def _read_jsonl_records(path: Path) -> Iterator[SFTRecord | ChatRecord]:
    for number, line in enumerate(read_text_file(path, "SFT data file").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if isinstance(row, dict) and "messages" in row:
                yield _chat_record(row)
            else:
                yield SFTRecord(question=str(row["question"]), answer=str(row["answer"]))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise LoraPruneError(
                f"{path}:{number}: not a JSON object with 'question' and 'answer', or with 'messages' "
                f"[{{role, content}}, ...] ({error!r})"
            ) from error


def load_sft_records(name_or_path: str, split: str = "train", limit: int | None = None) -> list[SFTRecord | ChatRecord]:
    """The records of ``gsm8k`` (its `split`) or of a JSONL file, the first `limit` of them if given.

    A JSONL file holds GSM8K-style ``{question, answer}`` rows or chat-format ``{messages}`` rows.
    """
    if name_or_path == "gsm8k":
        path = _local_file("gsm8k", f"{split}.jsonl")
        if path is None:
            rows = _load_hub_dataset("openai/gsm8k", "main", split)
            count = len(rows) if limit is None else min(limit, len(rows))
            return [SFTRecord(rows[i]["question"], rows[i]["answer"]) for i in range(count)]
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise LoraPruneError(
                f"SFT data {name_or_path!r} is neither 'gsm8k' nor an existing JSONL file ({path.resolve()} not found)"
            )
    return list(itertools.islice(_read_jsonl_records(path), limit))


def format_prompt(question: str) -> str:
    """The SFT prompt; the model learns (and is asked) to continue it with the answer."""
    return f"Question: {question.strip()}\nAnswer: "


def _render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], prompt: bool) -> str:
    """`messages` rendered by the tokenizer's chat template (`prompt`: with the assistant's turn opened)."""
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=prompt)
    except Exception as error:  # jinja2 template errors (e.g. a template that refuses a role order)
        raise LoraPruneError(f"the tokenizer's chat template cannot render a conversation: {error}") from error


def tokenize_chat(
    record: ChatRecord, tokenizer: PreTrainedTokenizerBase, max_answer_tokens: int = 256
) -> dict[str, list[int]]:
    """``input_ids`` of the conversation as the chat template renders it, ``labels`` the assistant turns only.

    An assistant turn is the text the template adds for it after the prompt that opens it
    (`add_generation_prompt`), end-of-turn marker included, so the model learns to stop. The
    whole conversation is tokenised once; a token is labelled when its characters overlap an
    assistant turn. The example is cut where `max_answer_tokens` labelled tokens are reached.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise LoraPruneError(
            "chat-format data (messages) needs a tokenizer with a chat template, and this model's has none; "
            "use an instruct model, or GSM8K-style {question, answer} records"
        )
    text = _render_chat(tokenizer, record.messages, prompt=False)
    spans = []
    for turn, message in enumerate(record.messages):
        if message["role"] != "assistant":
            continue
        opened = _render_chat(tokenizer, record.messages[:turn], prompt=True)
        through = _render_chat(tokenizer, record.messages[: turn + 1], prompt=False)
        if not (text.startswith(through) and through.startswith(opened)):
            raise LoraPruneError(
                "the chat template does not render a conversation as its turns one after the other, so the "
                "assistant turns cannot be found in it"
            )
        spans.append((len(opened), len(through)))
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as error:
        raise LoraPruneError("chat-format data needs a fast tokenizer (one with offset mappings)") from error
    input_ids, labels, labelled = [], [], 0
    for token, (begin, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        if labelled == max_answer_tokens:
            break
        answer = any(begin < stop and end > start for start, stop in spans)
        labelled += answer
        input_ids.append(token)
        labels.append(token if answer else IGNORE_INDEX)
    return {"input_ids": input_ids, "labels": labels}


def tokenize_sft(
    records: Sequence[SFTRecord | ChatRecord], tokenizer: PreTrainedTokenizerBase, max_answer_tokens: int = 256
) -> list[dict[str, list[int]]]:
    """``input_ids`` = prompt + answer + EOS, ``labels`` = the same with the prompt masked (-100).

    Prompt and answer are tokenised separately, so the prompt tokens are exactly those a model
    sees when asked the question at inference. The answer (EOS included) is cut at
    `max_answer_tokens`. Chat records go through `tokenize_chat` (the loss on the assistant turns).
    """
    if max_answer_tokens < 1:
        raise LoraPruneError(f"max_answer_tokens must be positive, got {max_answer_tokens}")
    if tokenizer.eos_token_id is None:
        raise LoraPruneError("the tokenizer has no EOS token to end the answers with")
    examples = []
    for record in records:
        if isinstance(record, ChatRecord):
            examples.append(tokenize_chat(record, tokenizer, max_answer_tokens))
            continue
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
