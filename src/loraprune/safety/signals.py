"""SIGTERM (what schedulers and `kill` send) handled like Ctrl-C: unwind, clean up, exit 143."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

#: exit status of a run stopped by SIGTERM (128 + 15), as a shell reports it
SIGTERM_EXIT = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM.

    A subclass of `KeyboardInterrupt`, so every cleanup that runs on Ctrl-C (atomic writes,
    temporary directories, locks, a sweep's tables) runs on SIGTERM too.
    """


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` instead of killing the process outright."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
