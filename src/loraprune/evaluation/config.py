"""Settings of an evaluation run (the `loraprune eval` options are generated from them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraprune.config import check, option
from loraprune.devices import DEVICE_HELP, DEVICE_MAP_HELP, DEVICE_MAPS, check_device_map
from loraprune.evaluation.zero_shot import DESIGN_TASKS
from loraprune.models import DEFAULT_MODEL, DTYPES


@dataclass
class EvalConfig:
    """What to evaluate, on which text, and under which protocol settings."""

    model: str = option(
        DEFAULT_MODEL, help=f"model: a local Hugging Face directory, a hub id, or the embedded '{DEFAULT_MODEL}'"
    )
    adapter: str | None = option(None, help="directory of a LoRA adapter to apply on top of the model")
    data: str | None = option(
        None,
        help="text to score for perplexity: 'wikitext2', 'ptb', the path of a text file, a Hugging Face dataset "
        "ID[:CONFIG[:SPLIT[:COLUMN]]] (e.g. allenai/c4:en:validation:text), or 'none' to skip perplexity; if not given:"
        " 'wikitext2' when neither --tasks nor --latency is asked, else none",
    )
    split: str = option("test", help="split of a named corpus or dataset without its own split (test, valid, train)")
    seq_len: int = option(128, help="tokens per non-overlapping window (128 as in LLM-Pruner/LoRAPrune)")
    protocol: str = option(
        "windows",
        help="perplexity protocol: 'windows' scores every token of each window (the design's); 'llama.cpp' "
        "computes what llama-perplexity -c SEQ_LEN computes (only the second half of each window scored, "
        "BOS as llama.cpp adds it; --max-tokens N = --chunks N/SEQ_LEN), to check a GGUF export against it",
        choices=("windows", "llama.cpp"),
    )
    max_tokens: int | None = option(None, help="score only the first N tokens of the text; None scores all of it")
    batch_size: int = option(8, help="windows (perplexity) or lm-eval requests (zero-shot) per forward pass")
    dtype: str = option("float32", help="dtype to load the model in", choices=tuple(DTYPES))
    device: str = option("auto", help=DEVICE_HELP)
    json: str | None = option(None, help="also write the results, with their settings, to this JSON file")
    progress: bool = option(True, help="show progress bars")
    tasks: str | None = option(
        None,
        help="zero-shot accuracy on these lm-eval tasks, comma-separated, e.g. "
        f"{','.join(DESIGN_TASKS)} (needs: pip install 'loraprune[eval]'; hub tasks download their data once)",
    )
    task_dir: str | None = option(
        None, help="directory of extra lm-eval task YAML files (e.g. tasks over local data, for offline use)"
    )
    num_fewshot: int = option(0, help="few-shot examples per zero-shot prompt (0: zero-shot)")
    limit: int | None = option(
        None, help="evaluate only the first N documents of each task (quick checks; not comparable to full runs)"
    )
    latency: bool = option(
        False,
        help="measure forward latency and greedy-generation throughput (with --baseline: side by side); on a "
        "shared CPU, OMP_NUM_THREADS=1 gives steadier numbers than threads competing with other jobs",
    )
    baseline: str | None = option(
        None, help="a second (e.g. dense) model measured beside --model with --latency; ratios are model/baseline"
    )
    latency_batch: int = option(1, help="sequences in the timed batch")
    latency_seq_len: int = option(128, help="tokens per sequence in the timed forward pass and generation prompt")
    gen_tokens: int = option(64, help="new tokens per greedy generation (fixed: EOS cannot end it early); 0 skips")
    repeats: int = option(10, help="timed repeats per model, interleaved across models; the median is reported")
    warmup: int = option(2, help="untimed warm-up rounds per model before the repeats")
    device_map: str = option("none", help=DEVICE_MAP_HELP, choices=DEVICE_MAPS)

    def __post_init__(self) -> None:
        if self.data is None:
            self.data = "none" if self.tasks or self.latency else "wikitext2"
        check(
            self.perplexity or bool(self.tasks) or self.latency,
            "nothing to evaluate: --data none skips perplexity, so ask for --tasks or --latency",
        )
        check(self.num_fewshot >= 0, f"num_fewshot must be non-negative, got {self.num_fewshot}")
        check(self.limit is None or self.limit >= 1, f"limit must be at least 1, got {self.limit}")
        check(self.task_dir is None or self.tasks is not None, "--task-dir defines tasks for --tasks; name them there")
        check(self.task_dir is None or Path(self.task_dir).is_dir(), f"task directory {self.task_dir} does not exist")
        check(self.baseline is None or self.latency, "--baseline is measured beside --model by --latency; add it")
        for name in ("latency_batch", "latency_seq_len", "repeats"):
            check(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("gen_tokens", "warmup"):
            check(getattr(self, name) >= 0, f"{name} must be non-negative, got {getattr(self, name)}")
        check(self.seq_len >= 2, f"seq_len must be at least 2 (one token predicts the next), got {self.seq_len}")
        check(
            self.max_tokens is None or self.max_tokens >= self.seq_len,
            f"max_tokens ({self.max_tokens}) must be at least seq_len ({self.seq_len}) to fill one window",
        )
        check(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check_device_map(self.device_map, trains=False, command="eval")
        if self.json is not None:
            parent = Path(self.json).expanduser().resolve().parent
            check(parent.is_dir(), f"cannot write {self.json}: directory {parent} does not exist; create it first")
            check(not Path(self.json).is_dir(), f"cannot write {self.json}: it is a directory")

    @property
    def perplexity(self) -> bool:
        """Whether perplexity is asked for (``data`` is not 'none')."""
        return self.data is not None and self.data.lower() != "none"
