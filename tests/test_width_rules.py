"""Hardware-friendly widths: MLP widths in multiples of N, one head count in every layer."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import TrainerCallback

from loraprune.cli import main
from loraprune.errors import ConfigError
from loraprune.model_pruning import LoRAPruneCallback, LoRAPruneConfig, ModelPruner, PruningTarget
from loraprune.selection import WidthRules, plan_budget, select
from loraprune.structure import full_masks, get_adapter
from loraprune.structure.groups import removed_params, total_params
from loraprune.training import train
from model_pruning_helpers import COLLATOR, lora_model, token_dataset, training
from tiny_models import tiny_model

LAYERS = list(range(4))


def _families(intermediate=32, unit="kv_group"):
    model = tiny_model("llama", heads=6, kv_heads=3, layers=4, intermediate=intermediate)
    return get_adapter(model).families(model, unit)


def _kept(masks, families, kind):
    return [int(masks[f.key].sum()) for f in families if f.kind == kind]


def test_round_to_keeps_every_mlp_width_a_multiple_and_removes_the_lowest_blocks():
    families = _families()
    rules = WidthRules(round_to=8)
    generator = torch.Generator().manual_seed(0)
    scores = {f.key: torch.rand(f.count, generator=generator) + f.layer / 4 for f in families}
    budget = plan_budget(families, LAYERS, 0.0, attention_sparsity=0.0, mlp_sparsity=0.5, rules=rules)
    masks = select(families, scores, full_masks(families), budget, prunable_layers=LAYERS, rules=rules)
    kept = _kept(masks, families, "mlp")
    assert sum(kept) == 4 * 32 - budget.mlp == 64
    assert all(width % 8 == 0 and width >= 8 for width in kept)
    assert len(set(kept)) > 1  # global allocation: the widths still differ per layer
    for family in families:
        if family.kind == "mlp":
            score, keep = scores[family.key], masks[family.key]
            # within a layer the removed channels are the lowest-scoring ones
            assert keep.all() or score[~keep].max() <= score[keep].min()


def test_round_to_with_uniform_allocation_and_a_width_it_cannot_keep():
    families = _families()
    rules = WidthRules(round_to=8)
    budget = plan_budget(
        families, LAYERS, 0.0, allocation="uniform", attention_sparsity=0.0, mlp_sparsity=0.25, rules=rules
    )
    scores = {f.key: torch.rand(f.count) for f in families}
    masks = select(
        families, scores, full_masks(families), budget, prunable_layers=LAYERS, allocation="uniform", rules=rules
    )
    assert _kept(masks, families, "mlp") == [24, 24, 24, 24]
    with pytest.raises(ConfigError, match="24 MLP channels, not a multiple of round_to 16"):
        plan_budget(_families(intermediate=24), LAYERS, 0.2, rules=WidthRules(round_to=16))
    with pytest.raises(ConfigError, match=r"nearest feasible: 0\.0000 or 0\.2500"):
        plan_budget(families, LAYERS, 0.0, attention_sparsity=0.0, mlp_sparsity=0.2, allocation="uniform", rules=rules)


def test_sparsity_alone_takes_the_nearest_feasible_value_under_rules_and_logs_it(caplog):
    families = _families()
    rules = WidthRules(round_to=16, uniform_attention=True)
    with caplog.at_level(logging.INFO, logger="loraprune.selection"):
        budget = plan_budget(families, LAYERS, 0.3, allocation="uniform", rules=rules)
    assert budget.mlp % (16 * 4) == 0 and budget.attention % 4 == 0
    params = {f.kind: f.params_per_unit for f in families}
    reached = (budget.attention * params["attention"] + budget.mlp * params["mlp"]) / total_params(families)
    assert f"nearest feasible {reached:.4f}" in caplog.text
    assert abs(reached - 0.3) > 0.05  # a coarse grid: far from the target, but no error
    # without the rules the same target is met to within one channel
    plain = plan_budget(families, LAYERS, 0.3)
    plain_reached = (plain.attention * params["attention"] + plain.mlp * params["mlp"]) / total_params(families)
    assert abs(plain_reached - 0.3) * total_params(families) <= params["mlp"] / 2


def test_uniform_attention_gives_one_head_count_while_mlp_widths_vary():
    families = _families()
    rules = WidthRules(uniform_attention=True)
    generator = torch.Generator().manual_seed(1)
    scores = {f.key: torch.rand(f.count, generator=generator) for f in families}
    budget = plan_budget(families, LAYERS, 0.4, rules=rules)
    masks = select(families, scores, full_masks(families), budget, prunable_layers=LAYERS, rules=rules)
    assert len(set(_kept(masks, families, "attention"))) == 1
    assert _kept(masks, families, "attention")[0] < 3
    assert len(set(_kept(masks, families, "mlp"))) > 1
    assert abs(removed_params(families, masks) / total_params(families) - 0.4) < 0.05


def test_loraprune_schedule_honours_round_to_at_every_event():
    rules = {"round_to": 8, "uniform_attention": True}
    target = PruningTarget(sparsity=0.5, **rules)
    model = lora_model()  # 3 layers of 24 MLP channels, 2 KV groups per layer
    pruner = ModelPruner(model, 40, target, LoRAPruneConfig(prune_every=5))
    amounts = [pruner.target_at(step) for step in range(41)]
    assert all(b.mlp % 8 == 0 and b.attention % 3 == 0 for b in amounts)
    assert amounts[pruner.schedule.ramp_end] == pruner.budget

    callback = LoRAPruneCallback(target, LoRAPruneConfig(prune_every=2))
    seen = []

    class Record(TrainerCallback):  # runs after LoRAPrune's callback at every optimizer step
        def on_optimizer_step(self, args, state, control, **kwargs):
            seen.append({key: int(mask.sum()) for key, mask in callback.pruner.masks.items()})

    train(lora_model(), token_dataset(), COLLATOR, training(12), callbacks=[callback, Record()])
    assert callback.pruner.finished
    for widths in seen:
        assert all(count % 8 == 0 for key, count in widths.items() if key.endswith("mlp"))
        assert len({count for key, count in widths.items() if key.endswith("attention")}) == 1


def test_prune_model_cli_round_to_and_uniform_attention(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    argv = ["prune-model", "--model", str(tiny_model_dir), "--output", str(out), "--method", "magnitude"]
    assert main([*argv, "--sparsity", "0.3", "--round-to", "32", "--uniform-attention"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "loraprune_report.json").read_text())
    assert all(row["channels"] % 32 == 0 for row in report["layers"])
    assert len({row["heads"] for row in report["layers"]}) == 1
    assert f"{report['sparsity_decoder']:.2%} removed, the nearest feasible to --sparsity 30.00%" in printed
    assert report["settings"]["round_to"] == 32 and report["settings"]["uniform_attention"] is True
    assert main([*argv, "--sparsity", "0.3", "--round-to", "7", "--overwrite"]) == 2
    assert "96 MLP channels, not a multiple of round_to 7" in capsys.readouterr().err
