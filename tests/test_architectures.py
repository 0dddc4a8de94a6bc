"""Qwen3, Gemma 2 / Gemma 3 and Phi-3: what each adds to the Llama family, checked on tiny random models.

Masked-against-shrunk equality and per-layer saves of every architecture are in
`test_structure_shrink.py` and `test_io.py`; this file covers stock saves, the fused
matrices of Phi-3 (base weights, LoRA, scores), the per-head norms, and short
`prune-model` runs with the LoRA-guided and Taylor criteria.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from loraprune.cli import main
from loraprune.importance.magnitude import MagnitudeCriterion
from loraprune.importance.taylor import TaylorCriterion
from loraprune.io import save_pruned_model
from loraprune.lora import add_lora
from loraprune.masking import MaskHooks
from loraprune.models import load_model
from loraprune.shrink import shrink_model
from loraprune.structure import full_masks, get_adapter, supported_model_types
from loraprune.structure.groups import total_params
from tiny_models import ARCHITECTURES, tiny_model, token_batch

NEW_ARCHITECTURES = ["qwen3", "gemma2", "gemma3_text", "phi3"]


def _drop_one_group_and_channels(model: torch.nn.Module, unit: str = "kv_group") -> None:
    """Remove KV group 1 (or query head 1 of each KV pair of heads 0-1, 2-3, 4-5) and MLP channels
    0, 3, 7 from every layer (the same widths everywhere)."""
    families = get_adapter(model).families(model, unit)
    masks = full_masks(families)
    heads = [1] if unit == "kv_group" else [1, 3, 5]
    for family in families:
        masks[family.key][[0, 3, 7] if family.kind == "mlp" else heads] = False
    shrink_model(model, families, masks)


@pytest.mark.parametrize("arch", NEW_ARCHITECTURES)
def test_uniform_save_is_the_stock_architecture(arch, tmp_path):
    model = tiny_model(arch, heads=6, kv_heads=3)
    _drop_one_group_and_channels(model)
    assert save_pruned_model(model, None, tmp_path / "out") is True
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    stock_config, stock_model = ARCHITECTURES[arch]
    assert config["model_type"] == arch and config["architectures"] == [stock_model.__name__]
    assert "auto_map" not in config and not (tmp_path / "out" / "modeling_loraprune.py").exists()
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (4, 2, 21)
    assert config["head_dim"] == 8
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(reloaded) is stock_model and type(reloaded.config) is stock_config
    tokens = token_batch()
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, model(tokens).logits)


def _longrope_phi3() -> Phi3ForCausalLM:
    """A tiny Phi-3 with LongRoPE, whose per-head factor lists (head_dim / 2 long) stock Phi-3 checks
    against `hidden_size // num_attention_heads`, as in Phi-3-mini-128k, Phi-3.5-mini and Phi-4-mini."""
    config = Phi3Config(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=64,
        original_max_position_embeddings=8,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0, 1.1, 1.2, 1.3],
            "long_factor": [2.0, 2.5, 3.0, 3.5],
        },
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return Phi3ForCausalLM(config).eval()


@pytest.mark.parametrize("model_of", [lambda: tiny_model("gemma2", heads=6, kv_heads=6), _longrope_phi3])
def test_uniform_widths_the_stock_config_refuses_are_saved_per_layer(model_of, tmp_path):
    model = model_of()  # Gemma 2: 48 / 5 heads; Phi-3: LongRoPE factors sized by 48 // 4 heads
    families = get_adapter(model).families(model)
    masks = full_masks(families)
    for family in families:
        if family.kind == "attention":
            masks[family.key][1] = False
    shrink_model(model, families, masks)
    assert save_pruned_model(model, None, tmp_path / "out") is False
    tokens = token_batch(length=16)  # past original_max_position_embeddings: the long factors act
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(reloaded).__name__.startswith("LoraPruned")
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, model(tokens).logits)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_gemma_extras_survive_pruning(arch):
    model = tiny_model(arch, heads=6, kv_heads=3, head_dim=12)  # 6 heads of 12 on a hidden size of 48, as Gemma
    before = model.config.to_dict()
    tokens = token_batch()
    families = get_adapter(model).families(model)
    masks = full_masks(families)
    masks["layers.0.attention"][1] = False
    masks["layers.1.mlp"][:5] = False
    with torch.no_grad(), MaskHooks(model, families, masks):
        masked = model(tokens).logits
    shrink_model(model, families, masks)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, masked, rtol=0, atol=1e-5)
    after = model.config.to_dict()
    assert after["head_dim"] == 12 and model.model.layers[0].self_attn.q_proj.out_features == 4 * 12
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "sliding_window"):
        assert after[key] == before[key]
    assert after["layer_types"] == ["sliding_attention", "full_attention"] == before["layer_types"]
    layer = model.model.layers[0]
    assert layer.self_attn.sliding_window == 4 and model.model.layers[1].self_attn.sliding_window is None
    assert layer.pre_feedforward_layernorm.weight.shape == (48,)  # on the hidden size: untouched


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_per_head_norms_keep_their_head_dim_weights(arch):
    model = tiny_model(arch, heads=6, kv_heads=3)
    norms = {n: p.clone() for n, p in model.named_parameters() if "q_norm" in n or "k_norm" in n}
    assert norms and all(p.shape == (8,) for p in norms.values())
    _drop_one_group_and_channels(model, "query_head")
    assert all(torch.equal(dict(model.named_parameters())[n], p) for n, p in norms.items())
    families = get_adapter(model).families(model)
    assert not any("norm" in m.module for f in families for m in f.matrices)


def _llama_twin(phi3: torch.nn.Module) -> LlamaForCausalLM:
    """A Llama with Phi-3's weights, its fused matrices split into q/k/v and gate/up."""
    c = phi3.config
    twin = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            rms_norm_eps=c.rms_norm_eps,
            max_position_embeddings=c.max_position_embeddings,
            tie_word_embeddings=False,
            attn_implementation="eager",
        )
    ).eval()
    q = c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    state = {}
    for name, value in phi3.state_dict().items():
        if name.endswith("qkv_proj.weight"):
            stem = name.removesuffix("qkv_proj.weight")
            state |= {stem + "q_proj.weight": value[:q], stem + "k_proj.weight": value[q : q + kv]}
            state[stem + "v_proj.weight"] = value[q + kv :]
        elif name.endswith("gate_up_proj.weight"):
            stem = name.removesuffix("gate_up_proj.weight")
            gate, up = value.chunk(2)
            state |= {stem + "gate_proj.weight": gate, stem + "up_proj.weight": up}
        else:
            state[name] = value
    twin.load_state_dict(state)
    return twin


