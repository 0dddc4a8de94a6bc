"""LoRAPrune N:M and PrunedLoRA carry their whole state in Trainer checkpoints and resume exactly; a
resumed run refuses other decisions than the interrupted one's."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import Trainer, TrainerCallback

from loraprune.errors import LoraPruneError
from loraprune.model_pruning import LoRAPruneConfig
from loraprune.rank_pruning.callback import RankPruningCallback
from loraprune.rank_pruning.config import RankPruningConfig
from loraprune.safety.checkpoints import Checkpointing
from loraprune.semi_structured.callback import STATE_FILE, NMPruneCallback
from loraprune.semi_structured.pattern import NMPattern
from loraprune.training import training_arguments
from model_pruning_helpers import COLLATOR, lora_model, token_dataset, training

STEPS, SAVE_EVERY, CRASH_AT = 12, 5, 8


class Crash(TrainerCallback):
    """Stops training after step `CRASH_AT`, past the last checkpoint (the work since then is lost)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == CRASH_AT:
            control.should_training_stop = True
            control.should_save = False


def _run(output_dir, callback, r: int = 4, crash: bool = False, resume: bool = False):
    args = dataclasses.replace(
        training_arguments(training(STEPS), str(output_dir)), save_strategy="steps", save_steps=SAVE_EVERY
    )
    model = lora_model(r=r)
    callbacks = [callback, Crash()] if crash else [callback]
    trainer = Trainer(
        model=model, args=args, data_collator=COLLATOR, train_dataset=token_dataset(), callbacks=callbacks
    )
    trainer.train(resume_from_checkpoint=str(output_dir / f"checkpoint-{SAVE_EVERY}") if resume else None)
    return model


def _lora(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def _assert_same_lora(a, b) -> None:
    for name, value in _lora(a).items():
        torch.testing.assert_close(_lora(b)[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_nm_pruning_resumes_to_the_uninterrupted_masks(tmp_path, one_thread):
    config = LoRAPruneConfig(prune_every=2, warmup=0.1, cooldown=0.1)
    full = NMPruneCallback(NMPattern(2, 4), config)
    model_full = _run(tmp_path / "full", full)
    _run(tmp_path / "crashed", NMPruneCallback(NMPattern(2, 4), config), crash=True)
    assert (tmp_path / "crashed" / f"checkpoint-{SAVE_EVERY}" / STATE_FILE).is_file()
    resumed = NMPruneCallback(NMPattern(2, 4), config)
    model_resumed = _run(tmp_path / "crashed", resumed, resume=True)
    a, b = full.pruner, resumed.pruner
    assert a.finished and b.finished and b.step == STEPS
    assert [e["step"] for e in b.history] == [e["step"] for e in a.history]
    assert all(torch.equal(a.masks[name], b.masks[name]) for name in a.masks)
    _assert_same_lora(model_full, model_resumed)


def test_rank_pruning_resumes_to_the_uninterrupted_ranks(tmp_path, one_thread):
    config = RankPruningConfig(r0=4, rank=1, alpha=8, prune_every=2, per_event=1, schedule="global")
    full = RankPruningCallback(config)
    model_full = _run(tmp_path / "full", full)
    _run(tmp_path / "crashed", RankPruningCallback(config), crash=True)
    resumed = RankPruningCallback(config)
    model_resumed = _run(tmp_path / "crashed", resumed, resume=True)
    assert full.pruner.ranks() == resumed.pruner.ranks() and resumed.pruner.finished
    assert [e.removed for e in full.pruner.history] == [e.removed for e in resumed.pruner.history]
    _assert_same_lora(model_full, model_resumed)
    other = RankPruningCallback(dataclasses.replace(config, damping=0.5))
    with pytest.raises(LoraPruneError, match="resume with the settings of the interrupted run"):
        _run(tmp_path / "crashed", other, resume=True)


def test_a_resumed_run_must_decide_what_the_interrupted_one_decided(tmp_path):
    checkpointing = Checkpointing(tmp_path, 4, {"run": {}}, resume_from=tmp_path / "checkpoint-4")
    checkpointing.resumed_state = {"one_shot_masks": {"layers.0.mlp": torch.tensor([True, False])}}
    checkpointing.record("one_shot_masks", {"layers.0.mlp": torch.tensor([True, False])})
    with pytest.raises(LoraPruneError, match="one shot masks differ from the interrupted run's"):
        checkpointing.record("one_shot_masks", {"layers.0.mlp": torch.tensor([False, True])})
