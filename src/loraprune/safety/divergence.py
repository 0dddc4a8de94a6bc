"""Watch the training loss: stop a diverging run early and remember where the loss went non-finite.

`LossGuard` hooks the model's forward pass, so it sees the loss of every micro-batch (the
Trainer only logs every `logging_steps`). The starting loss is the mean loss of the first
optimizer step: for LoRAPrune and PrunedLoRA that is the unpruned model's. A step whose mean
loss is non-finite, or above `factor` times the starting loss, raises `DivergenceError` with
advice to lower the learning rate; `factor` 0 turns the guard off (the loss is then only
recorded, and the save refuses non-finite weights).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from loraprune.errors import LoraPruneError

#: keys of the log-history entries in which `LossGuard` records the first step with a non-finite loss and
#: the starting loss (the Trainer saves the log history in its checkpoints, so a resumed run keeps both)
NONFINITE_STEP_KEY = "first_nonfinite_loss_step"
START_LOSS_KEY = "starting_loss"


class DivergenceError(LoraPruneError):
    """The training loss went non-finite or far above its starting value."""


class LossGuard(TrainerCallback):
    """Records every optimizer step's mean training loss and stops the run when it diverges."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.start_loss: float | None = None
        self.first_nonfinite_step: int | None = None
        self._sum = 0.0
        self._count = 0
        self._hook = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        self._hook = model.register_forward_hook(self._record)
        self.start_loss = next((e[START_LOSS_KEY] for e in state.log_history if START_LOSS_KEY in e), None)
        self.first_nonfinite_step = nonfinite_loss_step(state.log_history)

    def _record(self, module: nn.Module, _args: tuple, output: Any) -> None:
        loss = getattr(output, "loss", None)
        if module.training and loss is not None:
            self._sum += float(loss.detach().float())
            self._count += 1

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if not self._count:
            return
        loss, self._sum, self._count = self._sum / self._count, 0.0, 0
        step = state.global_step
        if not math.isfinite(loss):
            if self.first_nonfinite_step is None:
                self.first_nonfinite_step = step
                state.log_history.append({NONFINITE_STEP_KEY: step, "step": step})
            if self.factor > 0:
                raise DivergenceError(
                    f"the training loss is {loss} at step {step}: the run diverged; lower --learning-rate "
                    f"(it is {args.learning_rate:g}). Nothing was written"
                )
            return
        if self.start_loss is None:
            self.start_loss = loss
            state.log_history.append({START_LOSS_KEY: loss, "step": step})
        elif self.factor > 0 and loss > self.factor * self.start_loss:
            raise DivergenceError(
                f"the training loss rose to {loss:.4g} at step {step}, above {self.factor:g} x its starting value "
                f"{self.start_loss:.4g}: the run diverged; lower --learning-rate (it is {args.learning_rate:g}), "
                "or pass --divergence-factor 0 to train on. Nothing was written"
            )

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def nonfinite_loss_step(log_history: list[dict[str, Any]]) -> int | None:
    """The step `LossGuard` recorded as the first with a non-finite loss, or None."""
    return next((entry[NONFINITE_STEP_KEY] for entry in log_history if NONFINITE_STEP_KEY in entry), None)
