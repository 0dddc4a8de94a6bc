"""Qwen3 decoders: Llama-family projections plus per-head RMS norms on queries and keys.

`q_norm` and `k_norm` normalise each head's `head_dim` vector with one weight vector of
length `head_dim` shared by all heads, so removing whole heads (or KV groups) leaves them
as they are: there is nothing of theirs to slice. Sliding-window layers (`layer_types`)
are a config setting that pruning carries over unchanged.
"""

from __future__ import annotations

from transformers import Qwen3Config, Qwen3ForCausalLM

from loraprune.structure.llama import LlamaFamilyAdapter

STOCK_CLASSES = {"qwen3": (Qwen3Config, Qwen3ForCausalLM)}


class Qwen3Adapter(LlamaFamilyAdapter):
    """Group families of Qwen3 (dense) decoders; Qwen3-MoE is not covered."""

    model_types = ("qwen3", "loraprune_qwen3")
    stock_classes = STOCK_CLASSES
