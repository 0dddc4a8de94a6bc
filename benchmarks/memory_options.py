"""Peak memory of one training step plus scoring under the memory options (issue 5): precision, checkpointing.

For every model shape, measurement, precision, gradient checkpointing (off / on) and batch
shape, a fresh model is built on the device and the peak memory *above the loaded model*
(weights, plus the LoRA adapter where there is one) is measured for:

* `lora`       one plain LoRA training step: forward, backward, AdamW step (the reference);
* `loraprune`  the same step plus LoRAPrune's default scoring (`ModelPruner.observe`; with the
               activation-gradient score its hooks run inside the backward pass);
* `loraprune-lg` the same with the paper's LoRA-guided score (`score="lora-guided"`);
* `loraprune-kd` the default step with self-distillation (`--distill-weight`: a no-grad teacher
               forward and the KL term);
* `prunedlora` a LoRA step at rank r0 plus PrunedLoRA's statistics and one pruning event;
* `taylor`     full-gradient Taylor scoring of one batch (gradients of every scored base weight);
* `wanda-sp`   Wanda-sp scoring of one batch (forward only; checkpointing does not apply).

`peak_mib` is the whole step's peak above the loaded model; `scoring_mib` the peak of the scoring
phase above the memory in use when it starts (for taylor / wanda-sp the whole measurement is
scoring). Precisions: `fp32`; `bf16-autocast` (float32 weights, bfloat16 autocast: `--bf16`);
`bf16-weights` (bfloat16 weights and autocast: `--dtype bfloat16 --bf16`; LoRA stays float32).
Weight values do not change memory, so random weights serve: shapes are built with
`from_config` on the device (built-in shapes, or `--config-json`), or loaded from `--model DIR`.

On CUDA the figures are `torch.cuda.max_memory_allocated` (tensors only: no allocator cache, no
CUDA context). With `--device cpu` they are the process' peak RSS (VmHWM, reset through
/proc/self/clear_refs) with glibc told to return large blocks at once (mallopt), so rough but
comparable. A failing measurement is recorded with its error and the others go on; results are
rewritten after every measurement, and `--time-budget` stops starting new ones in time.

    python benchmarks/memory_options.py --output-dir OUT                       # GPU: the full plan (< 3 min)
    python benchmarks/memory_options.py --device cpu --shapes tiny --scaling-shapes --batches 2x32 \\
        --output-dir /tmp/mem                                                  # a CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import re
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from loraprune.distillation import Distillation, dense_peft_model
from loraprune.importance import get_criterion
from loraprune.io import write_json
from loraprune.lora import add_lora
from loraprune.model_pruning import LoRAPruneConfig, ModelPruner, PruningTarget
from loraprune.rank_pruning.config import RankPruningConfig
from loraprune.rank_pruning.pruner import RankPruner
from loraprune.run_report.summary import count_parameters, environment
from loraprune.structure import get_adapter, unwrap_model
from loraprune.training import enable_gradient_checkpointing

#: Llama-family shapes built from a config (attention/MLP widths, layers, vocabulary are what matter)
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 256,
        "tie_word_embeddings": True,
    },
    # SmolLM2-135M (the default model): 30 layers, 9 query heads on 3 KV heads, MLP 1536, tied embeddings
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
    },
    # a Llama-3.2-1B-like shape: 16 layers, 32 query heads on 8 KV heads, MLP 8192, 128k vocabulary
    "llama-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
    },
}
METHODS = ("lora", "loraprune", "loraprune-lg", "loraprune-kd", "prunedlora", "taylor", "wanda-sp")
PRECISIONS = ("fp32", "bf16-autocast", "bf16-weights")
#: the command-line flags of `loraprune prune-model` that each precision corresponds to
PRECISION_FLAGS = {
    "fp32": "--dtype float32",
    "bf16-autocast": "--dtype float32 --bf16",
    "bf16-weights": "--dtype bfloat16 --bf16",
}
MIB = 2**20


# ------------------------------------------------------------------------------------------------ meters


class CudaMeter:
    """Bytes held by tensors on the current CUDA device, and their peak since the last reset."""

    kind = "torch.cuda.max_memory_allocated"

    def current(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    def reset_peak(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    def release(self) -> None:
        torch.cuda.empty_cache()


class RssMeter:
    """The process' resident memory (VmRSS) and its peak (VmHWM, reset through /proc/self/clear_refs).

    glibc keeps freed blocks below its (growing) mmap threshold in the heap, where they stay
    resident and hide later peaks; a fixed 64 KiB threshold makes every tensor an mmap that is
    returned to the system when freed.
    """

    kind = "peak RSS (VmHWM) of the process"

    def __init__(self) -> None:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (setting it also stops its dynamic growth)
        libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD

    @staticmethod
    def _status(field: str) -> int:
        return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

    def current(self) -> int:
        return self._status("VmRSS")

    def reset_peak(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        return self._status("VmHWM")

    def release(self) -> None:
        pass


class PeakTracker:
    """Peak above the memory in use at creation, with separately measured scoring phases."""

    def __init__(self, meter: CudaMeter | RssMeter) -> None:
        self.meter = meter
        self.base = meter.current()
        self.highest = self.base
        self.scoring = 0
        meter.reset_peak()

    def score(self, work: Callable[[], Any]) -> Any:
        """Run `work` as a scoring phase: its peak above the memory in use when it starts is recorded."""
        self.highest = max(self.highest, self.meter.peak())
        self.meter.reset_peak()
        start = self.meter.current()
        result = work()
        peak = self.meter.peak()
        self.scoring = max(self.scoring, peak - start)
        self.highest = max(self.highest, peak)
        return result

    def total(self) -> int:
        return max(self.highest, self.meter.peak()) - self.base


# ------------------------------------------------------------------------------------------ measurement


@dataclass(frozen=True)
class Shape:
    """A model shape: built from `config` (a LlamaConfig's keyword arguments) or loaded from `path`."""

    name: str
    config: dict[str, Any] | None = None
    path: str | None = None


@dataclass(frozen=True)
class Spec:
    shape: Shape
    method: str
    precision: str
    checkpointing: bool
    batch_size: int
    seq_len: int

    def key(self) -> str:
        return (
            f"{self.shape.name}/{self.method}/{self.precision}/{'ckpt' if self.checkpointing else 'no-ckpt'}/"
            f"{self.batch_size}x{self.seq_len}"
        )


def build_model(shape: Shape, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """A model of `shape` in `dtype` on `device` (random weights unless it is loaded from a directory)."""
    if shape.path is not None:
        return AutoModelForCausalLM.from_pretrained(shape.path, dtype=dtype).to(device)
    with device:  # initialise on the device: no host copy of a large model per measurement
        return AutoModelForCausalLM.from_config(LlamaConfig(**shape.config), dtype=dtype)


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _lora_step(
    model,
    batch: torch.Tensor,
    tracker: PeakTracker,
    autocast: contextlib.AbstractContextManager,
    observe=None,
    after=None,
    distillation: Distillation | None = None,
) -> None:
    """Forward (under `autocast`, as in `transformers.Trainer`), backward, optional scoring on the
    gradients, AdamW step, optional post-step work; with `distillation` the loss gets its KL term."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with autocast:
        if distillation is None:
            loss = model(input_ids=batch, labels=batch).loss
        else:
            teacher = distillation.teacher_logits(model, {"input_ids": batch})
            outputs = model(input_ids=batch, labels=batch)
            loss = outputs.loss + distillation.loss(outputs.logits, teacher, batch)
            del outputs, teacher
    loss.backward()
    del loss
    if observe is not None:
        tracker.score(observe)
    optimizer.step()
    if after is not None:
        tracker.score(lambda: after(optimizer))
    optimizer.zero_grad(set_to_none=True)


def run_measurement(spec: Spec, device: torch.device, meter, rank: int, r0: int, final_rank: int) -> dict[str, Any]:
    """Build the model, measure one step of `spec.method`, free everything; returns the figures."""
    dtype = torch.bfloat16 if spec.precision == "bf16-weights" else torch.float32
    started = time.perf_counter()
    model = build_model(spec.shape, dtype, device)
    parameters = count_parameters(model)
    if spec.method in ("lora", "loraprune", "loraprune-lg", "loraprune-kd"):
        model = add_lora(model, rank)
    elif spec.method == "prunedlora":
        model = add_lora(model, r0)
    if spec.checkpointing:
        enable_gradient_checkpointing(model)
    model.train()  # checkpointing is active in training mode only; the Llama shapes have no dropout
    root = unwrap_model(model)
    vocab = root.config.vocab_size
    batch = torch.randint(0, vocab, (spec.batch_size, spec.seq_len), device=device)
    with torch.no_grad():  # pages the weights in and sets the kernels up, so the baseline is the loaded model
        model(input_ids=batch[:1, :8])
    build_seconds = time.perf_counter() - started
    tracker = PeakTracker(meter)
    started = time.perf_counter()
    autocast = _autocast(spec.precision, device)
    if spec.method == "lora":
        _lora_step(model, batch, tracker, autocast)
    elif spec.method in ("loraprune", "loraprune-lg", "loraprune-kd"):
        config = LoRAPruneConfig(score="lora-guided") if spec.method == "loraprune-lg" else LoRAPruneConfig()
        pruner = ModelPruner(model, 100, PruningTarget(sparsity=0.5), config)
        distillation = None
        if spec.method == "loraprune-kd":
            distillation = Distillation(1.0, 1.0, lambda: dense_peft_model(model, pruner.unmasked))
        _lora_step(model, batch, tracker, autocast, observe=pruner.observe, distillation=distillation)
    elif spec.method == "prunedlora":
        steps = (r0 - final_rank) // 2  # two components per module and event, an event every step
        config = RankPruningConfig(r0=r0, rank=final_rank, prune_every=1, per_event=2, warmup=0.0, cooldown=0.0)
        pruner = RankPruner(model, config, total_steps=steps)

        def prune(optimizer) -> None:
            if pruner.step(1, optimizer) is None:
                raise RuntimeError("step 1 is no PrunedLoRA event; the measurement would miss the event")

        _lora_step(model, batch, tracker, autocast, observe=pruner.observe_gradients, after=prune)
    else:
        families = get_adapter(root).families(root)
        criterion = get_criterion(spec.method, batch_size=spec.batch_size)
        with autocast:  # the criteria run the model themselves and reduce in float32
            tracker.score(lambda: criterion.score(model, families, batch))
    seconds = time.perf_counter() - started
    return {
        "parameters": parameters,
        "loaded_mib": tracker.base / MIB,
        "peak_mib": tracker.total() / MIB,
        "scoring_mib": tracker.scoring / MIB,
        "seconds": seconds,
        "build_seconds": build_seconds,
    }


def plan(args: argparse.Namespace, shapes: list[Shape], scaling: list[Shape]) -> list[Spec]:
    """The measurements in the order they run: the (few) scaling shapes first, so that the time budget cuts
    the end of the main shapes' grid rather than the comparison at scale, then the full grid."""
    specs = []
    for grid_shapes, batches, precisions in (
        (scaling, args.scaling_batches, args.scaling_precisions),
        (shapes, args.batches, args.precisions),
    ):
        for shape in grid_shapes:
            for batch_size, seq_len in batches:
                for precision in precisions:
                    for checkpointing in args.checkpointing:
                        for method in args.methods:
                            if method == "wanda-sp" and checkpointing:
                                continue  # forward only, no gradients: checkpointing does nothing
                            specs.append(Spec(shape, method, precision, checkpointing, batch_size, seq_len))
    return specs


@contextlib.contextmanager
def cleaned_up(meter) -> Iterator[None]:
    try:
        yield
    finally:
        gc.collect()
        meter.release()


# ------------------------------------------------------------------------------------------------- report


def markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    env = results["environment"]
    lines = [
        "# Peak memory of one training step plus scoring",
        "",
        f"Device: {env['device_name']} ({settings['device']}), torch {env['torch']}, transformers "
        f"{env['transformers']}, peft {env['peft']}. Memory: {results['meter']}, in MiB above the loaded model "
        f"(weights, plus the LoRA adapter: rank {settings['rank']}, PrunedLoRA r0 {settings['r0']}). "
        "Each cell: whole-step peak (scoring phase's own peak in parentheses). Random weights; "
        "the command that produced this file:",
        "",
        f"    {results['command']}",
        "",
        "Precisions: "
        + "; ".join(f"`{name}` = prune-model `{flags}`" for name, flags in PRECISION_FLAGS.items())
        + "; `+ckpt` = `--gradient-checkpointing`.",
    ]
    rows = results["measurements"]
    groups = list(dict.fromkeys((r["shape"], r["batch_size"], r["seq_len"]) for r in rows))
    for shape, batch_size, seq_len in groups:
        group = [r for r in rows if (r["shape"], r["batch_size"], r["seq_len"]) == (shape, batch_size, seq_len)]
        columns = list(dict.fromkeys((r["precision"], r["checkpointing"]) for r in group))
        parameters = next((r["parameters"] for r in group if r.get("parameters")), None)
        title = f"{shape}" + (f" ({parameters / 1e6:.0f} M parameters)" if parameters else "")
        lines += [
            "",
            f"## {title}, batch {batch_size} x {seq_len}",
            "",
            "| method | " + " | ".join(p + (" +ckpt" if c else "") for p, c in columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        for method in dict.fromkeys(r["method"] for r in group):
            cells = []
            for precision, checkpointing in columns:
                row = next(
                    (
                        r
                        for r in group
                        if (r["method"], r["precision"], r["checkpointing"]) == (method, precision, checkpointing)
                    ),
                    None,
                )
                cells.append("–" if row is None else _cell(row))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        ratios = []
        for precision, checkpointing in columns:
            pair = {
                r["method"]: r
                for r in group
                if (r["precision"], r["checkpointing"]) == (precision, checkpointing) and "peak_mib" in r
            }
            if "taylor" in pair and "loraprune" in pair and pair["loraprune"]["peak_mib"] > 0:
                ratios.append(
                    f"{precision}{' +ckpt' if checkpointing else ''} "
                    f"{pair['taylor']['peak_mib'] / pair['loraprune']['peak_mib']:.1f}x"
                )
        if ratios:
            lines += ["", "Taylor peak / LoRAPrune step peak: " + ", ".join(ratios) + "."]
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", "Failed measurements: " + "; ".join(f"`{r['key']}`: {r['error']}" for r in errors)]
    return "\n".join(lines) + "\n"


def _cell(row: dict[str, Any]) -> str:
    if "error" in row:
        return "error"
    if "skipped" in row:
        return "not run"
    return f"{row['peak_mib']:.0f} ({row['scoring_mib']:.0f})"


# ------------------------------------------------------------------------------------------------ command


def _batch(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"a batch shape is BATCHxSEQ_LEN, e.g. 4x512, not {text!r}")
    return int(match.group(1)), int(match.group(2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="where memory_options.json and .md are written")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--shapes",
        nargs="*",
        default=["smollm2-135m"],
        choices=sorted(SHAPES),
        help="built-in shapes measured on the full grid",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="a model directory (random weights will do) measured on the full grid; repeatable",
    )
    parser.add_argument(
        "--config-json",
        action="append",
        default=[],
        help="a Llama-family config.json built with from_config, measured on the full grid; repeatable",
    )
    parser.add_argument(
        "--scaling-shapes",
        nargs="*",
        default=["llama-1b"],
        choices=sorted(SHAPES),
        help="larger shapes measured on the reduced grid (--scaling-batches, --scaling-precisions)",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--batches", nargs="+", type=_batch, default=[(4, 128), (4, 512)], help="e.g. 4x128 4x512")
    parser.add_argument("--scaling-batches", nargs="+", type=_batch, default=[(4, 512)])
    parser.add_argument("--scaling-precisions", nargs="+", default=["bf16-weights"], choices=PRECISIONS)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the lora / loraprune steps")
    parser.add_argument("--r0", type=int, default=64, help="PrunedLoRA's initial rank")
    parser.add_argument("--final-rank", type=int, default=8, help="PrunedLoRA's final rank")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=170.0,
        help="seconds after which no new measurement starts (the rest are recorded as not run)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU runs)")
    args = parser.parse_args(argv)
    args.checkpointing = [value == "on" for value in args.checkpointing]
    return args


def _environment(device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {**environment(), "peft": peft.__version__, "device_name": name, "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    meter = CudaMeter() if device.type == "cuda" else RssMeter()
    shapes = [Shape(name, SHAPES[name]) for name in args.shapes]
    shapes += [Shape(f"model:{Path(path).name}", path=path) for path in args.model]
    shapes += [
        Shape(
            f"config:{Path(path).stem}",
            {k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")},
        )
        for path in args.config_json
    ]
    scaling = [Shape(name, SHAPES[name]) for name in args.scaling_shapes]
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    settings = {key: value for key, value in vars(args).items() if key != "output_dir"}
    results: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv),
        "settings": {**settings, "shapes_config": {s.name: s.config or {"path": s.path} for s in shapes + scaling}},
        "environment": _environment(device),
        "meter": meter.kind,
        "measurements": [],
    }
    started = time.perf_counter()
    for spec in plan(args, shapes, scaling):
        row: dict[str, Any] = {
            "key": spec.key(),
            **{k: v for k, v in asdict(spec).items() if k != "shape"},
            "shape": spec.shape.name,
            "flags": PRECISION_FLAGS[spec.precision] + (" --gradient-checkpointing" if spec.checkpointing else ""),
        }
        if time.perf_counter() - started > args.time_budget:
            row["skipped"] = f"time budget of {args.time_budget:.0f} s spent"
        else:
            with cleaned_up(meter):
                try:
                    row.update(run_measurement(spec, device, meter, args.rank, args.r0, args.final_rank))
                except Exception as error:  # one failure (an OOM, say) must not end the run
                    row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                    row["traceback"] = traceback.format_exc(limit=4)
        print(
            json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items() if k != "traceback"}),
            flush=True,
        )
        results["measurements"].append(row)
        results["total_seconds"] = time.perf_counter() - started
        write_json(output / "memory_options.json", results)
        (output / "memory_options.md").write_text(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