@pytest.mark.parametrize("unit", ["kv_group", "query_head"])
def test_phi3_fused_segments_are_the_split_matrices_of_a_llama(unit):
    phi3 = tiny_model("phi3", heads=6, kv_heads=2)
    llama = _llama_twin(phi3)
    tokens = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(phi3(tokens).logits, llama(tokens).logits, rtol=0, atol=1e-5)
    phi3_families = get_adapter(phi3).families(phi3, unit)
    llama_families = get_adapter(llama).families(llama, unit)
    assert [(f.count, f.params_per_unit) for f in phi3_families] == [
        (f.count, f.params_per_unit) for f in llama_families
    ]
    linear = sum(p.numel() for n, p in phi3.named_parameters() if "proj" in n)
    assert total_params(get_adapter(phi3).families(phi3, "kv_group")) == linear
    for criterion in (MagnitudeCriterion(), TaylorCriterion(batch_size=2)):
        phi3_scores = criterion.score(phi3, phi3_families, tokens)
        llama_scores = criterion.score(llama, llama_families, tokens)
        for key, scores in phi3_scores.items():
            torch.testing.assert_close(scores, llama_scores[key], rtol=1e-4, atol=1e-7)
    masks = full_masks(phi3_families)
    masks["layers.0.attention"][[0] if unit == "kv_group" else [0, 4]] = False
    masks["layers.1.attention"][[1] if unit == "kv_group" else [2, 5]] = False
    masks["layers.0.mlp"][[2, 3, 23]] = False
    shrink_model(phi3, phi3_families, masks)
    shrink_model(llama, llama_families, masks)
    with torch.no_grad():
        torch.testing.assert_close(phi3(tokens).logits, llama(tokens).logits, rtol=0, atol=1e-5)


