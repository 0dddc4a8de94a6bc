"""`loraprune sweep`: run a grid of pruning jobs from a YAML spec, resumably; one JSON, one table, plots."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import typing

if typing.TYPE_CHECKING:
    from loraprune.sweep.jobs import JobKind

EPILOG = """\
spec (YAML):
  name: prunedlora-alpha            # optional; default: the file name
  job: adapter                      # model (prune-model) or adapter (prune-adapter + answer-token NLL)
  output: sweeps/prunedlora-alpha   # optional; default sweeps/NAME
  metrics: [test_nll, total_rank]   # optional; default: the job's quality metric
  fixed:
    training: {steps: 60, batch_size: 8}
  grid:                             # the points are the cartesian product of the axes
    rank_pruning.r0: [64, 256]
    rank_pruning.alpha_over_r0: [0.25, 0.5, 1, 2]

Every field of the job's configs can be fixed or an axis (`loraprune sweep --settings adapter`
lists them). Results go to OUTPUT/sweep.json after every point; after an interruption the same
command runs only the points without a result. A failed point is recorded and the sweep goes on
(exit status 1 at the end; a rerun retries it). Writes OUTPUT/sweep.md (one table) and
OUTPUT/vs_<axis>.png (the metrics against every numeric axis).

examples:
  loraprune sweep examples/sweeps/prunedlora_alpha.yaml
  loraprune sweep examples/sweeps/loraprune_ema.yaml --output runs/ema --dry-run
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="run a grid of prune-model / prune-adapter jobs from a YAML spec (resumable)",
        description="Run every point of a grid (method x criterion x sparsity or rank x a hyperparameter) "
        "described by a YAML spec, skipping the points that already have a result, and write one JSON, one "
        "markdown table and plots.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("spec", nargs="?", help="the sweep spec (YAML file)")
    parser.add_argument("--output", help="output directory (overrides the spec's 'output')")
    parser.add_argument("--fresh", action="store_true", help="discard the results already in the output directory")
    parser.add_argument("--dry-run", action="store_true", help="list the points and which would run; run nothing")
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar over the points"
    )
    parser.add_argument(
        "--settings",
        choices=("model", "adapter"),
        help="list every setting a spec of this job kind can fix or sweep, and its metrics",
    )
    parser.set_defaults(func=run)


def settings_help(job: JobKind) -> str:
    """Every setting of a job kind (section.field, type, default, help), its derived settings and metrics."""
    from loraprune.sweep.spec import type_name

    lines = [f"{job.name} jobs: {job.description}", ""]
    for section, cls in job.sections.items():
        lines.append(f"{section} ({cls.__name__}):")
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.name in job.managed.get(section, {}):
                continue
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            choices = field.metadata.get("choices")
            kind = f"one of {', '.join(map(str, choices))}" if choices else type_name(hints[field.name])
            lines.append(f"  {section}.{field.name} ({kind}, default {default!r}): {field.metadata.get('help', '')}")
        for name, derived in job.derived.get(section, {}).items():
            lines.append(f"  {section}.{name} (a number; sets {section}.{derived.target}): {derived.help}")
    lines += ["", "metrics:", *(f"  {name}: {text}" for name, text in job.metrics.items())]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from loraprune.errors import ConfigError
    from loraprune.safety.output import claim_output
    from loraprune.safety.signals import SIGTERM_EXIT, Terminated
    from loraprune.sweep import JOBS, RESULTS_FILE, TABLE_FILE, load_spec, run_sweep
    from loraprune.sweep.runner import reusable_records

    if args.settings:
        print(settings_help(JOBS[args.settings]))
        return 0
    if args.spec is None:
        raise ConfigError(
            "give a sweep spec, e.g. loraprune sweep examples/sweeps/prunedlora_alpha.yaml "
            "(loraprune sweep --help shows the format)"
        )
    spec = load_spec(args.spec, args.output)
    command = f"loraprune sweep {shlex.quote(args.spec)} --output {shlex.quote(str(spec.output))}"
    if args.dry_run:
        done = {} if args.fresh else reusable_records(spec)
        for point in spec.points:
            settings = ", ".join(f"{k}={v}" for k, v in point.settings.items())
            print(f"{point.index + 1:4d}  {point.id}  {'done' if point.id in done else 'to run':6s}  {settings}")
        print(f"{len(spec.points)} points, {len(spec.points) - len(done)} to run, output {spec.output}")
        return 0
    try:
        with claim_output(spec.output, f"the sweep's output {spec.output}"):
            outcome = run_sweep(spec, fresh=args.fresh, command=command, progress=args.progress)
    except KeyboardInterrupt as interrupt:
        print(
            f"{'terminated' if isinstance(interrupt, Terminated) else 'interrupted'}: the finished points are in "
            f"{spec.output / RESULTS_FILE}; run the same command again to resume",
            file=sys.stderr,
        )
        return SIGTERM_EXIT if isinstance(interrupt, Terminated) else 130
    summary = outcome.results["summary"]
    print(
        f"sweep {spec.name}: ran {len(outcome.ran)} point(s), reused {len(outcome.reused)}; "
        f"{summary['ok']} of {summary['points']} done"
    )
    print(f"wrote {', '.join(str(path) for path in outcome.files)}")
    if outcome.failed:
        print(
            f"{len(outcome.failed)} point(s) failed ({', '.join(outcome.failed)}); their errors are in "
            f"{spec.output / TABLE_FILE}; run the same command again to retry them",
            file=sys.stderr,
        )
        return 1
    return 0
