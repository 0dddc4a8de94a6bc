"""Self-distillation: the KL term, and a teacher that is exactly the unpruned model in every method."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from loraprune.distillation import Distillation
from loraprune.errors import LoraPruneError
from loraprune.model_pruning import LoRAPruneCallback, LoRAPruneConfig, PruningTarget
from loraprune.model_pruning.run import LoraSettings, recover, train_lora
from loraprune.selection import plan_budget, select
from loraprune.structure import full_masks, get_adapter
from loraprune.training import train
from model_pruning_helpers import COLLATOR, lora_model, token_dataset, training
from tiny_models import tiny_model


def test_kl_term_is_zero_for_the_teacher_itself_and_matches_the_definition():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, 3] = -100  # a position without a label is not scored
    term = Distillation(0.5, 2.0, contextlib.nullcontext)
    assert float(term.loss(teacher, teacher, labels)) == pytest.approx(0.0, abs=1e-7)
    scored = labels[:, 1:] != -100
    s = F.log_softmax(student[:, :-1][scored] / 2.0, -1)
    t = F.log_softmax(teacher[:, :-1][scored] / 2.0, -1)
    want = 0.5 * 4.0 * (t.exp() * (t - s)).sum(-1).mean()
    torch.testing.assert_close(term.loss(student, teacher, labels), want)
    # the Trainer's normalisation over accumulated micro-batches: a sum divided by its count
    torch.testing.assert_close(term.loss(student, teacher, labels, num_items_in_batch=20), want * scored.sum() / 20)


class _RecordingTeacher:
    """Wraps `Distillation.teacher_logits` to keep every call's inputs and logits."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        original = Distillation.teacher_logits

        def record(distillation, model, inputs):
            logits = original(distillation, model, inputs)
            self.calls.append((inputs["input_ids"].clone(), logits.clone()))
            return logits

        monkeypatch.setattr(Distillation, "teacher_logits", record)

    def assert_dense(self, dense: torch.nn.Module) -> None:
        assert self.calls
        with torch.no_grad():
            for ids, logits in self.calls:
                torch.testing.assert_close(logits, dense(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_loraprune_teacher_is_the_unpruned_model_at_every_step(monkeypatch):
    teacher = _RecordingTeacher(monkeypatch)
    model = lora_model()
    dense = copy.deepcopy(model.get_base_model()).eval()
    callback = LoRAPruneCallback(PruningTarget(0.4), LoRAPruneConfig(score="activation", prune_every=2))
    from loraprune.distillation import dense_peft_model

    distillation = Distillation(1.0, 1.0, lambda: dense_peft_model(model, callback.pruner.unmasked))
    train(model, token_dataset(), COLLATOR, training(12), callbacks=[callback], distillation=distillation)
    assert callback.pruner.finished and len(teacher.calls) == 12
    teacher.assert_dense(dense)  # masks and LoRA off, even after the pruning events


def test_one_shot_recovery_with_distillation_trains_masked_then_shrinks(monkeypatch):
    teacher = _RecordingTeacher(monkeypatch)
    model = tiny_model(layers=3)
    dense = copy.deepcopy(model)
    adapter = get_adapter(model)
    families = adapter.families(model, "kv_group")
    budget = plan_budget(families, [0, 1, 2], 0.4)
    scores = {f.key: torch.rand(f.count, generator=torch.Generator().manual_seed(i)) for i, f in enumerate(families)}
    masks = select(families, scores, full_masks(families), budget, prunable_layers=[0, 1, 2])
    settings = LoraSettings(steps=6, rank=4, learning_rate=1e-2, batch_size=4, distill_weight=1.0)
    run = recover(model, families, masks, token_dataset(), settings)
    teacher.assert_dense(dense)
    widths = [(layer.mlp.down_proj.in_features, layer.self_attn.o_proj.in_features) for layer in model.model.layers]
    kept = [(int(masks[f"layers.{i}.mlp"].sum()), int(masks[f"layers.{i}.attention"].sum()) * 2 * 8) for i in range(3)]
    assert widths == kept and run.summary["distill_weight"] == 1.0


def test_distillation_needs_a_masked_model():
    settings = LoraSettings(steps=2, rank=4, distill_weight=1.0)
    with pytest.raises(LoraPruneError, match="masked"):
        train_lora(tiny_model(), token_dataset(count=8), settings)
