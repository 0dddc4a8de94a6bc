"""The LoRA-guided criterion: Ĝ against hand and autograd computations, group scores, no base gradients."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from loraprune.errors import LoraPruneError
from loraprune.importance import get_criterion
from loraprune.importance.lora_guided import LoraGuidedCriterion, element_importance, estimated_gradient
from loraprune.lora import add_lora
from loraprune.structure import get_adapter, unwrap_model
from tiny_models import tiny_model, token_batch


def _randomised_lora(r: int = 4, seed: int = 0, targets=None):
    """A tiny GQA Llama with LoRA whose B is non-zero (so both terms of Ĝ matter)."""
    model = add_lora(tiny_model(seed=seed), r=r, alpha=2 * r, **({"target_modules": targets} if targets else {}))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def _backward(model, seed: int = 1) -> None:
    batch = token_batch(seed=seed)
    model(input_ids=batch, labels=batch).loss.backward()


def test_estimated_gradient_matches_elementwise_definition():
    torch.manual_seed(0)
    a, b, g_a, g_b = torch.randn(3, 7), torch.randn(5, 3), torch.randn(3, 7), torch.randn(5, 3)
    expected = torch.zeros(5, 7)
    for i in range(5):
        for j in range(7):
            expected[i, j] = sum(g_b[i, k] * a[k, j] + b[i, k] * g_a[k, j] for k in range(3))
    torch.testing.assert_close(estimated_gradient(a, b, g_a, g_b), expected)
    second = expected - g_b @ g_a
    torch.testing.assert_close(estimated_gradient(a, b, g_a, g_b, second_order=True), second)
    # the second-order term is the exact change of B·A after a unit SGD step, beyond first order
    step = (b - g_b) @ (a - g_a) - b @ a
    torch.testing.assert_close(-estimated_gradient(a, b, g_a, g_b, second_order=True), step)


def _lora_linear_grads(
    r: int, in_features: int = 6, out_features: int = 5, orthogonal_a: bool = False, zero_b: bool = False
):
    """Gradients of a loss through a PEFT LoRA linear layer, and the full-weight gradient G_W of the same loss."""
    torch.manual_seed(3)
    model = add_lora(
        tiny_model(hidden=in_features, heads=1, kv_heads=1, head_dim=in_features),
        r=r,
        alpha=3.0,
        target_modules=["up_proj"],
    )
    layer = unwrap_model(model).model.layers[0].mlp.up_proj
    assert isinstance(layer, LoraLayer)
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        if orthogonal_a:
            lora_a.copy_(torch.linalg.qr(torch.randn(in_features, in_features))[0][:r])
        lora_b.copy_(torch.zeros_like(lora_b) if zero_b else torch.randn_like(lora_b))
    x = torch.randn(8, in_features)
    target = torch.randn(8, layer.out_features)
    ((layer(x) - target) ** 2).sum().backward()
    scaling = layer.scaling["default"]
    merged = (layer.base_layer.weight + scaling * lora_b @ lora_a).detach().requires_grad_(True)
    ((x @ merged.T + layer.base_layer.bias - target) ** 2).sum().backward()
    return layer, scaling, merged.grad


def test_lora_gradients_are_projections_of_the_full_gradient():
    layer, s, g_w = _lora_linear_grads(r=3)
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    g_a, g_b = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
    close = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(g_b, s * g_w @ a.T, **close)
    torch.testing.assert_close(g_a, s * b.T @ g_w, **close)
    # hence Ĝ = s·(G_W·AᵀA + B·Bᵀ·G_W): the documented scaling choice
    torch.testing.assert_close(estimated_gradient(a, b, g_a, g_b), s * (g_w @ a.T @ a + b @ b.T @ g_w), **close)


def test_estimate_equals_full_gradient_with_square_orthogonal_a_and_zero_b():
    layer, s, g_w = _lora_linear_grads(r=6, orthogonal_a=True, zero_b=True)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    estimate = estimated_gradient(a, b, a.grad, b.grad)
    torch.testing.assert_close(estimate / s, g_w, atol=1e-5, rtol=1e-4)
    # with fewer rank components it is the projection of G_W onto A's row space
    layer, s, g_w = _lora_linear_grads(r=2, orthogonal_a=True, zero_b=True)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    projection = g_w @ a.detach().T @ a.detach()
    torch.testing.assert_close(estimated_gradient(a, b, a.grad, b.grad) / s, projection, atol=1e-5, rtol=1e-4)


def _hand_scores(model, family, second_order: bool = False, normalise: bool = True) -> torch.Tensor:
    """Group scores of `family` computed directly from the definitions, one matrix at a time."""
    root = unwrap_model(model)
    vectors = []
    for slicing in family.matrices:
        layer = root.get_submodule(slicing.module)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        s = layer.scaling["default"]
        g_hat = b.grad @ a + b @ a.grad - (b.grad @ a.grad if second_order else 0)
        w = layer.base_layer.weight + s * b @ a
        importance = (g_hat * w).abs().detach()
        if slicing.dim == 0:
            per_unit = torch.stack(
                [importance[u * slicing.block : (u + 1) * slicing.block].sum() for u in range(family.count)]
            )
        else:
            per_unit = torch.stack(
                [importance[:, u * slicing.block : (u + 1) * slicing.block].sum() for u in range(family.count)]
            )
        vectors.append(per_unit / per_unit.norm() if normalise else per_unit)
    return sum(vectors)


@pytest.mark.parametrize("attention_unit", ["kv_group", "query_head"])
@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("normalisation", ["matrix", "none"])
def test_group_scores_match_direct_computation(attention_unit, second_order, normalisation):
    model = _randomised_lora()
    _backward(model)
    families = get_adapter(model).families(unwrap_model(model), attention_unit)
    criterion = LoraGuidedCriterion(second_order=second_order, normalisation=normalisation)
    scores = criterion.gradient_scores(model, families)
    assert set(scores) == {f.key for f in families}
    for family in families:
        want = _hand_scores(model, family, second_order, normalise=normalisation == "matrix")
        torch.testing.assert_close(scores[family.key], want)


def test_element_importance_uses_the_merged_weight():
    torch.manual_seed(0)
    w0, a, b = torch.randn(4, 6), torch.randn(2, 6), torch.randn(4, 2)
    g_a, g_b = torch.randn(2, 6), torch.randn(4, 2)
    expected = ((g_b @ a + b @ g_a) * (w0 + 0.5 * b @ a)).abs()
    original = w0.clone()
    torch.testing.assert_close(element_importance(w0, a, b, 0.5, g_a, g_b), expected)
    assert torch.equal(w0, original)  # the base weight is read, never modified


def test_loss_scale_is_divided_out():
    model = _randomised_lora()
    _backward(model)
    families = get_adapter(model).families(unwrap_model(model))
    criterion = LoraGuidedCriterion(second_order=True)
    reference = criterion.gradient_scores(model, families)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.grad *= 1024.0
    scaled = criterion.gradient_scores(model, families, loss_scale=1024.0)
    for key in reference:
        torch.testing.assert_close(scaled[key], reference[key])


def test_one_shot_scoring_creates_no_base_gradients_and_clears_lora_gradients():
    model = _randomised_lora()
    families = get_adapter(model).families(unwrap_model(model))
    criterion = get_criterion("lora-guided")
    scores = criterion.score(model, families, token_batch(batch=3, seed=2))
    assert all(torch.isfinite(v).all() and v.shape == (f.count,) for f, v in zip(families, scores.values()))
    for name, param in model.named_parameters():
        assert param.grad is None, name
        assert param.requires_grad == ("lora_" in name), name
    # the same as scoring the gradient of the mean loss by hand
    batch = token_batch(batch=3, seed=2)
    model(input_ids=batch, labels=batch).loss.backward()
    expected = criterion.gradient_scores(model, families)
    for key in expected:
        torch.testing.assert_close(scores[key], expected[key])


def test_family_without_lora_is_an_error():
    model = _randomised_lora(targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    families = get_adapter(model).families(unwrap_model(model))
    _backward(model)
    with pytest.raises(LoraPruneError, match=r"layers\.0\.mlp has no LoRA adapter"):
        LoraGuidedCriterion().gradient_scores(model, families)
    attention = [f for f in families if f.kind == "attention"]
    assert set(LoraGuidedCriterion().gradient_scores(model, attention)) == {f.key for f in attention}


def test_partial_lora_scores_only_wrapped_matrices():
    model = _randomised_lora(targets=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    _backward(model)
    family = next(f for f in get_adapter(model).families(unwrap_model(model)) if f.kind == "attention")
    scores = LoraGuidedCriterion().gradient_scores(model, [family])[family.key]
    wrapped = type(family)(
        **{**family.__dict__, "matrices": tuple(m for m in family.matrices if m.module.endswith(("q_proj", "v_proj")))}
    )
    torch.testing.assert_close(scores, _hand_scores(model, wrapped))
