"""Baseline criteria: Taylor (real base-weight gradients) and Wanda-sp against direct computations."""

from __future__ import annotations

import pytest
import torch

from loraprune.importance import get_criterion
from loraprune.lora import add_lora
from loraprune.structure import get_adapter, unwrap_model
from tiny_models import tiny_model, token_batch


def _unit_sums(matrix: torch.Tensor, dim: int, block: int, count: int) -> torch.Tensor:
    """Per-unit sums written out with explicit slices (independent of `unit_scores`)."""
    if dim == 0:
        return torch.stack([matrix[u * block : (u + 1) * block].sum() for u in range(count)])
    return torch.stack([matrix[:, u * block : (u + 1) * block].sum() for u in range(count)])


@pytest.mark.parametrize("batch_size", [1, 4])
def test_taylor_matches_full_batch_autograd(batch_size):
    model = tiny_model(seed=3)
    batches = token_batch(batch=5, seed=4)
    families = get_adapter(model).families(model, "query_head")
    scores = get_criterion("taylor", batch_size=batch_size).score(model, families, batches)

    reference = tiny_model(seed=3)
    reference(input_ids=batches, labels=batches).loss.backward()
    for family in families:
        expected = torch.zeros(family.count)
        for slicing in family.matrices:
            linear = reference.get_submodule(slicing.module)
            expected += _unit_sums((linear.weight * linear.weight.grad).abs(), slicing.dim, slicing.block, family.count)
            if slicing.dim == 0:  # the tiny model has biases: sliced (and scored) with their rows
                expected += _unit_sums((linear.bias * linear.bias.grad).abs()[:, None], 0, slicing.block, family.count)
        torch.testing.assert_close(scores[family.key], expected.detach(), rtol=2e-4, atol=1e-6)


def test_taylor_restores_flags_and_frees_gradients_on_a_lora_model():
    model = add_lora(tiny_model(seed=1), r=2)
    before = {name: param.requires_grad for name, param in model.named_parameters()}
    families = get_adapter(model).families(unwrap_model(model))
    scores = get_criterion("taylor").score(model, families, token_batch(batch=2))
    assert all(torch.isfinite(s).all() and (s > 0).all() for s in scores.values())
    for name, param in model.named_parameters():
        assert param.requires_grad == before[name], name
        assert param.grad is None, name


def test_wanda_sp_matches_direct_computation():
    model = tiny_model(seed=2)
    batches = token_batch(batch=5, seed=6)
    families = get_adapter(model).families(model)
    scores = get_criterion("wanda-sp", batch_size=2).score(model, families, batches)

    inputs = {}
    handles = [
        model.get_submodule(s.module).register_forward_hook(
            lambda _m, args, _out, name=s.module: inputs.__setitem__(name, args[0])
        )
        for f in families
        for s in f.matrices
        if s.dim == 1
    ]
    with torch.no_grad():
        model(input_ids=batches)
    for handle in handles:
        handle.remove()
    for family in families:
        (slicing,) = [s for s in family.matrices if s.dim == 1]  # o_proj or down_proj
        x = inputs[slicing.module].reshape(-1, inputs[slicing.module].shape[-1])
        norms = x.pow(2).sum(0).sqrt()
        weight = model.get_submodule(slicing.module).weight
        expected = _unit_sums(weight.abs() * norms, 1, slicing.block, family.count)
        torch.testing.assert_close(scores[family.key], expected, rtol=1e-4, atol=1e-6)


def test_wanda_sp_scores_a_silenced_channel_zero():
    model = tiny_model(seed=2)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 5] = 0.0  # channel 5 writes nothing
    families = get_adapter(model).families(model)
    scores = get_criterion("wanda-sp").score(model, families, token_batch(batch=2))
    mlp = scores["layers.0.mlp"]
    assert mlp[5] == 0 and (mlp[torch.arange(mlp.numel()) != 5] > 0).all()
