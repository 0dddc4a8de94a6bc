"""Claim an output at start-up: prove it can be written, and make this run its only writer.

`probe_directory` creates (and removes) a real file in the directory that will receive the
output, so a read-only location or a parent that is a file fails before any training.
`OutputLock` holds `.<name>.lock` beside the output for the whole run: a second run on the same
output fails at once, naming the holder's PID and host; a lock whose process is gone (same host)
is taken over with a warning. `claim_output` does both and removes what killed runs left beside
the output.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from loraprune.errors import LoraPruneError
from loraprune.safety.staging import clean_beside, process_alive

logger = logging.getLogger(__name__)


class OutputNotWritableError(LoraPruneError):
    """The output cannot be created where it was asked for."""


class OutputLockedError(LoraPruneError):
    """Another live run is writing the same output."""


def probe_directory(directory: Path, what: str) -> None:
    """Create `directory` if needed and write and remove a probe file in it; a one-line error otherwise."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".loraprune-probe-{os.getpid()}"
        with open(probe, "x") as handle:
            handle.write("probe\n")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise OutputNotWritableError(
            f"cannot write {what}: {directory} is not a writable directory ({reason}); choose another location"
        ) from error


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


class OutputLock:
    """An exclusive, advisory lock on the output `target`: the file `.<name>.lock` beside it."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.path = lock_path(target)
        self.held = False

    def acquire(self) -> None:
        host, pid = socket.gethostname(), os.getpid()
        record = {"pid": pid, "host": host, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        staging = self.path.with_name(f"{self.path.name}.{pid}")
        staging.write_text(json.dumps(record) + "\n")
        try:
            for _ in range(3):
                try:
                    os.link(staging, self.path)  # atomic, and the lock is complete when it appears
                except FileExistsError:
                    self._handle_existing(host)
                    continue
                self.held = True
                return
            raise OutputLockedError(f"could not take the lock {self.path}; another run keeps taking it")
        finally:
            staging.unlink(missing_ok=True)

    def _handle_existing(self, host: str) -> None:
        try:
            holder = json.loads(self.path.read_text())
            other_pid, other_host = int(holder["pid"]), str(holder["host"])
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError, KeyError, TypeError):
            holder, other_pid, other_host = {}, -1, host  # unreadable: written by a run killed at that moment
        if other_host != host:
            raise OutputLockedError(
                f"{self.target} is being written by PID {other_pid} on host {other_host} (since "
                f"{holder.get('since', '?')}); wait for it, choose another --output, or delete {self.path} if "
                "that run is gone"
            )
        if process_alive(other_pid):
            raise OutputLockedError(
                f"{self.target} is being written by PID {other_pid} on host {other_host} (since "
                f"{holder.get('since', '?')}); wait for it or choose another --output"
            )
        logger.warning(
            "taking over the lock %s of PID %s on %s, which is no longer running", self.path, other_pid, other_host
        )
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)


@contextmanager
def claim_output(target: str | os.PathLike, what: str = "the output") -> Iterator[Path]:
    """Probe the output's parent, lock the output for this run, and remove the debris of killed runs."""
    path = Path(target).expanduser().absolute()
    probe_directory(path.parent, what)
    lock = OutputLock(path)
    lock.acquire()
    try:
        clean_beside(path)
        yield path
    finally:
        lock.release()


def claim_run_output(target: str | os.PathLike | None, what: str = "the output") -> AbstractContextManager:
    """`claim_output(target)` on the process that writes (rank 0 under torchrun / accelerate launch); a
    no-op on the others and without a `target` (the run then fails with its own message)."""
    from loraprune.distributed import is_main_process

    if target is None or not str(target) or not is_main_process():
        return nullcontext()
    return claim_output(target, what)
