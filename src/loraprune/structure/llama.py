"""Llama-family decoders: Llama 1-3, Mistral, Qwen2 (q/k/v biases) and SmolLM2.

They share module names (`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`), rotary
attention with grouped key/values, and a gated MLP. Biases, where present, live on the
rows they belong to and are sliced with them.
"""

from __future__ import annotations

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
from loraprune.remote.modeling_loraprune import PRUNED_CLASSES
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
    """Group families of Llama-family decoders, MHA and GQA alike."""

    model_types = ("llama", "mistral", "qwen2", "loraprune_llama", "loraprune_mistral", "loraprune_qwen2")

    def _layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def layer_sizes(self, model: nn.Module) -> list[LayerSizes]:
        sizes = []
        for layer in self._layers(model):
            attn = layer.self_attn
            head_dim = attn.head_dim
            sizes.append(
                LayerSizes(
                    num_attention_heads=_out_features(attn.q_proj) // head_dim,
                    num_key_value_heads=_out_features(attn.k_proj) // head_dim,
                    intermediate_size=_out_features(layer.mlp.up_proj),
                )
            )
        return sizes

    def families(self, model: nn.Module, attention_unit: AttentionUnit = "auto") -> list[GroupFamily]:
        families: list[GroupFamily] = []
        for index, (layer, sizes) in enumerate(zip(self._layers(model), self.layer_sizes(model))):
            families.append(self._attention_family(index, layer, sizes, attention_unit))
            families.append(self._mlp_family(index, layer, sizes))
        return families

    def _attention_family(self, index: int, layer: nn.Module, sizes: LayerSizes, unit: AttentionUnit) -> GroupFamily:
        attn = layer.self_attn
        d = attn.head_dim
        per_kv = sizes.num_attention_heads // sizes.num_key_value_heads
        if unit == "auto":
            unit = "head" if per_kv == 1 else "kv_group"
        if unit == "head" and per_kv != 1:
            raise ConfigError(
                f"layer {index} uses grouped-query attention ({sizes.num_attention_heads} query heads share "
                f"{sizes.num_key_value_heads} key/value heads): choose the attention unit 'kv_group' or "
                "'query_head', not 'head'"
            )
        prefix = f"model.layers.{index}.self_attn."
        if unit == "query_head":
            rows = (MatrixSlicing(prefix + "q_proj", 0, d),)
            cols = (MatrixSlicing(prefix + "o_proj", 1, d),)
            count = sizes.num_attention_heads
        else:  # a head (MHA) or a whole KV group: one k/v head with its query heads
            rows = (
                MatrixSlicing(prefix + "q_proj", 0, d * per_kv),
                MatrixSlicing(prefix + "k_proj", 0, d),
                MatrixSlicing(prefix + "v_proj", 0, d),
            )
            cols = (MatrixSlicing(prefix + "o_proj", 1, d * per_kv),)
            count = sizes.num_key_value_heads
        matrices = rows + cols
        params = sum(m.block * _linear_params(_get(layer, m.module, index), m.dim) for m in matrices)
        return GroupFamily(
            layer=index,
            kind="attention",
            unit=unit,
            count=count,
            matrices=matrices,
            params_per_unit=params,
            units_per_kv=per_kv if unit == "query_head" else 0,
        )

    def _mlp_family(self, index: int, layer: nn.Module, sizes: LayerSizes) -> GroupFamily:
        prefix = f"model.layers.{index}.mlp."
        matrices = (
            MatrixSlicing(prefix + "gate_proj", 0, 1),
            MatrixSlicing(prefix + "up_proj", 0, 1),
            MatrixSlicing(prefix + "down_proj", 1, 1),
        )
        params = sum(_linear_params(_get(layer, m.module, index), m.dim) for m in matrices)
        return GroupFamily(
            layer=index,
            kind="mlp",
            unit="channel",
            count=sizes.intermediate_size,
            matrices=matrices,
            params_per_unit=params,
        )

    def set_layer_sizes(self, model: nn.Module, layer: int, sizes: LayerSizes) -> None:
        attn = self._layers(model)[layer].self_attn
        attn.num_key_value_groups = sizes.num_attention_heads // sizes.num_key_value_heads
        mlp = self._layers(model)[layer].mlp
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = sizes.intermediate_size

    def config_for_sizes(self, model: nn.Module, sizes: list[LayerSizes]) -> tuple[object, bool]:
        source_type = model.config.model_type.removeprefix("loraprune_")
        values = model.config.to_dict()
        for key in ("model_type", "layer_sizes", "auto_map", "architectures", "transformers_version"):
            values.pop(key, None)
        values["head_dim"] = self._layers(model)[0].self_attn.head_dim
        uniform = all(s == sizes[0] for s in sizes)
        # Stock Llama configs insist that hidden_size divides by the head count.
        stock_accepts = source_type != "llama" or values["hidden_size"] % sizes[0].num_attention_heads == 0
        if uniform and stock_accepts:
            stock_config, stock_model = STOCK_CLASSES[source_type]
            values.update(sizes[0].to_dict(), architectures=[stock_model.__name__])
            return stock_config(**values), True
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


def _out_features(module: nn.Module) -> int:
    return getattr(module, "base_layer", module).out_features


def _get(layer: nn.Module, dotted: str, index: int) -> nn.Module:
    """The module named `dotted` (a model-level path) inside decoder layer `index`."""
    return layer.get_submodule(dotted.removeprefix(f"model.layers.{index}."))
