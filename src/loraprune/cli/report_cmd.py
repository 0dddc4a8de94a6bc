"""`loraprune report DIR`: draw the run report of a pruned model or adapter again from its record."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="regenerate report.md, report.html and the plots of a prune-model / prune-adapter output",
        description="Read DIR/loraprune_report.json (written by prune-model and prune-adapter) and write "
        "report.md, a self-contained report.html and the PNG plots beside it again.",
    )
    parser.add_argument("directory", metavar="DIR", help="output directory of loraprune prune-model or prune-adapter")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from loraprune.run_report import load_record, write_run_report
    from loraprune.safety.output import probe_directory

    load_record(args.directory)  # not a run's output: say so before probing
    probe_directory(Path(args.directory), f"the report into {args.directory}")
    for path in write_run_report(args.directory):
        print(path)
    return 0
