"""Wrap a causal LM with a plain PEFT LoRA adapter: the shared starting point of both methods.

LoRAPrune fine-tunes a LoRA adapter while pruning the base model; PrunedLoRA starts from an
over-parameterised LoRA adapter and prunes its rank. Both begin here, with a stock
`peft.LoraConfig`, so that everything PEFT offers (saving, merging, loading) keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from loraprune.config import check

# Every linear projection of a decoder block of the supported architectures: the seven of Llama-family
# blocks (attention and gated MLP), and Phi-3's fused qkv_proj and gate_up_proj (names a model lacks match nothing).
DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "gate_up_proj",
)


def add_lora(
    model: PreTrainedModel,
    r: int,
    alpha: float | None = None,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    dropout: float = 0.0,
) -> PeftModel:
    """Return `model` wrapped in a fresh LoRA adapter of rank `r` (only the adapter is trainable).

    `alpha` defaults to `r` (scaling `alpha / r = 1`); `use_rslora` stays off so the scaling is
    exactly `alpha / r`, which the rank-pruning export relies on.
    """
    check(r >= 1, f"LoRA rank must be >= 1, got {r}")
    check(len(target_modules) > 0, "target_modules must name at least one module (e.g. q_proj)")
    check(0.0 <= dropout < 1.0, f"LoRA dropout must be in [0, 1), got {dropout}")
    config = LoraConfig(
        r=r,
        lora_alpha=r if alpha is None else alpha,
        target_modules=list(target_modules),
        lora_dropout=dropout,
        bias="none",
        task_type="CAUSAL_LM",
        use_rslora=False,
    )
    return get_peft_model(model, config)
