"""The exported rank-pruned adapter is a physically small standard PEFT adapter: stock PEFT loads it."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from loraprune.errors import LoraPruneError
from loraprune.lora import add_lora
from loraprune.rank_pruning.config import RankPruningConfig
from loraprune.rank_pruning.export import ADAPTER_WEIGHTS, export_pruned_adapter
from loraprune.rank_pruning.pruner import RankPruner
from tiny_models import tiny_model, token_batch

# Runs in a fresh interpreter where `import loraprune` fails: only torch, transformers and peft.
STOCK_LOADER = textwrap.dedent("""
    import json, sys
    class NoLoraprune:
        def find_spec(self, name, path=None, target=None):
            if name == "loraprune" or name.startswith("loraprune."):
                raise ModuleNotFoundError("loraprune is blocked in this process")
    sys.meta_path.insert(0, NoLoraprune())
    try:
        import loraprune
        raise SystemExit("loraprune must not be importable here")
    except ModuleNotFoundError:
        pass
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    adapter_dir, ids_file, out_file = sys.argv[1:4]
    dtype = getattr(torch, sys.argv[4]) if len(sys.argv) > 4 else torch.float32
    base_path = json.load(open(adapter_dir + "/adapter_config.json"))["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        torch.save(model(torch.load(ids_file)).logits, out_file)
""")


def trained_pruned_adapter(base_dir=None, r0=8, rank=3):
    """A tiny LoRA adapter (scaling 2) with random weights, pruned once (OBS update) to varied ranks.

    The base model is saved to `base_dir` first when given.
    """
    base = tiny_model(seed=0)
    if base_dir is not None:
        base.save_pretrained(base_dir)
    torch.manual_seed(0)
    model = add_lora(base, r0, alpha=2 * r0)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data.normal_(0, 0.2)
    config = RankPruningConfig(
        r0=r0, rank=rank, alpha=2 * r0, schedule="global", prune_every=1, warmup=0.0, cooldown=0.0
    )
    pruner = RankPruner(model, config, total_steps=1)
    ids = token_batch(batch=3, length=10)
    model(input_ids=ids, labels=ids).loss.backward()
    pruner.observe_gradients()
    pruner.step(1)
    pruner.masks.prune(0, pruner.masks.active_indices(0))  # force one module to rank 0
    return model, pruner


def test_stock_peft_loads_the_shrunk_adapter_with_identical_logits(tmp_path):
    base_dir = tmp_path / "base"
    model, pruner = trained_pruned_adapter(base_dir)
    exported = export_pruned_adapter(
        model, pruner.active_components(), tmp_path / "adapter", base_model_name_or_path=str(base_dir)
    )
    ranks = pruner.ranks()
    assert pruner.modules[0].name in exported.dropped
    assert exported.dropped == [name for name, rank in ranks.items() if rank == 0]
    assert exported.ranks == {name: rank for name, rank in ranks.items() if rank > 0}
    assert len(set(exported.ranks.values())) > 1

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    for name, rank in exported.ranks.items():
        assert config["rank_pattern"][name] == rank
        assert config["alpha_pattern"][name] / rank == pytest.approx(2.0, rel=1e-15)  # training scaling
    assert pruner.modules[0].name not in config["target_modules"]
    with safe_open(tmp_path / "adapter" / ADAPTER_WEIGHTS, "pt") as weights:
        shapes = {key: weights.get_slice(key).get_shape() for key in weights.keys()}  # noqa: SIM118
    for name, rank in exported.ranks.items():
        assert shapes[f"base_model.model.{name}.lora_A.weight"][0] == rank
        assert shapes[f"base_model.model.{name}.lora_B.weight"][1] == rank
    assert not any(pruner.modules[0].name in key for key in shapes)
    assert exported.parameters == sum(a * b for a, b in shapes.values())

    ids = token_batch(batch=2, length=9, seed=5)
    with torch.no_grad():
        expected = model(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            STOCK_LOADER,
            str(tmp_path / "adapter"),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "logits.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(tmp_path / "logits.pt")
    assert (loaded - expected).abs().max().item() <= 1e-5
    # and the adapter is not a no-op: the masked adapter differs from the base model
    with torch.no_grad(), model.disable_adapter():
        assert (model(ids).logits - expected).abs().max().item() > 1e-3


def test_export_refuses_an_adapter_pruned_to_nothing(tmp_path):
    model, pruner = trained_pruned_adapter()
    for index in range(len(pruner.modules)):
        pruner.masks.prune(index, pruner.masks.active_indices(index))
    with pytest.raises(LoraPruneError, match="rank 0"):
        export_pruned_adapter(model, pruner.active_components(), tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
