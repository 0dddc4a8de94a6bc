"""A LoRAPrune run interrupted after a checkpoint and resumed ends exactly like an uninterrupted one."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import Trainer, TrainerCallback

from loraprune.errors import LoraPruneError
from loraprune.model_pruning import STATE_FILE, LoRAPruneCallback, LoRAPruneConfig, PruningTarget
from loraprune.training import training_arguments
from model_pruning_helpers import COLLATOR, lora_model, token_dataset, training

STEPS, SAVE_EVERY, CRASH_AT = 12, 5, 7
TARGET = PruningTarget(sparsity=0.4)
CONFIG = LoRAPruneConfig(prune_every=2, warmup=0.1, cooldown=0.1)


class Crash(TrainerCallback):
    """Stops training after step `CRASH_AT`, past the last checkpoint (the work since then is lost)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == CRASH_AT:
            control.should_training_stop = True
            control.should_save = False


def _trainer(output_dir, callbacks):
    args = training_arguments(training(STEPS), str(output_dir))
    args = dataclasses.replace(args, save_strategy="steps", save_steps=SAVE_EVERY)
    model = lora_model()
    return model, Trainer(
        model=model, args=args, data_collator=COLLATOR, train_dataset=token_dataset(), callbacks=callbacks
    )


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters() if "lora_" in name}


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory):
    """The output directory of a run that crashed at step `CRASH_AT`, after its checkpoint at `SAVE_EVERY`."""
    output = tmp_path_factory.mktemp("crashed")
    first = LoRAPruneCallback(TARGET, CONFIG)
    _, trainer = _trainer(output, [first, Crash()])
    trainer.train()
    assert (output / f"checkpoint-{SAVE_EVERY}" / STATE_FILE).is_file()
    assert first.pruner.step == CRASH_AT  # pruning went on past the checkpoint before the crash
    assert first.pruner.history[-1]["step"] > SAVE_EVERY
    return output


def test_resumed_run_matches_uninterrupted_run(tmp_path, crashed_run):
    full = LoRAPruneCallback(TARGET, CONFIG)
    model_full, trainer = _trainer(tmp_path / "full", [full])
    trainer.train()

    resumed = LoRAPruneCallback(TARGET, CONFIG)
    model_resumed, trainer = _trainer(crashed_run, [resumed])
    trainer.train(resume_from_checkpoint=str(crashed_run / f"checkpoint-{SAVE_EVERY}"))

    a, b = full.pruner, resumed.pruner
    assert b.step == a.step == STEPS and a.finished and b.finished
    assert [e["step"] for e in b.history] == [e["step"] for e in a.history]
    for key in a.masks:
        assert torch.equal(a.masks[key], b.masks[key]), key
    for key in a.scores:
        torch.testing.assert_close(b.scores[key], a.scores[key], rtol=1e-5, atol=1e-7)
    full_state, resumed_state = _lora_state(model_full), _lora_state(model_resumed)
    for name, value in full_state.items():
        torch.testing.assert_close(resumed_state[name], value, rtol=1e-5, atol=1e-6)


def test_resume_refuses_other_settings(tmp_path, crashed_run):
    checkpoint = crashed_run / f"checkpoint-{SAVE_EVERY}"
    _, trainer = _trainer(tmp_path, [LoRAPruneCallback(TARGET, CONFIG)])
    with pytest.raises(LoraPruneError, match=r"pass LoRAPruneCallback\(\.\.\., resume_from="):
        trainer.train(resume_from_checkpoint=str(checkpoint))  # the state is looked for in tmp_path
    other = LoRAPruneCallback(dataclasses.replace(TARGET, sparsity=0.2), CONFIG, resume_from=checkpoint)
    _, trainer = _trainer(tmp_path, [other])
    with pytest.raises(LoraPruneError, match="resume with the settings of the interrupted run"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
