"""What a pruning run returns, and the perplexity it was asked for.

Shared by the entry points of `prune-model` (`loraprune.model_pruning.entry`) and `prune-nm`
(`loraprune.semi_structured.entry`); it sits below both so that neither imports the other nor the
public facade `loraprune.api`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from loraprune.evaluation.perplexity import evaluate_perplexity

logger = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """The pruned model (in memory: shrunk by prune-model, merged N:M by prune-nm), its directory, its report.

    On the other DDP processes of a k-bit run, which leave the full-precision re-load to the main
    one, `model` is None and `report` empty.
    """

    model: nn.Module | None
    tokenizer: Any
    output: Path
    report: dict[str, Any]


def requested_perplexity(model: nn.Module, tokenizer: Any, config: Any, label: str) -> dict[str, Any] | None:
    """Perplexity on `config.eval_data` (None when no evaluation was asked for), logged with `label`.

    `config` is any run config with `eval_data`, `eval_seq_len`, `eval_max_tokens` and `model`.
    """
    if not config.eval_data:
        return None
    logger.info("perplexity %s on %s (seq_len %d)", label, config.eval_data, config.eval_seq_len)
    result = evaluate_perplexity(
        model,
        tokenizer,
        config.eval_data,
        seq_len=config.eval_seq_len,
        max_tokens=config.eval_max_tokens,
        model_name=config.model,
    )
    logger.info("%s", result)
    return result.to_dict()
