"""`loraprune eval`: perplexity, zero-shot accuracy and cost of a model (dense, pruned, or base + adapter),
with their settings."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from loraprune.config import add_dataclass_arguments, dataclass_from_args
from loraprune.devices import placement, resolve_device
from loraprune.evaluation import EvalConfig, evaluate_perplexity, evaluate_zero_shot, load_tasks, measure_latency
from loraprune.io import write_json
from loraprune.models import load_model
from loraprune.safety.output import probe_directory


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="perplexity, zero-shot accuracy and latency of a model (dense, pruned, or base + adapter)",
        description="Perplexity on non-overlapping windows of a text, tokenised once; zero-shot accuracy on "
        "lm-eval tasks (--tasks); forward latency and generation throughput, side by side with a --baseline "
        "model (--latency). Perplexity runs on wikitext2 unless --tasks or --latency is given (then only with "
        "--data). The settings are printed and saved with every number.",
    )
    add_dataclass_arguments(parser, EvalConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = dataclass_from_args(EvalConfig, args)
    tasks = load_tasks(config.tasks, config.task_dir) if config.tasks else None  # fail early if unreachable
    device = resolve_device(config.device)
    if config.json is not None:
        probe_directory(Path(config.json).expanduser().absolute().parent, f"--json {config.json}")
    model, tokenizer = load_model(
        config.model, dtype=config.dtype, device=device, adapter=config.adapter, device_map=config.device_map
    )
    report: dict[str, Any] = {
        "model": config.model,
        "adapter": config.adapter,
        "device": placement(model),
        "settings": dataclasses.asdict(config),
    }
    if config.perplexity:
        result = evaluate_perplexity(
            model,
            tokenizer,
            config.data,
            seq_len=config.seq_len,
            max_tokens=config.max_tokens,
            batch_size=config.batch_size,
            model_name=config.model,
            progress=config.progress,
            split=config.split,
            protocol=config.protocol,
        )
        print(result)
        report.update(result.to_dict())
    if tasks is not None:
        zero_shot = evaluate_zero_shot(
            model,
            tokenizer,
            tasks,
            num_fewshot=config.num_fewshot,
            limit=config.limit,
            batch_size=config.batch_size,
            model_name=config.model,
        )
        print(zero_shot)
        report["zero_shot"] = zero_shot.to_dict()
    if config.latency:
        models = {}  # the baseline first: ratios are against the first model, so they read model / baseline
        if config.baseline is not None:
            name = config.baseline if config.baseline != config.model else f"{config.baseline} (baseline)"
            models[name], _ = load_model(
                config.baseline, dtype=config.dtype, device=device, device_map=config.device_map
            )
        models[config.model] = model
        cost = measure_latency(
            models,
            batch_size=config.latency_batch,
            seq_len=config.latency_seq_len,
            repeats=config.repeats,
            warmup=config.warmup,
            gen_tokens=config.gen_tokens,
            progress=config.progress,
        )
        print(cost)
        report["latency"] = cost.to_dict()
    if config.json is not None:
        write_json(config.json, report)
        print(f"wrote {config.json}")
    return 0
