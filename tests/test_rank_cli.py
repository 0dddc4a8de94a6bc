"""`loraprune prune-adapter` and the baselines through the same harness, on a tiny model and real GSM8K rows."""

import json

import pytest
import torch

from loraprune.cli import main
from loraprune.models import load_model
from loraprune.rank_pruning.config import RankPruningConfig
from loraprune.rank_pruning.run import create_adapter


def run_cli(tiny_model_dir, data_dir, output, *extra):
    return main(
        [
            "prune-adapter",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(data_dir / "gsm8k" / "train.jsonl"),
            "--train-limit",
            "8",
            "--max-answer-tokens",
            "24",
            "--r0",
            "8",
            "--rank",
            "2",
            "--steps",
            "6",
            "--batch-size",
            "2",
            "--prune-every",
            "2",
            "--logging-steps",
            "100",
            "--output",
            str(output),
            *extra,
        ]
    )


def test_cli_prunes_saves_and_the_adapter_loads(tiny_model_dir, data_dir, tmp_path, capsys):
    output = tmp_path / "adapter"
    assert run_cli(tiny_model_dir, data_dir, output) == 0
    printed = capsys.readouterr().out
    assert "total rank 28" in printed and "q_proj" in printed  # 2 layers x 7 modules at rank 2
    ranks = json.loads((output / "pruned_ranks.json").read_text())["ranks"]
    assert set(ranks.values()) == {2} and len(ranks) == 14
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    model, _ = load_model(str(tiny_model_dir), adapter=str(output))
    assert model.peft_config["default"].rank_pattern == ranks
    # the output exists now: a second run without --overwrite fails before training
    assert run_cli(tiny_model_dir, data_dir, output) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("method,total_rank", [("lora", 28), ("lora-r0", 112), ("adalora", None)])
def test_baselines_run_through_the_same_command(tiny_model_dir, data_dir, tmp_path, method, total_rank):
    output = tmp_path / method
    assert run_cli(tiny_model_dir, data_dir, output, "--method", method) == 0
    ranks = json.loads((output / "pruned_ranks.json").read_text())["ranks"]
    if total_rank is not None:
        assert sum(ranks.values()) == total_rank
    else:  # AdaLoRA reaches its budget (an average rank of 2) by its own schedule
        assert sum(ranks.values()) <= 2 * len(ranks)
    assert (output / "adapter_model.safetensors").is_file()


def test_all_methods_share_the_training_scaling(tiny_llama):
    config = RankPruningConfig(r0=8, rank=2, alpha=16)
    for method in ("prunedlora", "lora", "lora-r0"):
        model, _ = create_adapter(build_copy(tiny_llama), method, config, total_steps=10)
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.scaling["default"] == pytest.approx(2.0)
    model, callbacks = create_adapter(build_copy(tiny_llama), "adalora", config, total_steps=10)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] / layer.ranknum["default"].item() == pytest.approx(2.0)
    assert len(callbacks) == 1


def build_copy(model):
    clone = type(model)(model.config)
    clone.load_state_dict(model.state_dict())
    return clone.to(torch.float32)


@pytest.mark.slow
def test_default_model_adapter_names_the_cached_base_and_loads_with_stock_peft(data_dir, tmp_path):
    """End to end on SmolLM2-135M: the saved adapter's base path loads as it stands, and stock PEFT
    (no loraprune) reproduces the masked training adapter's logits.

    Compared in float64: in float32 this 30-layer model's logits already move by ~4e-4 between two
    thread counts or batch shapes, so only float64 can show the adapters compute the same function.
    """
    import subprocess
    import sys

    from loraprune.models import resolve_model_path
    from loraprune.rank_pruning.entry import prune_adapter
    from loraprune.rank_pruning.run import AdapterRunConfig
    from loraprune.training import TrainingConfig
    from test_rank_export import STOCK_LOADER

    output = tmp_path / "adapter"
    run, exported = prune_adapter(
        AdapterRunConfig(
            data=str(data_dir / "gsm8k" / "train.jsonl"), output=str(output), train_limit=2, max_answer_tokens=16
        ),
        RankPruningConfig(r0=8, rank=2, schedule="global", prune_every=1, warmup=0.0, cooldown=0.0),
        TrainingConfig(steps=2, batch_size=1, learning_rate=1e-2),
    )
    assert sum(exported.ranks.values()) == 2 * len(run.ranks)
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == resolve_model_path("smollm2-135m")
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    torch.save(ids, tmp_path / "ids.pt")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            STOCK_LOADER,
            str(output),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "logits.pt"),
            "float64",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = run.model.double()(ids).logits
    assert (torch.load(tmp_path / "logits.pt") - expected).abs().max().item() <= 1e-9


def test_default_is_the_singular_basis_and_the_paper_preset_restores_the_published_score(
    tiny_model_dir, data_dir, tmp_path, monkeypatch
):
    import loraprune.cli.prune_adapter_cmd as command

    seen = {}

    def spy(run_config, pruning, training):
        seen["pruning"] = pruning
        raise SystemExit(0)

    monkeypatch.setattr(command, "prune_adapter", spy)  # where the command looks it up
    with pytest.raises(SystemExit):
        run_cli(tiny_model_dir, data_dir, tmp_path / "a")
    assert (seen["pruning"].basis, seen["pruning"].criterion) == ("singular", "magnitude")
    (tmp_path / "run.yaml").write_text("cooldown: 0.3\nprune_every: 3\n")
    with pytest.raises(SystemExit):
        run_cli(tiny_model_dir, data_dir, tmp_path / "b", "--preset", "paper", "--config", str(tmp_path / "run.yaml"))
    pruning = seen["pruning"]
    assert (pruning.basis, pruning.criterion, pruning.compensate) == ("components", "obs", "auto")
    assert pruning.cooldown == 0.3 and pruning.prune_every == 2  # the file wins over the preset, the flag over both
    with pytest.raises(SystemExit):
        run_cli(tiny_model_dir, data_dir, tmp_path / "c", "--preset", "paper", "--basis", "singular")
    assert (seen["pruning"].basis, seen["pruning"].criterion) == ("singular", "obs")
    with pytest.raises(SystemExit) as unknown:
        main(["prune-adapter", "--preset", "papers", "--output", str(tmp_path / "d")])
    assert unknown.value.code == 2
