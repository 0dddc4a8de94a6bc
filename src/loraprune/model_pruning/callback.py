"""`transformers.TrainerCallback` that runs LoRAPrune inside `Trainer.train()` (or TRL's SFTTrainer).

    callback = LoRAPruneCallback(PruningTarget(sparsity=0.5))
    Trainer(model=add_lora(model, r=8), args=..., train_dataset=..., callbacks=[callback]).train()
    callback.pruner.finish()   # physically smaller base model and LoRA, ready to merge and save

The Trainer (transformers 5) runs, per optimizer step: the micro-batches' backward passes,
gradient clipping (with `fp16` the loss scaler unscales the gradients first; without
clipping the norm is still computed, which unscales too), `on_pre_optimizer_step`,
`optimizer.step()`, `on_optimizer_step`, then `zero_grad`. So the LoRA gradients are read
in `on_pre_optimizer_step`, final and unscaled (clipping multiplies every gradient of the
step by the same factor, which the per-matrix normalisation of the scores removes), and
pruning runs in `on_optimizer_step`, when the optimizer state to zero exists. The activation
gradients of the default score were taken during the backward passes, under the loss scale
of `fp16`: the callback divides it out (accelerate keeps the `GradScaler` on the optimizer).

Distributed runs (`torchrun` / `accelerate launch`): under DDP the gradients of the last
micro-batch are all-reduced during its backward pass (the others run under `no_sync`), so
`on_pre_optimizer_step` sees the same averaged gradients on every rank, every rank computes the
same scores, and the masks are broadcast from rank 0 at each pruning event. The callback gets
the unwrapped model (`Trainer.model`), so module paths carry no `module.` prefix. Under FSDP2
(`fsdp_config={"version": 2}`) the gradients are reduce-scattered shards; the scores are
computed on the local shards and reduced (`loraprune.distributed`). `finish()` needs the
unsharded model: load `loraprune.distributed.full_state_dict(model)` into a copy and shrink
that with the pruner's `families` and `masks`.

Checkpoints: `on_save` writes the pruner's state (`STATE_FILE`) into the Trainer's
checkpoint folder; when a run resumes (`trainer.train(resume_from_checkpoint=...)`), the
state is read back from `<output_dir>/checkpoint-<step>` or from `resume_from`. Only the
main process writes it; every process reads it back.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from loraprune.errors import LoraPruneError
from loraprune.model_pruning.config import LoRAPruneConfig
from loraprune.model_pruning.pruner import ModelPruner, PruningTarget
from loraprune.safety.checkpoints import PrunerCheckpoint

logger = logging.getLogger(__name__)

STATE_FILE = "loraprune_model_pruning.pt"


class LoRAPruneCallback(TrainerCallback):
    """Prunes heads / KV groups and MLP channels of the base model while `Trainer` trains its LoRA adapter.

    `pruner` (a `ModelPruner`) holds the masks, scores and history once training has begun.
    """

    def __init__(
        self,
        target: PruningTarget,
        config: LoRAPruneConfig | None = None,
        adapter: str = "default",
        resume_from: str | Path | None = None,
    ) -> None:
        self.target = target
        self.config = config or LoRAPruneConfig()
        self.adapter = adapter
        self.checkpoint = PrunerCheckpoint(STATE_FILE, type(self).__name__, resume_from)
        self.pruner: ModelPruner | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model=None,
        optimizer=None,
        **kwargs,
    ) -> None:
        if self.pruner is not None:
            raise LoraPruneError("a LoRAPruneCallback prunes one training run; create a new one per Trainer")
        self.pruner = ModelPruner(model, state.max_steps, self.target, self.config, self.adapter)
        if state.global_step > 0:
            self.pruner.load_state_dict(self.checkpoint.load(args, state), optimizer)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, optimizer=None, **kwargs
    ) -> None:
        self.pruner.observe(backward_scale=_loss_scale(optimizer))

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, optimizer=None, **kwargs
    ) -> None:
        self.pruner.after_optimizer_step(optimizer)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self.checkpoint.save(args, state, self.pruner.state_dict)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if not self.pruner.finished:
            logger.warning(
                "LoRAPrune: training ended at step %d before the target was reached (%.2f%% of decoder "
                "params removed); the schedule reaches it at step %d",
                state.global_step,
                100 * self.pruner.decoder_sparsity(),
                self.pruner.schedule.ramp_end,
            )


def _loss_scale(optimizer) -> float:
    """The AMP loss scale of this step's backward pass (accelerate keeps its `GradScaler` on the optimizer), or 1."""
    scaler = getattr(optimizer, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
