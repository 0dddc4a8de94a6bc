"""The llama.cpp perplexity protocol: llama-perplexity's windows, BOS handling and second-half scoring."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import processors

from loraprune.cli import main
from loraprune.data import adds_bos
from loraprune.errors import LoraPruneError
from loraprune.evaluation import evaluate_perplexity
from loraprune.evaluation.perplexity import llama_cpp_windows

TEXT = "Robert Boulter is an English film , television and theatre actor . He had a guest role in 2000 .\n" * 12


def _with_bos(tokenizer):
    """The same tokenizer, made to put BOS in front of every encoded text (as Llama 3's does)."""
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    return tokenizer


def _by_hand(model, tokenizer, text, seq_len, chunks):
    """llama-perplexity's loop written out: chunk, BOS in front, log-softmax, tokens after n_ctx/2."""
    ids = tokenizer(text.removesuffix("\n"), add_special_tokens=False)["input_ids"]
    if adds_bos(tokenizer):
        ids = [tokenizer.bos_token_id, *ids]
    nlls = []
    with torch.no_grad():
        for chunk in range(min(chunks, len(ids) // seq_len)):
            window = ids[chunk * seq_len : (chunk + 1) * seq_len]
            if adds_bos(tokenizer):
                window[0] = tokenizer.bos_token_id
            logits = model(input_ids=torch.tensor([window])).logits[0].double()
            log_probs = torch.log_softmax(logits, dim=-1)
            nlls += [-log_probs[i, window[i + 1]].item() for i in range(seq_len // 2, seq_len - 1)]
    return sum(nlls) / len(nlls), len(nlls)


@pytest.mark.parametrize("bos", [False, True])
def test_llama_cpp_protocol_equals_llama_perplexity_by_hand(tiny_llama, tiny_tokenizer, tmp_path, bos):
    tokenizer = _with_bos(tiny_tokenizer) if bos else tiny_tokenizer
    assert adds_bos(tokenizer) == bos
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    result = evaluate_perplexity(
        tiny_llama, tokenizer, str(path), seq_len=32, max_tokens=5 * 32, progress=False, protocol="llama.cpp"
    )
    nll, scored = _by_hand(tiny_llama, tokenizer, TEXT, 32, chunks=5)
    assert result.windows == 5 and scored == 5 * 15
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-5)
    assert result.protocol == "llama.cpp" and "second halves scored" in str(result)
    windows = llama_cpp_windows(tokenizer, TEXT, 32)
    assert (windows[:, 0] == tokenizer.bos_token_id).all() == bos


def test_the_protocols_differ_and_bad_ones_are_refused(tiny_llama, tiny_tokenizer, tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    common = {"seq_len": 32, "max_tokens": 128, "progress": False}
    windows = evaluate_perplexity(tiny_llama, tiny_tokenizer, str(path), **common)
    halves = evaluate_perplexity(tiny_llama, tiny_tokenizer, str(path), protocol="llama.cpp", **common)
    assert windows.nll != pytest.approx(halves.nll, rel=1e-3)
    with pytest.raises(LoraPruneError, match="protocol must be one of"):
        evaluate_perplexity(tiny_llama, tiny_tokenizer, str(path), protocol="half", **common)


def test_eval_cli_takes_the_protocol(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    args = ["eval", "--model", str(tiny_model_dir), "--data", str(path), "--seq-len", "32", "--no-progress"]
    assert main([*args, "--protocol", "llama.cpp"]) == 0
    assert "llama.cpp protocol" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "--protocol", "halves"])
