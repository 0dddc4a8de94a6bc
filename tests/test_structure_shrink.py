"""Groups, masking and physical shrinking on tiny random models of every supported architecture."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel

from loraprune.errors import ConfigError, LoraPruneError
from loraprune.masking import MaskHooks
from loraprune.shrink import shrink_model
from loraprune.structure import UnsupportedArchitectureError, full_masks, get_adapter
from loraprune.structure.groups import removed_params, total_params
from tiny_models import ARCHITECTURES, tiny_model, token_batch

CASES = [  # (architecture, query heads, kv heads, attention unit)
    ("llama", 4, 4, "head"),
    ("llama", 6, 2, "kv_group"),
    ("llama", 6, 2, "query_head"),
    ("mistral", 4, 2, "kv_group"),
    ("mistral", 6, 3, "query_head"),
    ("qwen2", 6, 2, "kv_group"),
    ("qwen2", 4, 2, "query_head"),
    ("qwen3", 6, 2, "kv_group"),
    ("qwen3", 4, 2, "query_head"),
    ("gemma2", 6, 3, "kv_group"),
    ("gemma2", 4, 2, "query_head"),
    ("gemma3_text", 6, 2, "kv_group"),
    ("gemma3_text", 6, 3, "query_head"),
    ("phi3", 4, 4, "head"),
    ("phi3", 6, 2, "kv_group"),
    ("phi3", 6, 2, "query_head"),
]


def _count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@st.composite
def feasible_masks(draw, families):
    """Random keep-masks that respect each family's constraints (at least one unit kept)."""
    masks = {}
    for family in families:
        if family.unit == "query_head":
            per_kv = family.units_per_kv
            kept = draw(st.integers(1, per_kv))
            keep = torch.zeros(family.count, dtype=torch.bool)
            for kv in range(family.count // per_kv):
                chosen = draw(st.permutations(range(per_kv)))[:kept]
                keep[[kv * per_kv + c for c in chosen]] = True
        else:
            bits = draw(st.lists(st.booleans(), min_size=family.count, max_size=family.count))
            keep = torch.tensor(bits, dtype=torch.bool)
            if not keep.any():
                keep[draw(st.integers(0, family.count - 1))] = True
        masks[family.key] = keep
    return masks


@pytest.mark.parametrize("arch,heads,kv_heads,unit", CASES)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_shrunk_model_matches_masked_model(arch, heads, kv_heads, unit, data):
    model = tiny_model(arch, heads=heads, kv_heads=kv_heads, layers=2)
    adapter = get_adapter(model)
    families = adapter.families(model, unit)
    masks = data.draw(feasible_masks(families))
    tokens = token_batch()
    params_before = _count_params(model)
    with torch.no_grad(), MaskHooks(model, families, masks):
        masked = model(tokens).logits
    sizes = shrink_model(model, families, masks)
    with torch.no_grad():
        shrunk = model(tokens).logits
    assert (masked - shrunk).abs().max().item() <= 1e-5
    assert params_before - _count_params(model) == removed_params(families, masks)
    for family, layer_sizes in zip(families[::2], sizes):
        kept = int(masks[family.key].sum())
        if unit == "query_head":
            assert layer_sizes.num_attention_heads == kept
            assert layer_sizes.num_key_value_heads == kv_heads
        else:
            assert layer_sizes.num_key_value_heads == kept
            assert layer_sizes.num_attention_heads == kept * heads // kv_heads


def test_masking_changes_the_output_and_full_masks_do_not():
    model = tiny_model("llama", heads=6, kv_heads=2)
    families = get_adapter(model).families(model)
    tokens = token_batch()
    with torch.no_grad():
        dense = model(tokens).logits
        with MaskHooks(model, families, full_masks(families)):
            unmasked = model(tokens).logits
        masks = full_masks(families)
        masks["layers.0.mlp"][:5] = False
        with MaskHooks(model, families, masks) as hooks:
            masked = model(tokens).logits
            hooks.update(full_masks(families))
            restored = model(tokens).logits
        after = model(tokens).logits
    assert torch.equal(dense, unmasked) and torch.equal(dense, restored) and torch.equal(dense, after)
    assert (dense - masked).abs().max() > 1e-5


def test_group_parameter_counts():
    model = tiny_model("qwen2", heads=6, kv_heads=2, hidden=48, head_dim=8, intermediate=24, layers=3)
    families = get_adapter(model).families(model, "kv_group")
    attention = families[0]
    # a KV group of Qwen2: 3 query heads + 1 k + 1 v head (rows with their biases) + 3 heads of o columns
    assert attention.count == 2
    assert attention.params_per_unit == (3 * 8 + 8 + 8) * (48 + 1) + 3 * 8 * 48
    assert families[1].count == 24 and families[1].params_per_unit == 3 * 48
    linear = sum(p.numel() for n, p in model.named_parameters() if "proj" in n)
    unowned_biases = 0  # Qwen2 has no o_proj / down_proj bias
    assert total_params(families) == linear - unowned_biases


def test_query_head_units_follow_the_gqa_mapping():
    model = tiny_model("llama", heads=6, kv_heads=2)
    family = get_adapter(model).families(model, "query_head")[0]
    assert family.count == 6 and family.units_per_kv == 3
    assert family.kv_of(torch.arange(6)).tolist() == [0, 0, 0, 1, 1, 1]
    assert family.is_feasible(torch.tensor([1, 0, 1, 0, 1, 1], dtype=torch.bool))
    assert not family.is_feasible(torch.tensor([1, 0, 0, 0, 1, 1], dtype=torch.bool))  # unequal per KV group
    assert not family.is_feasible(torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.bool))  # empties KV group 0


def test_infeasible_mask_is_refused_before_anything_changes():
    model = tiny_model("llama", heads=6, kv_heads=2)
    families = get_adapter(model).families(model, "query_head")
    masks = full_masks(families)
    masks["layers.0.attention"] = torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.bool)
    with pytest.raises(LoraPruneError, match="constraints"):
        shrink_model(model, families, masks)


def test_head_unit_is_rejected_for_gqa():
    model = tiny_model("llama", heads=6, kv_heads=2)
    with pytest.raises(ConfigError, match="kv_group"):
        get_adapter(model).families(model, "head")


def test_unsupported_architecture_names_the_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(UnsupportedArchitectureError, match="gemma2, gemma3_text, llama, mistral, phi3, qwen2, qwen3"):
        get_adapter(model)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_uniform_shrink_gives_the_stock_config(arch):
    model = tiny_model(arch, heads=6, kv_heads=3)
    families = get_adapter(model).families(model, "kv_group")
    masks = full_masks(families)
    for family in families:
        masks[family.key][0] = False
    shrink_model(model, families, masks)
    assert model.config.model_type == arch
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    assert model.config.intermediate_size == 23 and model.config.head_dim == 8
