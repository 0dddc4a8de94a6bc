"""LoRA layers that compute with the masked merged weight `mask ⊙ (W0 + s·B·A)`, and the final merge.

A plain LoRA forward `x·W0ᵀ + s·x·(B·A)ᵀ` cannot keep an N:M pattern: the product `B·A` is
dense, so merging it would fill the pruned positions again. Here the layer's forward is
replaced by `x·(mask ⊙ (W0 + s·B·A))ᵀ + b`, i.e. the network trained is exactly the one
that merging produces, and the gradients reaching `A` and `B` are those of the masked merged
weight (`∂L/∂(B·A) = s·mask ⊙ ∂L/∂W`). Merging writes the same tensor into `W0` and removes
the adapter, so the saved model computes what was trained and holds the pattern exactly.

The merged weight is materialised in every forward (one weight-sized temporary per layer,
kept for the backward pass): the cost of training under a mask that `B·A` would otherwise
break. The forward is replaced on the layer instance (restored by `remove()`), so the PEFT
model, its parameter names and its optimizer state are those of ordinary LoRA.
"""

from __future__ import annotations

import functools

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.nn import functional as F

from loraprune.errors import LoraPruneError
from loraprune.importance.lora_guided import lora_layer
from loraprune.semi_structured.targets import base_linear
from loraprune.structure import unwrap_model


def masked_lora_layer(model: nn.Module, name: str, adapter: str) -> LoraLayer:
    """The LoRA layer at `name`, checked to be one whose merged weight the masked forward reproduces."""
    layer = lora_layer(model, name, adapter)
    if layer is None:
        raise LoraPruneError(
            f"{name} has no LoRA adapter {adapter!r}: N:M training masks the merged weight "
            "W0 + s·B·A, so every masked projection needs LoRA (loraprune.lora.add_lora's default "
            "target modules cover all seven)"
        )
    if not isinstance(layer.lora_dropout[adapter], nn.Identity):
        raise LoraPruneError(
            f"{name} uses LoRA dropout, which the masked merged weight cannot reproduce; create "
            "the adapter with dropout 0"
        )
    if layer.merged:
        raise LoraPruneError(f"{name} has its adapter merged already; N:M training needs it unmerged")
    if getattr(layer, "fan_in_fan_out", False):
        raise LoraPruneError(f"{name} stores its weight transposed (fan_in_fan_out); N:M needs nn.Linear layout")
    base_linear(model, name)  # a plain nn.Linear underneath
    return layer


def masked_merged_weight(layer: LoraLayer, keep: torch.Tensor, adapter: str) -> torch.Tensor:
    """`keep ⊙ (W0 + s·B·A)` in the base weight's dtype (differentiable in `A` and `B`)."""
    base = layer.get_base_layer()
    merged = base.weight + layer.get_delta_weight(adapter).to(base.weight.dtype)
    return torch.where(keep, merged, 0.0)


def _forward(
    layer: LoraLayer, adapter: str, masks: dict[str, torch.Tensor], name: str, x: torch.Tensor, *args, **kwargs
) -> torch.Tensor:
    base = layer.get_base_layer()
    weight = masked_merged_weight(layer, masks[name], adapter)
    return F.linear(x.to(weight.dtype), weight, base.bias).to(x.dtype)


class MaskedMergedForward:
    """Makes the LoRA layers `masks` names compute with `mask ⊙ (W0 + s·B·A)`; `update` swaps masks in place.

    `masks` maps module paths (as in the transformers model) to bool keep-masks of the
    weight's shape. Use as a context manager or call `remove()` to restore PEFT's forward.
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], adapter: str = "default") -> None:
        self.adapter = adapter
        self.layers = {name: masked_lora_layer(model, name, adapter) for name in masks}
        self.masks: dict[str, torch.Tensor] = {}
        self.update(masks)
        for name, layer in self.layers.items():
            layer.forward = functools.partial(_forward, layer, adapter, self.masks, name)

    def update(self, masks: dict[str, torch.Tensor]) -> None:
        """Use new keep-masks (for the same modules) from the next forward on."""
        if set(masks) != set(self.layers):
            raise LoraPruneError("update() needs a mask for exactly the modules the forward was built for")
        for name, keep in masks.items():
            weight = self.layers[name].get_base_layer().weight
            if keep.shape != weight.shape:
                raise LoraPruneError(
                    f"the mask of {name} has shape {tuple(keep.shape)}, its weight {tuple(weight.shape)}"
                )
            self.masks[name] = keep.to(device=weight.device, dtype=torch.bool)

    def remove(self) -> None:
        for layer in self.layers.values():
            if "forward" in vars(layer):
                del layer.forward

    def __enter__(self) -> MaskedMergedForward:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@torch.no_grad()
def merge_masked(model: PeftModel, masks: dict[str, torch.Tensor], adapter: str = "default") -> nn.Module:
    """Merge the adapter and return the plain model: `W0 ← mask ⊙ (W0 + s·B·A)` for the masked layers.

    LoRA layers without a mask are merged as PEFT merges them. The returned model holds the
    N:M pattern exactly (the pruned weights are 0, whatever the dtype).
    """
    for name, keep in masks.items():
        layer = masked_lora_layer(model, name, adapter)
        layer.get_base_layer().weight.copy_(
            masked_merged_weight(layer, keep.to(layer.get_base_layer().weight.device), adapter)
        )
        if "forward" in vars(layer):
            del layer.forward
    for name, module in unwrap_model(model).named_modules():
        if isinstance(module, LoraLayer) and name not in masks and adapter in module.lora_A and not module.merged:
            module.merge(adapter_names=[adapter])
    return model.unload()
