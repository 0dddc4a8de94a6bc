"""Calibration passes shared by the data-driven criteria: gradients of the mean loss, input norms.

Batches are token-id windows `[n, seq_len]`; the language-modelling loss of a window is its
own next-token NLL. Work is done in micro-batches so the activation memory is that of one
micro-batch, and the result is the same as for one pass over all windows.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm


def micro_batches(batches: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive slices of at most `batch_size` windows."""
    for start in range(0, batches.shape[0], batch_size):
        yield batches[start : start + batch_size]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def backward_mean_loss(model: nn.Module, batches: torch.Tensor, batch_size: int, desc: str) -> float:
    """Accumulate into `.grad` the gradient of the mean loss over all windows; returns that loss.

    Each micro-batch's loss is weighted by its share of the windows, so the accumulated
    gradient equals the gradient of one pass over all of them (equal-length windows).
    Only parameters with `requires_grad` receive gradients; the caller chooses which.
    """
    device = model_device(model)
    total = batches.shape[0]
    mean_loss = 0.0
    for chunk in tqdm(list(micro_batches(batches, batch_size)), desc=desc, leave=False):
        chunk = chunk.to(device)
        loss = model(input_ids=chunk, labels=chunk).loss * (chunk.shape[0] / total)
        loss.backward()
        mean_loss += float(loss.detach())
    return mean_loss
