"""Llama-family causal LMs whose decoder layers have individual widths (written by loraprune).

A structurally pruned model keeps the architecture of its source model, but each decoder
layer may keep a different number of attention heads, key/value heads and MLP channels.
The config lists them in `layer_sizes` (one dict per layer); these classes build the
source architecture and then give each layer its own projection shapes, so the saved
weights load as they are.

This file is self-contained on purpose (it only needs `torch` and `transformers`): it is
shipped beside the weights so `AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)` works without loraprune installed.
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

SIZE_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def _linear_like(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """An empty linear layer with new sizes, on the device and dtype of `old`."""
    return nn.Linear(
        in_features, out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )


def resize_decoder_layer(
    layer: nn.Module, num_attention_heads: int, num_key_value_heads: int, intermediate_size: int
) -> None:
    """Give one decoder layer new (uninitialised) projections of the stated widths."""
    attn, mlp = layer.self_attn, layer.mlp
    head_dim = attn.head_dim
    hidden = attn.q_proj.in_features
    attn.q_proj = _linear_like(attn.q_proj, hidden, num_attention_heads * head_dim)
    attn.k_proj = _linear_like(attn.k_proj, hidden, num_key_value_heads * head_dim)
    attn.v_proj = _linear_like(attn.v_proj, hidden, num_key_value_heads * head_dim)
    attn.o_proj = _linear_like(attn.o_proj, num_attention_heads * head_dim, hidden)
    attn.num_key_value_groups = num_attention_heads // num_key_value_heads
    mlp.gate_proj = _linear_like(mlp.gate_proj, hidden, intermediate_size)
    mlp.up_proj = _linear_like(mlp.up_proj, hidden, intermediate_size)
    mlp.down_proj = _linear_like(mlp.down_proj, intermediate_size, hidden)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = intermediate_size


def _apply_layer_sizes(model: nn.Module, layer_sizes: list[dict]) -> None:
    layers = model.model.layers
    if len(layer_sizes) != len(layers):
        raise ValueError(f"config.layer_sizes has {len(layer_sizes)} entries for {len(layers)} decoder layers")
    for layer, sizes in zip(layers, layer_sizes):
        resize_decoder_layer(layer, *(int(sizes[key]) for key in SIZE_KEYS))


class LoraPrunedLlamaConfig(LlamaConfig):
    """`LlamaConfig` plus `layer_sizes`; the global head count only sets `head_dim`'s default."""

    model_type = "loraprune_llama"

    def validate_architecture(self) -> None:
        """Widths vary per layer, so `hidden_size` need not divide by the head count."""


class LoraPrunedMistralConfig(MistralConfig):
    """`MistralConfig` plus `layer_sizes` (one dict of widths per decoder layer)."""

    model_type = "loraprune_mistral"


class LoraPrunedQwen2Config(Qwen2Config):
    """`Qwen2Config` plus `layer_sizes` (one dict of widths per decoder layer)."""

    model_type = "loraprune_qwen2"


class LoraPrunedLlamaForCausalLM(LlamaForCausalLM):
    """`LlamaForCausalLM` with per-layer widths from `config.layer_sizes`."""

    config_class = LoraPrunedLlamaConfig

    def __init__(self, config: LoraPrunedLlamaConfig) -> None:
        super().__init__(config)
        _apply_layer_sizes(self, config.layer_sizes)


class LoraPrunedMistralForCausalLM(MistralForCausalLM):
    """`MistralForCausalLM` with per-layer widths from `config.layer_sizes`."""

    config_class = LoraPrunedMistralConfig

    def __init__(self, config: LoraPrunedMistralConfig) -> None:
        super().__init__(config)
        _apply_layer_sizes(self, config.layer_sizes)


class LoraPrunedQwen2ForCausalLM(Qwen2ForCausalLM):
    """`Qwen2ForCausalLM` with per-layer widths from `config.layer_sizes`."""

    config_class = LoraPrunedQwen2Config

    def __init__(self, config: LoraPrunedQwen2Config) -> None:
        super().__init__(config)
        _apply_layer_sizes(self, config.layer_sizes)


# source model_type -> (config class, model class) used for per-layer-width models
PRUNED_CLASSES = {
    "llama": (LoraPrunedLlamaConfig, LoraPrunedLlamaForCausalLM),
    "mistral": (LoraPrunedMistralConfig, LoraPrunedMistralForCausalLM),
    "qwen2": (LoraPrunedQwen2Config, LoraPrunedQwen2ForCausalLM),
}
