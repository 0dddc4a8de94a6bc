"""`--save-steps N` / `--resume [DIR|latest]`: Trainer checkpoints that carry the whole pruning state.

A run with checkpoints trains in `<output>-checkpoints/` (beside the output): every `save_steps`
optimizer steps the Trainer writes `checkpoint-<step>/` (LoRA weights, optimizer, scheduler, RNG
and data position) and the pruning callbacks add their state (LoRAPrune's scores and masks,
PrunedLoRA's masks and curvature window, LoRAPrune N:M's element scores). `RUN_STATE_FILE`, written
last, holds the run's settings (and state the run decides before training, such as one-shot masks):
a checkpoint without it is incomplete (killed while saving) and is never resumed from. A resumed run
must have the same settings; its final masks, ranks and weights are those of an uninterrupted run.
When the run has saved its output, the checkpoint folder is removed.

`PrunerCheckpoint` is the shared save/load of a pruning callback's state file.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from loraprune.errors import ConfigError, LoraPruneError

logger = logging.getLogger(__name__)

RUN_STATE_FILE = "loraprune_run.pt"
#: settings that may differ between an interrupted run and its resumption
RESUMABLE_SETTINGS = ("output", "overwrite", "save_steps", "resume")
LATEST = "latest"


_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_dir(output: Path) -> Path:
    """Where a run on `output` keeps its checkpoints."""
    return output.parent / f"{output.name}-checkpoints"


def complete_checkpoints(folder: Path) -> list[Path]:
    """The complete `checkpoint-<step>` folders in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if (match := _CHECKPOINT.match(path.name)) and (path / RUN_STATE_FILE).is_file()
    ]
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str, default_folder: Path) -> Path:
    """The checkpoint folder `--resume` names: 'latest' (of `default_folder`), a checkpoint folder, or a
    folder of checkpoints (its latest)."""
    folder = default_folder if resume == LATEST else Path(resume).expanduser()
    if (folder / RUN_STATE_FILE).is_file():
        return folder
    found = complete_checkpoints(folder)
    if not found:
        raise ConfigError(
            f"--resume {resume}: no complete checkpoint in {folder} (a run saves them with --save-steps N)"
        )
    return found[-1]


def comparable_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings of a run that its resumption must share (nested dicts of config fields)."""
    return {
        key: comparable_settings(value) if isinstance(value, dict) else value
        for key, value in settings.items()
        if key not in RESUMABLE_SETTINGS
    }


@dataclass
class Checkpointing:
    """Checkpoints of one run: where they go, how often, where the run resumes from, and its settings.

    `state` is recorded in every checkpoint (what the run decided before training); after a resume,
    `resumed_state` is what the interrupted run recorded.
    """

    directory: Path
    save_steps: int
    settings: dict[str, Any]
    resume_from: Path | None = None
    state: dict[str, Any] = field(default_factory=dict)
    resumed_state: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_output(
        cls, output: Path, save_steps: int, resume: str | None, settings: dict[str, Any]
    ) -> Checkpointing | None:
        """The checkpointing of a run on `output` (None without `save_steps` or `resume`), its settings
        checked against the checkpoint it resumes from before any work starts."""
        if save_steps < 0:
            raise ConfigError(f"save-steps must be >= 0, got {save_steps}")
        if not save_steps and resume is None:
            return None
        settings = comparable_settings(settings)
        checkpointing = cls(checkpoint_dir(output), save_steps, settings)
        if resume is not None:
            folder = resolve_resume(resume, checkpointing.directory)
            saved = torch.load(folder / RUN_STATE_FILE, weights_only=True)
            if saved["settings"] != settings:
                changed = sorted(_differences(saved["settings"], settings))
                raise ConfigError(
                    f"--resume {folder}: that run had other settings ({', '.join(changed)}); resume with the "
                    "settings of the interrupted run"
                )
            checkpointing.resume_from = folder
            checkpointing.resumed_state = saved.get("state", {})
            logger.info("resuming from %s", folder)
        return checkpointing

    def record(self, key: str, value: Any) -> None:
        """Record `value` (decided before training) in every checkpoint; on a resumed run it must equal
        what the interrupted run recorded."""
        if key in self.resumed_state and not _same(self.resumed_state[key], value):
            raise LoraPruneError(
                f"--resume: this run's {key.replace('_', ' ')} differ from the interrupted run's (in "
                f"{self.resume_from}); resume with the same model, data and settings"
            )
        self.state[key] = value

    def callback(self) -> TrainerCallback:
        """The callback that writes `RUN_STATE_FILE` into every checkpoint (pass it last)."""
        return _RunStateCallback(self)

    def finish(self) -> None:
        """Remove the checkpoints once the output is saved."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _same(a: Any, b: Any) -> bool:
    """Equality of nested dicts / lists whose leaves may be tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in old.keys() | new.keys():
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


class _RunStateCallback(TrainerCallback):
    def __init__(self, checkpointing: Checkpointing) -> None:
        self.checkpointing = checkpointing

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        payload = {"settings": self.checkpointing.settings, "state": self.checkpointing.state}
        _save_atomic(payload, folder / RUN_STATE_FILE)
        logger.info("checkpoint %s saved (resume with --resume latest)", folder)


def _save_atomic(payload: Any, path: Path) -> None:
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    torch.save(payload, staging)
    os.replace(staging, path)


@dataclass
class PrunerCheckpoint:
    """Saves a pruning callback's state as `file_name` in each checkpoint and finds it again on resume.

    `resume_from` is the checkpoint folder when it is not `<output_dir>/checkpoint-<step>`.
    """

    file_name: str
    name: str
    resume_from: str | os.PathLike | None = None

    def save(self, args: TrainingArguments, state: TrainerState, state_dict: Callable[[], dict[str, Any]]) -> None:
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            torch.save(state_dict(), folder / self.file_name)

    def load(self, args: TrainingArguments, state: TrainerState) -> dict[str, Any]:
        folder = Path(self.resume_from or Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = folder / self.file_name
        if not path.is_file():
            raise LoraPruneError(
                f"resuming at step {state.global_step} but {path} does not exist; pass "
                f"{self.name}(..., resume_from=<the checkpoint folder>)"
            )
        saved = torch.load(path, weights_only=True)
        if saved.get("step") != state.global_step:
            raise LoraPruneError(
                f"{path} holds {self.name}'s state at step {saved.get('step')}, the Trainer resumes "
                f"at step {state.global_step}"
            )
        logger.info("%s resumed at step %d from %s", self.name, state.global_step, path)
        return saved
