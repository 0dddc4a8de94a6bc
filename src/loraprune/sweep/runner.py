"""Run a sweep point by point, recording each result the moment it exists, and resume after a stop.

`OUTPUT/sweep.json` lists every point of the grid (in grid order) with its status: `pending`,
`ok` (with its metrics) or `failed` (with its error). It is rewritten atomically after each
point, so an interrupted sweep loses at most the point it was running. A rerun reuses the
`ok` points whose ids (hash of the settings) are still in the grid, retries failed and pending
ones, and refuses results of points the spec no longer has (a changed setting would silently mix
incomparable numbers). A failing point is recorded and the sweep goes on.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from loraprune.errors import ConfigError, LoraPruneError
from loraprune.io import write_json
from loraprune.run_report.summary import environment
from loraprune.safety.staging import owned_temp_dir, remove_dead_temp_dirs
from loraprune.sweep.jobs import JobRunner
from loraprune.sweep.plots import plot_sweep
from loraprune.sweep.spec import Point, SweepSpec, jsonable
from loraprune.sweep.table import render_markdown

logger = logging.getLogger(__name__)

RESULTS_FILE = "sweep.json"
TABLE_FILE = "sweep.md"
POINTS_DIR = "points"
#: the running point's model or adapter when outputs are not kept; it holds a .gitignore of "*", so a
#: sweep whose results are committed (benchmarks/results/) never commits a half-written point
SCRATCH_DIR = ".scratch"
FORMAT = "loraprune-sweep/1"
#: name prefix of a point's scratch directory, followed by the sweep's PID (so a later sweep removes the
#: scratch of a killed one)
SCRATCH_PREFIX = "point-"


@dataclass
class SweepOutcome:
    """What a call of `run_sweep` did: the points it ran, reused and saw fail, and the files it wrote."""

    results: dict[str, Any]
    ran: list[str]
    reused: list[str]
    failed: list[str]
    files: list[Path]


def run_sweep(
    spec: SweepSpec,
    *,
    fresh: bool = False,
    job: JobRunner | None = None,
    command: str | None = None,
    progress: bool = True,
) -> SweepOutcome:
    """Run the points of `spec` that have no result yet; write sweep.json, sweep.md and the plots.

    `fresh` discards earlier results in the output directory; `job` replaces the job kind's runner
    (tests); `command` is the command line that reproduces the sweep, shown in the table. An
    interruption (Ctrl-C) still writes the table and plots of the points done, then propagates.
    """
    spec.output.mkdir(parents=True, exist_ok=True)
    reused = {} if fresh else reusable_records(spec)
    records = {point.id: reused.get(point.id) or new_record(spec, point) for point in spec.points}
    todo = [point for point in spec.points if point.id not in reused]
    run = job or spec.job.run
    ran: list[str] = []
    failed: list[str] = []
    write_json(spec.output / RESULTS_FILE, results_payload(spec, records, command))
    try:
        with tqdm(
            total=len(spec.points),
            initial=len(spec.points) - len(todo),
            desc=f"sweep {spec.name}",
            unit="point",
            disable=not progress,
        ) as bar:
            for point in todo:
                bar.set_postfix_str(point.id)
                records[point.id] = run_point(spec, point, run)
                ran.append(point.id)
                if records[point.id]["status"] == "failed":
                    failed.append(point.id)
                write_json(spec.output / RESULTS_FILE, results_payload(spec, records, command))
                bar.update()
    finally:
        results = results_payload(spec, records, command)
        files = [spec.output / RESULTS_FILE, *write_reports(results, spec.output)]
    return SweepOutcome(results, ran, [point.id for point in spec.points if point.id in reused], failed, files)


def write_reports(results: dict[str, Any], output: Path) -> list[Path]:
    """sweep.md and the plots of a results payload; returns the files written."""
    plots = plot_sweep(results, output)
    table = output / TABLE_FILE
    table.write_text(render_markdown(results, [p.name for p in plots]))
    return [table, *plots]


def new_record(spec: SweepSpec, point: Point) -> dict[str, Any]:
    """The record of a point that has not run: its settings and full configuration."""
    return {
        "id": point.id,
        "index": point.index,
        "settings": jsonable(point.settings),
        "status": "pending",
        "metrics": None,
        "error": None,
        "seconds": None,
        "config": point.config_dict(spec.job),
    }


def run_point(spec: SweepSpec, point: Point, run: JobRunner) -> dict[str, Any]:
    """Run one point; an exception of the job becomes a `failed` record (KeyboardInterrupt stops the sweep)."""
    record = new_record(spec, point)
    logger.info(
        "point %d/%d (%s): %s",
        point.index + 1,
        len(spec.points),
        point.id,
        ", ".join(f"{k}={v}" for k, v in point.settings.items()),
    )
    started = time.perf_counter()
    try:
        with point_output(spec, point) as output:
            metrics = run(point.configs, output)
    except Exception as error:  # recorded with its message; the traceback goes to the log
        logger.error("point %s failed", point.id, exc_info=True)
        record.update(status="failed", error=f"{type(error).__name__}: {error}")
    else:
        record.update(status="ok", metrics=jsonable(metrics))
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record


@contextmanager
def point_output(spec: SweepSpec, point: Point) -> Iterator[Path]:
    """Where the point's job writes its model or adapter: OUTPUT/points/ID if kept, else a scratch directory."""
    if spec.keep_outputs:
        (spec.output / POINTS_DIR).mkdir(exist_ok=True)
        yield spec.output / POINTS_DIR / point.id
        return
    scratch_root = spec.output / SCRATCH_DIR
    scratch_root.mkdir(exist_ok=True)
    (scratch_root / ".gitignore").write_text("# loraprune sweep: the running point's outputs\n*\n")
    remove_dead_temp_dirs(scratch_root, SCRATCH_PREFIX)  # points of a sweep that was killed
    scratch = owned_temp_dir(scratch_root, SCRATCH_PREFIX)
    try:
        yield scratch / "output"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def reusable_records(spec: SweepSpec) -> dict[str, dict[str, Any]]:
    """Finished records of an earlier run in the output directory, by id, refreshed to the current grid.

    Raises `ConfigError` when a finished point is not a point of `spec` any more: its settings
    changed, and mixing its result with the new points would compare different experiments.
    """
    path = spec.output / RESULTS_FILE
    if not path.exists():
        return {}
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise LoraPruneError(f"{path} is not valid JSON ({error}); move it away or pass --fresh") from error
    if not isinstance(stored, dict) or stored.get("format") != FORMAT:
        raise LoraPruneError(f"{path} is not a loraprune sweep result; choose another output directory")
    finished = {r["id"]: r for r in stored["points"] if r["status"] == "ok"}
    points = {point.id: point for point in spec.points}
    stale = [record for point_id, record in finished.items() if point_id not in points]
    if stale:
        raise ConfigError(
            f"{path} holds {len(stale)} finished point(s) this spec no longer has{describe_changes(stored, spec)}. "
            "Restore the spec, choose another output directory, or pass --fresh to discard the earlier results."
        )
    reused = {}
    for point_id, old in finished.items():
        record = new_record(spec, points[point_id])
        changed = sorted(
            f"{section}.{name}"
            for section, values in record["config"].items()
            for name, value in values.items()
            if old["config"].get(section, {}).get(name, value) != value
        )
        if changed:
            logger.warning(
                "point %s ran with other defaults (%s); its result is reused (--fresh reruns everything)",
                point_id,
                ", ".join(changed),
            )
        record.update(status="ok", metrics=old["metrics"], seconds=old["seconds"])
        reused[point_id] = record
    return reused


