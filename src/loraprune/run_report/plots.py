"""The figures of a run report, drawn with matplotlib's object API on the Agg canvas.

No `pyplot`: figures are plain `Figure` objects, so drawing a report neither changes the
caller's backend (a notebook keeps its own) nor leaks figures into pyplot's global state.
Every function returns the figure so that tests can check what was drawn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.ticker import MaxNLocator

from loraprune.cubic_schedule import CubicSchedule
from loraprune.lora import DEFAULT_TARGET_MODULES

#: (key in the report's per-layer table, axis title) of the kept-structure plot
WIDTH_PANELS = (("heads", "query heads"), ("kv_heads", "KV groups"), ("channels", "MLP channels"))

KEPT, REMOVED, PLANNED = "#1f77b4", "#d9d9d9", "#ff7f0e"


def new_figure(width: float, height: float) -> Figure:
    """An empty figure on the Agg canvas."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    figure.savefig(path, dpi=110)
    return Path(path)


def kept_widths(
    layers_after: Sequence[Mapping[str, int]], layers_before: Sequence[Mapping[str, int]] | None = None
) -> Figure:
    """One bar per decoder layer and panel (query heads, KV groups, MLP channels): kept, over the original."""
    figure = new_figure(10, 3.4)
    axes = figure.subplots(1, len(WIDTH_PANELS))
    indices = [row["layer"] for row in layers_after]
    for axis, (key, title) in zip(axes, WIDTH_PANELS):
        kept = [row[key] for row in layers_after]
        if layers_before is not None:
            original = [row[key] for row in layers_before]
            axis.bar(indices, original, color=REMOVED, width=0.8, label="removed")
            axis.set_title(f"{title}: {sum(kept):,} of {sum(original):,} kept", fontsize=10)
        else:
            axis.set_title(f"{title}: {sum(kept):,} kept", fontsize=10)
        axis.bar(indices, kept, color=KEPT, width=0.8, label="kept")
        axis.set_xlabel("decoder layer")
        axis.set_xlim(min(indices) - 0.6, max(indices) + 0.6)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("count per layer")
    handles, labels = axes[-1].get_legend_handles_labels()
    figure.legend(handles[::-1], labels[::-1], loc="outside upper right", fontsize=8, ncols=2)
    figure.suptitle("Kept structure per decoder layer")
    return figure


def loss_curve(history: Sequence[Mapping[str, float]], pruning_steps: Sequence[int] = ()) -> Figure:
    """The logged training loss against the optimizer step, with the pruning events as vertical lines."""
    figure = new_figure(6.4, 3.6)
    axis = figure.subplots()
    for index, step in enumerate(pruning_steps):
        axis.axvline(step, color=PLANNED, alpha=0.5, linewidth=1, label="pruning event" if index == 0 else None)
    steps = [entry["step"] for entry in history]
    axis.plot(
        steps,
        [entry["loss"] for entry in history],
        marker="o" if len(history) <= 40 else None,
        markersize=3,
        color=KEPT,
        label="training loss",
    )
    axis.set_xlabel("optimizer step")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel("training loss (logged mean)")
    axis.set_title("Training loss")
    axis.grid(alpha=0.3)
    if pruning_steps:
        axis.legend(loc="best", fontsize=8)
    return figure


def sparsity_against_step(
    events: Sequence[Mapping[str, Any]], schedule: Mapping[str, int], final_sparsity: float
) -> Figure:
    """LoRAPrune's budget: the cubic schedule (scaled to the final sparsity) and the sparsity each event reached."""
    figure = new_figure(6.4, 3.6)
    axis = figure.subplots()
    cubic = CubicSchedule(**schedule)
    steps = list(range(cubic.total_steps + 1))
    axis.plot(
        steps,
        [100 * final_sparsity * cubic.fraction(s) for s in steps],
        color=PLANNED,
        linewidth=4,
        alpha=0.45,
        label="cubic schedule",
    )
    reached = [(0, 0.0)] + [(e["step"], 100 * e["decoder_sparsity"]) for e in events]
    axis.step(
        [s for s, _ in reached] + [cubic.total_steps],
        [v for _, v in reached] + [reached[-1][1]],
        where="post",
        color=KEPT,
        label="removed (pruning events)",
    )
    axis.plot([s for s, _ in reached[1:]], [v for _, v in reached[1:]], "o", color=KEPT, markersize=4)
    _label_budget_axis(axis, "decoder attn+MLP params removed (%)", "Sparsity against step", "lower right")
    return figure


def _label_budget_axis(axis: Any, ylabel: str, title: str, legend_loc: str) -> None:
    """The common dressing of a budget-against-step plot: integer steps, zero-based values, grid, legend."""
    axis.set_xlabel("optimizer step")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend(loc=legend_loc, fontsize=8)


def rank_against_step(
    events: Sequence[Mapping[str, Any]],
    planned: Sequence[tuple[int, int]],
    start_rank: int,
    target_rank: int,
    total_steps: int,
) -> Figure:
    """PrunedLoRA's budget: total rank over all modules after each pruning event, planned and reached."""
    figure = new_figure(6.4, 3.6)
    axis = figure.subplots()
    if planned:
        plan = [(0, start_rank), *planned]
        axis.step(
            [s for s, _ in plan] + [total_steps],
            [r for _, r in plan] + [plan[-1][1]],
            where="post",
            color=PLANNED,
            linewidth=4,
            alpha=0.45,
            label="schedule",
        )
    reached = [(0, start_rank)] + [(e["step"], e["total_rank"]) for e in events]
    axis.step(
        [s for s, _ in reached] + [total_steps],
        [r for _, r in reached] + [reached[-1][1]],
        where="post",
        color=KEPT,
        label="reached (pruning events)",
    )
    axis.plot([s for s, _ in reached[1:]], [r for _, r in reached[1:]], "o", color=KEPT, markersize=4)
    axis.axhline(target_rank, color="grey", linewidth=0.8, linestyle=":", label=f"target {target_rank:,}")
    _label_budget_axis(axis, "total LoRA rank (all modules)", "Rank budget against step", "upper right")
    return figure


