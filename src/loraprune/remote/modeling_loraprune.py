"""Llama-family causal LMs whose decoder layers have individual widths (written by loraprune).

A structurally pruned model keeps the architecture of its source model (Llama, Mistral,
Qwen2, Qwen3, Gemma 2, Gemma 3 text, Phi-3), but each decoder layer may keep a different
number of attention heads, key/value heads and MLP channels. The config lists them in
`layer_sizes` (one dict per layer); these classes build the source architecture and then
give each layer its own projection shapes, so the saved weights load as they are.

This file is self-contained on purpose (it only needs `torch` and `transformers`): it is
shipped beside the weights so `AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)` works without loraprune installed.
"""

from __future__ import annotations

import copy

from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

SIZE_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def _linear_like(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """An empty linear layer with new sizes, on the device and dtype of `old`."""
    return nn.Linear(
        in_features, out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )


def _projection_shapes(
    hidden: int, head_dim: int, heads: int, kv_heads: int, intermediate: int
) -> dict[str, tuple[int, int]]:
    """(in, out) features of every projection a decoder layer of these widths may have, by its
    path in the layer: separate q/k/v and gate/up matrices, or Phi-3's fused ones."""
    return {
        "self_attn.q_proj": (hidden, heads * head_dim),
        "self_attn.k_proj": (hidden, kv_heads * head_dim),
        "self_attn.v_proj": (hidden, kv_heads * head_dim),
        "self_attn.qkv_proj": (hidden, (heads + 2 * kv_heads) * head_dim),
        "self_attn.o_proj": (heads * head_dim, hidden),
        "mlp.gate_proj": (hidden, intermediate),
        "mlp.up_proj": (hidden, intermediate),
        "mlp.gate_up_proj": (hidden, 2 * intermediate),
        "mlp.down_proj": (intermediate, hidden),
    }


def set_layer_widths(
    layer: nn.Module, num_attention_heads: int, num_key_value_heads: int, intermediate_size: int
) -> None:
    """Update the attributes (not the weights) through which a decoder layer's code knows its widths."""
    attn, mlp = layer.self_attn, layer.mlp
    attn.num_key_value_groups = num_attention_heads // num_key_value_heads
    if hasattr(attn, "num_key_value_heads"):  # Phi-3 splits its fused qkv output by it
        attn.num_key_value_heads = num_key_value_heads
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = intermediate_size


def give_attention_its_config(layer: nn.Module, num_attention_heads: int, num_key_value_heads: int) -> None:
    """Give the layer's attention a copy of the config with its own head counts.

    For attention code that reads the head count from the config at every forward pass (Phi-3
    splits `qkv_proj`'s output at `config.num_attention_heads · head_dim`). The copy does not follow
    later changes of the model's config.
    """
    attn = layer.self_attn
    attn.config = copy.copy(attn.config)
    attn.config.num_attention_heads = num_attention_heads
    attn.config.num_key_value_heads = num_key_value_heads


def resize_decoder_layer(
    layer: nn.Module, num_attention_heads: int, num_key_value_heads: int, intermediate_size: int
) -> None:
    """Give one decoder layer new (uninitialised) projections of the stated widths."""
    hidden = layer.self_attn.o_proj.out_features
    shapes = _projection_shapes(
        hidden, layer.self_attn.head_dim, num_attention_heads, num_key_value_heads, intermediate_size
    )
    for path, (in_features, out_features) in shapes.items():
        block_name, name = path.split(".")
        block = getattr(layer, block_name)
        old = getattr(block, name, None)
        if old is not None:
            setattr(block, name, _linear_like(old, in_features, out_features))
    set_layer_widths(layer, num_attention_heads, num_key_value_heads, intermediate_size)


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


class LoraPrunedQwen3Config(Qwen3Config):
    """`Qwen3Config` plus `layer_sizes` (one dict of widths per decoder layer)."""

    model_type = "loraprune_qwen3"


class LoraPrunedGemma2Config(Gemma2Config):
    """`Gemma2Config` plus `layer_sizes`; `head_dim` is explicit, as in every Gemma config."""

    model_type = "loraprune_gemma2"

    def validate_architecture(self) -> None:
        """Widths vary per layer, so `hidden_size` need not divide by the head count."""


class LoraPrunedGemma3TextConfig(Gemma3TextConfig):
    """`Gemma3TextConfig` plus `layer_sizes`; `head_dim` is explicit, as in every Gemma config."""

    model_type = "loraprune_gemma3_text"

    def validate_architecture(self) -> None:
        """Widths vary per layer, so `hidden_size` need not divide by the head count."""


class LoraPrunedPhi3Config(Phi3Config):
    """`Phi3Config` plus `layer_sizes` and an explicit `head_dim` (stock Phi-3 derives it from the
    global head count, which per-layer widths make meaningless)."""

    model_type = "loraprune_phi3"

    def validate_rope(self) -> None:
        """Skipped: the stock check sizes LongRoPE's per-head factors by `hidden_size // num_attention_heads`,
        not by the `head_dim` that pruning keeps."""


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


class LoraPrunedQwen3ForCausalLM(Qwen3ForCausalLM):
    """`Qwen3ForCausalLM` with per-layer widths (`q_norm` / `k_norm` act per head and keep their size)."""

    config_class = LoraPrunedQwen3Config

    def __init__(self, config: LoraPrunedQwen3Config) -> None:
        super().__init__(config)
        _apply_layer_sizes(self, config.layer_sizes)


class LoraPrunedGemma2ForCausalLM(Gemma2ForCausalLM):
    """`Gemma2ForCausalLM` with per-layer widths from `config.layer_sizes`."""

    config_class = LoraPrunedGemma2Config

    def __init__(self, config: LoraPrunedGemma2Config) -> None:
        super().__init__(config)
        _apply_layer_sizes(self, config.layer_sizes)


class LoraPrunedGemma3ForCausalLM(Gemma3ForCausalLM):
    """`Gemma3ForCausalLM` (text only) with per-layer widths from `config.layer_sizes`."""

    config_class = LoraPrunedGemma3TextConfig

    def __init__(self, config: LoraPrunedGemma3TextConfig) -> None:
        super().__init__(config)
        _apply_layer_sizes(self, config.layer_sizes)


class LoraPrunedPhi3ForCausalLM(Phi3ForCausalLM):
    """`Phi3ForCausalLM` with per-layer widths; each attention gets a config with its own head counts."""

    config_class = LoraPrunedPhi3Config

    def __init__(self, config: LoraPrunedPhi3Config) -> None:
        super().__init__(config)
        _apply_layer_sizes(self, config.layer_sizes)
        for layer, sizes in zip(self.model.layers, config.layer_sizes):
            give_attention_its_config(layer, int(sizes["num_attention_heads"]), int(sizes["num_key_value_heads"]))


# source model_type -> (config class, model class) used for per-layer-width models
PRUNED_CLASSES = {
    "llama": (LoraPrunedLlamaConfig, LoraPrunedLlamaForCausalLM),
    "mistral": (LoraPrunedMistralConfig, LoraPrunedMistralForCausalLM),
    "qwen2": (LoraPrunedQwen2Config, LoraPrunedQwen2ForCausalLM),
    "qwen3": (LoraPrunedQwen3Config, LoraPrunedQwen3ForCausalLM),
    "gemma2": (LoraPrunedGemma2Config, LoraPrunedGemma2ForCausalLM),
    "gemma3_text": (LoraPrunedGemma3TextConfig, LoraPrunedGemma3ForCausalLM),
    "phi3": (LoraPrunedPhi3Config, LoraPrunedPhi3ForCausalLM),
}
