"""The files of one training run besides its output: a scratch directory beside it and its checkpoints."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraprune.safety.checkpoints import Checkpointing
from loraprune.safety.staging import owned_temp_dir, temp_prefix


@dataclass(frozen=True)
class RunFiles:
    """`scratch`: a private directory beside the output (`.<name>.train-<pid>-*`) for the Trainer and
    staged pieces, removed when the run ends however it ends; `checkpointing`: None without
    `--save-steps` / `--resume`."""

    output: Path
    scratch: Path
    checkpointing: Checkpointing | None

    @property
    def trainer_dir(self) -> str:
        """The Trainer's `output_dir` when it does not checkpoint (its trackers may write there)."""
        return str(self.scratch / "trainer")


@contextmanager
def run_files(
    output: str | Path, save_steps: int, resume: str | None, settings: dict[str, Any], writer: bool = True
) -> Iterator[RunFiles]:
    """The `RunFiles` of a run on `output` (settings checked against a checkpoint to resume from first).

    On success the checkpoints are removed by the process that writes the output (`writer`): the
    output holds the result.
    """
    output = Path(output).expanduser().absolute()
    checkpointing = Checkpointing.for_output(output, save_steps, resume, settings)
    scratch = owned_temp_dir(output.parent, temp_prefix(output, "train"))
    try:
        yield RunFiles(output, scratch, checkpointing)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if checkpointing is not None and writer:
        checkpointing.finish()


def resume_folder(files: RunFiles | None) -> Path | None:
    """The checkpoint folder a run resumes from (for the pruning callbacks), or None."""
    if files is None or files.checkpointing is None:
        return None
    return files.checkpointing.resume_from