def _layer_of(name: str) -> int:
    digits = [part for part in name.split(".") if part.isdigit()]
    return int(digits[0]) if digits else -1


def rank_grid(ranks: Mapping[str, int]) -> tuple[list[int], list[str], list[list[float]]]:
    """Final ranks as a layer × module grid: layers ascending; the default projections in their usual
    order, then any other module names; NaN where a layer has no such module."""
    grid: dict[int, dict[str, int]] = {}
    for name, rank in ranks.items():
        grid.setdefault(_layer_of(name), {})[name.rsplit(".", 1)[-1]] = rank
    present = {module for row in grid.values() for module in row}
    modules = [m for m in DEFAULT_TARGET_MODULES if m in present] + sorted(present - set(DEFAULT_TARGET_MODULES))
    layers = sorted(grid)
    return layers, modules, [[float(grid[layer].get(m, math.nan)) for m in modules] for layer in layers]


def draw_rank_heatmap(
    axis: Axes, ranks: Mapping[str, int], vmax: float | None = None, annotate: bool = False
) -> AxesImage:
    """Draw the layer × module grid of `ranks` on `axis` (colour scale 0..vmax); returns the image."""
    layers, modules, grid = rank_grid(ranks)
    image = axis.imshow(
        grid, aspect="auto", cmap="viridis", vmin=0, vmax=vmax or max(ranks.values()), interpolation="nearest"
    )
    names = [m.removesuffix("_proj") for m in modules]
    axis.set_xticks(range(len(modules)), names, fontsize=8, rotation=0 if max(map(len, names)) <= 5 else 90)
    step = max(1, math.ceil(len(layers) / 32))
    axis.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)], fontsize=7)
    axis.set_xlabel("module")
    axis.set_ylabel("decoder layer")
    if annotate:
        limit = image.norm.vmax
        for row, values in enumerate(grid):
            for column, value in enumerate(values):
                if not math.isnan(value):
                    axis.text(
                        column,
                        row,
                        f"{value:.0f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="black" if value > 0.6 * limit else "white",
                    )
    return image


def rank_heatmap(ranks: Mapping[str, int], trained_rank: int | None = None) -> Figure:
    """The final rank of every adapter module, layer × module, annotated with the rank."""
    layers, _, _ = rank_grid(ranks)
    figure = new_figure(5.2, max(3.0, 0.22 * len(layers) + 1.6))
    axis = figure.subplots()
    image = draw_rank_heatmap(axis, ranks, vmax=trained_rank, annotate=True)
    figure.colorbar(image, ax=axis, label="final rank" + (f" (trained at {trained_rank})" if trained_rank else ""))
    total = sum(ranks.values())
    axis.set_title(f"Final LoRA rank per module\n(total {total:,}, mean {total / len(ranks):.2f})", fontsize=10)
    return figure


def calibration_scatter(events: Sequence[Mapping[str, Any]]) -> Figure:
    """PrunedLoRA's quadratic model against reality: predicted and measured held-out loss changes.

    Left, every pruning event (labelled with its step); right, the single modules' removals
    measured alone (`module_checks`), whose changes are far smaller, on their own scale. On the
    dashed diagonal the prediction is exact; in the shaded quadrants its sign is wrong.
    """
    figure = new_figure(9.6, 4.4)
    left, right = figure.subplots(1, 2)
    whole = [
        (e["step"], e["predicted_loss_change"], e["measured_loss_change"])
        for e in events
        if e.get("predicted_loss_change") is not None and e.get("measured_loss_change") is not None
    ]
    checks = [(c["predicted"], c["measured"]) for e in events for c in e.get("module_checks") or []]
    _calibration_axis(left, [(p, m) for _, p, m in whole], "pruning event", KEPT, "Pruning events")
    for step, predicted, measured in whole:
        left.annotate(str(step), (predicted, measured), textcoords="offset points", xytext=(4, 3), fontsize=7)
    _calibration_axis(right, checks, "one module's removal", "#7f7f7f", "Single modules' removals")
    return figure


def _calibration_axis(axis: Axes, pairs: Sequence[tuple[float, float]], label: str, color: str, title: str) -> None:
    """Predicted (x) against measured (y) pairs on a square, zero-centred axis with the wrong-sign quadrants shaded."""
    limit = 1.1 * max((abs(v) for pair in pairs for v in pair), default=1.0) or 1.0
    axis.fill_between([-limit, 0], 0, limit, color="#f2d7d5", alpha=0.6, linewidth=0, label="sign wrong")
    axis.fill_between([0, limit], -limit, 0, color="#f2d7d5", alpha=0.6, linewidth=0)
    axis.plot([-limit, limit], [-limit, limit], "--", color="grey", linewidth=0.8, label="predicted = measured")
    if pairs:
        axis.plot(*zip(*pairs), "o", color=color, markersize=4, label=label)
    axis.set_xlim(-limit, limit)
    axis.set_ylim(-limit, limit)
    axis.axhline(0, color="black", linewidth=0.5)
    axis.axvline(0, color="black", linewidth=0.5)
    axis.ticklabel_format(style="sci", scilimits=(-2, 2))
    axis.set_xlabel("predicted loss change (quadratic model, nats)")
    axis.set_ylabel("measured on the held-out batch (nats)")
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=7)
