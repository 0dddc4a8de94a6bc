"""Wanda-sp: weight magnitude times input-activation norm, for whole units (An et al., FLAP's baseline).

Wanda scores a weight by `|W_ij|·‖X_j‖₂`, `X_j` being input feature `j` over all calibration
tokens. Its structured variant scores the *input channels* of the output-side matrices:
a head (or KV group) by the columns it owns in `o_proj`, an MLP channel by its column of
`down_proj`, i.e. `Σ_i Σ_{j ∈ unit} |W_ij|·‖X_j‖₂`. Those inputs are exactly the
activations a removed unit stops producing; the row-side matrices (q/k/v, gate/up) all
read the same normalised hidden state and carry no unit-specific activation.

Needs forward passes only (no gradients), with one float32 vector per scored matrix.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from loraprune.errors import LoraPruneError
from loraprune.importance.base import Criterion, unit_scores
from loraprune.importance.gradients import micro_batches, model_device
from loraprune.structure import GroupFamily, unwrap_model


class WandaSPCriterion(Criterion):
    """`Σ |W|·‖X‖₂` over each unit's input columns of `o_proj` / `down_proj`."""

    name = "wanda-sp"
    needs_data = True

    def __init__(self, batch_size: int = 4) -> None:
        self.batch_size = batch_size

    @torch.no_grad()
    def score(
        self, model: nn.Module, families: list[GroupFamily], batches: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if batches is None:
            raise LoraPruneError("the Wanda-sp criterion needs calibration batches (token windows)")
        root = unwrap_model(model)
        squares: dict[str, torch.Tensor] = {}
        handles = []
        for family in families:
            for slicing in family.matrices:
                if slicing.dim == 1:
                    module = root.get_submodule(slicing.module)
                    handles.append(module.register_forward_pre_hook(self._accumulator(slicing.module, squares)))
        try:
            device = model_device(model)
            for chunk in tqdm(list(micro_batches(batches, self.batch_size)), desc="Wanda-sp scoring", leave=False):
                model(input_ids=chunk.to(device))
        finally:
            for handle in handles:
                handle.remove()
        scores = {}
        for family in families:
            total = torch.zeros(family.count)
            for slicing in family.matrices:
                if slicing.dim != 1:
                    continue
                module = root.get_submodule(slicing.module)
                weight = getattr(module, "base_layer", module).weight
                element = weight.detach().float().abs() * squares[slicing.module].sqrt()[None, :]
                total += unit_scores(family, slicing, element).cpu()
            scores[family.key] = total
        return scores

    @staticmethod
    def _accumulator(name: str, squares: dict[str, torch.Tensor]):
        """A pre-hook adding the squared inputs, summed over tokens, to `squares[name]`."""

        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            total = x.reshape(-1, x.shape[-1]).square().sum(dim=0)
            squares[name] = squares[name] + total if name in squares else total

        return hook
