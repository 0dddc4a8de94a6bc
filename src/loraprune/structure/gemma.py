"""Gemma 2 and Gemma 3 (text) decoders: Llama-family projections with Gemma's extras.

What differs from Llama and why none of it needs slicing:

* `head_dim` is explicit (256 in the released models, not `hidden_size / heads`): the
  adapter reads it from the attention module, and the saved config states it.
* Extra RMS norms around the MLP (`pre_feedforward_layernorm`, `post_feedforward_layernorm`)
  and after attention act on the hidden size, which pruning keeps; Gemma 3's `q_norm` /
  `k_norm` act on one head's `head_dim` and are shared by the heads, like Qwen3's.
* Attention and final-logit soft-capping, the query scale `query_pre_attn_scalar`,
  sliding-window layers (`layer_types`) and the embedding scale `sqrt(hidden_size)` are
  config values independent of the head and channel counts; they are carried over.

Gemma 3 is covered as its text model (`Gemma3ForCausalLM`, `model_type` "gemma3_text");
the multimodal `Gemma3ForConditionalGeneration` is not.
"""

from __future__ import annotations

from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

from loraprune.structure.llama import LlamaFamilyAdapter

STOCK_CLASSES = {
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
}


class GemmaAdapter(LlamaFamilyAdapter):
    """Group families of Gemma 2 and Gemma 3 text decoders."""

    model_types = ("gemma2", "gemma3_text", "loraprune_gemma2", "loraprune_gemma3_text")
    stock_classes = STOCK_CLASSES
