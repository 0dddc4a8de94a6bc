"""LoRAPrune's levers against full-gradient Taylor, chosen on one corpus and confirmed on another.

Every variant prunes the default model with `loraprune.api.prune_model` at the settings of
`benchmarks/model_pruning.py` (30 LoRA steps of 4 x 128 tokens, rank 8, lr 1e-3, training and
calibration on `wikitext2/wiki.valid.tokens`, 16 calibration windows, global ranking, KV-group
units). Each pruned model is evaluated on two corpora, in windows of 128 tokens:

* **choice**: the first 16,384 tokens of the WikiText-2 raw test set. Defaults are chosen on it.
* **confirmation**: the first 8,192 tokens of the GSM8K test problems written as text
  (`Question: ...\\nAnswer: ...`, one blank line between problems). It played no part in any
  choice: a default counts only if it also wins there.

One JSON file per (variant, sparsity, seed) is written under `--output-dir/rows/`, so the study
resumes where it stopped and several processes can share it (`--only`); `--render` writes the
table (`loraprune_study.{json,md}`) from whatever rows exist.

    OMP_NUM_THREADS=1 python benchmarks/loraprune_study.py --sparsities 0.2 --only taylor act-fisher
    python benchmarks/loraprune_study.py --render
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from loraprune.api import prune_model
from loraprune.config import PruneModelConfig
from loraprune.evaluation.perplexity import evaluate_perplexity
from loraprune.io import write_json
from loraprune.model_pruning import LoRAPruneConfig
from loraprune.model_pruning.presets import PRESETS
from loraprune.run_report.summary import environment

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LORAPRUNE_DATA_DIR") or ROOT.parent / "shared" / "data")

#: the schedules the variants use (`cooldown` is the share of the steps left for recovery after the last event);
#: the benchmark's own: warm-up and cool-down 10 %, an event every `--prune-every` steps
PAPER_SCHEDULE: dict[str, Any] = {"warmup": 0.1, "cooldown": 0.1}
HALF: dict[str, Any] = {"warmup": 0.1, "cooldown": 0.5, "prune_every": 2}
FIFTH: dict[str, Any] = {"warmup": 0.05, "cooldown": 0.8, "prune_every": 1}

#: name -> (prune-model settings, LoRAPrune settings, what it tests)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "taylor": ({"method": "taylor"}, {}, "one-shot Taylor (full weight gradients) + recovery"),
    "taylor+kd": ({"method": "taylor", "distill_weight": 1.0}, {}, "Taylor, recovery with self-distillation"),
    "act-oneshot": ({"method": "activation"}, {}, "one-shot activation-gradient Fisher + recovery"),
    "paper": (
        {"method": "loraprune", **PRESETS["paper"].run},
        PRESETS["paper"].schedule,
        "--preset paper: the published LoRAPrune (LoRA-guided, per-matrix normalisation, uniform, official layers)",
    ),
    "lg-matrix": (
        {"method": "loraprune"},
        {**PAPER_SCHEDULE, "score": "lora-guided", "normalisation": "matrix"},
        "LoRA-guided, per-matrix normalisation, global (the old default)",
    ),
    "lg-none": (
        {"method": "loraprune"},
        {**PAPER_SCHEDULE, "score": "lora-guided", "normalisation": "none"},
        "LoRA-guided, plain sum, global",
    ),
    "lg-none-early": (
        {"method": "loraprune"},
        {**HALF, "score": "lora-guided", "normalisation": "none"},
        "LoRA-guided, plain sum, pruning done by mid-run",
    ),
    "lg-none-fifth": (
        {"method": "loraprune"},
        {**FIFTH, "score": "lora-guided", "normalisation": "none"},
        "LoRA-guided, plain sum, pruning done by 20 % of the steps",
    ),
    "act": ({"method": "loraprune"}, {**PAPER_SCHEDULE, "score": "activation"}, "activation Fisher while training"),
    "act-half": (
        {"method": "loraprune"},
        {**HALF, "score": "activation"},
        "activation Fisher, pruning done by mid-run",
    ),
    "act-first-half": (
        {"method": "loraprune"},
        {**HALF, "score": "activation", "form": "first-order"},
        "activation first-order |sum|, pruning done by mid-run",
    ),
    "act-fifth": (
        {"method": "loraprune"},
        {**FIFTH, "score": "activation"},
        "activation Fisher, pruning done by 20 % of the steps",
    ),
    "act-fifth-first": (
        {"method": "loraprune"},
        {**FIFTH, "score": "activation", "form": "first-order"},
        "activation first-order |sum|, pruning done by 20 % of the steps",
    ),
    "act-tenth": (
        {"method": "loraprune"},
        {"warmup": 0.0, "cooldown": 0.9, "prune_every": 1, "score": "activation"},
        "activation Fisher, pruning in the first 10 % of the steps",
    ),
    "act-fifth+kd": (
        {"method": "loraprune", "distill_weight": 1.0},
        {**FIFTH, "score": "activation"},
        "activation Fisher by 20 % of the steps, with self-distillation",
    ),
    "act-half+kd": (
        {"method": "loraprune", "distill_weight": 1.0},
        {**HALF, "score": "activation"},
        "activation Fisher by mid-run, with self-distillation",
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--train-data", default=str(DATA / "wikitext2" / "wiki.valid.tokens"))
    parser.add_argument("--choice-data", default=str(DATA / "wikitext2" / "wiki.test.raw"))
    parser.add_argument("--choice-tokens", type=int, default=16384)
    parser.add_argument("--confirm-source", default=str(DATA / "gsm8k" / "test.jsonl"))
    parser.add_argument("--confirm-tokens", type=int, default=8192)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="+", default=None, choices=sorted(VARIANTS), metavar="VARIANT")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--prune-every", type=int, default=3, help="LoRAPrune events (unless a variant sets it)")
    parser.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results" / "loraprune_study"))
    parser.add_argument("--render", action="store_true", help="only write the table from the rows present")
    return parser.parse_args(argv)


def confirmation_text(source: Path, cache: Path) -> Path:
    """The GSM8K test problems as one text file (written once)."""
    if not cache.exists():
        problems = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
        text = "\n\n".join(f"Question: {p['question']}\nAnswer: {p['answer']}" for p in problems)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(text + "\n", encoding="utf-8")
    return cache


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "train_data": args.train_data,
        "choice": {"data": args.choice_data, "tokens": args.choice_tokens, "seq_len": 128},
        "confirmation": {"data": f"{args.confirm_source} as text", "tokens": args.confirm_tokens, "seq_len": 128},
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "rank": args.rank,
        "learning_rate": args.learning_rate,
        "calibration_samples": args.calibration_samples,
        "prune_every": args.prune_every,
        "dtype": "float32",
        "device": "cpu",
    }


def run_point(args: argparse.Namespace, variant: str, sparsity: float, seed: int, confirm: Path) -> dict[str, Any]:
    run_settings, schedule_settings, _ = VARIANTS[variant]
    with tempfile.TemporaryDirectory(prefix="loraprune-study-") as scratch:
        config = PruneModelConfig(
            output=str(Path(scratch) / "model"),
            model=args.model,
            sparsity=sparsity,
            calibration_data=args.train_data,
            calibration_samples=args.calibration_samples,
            seq_len=args.seq_len,
            steps=args.steps,
            lora_rank=args.rank,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            seed=seed,
            **run_settings,
        )
        schedule = LoRAPruneConfig(**{"prune_every": args.prune_every, **schedule_settings})
        started = time.perf_counter()
        result = prune_model(config, schedule)
        seconds = time.perf_counter() - started
        choice = evaluate_perplexity(
            result.model, result.tokenizer, args.choice_data, seq_len=128, max_tokens=args.choice_tokens
        )
        confirmation = evaluate_perplexity(
            result.model, result.tokenizer, str(confirm), seq_len=128, max_tokens=args.confirm_tokens
        )
    report = result.report
    return {
        "variant": variant,
        "sparsity": sparsity,
        "seed": seed,
        "run": run_settings,
        "schedule": schedule_settings,
        "sparsity_decoder": report["sparsity_decoder"],
        "params": report["params_after"],
        "choice_ppl": choice.perplexity,
        "confirmation_ppl": confirmation.perplexity,
        "loraprune": (report["training"] or {}).get("loraprune"),
        "seconds": seconds,
        "torch_threads": torch.get_num_threads(),
    }


def render(output: Path, args: argparse.Namespace) -> str:
    rows = [json.loads(path.read_text()) for path in sorted((output / "rows").glob("*.json"))]
    lines = [
        "# LoRAPrune levers vs Taylor (SmolLM2-135M)",
        "",
        f"Settings: {json.dumps(settings(args))}",
        "",
        "Perplexity, windows of 128: **choice** = WikiText-2 test (first "
        f"{args.choice_tokens:,} tokens; defaults were chosen on it), **confirmation** = GSM8K test problems as "
        f"text (first {args.confirm_tokens:,} tokens; used for no choice). Each cell: choice / confirmation, "
        "one entry per seed.",
        "",
        "| variant | what | " + " | ".join(f"{s:.0%}" for s in args.sparsities) + " |",
        "|---|---|" + "---|" * len(args.sparsities),
    ]
    for name, (_, _, what) in VARIANTS.items():
        cells = []
        for sparsity in args.sparsities:
            found = sorted(
                (r for r in rows if r["variant"] == name and abs(r["sparsity"] - sparsity) < 1e-9),
                key=lambda r: r["seed"],
            )
            cells.append(
                "; ".join(f"{r['choice_ppl']:.2f} / {r['confirmation_ppl']:.1f} (s{r['seed']})" for r in found) or "-"
            )
        if any(cell != "-" for cell in cells):
            lines.append(f"| {name} | {what} | " + " | ".join(cells) + " |")
    means = {}
    for row in rows:
        means.setdefault((row["variant"], row["sparsity"]), []).append(row)
    summary = {
        f"{variant}@{sparsity:g}": {
            "seeds": [r["seed"] for r in found],
            "choice_mean": statistics.fmean(r["choice_ppl"] for r in found),
            "confirmation_mean": statistics.fmean(r["confirmation_ppl"] for r in found),
        }
        for (variant, sparsity), found in sorted(means.items())
    }
    write_json(
        output / "loraprune_study.json",
        {"settings": settings(args), "environment": environment(), "rows": rows, "means": summary},
    )
    text = "\n".join(lines) + "\n"
    (output / "loraprune_study.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = Path(args.output_dir)
    (output / "rows").mkdir(parents=True, exist_ok=True)
    if not args.render:
        confirm = confirmation_text(Path(args.confirm_source), Path(tempfile.gettempdir()) / "loraprune-gsm8k-test.txt")
        for seed in args.seeds:
            for sparsity in args.sparsities:
                for variant in args.only or VARIANTS:
                    path = output / "rows" / f"{variant}-{sparsity:g}-s{seed}.json"
                    if path.exists():
                        continue
                    row = run_point(args, variant, sparsity, seed, confirm)
                    write_json(path, row)
                    print(
                        f"{variant} {sparsity:g} seed {seed}: {row['choice_ppl']:.2f} / {row['confirmation_ppl']:.1f}"
                    )
    print(render(output, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
