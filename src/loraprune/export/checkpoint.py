"""A saved model directory read as files: its config, its tensors and the widths of every layer.

The exporters read the weights straight from the safetensors files (one file or a sharded
index), so a per-layer-width model needs neither its remote code nor a model instance, and
nothing is held in memory twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from loraprune.errors import LoraPruneError
from loraprune.structure.base import LayerSizes

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"


@dataclass
class Checkpoint:
    """The config and tensor files of a Hugging Face model directory."""

    directory: Path
    config: dict[str, Any]
    files: dict[str, Path]  # tensor name -> the safetensors file that holds it

    @classmethod
    def open(cls, directory: str | Path) -> Checkpoint:
        """Read `directory/config.json` and index its safetensors weights; errors say what is missing."""
        directory = Path(directory)
        config_file = directory / "config.json"
        if not config_file.is_file():
            raise LoraPruneError(f"{directory} is not a saved model directory (no config.json)")
        config = json.loads(config_file.read_text())
        if (directory / SHARD_INDEX).is_file():
            weight_map = json.loads((directory / SHARD_INDEX).read_text())["weight_map"]
            files = {name: directory / shard for name, shard in weight_map.items()}
        elif (directory / SINGLE_FILE).is_file():
            with safe_open(directory / SINGLE_FILE, framework="pt") as handle:
                files = dict.fromkeys(handle.keys(), directory / SINGLE_FILE)
        else:
            raise LoraPruneError(
                f"{directory} has no safetensors weights ({SINGLE_FILE} or {SHARD_INDEX}); save the model with "
                "save_pretrained (safe_serialization, the default)"
            )
        return cls(directory, config, files)

    @property
    def model_type(self) -> str:
        """The source architecture's model type (`loraprune_llama` reads as `llama`)."""
        return str(self.config.get("model_type", "")).removeprefix("loraprune_")

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def head_dim(self) -> int:
        head_dim = self.config.get("head_dim")
        return int(head_dim) if head_dim else self.config["hidden_size"] // self.config["num_attention_heads"]

    def has(self, name: str) -> bool:
        return name in self.files

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read from its file."""
        if name not in self.files:
            raise LoraPruneError(f"{self.directory} has no tensor {name!r}")
        with safe_open(self.files[name], framework="pt") as handle:
            return handle.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self.files[name], framework="pt") as handle:
            return tuple(handle.get_slice(name).get_shape())

    def names(self) -> Iterator[str]:
        yield from self.files

    def layer_sizes(self) -> list[LayerSizes]:
        """Widths of every decoder layer, from the tensor shapes; checked against `layer_sizes` in the config."""
        sizes = []
        for index in range(self.num_layers):
            prefix = f"model.layers.{index}."
            sizes.append(
                LayerSizes(
                    num_attention_heads=self.shape(prefix + "self_attn.q_proj.weight")[0] // self.head_dim,
                    num_key_value_heads=self.shape(prefix + "self_attn.k_proj.weight")[0] // self.head_dim,
                    intermediate_size=self.shape(prefix + "mlp.up_proj.weight")[0],
                )
            )
        declared = self.config.get("layer_sizes")
        if declared is not None and [LayerSizes(**entry) for entry in declared] != sizes:
            raise LoraPruneError(f"{self.directory}: config.json's layer_sizes do not match the weights' shapes")
        return sizes
