"""Budgets in whole groups, feasibility errors, and lowest-score-first selection."""

from __future__ import annotations

import pytest
import torch

from loraprune.errors import ConfigError
from loraprune.selection import parse_layers, plan_budget, select
from loraprune.structure import full_masks, get_adapter
from loraprune.structure.groups import removed_params, total_params
from tiny_models import tiny_model


def _families(unit="kv_group", layers=4, heads=6, kv_heads=3):
    model = tiny_model("llama", heads=heads, kv_heads=kv_heads, layers=layers, intermediate=24)
    return get_adapter(model).families(model, unit)


def test_sparsity_alone_meets_the_decoder_fraction_within_one_channel():
    families = _families()
    budget = plan_budget(families, list(range(4)), 0.3)
    masks = full_masks(families)
    scores = {f.key: torch.rand(f.count) for f in families}
    masks = select(families, scores, masks, budget, prunable_layers=list(range(4)))
    channel = families[1].params_per_unit
    assert abs(removed_params(families, masks) - 0.3 * total_params(families)) <= channel / 2
    assert budget.attention == round(0.3 * 12)


def test_explicit_targets_that_the_groups_cannot_meet_name_the_nearest_feasible_values():
    families = _families(layers=2, heads=4, kv_heads=2)  # 2 KV groups per layer, one must stay
    with pytest.raises(ConfigError, match=r"nearest feasible: 0\.0000 or 0\.5000"):
        plan_budget(families, [0, 1], 0.2, allocation="uniform", attention_sparsity=0.3)
    with pytest.raises(ConfigError, match=r"nearest feasible: 0\.5000$"):
        plan_budget(families, [0, 1], 0.2, attention_sparsity=0.7)


def test_sparsity_out_of_range_is_refused():
    families = _families()
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ConfigError, match=r"\[0, 1\)"):
            plan_budget(families, [0], bad)


def test_uniform_allocation_removes_the_same_number_everywhere():
    families = _families()
    budget = plan_budget(
        families, list(range(4)), 0.25, allocation="uniform", attention_sparsity=1 / 3, mlp_sparsity=0.25
    )
    scores = {f.key: torch.rand(f.count) for f in families}
    masks = select(families, scores, full_masks(families), budget, prunable_layers=list(range(4)), allocation="uniform")
    assert {int((~masks[f.key]).sum()) for f in families if f.kind == "mlp"} == {6}
    assert {int((~masks[f.key]).sum()) for f in families if f.kind == "attention"} == {1}


def test_global_selection_takes_the_lowest_scores_and_respects_prunable_layers():
    families = _families()
    scores = {f.key: torch.arange(f.count, dtype=torch.float) + 100 * f.layer for f in families}
    budget = plan_budget(families, [1, 2], 0.0, attention_sparsity=0.0, mlp_sparsity=24 / 96)
    masks = select(families, scores, full_masks(families), budget, prunable_layers=[1, 2])
    assert masks["layers.0.mlp"].all() and masks["layers.3.mlp"].all()
    assert masks["layers.1.mlp"].tolist() == [False] * 23 + [True]  # lowest scores go, one channel stays
    assert masks["layers.2.mlp"].tolist() == [False] + [True] * 23  # the 24th comes from the next layer


def test_selection_is_monotone():
    families = _families()
    prunable = list(range(4))
    first = select(
        families,
        {f.key: torch.rand(f.count) for f in families},
        full_masks(families),
        plan_budget(families, prunable, 0.2),
        prunable_layers=prunable,
    )
    second = select(
        families,
        {f.key: torch.rand(f.count) for f in families},
        first,
        plan_budget(families, prunable, 0.4),
        prunable_layers=prunable,
    )
    for key in first:
        assert not (second[key] & ~first[key]).any()  # nothing comes back


def test_query_head_units_go_one_per_kv_group():
    families = _families("query_head", layers=2, heads=6, kv_heads=2)
    scores = {f.key: torch.tensor([5.0, 1.0, 3.0, 0.5, 9.0, 2.0]) for f in families}
    budget = plan_budget(families, [0, 1], 0.0, attention_sparsity=2 / 12, mlp_sparsity=0.0)
    masks = select(families, scores, full_masks(families), budget, prunable_layers=[0, 1])
    removed = [~masks[f.key] for f in families if f.kind == "attention"]
    # one tier: the lowest query head of each KV group (head 1 of group 0, head 3 of group 1), in one layer
    assert sum(int(r.sum()) for r in removed) == 2
    assert any(r.tolist() == [False, True, False, True, False, False] for r in removed)
    for family in families:
        assert family.is_feasible(masks[family.key])


def test_parse_layers():
    assert parse_layers("all", 5) == [0, 1, 2, 3, 4]
    assert parse_layers("1-3", 5) == [1, 2, 3]
    assert parse_layers("0,2,3-4", 5) == [0, 2, 3, 4]
    # the official LoRAPrune code: all but the first 10 % and the last layer
    assert parse_layers("paper", 30) == list(range(3, 29))
    assert parse_layers("paper", 12) == list(range(1, 11))
    with pytest.raises(ConfigError, match="do not exist"):
        parse_layers("4-9", 5)
    with pytest.raises(ConfigError, match="must look like"):
        parse_layers("first", 5)
