"""The two kinds of job a sweep runs, described as data: their config sections, metrics and runner.

A job kind names the config dataclasses a grid point is built from (so any of their fields can
be a grid axis, including options added to them later), the fields the sweep sets itself, the
derived settings it understands (`rank_pruning.alpha_over_r0`), the metrics its runner returns,
and the runner: `(configs, output) -> metrics`, where `configs` maps section names to config
instances and `output` is the (not yet existing) directory the job may write to.
"""

from __future__ import annotations

import dataclasses
import gc
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraprune.config import PruneModelConfig, check
from loraprune.errors import ConfigError
from loraprune.evaluation.sft import SFTEvalConfig
from loraprune.model_pruning.config import LoRAPruneConfig
from loraprune.rank_pruning.config import RankPruningConfig
from loraprune.rank_pruning.run import AdapterRunConfig
from loraprune.training import TrainingConfig

Metrics = dict[str, float | int | None]
JobRunner = Callable[[dict[str, Any], Path], Metrics]


@dataclass(frozen=True)
class Derived:
    """A sweep setting that sets a config field from another: `resolve(value, section values) -> field value`.

    `section values` holds every field of the section (explicit values over the defaults).
    """

    target: str
    help: str
    resolve: Callable[[float, Mapping[str, Any]], Any]


@dataclass(frozen=True)
class JobKind:
    """What a sweep needs to know about a job: its config sections, metrics and how to run it.

    `managed` holds, per section, the fields the sweep sets itself (the output directory) with the
    placeholder the configs are validated with; the runner replaces them for each point.
    """

    name: str
    description: str
    sections: Mapping[str, type]
    managed: Mapping[str, Mapping[str, Any]]
    metrics: Mapping[str, str]
    default_metrics: tuple[str, ...]
    run: JobRunner
    derived: Mapping[str, Mapping[str, Derived]] = field(default_factory=dict)
    check: Callable[[dict[str, Any], tuple[str, ...]], None] = lambda configs, metrics: None


# Both jobs write to a directory of the sweep's choosing, which they may replace; a sweep resumes by
# points, so its jobs keep no checkpoints.
MANAGED = {"run": {"output": "<the point's output>", "overwrite": True, "save_steps": 0, "resume": None}}

# ---------------------------------------------------------------------------- model pruning

MODEL_METRICS = {
    "perplexity_after": "perplexity of the pruned model on run.eval_data (needs run.eval_data)",
    "perplexity_before": "perplexity of the model before pruning on run.eval_data (needs run.eval_data)",
    "sparsity_decoder": "fraction of the decoder layers' attention+MLP parameters removed",
    "sparsity_total": "fraction of all parameters removed",
    "params_after": "parameters of the pruned model (tied embeddings once)",
    "file_size_bytes": "bytes of the saved weights",
    "prune_seconds": "wall time of scoring, pruning and LoRA training",
    "last_train_loss": "last logged LoRA training loss (None without training)",
}


def _perplexity(result: dict[str, Any] | None) -> float | None:
    return None if result is None else result["perplexity"]


def run_model_job(configs: dict[str, Any], output: Path) -> Metrics:
    """`loraprune.api.prune_model` with the point's configs; the pruned model goes to `output`."""
    from loraprune.model_pruning.entry import prune_model

    gc.collect()  # a model of the previous point caught in a reference cycle goes before this one loads
    config = dataclasses.replace(configs["run"], output=str(output), overwrite=True)
    report = prune_model(config, configs["schedule"]).report
    training = report["training"] or {}
    return {
        "perplexity_after": _perplexity(report["perplexity_after"]),
        "perplexity_before": _perplexity(report["perplexity_before"]),
        "sparsity_decoder": report["sparsity_decoder"],
        "sparsity_total": report["sparsity_total"],
        "params_after": report["params_after"],
        "file_size_bytes": report["file_size_bytes"],
        "prune_seconds": report["prune_seconds"],
        "last_train_loss": training.get("last_logged_loss"),
    }


def check_model_job(configs: dict[str, Any], metrics: tuple[str, ...]) -> None:
    """Refuse, before anything runs, a method the model pruner lacks or a perplexity metric without data."""
    from loraprune.model_pruning.run import METHODS

    method = configs["run"].method
    check(method in METHODS, f"run.method {method!r} is not one of {', '.join(METHODS)}")
    for metric in metrics:
        check(
            not metric.startswith("perplexity") or configs["run"].eval_data is not None,
            f"metric {metric} needs run.eval_data (e.g. wikitext2) in the fixed settings",
        )


MODEL_JOB = JobKind(
    name="model",
    description="Prune heads and MLP channels of the base model (loraprune.api.prune_model)",
    sections={"run": PruneModelConfig, "schedule": LoRAPruneConfig},
    managed=MANAGED,
    metrics=MODEL_METRICS,
    default_metrics=("perplexity_after",),
    run=run_model_job,
    check=check_model_job,
)

# ---------------------------------------------------------------------------- adapter pruning

