"""What a pruning run records about its model: sizes before and after, per-layer widths, the environment.

`pruning_report` assembles the record of a `prune-model` run from them; `prune-adapter`, `prune-nm`,
`loraprune inspect`, the sweeps and the benchmarks use the pieces, and `format_perplexity` prints a
record's perplexity. The rest of `loraprune.run_report` renders the records (Markdown, HTML, plots).
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

import loraprune
from loraprune.kbit import logical_numel
from loraprune.structure import get_adapter, unwrap_model


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once; k-bit weights by their unpacked size)."""
    return sum(logical_numel(p) for p in unwrap_model(model).parameters())


def decoder_parameters(model: nn.Module) -> int:
    """Parameters of the decoder layers' attention and MLP blocks: what `sparsity` is a fraction of."""
    root = unwrap_model(model)
    return sum(
        logical_numel(p)
        for layer in root.model.layers
        for block in (layer.self_attn, layer.mlp)
        for p in block.parameters()
    )


def layer_table(model: nn.Module) -> list[dict[str, int]]:
    """Per decoder layer: query heads, key/value heads, MLP channels."""
    root = unwrap_model(model)
    return [
        {"layer": i, "heads": s.num_attention_heads, "kv_heads": s.num_key_value_heads, "channels": s.intermediate_size}
        for i, s in enumerate(get_adapter(root).layer_sizes(root))
    ]


def size_summary(model: nn.Module) -> dict[str, Any]:
    return {"params": count_parameters(model), "decoder_params": decoder_parameters(model)}


def directory_size(path: str | Path) -> int:
    """Bytes of the weight files in a saved model directory."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def environment() -> dict[str, str]:
    return {
        "loraprune": loraprune.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def pruning_report(before: dict[str, Any], model: nn.Module, **extra: Any) -> dict[str, Any]:
    """Report of a pruned model, given `size_summary` of the model before pruning."""
    after = size_summary(model)
    return {
        "params_before": before["params"],
        "params_after": after["params"],
        "decoder_params_before": before["decoder_params"],
        "decoder_params_after": after["decoder_params"],
        "sparsity_decoder": 1 - after["decoder_params"] / before["decoder_params"],
        "sparsity_total": 1 - after["params"] / before["params"],
        "layers": layer_table(model),
        **extra,
        "environment": environment(),
    }


def format_perplexity(result: dict[str, Any] | None) -> str:
    """A report's perplexity entry for the console ('not evaluated' when none was asked for)."""
    return "not evaluated" if result is None else f"{result['perplexity']:.3f}"
