"""Perplexity equals exp of the mean next-token NLL over non-overlapping windows, computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from loraprune.errors import LoraPruneError
from loraprune.evaluation import evaluate_perplexity, perplexity_of_windows

TEXT = "Robert Boulter is an English film , television and theatre actor . He had a guest role in 2000 .\n" * 12

# Measured with this code on the cached default model (fp32), first 2,048 tokens of wiki.test.raw,
# windows of 128; the design's references are 51.92 (16,384 tokens) and 53.96 (32,768 tokens).
DEFAULT_MODEL_PPL_2048 = 52.1374


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def _reference_nll(model, tokenizer, text, seq_len, max_tokens=None):
    """Mean NLL by hand: each window alone, log-softmax, pick the next token, average over all of them."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    nlls = []
    with torch.no_grad():
        for start in range(0, len(ids) - seq_len + 1, seq_len):
            window = torch.tensor([ids[start : start + seq_len]])
            log_probs = torch.log_softmax(model(input_ids=window).logits[0].double(), dim=-1)
            nlls += [-log_probs[i, window[0, i + 1]].item() for i in range(seq_len - 1)]
    return sum(nlls) / len(nlls), len(nlls)


@pytest.mark.parametrize("seq_len,max_tokens", [(32, None), (17, 100)])
def test_perplexity_equals_a_direct_computation(tiny_llama, tiny_tokenizer, text_file, seq_len, max_tokens):
    result = evaluate_perplexity(
        tiny_llama,
        tiny_tokenizer,
        str(text_file),
        seq_len=seq_len,
        max_tokens=max_tokens,
        batch_size=3,
        model_name="tiny",
        progress=False,
    )
    nll, predicted = _reference_nll(tiny_llama, tiny_tokenizer, TEXT, seq_len, max_tokens)
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-5)
    assert predicted == result.windows * (seq_len - 1)
    assert result.tokens == result.windows * seq_len
    if max_tokens is not None:
        assert result.tokens <= max_tokens
    assert (result.model, result.dtype, result.seq_len, result.data) == ("tiny", "float32", seq_len, str(text_file))
    assert set(result.to_dict()) >= {"perplexity", "seq_len", "tokens", "dtype", "model", "data"}


def test_batch_size_does_not_change_the_result(tiny_llama):
    windows = torch.randint(0, 128, (5, 24), generator=torch.Generator().manual_seed(0))
    one = perplexity_of_windows(tiny_llama, windows, batch_size=1, progress=False)
    five = perplexity_of_windows(tiny_llama, windows, batch_size=5, progress=False)
    assert one == pytest.approx(five, rel=1e-6)


def test_scoring_restores_the_training_mode(tiny_llama):
    tiny_llama.train()
    perplexity_of_windows(tiny_llama, torch.ones(1, 8, dtype=torch.long), progress=False)
    assert tiny_llama.training


def test_peft_model_scores_like_its_merged_model(tiny_llama, tiny_tokenizer, text_file):
    base = evaluate_perplexity(tiny_llama, tiny_tokenizer, str(text_file), seq_len=32, progress=False)
    peft_model = get_peft_model(
        tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    )
    adapted = evaluate_perplexity(peft_model, tiny_tokenizer, str(text_file), seq_len=32, progress=False)
    merged = evaluate_perplexity(
        peft_model.merge_and_unload(), tiny_tokenizer, str(text_file), seq_len=32, progress=False
    )
    assert adapted.perplexity == pytest.approx(merged.perplexity, rel=1e-5)
    assert adapted.perplexity != pytest.approx(base.perplexity, rel=1e-3)


def test_text_shorter_than_one_window_is_an_error(tiny_llama, tiny_tokenizer, text_file):
    with pytest.raises(LoraPruneError, match="fewer tokens than one window"):
        evaluate_perplexity(tiny_llama, tiny_tokenizer, str(text_file), seq_len=100_000, progress=False)
    with pytest.raises(LoraPruneError, match="at least 2"):
        evaluate_perplexity(tiny_llama, tiny_tokenizer, str(text_file), seq_len=1, progress=False)


@pytest.mark.slow
def test_default_model_on_the_first_2048_wikitext2_tokens(default_model_dir, data_dir):
    from loraprune.models import load_model

    model, tokenizer = load_model(str(default_model_dir))
    result = evaluate_perplexity(model, tokenizer, "wikitext2", seq_len=128, max_tokens=2048, progress=False)
    assert (result.windows, result.tokens) == (16, 2048)
    assert result.perplexity == pytest.approx(DEFAULT_MODEL_PPL_2048, rel=0.005)
