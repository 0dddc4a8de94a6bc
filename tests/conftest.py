"""Shared fixtures: the local data directory, a tiny random Llama with a tiny tokenizer, the real default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_VOCAB = 128
TINY_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2
TINY_TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. Question: how many apples are there? Answer: "
    "there are 12 apples, so the answer is #### 12\n = Robert Boulter = \n He is an English film actor ."
)


@pytest.fixture
def data_dir(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The shared data directory (``$LORAPRUNE_DATA_DIR`` or ``../shared/data`` beside the repo).

    It is also exported as ``LORAPRUNE_DATA_DIR`` for the test, so names like ``wikitext2`` resolve.
    """
    path = Path(os.environ.get("LORAPRUNE_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")
    if not (path / "wikitext2" / "wiki.test.raw").is_file():
        pytest.skip(f"no local data at {path}; set LORAPRUNE_DATA_DIR")
    monkeypatch.setenv("LORAPRUNE_DATA_DIR", str(path))
    return path


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level BPE tokenizer over printable ASCII with a few merges, 128 ids, no padding token.

    Characters outside ASCII map to ``<unk>``; ``<s>``/``</s>`` are BOS/EOS (ids 1/2).
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?\S+|\s"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    alphabet = [chr(code) for code in range(32, 127)] + ["\n"]
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator([TINY_TRAINING_TEXT], trainer=trainer)
    assert tokenizer.get_vocab_size() == TINY_VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build_tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A random fp32 Llama with grouped-query attention (4 query heads on 2 KV heads) and tied
    embeddings like the default model, sized to the tiny tokenizer; in eval mode."""
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=TINY_VOCAB,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return build_tiny_llama()


@pytest.fixture
def tiny_model_dir(tmp_path: Path, tiny_llama: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast) -> Path:
    """`tiny_llama` and `tiny_tokenizer` saved as a Hugging Face directory."""
    path = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The cached safetensors directory of the real default model (converted from GGUF on first use)."""
    from loraprune.errors import LoraPruneError
    from loraprune.models import DEFAULT_MODEL, resolve_model_path

    try:
        return Path(resolve_model_path(DEFAULT_MODEL))
    except LoraPruneError as error:
        pytest.skip(f"default model unavailable: {error}")


@pytest.fixture
def one_thread():
    """Run torch on one thread for the test: tiny models are fastest so, and several threads spin
    against each other on a busy machine (a 2-thread forward of the tiny Llama can take 100x longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
