"""The `loraprune` command line: a thin layer over the Python API.

Each sub-command lives in its own module of this package and exposes
`register(subparsers) -> None`, which adds its parser and sets `func` to a
`(args) -> int` handler. `main` is the one error boundary: user errors (`LoraPruneError` and
the exception types `loraprune.safety.user_errors` recognises) are printed as one line and exit
with status 2 (`--debug` adds their traceback); anything else is a bug and keeps its traceback.
Ctrl-C exits with 130 and SIGTERM with 143, after the same cleanup.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from loraprune.config import add_config_option, parse_args_with_config
from loraprune.errors import LoraPruneError
from loraprune.safety.signals import SIGTERM_EXIT, Terminated, sigterm_raises
from loraprune.safety.user_errors import user_error_message

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
default 'smollm2-135m', --device (default: CUDA when available, else the CPU), and
--config RUN.yaml: the same options in a file, overridden by the flags given with it.
Run `loraprune COMMAND --help` for the options of one command.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraprune", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log debug messages")
    parser.add_argument("--debug", action="store_true", help="print the traceback of user errors too")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"loraprune.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"loraprune.cli.{name}":
                continue  # command not built yet
            raise
        module.register(subparsers)
    for command_parser in subparsers.choices.values():
        add_config_option(command_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parse_args_with_config(parser, argv)
    except LoraPruneError as error:  # a bad --config file
        command = next((word for word in argv or sys.argv[1:] if not word.startswith("-")), "")
        print(f"loraprune {command}: error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        with sigterm_raises():
            return int(args.func(args) or 0)
    except KeyboardInterrupt as interrupt:
        terminated = isinstance(interrupt, Terminated)
        print(
            f"loraprune {args.command}: {'terminated (SIGTERM)' if terminated else 'interrupted'}; "
            "temporary files removed, no output was written",
            file=sys.stderr,
        )
        return SIGTERM_EXIT if terminated else 130
    except Exception as error:
        message = user_error_message(error)
        if message is None:
            raise  # a bug: keep the traceback
        if args.debug:
            traceback.print_exc()
        print(f"loraprune {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
