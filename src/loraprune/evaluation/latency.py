"""Cost of a model: forward latency, greedy-generation throughput, parameters and analytic FLOPs.

Several models are measured side by side in one process so that they share the machine's
state (threads, caches, other jobs' load): every model is warmed up, then the repeats are
interleaved (A, B, A, B, ...) and summarised by their median, so a slow spell hits all of
them alike. Ratios are stated against the first model (put the dense model first to get
pruned/dense).

* Forward latency: one ``model(input_ids)`` of a fixed ``[batch_size, seq_len]`` batch of
  random tokens, without KV cache, in milliseconds.
* Generation throughput: greedy ``generate`` from the same batch with exactly ``gen_tokens``
  new tokens per sequence (``min_new_tokens = max_new_tokens``, so EOS cannot end it early);
  tokens/s = ``batch_size * gen_tokens`` / wall time, the prompt's prefill included.
* FLOPs (:func:`forward_flops`): matrix-multiplication FLOPs of one forward, counted from the
  layer widths, to compare latency ratios with the ratio a pruned shape promises.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from loraprune.errors import LoraPruneError
from loraprune.run_report.summary import count_parameters
from loraprune.structure import get_adapter, unwrap_model
from loraprune.structure.base import LayerSizes


def forward_flops(model: nn.Module, seq_len: int, batch_size: int = 1) -> int:
    """Matrix-multiplication FLOPs of one forward of `batch_size` sequences of `seq_len` tokens.

    ``2 · (weights of all linear layers) · tokens`` (the LM head included, embedding look-ups,
    norms, activations and biases not) plus attention: per layer and sequence ``2 · seq_len² ·
    q_width`` for the scores ``QKᵀ`` and as much for ``softmax · V``, where ``q_width`` is the
    layer's query heads times the head dimension (the full square is counted, as dense attention
    kernels compute it under the causal mask). LoRA layers of an unmerged PEFT adapter count as
    the linear layers they are. Layer widths come from the architecture adapter, so pruned models
    with per-layer widths are counted as they are.
    """
    if seq_len < 1 or batch_size < 1:
        raise LoraPruneError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
    root = unwrap_model(model)
    linear_weights = sum(module.weight.numel() for module in model.modules() if isinstance(module, nn.Linear))
    tokens = batch_size * seq_len
    query_widths = [
        sizes.num_attention_heads * layer.self_attn.head_dim
        for sizes, layer in zip(get_adapter(root).layer_sizes(root), root.model.layers)
    ]
    attention = sum(4 * seq_len * seq_len * width for width in query_widths) * batch_size
    return 2 * linear_weights * tokens + attention


def _iqr(values: list[float]) -> float:
    """Interquartile range (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    lower, _, upper = statistics.quantiles(values, n=4, method="inclusive")
    return upper - lower


@dataclass
class ModelCost:
    """Measurements of one model; the raw repeats are kept so the summaries can be checked."""

    name: str
    params: int  # unique parameters, tied embeddings once
    flops: int  # forward_flops at the measured batch shape
    forward_ms: list[float]  # one entry per timed repeat, in measuring order
    generation_s: list[float]  # wall time of one generate() call per timed repeat (empty: not measured)
    generated_tokens: int  # new tokens per sequence in every generate() call
    batch_size: int
    forward_median_ms: float = field(init=False)
    forward_iqr_ms: float = field(init=False)
    tokens_per_s: float | None = field(init=False)  # median over repeats of batch_size * generated_tokens / time

    def __post_init__(self) -> None:
        self.forward_median_ms = statistics.median(self.forward_ms)
        self.forward_iqr_ms = _iqr(self.forward_ms)
        rates = [self.batch_size * self.generated_tokens / seconds for seconds in self.generation_s]
        self.tokens_per_s = statistics.median(rates) if rates else None


@dataclass
class LatencyResult:
    """Costs of several models measured side by side, with the settings and the ratios to the first."""

    models: list[ModelCost]
    batch_size: int
    seq_len: int
    gen_tokens: int
    repeats: int
    warmup: int
    seed: int
    device: str
    dtype: str
    threads: int

    @property
    def reference(self) -> ModelCost:
        return self.models[0]

    def ratios(self) -> dict[str, dict[str, float | None]]:
        """For every model after the first: its median forward time, throughput, parameters and FLOPs
        divided by those of the first model."""
        ref = self.reference
        measured_rates = ref.tokens_per_s is not None
        return {
            cost.name: {
                "forward_ms": cost.forward_median_ms / ref.forward_median_ms,
                "tokens_per_s": cost.tokens_per_s / ref.tokens_per_s if measured_rates else None,
                "params": cost.params / ref.params,
                "flops": cost.flops / ref.flops,
            }
            for cost in self.models[1:]
        }

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["reference"] = self.reference.name
        data["ratios"] = self.ratios()
        return data

    def __str__(self) -> str:
        lines = [
            f"cost: batch {self.batch_size} x {self.seq_len} tokens, {self.gen_tokens} generated tokens, "
            f"{self.repeats} interleaved repeats after {self.warmup} warm-up, median (IQR), {self.dtype} on "
            f"{self.device}, {self.threads} threads",
        ]
        width = max(28, *(len(cost.name) + 2 for cost in self.models))  # full names: paths differ at the end
        lines.append(f"{'model':<{width}}{'params':>14}{'GFLOPs':>10}{'forward ms':>20}{'gen tok/s':>12}")
        for cost in self.models:
            rate = f"{cost.tokens_per_s:.1f}" if cost.tokens_per_s is not None else "-"
            lines.append(
                f"{cost.name:<{width}}{cost.params:>14,}{cost.flops / 1e9:>10.3f}"
                f"{f'{cost.forward_median_ms:.2f} ({cost.forward_iqr_ms:.2f})':>20}{rate:>12}"
            )
        for name, ratio in self.ratios().items():
            parts = [f"{key} {value:.3f}" for key, value in ratio.items() if value is not None]
            lines.append(f"{name} / {self.reference.name}: " + ", ".join(parts))
        return "\n".join(lines)


def model_with_widths(model: nn.Module, layers: Sequence[Mapping[str, int]], seed: int = 0) -> nn.Module:
    """A randomly initialised model of `model`'s architecture and dtype with the per-layer widths `layers`.

    `layers` are rows as in `loraprune.run_report.summary.layer_table` (`heads`, `kv_heads`,
    `channels`), e.g. a pruning report's. Forward cost depends on the widths only, so this measures a pruned shape's
    latency where its weights are not at hand (a resumed benchmark, another machine).
    """
    from transformers import AutoModelForCausalLM

    root = unwrap_model(model)
    sizes = [LayerSizes(row["heads"], row["kv_heads"], row["channels"]) for row in layers]
    config, _ = get_adapter(root).config_for_sizes(root, sizes)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=root.dtype).eval()


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds `fn` takes (waiting for the GPU where there is one) and what it returns."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def _generate(model: nn.Module, input_ids: torch.Tensor, gen_tokens: int) -> torch.Tensor:
    """Greedy generation of exactly `gen_tokens` new tokens per sequence."""
    config = getattr(unwrap_model(model), "generation_config", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        eos = getattr(config, "eos_token_id", None)
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    return model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=gen_tokens,
        min_new_tokens=gen_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
    )


