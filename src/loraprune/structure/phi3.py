"""Phi-3 decoders: Llama-family attention and MLP, with fused projections.

`self_attn.qkv_proj` stacks the rows of q (all query heads), then k, then v; `mlp.gate_up_proj`
stacks the gate rows, then the up rows (the MLP splits its output in two halves). A unit
therefore owns several segments of one fused matrix: a KV group `g` owns its query heads'
rows in the q segment and its head's rows in the k and v segments; an MLP channel `c` owns
row `c` of the gate half and row `c` of the up half. Each segment is a `MatrixSlicing` with
its offset; shrinking cuts the fused matrix once, so its layout stays [q | k | v] and
[gate | up]. LoRA on a fused matrix is sliced the same way (rows of `B`; `A` is shared by
all segments and keeps its shape), and scores treat each segment like the separate matrix
it replaces.

Phi-3's attention reads the query-head count from its config to split the fused output, so
after shrinking each attention gets a config of its own with its layer's head counts.
"""

from __future__ import annotations

from torch import nn
from transformers import Phi3Config, Phi3ForCausalLM

from loraprune.remote.modeling_loraprune import give_attention_its_config
from loraprune.structure.base import AttentionUnit, LayerSizes
from loraprune.structure.groups import MatrixSlicing
from loraprune.structure.llama import LlamaFamilyAdapter

STOCK_CLASSES = {"phi3": (Phi3Config, Phi3ForCausalLM)}


def _base(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)  # PEFT-wrapped layers keep the frozen one inside


class Phi3Adapter(LlamaFamilyAdapter):
    """Group families of Phi-3 decoders (`qkv_proj` and `gate_up_proj` fused)."""

    model_types = ("phi3", "loraprune_phi3")
    stock_classes = STOCK_CLASSES

    def _layer_widths(self, layer: nn.Module) -> LayerSizes:
        attn = layer.self_attn
        heads = _base(attn.o_proj).in_features // attn.head_dim
        qkv_heads = _base(attn.qkv_proj).out_features // attn.head_dim
        return LayerSizes(
            num_attention_heads=heads,
            num_key_value_heads=(qkv_heads - heads) // 2,
            intermediate_size=_base(layer.mlp.down_proj).in_features,
        )

    def _attention_matrices(
        self, prefix: str, sizes: LayerSizes, head_dim: int, unit: AttentionUnit
    ) -> tuple[MatrixSlicing, ...]:
        d = head_dim
        qkv, out = prefix + "qkv_proj", prefix + "o_proj"
        if unit == "query_head":
            return MatrixSlicing(qkv, 0, d), MatrixSlicing(out, 1, d)
        per_kv = sizes.num_attention_heads // sizes.num_key_value_heads
        q_rows, kv_rows = sizes.num_attention_heads * d, sizes.num_key_value_heads * d
        return (
            MatrixSlicing(qkv, 0, d * per_kv),
            MatrixSlicing(qkv, 0, d, offset=q_rows),
            MatrixSlicing(qkv, 0, d, offset=q_rows + kv_rows),
            MatrixSlicing(out, 1, d * per_kv),
        )

    def _mlp_matrices(self, prefix: str, sizes: LayerSizes) -> tuple[MatrixSlicing, ...]:
        fused = prefix + "gate_up_proj"
        return (
            MatrixSlicing(fused, 0, 1),
            MatrixSlicing(fused, 0, 1, offset=sizes.intermediate_size),
            MatrixSlicing(prefix + "down_proj", 1, 1),
        )

    def set_layer_sizes(self, model: nn.Module, layer: int, sizes: LayerSizes) -> None:
        super().set_layer_sizes(model, layer, sizes)
        give_attention_its_config(self._layers(model)[layer], sizes.num_attention_heads, sizes.num_key_value_heads)
