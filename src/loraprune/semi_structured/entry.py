"""`prune_nm`: the Python entry point behind `loraprune prune-nm`.

The N:M runs it drives (LoRAPrune N:M, masked recovery) are `loraprune.semi_structured.run`;
users import `prune_nm` from the stable facade `loraprune.api`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from loraprune.data import calibration_batches, load_text
from loraprune.devices import resolve_device
from loraprune.io import check_output_dir, save_pruned_model, write_json
from loraprune.model_pruning.config import LoRAPruneConfig
from loraprune.model_pruning.run import LoraSettings, training_windows
from loraprune.models import load_model
from loraprune.results import PruneResult, requested_perplexity
from loraprune.run_report.record import REPORT_FILE
from loraprune.run_report.summary import directory_size, environment, size_summary
from loraprune.safety.divergence import nonfinite_loss_step
from loraprune.safety.run_files import RunFiles, run_files
from loraprune.semi_structured.config import PruneNMConfig
from loraprune.semi_structured.one_shot import prune_one_shot
from loraprune.semi_structured.run import loraprune_nm, masked_recovery, nm_summary, require_pattern
from loraprune.semi_structured.targets import nm_modules

NMResult = PruneResult  # the N:M model (in memory, merged), where it was written, and its report


def prune_nm(config: PruneNMConfig, schedule: LoRAPruneConfig | None = None) -> NMResult:
    """Prune the decoder projections of `config.model` to an N:M pattern and save the merged model.

    "loraprune" prunes while a LoRA adapter trains for `config.steps` steps (schedule options in
    `schedule`); the one-shot methods prune on calibration windows and then, if `config.steps`,
    train LoRA under the fixed mask. The saved model has the stock config (only weights are
    zero) and `loraprune_report.json`, whose `nm` entry counts the zeros and the groups that
    break the pattern (always 0: the run fails otherwise). `config.save_steps` / `config.resume`
    checkpoint and resume the training (`loraprune.safety.checkpoints`).
    """
    output = check_output_dir(config.output, config.overwrite)
    schedule = schedule or LoRAPruneConfig(prune_every=10, cooldown=0.1)  # the paper's, as `prune-nm`
    settings = {"run": dataclasses.asdict(config), "loraprune": dataclasses.asdict(schedule)}
    with run_files(output, config.save_steps, config.resume, settings) as files:
        return _prune_nm(config, schedule, output, files)


def _prune_nm(config: PruneNMConfig, schedule: LoRAPruneConfig, output: Path, files: RunFiles) -> NMResult:
    """The work of `prune_nm`, with its scratch directory and checkpoints in `files`."""
    if config.eval_data:
        load_text(config.eval_data)  # a missing file fails now, not after pruning
    pattern = config.nm_pattern
    device = resolve_device(config.device, trains=config.steps > 0 or config.method == "loraprune")
    model, tokenizer = load_model(config.model, dtype=config.dtype, device=device)
    modules = nm_modules(model, pattern, config.layers)
    windows = training_windows(tokenizer, config.calibration_data, config.seq_len) if config.steps else None
    lora = LoraSettings.of_run(config, files=files)
    batches = None
    if config.method in ("wanda", "sparsegpt"):
        batches = calibration_batches(
            tokenizer, config.calibration_data, config.calibration_samples, config.seq_len, config.seed
        )
    before = size_summary(model)
    perplexity_before = requested_perplexity(model, tokenizer, config, "before")

    started = time.perf_counter()
    training, perplexity_one_shot = None, None
    if config.method == "loraprune":
        model, run, _ = loraprune_nm(model, windows, lora, pattern, schedule, config.layers)
        training = run.summary
    else:
        masks = prune_one_shot(
            model,
            config.method,
            pattern,
            modules,
            batches,
            batch_size=config.batch_size,
            block_size=config.sparsegpt_block_size,
            damp=config.sparsegpt_damp,
        )
        if files.checkpointing is not None:
            files.checkpointing.record("one_shot_masks", {name: mask.cpu() for name, mask in masks.items()})
        if config.steps:
            perplexity_one_shot = requested_perplexity(model, tokenizer, config, "after one-shot pruning")
            model, run = masked_recovery(model, masks, windows, lora)
            training = run.summary
    prune_seconds = time.perf_counter() - started
    summary = nm_summary(model, modules, pattern)
    require_pattern(summary)

    report = {
        "method": config.method,
        "nm": summary,
        "sparsity_definition": "zeros among the weights of the decoder layers' attention+MLP projections; "
        "parameter counts do not change (the zeros are stored)",
        "params": before["params"],
        "decoder_params": before["decoder_params"],
        "perplexity_before": perplexity_before,
        "perplexity_one_shot": perplexity_one_shot,
        "perplexity_after": requested_perplexity(model, tokenizer, config, "after"),
        "prune_seconds": prune_seconds,
        "training": training,
        "settings": dataclasses.asdict(config),
        "loraprune_settings": dataclasses.asdict(schedule) if config.method == "loraprune" else None,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "environment": environment(),
    }
    save_pruned_model(
        model,
        tokenizer,
        output,
        overwrite=config.overwrite,
        extra_json={REPORT_FILE: report},
        nonfinite_loss_step=None if training is None else nonfinite_loss_step(run.log_history),
    )
    report["file_size_bytes"] = directory_size(output)
    write_json(output / REPORT_FILE, report)
    return NMResult(model=model, tokenizer=tokenizer, output=output, report=report)
