"""The `loraprune` command line: a thin layer over the Python API.

Each sub-command lives in its own module of this package and exposes
`register(subparsers) -> None`, which adds its parser and sets `func` to a
`(args) -> int` handler. User errors (`LoraPruneError`) are printed without a
traceback and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from loraprune.errors import LoraPruneError

# Module names under loraprune.cli, in the order `--help` lists them.
COMMAND_MODULES = (
    "inspect_cmd",
    "eval_cmd",
    "prune_model_cmd",
    "prune_nm_cmd",
    "prune_adapter_cmd",
    "report_cmd",
    "export_cmd",
    "sweep_cmd",
)

DESCRIPTION = """\
Make LLMs and their LoRA adapters smaller with structured pruning guided by LoRA.

  loraprune inspect       list the prunable groups (heads, KV groups, MLP channels) of a model
  loraprune eval          perplexity of a model (dense, pruned, or base + adapter)
  loraprune prune-model   remove heads and MLP channels from the base model (LoRAPrune and baselines)
  loraprune prune-nm      N:M semi-structured sparsity (2:4, 4:8): LoRAPrune N:M, Wanda, SparseGPT
  loraprune prune-adapter train an over-parameterised LoRA and prune its rank (PrunedLoRA)
  loraprune report        redraw the report (report.md, report.html, plots) of a pruning run
  loraprune export gguf   write a saved model as a GGUF file for llama.cpp (per-layer widths included)
  loraprune sweep         a grid of prune-model / prune-adapter jobs from a YAML spec (resumable)

Every command takes --model: a local Hugging Face directory, a hub id, or the embedded
default 'smollm2-135m'. Run `loraprune COMMAND --help` for the options of one command.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraprune", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"loraprune.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"loraprune.cli.{name}":
                continue  # command not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except LoraPruneError as error:
        print(f"loraprune {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
