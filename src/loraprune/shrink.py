"""Physical removal of masked units: smaller matrices, and a config that says so.

Shrinking does not care why a unit was chosen. It slices every matrix of every family
(biases with their rows; LoRA `B` rows and `A` columns with the base weight's rows and
columns; all segments of a fused matrix in one cut, so that their offsets stay valid),
updates the layers' head counts, and replaces the model's config by one that describes
the new widths (stock when every layer has the same widths, per-layer otherwise).
"""

from __future__ import annotations

import torch
from torch import nn

from loraprune.errors import LoraPruneError
from loraprune.kbit import is_kbit_model
from loraprune.structure import GroupFamily, LayerSizes, Masks, get_adapter, unwrap_model


def _slice_linear_(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep only rows (dim 0, with the bias) or columns (dim 1) `index` of a linear layer, in place."""
    index = index.to(linear.weight.device)
    weight = linear.weight.data.index_select(dim, index).clone()
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(
                linear.bias.data.index_select(0, index).clone(), requires_grad=linear.bias.requires_grad
            )
        linear.out_features = weight.shape[0]
    else:
        linear.in_features = weight.shape[1]


def _slice_module_(module: nn.Module, index: torch.Tensor, dim: int) -> None:
    """Slice a plain linear layer, or a PEFT LoRA layer together with its adapters."""
    base = getattr(module, "base_layer", None)
    if base is None:
        _slice_linear_(module, index, dim)
        return
    _slice_linear_(base, index, dim)
    lora_side = getattr(module, "lora_B" if dim == 0 else "lora_A")
    for adapter_layer in lora_side.values():
        # B maps rank -> out (slice its rows); A maps in -> rank (slice its columns)
        _slice_linear_(adapter_layer, index, dim)
    if dim == 0:
        module.out_features = base.out_features
    else:
        module.in_features = base.in_features


def shrink_model(model: nn.Module, families: list[GroupFamily], masks: Masks) -> list[LayerSizes]:
    """Remove every unit whose mask is False; returns the new widths of every decoder layer.

    The model keeps its class; its config is replaced by one describing the new widths,
    which is what `loraprune.io.save_pruned_model` writes.
    """
    root = unwrap_model(model)
    adapter = get_adapter(root)
    if is_kbit_model(root):
        raise LoraPruneError(
            "the model's weights are k-bit (bitsandbytes), whose packed storage cannot be sliced: load the same "
            "checkpoint in full precision, copy the LoRA adapter onto it (loraprune.kbit.full_precision_copy) and "
            "shrink that copy with the same families and masks (loraprune prune-model --quantize does this)"
        )
    removed: dict[tuple[str, int], list[torch.Tensor]] = {}
    for family in families:
        keep = masks.get(family.key)
        if keep is None or bool(keep.all()):
            continue
        if keep.numel() != family.count:
            raise LoraPruneError(f"mask for {family.key} has {keep.numel()} entries, the layer has {family.count}")
        if not family.is_feasible(keep):
            raise LoraPruneError(f"mask for {family.key} breaks the {family.unit} constraints: {keep.tolist()}")
        for slicing in family.matrices:
            removed.setdefault((slicing.module, slicing.dim), []).append(family.index_of(~keep, slicing))
    for (name, dim), parts in removed.items():
        module = root.get_submodule(name)
        kept = torch.ones(getattr(module, "base_layer", module).weight.shape[dim], dtype=torch.bool)
        kept[torch.cat(parts)] = False
        _slice_module_(module, torch.nonzero(kept).flatten(), dim)
    sizes = adapter.layer_sizes(root)
    for layer, layer_sizes in enumerate(sizes):
        adapter.set_layer_sizes(root, layer, layer_sizes)
    config, _stock = adapter.config_for_sizes(root, sizes)
    config._attn_implementation = root.config._attn_implementation
    root.config = config
    return sizes
