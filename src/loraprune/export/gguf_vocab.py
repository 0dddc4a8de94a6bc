"""The tokenizer of a saved model as llama.cpp reads it from a GGUF file (byte-level BPE).

llama.cpp tokenises with its own implementation, so the file must say which pre-tokenizer
(the regular expressions that split text before BPE) the model uses: `tokenizer.ggml.pre`
names one that llama.cpp implements. Like llama.cpp's converter, we recognise it by the
token ids the Hugging Face tokenizer gives for a fixed check text (their SHA-256); the check
text and the hashes below are llama.cpp's (convert_hf_to_gguf), so a name found here is the
one llama.cpp's converter would write. Merges, special token ids and the chat template come
from `gguf.SpecialVocab`, the converter's own reader.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

import gguf
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from loraprune.data import adds_bos
from loraprune.errors import LoraPruneError

# llama.cpp's pre-tokenizer check text: whitespace runs, emoji, digits, CJK, contractions.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# SHA-256 of str(token ids of CHECK_TEXT) -> llama.cpp pre-tokenizer, for the Llama-family tokenizers.
KNOWN_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
}


def pre_tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenizer, or None if it is not one we know."""
    ids = tokenizer.encode(CHECK_TEXT)
    return KNOWN_PRE_TOKENIZERS.get(sha256(str(ids).encode()).hexdigest())


def _looks_special(token: str) -> bool:
    """Added tokens such as `<|im_start|>` that some tokenizers forget to mark as special."""
    return token.startswith("<|") and token.endswith("|>")


def token_list(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every token id's text and llama.cpp token type (control, user-defined, normal; unused for gaps)."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise LoraPruneError(f"the tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(token)
            special = added[index].special or _looks_special(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _check_byte_level_bpe(directory: Path) -> None:
    """Refuse tokenizers that llama.cpp reads another way (SentencePiece models, byte-fallback BPE)."""
    tokenizer_json = directory / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise LoraPruneError(f"{directory} has no tokenizer.json: save the tokenizer beside the model")
    model = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise LoraPruneError(
            f"the tokenizer in {directory} is not a byte-level BPE (model {model.get('type')!r}, byte_fallback "
            f"{model.get('byte_fallback')}); SentencePiece-style vocabularies (Llama 2, Mistral v0.1) are not "
            "exported yet"
        )


def add_vocab(writer: gguf.GGUFWriter, directory: str | Path, vocab_size: int, pre: str | None = None) -> str:
    """Write the tokenizer keys of `directory`'s tokenizer into `writer`; returns the pre-tokenizer name.

    `pre` names llama.cpp's pre-tokenizer when the check-text hash does not identify it.
    """
    directory = Path(directory)
    _check_byte_level_bpe(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if pre is None:
        pre = pre_tokenizer_name(tokenizer)
    if pre is None:
        raise LoraPruneError(
            f"llama.cpp's pre-tokenizer for the tokenizer in {directory} is not known here (known: "
            f"{', '.join(sorted(set(KNOWN_PRE_TOKENIZERS.values())))}); name it with --tokenizer-pre "
            "(llama.cpp's names, e.g. 'llama-bpe', 'qwen2', 'smollm', 'gpt-2')"
        )
    tokens, types = token_list(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    config_file = directory / "tokenizer_config.json"
    settings = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    if (prefix_space := settings.get("add_prefix_space")) is not None:
        writer.add_add_space_prefix(prefix_space)
    special = gguf.SpecialVocab(directory, load_merges=True)
    # llama.cpp adds BOS exactly when the Hugging Face tokenizer does, so both score the same tokens
    special.add_special_token["bos"] = adds_bos(tokenizer)
    special.add_to_gguf(writer, quiet=True)
    return pre
