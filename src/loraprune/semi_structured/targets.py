"""Which linear layers get an N:M pattern: the attention and MLP projections of the decoder layers.

The architecture adapter (`loraprune.structure`) already lists them as the matrices of each
layer's group families (q, k, v, o; gate, up, down on Llama-family models), so the same
models are supported as for structured pruning; embeddings and the LM head are never
touched. Paths are those of the transformers model, also inside a PEFT wrapper.
"""

from __future__ import annotations

from torch import nn

from loraprune.errors import LoraPruneError
from loraprune.selection import parse_layers
from loraprune.semi_structured.pattern import NMPattern
from loraprune.structure import get_adapter, unwrap_model


def base_linear(model: nn.Module, name: str) -> nn.Linear:
    """The plain `nn.Linear` at `name` (inside its PEFT LoRA wrapper, if any)."""
    module = unwrap_model(model).get_submodule(name)
    linear = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if not isinstance(linear, nn.Linear):
        raise LoraPruneError(
            f"{name} is a {type(linear).__name__}, not a torch.nn.Linear; N:M masks need "
            "plain (unquantised) linear weights"
        )
    return linear


def nm_modules(model: nn.Module, pattern: NMPattern, layers: str = "all") -> list[str]:
    """Paths of the projections of the decoder layers `layers` ('all', '4-27', '0,2,5-7'), validated for `pattern`.

    Ordered by layer, then attention (q, k, v, o) before MLP (gate, up, down).
    """
    root = unwrap_model(model)
    architecture = get_adapter(root)
    selected = set(parse_layers(layers, len(architecture.layer_sizes(root))))
    names: list[str] = []
    for family in architecture.families(root):
        if family.layer in selected:
            names.extend(m.module for m in family.matrices if m.module not in names)
    for name in names:
        pattern.check_width(base_linear(model, name).in_features, name)
    return names
