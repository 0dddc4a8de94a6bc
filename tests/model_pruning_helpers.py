"""Shared set-up of the LoRAPrune tests: a tiny LoRA model, a token dataset, a short training config."""

from __future__ import annotations

import torch
from transformers import default_data_collator

from loraprune.lora import add_lora
from loraprune.training import TrainingConfig
from tiny_models import tiny_model


def lora_model(seed: int = 0, layers: int = 3, r: int = 4):
    """A tiny GQA Llama (4 query heads on 2 KV heads, 24 MLP channels per layer) with LoRA on all projections."""
    torch.manual_seed(seed + 100)  # LoRA initialisation
    return add_lora(tiny_model(seed=seed, layers=layers), r=r, alpha=2 * r)


def token_dataset(count: int = 48, length: int = 16, vocab: int = 64, seed: int = 5) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (count, length), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


COLLATOR = default_data_collator


def training(steps: int = 20, **overrides) -> TrainingConfig:
    values = {"steps": steps, "learning_rate": 1e-2, "batch_size": 4, "logging_steps": 100, "seed": 0}
    values.update(overrides)
    return TrainingConfig(**values)


def base_weights(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, param) for name, param in model.named_parameters() if "lora_" not in name]
