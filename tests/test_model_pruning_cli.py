"""`loraprune prune-model` with LoRAPrune and the gradient / activation baselines, end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraprune.api import prune_model
from loraprune.cli import main
from loraprune.config import PruneModelConfig
from loraprune.errors import ConfigError
from loraprune.model_pruning import LoRAPruneConfig
from loraprune.model_pruning.presets import apply_preset
from loraprune.models import load_model
from loraprune.semi_structured.config import PruneNMConfig


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. Question: how many apples are there? " * 40)
    return path


def test_loraprune_api_saves_the_shrunk_merged_model(tiny_model_dir, text_file, tmp_path):
    config = PruneModelConfig(
        output=str(tmp_path / "out"),
        model=str(tiny_model_dir),
        method="loraprune",
        sparsity=0.25,
        steps=8,
        calibration_data=str(text_file),
        seq_len=16,
        batch_size=2,
        eval_data=str(text_file),
        eval_seq_len=16,
    )
    result = prune_model(config, LoRAPruneConfig(prune_every=2, cooldown=0.1))
    report = result.report
    assert report["sparsity_decoder"] == pytest.approx(0.25, abs=0.01)
    assert report["training"]["steps"] == 8 and report["training"]["loraprune"]["reached_target"]
    assert [e["step"] for e in report["training"]["loraprune"]["events"]] == [2, 4, 6, 8]  # 10 % of 8 steps: none
    assert report["loraprune_settings"]["prune_every"] == 2
    assert not hasattr(result.model, "peft_config")  # merged
    loaded, _ = load_model(str(result.output))
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, result.model(input_ids=ids).logits)
    assert sum(p.numel() for p in loaded.parameters()) == report["params_after"]


@pytest.mark.parametrize(("method", "steps"), [("taylor", "3"), ("wanda-sp", "0")])
def test_one_shot_baselines_with_and_without_recovery(method, steps, tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / method
    code = main(
        [
            "prune-model",
            "--model",
            str(tiny_model_dir),
            "--output",
            str(out),
            "--method",
            method,
            "--sparsity",
            "0.3",
            "--steps",
            steps,
            "--calibration-data",
            str(text_file),
            "--seq-len",
            "16",
            "--calibration-samples",
            "4",
            "--batch-size",
            "2",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "loraprune_report.json").read_text())
    assert report["method"] == method and report["sparsity_decoder"] == pytest.approx(0.3, abs=0.01)
    if steps == "0":
        assert report["training"] is None and "LoRA training" not in printed
    else:
        assert report["training"]["steps"] == 3 and "LoRA training     3 steps" in printed
    load_model(str(out))


def test_loraprune_needs_steps(tiny_model_dir, tmp_path, capsys):
    code = main(
        [
            "prune-model",
            "--model",
            str(tiny_model_dir),
            "--output",
            str(tmp_path / "x"),
            "--method",
            "loraprune",
            "--sparsity",
            "0.2",
        ]
    )
    assert code == 2
    assert "--steps N" in capsys.readouterr().err


def test_unknown_method_lists_the_methods(tiny_model_dir, tmp_path, capsys):
    code = main(
        [
            "prune-model",
            "--model",
            str(tiny_model_dir),
            "--output",
            str(tmp_path / "x"),
            "--method",
            "lora-guided",
            "--sparsity",
            "0.2",
        ]
    )
    assert code == 2
    assert "loraprune, taylor, activation, wanda-sp, magnitude, random" in capsys.readouterr().err


def test_unmerged_adapter_is_saved_beside_the_shrunk_base(tiny_model_dir, text_file, tmp_path):
    from peft import PeftModel

    from loraprune.evaluation.perplexity import evaluate_perplexity

    config = PruneModelConfig(
        output=str(tmp_path / "out"),
        model=str(tiny_model_dir),
        method="loraprune",
        sparsity=0.25,
        steps=4,
        calibration_data=str(text_file),
        seq_len=16,
        batch_size=2,
        eval_data=str(text_file),
        eval_seq_len=16,
        merge_adapter=False,
    )
    result = prune_model(config, LoRAPruneConfig(prune_every=2, warmup=0.0, cooldown=0.0))
    base, tokenizer = load_model(str(result.output))
    assert sum(p.numel() for p in base.parameters()) == result.report["params_after"]
    tuned = PeftModel.from_pretrained(base, str(result.output / "adapter"))
    after = evaluate_perplexity(tuned, tokenizer, str(text_file), seq_len=16, progress=False)
    assert after.perplexity == pytest.approx(result.report["perplexity_after"]["perplexity"], rel=1e-5)
    ids = torch.arange(3, 19)[None]
    with torch.no_grad(), tuned.disable_adapter():
        without = tuned(input_ids=ids).logits
    with torch.no_grad():  # the LoRA adapter is trained, not a no-op
        assert not torch.allclose(tuned(input_ids=ids).logits, without)


def test_the_documented_loraprune_command_line(tiny_model_dir, text_file, tmp_path):
    """`prune-model --method loraprune --sparsity S --steps N --data FILE --output DIR`, as the README writes it."""
    out = tmp_path / "lp"
    code = main(
        [
            "prune-model",
            "--model",
            str(tiny_model_dir),
            "--method",
            "loraprune",
            "--sparsity",
            "0.25",
            "--steps",
            "4",
            "--prune-every",
            "1",
            "--data",
            str(text_file),
            "--output",
            str(out),
            "--seq-len",
            "16",
            "--batch-size",
            "2",
        ]
    )
    assert code == 0
    report = json.loads((out / "loraprune_report.json").read_text())
    assert report["sparsity_decoder"] == pytest.approx(0.25, abs=0.01)
    assert str(text_file) in json.dumps(report)  # --data is the training text
    load_model(str(out))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"output": ""}, "output directory is required"),
        ({"calibration_samples": 0}, "calibration samples"),
        ({"seq_len": 1}, "sequence lengths"),
        ({"eval_seq_len": 64, "eval_max_tokens": 32}, "at least one window"),
        ({"steps": -1}, "steps must be >= 0"),
        ({"method": "loraprune", "steps": 0}, "give the number of training steps"),
        ({"lora_rank": 0}, "lora-rank and batch-size"),
        ({"learning_rate": 0.0}, "learning-rate must be > 0"),
    ],
)
@pytest.mark.parametrize("config_class", [PruneModelConfig, PruneNMConfig])
def test_prune_model_and_prune_nm_reject_the_same_bad_settings(config_class, settings, message):
    arguments = {"output": "out", "method": "loraprune", "steps": 5, **settings}
    with pytest.raises(ConfigError, match=message):
        config_class(**arguments)


def test_paper_preset_sets_the_published_method_and_overrides_win():
    run, schedule = apply_preset(
        "paper", PruneModelConfig(output="out", method="loraprune", steps=10), LoRAPruneConfig()
    )
    assert (run.allocation, run.layers) == ("uniform", "paper")
    assert (schedule.score, schedule.normalisation, schedule.second_order, schedule.ema_start) == (
        "lora-guided",
        "matrix",
        True,
        "zero",
    )
    assert (schedule.prune_every, schedule.warmup, schedule.cooldown) == (10, 0.1, 0.1)
    run, schedule = apply_preset(
        "paper",
        PruneModelConfig(output="out", method="loraprune", steps=10),
        LoRAPruneConfig(),
        allocation="global",
        warmup=0.2,
    )
    assert run.allocation == "global" and schedule.warmup == 0.2 and schedule.normalisation == "matrix"
    with pytest.raises(ConfigError, match="unknown preset"):
        apply_preset("papers", run, schedule)


def test_cli_preset_is_overridden_by_the_config_file_and_the_flags(tiny_model_dir, text_file, tmp_path, monkeypatch):
    import loraprune.model_pruning.entry as entry

    seen = {}

    def spy(config, schedule):
        seen["run"], seen["schedule"] = config, schedule
        raise SystemExit(0)

    monkeypatch.setattr(entry, "prune_model", spy)  # where the CLI looks it up
    (tmp_path / "run.yaml").write_text("warmup: 0.2\n")
    base = ["prune-model", "--model", str(tiny_model_dir), "--method", "loraprune", "--steps", "4"]
    base += ["--data", str(text_file), "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        main([*base, "--preset", "paper", "--config", str(tmp_path / "run.yaml"), "--allocation", "global"])
    run, schedule = seen["run"], seen["schedule"]
    assert run.allocation == "global" and run.layers == "paper"  # the flag wins, the preset fills the rest
    assert schedule.warmup == 0.2 and schedule.cooldown == 0.1  # the file wins over the preset
    assert (schedule.score, schedule.normalisation, schedule.ema_start) == ("lora-guided", "matrix", "zero")
    (tmp_path / "preset.yaml").write_text("preset: paper\nprune_every: 3\n")
    with pytest.raises(SystemExit):
        main([*base, "--config", str(tmp_path / "preset.yaml")])
    assert seen["schedule"].prune_every == 3 and seen["schedule"].second_order and seen["run"].allocation == "uniform"
    with pytest.raises(SystemExit):
        main(base)
    assert seen["schedule"].score == "activation" and seen["run"].allocation == "global"  # no preset: the defaults
