"""One Trainer-based fine-tuning loop shared by every method and baseline.

Methods differ only in the callbacks they pass (pruning steps, AdaLoRA's budget update), so
that "same data, same steps, same learning-rate schedule, same seed" holds by construction
when methods are compared.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from loraprune.config import check, option
from loraprune.distillation import Distillation
from loraprune.safety.checkpoints import Checkpointing
from loraprune.safety.divergence import LossGuard
from loraprune.safety.options import DIVERGENCE_FACTOR, DIVERGENCE_HELP

#: learning-rate schedules of `TrainingConfig` (transformers' names)
LR_SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup", "warmup_stable_decay")


@dataclass
class TrainingConfig:
    """Optimiser and loop settings of a fine-tuning run (AdamW, as in `transformers.Trainer`)."""

    steps: int = option(60, help="number of optimizer steps")
    learning_rate: float = option(1e-3, help="peak learning rate of AdamW")
    batch_size: int = option(8, help="examples per device per micro-batch")
    gradient_accumulation_steps: int = option(1, help="micro-batches per optimizer step")
    lr_scheduler_type: str = option(
        "linear",
        help="learning-rate schedule; warmup_stable_decay: constant, then a linear decay to zero over the last "
        "decay_fraction of the steps",
        choices=LR_SCHEDULES,
    )
    decay_fraction: float = option(
        0.2, help="warmup_stable_decay: fraction of the steps (at the end) over which the rate decays to zero"
    )
    warmup_ratio: float = option(0.0, help="fraction of the steps spent warming up the learning rate")
    weight_decay: float = option(0.0, help="AdamW weight decay")
    seed: int = option(0, help="random seed (initialisation of the adapter, data order)")
    logging_steps: int = option(10, help="log the training loss every this many steps")
    max_grad_norm: float = option(1.0, help="gradient clipping norm (0 disables clipping)")
    bf16: bool = option(False, help="train in bfloat16 autocast (CUDA or CPU; the weights keep their dtype)")
    fp16: bool = option(
        False,
        help="train in float16 autocast with a dynamic loss scaler (CUDA only); the pruners read the "
        "gradients after the Trainer has unscaled them",
    )
    gradient_checkpointing: bool = option(
        False,
        help="recompute each decoder layer's activations in the backward pass instead of storing them "
        "(non-reentrant torch.utils.checkpoint): less activation memory for one more forward pass; the "
        "gradients, and so the pruning scores, are unchanged",
    )
    report_to: str = option(
        "none",
        help="where transformers.Trainer sends the training metrics: 'none', or trackers such as "
        "'tensorboard', 'wandb', 'mlflow' (comma-separated, installed separately)",
    )
    logging_dir: str | None = option(
        None,
        help="directory for the trackers' local files (tensorboard writes its event files under "
        "LOGGING_DIR/runs/); needed with --report-to tensorboard",
    )
    divergence_factor: float = option(DIVERGENCE_FACTOR, help=DIVERGENCE_HELP)

    def __post_init__(self) -> None:
        check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        check(
            self.batch_size >= 1 and self.gradient_accumulation_steps >= 1,
            "batch_size and gradient_accumulation_steps must be >= 1",
        )
        check(0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        check(0.0 < self.decay_fraction <= 1.0, f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        check(self.weight_decay >= 0 and self.max_grad_norm >= 0, "weight_decay and max_grad_norm must be >= 0")
        check(self.logging_steps >= 1, "logging_steps must be >= 1")
        check(
            self.divergence_factor == 0 or self.divergence_factor > 1,
            f"divergence_factor must be 0 (off) or > 1, got {self.divergence_factor}",
        )
        check(not (self.bf16 and self.fp16), "choose at most one of --bf16 and --fp16")
        # on the CPU the Trainer has no float16 autocast or loss scaler and would silently train in float32
        check(
            not self.fp16 or torch.cuda.is_available(),
            "--fp16 (float16 autocast with a loss scaler) needs a CUDA GPU; on the CPU use --bf16",
        )
        check(
            "tensorboard" not in self.report_to or self.logging_dir is not None,
            "--report-to tensorboard needs --logging-dir DIR (the event files would go to a temporary directory)",
        )


#: non-reentrant checkpointing gives the LoRA layers of a frozen base their gradients without inputs that
#: require grad (transformers also makes the embeddings' output require grad for PEFT models)
CHECKPOINTING_KWARGS = {"use_reentrant": False}


def _checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """The checkpointing fields of `TrainingArguments`, named `activation_checkpointing*` in recent
    transformers 5 releases and `gradient_checkpointing*` (now their deprecated alias) before."""
    fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in fields else "gradient"
    return {
        f"{prefix}_checkpointing": enabled,
        f"{prefix}_checkpointing_kwargs": dict(CHECKPOINTING_KWARGS) if enabled else None,
    }


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Checkpoint every decoder layer of `model` (a transformers or PEFT model), as `--gradient-checkpointing`
    does inside the Trainer; for custom training loops. Active while the model is in training mode."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(CHECKPOINTING_KWARGS))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(CHECKPOINTING_KWARGS))


def _scheduler_kwargs(config: TrainingConfig) -> dict[str, Any]:
    """The extra arguments of the schedule (warmup_stable_decay: how many steps decay, linearly)."""
    if config.lr_scheduler_type != "warmup_stable_decay":
        return {}
    return {"num_decay_steps": max(1, round(config.decay_fraction * config.steps)), "decay_type": "linear"}


def training_arguments(
    config: TrainingConfig, output_dir: str, use_cpu: bool | None = None, save_steps: int = 0
) -> TrainingArguments:
    """The `TrainingArguments` of `config`: checkpoints every `save_steps` steps (0: none), no hub; on the
    CPU if `use_cpu` (default: when there is no CUDA device); non-finite losses logged as they are (not
    replaced by earlier ones)."""
    if use_cpu is None:
        use_cpu = not torch.cuda.is_available()
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        lr_scheduler_kwargs=_scheduler_kwargs(config),
        warmup_steps=config.warmup_ratio,  # transformers 5: a value below 1 is a fraction of the steps
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        logging_nan_inf_filter=False,
        bf16=config.bf16,
        fp16=config.fp16,
        **_checkpointing_arguments(config.gradient_checkpointing),
        report_to=[name.strip() for name in config.report_to.split(",")],
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        push_to_hub=False,
        use_cpu=use_cpu,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
        dataloader_pin_memory=not use_cpu,
        disable_tqdm=False,
    )


class DistillingTrainer(Trainer):
    """`Trainer` whose loss adds a `Distillation` term to the language-modelling loss."""

    def __init__(self, *args: Any, distillation: Distillation, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.distillation = distillation

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher = self.distillation.teacher_logits(model, inputs)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss = loss + self.distillation.loss(outputs.logits, teacher, inputs["labels"], num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


def train(
    model: torch.nn.Module,
    train_dataset: Any,
    data_collator: Callable[[list[dict]], dict[str, torch.Tensor]],
    config: TrainingConfig,
    callbacks: Sequence[TrainerCallback] = (),
    output_dir: str | None = None,
    distillation: Distillation | None = None,
    checkpointing: Checkpointing | None = None,
) -> list[dict]:
    """Fine-tune the trainable parameters of `model` in place and return the Trainer's log history.

    `train_dataset` is anything with `__len__` and `__getitem__` (a list of tokenised examples
    works); the data is cycled when `steps` needs more than one epoch. With `checkpointing` the
    Trainer saves checkpoints in its directory (and resumes from its `resume_from`); otherwise only
    the trackers of `config.report_to` write files, to `output_dir`, else `config.logging_dir`, else
    a temporary directory. A `LossGuard` watches the loss (`config.divergence_factor`). The training
    runs where `model` is (`loraprune.devices`): a model on the CPU trains on the CPU even where a GPU
    is visible, and one on a GPU on the Trainer's GPU. With `distillation` the loss gets its KL term
    to the teacher.
    """
    use_cpu = next(model.parameters()).device.type == "cpu"
    callbacks = [LossGuard(config.divergence_factor), *callbacks]
    if checkpointing is not None:
        callbacks.append(checkpointing.callback())  # last: its file marks a checkpoint complete
        output_dir = str(checkpointing.directory)
    resume = None if checkpointing is None or checkpointing.resume_from is None else str(checkpointing.resume_from)
    directory = output_dir or config.logging_dir
    with nullcontext(directory) if directory else tempfile.TemporaryDirectory(prefix="loraprune-train-") as where:
        extra = {} if distillation is None else {"distillation": distillation}
        trainer = (Trainer if distillation is None else DistillingTrainer)(
            model=model,
            args=training_arguments(
                config,
                where,
                use_cpu=use_cpu,
                save_steps=0 if checkpointing is None else checkpointing.save_steps,
            ),
            data_collator=data_collator,
            train_dataset=train_dataset,
            callbacks=callbacks,
            **extra,
        )
        trainer.train(resume_from_checkpoint=resume)
        return list(trainer.state.log_history)
