"""Weight magnitude: the L2 norm of all weights a unit owns (no data needed)."""

from __future__ import annotations

import torch
from torch import nn

from loraprune.importance.base import Criterion, unit_scores
from loraprune.structure import GroupFamily, unwrap_model


class MagnitudeCriterion(Criterion):
    """`‖W_group‖₂` over the unit's rows, biases and columns in all its matrices."""

    name = "magnitude"

    @torch.no_grad()
    def score(
        self, model: nn.Module, families: list[GroupFamily], batches: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        root = unwrap_model(model)
        scores = {}
        for family in families:
            squares = torch.zeros(family.count)
            for slicing in family.matrices:
                module = root.get_submodule(slicing.module)
                linear = getattr(module, "base_layer", module)
                bias = linear.bias.square() if slicing.dim == 0 and linear.bias is not None else None
                squares += unit_scores(family, slicing, linear.weight.square(), bias).cpu()
            scores[family.key] = squares.sqrt()
        return scores
