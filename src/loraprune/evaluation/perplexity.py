"""Perplexity under the protocol of the design (§4), stated with every number it produces.

The test text is joined as its source distributes it, tokenised once (no BOS), cut into
non-overlapping windows of `seq_len` tokens (the incomplete tail is dropped). Each window is
scored on its own; the perplexity is ``exp`` of the mean negative log-likelihood over all
predicted tokens (``seq_len - 1`` per window).
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

from loraprune.data import load_text, token_windows
from loraprune.errors import LoraPruneError


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"perplexity {self.perplexity:.4f} on {self.data} ({self.split}): {self.tokens:,} tokens in "
            f"{self.windows} windows of {self.seq_len}, {self.dtype}, model {self.model} ({self.seconds:.1f} s)"
        )


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


def perplexity_of_windows(
    model: torch.nn.Module, windows: torch.LongTensor, batch_size: int = 8, progress: bool = True
) -> tuple[float, float]:
    """Mean token NLL and perplexity of `model` over the windows ``[n, seq_len]``, each scored alone.

    The model is put in eval mode for the scoring and returned to its previous mode.
    """
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise LoraPruneError(f"need at least one window of two or more tokens, got shape {tuple(windows.shape)}")
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
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
                targets = batch[:, 1:]
                loss = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"
                )
                total += loss.double().cpu()
    finally:
        model.train(was_training)
    nll = total.item() / (windows.shape[0] * (windows.shape[1] - 1))
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
) -> PerplexityResult:
    """Perplexity of `model` (a transformers or PEFT model) on `data` (corpus name or text file).

    `max_tokens` limits the evaluation to the first tokens of the text (None: the whole text).
    """
    if seq_len < 2:
        raise LoraPruneError(f"seq_len must be at least 2 (one token predicts the next), got {seq_len}")
    windows = token_windows(tokenizer, load_text(data, split), seq_len, max_tokens)
    if len(windows) == 0:
        raise LoraPruneError(f"{data} ({split}) has fewer tokens than one window of {seq_len}")
    started = time.perf_counter()
    nll, perplexity = perplexity_of_windows(model, windows, batch_size, progress)
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
    )
