"""Perplexity under the protocol of the design (§4), stated with every number it produces.

The test text is joined as its source distributes it, tokenised once (no BOS), cut into
non-overlapping windows of `seq_len` tokens (the incomplete tail is dropped). Each window is
scored on its own; the perplexity is ``exp`` of the mean negative log-likelihood over all
predicted tokens (``seq_len - 1`` per window).

The `llama.cpp` protocol computes what `llama-perplexity -c SEQ_LEN` computes, so that a
GGUF export can be checked against its source model: the text loses one trailing newline
(as llama.cpp's `-f` reads it), a BOS token leads it and replaces the first token of every
window when the tokenizer adds one, and only the second half of each window is scored
(predictions of tokens ``seq_len/2 + 1 .. seq_len - 1``: every scored token has at least
half a window of context).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from loraprune.data import adds_bos, load_text, token_windows, tokenize_text
from loraprune.errors import LoraPruneError

PROTOCOLS = ("windows", "llama.cpp")


@dataclass
class PerplexityResult:
    """A perplexity with the settings needed to reproduce and compare it."""

    perplexity: float
    nll: float  # mean token negative log-likelihood (nats)
    seq_len: int
    tokens: int  # tokens in the evaluated windows (windows * seq_len)
    windows: int
    dtype: str
    model: str
    data: str
    split: str
    max_tokens: int | None
    seconds: float
    protocol: str = "windows"  # or "llama.cpp": second halves of the windows scored, llama.cpp's BOS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"perplexity {self.perplexity:.4f} on {self.data} ({self.split}): {self.tokens:,} tokens in "
            f"{self.windows} windows of {self.seq_len}{_PROTOCOL_NOTES[self.protocol]}, {self.dtype}, model "
            f"{self.model} ({self.seconds:.1f} s)"
        )


_PROTOCOL_NOTES = {"windows": "", "llama.cpp": " (llama.cpp protocol: second halves scored)"}


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


def perplexity_of_windows(
    model: torch.nn.Module,
    windows: torch.LongTensor,
    batch_size: int = 8,
    progress: bool = True,
    first: int = 0,
) -> tuple[float, float]:
    """Mean token NLL and perplexity of `model` over the windows ``[n, seq_len]``, each scored alone.

    Only the predictions made at positions `first` .. ``seq_len - 2`` count (0: every token
    after the first). The model is put in eval mode for the scoring and returned to its previous mode.
    """
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < first + 2:
        raise LoraPruneError(
            f"need at least one window of {first + 2} or more tokens, got shape {tuple(windows.shape)}"
        )
    if batch_size < 1:
        raise LoraPruneError(f"batch_size must be positive, got {batch_size}")
    device, _ = _model_device_dtype(model)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    try:
        with torch.inference_mode():
            for start in tqdm(
                range(0, len(windows), batch_size), desc="perplexity", unit="batch", disable=not progress
            ):
                batch = windows[start : start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits[:, first:-1]
                targets = batch[:, first + 1 :]
                loss = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"
                )
                total += loss.double().cpu()
    finally:
        model.train(was_training)
    nll = total.item() / (windows.shape[0] * (windows.shape[1] - 1 - first))
    return nll, math.exp(nll)


def evaluate_perplexity(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: str = "wikitext2",
    *,
    seq_len: int = 128,
    max_tokens: int | None = None,
    batch_size: int = 8,
    model_name: str | None = None,
    progress: bool = True,
    split: str = "test",
    protocol: str = "windows",
) -> PerplexityResult:
    """Perplexity of `model` (a transformers or PEFT model) on `data` (corpus name or text file).

    `max_tokens` limits the evaluation to the first tokens of the text (None: the whole text);
    `protocol` is "windows" (the design's) or "llama.cpp" (llama-perplexity's, see the module).
    """
    if protocol not in PROTOCOLS:
        raise LoraPruneError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    minimum = 2 if protocol == "windows" else 4
    if seq_len < minimum:
        raise LoraPruneError(f"seq_len must be at least {minimum} for the {protocol} protocol, got {seq_len}")
    text = load_text(data, split)
    if protocol == "windows":
        windows, first = token_windows(tokenizer, text, seq_len, max_tokens), 0
    else:
        windows, first = llama_cpp_windows(tokenizer, text, seq_len, max_tokens), seq_len // 2
    if len(windows) == 0:
        raise LoraPruneError(f"{data} ({split}) has fewer tokens than one window of {seq_len}")
    started = time.perf_counter()
    nll, perplexity = perplexity_of_windows(model, windows, batch_size, progress, first)
    _, dtype = _model_device_dtype(model)
    return PerplexityResult(
        perplexity=perplexity,
        nll=nll,
        seq_len=seq_len,
        tokens=windows.numel(),
        windows=len(windows),
        dtype=str(dtype).removeprefix("torch."),
        model=model_name or getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__,
        data=data,
        split=split,
        max_tokens=max_tokens,
        seconds=time.perf_counter() - started,
        protocol=protocol,
    )


def llama_cpp_windows(
    tokenizer: PreTrainedTokenizerBase, text: str, seq_len: int, max_tokens: int | None = None
) -> torch.LongTensor:
    """The windows `llama-perplexity -c seq_len` evaluates: the text without one trailing newline,
    tokenised once with a leading BOS if the tokenizer adds one, cut into windows whose first
    token becomes BOS (then); `max_tokens` keeps the first ``max_tokens // seq_len`` windows
    (llama.cpp's ``--chunks``)."""
    ids = tokenize_text(tokenizer, text.removesuffix("\n"))
    bos = adds_bos(tokenizer)
    if bos:
        ids = torch.cat([torch.tensor([tokenizer.bos_token_id]), ids])
    count = len(ids) // seq_len
    if max_tokens is not None:
        count = min(count, max_tokens // seq_len)
    windows = ids[: count * seq_len].view(count, seq_len).clone()
    if bos:
        windows[:, 0] = tokenizer.bos_token_id
    return windows
