"""Run `loraprune` in this process, stalling at a chosen point so that a test can kill or signal it there.

    STALL_AT=checkpoint:8 STALL_MARKER=/tmp/m python tests/stalling_cli.py prune-model ...

`checkpoint:N`: after the checkpoint of step N is complete; `save`: inside the atomic save, once the
model is in its staging directory. The marker file is written (with this PID) when the stall begins.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def stall() -> None:
    Path(os.environ["STALL_MARKER"]).write_text(str(os.getpid()))
    time.sleep(600)


def install(where: str) -> None:
    if where.startswith("checkpoint:"):
        import transformers

        import loraprune.training as training

        step = int(where.split(":")[1])

        class Stall(transformers.TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.global_step == step:
                    stall()

        class StallingTrainer(transformers.Trainer):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.add_callback(Stall())  # last: after the run state that completes a checkpoint

        training.Trainer = StallingTrainer
    elif where == "save":
        import loraprune.model_pruning.entry as entry

        entry.write_run_report = lambda staging: stall()
    else:
        raise SystemExit(f"unknown STALL_AT {where!r}")


if __name__ == "__main__":
    install(os.environ["STALL_AT"])
    from loraprune.cli import main

    sys.exit(main(sys.argv[1:]))
