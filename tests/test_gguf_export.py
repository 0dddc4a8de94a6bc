"""GGUF export: every tensor and every per-layer width read back through gguf's reader, and llama.cpp itself."""

from __future__ import annotations

import math
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters

from loraprune.cli import main
from loraprune.errors import LoraPruneError
from loraprune.evaluation import evaluate_perplexity
from loraprune.export import export_gguf
from loraprune.export.llamacpp import llama_perplexity
from loraprune.io import save_pruned_model
from loraprune.models import load_model
from loraprune.shrink import shrink_model
from loraprune.structure import full_masks, get_adapter
from tiny_models import tiny_model

VOCAB = 320  # the model's; the tokenizer has 300 ids, so 20 ids are gaps
TEXT = "The tower is 324 metres tall, about the same height as an 81-storey building.\n" * 40


@pytest.fixture(scope="module")
def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style) of 300 ids; `<|endoftext|>` is BOS and EOS."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def _pruned(arch: str, per_layer: bool, tie: bool = True, seed: int = 0, **config) -> torch.nn.Module:
    """A tiny random model with heads and channels removed (the same in every layer, or not)."""
    model = tiny_model(arch, heads=4, kv_heads=2, layers=3, hidden=64, intermediate=64, head_dim=16, vocab=VOCAB,
                       tie=tie, seed=seed)  # fmt: skip
    for key, value in config.items():
        setattr(model.config, key, value)
    families = get_adapter(model).families(model, "kv_group")
    masks = full_masks(families)
    for family in families:
        drop = (family.layer if per_layer else 1) % family.count
        if family.kind == "attention":
            masks[family.key][:drop] = False
        else:
            masks[family.key][: 8 * drop + 8] = False  # widths 56, 48, 40 (per layer) or 48
    shrink_model(model, families, masks)
    return model


