"""One error boundary: every input problem a user can make is one `loraprune CMD: error: ...` line and exit 2."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch

from loraprune.cli import main
from loraprune.devices import resolve_device
from loraprune.errors import ConfigError

BAD_BYTES = b"caf\xe9 au lait\n" * 20  # Latin-1, not UTF-8


def one_line(capsys, command: str) -> str:
    err = [line.split("\r")[-1] for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(err) == 1, err
    assert err[0].startswith(f"loraprune {command}: error: "), err
    return err[0]


@pytest.fixture
def latin1(tmp_path: Path) -> Path:
    path = tmp_path / "latin1.txt"
    path.write_bytes(BAD_BYTES)
    return path


@pytest.mark.parametrize(
    "command",
    [
        ["prune-model", "--method", "magnitude", "--steps", "1"],
        ["prune-nm", "--method", "magnitude", "--steps", "1"],
        ["eval"],
    ],
)
def test_a_non_utf8_text_file_is_named(command, latin1, tiny_model_dir, tmp_path, capsys):
    output = [] if command[0] == "eval" else ["--output", str(tmp_path / "out")]
    assert main([*command, "--model", str(tiny_model_dir), "--data", str(latin1), *output]) == 2
    line = one_line(capsys, command[0])
    assert f"data file {latin1} is not UTF-8 text (byte b'\\xe9' at offset 3)" in line, line


def test_a_non_utf8_sft_file_and_sweep_spec_are_named(latin1, tiny_model_dir, tmp_path, capsys):
    args = ["prune-adapter", "--model", str(tiny_model_dir), "--data", str(latin1), "--output", str(tmp_path / "a")]
    assert main(args) == 2
    assert f"SFT data file {latin1} is not UTF-8 text" in one_line(capsys, "prune-adapter")
    assert main(["sweep", str(latin1)]) == 2
    assert f"sweep spec {latin1} is not UTF-8 text" in one_line(capsys, "sweep")


def test_a_directory_as_data_and_an_unreadable_file(tiny_model_dir, tmp_path, capsys):
    # a directory is read as a local dataset (issue 14); one that holds none is one line naming it
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path)]) == 2
    assert f"could not read dataset '{tmp_path}'" in one_line(capsys, "eval")
    if os.geteuid() == 0:
        unreadable = Path("/proc/self/mem")  # exists, and reading it as text fails even for root
    else:
        unreadable = tmp_path / "secret.txt"
        unreadable.write_text("text")
        unreadable.chmod(0)
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(unreadable)]) == 2
    assert f"cannot read data file {unreadable}: " in one_line(capsys, "eval")


def test_an_invalid_config_value(tiny_model_dir, capsys):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["hidden_size"] = "sixty-four"
    (tiny_model_dir / "config.json").write_text(json.dumps(config))
    assert main(["eval", "--model", str(tiny_model_dir), "--data", "wikitext2"]) == 2
    line = one_line(capsys, "eval")
    assert "the model's config.json has an invalid value" in line and "hidden_size" in line, line


def test_empty_sft_data_and_unknown_target_modules(tiny_model_dir, data_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    base = ["prune-adapter", "--model", str(tiny_model_dir), "--output", str(tmp_path / "a"), "--steps", "2"]
    assert main([*base, "--data", str(empty)]) == 2
    assert f"SFT data '{empty}' has no records to train on" in one_line(capsys, "prune-adapter")
    data = str(data_dir / "gsm8k" / "train.jsonl")
    assert main([*base, "--data", data, "--train-limit", "4", "--target-modules", "qq_proj"]) == 2
    line = one_line(capsys, "prune-adapter")
    assert "no module of the model matches --target-modules" in line and "qq_proj" in line, line
    assert not (tmp_path / "a").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_devices_that_do_not_exist(tiny_model_dir, capsys):
    for device, message in (("cuda", "--device cuda: no CUDA device"), ("banana", "unknown device 'banana'; use")):
        assert main(["eval", "--model", str(tiny_model_dir), "--device", device]) == 2
        assert message in one_line(capsys, "eval")
    assert resolve_device("cpu") == "cpu" and resolve_device("auto") == "cpu"
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("cuda:x")


def test_bugs_keep_their_traceback_and_debug_shows_user_errors_too(monkeypatch, tiny_model_dir, tmp_path, capsys):
    import loraprune.cli.report_cmd as report_cmd

    def broken(args: argparse.Namespace) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(report_cmd, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["report", str(tmp_path)])
    assert main(["--debug", "eval", "--model", str(tiny_model_dir), "--device", "banana"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "loraprune eval: error: unknown device" in err
