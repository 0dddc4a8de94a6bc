"""sweep.md: one table of every point (its settings and metrics), with what reproduces it.

Rendered from the sweep.json payload alone, so the table can be rebuilt from the results file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def format_cell(value: Any) -> str:
    """A table cell: 5 significant digits for floats, thousands separators for ints, '-' for missing."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value).replace("|", "\\|")


def _status(record: dict[str, Any]) -> str:
    if record["status"] == "failed":
        error = record["error"] if len(record["error"]) <= 120 else record["error"][:117] + "..."
        return "failed: " + format_cell(error.replace("\n", " "))
    return {"ok": "ok", "pending": "not run"}[record["status"]]


def _config_value(record: dict[str, Any], setting: str) -> Any:
    section, name = setting.split(".", 1)
    return record["config"][section][name]


def render_markdown(results: dict[str, Any], plots: Sequence[str] = ()) -> str:
    """The markdown report of a sweep: summary, fixed settings, the table, metric meanings, plots, spec."""
    import yaml

    summary = results["summary"]
    axes = list(results["axes"])
    derived = results["derived"]
    metrics = results["metrics"]
    lines = [f"# Sweep {results['name']} ({results['job']} jobs)", "", results["job_description"] + ".", ""]
    if results["command"]:
        lines += [f"Reproduce: `{results['command']}`", ""]
    status = f"{summary['ok']} of {summary['points']} points done"
    if summary["failed"]:
        status += f", {summary['failed']} failed"
    if summary["pending"]:
        status += f", {summary['pending']} not run yet"
    lines += [status + ".", ""]
    fixed = ", ".join(f"`{key}={value}`" for key, value in results["fixed"].items()) or "none"
    lines += [
        f"Fixed settings: {fixed}. Every other setting is the default of the job's configs; the full "
        "settings of every point are in sweep.json.",
        "",
    ]
    columns = [
        "#",
        "id",
        *axes,
        *(f"{derived[a]} (derived)" for a in axes if a in derived),
        *metrics,
        "status",
        "seconds",
    ]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for record in results["points"]:
        metric_values = record["metrics"] or {}
        cells = [
            str(record["index"] + 1),
            f"`{record['id']}`",
            *(format_cell(record["settings"][axis]) for axis in axes),
            *(format_cell(_config_value(record, derived[a])) for a in axes if a in derived),
            *(format_cell(metric_values.get(metric)) for metric in metrics),
            _status(record),
            format_cell(record["seconds"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *(f"- {metric}: {text}" for metric, text in results["metric_help"].items()), ""]
    lines += [f"![{name}]({name})" for name in plots]
    lines += ["", "Spec:", "", "```yaml", yaml.safe_dump(results["spec"], sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