def _save(model, tokenizer, path: Path) -> Path:
    save_pruned_model(model, tokenizer, path)
    return path


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def _tensor(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    """A GGUF tensor as float32 in PyTorch's [out, in] layout, de-quantised."""
    tensor = next(t for t in reader.tensors if t.name == name)
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(values, dtype=np.float32).reshape(tuple(int(n) for n in reversed(tensor.shape)))


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of the export's RoPE row permutation (pairs back to halves)."""
    d = weight.shape[0] // heads
    return weight.reshape(heads, d // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(name: str) -> str:
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    _, _, layer, rest = name.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_NAMES[module]}.{suffix}"


def _check_round_trip(model, reader: gguf.GGUFReader, arch: str, permuted: bool, atol: float = 0.0) -> None:
    """Every tensor of `model` is in the file with its shape and values; every width is in the keys."""
    sizes = get_adapter(model).layer_sizes(model)
    assert _field(reader, "general.architecture") == arch
    per_layer = arch == "deci"
    for key, attribute in (
        ("attention.head_count", "num_attention_heads"),
        ("attention.head_count_kv", "num_key_value_heads"),
        ("feed_forward_length", "intermediate_size"),
    ):
        values = [getattr(s, attribute) for s in sizes]
        field = reader.fields[f"{arch}.{key}"]
        if per_layer:
            assert field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
            assert field.contents() == values
        else:
            assert field.contents() == values[0]
    assert _field(reader, f"{arch}.block_count") == len(sizes)
    assert _field(reader, f"{arch}.attention.key_length") == model.config.head_dim
    assert _field(reader, f"{arch}.embedding_length") == model.config.hidden_size
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == VOCAB
    state = model.state_dict()
    tied = model.config.tie_word_embeddings
    expected = {_gguf_name(n) for n in state if not (tied and n == "lm_head.weight") and "rotary" not in n}
    assert {t.name for t in reader.tensors} - {"rope_freqs.weight"} == expected
    for name, value in state.items():
        if tied and name == "lm_head.weight":
            continue
        data = _tensor(reader, _gguf_name(name))
        assert data.shape == tuple(value.shape), name
        if permuted and (".q_proj." in name or ".k_proj." in name):
            layer = sizes[int(name.split(".")[2])]
            heads = layer.num_attention_heads if ".q_proj." in name else layer.num_key_value_heads
            data = _unpermute(data, heads)
        np.testing.assert_allclose(data, value.numpy(), atol=atol, rtol=0, err_msg=name)


@pytest.mark.parametrize(
    "arch,per_layer,expected,permuted",
    [
        ("llama", False, "llama", True),
        ("llama", True, "deci", True),
        ("qwen2", False, "qwen2", False),
        ("qwen2", True, "deci", True),
        ("mistral", True, "deci", True),
    ],
)
def test_round_trip_through_gguf_reader(byte_tokenizer, tmp_path, arch, per_layer, expected, permuted):
    model = _pruned(arch, per_layer, tie=arch != "qwen2")
    path = _save(model, byte_tokenizer, tmp_path / "model")
    result = export_gguf(path, tmp_path / "m.gguf", outtype="f32", tokenizer_pre="gpt-2", progress=False)
    assert result.architecture == expected and result.per_layer == per_layer
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    _check_round_trip(model, reader, expected, permuted)
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32
    if arch == "qwen2":
        assert any(t.name == "blk.0.attn_q.bias" for t in reader.tensors)
        assert any(t.name == "output.weight" for t in reader.tensors)  # untied head


def test_q8_0_quantises_rows_that_fill_its_blocks_and_keeps_the_others_f16(byte_tokenizer, tmp_path):
    model = _pruned("llama", per_layer=True)
    path = _save(model, byte_tokenizer, tmp_path / "model")
    result = export_gguf(path, tmp_path / "q8.gguf", outtype="q8_0", tokenizer_pre="gpt-2", progress=False)
    reader = gguf.GGUFReader(tmp_path / "q8.gguf")
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0  # rows of 64
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16  # rows of 56: not a multiple of 32
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert "blk.0.ffn_down.weight" in result.fallbacks and "--round-to 32" in str(result)
    _check_round_trip(model, reader, "deci", permuted=True, atol=0.02)


def test_llama3_rope_scaling_becomes_llama_cpp_frequency_factors(byte_tokenizer, tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # fmt: skip
    model = _pruned("llama", per_layer=True, rope_parameters=rope)
    path = _save(model, byte_tokenizer, tmp_path / "model")
    export_gguf(path, tmp_path / "m.gguf", outtype="f32", tokenizer_pre="gpt-2", progress=False)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    # transformers' own Llama-3 frequencies, divided into the unscaled ones, are llama.cpp's factors
    config = model.config
    config.rope_parameters = RopeParameters(**rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 16, 2, dtype=torch.float) / 16))
    np.testing.assert_allclose(_tensor(reader, "rope_freqs.weight"), (plain / scaled).numpy(), rtol=1e-5)
    assert _field(reader, "deci.rope.freq_base") == pytest.approx(500000.0)


