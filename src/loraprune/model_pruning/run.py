"""Whole runs of the model-pruning harness: LoRA training with LoRAPrune, or LoRA recovery after one-shot pruning.

Every method goes through `train_lora` (same windows of text, same steps, LoRA rank and
alpha, learning rate, batch size and seed via `loraprune.training.train`); LoRAPrune only
adds its callback. So "same data, same step budget" holds by construction when LoRAPrune is
compared with the one-shot criteria followed by recovery fine-tuning, or with the dense
model given the same fine-tuning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback, default_data_collator

from loraprune.config import check
from loraprune.data import load_text, token_windows
from loraprune.distillation import Distillation, dense_peft_model
from loraprune.distributed import is_main_process
from loraprune.errors import LoraPruneError
from loraprune.kbit import full_precision_copy, is_kbit_model
from loraprune.lora import DEFAULT_TARGET_MODULES, add_lora
from loraprune.masking import MaskHooks
from loraprune.model_pruning.callback import LoRAPruneCallback
from loraprune.model_pruning.config import LoRAPruneConfig
from loraprune.model_pruning.pruner import ModelPruner, PruningTarget
from loraprune.run_report.record import loss_history
from loraprune.safety.evidence import require_target
from loraprune.safety.options import DIVERGENCE_FACTOR
from loraprune.safety.run_files import RunFiles, resume_folder
from loraprune.shrink import shrink_model
from loraprune.structure import GroupFamily, Masks
from loraprune.training import TrainingConfig, train

#: sub-directory of a saved model that holds its LoRA adapter when it is not merged
ADAPTER_DIR = "adapter"

#: the methods of `loraprune prune-model`: LoRAPrune, and the one-shot criteria it is compared with
METHODS = ("loraprune", "taylor", "activation", "wanda-sp", "magnitude", "random")


#: the distillation settings of a run config (prune-model has them, prune-nm trains without a teacher)
DISTILL_FIELDS = ("distill_weight", "distill_temperature")


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA fine-tuning every method of a comparison shares."""

    steps: int
    rank: int = 8
    alpha: float | None = None
    learning_rate: float = 1e-3
    batch_size: int = 4
    seed: int = 0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    report_to: str = "none"
    logging_dir: str | None = None
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    #: weight and temperature of the KL term to the unpruned model (0: plain language-modelling loss)
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    divergence_factor: float = DIVERGENCE_FACTOR
    files: RunFiles | None = None  # scratch beside the output and checkpoints (None: a temporary directory)

    @classmethod
    def of_run(cls, config: Any, **extra: Any) -> LoraSettings:
        """The LoRA settings of a `prune-model` / `prune-nm` config (`steps`, `lora_rank`, ...), plus `extra`."""
        return cls(
            steps=config.steps,
            rank=config.lora_rank,
            alpha=config.lora_alpha,
            learning_rate=config.learning_rate,
            batch_size=config.batch_size,
            seed=config.seed,
            **{name: getattr(config, name) for name in DISTILL_FIELDS if hasattr(config, name)},
            divergence_factor=config.divergence_factor,
            **extra,
        )

    def training_config(self) -> TrainingConfig:
        return TrainingConfig(
            steps=self.steps,
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            seed=self.seed,
            logging_steps=max(1, self.steps // 10),
            report_to=self.report_to,
            logging_dir=self.logging_dir,
            bf16=self.bf16,
            fp16=self.fp16,
            gradient_checkpointing=self.gradient_checkpointing,
            divergence_factor=self.divergence_factor,
        )


@dataclass
class LoraRun:
    """A finished LoRA fine-tuning: the PEFT model (unmerged), its log and its wall time."""

    model: PeftModel | None  # None on the other DDP processes of a k-bit run (only the main one re-loads)
    log_history: list[dict[str, Any]]
    seconds: float
    pruner: ModelPruner | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def training_windows(tokenizer: PreTrainedTokenizerBase, source: str, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """Non-overlapping `seq_len`-token windows of `source` (a corpus' validation split, or a text file).

    Language-modelling examples (`labels = input_ids`); `Trainer` shuffles and cycles them.
    """
    windows = token_windows(tokenizer, load_text(source, "valid"), seq_len)
    check(len(windows) > 0, f"{source!r} has fewer than seq_len={seq_len} tokens")
    return [{"input_ids": row, "labels": row} for row in windows]


def train_lora(
    model: PreTrainedModel,
    windows: list[dict[str, torch.Tensor]],
    settings: LoraSettings,
    callbacks: tuple[TrainerCallback, ...] = (),
    unmasked: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> LoraRun:
    """Wrap `model` in a fresh LoRA adapter and train it for `settings.steps` optimizer steps.

    With `settings.distill_weight` the loss gets a KL term to the dense model: `model` must
    then be masked, not shrunk, and `unmasked()` a context in which the masks are off.
    """
    torch.manual_seed(settings.seed)  # adapter initialisation, identical across methods
    peft_model = add_lora(model, settings.rank, settings.alpha, settings.target_modules)
    distillation = None
    if settings.distill_weight > 0:
        if unmasked is None:
            raise LoraPruneError("distillation needs the masked (not yet shrunk) model and a way to unmask it")
        distillation = Distillation(
            settings.distill_weight,
            settings.distill_temperature,
            dense_context=lambda: dense_peft_model(peft_model, unmasked),
        )
    started = time.perf_counter()
    files = settings.files
    history = train(
        peft_model,
        windows,
        default_data_collator,
        settings.training_config(),
        callbacks=callbacks,
        distillation=distillation,
        output_dir=None if files is None else files.trainer_dir,
        checkpointing=None if files is None else files.checkpointing,
    )
    seconds = time.perf_counter() - started
    peft_model.eval()
    losses = loss_history(history)
    summary = {
        "steps": settings.steps,
        "rank": settings.rank,
        "alpha": settings.alpha or settings.rank,
        "learning_rate": settings.learning_rate,
        "batch_size": settings.batch_size,
        "seed": settings.seed,
        "distill_weight": settings.distill_weight,
        "distill_temperature": settings.distill_temperature,
        "train_seconds": seconds,
        "first_logged_loss": losses[0]["loss"] if losses else None,
        "last_logged_loss": losses[-1]["loss"] if losses else None,
        "loss_history": losses,
    }
    return LoraRun(peft_model, history, seconds, summary=summary)


def loraprune(
    model: PreTrainedModel,
    windows: list[dict[str, torch.Tensor]],
    settings: LoraSettings,
    target: PruningTarget,
    config: LoRAPruneConfig,
    full_precision_base: Callable[[], PreTrainedModel] | None = None,
) -> tuple[LoraRun, Masks]:
    """Train LoRA on `model` while LoRAPrune prunes it, then shrink base and LoRA weights physically.

    Returns the run (its `model` is the shrunk, still unmerged PEFT model) and the final masks.
    Packed k-bit weights cannot be sliced: when `model` is k-bit, `full_precision_base()` loads
    the same checkpoint in full precision, the trained adapter is copied onto it, and that copy
    is shrunk and returned instead (`loraprune.kbit`). Under DDP only the main process re-loads
    (a 70B checkpoint is about 140 GB of host memory per copy): the others get `run.model` None.
    """
    if is_kbit_model(model) and full_precision_base is None:
        raise LoraPruneError(
            "the model has k-bit (bitsandbytes) weights, which cannot be sliced: pass "
            "full_precision_base, a function that loads the same checkpoint in full precision"
        )
    callback = LoRAPruneCallback(target, config, resume_from=resume_folder(settings.files))
    run = train_lora(model, windows, settings, callbacks=(callback,), unmasked=lambda: callback.pruner.unmasked())
    pruner = callback.pruner
    require_target(pruner.finished, "LoRAPrune", pruner.observations, pruner.step, run.log_history)
    masks = pruner.masks
    if is_kbit_model(run.model):
        run.model = full_precision_copy(run.model, full_precision_base()) if is_main_process() else None
        if run.model is not None:
            shrink_model(run.model, pruner.families, masks)
    else:
        pruner.finish()
    run.pruner = pruner
    run.summary["loraprune"] = {
        "events": pruner.history,
        "observations": pruner.observations,
        "skipped_steps": pruner.skipped_steps,
        "reached_target": pruner.finished,
        "schedule": dataclasses.asdict(pruner.schedule),
    }
    return run, masks


def recover(
    model: PreTrainedModel,
    families: list[GroupFamily],
    masks: Masks,
    windows: list[dict[str, torch.Tensor]] | None,
    settings: LoraSettings,
) -> LoraRun | None:
    """Shrink a one-shot-pruned `model` to `masks` and fine-tune LoRA on it (None when `settings.steps` is 0).

    With distillation the recovery trains under the masks, so that the dense teacher is the
    same weights unmasked, and the model and its adapter are shrunk afterwards; without it the
    model is shrunk first (the same training, on smaller matrices).
    """
    if not settings.steps or windows is None:
        shrink_model(model, families, masks)
        return None
    if settings.distill_weight <= 0:
        shrink_model(model, families, masks)
        return train_lora(model, windows, settings)
    with MaskHooks(model, families, masks) as hooks:
        run = train_lora(model, windows, settings, unmasked=hooks.suspended)
    shrink_model(run.model, families, masks)
    return run


def split_adapter(peft_model: PeftModel, directory: str) -> PreTrainedModel:
    """Save the adapter of a (shrunk) PEFT model in `directory` and return the base model without it.

    The adapter's shapes are those of the shrunk model: load it with
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUTPUT), OUTPUT/adapter)`.
    """
    for adapter_config in peft_model.peft_config.values():
        adapter_config.base_model_name_or_path = None  # the shrunk model, saved beside the adapter
    peft_model.save_pretrained(directory)
    return peft_model.unload()
