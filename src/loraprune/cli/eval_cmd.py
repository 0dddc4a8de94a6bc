"""`loraprune eval`: perplexity of a model (dense, pruned, or base + adapter) with its settings."""

from __future__ import annotations

import argparse
from typing import Any

from loraprune.config import add_dataclass_arguments, dataclass_from_args
from loraprune.evaluation import EvalConfig, evaluate_perplexity
from loraprune.io import write_json
from loraprune.models import default_device, load_model


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="perplexity of a model (dense, pruned, or base + adapter)",
        description="Perplexity on non-overlapping windows of a text, tokenised once; the settings are "
        "printed and saved with the number.",
    )
    add_dataclass_arguments(parser, EvalConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = dataclass_from_args(EvalConfig, args)
    device = default_device() if config.device == "auto" else config.device
    model, tokenizer = load_model(config.model, dtype=config.dtype, device=device, adapter=config.adapter)
    report: dict[str, Any] = {"model": config.model, "adapter": config.adapter, "device": device}
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
    )
    print(result)
    report.update(result.to_dict())
    if config.json is not None:
        write_json(config.json, report)
        print(f"wrote {config.json}")
    return 0

