"""Cost measurement: FLOPs against hand counts, interleaved repeats, summaries and ratios, fixed
generation length, and `loraprune eval --latency` side by side. No timing assertions: the
machine is shared and noisy, so only the structure of the measurement is tested."""

from __future__ import annotations

import json
import statistics
from itertools import groupby

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import build_tiny_llama
from loraprune.cli import main
from loraprune.errors import ConfigError
from loraprune.evaluation import EvalConfig, LatencyResult, ModelCost, forward_flops, measure_latency
from loraprune.evaluation.latency import model_with_widths
from loraprune.models import load_model
from loraprune.run_report.summary import count_parameters, layer_table

HIDDEN, HEAD_DIM, VOCAB = 64, 16, 128  # the tiny Llama of conftest: 4 query heads, 2 KV heads, 96 channels, 2 layers


pytestmark = pytest.mark.usefixtures("one_thread")


def hand_flops(layers: list[dict[str, int]], seq_len: int, batch: int) -> int:
    """2 * weights * tokens for q,k,v,o, gate/up/down and the (tied) LM head, plus 4 * s^2 * query width per
    layer and sequence for QK^T and softmax * V."""
    weights = VOCAB * HIDDEN
    attention = 0
    for layer in layers:
        q_width, kv_width = layer["heads"] * HEAD_DIM, layer["kv_heads"] * HEAD_DIM
        weights += 2 * HIDDEN * q_width + 2 * HIDDEN * kv_width + 3 * HIDDEN * layer["channels"]
        attention += 4 * seq_len * seq_len * q_width * batch
    return 2 * weights * seq_len * batch + attention


def test_forward_flops_of_the_tiny_llama_by_hand(tiny_llama):
    # per layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 = 12,288; MLP 3 x 64x96 = 18,432; two layers 61,440;
    # LM head 128x64 = 8,192 -> 69,632 weights. 3 sequences of 10 tokens: 2 * 69,632 * 30 = 4,177,920;
    # attention 2 layers * 4 * 10^2 * 64 * 3 = 153,600.
    assert forward_flops(tiny_llama, seq_len=10, batch_size=3) == 4_177_920 + 153_600
    assert hand_flops(layer_table(tiny_llama), 10, 3) == 4_177_920 + 153_600


def test_pruned_model_has_fewer_flops_counted_from_its_own_widths(tiny_model_dir, tmp_path):
    out = tmp_path / "pruned"
    assert main(["prune-model", "--model", str(tiny_model_dir), "--sparsity", "0.3", "--output", str(out)]) == 0
    pruned, _ = load_model(str(out))
    dense, _ = load_model(str(tiny_model_dir))
    widths = layer_table(pruned)
    assert widths != layer_table(dense)
    assert forward_flops(pruned, 32) == hand_flops(widths, 32, 1)
    assert forward_flops(pruned, 32) < forward_flops(dense, 32)
    # rebuilt at the pruned widths from the report alone: same shapes, so the same cost
    rebuilt = model_with_widths(dense, json.loads((out / "loraprune_report.json").read_text())["layers"])
    assert layer_table(rebuilt) == widths
    assert count_parameters(rebuilt) == count_parameters(pruned)
    assert forward_flops(rebuilt, 32) == forward_flops(pruned, 32)


def test_unmerged_lora_layers_count_as_the_linear_layers_they_are(tiny_llama):
    dense = forward_flops(tiny_llama, 8)
    adapted = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["v_proj"]))
    # per layer A: 64 -> 2, B: 2 -> 32 = 192 weights; two layers; 8 tokens
    assert forward_flops(adapted, 8) == dense + 2 * (2 * 192) * 8


def test_summaries_and_ratios_from_hand_numbers():
    dense = ModelCost(
        "dense",
        params=200,
        flops=4000,
        forward_ms=[3.0, 1.0, 2.0, 10.0],
        generation_s=[2.0, 1.0, 4.0],
        generated_tokens=8,
        batch_size=2,
    )
    pruned = ModelCost(
        "pruned",
        params=100,
        flops=1000,
        forward_ms=[5.0, 5.0, 6.0, 4.0],
        generation_s=[1.0],
        generated_tokens=8,
        batch_size=2,
    )
    assert dense.forward_median_ms == 2.5 and dense.forward_iqr_ms == pytest.approx(4.75 - 1.75)
    assert dense.tokens_per_s == 8.0  # 16 tokens in 2, 1, 4 s -> 8, 16, 4 tokens/s
    result = LatencyResult(
        [dense, pruned],
        batch_size=2,
        seq_len=4,
        gen_tokens=8,
        repeats=4,
        warmup=0,
        seed=0,
        device="cpu",
        dtype="float32",
        threads=1,
    )
    assert result.ratios() == {"pruned": {"forward_ms": 2.0, "tokens_per_s": 2.0, "params": 0.5, "flops": 0.25}}
    assert result.to_dict()["reference"] == "dense"
    assert "pruned / dense: forward_ms 2.000, tokens_per_s 2.000, params 0.500, flops 0.250" in str(result)


