"""Saving pruned models: stock config when uniform, per-layer config + remote code otherwise; atomic writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

import loraprune  # noqa: F401  (registers the per-layer-width classes)
from loraprune.io import OutputExistsError, atomic_directory, save_pruned_model, write_json
from loraprune.shrink import shrink_model
from loraprune.structure import full_masks, get_adapter
from tiny_models import ARCHITECTURES, tiny_model, token_batch

# Runs in a fresh interpreter in which `import loraprune` fails, as on a machine without it.
LOAD_WITHOUT_LORAPRUNE = textwrap.dedent(
    """
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "loraprune":
                raise ImportError("loraprune is blocked in this test")
    sys.meta_path.insert(0, Block())
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(
        sys.argv[1], trust_remote_code=sys.argv[2] == "1", attn_implementation="eager"
    ).eval()
    tokens = torch.load(sys.argv[3])
    with torch.no_grad():
        torch.save(model(tokens).logits, sys.argv[4])
    try:
        import loraprune
    except ImportError:
        print("loraprune not importable")
    """
)


def _prune(model, unit: str, per_layer: list[int]):
    """Drop the first `per_layer[i]` MLP channels of layer i and the first KV group of layer 0."""
    families = get_adapter(model).families(model, unit)
    masks = full_masks(families)
    masks["layers.0.attention"][0] = False
    for layer, n in enumerate(per_layer):
        masks[f"layers.{layer}.mlp"][:n] = False
    shrink_model(model, families, masks)
    return model


def _logits_without_loraprune(tmp_path, model_dir, tokens, trust_remote_code: bool) -> torch.Tensor:
    torch.save(tokens, tmp_path / "tokens.pt")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_WITHOUT_LORAPRUNE,
            str(model_dir),
            "1" if trust_remote_code else "0",
            str(tmp_path / "tokens.pt"),
            str(tmp_path / "logits.pt"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loraprune not importable" in result.stdout
    return torch.load(tmp_path / "logits.pt")


def test_uniform_model_saves_stock_config_and_loads_without_loraprune(tmp_path):
    model = tiny_model("llama", heads=6, kv_heads=3, layers=2, tie=True)
    families = get_adapter(model).families(model, "kv_group")
    masks = full_masks(families)
    for family in families:
        masks[family.key][1] = False
    shrink_model(model, families, masks)
    assert save_pruned_model(model, None, tmp_path / "out") is True
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config and "layer_sizes" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert not (tmp_path / "out" / "modeling_loraprune.py").exists()
    tokens = token_batch()
    with torch.no_grad():
        expected = model(tokens).logits
    loaded = _logits_without_loraprune(tmp_path, tmp_path / "out", tokens, trust_remote_code=False)
    assert torch.equal(loaded, expected)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_per_layer_model_loads_with_loraprune_and_with_remote_code(tmp_path, arch):
    model = _prune(tiny_model(arch, heads=6, kv_heads=3, layers=3), "kv_group", [0, 5, 11])
    assert save_pruned_model(model, None, tmp_path / "out") is False
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == f"loraprune_{arch}"
    assert [s["intermediate_size"] for s in config["layer_sizes"]] == [24, 19, 13]
    assert [s["num_key_value_heads"] for s in config["layer_sizes"]] == [2, 3, 3]
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_loraprune.")
    tokens = token_batch()
    with torch.no_grad():
        expected = model(tokens).logits
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
        assert torch.equal(reloaded(tokens).logits, expected)
    remote = _logits_without_loraprune(tmp_path, tmp_path / "out", tokens, trust_remote_code=True)
    assert torch.equal(remote, expected)


def test_uniform_llama_with_indivisible_head_count_falls_back_to_per_layer_config(tmp_path):
    model = tiny_model("llama", heads=6, kv_heads=6, layers=2)  # MHA: 48 / 5 heads is not an integer
    families = get_adapter(model).families(model, "head")
    masks = full_masks(families)
    for layer in range(2):
        masks[f"layers.{layer}.attention"][2] = False
    shrink_model(model, families, masks)
    assert save_pruned_model(model, None, tmp_path / "out") is False
    tokens = token_batch()
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
        assert torch.equal(reloaded(tokens).logits, model(tokens).logits)


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    model = tiny_model("llama", layers=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_pruned_model(model, None, out)
    assert (out / "keep.txt").read_text() == "mine"
    save_pruned_model(model, None, out, overwrite=True, extra_json={"loraprune_report.json": {"a": 1}})
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert json.loads((out / "loraprune_report.json").read_text()) == {"a": 1}


def test_failed_write_leaves_no_output_and_no_staging(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(out) as staging:
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed halfway")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_previous_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(out, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
        raise RuntimeError("failed")
    assert (out / "old.txt").read_text() == "old" and not (out / "new.txt").exists()


def test_outputs_get_the_permissions_of_the_umask_not_of_temp_files(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as staging:
            write_json(staging / "report.json", {"a": 1})
            private = staging / "weights.bin"  # as a writer going through its own temp file leaves it
            private.write_bytes(b"0")
            private.chmod(0o600)
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755  # mkdtemp alone would give 0700
    assert (tmp_path / "out" / "report.json").stat().st_mode & 0o777 == 0o644  # mkstemp alone: 0600
    assert (tmp_path / "out" / "weights.bin").stat().st_mode & 0o777 == 0o644
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == {"a": 1}
