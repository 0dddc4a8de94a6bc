"""Grids of pruning jobs from a small YAML spec, resumable, reported as one JSON, one table and plots.

`load_spec` validates the spec against the job's config dataclasses and expands the grid;
`run_sweep` runs the points that have no result yet. See `loraprune sweep --help`.
"""

from loraprune.sweep.jobs import JOBS, JobKind
from loraprune.sweep.runner import RESULTS_FILE, TABLE_FILE, SweepOutcome, run_sweep
from loraprune.sweep.spec import Point, SweepSpec, load_spec, parse_spec

__all__ = [
    "JOBS",
    "RESULTS_FILE",
    "TABLE_FILE",
    "JobKind",
    "Point",
    "SweepOutcome",
    "SweepSpec",
    "load_spec",
    "parse_spec",
    "run_sweep",
]
