"""Evaluation of any causal LM, pruned by loraprune or not: perplexity (and its settings)."""

from loraprune.evaluation.config import EvalConfig
from loraprune.evaluation.perplexity import PerplexityResult, evaluate_perplexity, perplexity_of_windows

__all__ = ["EvalConfig", "PerplexityResult", "evaluate_perplexity", "perplexity_of_windows"]
