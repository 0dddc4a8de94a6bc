"""Temporary directories beside the output that carry their owner's PID, and removal of the dead ones.

A run stages its output (and its Trainer scratch, its separate adapter) in hidden directories
next to the output, so that the final rename never crosses file systems. Their names are
`.<name>.<kind>-<pid>-<random>`; a later run on the same output removes those whose process is
gone (a SIGKILL leaves them behind, nothing else does).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

#: what the temporary directories beside an output hold (`.<name>.<kind>-<pid>-...`)
KINDS = ("partial", "old", "train", "adapter")


def process_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine (zombies count as alive until reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def owned_temp_dir(parent: Path, prefix: str) -> Path:
    """Create a private directory `parent/<prefix><pid>-<random>` (parents included) and return it."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


def temp_prefix(target: Path, kind: str) -> str:
    """The name prefix (before the PID) of `kind` temporary directories beside `target`."""
    return f".{target.name}.{kind}-"


def remove_dead_temp_dirs(parent: Path, prefix: str) -> list[Path]:
    """Remove the directories `parent/<prefix><pid>-*` whose process is dead; returns what was removed."""
    if not parent.is_dir():
        return []
    pattern = re.compile(re.escape(prefix) + r"(\d+)-")
    removed = []
    for path in sorted(parent.iterdir()):
        match = pattern.match(path.name)
        if match is None or not path.is_dir() or process_alive(int(match.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        logger.warning("removed %s, left behind by a killed run (PID %s)", path, match.group(1))
        removed.append(path)
    return removed


def clean_beside(target: Path) -> None:
    """Remove what killed runs left beside the output `target`; an output retired by a run killed
    in the middle of replacing it is restored instead when `target` itself is missing."""
    parent = target.parent
    old = temp_prefix(target, "old")
    if not target.exists() and parent.is_dir():
        pattern = re.compile(re.escape(old) + r"(\d+)-")
        for path in sorted(parent.iterdir()):
            match = pattern.match(path.name)
            if match and not process_alive(int(match.group(1))) and (path / target.name).is_dir():
                os.rename(path / target.name, target)
                logger.warning("restored %s, which a killed run was replacing", target)
                break
    for kind in KINDS:
        remove_dead_temp_dirs(parent, temp_prefix(target, kind))
