"""Architecture adapters: the prunable groups of each supported model family."""

from __future__ import annotations

from torch import nn

from loraprune.errors import LoraPruneError
from loraprune.structure.base import ArchitectureAdapter, AttentionUnit, LayerSizes
from loraprune.structure.gemma import GemmaAdapter
from loraprune.structure.groups import GroupFamily, Masks, MatrixSlicing, full_masks
from loraprune.structure.llama import LlamaFamilyAdapter
from loraprune.structure.phi3 import Phi3Adapter
from loraprune.structure.qwen3 import Qwen3Adapter

ADAPTERS: tuple[ArchitectureAdapter, ...] = (LlamaFamilyAdapter(), Qwen3Adapter(), GemmaAdapter(), Phi3Adapter())


class UnsupportedArchitectureError(LoraPruneError):
    """The model's architecture has no adapter in `loraprune.structure`."""


def supported_model_types() -> list[str]:
    return sorted({t for adapter in ADAPTERS for t in adapter.model_types if not t.startswith("loraprune_")})


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers causal-LM inside a PEFT wrapper (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def get_adapter(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for `model`'s architecture, or a clear error listing the supported ones."""
    model_type = getattr(getattr(unwrap_model(model), "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedArchitectureError(
        f"architecture {model_type!r} is not supported; supported model types: "
        f"{', '.join(supported_model_types())} (SmolLM2 is a Llama)"
    )


__all__ = [
    "ADAPTERS",
    "ArchitectureAdapter",
    "AttentionUnit",
    "GroupFamily",
    "LayerSizes",
    "Masks",
    "MatrixSlicing",
    "UnsupportedArchitectureError",
    "full_masks",
    "get_adapter",
    "supported_model_types",
    "unwrap_model",
]
