"""Settings of an evaluation run (the `loraprune eval` options are generated from them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraprune.config import check, option
from loraprune.models import DEFAULT_MODEL, DTYPES


@dataclass
class EvalConfig:
    """What to evaluate, on which text, and under which protocol settings."""

    model: str = option(
        DEFAULT_MODEL, help=f"model: a local Hugging Face directory, a hub id, or the embedded '{DEFAULT_MODEL}'"
    )
    adapter: str | None = option(None, help="directory of a LoRA adapter to apply on top of the model")
    data: str = option("wikitext2", help="text to score: 'wikitext2', 'ptb', or the path of a text file")
    split: str = option("test", help="split of a named corpus (test, valid, train)")
    seq_len: int = option(128, help="tokens per non-overlapping window (128 as in LLM-Pruner/LoRAPrune)")
    max_tokens: int | None = option(None, help="score only the first N tokens of the text; None scores all of it")
    batch_size: int = option(8, help="windows per forward pass")
    dtype: str = option("float32", help="dtype to load the model in", choices=tuple(DTYPES))
    device: str = option("auto", help="torch device; 'auto' picks cuda when available, else cpu")
    json: str | None = option(None, help="also write the results, with their settings, to this JSON file")
    progress: bool = option(True, help="show progress bars")

    def __post_init__(self) -> None:
        check(self.seq_len >= 2, f"seq_len must be at least 2 (one token predicts the next), got {self.seq_len}")
        check(
            self.max_tokens is None or self.max_tokens >= self.seq_len,
            f"max_tokens ({self.max_tokens}) must be at least seq_len ({self.seq_len}) to fill one window",
        )
        check(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.json is not None:
            parent = Path(self.json).expanduser().resolve().parent
            check(parent.is_dir(), f"cannot write {self.json}: directory {parent} does not exist; create it first")
            check(not Path(self.json).is_dir(), f"cannot write {self.json}: it is a directory")
