"""`transformers.TrainerCallback` that runs PrunedLoRA inside `Trainer.train()`: no manual calls.

The Trainer (transformers 5) calls, per optimizer step: gradient clipping (which also unscales
AMP gradients), `on_pre_optimizer_step`, `optimizer.step()`, `on_optimizer_step`, then
`zero_grad`. Gradients are therefore read in `on_pre_optimizer_step`: final, all-reduced and
unscaled (but clipped when `max_grad_norm > 0`, a common factor for all modules of a step).
Pruning runs in `on_optimizer_step`, so the optimizer state to zero already exists.

Distributed runs (`torchrun` / `accelerate launch`): under DDP the gradients are all-reduced
by the end of the last micro-batch's backward pass, so every rank accumulates the same
curvature statistics and takes the same decisions; the masks and LoRA weights are broadcast
from rank 0 after each event. Under FSDP2 the (small) LoRA matrices and gradients are gathered
whole for the statistics and scores, and each rank writes the recovery update into its own
shards. Checkpoints (`on_save`) carry the pruner's state in `STATE_FILE`; a resumed run reads it back
from `<output_dir>/checkpoint-<step>` or `resume_from`. Export from the main process after loading
`loraprune.distributed.full_state_dict(model)` into an unsharded copy:
`export_pruned_adapter(copy, pruner.active_components(), ...)`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from loraprune.errors import LoraPruneError
from loraprune.rank_pruning.calibration import HeldOutLoss
from loraprune.rank_pruning.config import RankPruningConfig
from loraprune.rank_pruning.pruner import RankPruner
from loraprune.safety.checkpoints import PrunerCheckpoint

#: file of a Trainer checkpoint folder that holds PrunedLoRA's state
STATE_FILE = "loraprune_rank_pruning.pt"

logger = logging.getLogger(__name__)


class RankPruningCallback(TrainerCallback):
    """Prunes the rank of the model's LoRA adapter while `Trainer` trains it; `pruner` holds the result.

    `held_out`: a collated batch (with labels) the model does not train on; every pruning event
    then measures its loss change on it (`calibration.py`). The examples per optimizer step that
    scale the curvature are read from the training arguments. `resume_from`: the checkpoint folder
    whose pruning state a resumed run reads.
    """

    def __init__(
        self,
        config: RankPruningConfig,
        adapter: str = "default",
        resume_from: str | Path | None = None,
        held_out: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.config = config
        self.adapter = adapter
        self.checkpoint = PrunerCheckpoint(STATE_FILE, type(self).__name__, resume_from)
        self.held_out = held_out
        self.pruner: RankPruner | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        if self.pruner is not None:
            raise LoraPruneError("a RankPruningCallback prunes one training run; create a new one per run")
        examples = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self.pruner = RankPruner(
            model,
            self.config,
            total_steps=state.max_steps,
            adapter=self.adapter,
            examples_per_step=examples,
            held_out=None if self.held_out is None else HeldOutLoss(model, self.held_out),
        )
        if state.global_step > 0:
            self.pruner.load_state_dict(self.checkpoint.load(args, state))

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        self.pruner.observe_gradients()

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, optimizer=None, **kwargs
    ) -> None:
        self.pruner.step(state.global_step + 1, optimizer)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self.checkpoint.save(args, state, lambda: {**self.pruner.state_dict(), "step": state.global_step})

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if not self.pruner.finished:
            logger.warning(
                "training ended before the last pruning event (step %d): the final rank budget "
                "was not reached; current total rank %d",
                self.pruner.schedule.events[-1],
                sum(self.pruner.ranks().values()),
            )
