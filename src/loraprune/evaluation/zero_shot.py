"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness (the optional extra ``eval``).

The already-loaded model is handed to lm-eval through its ``HFLM`` wrapper, so anything
``loraprune.models.load_model`` loads is evaluated as it is: dense models, pruned models with
per-layer widths, and base models with a PEFT adapter. Task data is loaded before any scoring,
one task at a time, so a task whose data cannot be reached (offline, no cache) fails early
with its name. Tasks can also be defined locally: a directory of lm-eval task YAML files
(``task_dir``) is searched before the built-in tasks, e.g. a multiple-choice task over a local
JSONL file (``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``).

Every number comes with its settings: accuracy (``acc``, and ``acc_norm`` where the task
defines it, with standard errors), samples evaluated and available, few-shot count, task
version, batch size, limit, seed and the lm-eval version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from loraprune.errors import LoraPruneError

#: The zero-shot suite of the design (§4), as LLM-Pruner and LoRAPrune report it.
DESIGN_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


class LmEvalMissingError(LoraPruneError):
    """lm-evaluation-harness, an optional dependency, is not installed."""


class TaskUnavailableError(LoraPruneError):
    """A task is unknown, or its data cannot be loaded."""


def require_lm_eval() -> ModuleType:
    """The ``lm_eval`` module, or an error saying how to install it."""
    try:
        import lm_eval
    except ImportError as error:
        raise LmEvalMissingError(
            "zero-shot evaluation needs lm-evaluation-harness, which is not installed; install it with: "
            "pip install 'loraprune[eval]'"
        ) from error
    return lm_eval


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    """Task names from a comma-separated string (or a sequence), without blanks or repeats."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = list(dict.fromkeys(item.strip() for item in items if item.strip()))
    if not names:
        raise TaskUnavailableError(f"no task named in {spec!r}; e.g. {','.join(DESIGN_TASKS)}")
    return names


@dataclass
class LoadedTasks:
    """Tasks with their data, ready to evaluate (one or more models, one after the other)."""

    names: list[str]
    objects: list[Any]  # lm-eval Task / Group objects, one or more per name
    task_dir: str | None
    manager: Any  # the lm-eval TaskManager that found them (lm-eval would otherwise index its tasks again)


def _task_manager(names: list[str], task_dir: str | None) -> Any:
    """A TaskManager over `task_dir`, with lm-eval's built-in tasks only if some name needs them
    (indexing the built-in tasks takes seconds)."""
    from lm_eval.tasks import TaskManager

    if task_dir is not None:
        if not Path(task_dir).is_dir():
            raise TaskUnavailableError(f"task directory {task_dir} does not exist")
        local = TaskManager(include_path=str(task_dir), include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
        return TaskManager(include_path=str(task_dir))
    return TaskManager()


def load_tasks(tasks: str | Sequence[str], task_dir: str | None = None) -> LoadedTasks:
    """Look up `tasks` (names or a comma-separated string) and load their data.

    Unknown names and unreachable data raise `TaskUnavailableError` naming the task and what to do.
    """
    names = parse_tasks(tasks)
    require_lm_eval()
    manager = _task_manager(names, task_dir)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        where = f" or in {task_dir}" if task_dir else ""
        raise TaskUnavailableError(
            f"unknown task(s) {', '.join(unknown)}: not an lm-eval task, group or tag{where}; "
            f"the design's suite is {','.join(DESIGN_TASKS)}; `lm-eval ls tasks` lists all"
        )
    objects = []
    for name in names:
        try:
            loaded = manager.load([name])
        except (OSError, ValueError) as error:  # ConnectionError, FileNotFoundError, DatasetNotFoundError...
            raise TaskUnavailableError(
                f"could not load the data of task {name!r}: {error}. lm-eval tasks download their data from the "
                "Hugging Face hub on first use; connect once (it is then cached under HF_DATASETS_CACHE, and "
                "HF_DATASETS_OFFLINE=1 uses that cache), or define the task over local files in a task "
                "directory (--task-dir)"
            ) from error
        groups = loaded["groups"]
        objects.extend([groups[name]] if name in groups else loaded["tasks"].values())
    return LoadedTasks(names=names, objects=objects, task_dir=task_dir, manager=manager)


@dataclass
class TaskResult:
    """The metrics of one task (or group) and what they were measured on."""

    task: str
    metrics: dict[str, float | None]  # e.g. acc, acc_stderr, acc_norm, acc_norm_stderr (None: not computed)
    samples: int | None  # documents evaluated (after --limit); None for groups
    samples_available: int | None  # documents in the evaluation split
    num_fewshot: int | None
    version: str | float | None


@dataclass
class ZeroShotResult:
    """Accuracy on lm-eval tasks with the settings needed to reproduce and compare it."""

    tasks: list[TaskResult]
    model: str
    dtype: str
    num_fewshot: int
    limit: int | None
    batch_size: int
    seed: int
    lm_eval_version: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        limit = f", limit {self.limit} per task" if self.limit is not None else ""
        lines = [
            f"zero-shot ({self.num_fewshot}-shot{limit}), model {self.model}, {self.dtype}, lm-eval "
            f"{self.lm_eval_version} ({self.seconds:.1f} s)",
            f"{'task':<20}{'version':>8}{'n':>8}{'acc':>18}{'acc_norm':>18}",
        ]
        for result in self.tasks:
            cells = []
            for metric in ("acc", "acc_norm"):
                value, stderr = result.metrics.get(metric), result.metrics.get(f"{metric}_stderr")
                text = "-" if value is None else f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
                cells.append(f"{text:>18}")
            samples = "-" if result.samples is None else str(result.samples)
            lines.append(f"{result.task:<20}{result.version!s:>8}{samples:>8}{''.join(cells)}")
        return "\n".join(lines)


def _metrics(row: dict[str, Any]) -> dict[str, float | None]:
    """``{"acc,none": 0.5, "acc_stderr,none": "N/A", ...}`` -> ``{"acc": 0.5, "acc_stderr": None}``.

    Metrics under a filter other than ``none`` keep it as a suffix (``exact_match,strict``).
    """
    metrics: dict[str, float | None] = {}
    for key, value in row.items():
        if "," not in key:
            continue  # name, alias, sample_len
        metric, filter_name = key.split(",", 1)
        name = metric if filter_name == "none" else f"{metric},{filter_name}"
        metrics[name] = float(value) if isinstance(value, (int, float)) else None
    return metrics


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence warnings of `logger_name` (lm-eval warns that a model object, which we pass on
    purpose, makes some of its own loading options unused)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def evaluate_zero_shot(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: str | Sequence[str] | LoadedTasks,
    *,
    num_fewshot: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    task_dir: str | None = None,
    model_name: str | None = None,
    seed: int = 1234,
) -> ZeroShotResult:
    """Accuracy of `model` (transformers or PEFT) on lm-eval `tasks` (names, or `load_tasks`' result).

    `limit` evaluates only the first N documents per task (for quick checks; such numbers are not
    comparable with full runs). `seed` seeds lm-eval's Python, NumPy, torch and few-shot sampling.
    No chat template is applied (the protocol of the pruning papers).
    """
    lm_eval = require_lm_eval()
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if num_fewshot < 0:
        raise LoraPruneError(f"num_fewshot must be non-negative, got {num_fewshot}")
    if limit is not None and limit < 1:
        raise LoraPruneError(f"limit must be at least 1, got {limit}")
    loaded = tasks if isinstance(tasks, LoadedTasks) else load_tasks(tasks, task_dir)
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with _quiet("lm_eval"):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
            output = simple_evaluate(
                model=lm,
                tasks=loaded.objects,
                task_manager=loaded.manager,
                num_fewshot=num_fewshot,
                limit=limit,
                log_samples=False,
                apply_chat_template=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
    finally:
        model.train(was_training)
    samples = output.get("n-samples", {})
    results = [
        TaskResult(
            task=name,
            metrics=_metrics(row),
            samples=samples.get(name, {}).get("effective"),
            samples_available=samples.get(name, {}).get("original"),
            num_fewshot=output.get("n-shot", {}).get(name),
            version=output.get("versions", {}).get(name),
        )
        for name, row in output["results"].items()
    ]
    dtype = next(model.parameters()).dtype
    return ZeroShotResult(
        tasks=results,
        model=model_name or getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__,
        dtype=str(dtype).removeprefix("torch."),
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        seed=seed,
        lm_eval_version=lm_eval.__version__,
        seconds=time.perf_counter() - started,
    )
