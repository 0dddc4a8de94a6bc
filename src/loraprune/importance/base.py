"""The criterion interface and the reduction from per-element to per-unit scores."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from loraprune.distributed import full_tensor
from loraprune.structure import GroupFamily, MatrixSlicing


class Criterion(ABC):
    """Scores every unit of every family; one-shot criteria may read calibration batches."""

    name: str = ""
    #: whether `score` needs calibration batches (token ids)
    needs_data: bool = False

    @abstractmethod
    def score(
        self, model: nn.Module, families: list[GroupFamily], batches: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """One float32 CPU tensor of shape `[family.count]` per `family.key`."""


def unit_scores(
    family: GroupFamily, slicing: MatrixSlicing, element: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum per-element importance of one matrix (and its row bias) over each unit's block
    (within the family's segment of the matrix: all of it unless the matrix is fused).

    A sharded `element` (FSDP2: a DTensor of local rows) is summed locally, then its row or
    column sums are gathered whole, so every rank gets the same unit scores.
    """
    element = element.float()
    if slicing.dim == 0:
        lines = element.sum(dim=1)
        if bias is not None:
            lines = lines + bias.float()
    else:
        lines = element.sum(dim=0)
    return full_tensor(lines)[family.segment(slicing)].reshape(family.count, slicing.block).sum(dim=1)


def normalised_sum(per_matrix: list[torch.Tensor]) -> torch.Tensor:
    """Each matrix's unit-score vector divided by its L2 norm, then summed over the matrices.

    Matrices of different size and scale then weigh equally, and scores of different
    layers become comparable for a global ranking.
    """
    total = torch.zeros_like(per_matrix[0])
    for scores in per_matrix:
        norm = scores.norm()
        total += scores / norm if norm > 0 else scores
    return total
