"""Self-distillation during pruning: a KL term to the unpruned model's next-token distribution.

While a model is pruned under masks (LoRAPrune), or recovered under the masks of a one-shot
criterion before it is shrunk, its base weights are intact. The dense teacher is then the same
module with the masks and the LoRA adapter switched off: one extra forward pass without
gradients per micro-batch, and no second copy of the weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraprune.config import check

#: label value of positions that carry no loss (transformers' convention)
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Distillation:
    """Adds `weight · T² · KL(teacher ‖ student)` (per scored token) to the training loss.

    `dense_context()` returns a context manager under which the model computes the teacher
    (for a masked PEFT model: masks off and adapter disabled).
    """

    weight: float
    temperature: float
    dense_context: Callable[[], contextlib.AbstractContextManager]

    def __post_init__(self) -> None:
        check(self.weight > 0, f"distillation weight must be > 0, got {self.weight}")
        check(self.temperature > 0, f"distillation temperature must be > 0, got {self.temperature}")

    def teacher_logits(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's logits for `inputs` (no gradients; labels are not passed, so no loss is computed)."""
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        with torch.no_grad(), self.dense_context():
            return model(**model_inputs).logits.detach()

    def loss(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The weighted KL term over the positions that predict a label (the causal LM's shifted positions).

        Summed over those positions and divided by `num_items_in_batch` when given (the
        Trainer's normalisation across gradient-accumulation micro-batches), else averaged.
        """
        scored = labels[..., 1:] != IGNORE_INDEX
        student = student_logits[..., :-1, :][scored].float() / self.temperature
        teacher = teacher_logits[..., :-1, :][scored].float() / self.temperature
        per_token = F.kl_div(
            F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), log_target=True, reduction="none"
        ).sum(-1)
        count = num_items_in_batch if num_items_in_batch is not None else max(int(scored.sum()), 1)
        return self.weight * self.temperature**2 * per_token.sum() / count


@contextlib.contextmanager
def dense_peft_model(
    peft_model: nn.Module, unmasked: Callable[[], contextlib.AbstractContextManager]
) -> Iterator[None]:
    """`peft_model` with its adapter disabled and, inside `unmasked()`, every pruned unit back."""
    with peft_model.disable_adapter(), unmasked():
        yield