def measure_latency(
    models: Mapping[str, nn.Module],
    *,
    batch_size: int = 1,
    seq_len: int = 128,
    repeats: int = 10,
    warmup: int = 2,
    gen_tokens: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> LatencyResult:
    """Forward latency and generation throughput of `models` (name -> model), side by side.

    All models get the same random token batch (seeded by `seed`, ids below the smallest
    vocabulary). Each phase (forward, then generation) runs ``warmup + repeats`` rounds; in every
    round each model is measured once, in the mapping's order, and the warm-up rounds are
    dropped. ``gen_tokens=0`` skips generation. Models are put in eval mode and returned to their
    previous mode; ratios are against the first model.
    """
    if not models:
        raise LoraPruneError("measure_latency needs at least one model")
    if batch_size < 1 or seq_len < 1 or repeats < 1 or warmup < 0 or gen_tokens < 0:
        raise LoraPruneError(
            f"need batch_size, seq_len, repeats >= 1 and warmup, gen_tokens >= 0; got {batch_size}, {seq_len}, "
            f"{repeats}, {warmup}, {gen_tokens}"
        )
    names = list(models)
    vocab = min(unwrap_model(model).config.vocab_size for model in models.values())
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
    inputs = {name: input_ids.to(_device_of(model)) for name, model in models.items()}
    modes = {name: model.training for name, model in models.items()}
    forward_s: dict[str, list[float]] = {name: [] for name in names}
    generation_s: dict[str, list[float]] = {name: [] for name in names}
    rounds = warmup + repeats
    phases = 2 if gen_tokens else 1
    bar = tqdm(total=rounds * phases * len(names), desc="latency", unit="run", disable=not progress)
    try:
        for model in models.values():
            model.eval()
        with torch.inference_mode():
            for index in range(rounds):
                for name, model in models.items():
                    seconds, _ = _timed(
                        lambda m=model, n=name: m(input_ids=inputs[n], use_cache=False), inputs[name].device
                    )
                    if index >= warmup:
                        forward_s[name].append(seconds)
                    bar.update()
            for index in range(rounds if gen_tokens else 0):
                for name, model in models.items():
                    seconds, output = _timed(
                        lambda m=model, n=name: _generate(m, inputs[n], gen_tokens), inputs[name].device
                    )
                    generated = output.shape[1] - seq_len
                    if generated != gen_tokens:
                        raise LoraPruneError(f"{name} generated {generated} tokens instead of {gen_tokens}")
                    if index >= warmup:
                        generation_s[name].append(seconds)
                    bar.update()
    finally:
        bar.close()
        for name, model in models.items():
            model.train(modes[name])
    first = next(iter(models.values()))
    device = _device_of(first)
    costs = [
        ModelCost(
            name=name,
            params=count_parameters(model),
            flops=forward_flops(model, seq_len, batch_size),
            forward_ms=[seconds * 1000 for seconds in forward_s[name]],
            generation_s=generation_s[name],
            generated_tokens=gen_tokens,
            batch_size=batch_size,
        )
        for name, model in models.items()
    ]
    return LatencyResult(
        models=costs,
        batch_size=batch_size,
        seq_len=seq_len,
        gen_tokens=gen_tokens,
        repeats=repeats,
        warmup=warmup,
        seed=seed,
        device=str(device),
        dtype=str(next(first.parameters()).dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
    )
