"""Tiny random Llama-family models built from configs, for fast structural tests."""

from __future__ import annotations

import torch
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

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
    "phi3": (Phi3Config, Phi3ForCausalLM),
}

# Settings that make each architecture's peculiarities act on a 12-token batch: biases where it
# can have them, a sliding window shorter than the batch, soft-capping; Phi-3's default special
# token ids lie outside the tiny vocabulary.
_EXTRAS: dict[str, dict] = {
    "llama": {"attention_bias": True, "mlp_bias": True},
    "qwen3": {"attention_bias": True, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    "gemma2": {
        "attention_bias": True,
        "sliding_window": 4,
        "attn_logit_softcapping": 2.0,
        "final_logit_softcapping": 3.0,
    },
    "gemma3_text": {
        "attention_bias": True,
        "sliding_window": 4,
        "sliding_window_pattern": 2,  # every second layer attends globally
        "attn_logit_softcapping": 2.0,
        "final_logit_softcapping": 3.0,
    },
    "phi3": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
}


def tiny_model(
    arch: str = "llama",
    *,
    heads: int = 4,
    kv_heads: int = 2,
    layers: int = 2,
    hidden: int = 48,
    intermediate: int = 24,
    head_dim: int = 8,
    vocab: int = 64,
    seed: int = 0,
    tie: bool = False,
) -> torch.nn.Module:
    """A random fp32 causal LM; biases are made non-zero so slicing them is checked too."""
    config_class, model_class = ARCHITECTURES[arch]
    config = config_class(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        attn_implementation="eager",
        **_EXTRAS.get(arch, {}),
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
            elif "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def token_batch(vocab: int = 64, batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)