def describe_changes(stored: dict[str, Any], spec: SweepSpec) -> str:
    """What differs between the spec of stored results and `spec`: job, fixed settings, removed axis values."""
    changes = []
    if stored.get("job") != spec.job.name:
        changes.append(f"job {stored.get('job')} -> {spec.job.name}")
    old_fixed, new_fixed = stored.get("fixed", {}), jsonable(spec.fixed)
    for key in sorted(old_fixed.keys() | new_fixed.keys()):
        if old_fixed.get(key, "unset") != new_fixed.get(key, "unset"):
            changes.append(f"{key}: {old_fixed.get(key, 'unset')} -> {new_fixed.get(key, 'unset')}")
    new_axes = jsonable(spec.axes)
    for key, values in stored.get("axes", {}).items():
        removed = [value for value in values if value not in new_axes.get(key, [])]
        if removed and key in new_axes:
            changes.append(f"grid {key}: {removed} removed")
        elif key not in new_axes and key not in new_fixed:
            changes.append(f"grid axis {key} removed")
    return f" (changed: {'; '.join(changes)})" if changes else ""


def results_payload(spec: SweepSpec, records: dict[str, dict[str, Any]], command: str | None) -> dict[str, Any]:
    """The content of sweep.json: the spec, its axes and metrics, and every point in grid order."""
    points = [records[point.id] for point in spec.points]
    counts = Counter(record["status"] for record in points)
    derived = {
        f"{section}.{name}": f"{section}.{d.target}"
        for section, settings in spec.job.derived.items()
        for name, d in settings.items()
    }
    return {
        "format": FORMAT,
        "name": spec.name,
        "job": spec.job.name,
        "job_description": spec.job.description,
        "command": command,
        "spec_file": None if spec.path is None else str(spec.path),
        "spec": jsonable(spec.source),
        "fixed": jsonable(spec.fixed),
        "axes": jsonable(spec.axes),
        "derived": {axis: target for axis, target in derived.items() if axis in spec.axes},
        "metrics": list(spec.metrics),
        "metric_help": {metric: spec.job.metrics[metric] for metric in spec.metrics},
        "summary": {
            "points": len(points),
            "ok": counts["ok"],
            "failed": counts["failed"],
            "pending": counts["pending"],
        },
        "environment": environment(),
        "points": points,
    }
