"""`--config RUN.yaml`: every command reads its options from a file, flags override it, typos are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraprune.cli import build_parser, main
from loraprune.config import PruneModelConfig, dataclass_from_args, parse_args_with_config
from loraprune.errors import ConfigError
from loraprune.rank_pruning.config import RankPruningConfig
from loraprune.training import TrainingConfig


def _write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_file_values_are_used_and_flags_override_them(tiny_model_dir, tmp_path, one_thread):
    config = _write(
        tmp_path,
        f"model: {tiny_model_dir}\nmethod: random\nsparsity: 0.5\nattention-unit: query_head\nseed: 3\n"
        "layers: '1'\ndevice: cpu\n",
    )
    out = tmp_path / "pruned"
    assert main(["prune-model", "--config", str(config), "--output", str(out), "--sparsity", "0.25"]) == 0
    settings = json.loads((out / "loraprune_report.json").read_text())["settings"]
    assert settings["sparsity"] == 0.25  # the flag wins
    assert (settings["method"], settings["attention_unit"], settings["seed"], settings["layers"]) == (
        "random",
        "query_head",
        3,
        "1",
    )
    assert settings["model"] == str(tiny_model_dir) and settings["device"] == "cpu"


def test_keys_take_dashes_underscores_and_flag_aliases(tmp_path):
    config = _write(
        tmp_path, "data: notes.txt\nlearning_rate: 1\nlora-rank: 4\nmerge_adapter: false\noutput: o\neval-data: null\n"
    )
    args = parse_args_with_config(build_parser(), ["prune-model", "--config", str(config)])
    config = dataclass_from_args(PruneModelConfig, args)
    assert config.calibration_data == "notes.txt" and config.learning_rate == 1.0 and config.lora_rank == 4
    assert isinstance(config.learning_rate, float) and config.merge_adapter is False and config.eval_data is None


def test_one_file_sets_the_options_of_every_group_of_prune_adapter(tmp_path):
    config = _write(tmp_path, "r0: 16\nrank: 4\nsteps: 7\nbf16: true\nmethod: lora\ntarget-modules: [q_proj, v_proj]\n")
    args = parse_args_with_config(build_parser(), ["prune-adapter", "--config", str(config), "--steps", "9"])
    pruning, training = dataclass_from_args(RankPruningConfig, args), dataclass_from_args(TrainingConfig, args)
    assert (pruning.r0, pruning.rank, training.steps, training.bf16, args.method) == (16, 4, 9, True, "lora")
    assert list(pruning.target_modules) == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("command", "text", "message"),
    [
        ("prune-model", "sparsty: 0.3\n", r"unknown key 'sparsty' \(did you mean 'sparsity'\?\)"),
        ("eval", "seq-lenn: 64\n", r"unknown key 'seq-lenn' \(did you mean 'seq_len'\?\)"),
        ("prune-adapter", "learning_rte: 0.1\n", r"unknown key 'learning_rte' \(did you mean 'learning_rate'\?\)"),
        ("inspect", "attention_units: head\n", r"did you mean 'attention_unit'"),
        ("prune-model", "steps: many\n", "steps must be int, got 'many'"),
        ("prune-model", "sparsity: [0.1, 0.2]\n", "sparsity takes one value"),
        ("prune-model", "allocation: local\n", "allocation must be one of global, uniform"),
        ("prune-model", "overwrite: 1\n", "overwrite must be true or false"),
        ("prune-model", "sparsity:\n", r"sparsity needs a value \(its default is 0.2\)"),
        ("prune-model", "- sparsity\n", "must be a mapping"),
        ("prune-model", "sparsity: [0.1\n", "is not valid YAML"),
    ],
)
def test_bad_files_are_one_line_errors(command, text, message, tmp_path, capsys):
    config = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message):
        parse_args_with_config(build_parser(), [command, "--config", str(config)])
    assert main([command, "--config", str(config)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"loraprune {command}: error: ") and "\n" not in error


def test_a_missing_file_is_named(tmp_path, capsys):
    assert main(["eval", "--config", str(tmp_path / "nope.yaml")]) == 2
    error = capsys.readouterr().err
    assert "config file" in error and "nope.yaml not found" in error


def test_every_command_takes_a_config_file():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) >= {"inspect", "eval", "prune-model", "prune-nm", "prune-adapter", "report", "sweep"}
    for name, command in commands.items():
        assert any("--config" in action.option_strings for action in command._actions), name