def test_what_the_export_cannot_represent_is_refused_with_one_line(byte_tokenizer, tmp_path, capsys):
    path = _save(_pruned("llama", per_layer=True), byte_tokenizer, tmp_path / "model")
    with pytest.raises(LoraPruneError, match=r"pre-tokenizer .* is not known here"):
        export_gguf(path, tmp_path / "m.gguf", progress=False)
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m.gguf.*"))  # nothing half-written
    yarn = _save(_pruned("llama", True, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
                 byte_tokenizer, tmp_path / "yarn")  # fmt: skip
    with pytest.raises(LoraPruneError, match="RoPE scaling 'yarn' is not exported"):
        export_gguf(yarn, tmp_path / "m.gguf", tokenizer_pre="gpt-2", progress=False)
    (tmp_path / "exists.gguf").write_bytes(b"")
    capsys.readouterr()  # the saving's progress bars
    assert main(["export", "gguf", str(path), str(tmp_path / "exists.gguf"), "--tokenizer-pre", "gpt-2"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"loraprune export: error: {tmp_path / 'exists.gguf'} already exists; pass --overwrite to replace it"
    )
    assert main(["export", "gguf", str(tmp_path), str(tmp_path / "x.gguf")]) == 2
    assert "is not a saved model directory (no config.json)" in capsys.readouterr().err
    config = (path / "config.json").read_text()
    (path / "config.json").write_text(config.replace('"loraprune_llama"', '"phi3"'))
    with pytest.raises(LoraPruneError, match=r"supports model types llama, mistral, qwen2; .* is 'phi3'"):
        export_gguf(path, tmp_path / "m.gguf", progress=False)


def test_cli_writes_the_file_and_says_what_it_wrote(byte_tokenizer, tmp_path, capsys):
    path = _save(_pruned("llama", per_layer=True), byte_tokenizer, tmp_path / "model")
    out = tmp_path / "m.gguf"
    argv = ["export", "gguf", str(path), str(out), "--outtype", "f16", "--tokenizer-pre", "gpt-2", "--no-progress"]
    assert main(argv) == 0
    assert "llama.cpp architecture 'deci' (per-layer widths), 3 layers" in capsys.readouterr().out
    types = {t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types == {gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32}


LLAMA_CPP_DIR = os.environ.get("LLAMA_CPP_DIR")


@pytest.mark.skipif(not LLAMA_CPP_DIR, reason="set LLAMA_CPP_DIR to a llama.cpp build (its bin/ folder or above)")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_computes_the_perplexity_transformers_computes(byte_tokenizer, tmp_path, arch):
    model = _pruned(arch, per_layer=True, tie=False)
    with torch.no_grad():  # larger weights: a wrong head layout would change the logits visibly
        for param in model.parameters():
            param.mul_(4 if param.ndim == 2 else 1)
    path = _save(model, byte_tokenizer, tmp_path / "model")
    export_gguf(path, tmp_path / "m.gguf", outtype="f32", tokenizer_pre="gpt-2", progress=False)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    llama_cpp = llama_perplexity(LLAMA_CPP_DIR, tmp_path / "m.gguf", text, ctx=32, chunks=8)
    hf, tokenizer = load_model(str(path))
    ours = evaluate_perplexity(hf, tokenizer, str(text), seq_len=32, max_tokens=8 * 32, protocol="llama.cpp",
                               progress=False)  # fmt: skip
    assert math.isfinite(ours.perplexity) and ours.perplexity > 2
    assert llama_cpp == pytest.approx(ours.perplexity, rel=1e-3)


@pytest.mark.slow
def test_dense_default_model_matches_the_gguf_llama_cpp_converted(default_model_dir, tmp_path):
    """The embedded SmolLM2 GGUF was written by llama.cpp's converter; the dense model is its de-quantised
    weights, so our export must give the same keys, tokenizer and (de-quantised) tensor values."""
    from loraprune.models import EMBEDDED_MODELS, _embedded_package_dir

    embedded = EMBEDDED_MODELS["smollm2-135m"]
    original = gguf.GGUFReader(_embedded_package_dir(embedded) / embedded.gguf_file)
    export_gguf(default_model_dir, tmp_path / "dense.gguf", outtype="f32", progress=False)
    ours = gguf.GGUFReader(tmp_path / "dense.gguf")
    general = ("general.name", "general.file_type", "GGUF.kv_count")  # the converter's own naming and type
    shared = [key for key in original.fields if key in ours.fields and key not in general]
    assert len(shared) >= 20
    for key in shared:
        assert original.fields[key].contents() == ours.fields[key].contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in original.tensors]
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.7.attn_k.weight", "blk.29.ffn_down.weight"):
        np.testing.assert_array_equal(_tensor(ours, name), _tensor(original, name), err_msg=name)
