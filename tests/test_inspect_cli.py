"""`loraprune inspect`: per-layer groups and the model's totals."""

from __future__ import annotations

from loraprune.cli import main


def test_inspect_lists_groups_per_layer_and_totals(tiny_model_dir, tiny_llama, capsys):
    assert main(["inspect", "--model", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    # tiny Llama: 4 query heads on 2 KV heads of 16 dims, hidden 64, MLP 96, 2 layers
    per_kv_group = (2 * 16 + 16 + 16) * 64 + 2 * 16 * 64
    assert f"{per_kv_group:,}" in out
    decoder = sum(p.numel() for n, p in tiny_llama.named_parameters() if "proj" in n)
    assert f"decoder attention+MLP: {decoder:,}" in out
    assert f"all parameters: {sum(p.numel() for p in tiny_llama.parameters()):,}" in out
    assert out.count(" x kv_group") == 2


def test_inspect_query_head_units(tiny_model_dir, capsys):
    assert main(["inspect", "--model", str(tiny_model_dir), "--attention-unit", "query_head"]) == 0
    assert "4 x query_head (2/KV)" in capsys.readouterr().out
