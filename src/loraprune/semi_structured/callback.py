"""`transformers.TrainerCallback`s for N:M training: LoRAPrune N:M, and LoRA recovery under a fixed N:M mask.

The Trainer calls `on_pre_optimizer_step` with the final, unscaled gradients of a step and
`on_optimizer_step` after `optimizer.step()` (see `loraprune.model_pruning.callback`), so the
pruner reads the LoRA gradients in the first and tightens the masks in the second. Checkpoints
carry the pruner's state (`STATE_FILE`), so a run resumes exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from loraprune.errors import LoraPruneError
from loraprune.model_pruning.config import LoRAPruneConfig
from loraprune.safety.checkpoints import PrunerCheckpoint
from loraprune.semi_structured.masked_lora import MaskedMergedForward
from loraprune.semi_structured.pattern import NMPattern
from loraprune.semi_structured.pruner import NMPruner

#: file of a Trainer checkpoint folder that holds LoRAPrune N:M's state (element scores and masks)
STATE_FILE = "loraprune_nm_pruning.pt"


class NMPruneCallback(TrainerCallback):
    """Runs an `NMPruner` inside `Trainer.train()`; `pruner.finish()` afterwards gives the merged N:M model."""

    def __init__(
        self,
        pattern: NMPattern,
        config: LoRAPruneConfig | None = None,
        layers: str = "all",
        adapter: str = "default",
        resume_from: str | Path | None = None,
    ) -> None:
        self.checkpoint = PrunerCheckpoint(STATE_FILE, type(self).__name__, resume_from)
        self.pattern = pattern
        self.config = config or LoRAPruneConfig()
        self.layers = layers
        self.adapter = adapter
        self.pruner: NMPruner | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        if self.pruner is not None:
            raise LoraPruneError("an NMPruneCallback prunes one training run; create a new one per Trainer")
        self.pruner = NMPruner(model, state.max_steps, self.pattern, self.config, self.layers, self.adapter)
        if state.global_step > 0:
            self.pruner.load_state_dict(self.checkpoint.load(args, state))

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        self.pruner.observe()

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        self.pruner.after_optimizer_step()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self.checkpoint.save(args, state, self.pruner.state_dict)


class FixedMaskCallback(TrainerCallback):
    """Trains LoRA under fixed keep-masks (recovery after one-shot N:M pruning): the forward uses
    `mask ⊙ (W0 + s·B·A)`, so merging with `merge_masked` keeps the pattern."""

    def __init__(self, masks: dict[str, torch.Tensor], adapter: str = "default") -> None:
        self.masks = masks
        self.adapter = adapter
        self.forward: MaskedMergedForward | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        if self.forward is None:
            self.forward = MaskedMergedForward(model, self.masks, self.adapter)
