"""What an architecture adapter must tell the rest of the package.

One subclass per architecture family (see `llama.py`); adding an architecture is one new
file that subclasses `ArchitectureAdapter` and is listed in `structure/__init__.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Literal

from torch import nn

from loraprune.structure.groups import GroupFamily

AttentionUnit = Literal["auto", "head", "kv_group", "query_head"]


@dataclass(frozen=True)
class LayerSizes:
    """Widths of one decoder layer."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class ArchitectureAdapter(ABC):
    """Knows where the prunable matrices of one architecture family are and how they couple."""

    #: `config.model_type` values this adapter handles
    model_types: tuple[str, ...] = ()

    @abstractmethod
    def families(self, model: nn.Module, attention_unit: AttentionUnit = "auto") -> list[GroupFamily]:
        """All group families of all decoder layers, at the model's current widths."""

    @abstractmethod
    def layer_sizes(self, model: nn.Module) -> list[LayerSizes]:
        """Current widths of every decoder layer."""

    @abstractmethod
    def set_layer_sizes(self, model: nn.Module, layer: int, sizes: LayerSizes) -> None:
        """Update the non-weight attributes of a layer after its matrices were shrunk."""

    @abstractmethod
    def config_for_sizes(self, model: nn.Module, sizes: list[LayerSizes]) -> tuple[object, bool]:
        """The config to save for these widths and whether it is the architecture's stock config."""
