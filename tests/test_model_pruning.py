"""LoRAPrune inside transformers.Trainer and in a custom loop: schedule, exact target, frozen slices, memory."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import TrainerCallback

from loraprune.model_pruning import LoRAPruneCallback, LoRAPruneConfig, ModelPruner, PruningTarget
from loraprune.structure import unwrap_model
from loraprune.training import train
from model_pruning_helpers import COLLATOR, base_weights, lora_model, token_dataset, training


class Inspector(TrainerCallback):
    """Runs after LoRAPruneCallback at every event and checks the invariants of a LoRAPrune run."""

    def __init__(self, pruning: LoRAPruneCallback) -> None:
        self.pruning = pruning
        self.masks: list[dict[str, torch.Tensor]] = []
        self.checks = 0

    def _base_untouched(self, model) -> None:
        for name, param in base_weights(model):
            assert not param.requires_grad, name
            assert param.grad is None, name
        self.checks += 1

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._base_untouched(model)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._base_untouched(model)
        pruner = self.pruning.pruner
        if self.masks:
            for key, mask in pruner.masks.items():
                assert not (mask & ~self.masks[-1][key]).any(), "a pruned unit came back"
        self.masks.append({key: mask.clone() for key, mask in pruner.masks.items()})
        for piece in pruner._pruned_slices:
            assert not piece.param.index_select(piece.dim, piece.index).any()
            for value in optimizer.state[piece.param].values():
                if value.shape == piece.param.shape:
                    assert not value.index_select(piece.dim, piece.index).any()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._base_untouched(model)


def _run(target: PruningTarget, config: LoRAPruneConfig, steps: int = 20, **train_overrides):
    model = lora_model()
    pruning = LoRAPruneCallback(target, config)
    inspector = Inspector(pruning)
    train(model, token_dataset(), COLLATOR, training(steps, **train_overrides), callbacks=[pruning, inspector])
    return model, pruning.pruner, inspector


def test_trainer_run_reaches_exact_target_with_monotone_masks_and_frozen_slices():
    config = LoRAPruneConfig(prune_every=3, warmup=0.1, cooldown=0.2)
    _, pruner, inspector = _run(PruningTarget(sparsity=0.4), config, steps=20, weight_decay=0.1)
    assert inspector.checks == 3 * 20
    assert pruner.finished and pruner.step == 20
    assert pruner.removed_units("attention") == pruner.budget.attention > 0
    assert pruner.removed_units("mlp") == pruner.budget.mlp > 0
    assert abs(pruner.decoder_sparsity() - 0.4) < 0.02
    # events every prune_every steps after the warm-up, the last exactly at the end of the ramp (step 16)
    steps = [event["step"] for event in pruner.history]
    assert steps[-1] == pruner.schedule.ramp_end == 16
    assert all(s % 3 == 0 for s in steps[:-1]) and steps[0] > pruner.schedule.warmup_steps
    removed = [e["attention_units_removed"] + e["mlp_units_removed"] for e in pruner.history]
    assert removed == sorted(removed) and removed[0] > 0
    # no scoring once the target is reached: the cool-down costs nothing extra
    assert pruner.observations == 16


def test_masked_model_equals_shrunk_and_merged_model():
    model, pruner, _ = _run(PruningTarget(sparsity=0.3), LoRAPruneConfig(prune_every=2), steps=12)
    ids = token_dataset(count=2, seed=9)[0]["input_ids"][None]
    model.eval()
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        pruner.finish()
        shrunk = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(shrunk, masked, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged, masked, rtol=1e-4, atol=1e-5)
    sizes = [layer.mlp.up_proj.out_features for layer in unwrap_model(model).model.layers]
    assert sum(sizes) == 3 * 24 - pruner.budget.mlp


def test_layer_range_uniform_allocation_and_separate_kind_targets():
    target = PruningTarget(
        sparsity=0.0,
        attention_sparsity=1 / 3,
        mlp_sparsity=0.25,
        layers="1-2",
        allocation="uniform",
        attention_unit="query_head",
    )
    _, pruner, _ = _run(target, LoRAPruneConfig(prune_every=2, warmup=0.0, cooldown=0.0), steps=10)
    assert pruner.masks["layers.0.attention"].all() and pruner.masks["layers.0.mlp"].all()
    for layer in (1, 2):
        heads = pruner.masks[f"layers.{layer}.attention"]
        assert heads.view(2, 2).sum(1).tolist() == [1, 1]  # one query head left in each KV group
        assert int((~pruner.masks[f"layers.{layer}.mlp"]).sum()) == 9  # 25 % of 72 channels, split over 2 layers
    assert pruner.history[-1]["step"] == 10


def test_schedule_rounds_to_feasible_units_and_ends_exactly():
    model = lora_model()
    target = PruningTarget(sparsity=0.5, allocation="uniform")
    pruner = ModelPruner(model, 40, target, LoRAPruneConfig(prune_every=5))
    budgets = [pruner.target_at(step) for step in range(41)]
    for kind in ("attention", "mlp"):
        amounts = [b.of(kind) for b in budgets]
        assert amounts == sorted(amounts) and amounts[0] == 0
        assert amounts[pruner.schedule.ramp_end] == pruner.budget.of(kind)
        assert all(a % 3 == 0 for a in amounts)  # uniform over 3 layers: multiples of 3
    # one KV group in every layer is the smallest step: rounded to the nearest, it follows the ramp
    attention = [b.attention for b in budgets]
    assert pruner.budget.attention == 3 and attention.index(3) < pruner.schedule.ramp_end - 5


def _custom_loop(model, batches, pruner: ModelPruner, loss_scale: float, accumulation: int = 1):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for batch in batches:
        for micro in batch.chunk(accumulation):
            (model(input_ids=micro, labels=micro).loss * loss_scale / accumulation).backward()
        pruner.observe(loss_scale=loss_scale)
        for param in optimizer.param_groups[0]["params"]:
            param.grad /= loss_scale  # what a GradScaler's unscale_ does
        optimizer.step()
        pruner.after_optimizer_step(optimizer)
        optimizer.zero_grad()


def test_custom_loop_with_loss_scale_and_accumulation_matches_plain_loop():
    batches = torch.stack([item["input_ids"] for item in token_dataset(count=32)]).view(8, 4, -1)
    target, config = PruningTarget(sparsity=0.3), LoRAPruneConfig(prune_every=2, second_order=True)
    runs = []
    for loss_scale, accumulation in ((1.0, 1), (4096.0, 2)):
        model = lora_model()
        pruner = ModelPruner(model, 8, target, config)
        _custom_loop(model, batches, pruner, loss_scale, accumulation)
        runs.append(pruner)
    plain, scaled = runs
    assert plain.finished and scaled.finished
    for key in plain.masks:
        assert torch.equal(plain.masks[key], scaled.masks[key]), key
    for key in plain.scores:
        torch.testing.assert_close(plain.scores[key], scaled.scores[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("score", ["lora-guided", "activation"])
def test_non_finite_update_is_skipped_with_a_warning(caplog, score):
    model = lora_model()
    pruner = ModelPruner(model, 10, PruningTarget(sparsity=0.3), LoRAPruneConfig(score=score))
    ids = token_dataset(count=2)[0]["input_ids"][None]
    model(input_ids=ids, labels=ids).loss.backward()
    assert pruner.observe()
    before = {key: value.clone() for key, value in pruner.scores.items()}
    model(input_ids=ids, labels=ids).loss.backward()
    if score == "lora-guided":
        layer = unwrap_model(model).model.layers[1].mlp.down_proj
        layer.lora_A["default"].weight.grad[0, 0] = float("nan")
    else:
        pruner.activation_scores._squares["layers.1.mlp"][0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="loraprune"):
        assert not pruner.observe()
    assert "non-finite" in caplog.text and "layers.1.mlp" in caplog.text
    assert pruner.skipped_steps == 1 and pruner.observations == 1
    for key, value in before.items():
        assert torch.equal(pruner.scores[key], value)


def test_training_needs_lora_on_the_scored_matrices():
    from loraprune.errors import LoraPruneError
    from loraprune.lora import add_lora
    from tiny_models import tiny_model

    model = add_lora(tiny_model(), r=2, target_modules=["q_proj", "v_proj"])
    with pytest.raises(LoraPruneError, match="mlp has no LoRA adapter"):
        ModelPruner(model, 10, PruningTarget(sparsity=0.3))
    ModelPruner(model, 10, PruningTarget(sparsity=0.0, attention_sparsity=0.5, mlp_sparsity=0.0))


@pytest.mark.parametrize("options", [{"allocation": "per-layer"}, {"attention_unit": "heads"}])
def test_target_options_are_validated(options):
    from loraprune.errors import ConfigError

    with pytest.raises(ConfigError, match="must be one of"):
        PruningTarget(sparsity=0.2, **options)


@pytest.mark.slow
def test_default_model_custom_loop_prunes_to_target_without_base_gradients(default_model_dir):
    """Three LoRAPrune steps on the real SmolLM2 (GQA: KV groups of 3 query heads, 1,536 channels per layer)."""
    from loraprune.lora import add_lora
    from loraprune.models import load_model

    model, tokenizer = load_model(str(default_model_dir))
    model = add_lora(model, r=4)
    pruner = ModelPruner(
        model, 3, PruningTarget(sparsity=0.2), LoRAPruneConfig(prune_every=1, warmup=0.0, cooldown=0.0)
    )
    ids = tokenizer(
        "Structured pruning removes whole attention heads and MLP channels while LoRA trains. " * 2, return_tensors="pt"
    ).input_ids
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is None and not p.requires_grad for _, p in base_weights(model))
        assert pruner.observe()
        optimizer.step()
        pruner.after_optimizer_step(optimizer)
        optimizer.zero_grad()
    # the event of step 1 waits for a second step of finite scores (min_scoring_steps=2)
    assert pruner.finished and [e["step"] for e in pruner.history] == [2, 3]
    assert pruner.decoder_sparsity() == pytest.approx(0.2, abs=0.002)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        pruner.finish()
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, masked, rtol=1e-3, atol=2e-3)