def test_repeats_are_interleaved_after_warmup_and_summarised_by_the_median(tiny_llama):
    adapted = get_peft_model(build_tiny_llama(seed=1), LoraConfig(r=2, target_modules=["q_proj"])).train()
    models = {"dense": tiny_llama, "adapter": adapted}
    calls: list[str] = []
    for name, model in models.items():
        inner = model.get_base_model() if name == "adapter" else model
        inner.register_forward_pre_hook(lambda *_, n=name: calls.append(n))
    warmup, repeats, gen_tokens = 2, 3, 4
    result = measure_latency(
        models, batch_size=2, seq_len=8, repeats=repeats, warmup=warmup, gen_tokens=gen_tokens, progress=False
    )
    # forward phase then generation phase, each (warmup + repeats) rounds of dense, adapter
    assert [name for name, _ in groupby(calls)] == ["dense", "adapter"] * 2 * (warmup + repeats)
    assert calls.count("dense") == calls.count("adapter") == (warmup + repeats) * (1 + gen_tokens)
    for cost, model in zip(result.models, models.values()):
        assert len(cost.forward_ms) == len(cost.generation_s) == repeats
        assert cost.forward_median_ms == statistics.median(cost.forward_ms)
        assert cost.tokens_per_s == statistics.median(2 * gen_tokens / s for s in cost.generation_s)
        assert cost.params == count_parameters(model) and cost.flops == forward_flops(model, 8, 2)
    dense, adapter = result.models
    assert result.ratios()["adapter"]["forward_ms"] == adapter.forward_median_ms / dense.forward_median_ms
    assert result.ratios()["adapter"]["params"] == adapter.params / dense.params > 1
    assert not tiny_llama.training and adapted.training  # measured in eval mode, then put back as they were


def test_generation_length_is_fixed_even_when_every_other_token_is_eos(tiny_llama):
    tiny_llama.generation_config.eos_token_id = [t for t in range(VOCAB) if t != 5]
    prompt = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    stopped = tiny_llama.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert stopped.shape[1] - 8 < 6  # left alone, greedy decoding stops at an EOS
    result = measure_latency({"m": tiny_llama}, seq_len=8, repeats=1, warmup=0, gen_tokens=6, progress=False)
    assert result.models[0].generated_tokens == 6  # measure_latency raises if a generation came out shorter
    no_generation = measure_latency({"m": tiny_llama}, seq_len=8, repeats=2, warmup=0, gen_tokens=0, progress=False)
    assert no_generation.models[0].tokens_per_s is None and no_generation.models[0].generation_s == []


def test_eval_latency_puts_the_baseline_first_so_ratios_read_pruned_over_dense(tiny_model_dir, tmp_path, capsys):
    pruned_dir, out = tmp_path / "pruned", tmp_path / "cost.json"
    assert main(["prune-model", "--model", str(tiny_model_dir), "--sparsity", "0.3", "--output", str(pruned_dir)]) == 0
    assert (
        main(
            [
                "eval",
                "--model",
                str(pruned_dir),
                "--latency",
                "--baseline",
                str(tiny_model_dir),
                "--latency-batch",
                "2",
                "--latency-seq-len",
                "16",
                "--gen-tokens",
                "3",
                "--repeats",
                "2",
                "--warmup",
                "1",
                "--device",
                "cpu",
                "--no-progress",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert "perplexity" not in report  # --latency alone: no perplexity unless --data is given
    latency = report["latency"]
    assert [m["name"] for m in latency["models"]] == [str(tiny_model_dir), str(pruned_dir)]
    assert (latency["batch_size"], latency["seq_len"], latency["gen_tokens"], latency["repeats"]) == (2, 16, 3, 2)
    dense, pruned = latency["models"]
    ratios = latency["ratios"][str(pruned_dir)]
    assert ratios["params"] == pruned["params"] / dense["params"] < 1
    assert ratios["flops"] == pruned["flops"] / dense["flops"] < 1
    assert ratios["forward_ms"] == pruned["forward_median_ms"] / dense["forward_median_ms"]
    assert f"{pruned_dir} / {tiny_model_dir}: forward_ms" in capsys.readouterr().out


def test_latency_settings_are_validated():
    assert EvalConfig().data == "wikitext2" and EvalConfig().perplexity
    assert EvalConfig(latency=True).data == "none" and not EvalConfig(latency=True).perplexity
    assert EvalConfig(latency=True, data="ptb").perplexity
    with pytest.raises(ConfigError, match="--baseline"):
        EvalConfig(baseline="x")
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        EvalConfig(data="none")
    with pytest.raises(ConfigError, match="repeats"):
        EvalConfig(latency=True, repeats=0)
    with pytest.raises(ConfigError, match="gen_tokens"):
        EvalConfig(latency=True, gen_tokens=-1)
