"""N:M semi-structured sparsity: the pattern, mask selection from any element score, and checks.

An N:M pattern keeps at most `N` non-zero weights in every group of `M` consecutive *input*
weights of a row (weights `W[i, k·M : (k+1)·M]` of an `out × in` linear weight). This is the
layout sparse tensor cores accelerate (2:4 on NVIDIA Ampere and later): the reduction
dimension of `x·Wᵀ` is the input dimension, so every `M`-wide slice of it has `N` operands.

Mask selection works on any element score (higher = more important): the `N` highest-scoring
weights of each group are kept. Ties are broken by `torch.topk`, so exactly `N` weights are
kept in every group whatever the scores are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraprune.config import check
from loraprune.errors import ConfigError, LoraPruneError


@dataclass(frozen=True)
class NMPattern:
    """Keep `n` of every `m` consecutive input weights (`1 <= n < m`)."""

    n: int
    m: int

    def __post_init__(self) -> None:
        check(
            self.m >= 2 and 1 <= self.n < self.m,
            f"an N:M pattern needs 1 <= N < M (e.g. 2:4 or 4:8), got {self.n}:{self.m}",
        )

    @classmethod
    def parse(cls, text: str) -> NMPattern:
        """`"2:4"` -> `NMPattern(2, 4)`."""
        n, sep, m = text.strip().partition(":")
        if not (sep and n.isdigit() and m.isdigit()):
            raise ConfigError(f"an N:M pattern looks like '2:4' or '4:8', got {text!r}")
        return cls(int(n), int(m))

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def sparsity(self) -> float:
        """Fraction of the weights the pattern removes."""
        return 1 - self.n / self.m

    def check_width(self, in_features: int, name: str) -> None:
        """Raise unless the input width splits into whole groups of `m`."""
        if in_features % self.m:
            raise ConfigError(
                f"{name} has {in_features} input features, not a multiple of M={self.m}: the "
                f"{self} pattern needs whole groups of {self.m} consecutive inputs"
            )


def _groups(tensor: torch.Tensor, m: int) -> torch.Tensor:
    """`[out, in]` viewed as `[out, in / m, m]`."""
    if tensor.ndim != 2 or tensor.shape[1] % m:
        raise LoraPruneError(f"expected a 2-d weight with a multiple of {m} columns, got shape {tuple(tensor.shape)}")
    return tensor.reshape(tensor.shape[0], tensor.shape[1] // m, m)


def nm_mask(scores: torch.Tensor, m: int, keep: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask (bool, shape of `scores`) of the `keep` highest scores in every group of `m` inputs.

    `allowed` (bool, same shape) restricts the choice to weights it marks, e.g. those not
    pruned yet when pruning is monotone; every group must allow at least `keep` of them.
    """
    if not 1 <= keep <= m:
        raise LoraPruneError(f"cannot keep {keep} of every {m} weights")
    grouped = _groups(scores.detach().float(), m)
    if allowed is not None:
        allowed_groups = _groups(allowed, m)
        if int(allowed_groups.sum(dim=-1).min()) < keep:
            raise LoraPruneError(f"some group of {m} has fewer than {keep} weights left to keep")
        grouped = grouped.masked_fill(~allowed_groups, float("-inf"))
    index = grouped.topk(keep, dim=-1).indices
    mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, index, True)
    return mask.reshape(scores.shape)


def pattern_mask(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Keep-mask of the N:M pattern chosen by `scores`."""
    return nm_mask(scores, pattern.m, pattern.n)


def group_nonzeros(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Number of exactly non-zero weights in every group of `m` consecutive inputs, `[out, in / m]`."""
    return (_groups(weight.detach(), m) != 0).sum(dim=-1)


def pattern_violations(weight: torch.Tensor, pattern: NMPattern) -> int:
    """Groups of `weight` holding more than `n` non-zeros (0 when the pattern holds exactly)."""
    return int((group_nonzeros(weight, pattern.m) > pattern.n).sum())
