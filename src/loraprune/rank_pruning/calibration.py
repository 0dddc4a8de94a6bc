"""Calibration of PrunedLoRA's quadratic model: predicted against measured loss changes of removals.

At every pruning event the quadratic model predicts the loss change of each module's removal
(`ModuleRemoval.loss_change`) and of the whole event (their sum). `HeldOutLoss` measures the
real change on a batch of examples the adapter never trains on: the event as a whole (one
forward before and one after), and, for a few sampled modules, each module's removal alone
(one forward each, the module's weights restored afterwards). `calibration_summary` reduces
the pairs to the numbers a run report shows: the Spearman rank correlation and the fraction of
pairs whose signs agree, over module removals and over events.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class ModuleCheck:
    """One module's removal at one event, priced by the quadratic model and measured alone."""

    module: str
    predicted: float  # the quadratic model's loss change (gradient term + curvature term)
    linear: float  # its gradient (first-order) term alone
    measured: float  # held-out loss after the module's removal alone, minus before the event


class HeldOutLoss:
    """The mean answer-token loss of `model` on one fixed held-out batch (labels included), no gradients.

    Dropout is switched off for the measurement (eval mode) and the model's mode is restored.
    Under data parallelism every process measures the same batch, so all of them run the
    same forward passes (FSDP needs them to).
    """

    def __init__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> None:
        self.model = model
        device = next(model.parameters()).device
        self.batch = {key: value.to(device) for key, value in batch.items()}

    @torch.no_grad()
    def __call__(self) -> float:
        training = self.model.training
        self.model.eval()
        try:
            return float(self.model(**self.batch).loss)
        finally:
            self.model.train(training)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation of two equally long sequences (ties get their mean rank); None if undefined."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs sequences of equal length, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return None
    rank_x, rank_y = _ranks(x), _ranks(y)
    mean = (len(x) - 1) / 2
    cov = sum((a - mean) * (b - mean) for a, b in zip(rank_x, rank_y))
    var_x = sum((a - mean) ** 2 for a in rank_x)
    var_y = sum((b - mean) ** 2 for b in rank_y)
    return None if var_x == 0 or var_y == 0 else cov / math.sqrt(var_x * var_y)


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2
        start = end + 1
    return ranks


def sign_agreement(pairs: Iterable[tuple[float, float]]) -> float | None:
    """Fraction of (predicted, measured) pairs of the same sign (a zero agrees with nothing but zero)."""
    pairs = list(pairs)
    if not pairs:
        return None
    return sum(math.copysign(1, p) == math.copysign(1, m) if p and m else p == m for p, m in pairs) / len(pairs)


def calibration_summary(events: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Rank correlation and sign agreement of predicted against measured loss changes, from pruning events.

    `events` are the records of `RankPruner.history` as the run report stores them
    (`predicted_loss_change`, `measured_loss_change`, `module_checks`). None when nothing was
    measured.
    """
    whole = [
        (e["predicted_loss_change"], e["measured_loss_change"])
        for e in events
        if e.get("measured_loss_change") is not None and e.get("predicted_loss_change") is not None
    ]
    modules = [(c["predicted"], c["measured"]) for e in events for c in e.get("module_checks") or []]
    if not whole and not modules:
        return None
    return {
        "events": len(whole),
        "spearman_events": spearman(*zip(*whole)) if whole else None,
        "sign_agreement_events": sign_agreement(whole),
        "predicted_total": sum(p for p, _ in whole),
        "measured_total": sum(m for _, m in whole),
        "module_checks": len(modules),
        "spearman_modules": spearman(*zip(*modules)) if modules else None,
        "sign_agreement_modules": sign_agreement(modules),
    }
