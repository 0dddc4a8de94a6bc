"""Whole N:M runs on top of the shared LoRA training (`loraprune.model_pruning.run.train_lora`).

LoRAPrune N:M prunes while LoRA trains; the one-shot baselines prune first and may then get
the same LoRA training under their fixed mask (recovery). Both end with the adapter merged as
`mask ⊙ (W0 + s·B·A)`, so every result is a plain model whose projections hold the pattern,
which `nm_summary` verifies by counting the non-zeros of every group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from loraprune.errors import LoraPruneError
from loraprune.model_pruning.config import LoRAPruneConfig
from loraprune.model_pruning.run import LoraRun, LoraSettings, train_lora
from loraprune.safety.evidence import require_target
from loraprune.safety.run_files import resume_folder
from loraprune.semi_structured.callback import FixedMaskCallback, NMPruneCallback
from loraprune.semi_structured.masked_lora import merge_masked
from loraprune.semi_structured.pattern import NMPattern, group_nonzeros
from loraprune.semi_structured.pruner import NMPruner
from loraprune.semi_structured.targets import base_linear


def loraprune_nm(
    model: PreTrainedModel,
    windows: list[dict[str, torch.Tensor]],
    settings: LoraSettings,
    pattern: NMPattern,
    config: LoRAPruneConfig,
    layers: str = "all",
) -> tuple[nn.Module, LoraRun, NMPruner]:
    """LoRA training with LoRAPrune N:M; returns the merged N:M model, the run and the pruner."""
    callback = NMPruneCallback(pattern, config, layers, resume_from=resume_folder(settings.files))
    run = train_lora(model, windows, settings, callbacks=(callback,))
    pruner = callback.pruner
    require_target(pruner.finished, "LoRAPrune N:M", pruner.observations, pruner.step, run.log_history)
    run.summary["loraprune_nm"] = pruner.summary()
    return pruner.finish(), run, pruner


def masked_recovery(
    model: PreTrainedModel,
    masks: dict[str, torch.Tensor],
    windows: list[dict[str, torch.Tensor]],
    settings: LoraSettings,
) -> tuple[nn.Module, LoraRun]:
    """LoRA training of an N:M-pruned model under its fixed masks; returns the merged model and the run."""
    callback = FixedMaskCallback(masks)
    run = train_lora(model, windows, settings, callbacks=(callback,))
    return merge_masked(run.model, masks), run


@torch.no_grad()
def nm_summary(model: nn.Module, modules: list[str], pattern: NMPattern) -> dict[str, Any]:
    """Zeros of the projections and the groups of `M` holding more than `N` non-zeros (0 if the pattern holds)."""
    weights = zeros = violating = groups = 0
    for name in modules:
        weight = base_linear(model, name).weight
        counts = group_nonzeros(weight, pattern.m)
        weights += weight.numel()
        zeros += weight.numel() - int(counts.sum())
        violating += int((counts > pattern.n).sum())
        groups += counts.numel()
    return {
        "pattern": str(pattern),
        "modules": len(modules),
        "weights": weights,
        "zeros": zeros,
        "sparsity": zeros / weights if weights else 0.0,
        "groups": groups,
        "violating_groups": violating,
    }


def require_pattern(summary: dict[str, Any]) -> None:
    """Raise if `nm_summary` found groups that break the pattern (a bug, never the user's input)."""
    if summary["violating_groups"]:
        raise LoraPruneError(f"{summary['violating_groups']} groups break the {summary['pattern']} pattern")
