"""Never save a broken result: NaN runs, divergence, too little scoring evidence, PrunedLoRA's magnitude fallback."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import TrainerState

from loraprune.cli import main
from loraprune.safety.divergence import DivergenceError, LossGuard, nonfinite_loss_step
from loraprune.safety.finite import NonFiniteError, require_finite
from loraprune.training import TrainingConfig, train
from model_pruning_helpers import COLLATOR, lora_model, token_dataset


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. Question: how many apples are there? " * 40)
    return path


def prune_model_cli(model_dir: Path, text: Path, output: Path, *extra: str) -> int:
    return main(
        [
            "prune-model",
            "--model",
            str(model_dir),
            "--data",
            str(text),
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--steps",
            "8",
            "--prune-every",
            "2",
            "--sparsity",
            "0.25",
            "--output",
            str(output),
            *extra,
        ]
    )


def assert_nothing_written(directory: Path, *inputs: str) -> None:
    """Only the inputs are left in `directory`: no output, staging, checkpoints or lock."""
    assert sorted(p.name for p in directory.iterdir()) == sorted(inputs)


def error_lines(text: str) -> list[str]:
    """The `loraprune CMD: error: ...` lines of `text` (a progress bar may share their line: cut it off)."""
    lines = [line.split("\r")[-1] for line in text.splitlines()]
    return [line[line.index("loraprune ") :] for line in lines if ": error: " in line and "loraprune " in line]


def one_line_error(capsys) -> str:
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("method", ["loraprune", "taylor"])
def test_a_diverging_run_stops_with_advice_and_writes_nothing(method, tiny_model_dir, text_file, tmp_path, capsys):
    code = prune_model_cli(tiny_model_dir, text_file, tmp_path / "out", "--method", method, "--learning-rate", "1e30")
    assert code == 2
    line = one_line_error(capsys)
    assert "the training loss is nan at step 2: the run diverged; lower --learning-rate" in line, line
    assert_nothing_written(tmp_path, "tiny-llama", "text.txt")


def test_without_the_guard_non_finite_weights_are_refused_naming_tensor_and_step(
    tiny_model_dir, text_file, tmp_path, capsys
):
    args = ("--method", "taylor", "--learning-rate", "1e30", "--divergence-factor", "0")
    assert prune_model_cli(tiny_model_dir, text_file, tmp_path / "out", *args) == 2
    line = one_line_error(capsys)
    assert "not saving the pruned model: tensor model." in line and "holds NaN/Inf" in line, line
    assert "the training loss first went non-finite at step 2" in line, line
    assert_nothing_written(tmp_path, "tiny-llama", "text.txt")


def test_loraprune_without_enough_finite_scores_fails_instead_of_reaching_its_target(
    tiny_model_dir, text_file, tmp_path, capsys, caplog
):
    args = ("--method", "loraprune", "--learning-rate", "1e30", "--divergence-factor", "0")
    assert prune_model_cli(tiny_model_dir, text_file, tmp_path / "out", *args) == 2
    assert "fewer than the 2 a pruning event needs (--min-scoring-steps); pruning postponed" in caplog.text
    line = one_line_error(capsys)
    assert "LoRAPrune did not reach its pruning target: only 1 of 8 steps gave finite scores" in line, line
    assert "non-finite at step 2" in line
    assert_nothing_written(tmp_path, "tiny-llama", "text.txt")


def test_non_finite_losses_are_logged_as_nan_not_zero(one_thread):
    config = TrainingConfig(steps=4, learning_rate=1e30, batch_size=2, logging_steps=1, divergence_factor=0)
    history = train(lora_model(), token_dataset(), COLLATOR, config)
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 4 and math.isfinite(losses[0])
    assert all(math.isnan(loss) for loss in losses[1:]), losses
    assert nonfinite_loss_step(history) == 2


class _LossModel(nn.Module):
    """Returns the next loss of a list, like a causal LM's output."""

    def __init__(self, losses: list[float]) -> None:
        super().__init__()
        self.losses = iter(losses)

    def forward(self) -> SimpleNamespace:
        return SimpleNamespace(loss=torch.tensor(next(self.losses)))


def _guarded_steps(factor: float, losses: list[float]) -> LossGuard:
    guard, model, state = LossGuard(factor), _LossModel(losses), TrainerState()
    guard.on_train_begin(SimpleNamespace(), state, None, model=model.train())
    for step in range(1, len(losses) + 1):
        model()
        state.global_step = step
        guard.on_step_end(SimpleNamespace(learning_rate=1.0), state, None)
    return guard


def test_the_divergence_guard_compares_with_the_starting_loss():
    assert _guarded_steps(2.5, [4.0, 6.0, 9.9]).start_loss == 4.0  # below 2.5 x 4
    with pytest.raises(
        DivergenceError, match=r"rose to 10.1 at step 3, above 2.5 x its starting value 4: .*--divergence-factor 0"
    ):
        _guarded_steps(2.5, [4.0, 6.0, 10.1])
    assert _guarded_steps(0, [4.0, 100.0, float("nan")]).first_nonfinite_step == 3  # off: only recorded


def test_require_finite_names_the_first_bad_tensor():
    tensors = [("a", torch.ones(2)), ("b", torch.tensor([1.0, float("inf")])), ("c", torch.tensor([float("nan")]))]
    with pytest.raises(
        NonFiniteError, match="tensor b holds NaN/Inf; the training loss first went non-finite at step 7"
    ):
        require_finite(tensors, "the model", 7)
    require_finite(tensors[:1], "the model", None)


def prune_adapter_cli(model_dir: Path, data_dir: Path, output: Path, *extra: str) -> int:
    return main(
        [
            "prune-adapter",
            "--model",
            str(model_dir),
            "--data",
            str(data_dir / "gsm8k" / "train.jsonl"),
            "--train-limit",
            "8",
            "--max-answer-tokens",
            "24",
            "--r0",
            "8",
            "--rank",
            "2",
            "--steps",
            "6",
            "--batch-size",
            "2",
            "--prune-every",
            "2",
            "--output",
            str(output),
            *extra,
        ]
    )


def test_prunedlora_refuses_the_magnitude_fallback_and_non_finite_factors(tiny_model_dir, data_dir, tmp_path, capsys):
    # the default criterion reads no gradient: it meets the diverged factors at the first event
    diverging = ("--learning-rate", "1e30", "--divergence-factor", "0")
    assert prune_adapter_cli(tiny_model_dir, data_dir, tmp_path / "out", *diverging) == 2
    line = one_line_error(capsys)
    assert "non-finite LoRA factors" in line and "lower --learning-rate" in line, line
    assert_nothing_written(tmp_path, "tiny-llama")
    diverging = (*diverging, "--preset", "paper")  # obs: the gradient evidence is checked first
    assert prune_adapter_cli(tiny_model_dir, data_dir, tmp_path / "out", *diverging) == 2
    line = one_line_error(capsys)
    assert "no step since the last pruning event gave finite gradients" in line, line
    assert "--allow-magnitude-fallback" in line
    # asked for, the fallback prunes; the export then refuses the non-finite factors
    assert prune_adapter_cli(tiny_model_dir, data_dir, tmp_path / "out", *diverging, "--allow-magnitude-fallback") == 2
    line = one_line_error(capsys)
    assert "not saving the adapter: tensor base_model.model." in line and "holds NaN/Inf" in line, line
    assert "the training loss first went non-finite at step" in line
    assert_nothing_written(tmp_path, "tiny-llama")