def test_lora_on_fused_matrices_is_sliced_with_their_rows():
    model = add_lora(tiny_model("phi3", heads=6, kv_heads=2), r=4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)  # a trained adapter: B is no longer zero
    root = model.get_base_model()
    qkv = root.model.layers[0].self_attn.qkv_proj
    assert "default" in qkv.lora_A and "default" in root.model.layers[0].mlp.gate_up_proj.lora_A
    families = get_adapter(root).families(root)
    masks = full_masks(families)
    masks["layers.0.attention"][1] = False
    masks["layers.0.mlp"][[0, 5, 6]] = False
    tokens = token_batch()
    with torch.no_grad(), MaskHooks(model, families, masks):
        masked = model(tokens).logits
    kept_rows = torch.cat([torch.arange(0, 24), torch.arange(48, 56), torch.arange(64, 72)])  # q of group 0, k0, v0
    expected_b = qkv.lora_B["default"].weight[kept_rows].clone()
    shrink_model(model, families, masks)
    assert qkv.base_layer.weight.shape == (40, 48) and qkv.lora_A["default"].weight.shape == (4, 48)
    assert torch.equal(qkv.lora_B["default"].weight, expected_b)
    assert root.model.layers[0].mlp.gate_up_proj.lora_B["default"].weight.shape == (42, 4)
    assert root.model.layers[0].mlp.down_proj.lora_A["default"].weight.shape == (4, 21)
    with torch.no_grad():
        shrunk = model(tokens).logits
        merged = model.merge_and_unload()(tokens).logits
    torch.testing.assert_close(shrunk, masked, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged, masked, rtol=0, atol=1e-5)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. Question: how many apples are there? " * 30)
    return path


@pytest.mark.parametrize("arch", NEW_ARCHITECTURES)
@pytest.mark.parametrize("method", ["loraprune", "taylor"])
def test_prune_model_runs_the_lora_guided_and_taylor_criteria(arch, method, tiny_tokenizer, text_file, tmp_path):
    model_dir = tmp_path / arch
    tiny_model(arch, heads=4, kv_heads=2, hidden=32, intermediate=32, vocab=len(tiny_tokenizer)).save_pretrained(
        model_dir
    )
    tiny_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    steps = ["--steps", "4", "--prune-every", "2"] if method == "loraprune" else []
    args = ["prune-model", "--model", str(model_dir), "--output", str(out), "--method", method, "--sparsity", "0.3"]
    extra = ["--calibration-data", str(text_file), "--calibration-samples", "2", "--seq-len", "16"]
    assert main([*args, *extra, "--batch-size", "2", *steps]) == 0
    report = json.loads((out / "loraprune_report.json").read_text())
    assert report["sparsity_decoder"] == pytest.approx(0.3, abs=0.05)
    pruned, _ = load_model(str(out))
    assert pruned.config.model_type.removeprefix("loraprune_") == arch
    assert sum(p.numel() for p in pruned.parameters()) == report["params_after"]


def test_inspect_help_lists_the_supported_model_types(capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert supported_model_types() == ["gemma2", "gemma3_text", "llama", "mistral", "phi3", "qwen2", "qwen3"]
    assert "Supported model types: " + ", ".join(supported_model_types()) in text
