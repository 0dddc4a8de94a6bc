"""The JSON record a run leaves in its output directory, from which its report is drawn.

`prune-model` and `prune-adapter` both write `loraprune_report.json` (its `command` says which);
`prune-adapter` also writes the final ranks in `pruned_ranks.json`. The helpers here shape the
parts of the record that the report plots, so writer and reader agree on one format.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from loraprune.errors import LoraPruneError

REPORT_FILE = "loraprune_report.json"


def loss_history(log_history: Iterable[Mapping[str, Any]]) -> list[dict[str, float]]:
    """The training-loss entries of a `Trainer` log history: step, loss and learning rate."""
    return [
        {"step": entry["step"], "loss": entry["loss"], "learning_rate": entry.get("learning_rate")}
        for entry in log_history
        if "loss" in entry
    ]


def load_record(directory: str | Path) -> dict[str, Any]:
    """The run record of `directory`; a `LoraPruneError` when there is none (or it is not JSON)."""
    path = Path(directory) / REPORT_FILE
    if not path.is_file():
        raise LoraPruneError(
            f"{directory} has no {REPORT_FILE}: it is not the output of `loraprune prune-model` "
            "or `loraprune prune-adapter`"
        )
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise LoraPruneError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(record, dict):
        raise LoraPruneError(f"{path} does not hold a loraprune run record")
    if "command" not in record and "layers" in record:
        record["command"] = "prune-model"  # written by prune-model before records named their command
    return record
