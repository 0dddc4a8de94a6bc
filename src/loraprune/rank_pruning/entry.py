"""`prune_adapter`: the Python entry point behind `loraprune prune-adapter`.

It loads the model and the SFT data, trains with the harness of `loraprune.rank_pruning.run`
and saves the adapter with its report; users import `prune_adapter` from the stable facade
`loraprune.api`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from loraprune.config import check
from loraprune.devices import resolve_device
from loraprune.distributed import is_main_process, wait_for_everyone
from loraprune.io import check_output_dir, write_json
from loraprune.models import load_model
from loraprune.rank_pruning.config import RankPruningConfig
from loraprune.rank_pruning.export import ExportedAdapter
from loraprune.rank_pruning.run import (
    AdapterRun,
    AdapterRunConfig,
    adapter_report,
    load_sft_dataset,
    save_adapter,
    saved_adapter_size,
    split_held_out,
    train_adapter,
)
from loraprune.run_report import REPORT_FILE, write_run_report
from loraprune.run_report.summary import count_parameters
from loraprune.safety.run_files import RunFiles, run_files
from loraprune.training import TrainingConfig

#: the learning-rate schedule `loraprune prune-adapter` trains every method with unless told otherwise:
#: a constant rate, since decaying it linearly to zero leaves the last pruning events and the steps after
#: them almost no rate to recover with (the 128 -> 8 gap study, README "PrunedLoRA"); the Python
#: `TrainingConfig` keeps the transformers default (linear)
ADAPTER_LR_SCHEDULE = "constant"


def prune_adapter(
    run_config: AdapterRunConfig, pruning: RankPruningConfig, training: TrainingConfig
) -> tuple[AdapterRun, ExportedAdapter | None]:
    """Load the model and data, fine-tune with `run_config.method`, save the adapter; the whole job.

    Under `torchrun` / `accelerate launch` (DDP) every process trains and only the main one
    writes; the others get None for the saved adapter.

    The adapter directory also holds `loraprune_report.json` and its rendering (`report.md`,
    `report.html`, plots), written atomically with the adapter. `run_config.save_steps` / `resume`
    checkpoint and resume the training (`loraprune.safety.checkpoints`).
    """
    check(run_config.output is not None, "an output directory is needed (--output DIR)")
    output = check_output_dir(run_config.output, run_config.overwrite)  # fail before the long training
    settings = {
        "run": dataclasses.asdict(run_config),
        "pruning": dataclasses.asdict(pruning),
        "training": dataclasses.asdict(training),
    }
    with run_files(output, run_config.save_steps, run_config.resume, settings, writer=is_main_process()) as files:
        return _prune_adapter(run_config, pruning, training, files)


def _prune_adapter(
    run_config: AdapterRunConfig, pruning: RankPruningConfig, training: TrainingConfig, files: RunFiles
) -> tuple[AdapterRun, ExportedAdapter | None]:
    """The work of `prune_adapter`, with its scratch directory and checkpoints in `files`."""
    device = resolve_device(run_config.device, trains=True)
    model, tokenizer = load_model(run_config.model, dtype=run_config.dtype, device=device, quantize=run_config.quantize)
    base_parameters = count_parameters(model)
    dataset, collator = load_sft_dataset(
        run_config.data, tokenizer, run_config.train_limit, run_config.max_answer_tokens
    )
    dataset, held_out = split_held_out(dataset, pruning.calibration_examples)
    run = train_adapter(model, dataset, collator, run_config.method, pruning, training, files=files, held_out=held_out)
    report = adapter_report(run, run_config, pruning, training, base_parameters)
    report["device"] = device

    def write_reports(staging: Path) -> None:
        report["adapter_params_after"], report["file_size_bytes"] = saved_adapter_size(staging)
        write_json(staging / REPORT_FILE, report)
        write_run_report(staging)

    exported = None
    if is_main_process():  # under torchrun / accelerate launch every process gets here; one writes
        exported = save_adapter(
            run, run_config.output, model.name_or_path, overwrite=run_config.overwrite, finalize=write_reports
        )
    wait_for_everyone()
    return run, exported
