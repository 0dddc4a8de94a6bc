"""Run reports: `report.md`, a self-contained `report.html` and PNG plots beside a pruned model or adapter.

`prune-model` and `prune-adapter` write their run record (`loraprune_report.json`) and call
`write_run_report` inside their atomic output write; `loraprune report DIR` calls it again.
Modules: `summary` (what the run record holds of the model: sizes, per-layer widths,
environment), `record` (the JSON record: file name, loading, the loss history it stores),
`plots` (matplotlib figures), `document` (Markdown and HTML rendering), `contents` (what each
report says).
"""

from __future__ import annotations

from pathlib import Path

from loraprune.errors import LoraPruneError
from loraprune.run_report.contents import FIGURES, adapter_report, model_report
from loraprune.run_report.document import to_html, to_markdown
from loraprune.run_report.plots import save_figure
from loraprune.run_report.record import REPORT_FILE, load_record

MARKDOWN_FILE = "report.md"
HTML_FILE = "report.html"

BUILDERS = {"prune-model": model_report, "prune-adapter": adapter_report}


def write_run_report(directory: str | Path) -> list[Path]:
    """Draw the report of the run recorded in `directory` and return the files written.

    Raises `LoraPruneError` when `directory` holds no run record.
    """
    directory = Path(directory)
    record = load_record(directory)
    command = record.get("command")
    if command not in BUILDERS:
        raise LoraPruneError(
            f"{directory / REPORT_FILE} is not the record of a prune-model or prune-adapter run "
            f"(command {command!r}); only those have run reports"
        )
    figures: dict = {}
    title, blocks = BUILDERS[command](record, figures)
    written = [save_figure(figure, directory / name) for name, figure in figures.items()]
    for stale in set(FIGURES) - set(figures):
        (directory / stale).unlink(missing_ok=True)
    (directory / MARKDOWN_FILE).write_text(to_markdown(blocks))
    (directory / HTML_FILE).write_text(to_html(blocks, title, directory))
    return [directory / MARKDOWN_FILE, directory / HTML_FILE, *written]


__all__ = ["HTML_FILE", "MARKDOWN_FILE", "REPORT_FILE", "write_run_report"]
