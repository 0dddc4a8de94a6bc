"""The activation-gradient score: exact against autograd and finite differences, no weight gradients,
and its use by the iterative LoRAPrune pruner and as a one-shot criterion."""

from __future__ import annotations

import pytest
import torch

from loraprune.errors import LoraPruneError
from loraprune.importance import get_criterion
from loraprune.importance.activation_gradient import ActivationGradientScores, input_side
from loraprune.model_pruning import LoRAPruneCallback, LoRAPruneConfig, ModelPruner, PruningTarget
from loraprune.structure import get_adapter, unwrap_model
from loraprune.training import train
from model_pruning_helpers import COLLATOR, base_weights, lora_model, token_dataset, training
from tiny_models import tiny_model, token_batch


def _loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL in the model's own dtype (transformers' loss upcasts to float32 only)."""
    logits = model(input_ids=batch).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def _families(model, unit: str = "kv_group"):
    root = unwrap_model(model)
    return get_adapter(root).families(root, unit)


def _per_window_derivatives(model, families, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """d(mean loss)/d(scale of unit u) per window, with a scale of 1 on every unit's input block (autograd)."""
    root = unwrap_model(model)
    windows = []
    for w in range(batch.shape[0]):
        scales = {f.key: torch.ones(f.count, dtype=torch.float64, requires_grad=True) for f in families}
        handles = []
        for family in families:
            slicing = input_side(family)

            def hook(_m, args, family=family, slicing=slicing, scales=scales):
                scale = scales[family.key].repeat_interleave(slicing.block).to(args[0].dtype)
                return (args[0] * scale, *args[1:])

            handles.append(root.get_submodule(slicing.module).register_forward_pre_hook(hook))
        window = batch[w : w + 1]
        # the window's share of the batch's mean loss (equal-length windows)
        loss = _loss(model, window) / batch.shape[0]
        grads = torch.autograd.grad(loss, [scales[f.key] for f in families])
        for handle in handles:
            handle.remove()
        windows.append({f.key: g for f, g in zip(families, grads)})
    return {f.key: torch.stack([w[f.key] for w in windows]) for f in families}


@pytest.mark.parametrize("unit", ["kv_group", "query_head"])
def test_scores_equal_the_per_window_derivatives_of_the_loss(unit):
    model = tiny_model(layers=2).double()
    families = _families(model, unit)
    batch = token_batch(batch=3, length=10)
    expected = _per_window_derivatives(model, families, batch)
    model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    for form in ("fisher", "first-order"):
        with ActivationGradientScores(model, families, form) as hooks:
            _loss(model, batch).backward()
            assert hooks.windows == 3
            scores = hooks.collect()
        for family in families:
            per_window = expected[family.key]
            want = (per_window**2).sum(0) if form == "fisher" else per_window.sum(0).abs()
            torch.testing.assert_close(scores[family.key].double(), want, rtol=1e-4, atol=1e-10)


def test_first_order_score_predicts_the_loss_change_of_a_small_removal():
    """Brute force: shrink one unit's input by a small epsilon and measure the mean loss change."""
    model = tiny_model(layers=2).double()
    model.set_attn_implementation("sdpa")  # eager attention takes its softmax in float32
    families = _families(model)
    batch = token_batch(batch=2, length=10)
    model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    signed = {}

    def capture(key, per_unit):
        signed[key] = signed.get(key, 0) + per_unit.sum(0)

    with ActivationGradientScores(model, families, "first-order") as hooks:
        hooks._add = capture  # record the signed sums
        _loss(model, batch).backward()
    eps = 1e-3  # central differences; RMSNorm computes in float32, so a much smaller step only measures its noise
    root = unwrap_model(model)

    def loss_with_scale(slicing, unit, factor):
        scale = torch.ones(family.count * slicing.block, dtype=torch.float64)
        scale[unit * slicing.block : (unit + 1) * slicing.block] = factor
        handle = root.get_submodule(slicing.module).register_forward_pre_hook(
            lambda _m, args: (args[0] * scale, *args[1:])
        )
        with torch.no_grad():
            value = float(_loss(model, batch))
        handle.remove()
        return value

    for family in families:
        slicing = input_side(family)
        for unit in range(family.count):
            change = (loss_with_scale(slicing, unit, 1 - eps) - loss_with_scale(slicing, unit, 1 + eps)) / (2 * eps)
            # removing the unit changes the loss by -sum(h*g) to first order; a removal of eps by eps times that
            assert change == pytest.approx(-float(signed[family.key][unit]), rel=1e-2, abs=5e-6)


def test_one_shot_criterion_creates_no_weight_gradient_and_restores_requires_grad():
    model = tiny_model(layers=2)
    families = _families(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    criterion = get_criterion("activation")
    seen_grads = []
    for param in model.parameters():
        param.register_hook(lambda g: seen_grads.append(g))
    scores = criterion.score(model, families, token_batch(batch=4, length=10))
    assert not seen_grads and all(p.grad is None for p in model.parameters())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert set(scores) == {f.key for f in families}
    assert all(bool((s > 0).all()) and s.shape == (f.count,) for f, s in zip(families, scores.values()))
    with pytest.raises(LoraPruneError, match="calibration"):
        criterion.score(model, families, None)


def test_iterative_pruner_scores_with_activation_gradients_and_reaches_the_target():
    model = lora_model()
    callback = LoRAPruneCallback(PruningTarget(0.4), LoRAPruneConfig(score="activation", prune_every=2))
    before = {name: p.detach().clone() for name, p in base_weights(model)}
    train(model, token_dataset(), COLLATOR, training(12), callbacks=[callback])
    pruner = callback.pruner
    assert pruner.finished and pruner.observations >= 5
    assert all(torch.equal(before[name], p) and p.grad is None for name, p in base_weights(model))
    assert not pruner.activation_scores._handles  # scoring stops once the target is reached


@pytest.mark.parametrize(("start", "factor"), [("first", 1.0), ("zero", 0.1)])
def test_observe_folds_the_collected_scores_into_the_moving_average(start, factor):
    model = lora_model()
    config = LoRAPruneConfig(score="activation", ema=0.9, ema_start=start)
    pruner = ModelPruner(model, 10, PruningTarget(0.3), config)
    batch = torch.stack([row["input_ids"] for row in token_dataset(count=4)])
    with ActivationGradientScores(model, pruner.scored, "fisher") as reference:
        model(input_ids=batch, labels=batch).loss.backward()
        want = reference.collect()
    assert pruner.observe()
    for key, value in want.items():
        torch.testing.assert_close(pruner.scores[key], factor * value)
    model(input_ids=batch, labels=batch).loss.backward()
    assert pruner.observe()
    for key, value in want.items():  # same pass again: S = 0.9 S + 0.1 new
        torch.testing.assert_close(pruner.scores[key], (0.9 * factor + 0.1) * value)
