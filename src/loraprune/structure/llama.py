"""Llama-family decoders: Llama 1-3, Mistral, Qwen2 (q/k/v biases) and SmolLM2.

They share module names (`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`), rotary
attention with grouped key/values, and a gated MLP. Biases, where present, live on the
rows they belong to and are sliced with them.
"""

from __future__ import annotations

from huggingface_hub.errors import StrictDataclassClassValidationError
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from loraprune.errors import ConfigError
from loraprune.remote.modeling_loraprune import PRUNED_CLASSES, set_layer_widths
from loraprune.structure.base import ArchitectureAdapter, AttentionUnit, LayerSizes
from loraprune.structure.groups import GroupFamily, MatrixSlicing

STOCK_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def _linear_params(module: nn.Module, dim: int) -> int:
    """Parameters one row (dim 0, bias included) or one column (dim 1) of a linear layer holds."""
    base = getattr(module, "base_layer", module)  # PEFT-wrapped layers keep the frozen one inside
    if dim == 0:
        return base.in_features + (1 if base.bias is not None else 0)
    return base.out_features


class LlamaFamilyAdapter(ArchitectureAdapter):
    """Group families of Llama-family decoders, MHA and GQA alike.

    Subclasses for related architectures (`qwen3.py`, `gemma.py`, `phi3.py`) set `model_types`
    and `stock_classes`, and override the `_…_matrices` / `_layer_widths` hooks where their
    projections differ.
    """

    model_types = ("llama", "mistral", "qwen2", "loraprune_llama", "loraprune_mistral", "loraprune_qwen2")
    #: source `model_type` -> (stock config class, stock causal-LM class)
    stock_classes: dict[str, tuple[type, type]] = STOCK_CLASSES

    def _layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def _layer_widths(self, layer: nn.Module) -> LayerSizes:
        """The widths of one decoder layer, read off its projections."""
        attn = layer.self_attn
        return LayerSizes(
            num_attention_heads=_out_features(attn.q_proj) // attn.head_dim,
            num_key_value_heads=_out_features(attn.k_proj) // attn.head_dim,
            intermediate_size=_out_features(layer.mlp.up_proj),
        )

    def layer_sizes(self, model: nn.Module) -> list[LayerSizes]:
        return [self._layer_widths(layer) for layer in self._layers(model)]

    def families(self, model: nn.Module, attention_unit: AttentionUnit = "auto") -> list[GroupFamily]:
        families: list[GroupFamily] = []
        for index, (layer, sizes) in enumerate(zip(self._layers(model), self.layer_sizes(model))):
            families.append(self._attention_family(index, layer, sizes, attention_unit))
            families.append(self._mlp_family(index, layer, sizes))
        return families

    def _attention_matrices(
        self, prefix: str, sizes: LayerSizes, head_dim: int, unit: AttentionUnit
    ) -> tuple[MatrixSlicing, ...]:
        """The slicings of one attention unit: a query head, or a KV group (one k/v head with its
        query heads, which is a head under MHA)."""
        d = head_dim
        if unit == "query_head":
            return MatrixSlicing(prefix + "q_proj", 0, d), MatrixSlicing(prefix + "o_proj", 1, d)
        per_kv = sizes.num_attention_heads // sizes.num_key_value_heads
        return (
            MatrixSlicing(prefix + "q_proj", 0, d * per_kv),
            MatrixSlicing(prefix + "k_proj", 0, d),
            MatrixSlicing(prefix + "v_proj", 0, d),
            MatrixSlicing(prefix + "o_proj", 1, d * per_kv),
        )

    def _mlp_matrices(self, prefix: str, sizes: LayerSizes) -> tuple[MatrixSlicing, ...]:
        """The slicings of one MLP channel: its gate and up rows and its down column."""
        return (
            MatrixSlicing(prefix + "gate_proj", 0, 1),
            MatrixSlicing(prefix + "up_proj", 0, 1),
            MatrixSlicing(prefix + "down_proj", 1, 1),
        )

    def _attention_family(self, index: int, layer: nn.Module, sizes: LayerSizes, unit: AttentionUnit) -> GroupFamily:
        per_kv = sizes.num_attention_heads // sizes.num_key_value_heads
        if unit == "auto":
            unit = "head" if per_kv == 1 else "kv_group"
        if unit == "head" and per_kv != 1:
            raise ConfigError(
                f"layer {index} uses grouped-query attention ({sizes.num_attention_heads} query heads share "
                f"{sizes.num_key_value_heads} key/value heads): choose the attention unit 'kv_group' or "
                "'query_head', not 'head'"
            )
        matrices = self._attention_matrices(f"model.layers.{index}.self_attn.", sizes, layer.self_attn.head_dim, unit)
        return GroupFamily(
            layer=index,
            kind="attention",
            unit=unit,
            count=sizes.num_attention_heads if unit == "query_head" else sizes.num_key_value_heads,
            matrices=matrices,
            params_per_unit=_params_per_unit(layer, matrices, index),
            units_per_kv=per_kv if unit == "query_head" else 0,
        )

    def _mlp_family(self, index: int, layer: nn.Module, sizes: LayerSizes) -> GroupFamily:
        matrices = self._mlp_matrices(f"model.layers.{index}.mlp.", sizes)
        return GroupFamily(
            layer=index,
            kind="mlp",
            unit="channel",
            count=sizes.intermediate_size,
            matrices=matrices,
            params_per_unit=_params_per_unit(layer, matrices, index),
        )

    def set_layer_sizes(self, model: nn.Module, layer: int, sizes: LayerSizes) -> None:
        set_layer_widths(
            self._layers(model)[layer], sizes.num_attention_heads, sizes.num_key_value_heads, sizes.intermediate_size
        )

    def config_for_sizes(self, model: nn.Module, sizes: list[LayerSizes]) -> tuple[object, bool]:
        """The stock config when every layer has the same widths and the stock config class accepts
        them (a stock Llama insists that `hidden_size` divides by the head count), else the per-layer one."""
        source_type = model.config.model_type.removeprefix("loraprune_")
        values = model.config.to_dict()
        for key in ("model_type", "layer_sizes", "auto_map", "architectures", "transformers_version"):
            values.pop(key, None)
        values["head_dim"] = self._layers(model)[0].self_attn.head_dim
        if all(s == sizes[0] for s in sizes):
            stock_config, stock_model = self.stock_classes[source_type]
            try:
                return stock_config(**{**values, **sizes[0].to_dict()}, architectures=[stock_model.__name__]), True
            except StrictDataclassClassValidationError:
                pass  # the stock config validates widths a pruned model need not meet: save per layer
        pruned_config, pruned_model = PRUNED_CLASSES[source_type]
        values.update(
            layer_sizes=[s.to_dict() for s in sizes],
            architectures=[pruned_model.__name__],
            auto_map={
                "AutoConfig": f"modeling_loraprune.{pruned_config.__name__}",
                "AutoModelForCausalLM": f"modeling_loraprune.{pruned_model.__name__}",
            },
        )
        return pruned_config(**values), False


def _params_per_unit(layer: nn.Module, matrices: tuple[MatrixSlicing, ...], index: int) -> int:
    """Parameters one unit owns: its block of rows (with biases) or columns in each slicing."""
    return sum(m.block * _linear_params(_get(layer, m.module, index), m.dim) for m in matrices)


def _out_features(module: nn.Module) -> int:
    return getattr(module, "base_layer", module).out_features


def _get(layer: nn.Module, dotted: str, index: int) -> nn.Module:
    """The module named `dotted` (a model-level path) inside decoder layer `index`."""
    return layer.get_submodule(dotted.removeprefix(f"model.layers.{index}."))
