"""`loraprune eval` end to end on a tiny saved model."""

from __future__ import annotations

import json

import pytest
from peft import LoraConfig, get_peft_model

import loraprune.cli.eval_cmd as eval_cmd
from loraprune.cli import main
from loraprune.evaluation import EvalConfig, evaluate_perplexity
from loraprune.models import load_model

TEXT = "He had a guest role in the television series The Bill in 2000 .\n" * 20


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def test_eval_prints_and_writes_the_perplexity_with_its_settings(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "result.json"
    code = main(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(text_file),
            "--seq-len",
            "16",
            "--max-tokens",
            "200",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--no-progress",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    model, tokenizer = load_model(str(tiny_model_dir))
    expected = evaluate_perplexity(model, tokenizer, str(text_file), seq_len=16, max_tokens=200, progress=False)
    assert result["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert {k: result[k] for k in ("seq_len", "tokens", "dtype", "model", "data")} == {
        "seq_len": 16,
        "tokens": 192,
        "dtype": "float32",
        "model": str(tiny_model_dir),
        "data": str(text_file),
    }
    printed = capsys.readouterr().out
    assert f"perplexity {result['perplexity']:.4f}" in printed and "192 tokens" in printed
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_eval_applies_an_adapter(tiny_model_dir, tiny_llama, tiny_tokenizer, text_file, tmp_path):
    peft_model = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "adapted.json"
    argv = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--adapter",
        str(tmp_path / "adapter"),
        "--data",
        str(text_file),
        "--seq-len",
        "32",
        "--no-progress",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    expected = evaluate_perplexity(peft_model, tiny_tokenizer, str(text_file), seq_len=32, progress=False)
    assert result["adapter"] == str(tmp_path / "adapter")
    assert result["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)


def test_missing_output_directory_fails_before_loading(monkeypatch, tiny_model_dir, text_file, tmp_path, capsys):
    monkeypatch.setattr(eval_cmd, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    code = main(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(text_file),
            "--json",
            str(tmp_path / "missing" / "out.json"),
        ]
    )
    assert code == 2
    assert "directory" in capsys.readouterr().err and not (tmp_path / "missing").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--seq-len", "1"], "seq_len must be at least 2"),
        (["--seq-len", "64", "--max-tokens", "10"], "max_tokens"),
        (["--batch-size", "0"], "batch_size"),
    ],
)
def test_invalid_settings_are_user_errors(monkeypatch, argv, message, capsys):
    monkeypatch.setattr(eval_cmd, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["eval", *argv]) == 2
    assert message in capsys.readouterr().err


def test_unknown_model_is_a_user_error(capsys):
    assert main(["eval", "--model", "not-a-model"]) == 2
    assert "neither a directory" in capsys.readouterr().err


def test_config_defaults_follow_the_protocol():
    config = EvalConfig()
    assert (config.data, config.split, config.seq_len, config.dtype) == ("wikitext2", "test", 128, "float32")
