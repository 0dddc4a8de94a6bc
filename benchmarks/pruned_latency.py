"""Latency of the pruned shapes of a model-pruning benchmark run, on any device and dtype.

Forward latency and greedy-generation throughput depend on the layer widths only, so the
models are rebuilt from the widths recorded in `benchmarks/results/model_pruning.json` (random
weights, the same classes as the saved pruned models) and measured against the dense shape in
one process: warm-up, interleaved repeats, median, ratios (loraprune.evaluation.latency). This
runs where the real weights are not available, e.g. on a lent GPU:

    python benchmarks/pruned_latency.py --device cuda --dtype bfloat16 --batch-size 1 16 --seq-len 128 512

The dense shape comes from `--config` (a config.json; default: the cached default model's).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from loraprune.evaluation.latency import measure_latency, model_with_widths
from loraprune.io import write_json
from loraprune.models import parse_dtype
from loraprune.run_report.summary import environment

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--results",
        default=str(ROOT / "benchmarks" / "results" / "model_pruning.json"),
        help="model-pruning benchmark JSON whose rows record per-layer widths",
    )
    parser.add_argument(
        "--config",
        default=str(Path.home() / ".cache/loraprune/models/smollm2-135m/config.json"),
        help="config.json of the dense model",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--seq-len", type=int, nargs="+", default=[128])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--gen-tokens", type=int, default=32, help="greedy tokens per generation run (0: none)")
    parser.add_argument("--sparsity", type=float, default=None, help="only rows at this sparsity")
    parser.add_argument(
        "--output",
        default=str(ROOT / "benchmarks" / "results" / "pruned_latency"),
        help="writes OUTPUT.json and OUTPUT.md",
    )
    return parser.parse_args(argv)


def build_models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """The dense shape first, then every recorded pruned shape, on the device in the dtype."""
    dtype = parse_dtype(args.dtype)
    config = AutoConfig.from_pretrained(args.config)
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(config, dtype=dtype)
    rows = json.loads(Path(args.results).read_text())["rows"]
    models = {"dense": dense}
    for row in rows:
        if "layers" not in row or (args.sparsity is not None and row["sparsity"] != args.sparsity):
            continue
        models[f"{row['method']}-{row['sparsity']:g}"] = model_with_widths(dense, row["layers"])
    return {name: model.to(args.device).eval() for name, model in models.items()}


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Forward latency and generation throughput of the pruned shapes",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Device {results['device_name']}, dtype {results['settings']['dtype']}, median of "
        f"{results['settings']['repeats']} interleaved repeats after warm-up; models rebuilt at the widths of "
        f"`{results['settings']['results']}` (random weights; latency depends on the widths only).",
        "",
    ]
    for case in results["cases"]:
        lines += [
            f"## batch {case['batch_size']} x {case['seq_len']} tokens",
            "",
            "| model | forward ms | forward / dense | FLOPs / dense | latency / FLOPs ratio | gen tokens/s "
            "| gen speed-up |",
            "|---|---|---|---|---|---|---|",
        ]
        result = case["result"]
        for model in result["models"]:
            ratio = result["ratios"].get(model["name"], {"forward_ms": 1.0, "flops": 1.0, "tokens_per_s": 1.0})
            tps, speed = model.get("tokens_per_s"), ratio.get("tokens_per_s")
            lines.append(
                f"| {model['name']} | {model['forward_median_ms']:.2f} | {ratio['forward_ms']:.3f} | "
                f"{ratio['flops']:.3f} | "
                f"{ratio['forward_ms'] / ratio['flops']:.3f} | {f'{tps:.1f}' if tps else '-'} | "
                f"{f'{speed:.2f}x' if speed else '-'} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models = build_models(args)
    results: dict[str, Any] = {
        "command": "python benchmarks/pruned_latency.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "settings": vars(args),
        "environment": environment(),
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch_threads": torch.get_num_threads(),
        "cases": [],
    }
    for batch_size in args.batch_size:
        for seq_len in args.seq_len:
            result = measure_latency(
                models,
                batch_size=batch_size,
                seq_len=seq_len,
                repeats=args.repeats,
                gen_tokens=args.gen_tokens,
                progress=False,
            )
            results["cases"].append({"batch_size": batch_size, "seq_len": seq_len, "result": result.to_dict()})
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json(output.with_suffix(".json"), results)
    output.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
