"""Random scores: the floor every criterion must beat."""

from __future__ import annotations

import torch
from torch import nn

from loraprune.importance.base import Criterion
from loraprune.structure import GroupFamily


class RandomCriterion(Criterion):
    """Independent uniform scores, reproducible for a seed."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def score(
        self, model: nn.Module, families: list[GroupFamily], batches: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        return {family.key: torch.rand(family.count, generator=generator) for family in families}
