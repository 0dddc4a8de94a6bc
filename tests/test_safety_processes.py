"""Real CLI processes killed, terminated and competing: no debris stays, no run is lost, one writer per output.

Each run is a `loraprune` process on the tiny Llama (`stalling_cli.py` holds it at a chosen point, so
the signal arrives where the test means it to).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraprune.cli import main

TESTS = Path(__file__).resolve().parent
STEPS, SAVE_STEPS, KILL_AFTER = 12, 4, 8


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. Question: how many apples are there? " * 40)
    return path


def prune_model_args(model_dir: Path, text: Path, output: Path, *extra: str) -> list[str]:
    return [
        "prune-model",
        "--model",
        str(model_dir),
        "--method",
        "loraprune",
        "--data",
        str(text),
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--steps",
        str(STEPS),
        "--prune-every",
        "2",
        "--sparsity",
        "0.25",
        "--output",
        str(output),
        *extra,
    ]


class Stalled:
    """A `loraprune` process held at `stall_at` (see stalling_cli.py) until the test signals it."""

    def __init__(self, args: list[str], stall_at: str, marker: Path) -> None:
        self.tmpdir = marker.parent / "tmpdir"  # the process' $TMPDIR: nothing of ours may go there
        self.tmpdir.mkdir(exist_ok=True)
        env = {
            **os.environ,
            "STALL_AT": stall_at,
            "STALL_MARKER": str(marker),
            "OMP_NUM_THREADS": "1",
            "TMPDIR": str(self.tmpdir),
        }
        self.process = subprocess.Popen(
            [sys.executable, str(TESTS / "stalling_cli.py"), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 300
        while not marker.exists():
            if self.process.poll() is not None:
                raise AssertionError(f"the run ended before its stall: {self.process.communicate()[1][-3000:]}")
            if time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError("the run did not reach its stall in 300 s")
            time.sleep(0.05)
        self.pid = self.process.pid

    def signal(self, signum: int) -> tuple[int, str]:
        """Send `signum`, wait for the process to end (reaping it), and return its status and stderr."""
        self.process.send_signal(signum)
        _, err = self.process.communicate(timeout=120)
        return self.process.returncode, err


def hidden_debris(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".out"))


def test_sigkill_during_the_save_leaves_debris_that_the_next_run_removes(
    tiny_model_dir, text_file, tmp_path, caplog, one_thread
):
    output = tmp_path / "out"
    run = Stalled(prune_model_args(tiny_model_dir, text_file, output), "save", tmp_path / "marker")
    staged = [p for p in tmp_path.iterdir() if p.name.startswith(f".out.partial-{run.pid}-")]
    assert len(staged) == 1 and (staged[0] / "model.safetensors").is_file()  # a whole model, mid-save
    code, _ = run.signal(signal.SIGKILL)
    assert code == -signal.SIGKILL and not output.exists()
    assert not [p.name for p in run.tmpdir.iterdir() if p.name.startswith("loraprune")]
    debris = hidden_debris(tmp_path)
    assert ".out.lock" in debris and any(name.startswith(f".out.train-{run.pid}-") for name in debris), debris
    assert any(name.startswith(f".out.partial-{run.pid}-") for name in debris)

    assert main(prune_model_args(tiny_model_dir, text_file, output)) == 0  # the same output again
    assert f"taking over the lock {tmp_path / '.out.lock'} of PID {run.pid}" in caplog.text
    assert "left behind by a killed run" in caplog.text
    assert hidden_debris(tmp_path) == [] and (output / "model.safetensors").is_file()
    assert not (tmp_path / "out-checkpoints").exists()


def test_a_second_writer_fails_at_once_and_sigterm_exits_143_keeping_only_the_checkpoints(
    tiny_model_dir, text_file, tmp_path, capsys
):
    output = tmp_path / "out"
    args = prune_model_args(tiny_model_dir, text_file, output, "--save-steps", str(SAVE_STEPS))
    run = Stalled(args, f"checkpoint:{SAVE_STEPS}", tmp_path / "marker")
    try:
        started = time.monotonic()
        assert main(prune_model_args(tiny_model_dir, text_file, output, "--overwrite")) == 2
        assert time.monotonic() - started < 10  # before any loading or training
        err = capsys.readouterr().err
        assert f"is being written by PID {run.pid} on host {socket.gethostname()}" in err, err
    finally:
        code, err = run.signal(signal.SIGTERM)
    assert code == 143, err
    assert "loraprune prune-model: terminated (SIGTERM); temporary files removed, no output was written" in err
    assert hidden_debris(tmp_path) == [] and not output.exists()  # no lock, staging or scratch left
    # the checkpoints are what a terminated run keeps: it can be resumed, with its own settings only
    assert (tmp_path / "out-checkpoints" / f"checkpoint-{SAVE_STEPS}" / "loraprune_run.pt").is_file()
    other = [a if a != "0.25" else "0.5" for a in args]  # another sparsity
    assert main([*other, "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert "that run had other settings (run.sparsity: 0.25 -> 0.5); resume with the settings" in err, err


def test_resume_without_a_checkpoint_is_refused(tiny_model_dir, text_file, tmp_path, capsys):
    assert main([*prune_model_args(tiny_model_dir, text_file, tmp_path / "out"), "--resume", "latest"]) == 2
    assert f"no complete checkpoint in {tmp_path / 'out-checkpoints'}" in capsys.readouterr().err


def saved_model(output: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((output / "loraprune_report.json").read_text()), load_file(output / "model.safetensors")


def test_prune_model_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(
    tiny_model_dir, text_file, tmp_path, one_thread, caplog
):
    late = ("--cooldown", "0.1")  # pruning goes on after the checkpoint (the default schedule ends by mid-run)
    assert main(prune_model_args(tiny_model_dir, text_file, tmp_path / "full", *late)) == 0

    output = tmp_path / "out"
    args = prune_model_args(tiny_model_dir, text_file, output, *late, "--save-steps", str(SAVE_STEPS))
    run = Stalled(args, f"checkpoint:{KILL_AFTER}", tmp_path / "marker")
    code, _ = run.signal(signal.SIGKILL)
    assert code == -signal.SIGKILL and not output.exists()
    caplog.set_level(logging.INFO)
    assert main([*args, "--resume", "latest"]) == 0
    assert f"LoRAPruneCallback resumed at step {KILL_AFTER}" in caplog.text
    assert not (tmp_path / "out-checkpoints").exists()  # the output holds the result now

    (full_report, full_weights), (report, weights) = saved_model(tmp_path / "full"), saved_model(output)
    assert report["masks"] == full_report["masks"]
    events = report["training"]["loraprune"]["events"]
    assert [e["step"] for e in events] == [e["step"] for e in full_report["training"]["loraprune"]["events"]]
    assert any(e["step"] > KILL_AFTER for e in events)  # pruning went on after the resume
    assert weights.keys() == full_weights.keys()
    for name, value in full_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_prune_adapter_killed_after_a_checkpoint_resumes_to_the_same_ranks_and_weights(
    tiny_model_dir, data_dir, tmp_path, one_thread, caplog
):
    def args(output: Path, *extra: str) -> list[str]:
        return [
            "prune-adapter",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(data_dir / "gsm8k" / "train.jsonl"),
            "--train-limit",
            "16",
            "--max-answer-tokens",
            "24",
            "--r0",
            "8",
            "--rank",
            "2",
            "--steps",
            str(STEPS),
            "--batch-size",
            "2",
            "--prune-every",
            "2",
            "--schedule",
            "global",
            "--output",
            str(output),
            *extra,
        ]

    assert main(args(tmp_path / "full")) == 0
    output = tmp_path / "out"
    run = Stalled(args(output, "--save-steps", str(SAVE_STEPS)), f"checkpoint:{KILL_AFTER}", tmp_path / "marker")
    run.signal(signal.SIGKILL)
    caplog.set_level(logging.INFO)
    assert main(args(output, "--save-steps", str(SAVE_STEPS), "--resume", str(tmp_path / "out-checkpoints"))) == 0
    assert f"RankPruningCallback resumed at step {KILL_AFTER}" in caplog.text

    ranks = [json.loads((p / "pruned_ranks.json").read_text())["ranks"] for p in (tmp_path / "full", output)]
    assert ranks[0] == ranks[1]
    full, resumed = (load_file(p / "adapter_model.safetensors") for p in (tmp_path / "full", output))
    assert full.keys() == resumed.keys()
    for name, value in full.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-4, atol=1e-5, msg=name)
