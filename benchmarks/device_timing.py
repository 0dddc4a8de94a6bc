"""Wall time of whole `prune-model` runs on each device, side by side, with every setting.

The issue behind `--device` asks for one `prune-model --method taylor` and one `prune-model
--method loraprune --steps 20` on the default model, on the GPU against the CPU. Each run
goes through `loraprune.api.prune_model`, as the command does (loading, scoring or LoRAPrune's
training, recovery steps, perplexity before and after, saving), and is timed as a whole; the
report's `prune_seconds` (scoring + training) is given too:

    python benchmarks/device_timing.py --devices cpu cuda
    python benchmarks/device_timing.py --model ./tiny --devices cpu --loraprune-steps 2 --eval-max-tokens 256

Writes OUTPUT.json and OUTPUT.md (default: benchmarks/results/device_timing).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from loraprune.api import prune_model
from loraprune.config import PruneModelConfig
from loraprune.devices import resolve_device
from loraprune.io import write_json
from loraprune.model_pruning import LoRAPruneConfig
from loraprune.models import DEFAULT_MODEL
from loraprune.run_report.summary import environment

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="devices to time, in this order")
    parser.add_argument("--sparsity", type=float, default=0.2)
    parser.add_argument("--taylor-steps", type=int, default=0, help="recovery steps after Taylor (0: none)")
    parser.add_argument("--loraprune-steps", type=int, default=20)
    parser.add_argument("--prune-every", type=int, default=4, help="LoRAPrune's pruning interval (as `make demo`)")
    parser.add_argument("--data", default="wikitext2", help="calibration and training text")
    parser.add_argument("--eval-data", default="wikitext2")
    parser.add_argument("--eval-max-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", default=str(ROOT / "benchmarks" / "results" / "device_timing"), help="writes OUTPUT.json/.md"
    )
    return parser.parse_args(argv)


def runs(args: argparse.Namespace) -> list[tuple[PruneModelConfig, LoRAPruneConfig | None]]:
    """The two runs of the comparison, on one device each (`output` is filled in per run)."""
    shared = {
        "model": args.model,
        "sparsity": args.sparsity,
        "calibration_data": args.data,
        "eval_data": args.eval_data,
        "eval_max_tokens": args.eval_max_tokens,
        "seq_len": args.seq_len,
        "eval_seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "seed": args.seed,
    }
    schedule = LoRAPruneConfig(prune_every=args.prune_every)
    rows = []
    for device in args.devices:
        for method, steps in (("taylor", args.taylor_steps), ("loraprune", args.loraprune_steps)):
            config = PruneModelConfig(output="-", method=method, steps=steps, device=device, **shared)
            rows.append((config, schedule if method == "loraprune" else None))
    return rows


def time_run(config: PruneModelConfig, schedule: LoRAPruneConfig | None, scratch: str) -> dict[str, Any]:
    config.output = str(Path(scratch) / f"{config.method}-{config.device.replace(':', '_')}")
    device = resolve_device(config.device)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    report = prune_model(config, schedule).report
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return {
        "method": config.method,
        "steps": config.steps,
        "device": report["device"],
        "wall_seconds": time.perf_counter() - started,
        "prune_seconds": report["prune_seconds"],
        "perplexity_before": report["perplexity_before"]["perplexity"] if report["perplexity_before"] else None,
        "perplexity_after": report["perplexity_after"]["perplexity"] if report["perplexity_after"] else None,
        "sparsity_decoder": report["sparsity_decoder"],
    }


def markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    lines = [
        "# prune-model wall time per device",
        "",
        f"Model {settings['model']}, {settings['sparsity']:.0%} of the decoder, {settings['dtype']}, data "
        f"{settings['data']} (seq_len {settings['seq_len']}, batch {settings['batch_size']}), perplexity on the "
        f"first {settings['eval_max_tokens']:,} tokens of {settings['eval_data']} before and after, seed "
        f"{settings['seed']}, LoRAPrune pruning every {settings['prune_every']} steps. Wall time: the whole "
        "run (load, score/train, evaluate twice, save); prune: scoring and training only.",
        "",
        "| method | steps | device | wall (s) | prune (s) | perplexity before -> after |",
        "|---|---:|---|---:|---:|---|",
    ]
    for row in results["rows"]:
        perplexity = "-" if row["perplexity_after"] is None else f"{row['perplexity_before']:.2f} -> "
        perplexity += "" if row["perplexity_after"] is None else f"{row['perplexity_after']:.2f}"
        lines.append(
            f"| {row['method']} | {row['steps']} | {row['device']} | {row['wall_seconds']:.1f} | "
            f"{row['prune_seconds']:.1f} | {perplexity} |"
        )
    lines += ["", f"Command: `{results['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="device-timing-") as scratch:
        for config, schedule in runs(args):
            rows.append(time_run(config, schedule, scratch))
            print(rows[-1], flush=True)
    results = {
        "settings": vars(args),
        "rows": rows,
        "torch_threads": torch.get_num_threads(),
        "environment": environment(),
        "command": shlex.join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json(output.with_suffix(".json"), results)
    output.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
