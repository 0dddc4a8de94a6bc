"""Plots of a sweep: the metrics against every numeric grid axis, one line per setting of the other axes.

So a grid over criterion x sparsity gives quality against sparsity with one line per criterion,
and an `r0` or `alpha_over_r0` axis quality against r0 or alpha; categorical axes (criterion,
method) only label lines. One PNG per numeric axis (`vs_<axis>.png`), one panel per metric.
Needs matplotlib (`pip install 'loraprune[plots]'`); without it the sweep has no plots.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PLOT_PREFIX = "vs_"


def numeric_axes(axes: dict[str, list[Any]]) -> list[str]:
    """Axes whose values are all numbers (not booleans), with at least two different values."""
    return [
        axis
        for axis, values in axes.items()
        if len(set(map(str, values))) >= 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    ]


def plot_sweep(results: dict[str, Any], output: Path) -> list[Path]:
    """Write one PNG per numeric axis into `output` (replacing earlier ones); returns their paths."""
    for old in output.glob(f"{PLOT_PREFIX}*.png"):
        old.unlink()
    done = [record for record in results["points"] if record["status"] == "ok"]
    axes = numeric_axes(results["axes"])
    if not axes or not done:
        return []
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed, so the sweep has no plots (pip install 'loraprune[plots]')")
        return []
    matplotlib.use("Agg")
    paths = []
    for axis in axes:
        path = output / f"{PLOT_PREFIX}{axis.replace('.', '_')}.png"
        _plot_axis(results, done, axis, path)
        paths.append(path)
    return paths


def _plot_axis(results: dict[str, Any], done: list[dict[str, Any]], axis: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    metrics = results["metrics"]
    others = [other for other in results["axes"] if other != axis]
    lines: dict[str, list[dict[str, Any]]] = {}
    for record in done:
        label = ", ".join(f"{other}={record['settings'][other]}" for other in others)
        lines.setdefault(label, []).append(record)
    ticks = sorted(set(results["axes"][axis]))
    figure, panels = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics) + 1, 3.8), squeeze=False)
    for panel, metric in zip(panels[0], metrics):
        for label, records in lines.items():
            points = sorted(
                (r["settings"][axis], r["metrics"][metric]) for r in records if r["metrics"].get(metric) is not None
            )
            if points:
                xs, ys = zip(*points)
                panel.plot(xs, ys, marker="o", label=label or None)
        if ticks[0] > 0 and ticks[-1] / ticks[0] >= 8:
            panel.set_xscale("log", base=2)
        panel.set_xticks(ticks, [f"{tick:g}" for tick in ticks])
        panel.minorticks_off()
        panel.set_xlabel(axis)
        panel.set_ylabel(metric)
        panel.grid(alpha=0.3)
    if others:
        panels[0][-1].legend(fontsize=7, loc="best")
    figure.suptitle(f"{results['name']}: {', '.join(metrics)} against {axis}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
