"""`loraprune prune-adapter`: train an over-parameterised LoRA, prune its rank (PrunedLoRA), save it.

`--method lora | lora-r0 | adalora` runs the baselines through the same harness (same data,
steps, learning-rate schedule and seed).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from loraprune.config import add_dataclass_arguments, add_preset_option, dataclass_from_args
from loraprune.distributed import is_main_process
from loraprune.rank_pruning.config import RankPruningConfig
from loraprune.rank_pruning.entry import ADAPTER_LR_SCHEDULE, prune_adapter
from loraprune.rank_pruning.presets import PRESETS, preset_values
from loraprune.rank_pruning.run import AdapterRunConfig
from loraprune.safety.output import claim_run_output
from loraprune.training import TrainingConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prune-adapter",
        help="train an over-parameterised LoRA adapter and prune its rank (PrunedLoRA)",
        description="Fine-tune a LoRA adapter of rank R0 with supervised data (loss on the answers), prune "
        "it to rank R while it trains, and save it as a standard PEFT adapter of the final ranks.",
    )
    for config_class in (AdapterRunConfig, RankPruningConfig, TrainingConfig):
        group = parser.add_argument_group(config_class.__doc__.splitlines()[0].rstrip("."))
        add_dataclass_arguments(group, config_class)
    add_preset_option(parser, PRESETS, preset_values)
    parser.set_defaults(func=run, lr_scheduler_type=ADAPTER_LR_SCHEDULE)


def rank_table(ranks: dict[str, int]) -> str:
    """Final ranks as text: one row per layer (or module path prefix), one column per projection."""
    rows: dict[str, dict[str, int]] = defaultdict(dict)
    for name, rank in ranks.items():
        prefix, _, projection = name.rpartition(".")
        rows[prefix.rsplit(".", 1)[0]][projection] = rank
    columns = list(dict.fromkeys(p for row in rows.values() for p in row))
    lines = ["module".ljust(22) + "".join(c.rjust(10) for c in columns)]
    for prefix, row in rows.items():
        lines.append(prefix.ljust(22) + "".join(str(row.get(c, "-")).rjust(10) for c in columns))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    run_config = dataclass_from_args(AdapterRunConfig, args)
    pruning = dataclass_from_args(RankPruningConfig, args)
    training = dataclass_from_args(TrainingConfig, args)
    with claim_run_output(run_config.output, f"--output {run_config.output}"):
        result, exported = prune_adapter(run_config, pruning, training)
    if not is_main_process():  # torchrun / accelerate launch: the main process reports
        return 0
    print(rank_table(result.ranks))
    total = sum(result.ranks.values())
    print(
        f"method {result.method}: {len(result.ranks)} modules, total rank {total} "
        f"(mean {total / len(result.ranks):.2f}), {len(exported.dropped)} modules at rank 0 dropped"
    )
    print(
        f"trained {training.steps} steps in {result.train_seconds:.1f}s; adapter {exported.path}: "
        f"{exported.parameters:,} parameters, {exported.file_bytes:,} bytes"
    )
    print(f"run report: {exported.path / 'report.html'} (also report.md, loraprune_report.json)")
    return 0
