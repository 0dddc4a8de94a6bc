"""First-order Taylor importance with real base-weight gradients (LLM-Pruner's "element¹").

The element importance `|W ⊙ ∂L/∂W|` estimates the loss change when a weight is removed; a
unit's score is the plain sum over every weight (and bias) it owns in all its matrices, as in
LLM-Pruner's `sum` group reduction. The gradients are those of the mean language-modelling
loss over the calibration windows, accumulated in micro-batches.

This is the memory-hungry reference LoRAPrune is compared with: during the backward pass a
gradient the size of every scored matrix exists at once. Only the scored matrices get
`requires_grad` (everything else, LoRA included, is frozen for the pass), and all of it is
restored and freed before `score` returns.
"""

from __future__ import annotations

import torch
from torch import nn

from loraprune.errors import LoraPruneError
from loraprune.importance.base import Criterion, unit_scores
from loraprune.importance.gradients import backward_mean_loss
from loraprune.structure import GroupFamily, unwrap_model


def _base_linear(model: nn.Module, module: str) -> nn.Linear:
    layer = unwrap_model(model).get_submodule(module)
    return getattr(layer, "base_layer", layer)


class TaylorCriterion(Criterion):
    """`Σ |W ⊙ G|` over each unit's weights, with `G` the full gradient on the calibration batches."""

    name = "taylor"
    needs_data = True

    def __init__(self, batch_size: int = 4) -> None:
        self.batch_size = batch_size

    def score(
        self, model: nn.Module, families: list[GroupFamily], batches: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if batches is None:
            raise LoraPruneError("the Taylor criterion needs calibration batches (token windows)")
        linears = {s.module: _base_linear(model, s.module) for family in families for s in family.matrices}
        scored = [p for linear in linears.values() for p in (linear.weight, linear.bias) if p is not None]
        previous = {param: param.requires_grad for param in model.parameters()}
        try:
            for param in model.parameters():
                param.requires_grad_(False)
                param.grad = None
            for param in scored:
                param.requires_grad_(True)
            backward_mean_loss(model, batches, self.batch_size, desc="Taylor scoring")
            return self._reduce(families, linears)
        finally:
            for param, flag in previous.items():
                param.grad = None
                param.requires_grad_(flag)

    @torch.no_grad()
    def _reduce(self, families: list[GroupFamily], linears: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
        """Per-unit sums of `|W ⊙ G|`, freeing each matrix's gradient as soon as it is used."""
        scores = {}
        for family in families:
            total = torch.zeros(family.count)
            for slicing in family.matrices:
                linear = linears[slicing.module]
                element = (linear.weight.float() * linear.weight.grad.float()).abs_()
                bias = None
                if slicing.dim == 0 and linear.bias is not None:
                    bias = (linear.bias.float() * linear.bias.grad.float()).abs_()
                total += unit_scores(family, slicing, element, bias).cpu()
            for slicing in family.matrices:  # after the family: a fused matrix serves several slicings
                linears[slicing.module].weight.grad = None
            scores[family.key] = total
        return scores
