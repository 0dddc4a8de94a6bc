"""The PEFT AdaLoRA baseline (`r0 → r`), with its budget update called by the Trainer itself.

PEFT's AdaLoRA needs `update_and_allocate(step)` after every optimizer step and before the
gradients are zeroed (PEFT #432 / #1327: users must call it by hand); `AdaLoraBudgetCallback`
does it from `on_optimizer_step`. Timing matches PrunedLoRA: AdaLoRA's warm-up `tinit`,
final phase `tfinal` and allocation interval `deltaT` are PrunedLoRA's warm-up, cool-down
and `prune_every`.
"""

from __future__ import annotations

from collections.abc import Sequence

from peft import AdaLoraConfig, PeftModel, get_peft_model
from peft.tuners.adalora import AdaLoraLayer
from transformers import PreTrainedModel, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from loraprune.cubic_schedule import CubicSchedule


def add_adalora(
    model: PreTrainedModel,
    r0: int,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    total_steps: int,
    warmup: float,
    cooldown: float,
    every: int,
) -> PeftModel:
    """Wrap `model` in a PEFT AdaLoRA adapter that starts at rank `r0` and ends at average rank `rank`.

    AdaLoRA's scaling is `alpha / r0` (it divides by its initial rank), the same as PrunedLoRA's.
    """
    timing = CubicSchedule.from_fractions(total_steps, warmup, cooldown)
    config = AdaLoraConfig(
        init_r=r0,
        target_r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        total_step=total_steps,
        tinit=timing.warmup_steps,
        tfinal=timing.cooldown_steps,
        deltaT=every,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def adalora_ranks(model: PeftModel, adapter: str = "default") -> dict[str, int]:
    """Current rank of every AdaLoRA module (its non-zero singular values), by path in the base model."""
    base = model.base_model.model
    return {
        name: int((module.lora_E[adapter] != 0).sum())
        for name, module in base.named_modules()
        if isinstance(module, AdaLoraLayer) and adapter in module.lora_E
    }


class AdaLoraBudgetCallback(TrainerCallback):
    """Calls AdaLoRA's `update_and_allocate` after each optimizer step, while gradients still exist."""

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        model.base_model.update_and_allocate(state.global_step + 1)
