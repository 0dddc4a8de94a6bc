"""Evaluation of any causal LM, pruned by loraprune or not: perplexity, zero-shot accuracy and cost,
each with its settings."""

from loraprune.evaluation.config import EvalConfig
from loraprune.evaluation.latency import LatencyResult, ModelCost, forward_flops, measure_latency
from loraprune.evaluation.perplexity import PerplexityResult, evaluate_perplexity, perplexity_of_windows
from loraprune.evaluation.zero_shot import (
    DESIGN_TASKS,
    LmEvalMissingError,
    LoadedTasks,
    TaskUnavailableError,
    ZeroShotResult,
    evaluate_zero_shot,
    load_tasks,
)

__all__ = [
    "DESIGN_TASKS",
    "EvalConfig",
    "LatencyResult",
    "LmEvalMissingError",
    "LoadedTasks",
    "ModelCost",
    "PerplexityResult",
    "TaskUnavailableError",
    "ZeroShotResult",
    "evaluate_perplexity",
    "evaluate_zero_shot",
    "forward_flops",
    "load_tasks",
    "measure_latency",
    "perplexity_of_windows",
]