ADAPTER_METRICS = {
    "test_nll": "mean answer-token NLL of the saved adapter on eval.problems test problems after the first eval.skip",
    "test_tokens": "answer tokens the NLL is averaged over",
    "total_rank": "sum of the final ranks of all modules",
    "mean_rank": "mean final rank per module",
    "modules_at_rank_zero": "modules pruned to rank 0 (dropped from the saved adapter)",
    "adapter_parameters": "parameters in the saved adapter",
    "adapter_file_bytes": "bytes of the saved adapter weights",
    "train_seconds": "wall time of the training (pruning included)",
    "seconds_per_step": "train_seconds / training.steps",
    "train_loss": "mean training loss over all steps (as transformers.Trainer reports it)",
    "pruning_events": "pruning events that removed components (PrunedLoRA; 0 for the baselines)",
    "predicted_loss_change": "summed over the pruning events: the quadratic model's predicted loss change (obs)",
    "measured_loss_change": "summed over the pruning events: the loss change measured on the held-out batch",
    "event_sign_agreement": "fraction of pruning events whose predicted and measured loss changes agree in sign",
    "event_spearman": "rank correlation of predicted against measured loss changes over the pruning events",
    "module_spearman": "rank correlation of predicted against measured loss changes of single modules' "
    "removals (rank_pruning.calibration_modules per event)",
}


def _alpha_from_ratio(ratio: float, section: Mapping[str, Any]) -> float:
    check(ratio > 0, f"alpha_over_r0 must be > 0, got {ratio}")
    return ratio * section["r0"]


def _rank_from_removed_fraction(fraction: float, section: Mapping[str, Any]) -> int:
    check(0 < fraction < 1, f"removed_fraction must be in (0, 1), got {fraction}")
    rank = section["r0"] * (1 - fraction)
    if not math.isclose(rank, round(rank), abs_tol=1e-9):
        raise ConfigError(
            f"removed_fraction {fraction} of r0={section['r0']} leaves {rank:g} components, not a whole number"
        )
    return round(rank)


ADAPTER_DERIVED = {
    "rank_pruning": {
        "alpha_over_r0": Derived("alpha", "LoRA alpha as a multiple of r0 (alpha = value * r0)", _alpha_from_ratio),
        "removed_fraction": Derived(
            "rank", "fraction of r0 pruned away (rank = r0 * (1 - value), a whole number)", _rank_from_removed_fraction
        ),
    }
}


def calibration_metrics(events: list[dict[str, Any]]) -> Metrics:
    """The calibration metrics of a run's pruning events (all None when nothing was measured)."""
    from loraprune.rank_pruning.calibration import calibration_summary

    summary = calibration_summary(events) or {}
    return {
        "predicted_loss_change": summary.get("predicted_total"),
        "measured_loss_change": summary.get("measured_total"),
        "event_sign_agreement": summary.get("sign_agreement_events"),
        "event_spearman": summary.get("spearman_events"),
        "module_spearman": summary.get("spearman_modules"),
    }


def run_adapter_job(configs: dict[str, Any], output: Path) -> Metrics:
    """`prune_adapter` with the point's configs, then the answer-token NLL of the adapter saved to `output`.

    The saved adapter (what a user gets) is what is evaluated, loaded back through stock PEFT.
    """
    from loraprune.evaluation.sft import evaluate_answer_nll
    from loraprune.models import load_model
    from loraprune.rank_pruning.entry import prune_adapter

    gc.collect()  # a model of the previous point caught in a reference cycle goes before this one loads
    run_config = dataclasses.replace(configs["run"], output=str(output), overwrite=True)
    training = configs["training"]
    run, exported = prune_adapter(run_config, configs["rank_pruning"], training)
    train_loss = next((float(entry["train_loss"]) for entry in run.log_history if "train_loss" in entry), None)
    ranks = list(run.ranks.values())
    metrics: Metrics = {
        "total_rank": sum(ranks),
        "mean_rank": sum(ranks) / len(ranks),
        "modules_at_rank_zero": sum(rank == 0 for rank in ranks),
        "adapter_parameters": exported.parameters,
        "adapter_file_bytes": exported.file_bytes,
        "train_seconds": run.train_seconds,
        "seconds_per_step": run.train_seconds / training.steps,
        "train_loss": train_loss,
        "pruning_events": sum(event["removed"] > 0 for event in run.pruning_events),
        **calibration_metrics(run.pruning_events),
    }
    del run
    gc.collect()  # the trained model goes before the saved adapter is loaded
    model, tokenizer = load_model(run_config.model, dtype=run_config.dtype, adapter=str(output))
    nll = evaluate_answer_nll(model, tokenizer, configs["eval"])
    return {"test_nll": nll["nll"], "test_tokens": nll["tokens"], **metrics}


ADAPTER_JOB = JobKind(
    name="adapter",
    description="Fine-tune an adapter and prune its rank (loraprune.api.prune_adapter), then its answer-token NLL",
    sections={
        "run": AdapterRunConfig,
        "rank_pruning": RankPruningConfig,
        "training": TrainingConfig,
        "eval": SFTEvalConfig,
    },
    managed=MANAGED,
    metrics=ADAPTER_METRICS,
    default_metrics=("test_nll",),
    run=run_adapter_job,
    derived=ADAPTER_DERIVED,
)

JOBS: dict[str, JobKind] = {job.name: job for job in (MODEL_JOB, ADAPTER_JOB)}
