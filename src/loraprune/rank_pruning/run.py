"""The harness of adapter-rank pruning: PrunedLoRA and its baselines, trained, saved and reported alike.

Every method goes through the same `train_adapter` (same data, steps, learning-rate schedule
and seed via `loraprune.training.train`); only the adapter and its callbacks differ:

* `prunedlora`: LoRA at `r0`, pruned to `rank` by `RankPruningCallback`;
* `lora`: plain LoRA at `rank`; `lora-r0`: plain LoRA at `r0`;
* `adalora`: PEFT AdaLoRA from `r0` to an average `rank`.

All use the scaling `alpha / r0` of PrunedLoRA's config (LoRA at rank `r` gets
`alpha · r / r0`), so only the rank differs between them.

`loraprune.rank_pruning.entry.prune_adapter` (behind `loraprune prune-adapter`) runs it end to
end: model, data, training, the saved adapter and its report.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from transformers import PreTrainedModel, TrainerCallback

from loraprune.config import QUANTIZE_CHOICES, check, option
from loraprune.data import SFTCollator, load_sft_records, tokenize_sft
from loraprune.devices import DEVICE_HELP
from loraprune.io import atomic_directory, write_json
from loraprune.lora import add_lora
from loraprune.models import DEFAULT_MODEL
from loraprune.rank_pruning.adalora import AdaLoraBudgetCallback, adalora_ranks, add_adalora
from loraprune.rank_pruning.calibration import calibration_summary
from loraprune.rank_pruning.callback import RankPruningCallback
from loraprune.rank_pruning.config import RankPruningConfig
from loraprune.rank_pruning.export import ADAPTER_WEIGHTS, RANKS_FILE, ExportedAdapter, export_pruned_adapter
from loraprune.rank_pruning.pruner import RankPruner
from loraprune.rank_pruning.state import find_lora_modules
from loraprune.run_report.record import loss_history
from loraprune.run_report.summary import environment
from loraprune.safety.divergence import nonfinite_loss_step
from loraprune.safety.finite import require_finite
from loraprune.safety.options import RESUME_HELP, SAVE_STEPS_HELP
from loraprune.safety.run_files import RunFiles, resume_folder
from loraprune.training import TrainingConfig, train

logger = logging.getLogger(__name__)

METHODS = ("prunedlora", "lora", "lora-r0", "adalora")


@dataclass
class AdapterRunConfig:
    """What to fine-tune, on which data, with which method, and where the adapter goes."""

    model: str = option(DEFAULT_MODEL, help="base model: local directory, hub id, or the embedded default")
    data: str = option(
        "gsm8k",
        help="SFT data: 'gsm8k', or a JSONL file of {question, answer} records or of chat {messages: [{role, "
        "content}, ...]} records (rendered with the tokenizer's chat template, loss on the assistant turns only)",
    )
    output: str | None = option(None, help="directory the adapter is written to (PEFT format)")
    method: str = option(
        "prunedlora",
        help="prunedlora, or a baseline: lora (rank R), lora-r0 (rank R0), adalora (R0 -> R)",
        choices=METHODS,
    )
    train_limit: int | None = option(None, help="train on the first N records only")
    max_answer_tokens: int = option(256, help="answers are cut at this many tokens (EOS included)")
    dtype: str = option("float32", help="dtype the base model is loaded in", choices=("float32", "bfloat16", "float16"))
    quantize: str = option(
        "none",
        help="load the base weights in 4 or 8 bits with bitsandbytes (QLoRA-style; CUDA only); the "
        "adapter is trained and pruned on them and saved as usual",
        choices=QUANTIZE_CHOICES,
    )
    overwrite: bool = option(False, help="replace an existing output directory")
    device: str = option("auto", help=DEVICE_HELP)
    save_steps: int = option(0, help=SAVE_STEPS_HELP)
    resume: str | None = option(None, help=RESUME_HELP)

    def __post_init__(self) -> None:
        check(self.quantize in QUANTIZE_CHOICES, f"quantize must be one of {QUANTIZE_CHOICES}, got {self.quantize!r}")
        check(self.train_limit is None or self.train_limit >= 1, "train_limit must be >= 1")
        check(self.max_answer_tokens >= 1, "max_answer_tokens must be >= 1")
        check(
            self.method != "adalora" or (self.save_steps == 0 and self.resume is None),
            "adalora runs cannot be checkpointed or resumed exactly (PEFT keeps its rank allocator's state "
            "outside the checkpoints); drop --save-steps / --resume",
        )


@dataclass
class AdapterRun:
    """A trained adapter and how it was obtained."""

    method: str
    model: PeftModel
    log_history: list[dict]
    train_seconds: float
    ranks: dict[str, int]
    pruner: RankPruner | None = None
    pruning_events: list[dict[str, Any]] = field(default_factory=list)


def create_adapter(
    model: PreTrainedModel,
    method: str,
    pruning: RankPruningConfig,
    total_steps: int,
    resume_from: Path | None = None,
    held_out: dict[str, torch.Tensor] | None = None,
) -> tuple[PeftModel, list[TrainerCallback]]:
    """Wrap `model` in the adapter of `method` and return the callbacks its training needs (which read
    their state from the checkpoint folder `resume_from` when the run resumes).

    `held_out` (a collated batch) lets PrunedLoRA measure the loss change of its pruning events.
    """
    check(method in METHODS, f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    scaling = pruning.lora_alpha / pruning.r0
    targets = pruning.target_modules
    if method == "prunedlora":
        adapter = add_lora(model, pruning.r0, pruning.lora_alpha, targets)
        return adapter, [RankPruningCallback(pruning, resume_from=resume_from, held_out=held_out)]
    if method == "lora":
        return add_lora(model, pruning.rank, scaling * pruning.rank, targets), []
    if method == "lora-r0":
        return add_lora(model, pruning.r0, pruning.lora_alpha, targets), []
    adapter = add_adalora(
        model,
        pruning.r0,
        pruning.rank,
        pruning.lora_alpha,
        targets,
        total_steps,
        pruning.warmup,
        pruning.cooldown,
        pruning.prune_every,
    )
    return adapter, [AdaLoraBudgetCallback()]


def train_adapter(
    model: PreTrainedModel,
    train_dataset: Any,
    data_collator: Any,
    method: str,
    pruning: RankPruningConfig,
    training: TrainingConfig,
    files: RunFiles | None = None,
    held_out: list[dict] | None = None,
) -> AdapterRun:
    """Fine-tune `model` with the adapter of `method`; the returned run holds the final ranks.

    `files`: the scratch directory and checkpoints of the run (None: a temporary directory, no checkpoints).
    `held_out`: tokenised examples kept out of `train_dataset` (`split_held_out`), on which PrunedLoRA's
    pruning events are measured.
    """
    torch.manual_seed(training.seed)  # adapter initialisation, identical across methods
    batch = data_collator(held_out) if held_out else None
    adapter, callbacks = create_adapter(
        model, method, pruning, training.steps, resume_from=resume_folder(files), held_out=batch
    )
    start = time.perf_counter()
    history = train(
        adapter,
        train_dataset,
        data_collator,
        training,
        callbacks=callbacks,
        output_dir=None if files is None else files.trainer_dir,
        checkpointing=None if files is None else files.checkpointing,
    )
    seconds = time.perf_counter() - start
    pruner = next((c.pruner for c in callbacks if isinstance(c, RankPruningCallback)), None)
    if pruner is not None:
        ranks = pruner.ranks()
    elif method == "adalora":
        ranks = adalora_ranks(adapter)
    else:
        ranks = {m.name: m.layer.r[m.adapter] for m in find_lora_modules(adapter)}
    events = (
        []
        if pruner is None
        else [
            {
                "step": e.step,
                "removed": sum(map(len, e.removed.values())),
                "total_rank": e.total_rank,
                "predicted_loss_change": e.predicted_loss_change,
                "measured_loss_change": e.measured_loss_change,
                "module_checks": [dataclasses.asdict(check) for check in e.module_checks],
                "seconds": e.seconds,
                "curvature_factor": e.curvature_factor,
                "gradient_factor": e.gradient_factor,
            }
            for e in pruner.history
        ]
    )
    adapter.eval()
    return AdapterRun(method, adapter, history, seconds, ranks, pruner, events)


def saved_adapter_size(directory: str | Path) -> tuple[int, int]:
    """Parameters and bytes of the adapter weights saved in `directory`."""
    path = Path(directory) / ADAPTER_WEIGHTS
    with safe_open(path, "pt") as weights:
        parameters = sum(torch.Size(weights.get_slice(k).get_shape()).numel() for k in weights.keys())  # noqa: SIM118
    return parameters, path.stat().st_size


def save_adapter(
    run: AdapterRun,
    output_dir: str | Path,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
    finalize: Callable[[Path], None] | None = None,
) -> ExportedAdapter:
    """Save the run's adapter in standard PEFT format, physically at its final ranks.

    `finalize(staging)` runs last inside the atomic write (files derived from the adapter). An adapter
    with a NaN/Inf factor is refused (`NonFiniteError`, nothing written).
    """
    loss_step = nonfinite_loss_step(run.log_history)
    if run.method != "adalora":
        active = (
            run.pruner.active_components()
            if run.pruner is not None
            else {name: torch.ones(rank, dtype=torch.bool) for name, rank in run.ranks.items()}
        )
        return export_pruned_adapter(
            run.model,
            active,
            output_dir,
            base_model_name_or_path,
            overwrite=overwrite,
            finalize=finalize,
            nonfinite_loss_step=loss_step,
        )
    require_finite(get_peft_model_state_dict(run.model).items(), "the adapter", loss_step)
    if base_model_name_or_path is not None:
        run.model.peft_config["default"].base_model_name_or_path = base_model_name_or_path
    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        run.model.save_pretrained(str(staging))  # PEFT shrinks AdaLoRA by its rank_pattern
        write_json(
            staging / RANKS_FILE, {"ranks": run.ranks, "dropped_modules": [n for n, r in run.ranks.items() if r == 0]}
        )
        if finalize is not None:
            finalize(staging)
    path = Path(output_dir)
    return ExportedAdapter(
        path,
        {n: r for n, r in run.ranks.items() if r > 0},
        [n for n, r in run.ranks.items() if r == 0],
        *saved_adapter_size(path),
    )


def trained_rank(method: str, pruning: RankPruningConfig) -> int:
    """The rank every module of `method`'s adapter is created with."""
    return pruning.rank if method == "lora" else pruning.r0


