"""`prune_model`: the Python entry point behind `loraprune prune-model`.

The training harness it drives (LoRA runs, LoRAPrune, recovery) is `loraprune.model_pruning.run`;
users import `prune_model` from the stable facade `loraprune.api`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from loraprune.config import PruneModelConfig
from loraprune.data import calibration_batches, load_text
from loraprune.devices import check_in_memory, placement, resolve_device
from loraprune.distributed import is_main_process, wait_for_everyone
from loraprune.importance import get_criterion
from loraprune.io import check_output_dir, save_pruned_model, write_json
from loraprune.model_pruning import LoRAPruneConfig, PruningTarget
from loraprune.model_pruning.run import (
    ADAPTER_DIR,
    LoraRun,
    LoraSettings,
    loraprune,
    recover,
    split_adapter,
    training_windows,
)
from loraprune.models import load_model
from loraprune.results import PruneResult, requested_perplexity
from loraprune.run_report import REPORT_FILE, write_run_report
from loraprune.run_report.summary import directory_size, layer_table, pruning_report, size_summary
from loraprune.safety.divergence import nonfinite_loss_step
from loraprune.safety.run_files import RunFiles, run_files
from loraprune.selection import parse_layers, plan_budget, select
from loraprune.structure import full_masks, get_adapter
from loraprune.structure.groups import masks_to_lists


def prune_model(config: PruneModelConfig, loraprune_config: LoRAPruneConfig | None = None) -> PruneResult:
    """Prune heads / KV groups and MLP channels of `config.model` and save the smaller model.

    `config.method` "loraprune" prunes while a LoRA adapter trains for `config.steps` steps
    (schedule options in `loraprune_config`); the one-shot criteria prune first and then
    fine-tune a LoRA adapter for `config.steps` steps (0: no recovery). The adapter is merged
    into the shrunk weights. Checks every input before the long work starts (output
    directory, data files, budget) and writes the output atomically, with
    `loraprune_report.json` and its rendering (`report.md`, `report.html`, plots) beside the weights.
    Under `torchrun` / `accelerate launch` (DDP) every process trains and only the main one
    writes; the others' report has no `file_size_bytes`. With `config.quantize` LoRAPrune trains on
    k-bit base weights on the GPU; its masks and adapter are then applied to the checkpoint re-loaded
    in `config.dtype` on the CPU (by the main process only), which is shrunk, merged, evaluated and saved.
    Everything else runs on `config.device` (`loraprune.devices`), or with `config.device_map` "auto"
    spread over the GPUs (one-shot methods without recovery training). With `config.save_steps` the
    training checkpoints beside the output, and `config.resume` continues from such a checkpoint
    (`loraprune.safety.checkpoints`); a model with a NaN/Inf weight is never saved.
    """
    output = check_output_dir(config.output, config.overwrite)
    loraprune_config = loraprune_config or LoRAPruneConfig()
    settings = {"run": dataclasses.asdict(config), "loraprune": dataclasses.asdict(loraprune_config)}
    with run_files(output, config.save_steps, config.resume, settings, writer=is_main_process()) as files:
        return _prune_model(config, loraprune_config, output, files)


def _prune_model(
    config: PruneModelConfig, loraprune_config: LoRAPruneConfig, output: Path, files: RunFiles
) -> PruneResult:
    """The work of `prune_model`, with its scratch directory and checkpoints in `files`."""
    if config.eval_data:
        load_text(config.eval_data)  # a missing file fails now, not after pruning
    device = resolve_device(config.device, trains=config.steps > 0 or config.method == "loraprune")
    model, tokenizer = load_model(
        config.model, dtype=config.dtype, device=device, quantize=config.quantize, device_map=config.device_map
    )
    check_in_memory(model)
    where = placement(model)  # the k-bit run's full-precision ending is on the CPU (`loraprune.kbit`)
    adapter = get_adapter(model)
    families = adapter.families(model, config.attention_unit)
    prunable = parse_layers(config.layers, len(adapter.layer_sizes(model)))
    budget = plan_budget(
        families,
        prunable,
        config.sparsity,
        allocation=config.allocation,
        attention_sparsity=config.attention_sparsity,
        mlp_sparsity=config.mlp_sparsity,
        rules=config.width_rules,
    )
    one_shot = config.method != "loraprune"
    windows = training_windows(tokenizer, config.calibration_data, config.seq_len) if config.steps else None
    lora = LoraSettings.of_run(
        config,
        report_to=config.report_to,
        logging_dir=config.logging_dir,
        bf16=config.bf16,
        fp16=config.fp16,
        gradient_checkpointing=config.gradient_checkpointing,
        files=files,
    )
    if config.steps:
        lora.training_config()  # validates the training options before the long work
    criterion = (
        get_criterion(config.method, **({"seed": config.seed} if config.method == "random" else {}))
        if one_shot
        else None
    )
    batches = None
    if criterion is not None and criterion.needs_data:
        batches = calibration_batches(
            tokenizer, config.calibration_data, config.calibration_samples, config.seq_len, config.seed
        )
    before = size_summary(model)
    layers_before = layer_table(model)
    perplexity_before = requested_perplexity(model, tokenizer, config, "before pruning")

    started = time.perf_counter()
    training: LoraRun | None = None
    if one_shot:
        scores = criterion.score(model, families, batches)
        masks = select(
            families,
            scores,
            full_masks(families),
            budget,
            prunable_layers=prunable,
            allocation=config.allocation,
            rules=config.width_rules,
        )
        if files.checkpointing is not None:
            files.checkpointing.record("one_shot_masks", masks_to_lists(masks))
        training = recover(model, families, masks, windows, lora)
    else:
        target = PruningTarget(
            config.sparsity,
            config.attention_sparsity,
            config.mlp_sparsity,
            config.layers,
            config.allocation,
            config.attention_unit,
            config.round_to,
            config.uniform_attention,
        )
        training, masks = loraprune(
            model,
            windows,
            lora,
            target,
            loraprune_config,
            full_precision_base=lambda: load_model(config.model, dtype=config.dtype)[0],
        )
    if training is not None and training.model is None:  # k-bit under DDP: the main process finishes the run
        wait_for_everyone()
        return PruneResult(model=None, tokenizer=tokenizer, output=output, report={})
    if training is not None:
        model = training.model.merge_and_unload() if config.merge_adapter else training.model
    prune_seconds = time.perf_counter() - started

    perplexity_after = requested_perplexity(model, tokenizer, config, "after pruning")
    extra_dirs = {}
    if training is not None and not config.merge_adapter:
        model = split_adapter(training.model, str(files.scratch / ADAPTER_DIR))
        extra_dirs[ADAPTER_DIR] = files.scratch / ADAPTER_DIR
    report = pruning_report(
        before,
        model,
        command="prune-model",
        layers_before=layers_before,
        method=config.method,
        sparsity_definition="fraction of decoder-layer attention+MLP parameters removed",
        prunable_layers=prunable,
        attention_unit=families[0].unit,
        units_removed={"attention": budget.attention, "mlp": budget.mlp},
        perplexity_before=perplexity_before,
        perplexity_after=perplexity_after,
        prune_seconds=prune_seconds,
        masks=masks_to_lists(masks),
        settings=dataclasses.asdict(config),
        training=None if training is None else training.summary,
        loraprune_settings=None if one_shot else dataclasses.asdict(loraprune_config),
        torch_threads=torch.get_num_threads(),
        device=where,
    )

    def write_reports(staging: Path) -> None:
        report["file_size_bytes"] = directory_size(staging)
        write_json(staging / REPORT_FILE, report)
        write_run_report(staging)

    if is_main_process():  # under torchrun / accelerate launch every process gets here; one writes
        save_pruned_model(
            model,
            tokenizer,
            output,
            overwrite=config.overwrite,
            extra_dirs=extra_dirs,
            finalize=write_reports,
            nonfinite_loss_step=None if training is None else nonfinite_loss_step(training.log_history),
        )
    wait_for_everyone()
    return PruneResult(model=model, tokenizer=tokenizer, output=output, report=report)