def adapter_report(
    run: AdapterRun,
    run_config: AdapterRunConfig,
    pruning: RankPruningConfig,
    training: TrainingConfig,
    base_parameters: int,
) -> dict[str, Any]:
    """The run record of `prune-adapter` (sizes of the saved adapter are added once it is written)."""
    modules = len(run.ranks)
    start = trained_rank(run.method, pruning)
    planned = None
    if run.pruner is not None:
        schedule = run.pruner.schedule
        planned = [
            [step, modules * (start - removed) if schedule.per_module else modules * start - removed]
            for step, removed in zip(schedule.events, schedule.removed)
        ]
    return {
        "command": "prune-adapter",
        "method": run.method,
        "settings": {
            "run": dataclasses.asdict(run_config),
            "pruning": dataclasses.asdict(pruning),
            "training": dataclasses.asdict(training),
        },
        "base_model_params": base_parameters,
        "modules": modules,
        "trained_rank": start,
        "target_total_rank": modules * (start if run.method in ("lora", "lora-r0") else pruning.rank),
        "total_rank_before": modules * start,
        "total_rank_after": sum(run.ranks.values()),
        "final_ranks": dict(run.ranks),
        "adapter_params_before": sum(p.numel() for p in run.model.parameters() if p.requires_grad),
        "training": {
            "steps": training.steps,
            "train_seconds": run.train_seconds,
            "loss_history": loss_history(run.log_history),
        },
        "pruning_events": run.pruning_events,
        "calibration": calibration_summary(run.pruning_events),
        "curvature_statistics_bytes": None if run.pruner is None else run.pruner.stats.nbytes,
        "planned_total_rank": planned,
        "perplexity_before": None,
        "perplexity_after": None,
        "environment": environment(),
    }


def load_sft_dataset(
    data: str, tokenizer: Any, limit: int | None = None, max_answer_tokens: int = 256
) -> tuple[list[dict], SFTCollator]:
    """Tokenised SFT examples (loss on answer tokens only) and their padding collator."""
    records = load_sft_records(data, split="train", limit=limit)
    check(len(records) > 0, f"SFT data {data!r} has no records to train on")
    return tokenize_sft(records, tokenizer, max_answer_tokens), SFTCollator(tokenizer.pad_token_id)


def split_held_out(examples: list[dict], count: int) -> tuple[list[dict], list[dict]]:
    """`(training examples, held-out examples)`: the last `count` examples are held out (none for 0).

    Every method of a comparison trains on the same remaining examples, whether it measures
    anything on the held-out ones or not. Data of no more than `count` examples keeps them all for
    training (with a warning): there is nothing to spare for the calibration check.
    """
    if count and count >= len(examples):
        logger.warning(
            "%d training examples leave none to hold out for the calibration check (calibration_examples=%d): "
            "pruning events are not measured",
            len(examples),
            count,
        )
        return examples, []
    return (examples[: len(examples) - count], examples[len(examples) - count :]) if count else (examples, [])
