"""Model pruning side by side: LoRAPrune against Taylor, Wanda-sp, magnitude and random (design §1.3, §4).

Every method gets the same model, groups, training / calibration text, LoRA rank, learning
rate, batch, step budget and seed. LoRAPrune prunes during its `--steps` LoRA steps; the
one-shot criteria prune on `--calibration-samples` windows and then fine-tune the same LoRA
adapter for the same steps (recovery). Two reference rows: the untouched dense model, and
"dense + the same LoRA fine-tuning" (design §4: fine-tuning on WikiText also adapts the
domain, so quality is stated against both).

Measured per method and sparsity:

* perplexity on the first `--eval-max-tokens` tokens of the test text in windows of
  `--seq-len` (and on the whole text with `--full-eval`);
* parameters (unique, tied embeddings once) and the size of the saved weights;
* peak memory of the scoring step, each in a fresh subprocess (CPU: peak RSS above the
  loaded model, via /proc/self/clear_refs; GPU: peak allocated above the loaded model):
  LoRAPrune = one LoRA training step (forward + backward of one batch) plus its scoring,
  Taylor = forward + backward over the calibration windows with base-weight gradients,
  Wanda-sp = forward over them; a plain LoRA step is measured the same way for reference;
* wall time of the whole pruning + training run relative to plain LoRA fine-tuning of the
  dense model for the same steps, and the per-step time of LoRAPrune (while it still scores)
  against a plain LoRA step, interleaved in one process (median);
* forward latency of every pruned model against the dense one, in one process with
  interleaved repeats (median), with the FLOPs ratio its shape promises. Latency depends on
  the layer widths only, so it is measured on models rebuilt at each run's recorded widths
  (same classes, random weights): a resumed benchmark needs no pruned model kept around.

`--resume` keeps the finished rows, memory probes and step times of an earlier run with the
same settings and runs only what is missing (the runs are long on a CPU).

Example (the settings used for benchmarks/results/model_pruning.*):

    nice python benchmarks/model_pruning.py --steps 40 --eval-max-tokens 16384
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import default_data_collator

from loraprune.api import prune_model
from loraprune.config import PruneModelConfig
from loraprune.data import calibration_batches
from loraprune.evaluation.latency import measure_latency, model_with_widths
from loraprune.evaluation.perplexity import evaluate_perplexity
from loraprune.importance import get_criterion
from loraprune.io import save_pruned_model, write_json
from loraprune.lora import add_lora
from loraprune.model_pruning import LoRAPruneConfig, ModelPruner, PruningTarget
from loraprune.model_pruning.presets import PRESETS, apply_preset
from loraprune.model_pruning.run import METHODS, LoraSettings, train_lora, training_windows
from loraprune.models import load_model
from loraprune.run_report.summary import count_parameters, directory_size, environment
from loraprune.structure import get_adapter
from loraprune_study import confirmation_text

ROOT = Path(__file__).resolve().parents[1]
#: the benchmark's name for `--method loraprune --preset paper`
PAPER = "loraprune-paper"
DATA = Path(os.environ.get("LORAPRUNE_DATA_DIR") or ROOT.parent / "shared" / "data")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--train-data",
        default=str(DATA / "wikitext2" / "wiki.valid.tokens"),
        help="text for LoRA training and calibration",
    )
    parser.add_argument("--eval-data", default=str(DATA / "wikitext2" / "wiki.test.raw"))
    parser.add_argument("--eval-max-tokens", type=int, default=16384)
    parser.add_argument("--full-eval", action="store_true", help="also evaluate on the whole test text")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=[*METHODS, PAPER],
        choices=[*METHODS, PAPER],
        help=f"prune-model methods; {PAPER} is --method loraprune --preset paper (the published method)",
    )
    parser.add_argument(
        "--confirm-data",
        default=str(DATA / "gsm8k" / "test.jsonl"),
        help="a second evaluation corpus, used for no choice: GSM8K test problems as text ('' = none)",
    )
    parser.add_argument("--confirm-max-tokens", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--prune-every", type=int, default=None, help="LoRAPrune's (default: the library's)")
    parser.add_argument("--warmup", type=float, default=None, help="LoRAPrune's (default: the library's)")
    parser.add_argument("--cooldown", type=float, default=None, help="LoRAPrune's (default: the library's)")
    parser.add_argument("--layers", default="all")
    parser.add_argument("--allocation", default="global", choices=("global", "uniform"))
    parser.add_argument("--attention-unit", default="auto")
    parser.add_argument("--step-time-repeats", type=int, default=6)
    parser.add_argument("--latency-repeats", type=int, default=10)
    parser.add_argument("--latency-batch", type=int, default=1)
    parser.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default="model_pruning", help="results are written to NAME.json and NAME.md")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished runs of NAME.json (same settings) and run only the missing ones",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="METHOD-SPARSITY",
        help="run only these runs, in this order (e.g. loraprune-0.5 taylor-0.5); with --resume, "
        "to finish the most informative runs first",
    )
    parser.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)  # internal: one memory probe
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _peak_above_baseline(work) -> dict[str, float]:
    """Run `work()` and return its peak memory above what was in use before, in MiB."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        work()
        torch.cuda.synchronize()
        return {"peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20, "kind": "cuda allocated"}
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
    work()
    return {"peak_mib": (_status_kib("VmHWM") - base) / 1024, "kind": "cpu rss"}


def probe_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of one scoring step of `args.probe_memory`, on a freshly loaded model."""
    method = args.probe_memory
    model, tokenizer = load_model(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    windows = training_windows(tokenizer, args.train_data, args.seq_len)
    batch = torch.stack([w["input_ids"] for w in windows[: args.batch_size]]).to(device)
    calibration = calibration_batches(tokenizer, args.train_data, args.calibration_samples, args.seq_len, args.seed)
    if method in ("loraprune", PAPER, "lora-step"):
        model = add_lora(model, args.rank, args.alpha)
        schedule = LoRAPruneConfig(**PRESETS["paper"].schedule) if method == PAPER else LoRAPruneConfig()
        pruner = ModelPruner(model, 100, PruningTarget(0.5), schedule) if method != "lora-step" else None

        def work():
            model(input_ids=batch, labels=batch).loss.backward()
            if pruner is not None:
                pruner.observe()
    else:
        families = get_adapter(model).families(model, args.attention_unit)
        options = {"seed": args.seed} if method == "random" else {"batch_size": args.batch_size}
        criterion = get_criterion(method, **(options if method != "magnitude" else {}))

        def work():
            criterion.score(model, families, calibration.to(device))

    with torch.no_grad():  # pages in the weights and sets up the kernels, so the baseline is the loaded model
        model(input_ids=batch[:1])
    result = _peak_above_baseline(work)
    return {**result, "method": method, "tokens_per_pass": args.batch_size * args.seq_len}


def scoring_memory(args: argparse.Namespace, method: str) -> dict[str, Any]:
    command = [sys.executable, __file__, *sys.argv[1:], "--probe-memory", method]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------- step time


def step_times(args: argparse.Namespace, windows: list[dict]) -> dict[str, Any]:
    """Plain LoRA steps and LoRAPrune steps (still scoring) interleaved on the same batches, in seconds."""
    base, _ = load_model(args.model)
    models = {}
    for name in ("lora", "loraprune"):
        torch.manual_seed(args.seed)
        models[name] = add_lora(copy.deepcopy(base), args.rank, args.alpha)
    pruner = ModelPruner(models["loraprune"], 10**6, PruningTarget(0.5))  # a long run: every step scores
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=args.learning_rate)
        for name, m in models.items()
    }
    times: dict[str, list[float]] = {name: [] for name in models}
    scoring: list[float] = []  # the part of each LoRAPrune step spent in `observe` (the scoring itself)
    for repeat in range(args.step_time_repeats + 1):
        start = (repeat * args.batch_size) % (len(windows) - args.batch_size)
        batch = default_data_collator(windows[start : start + args.batch_size])
        for name, model in models.items():
            started = time.perf_counter()
            model(**batch).loss.backward()
            if name == "loraprune":
                observed = time.perf_counter()
                pruner.observe()
                if repeat > 0:
                    scoring.append(time.perf_counter() - observed)
            optimizers[name].step()
            if name == "loraprune":
                pruner.after_optimizer_step(optimizers[name])
            optimizers[name].zero_grad()
            if repeat > 0:  # the first round warms up
                times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "seconds": times,
        "median_seconds": medians,
        "ratio": medians["loraprune"] / medians["lora"],
        "scoring_seconds": scoring,
        "scoring_share": statistics.median(scoring) / medians["lora"],
        "batch": [args.batch_size, args.seq_len],
        "repeats": args.step_time_repeats,
    }


# ------------------------------------------------------------------------------------------ runs


def _perplexities(model, tokenizer, args: argparse.Namespace) -> dict[str, Any]:
    result = {
        "budget": evaluate_perplexity(
            model, tokenizer, args.eval_data, seq_len=args.seq_len, max_tokens=args.eval_max_tokens
        ).to_dict()
    }
    if args.confirm_data:
        text = confirmation_text(Path(args.confirm_data), Path(tempfile.gettempdir()) / "loraprune-gsm8k-test.txt")
        result["confirmation"] = evaluate_perplexity(
            model, tokenizer, str(text), seq_len=args.seq_len, max_tokens=args.confirm_max_tokens
        ).to_dict()
    if args.full_eval:
        result["full"] = evaluate_perplexity(model, tokenizer, args.eval_data, seq_len=args.seq_len).to_dict()
    return result


def _file_size(model, tokenizer) -> int:
    with tempfile.TemporaryDirectory(prefix="loraprune-bench-") as scratch:
        save_pruned_model(model, tokenizer, Path(scratch) / "model")
        return directory_size(Path(scratch) / "model")


def run_method(args: argparse.Namespace, method: str, sparsity: float, scratch: Path) -> dict[str, Any]:
    config = PruneModelConfig(
        output=str(scratch / f"{method}-{sparsity}"),
        model=args.model,
        method="loraprune" if method == PAPER else method,
        sparsity=sparsity,
        layers=args.layers,
        allocation=args.allocation,
        attention_unit=args.attention_unit,
        calibration_data=args.train_data,
        calibration_samples=args.calibration_samples,
        seq_len=args.seq_len,
        steps=args.steps,
        lora_rank=args.rank,
        lora_alpha=args.alpha,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    given = {name: getattr(args, name) for name in ("prune_every", "warmup", "cooldown")}
    schedule = LoRAPruneConfig(**{name: value for name, value in given.items() if value is not None})
    if method == PAPER:
        config, schedule = apply_preset("paper", config, schedule)
    started = time.perf_counter()
    result = prune_model(config, schedule)
    seconds = time.perf_counter() - started
    report = result.report
    row = {
        "method": method,
        "sparsity": sparsity,
        "params": report["params_after"],
        "decoder_params": report["decoder_params_after"],
        "sparsity_decoder": report["sparsity_decoder"],
        "sparsity_total": report["sparsity_total"],
        "file_size_bytes": report["file_size_bytes"],
        "prune_and_train_seconds": report["prune_seconds"],
        "run_seconds": seconds,
        "train_seconds": report["training"]["train_seconds"] if report["training"] else 0.0,
        "training": report["training"],
        "layers": report["layers"],
        "perplexity": _perplexities(result.model, result.tokenizer, args),
    }
    return row


def dense_rows(args: argparse.Namespace, windows: list[dict]) -> list[dict]:
    model, tokenizer = load_model(args.model)
    dense = {
        "method": "dense",
        "sparsity": 0.0,
        "params": count_parameters(model),
        "sparsity_decoder": 0.0,
        "sparsity_total": 0.0,
        "file_size_bytes": _file_size(model, tokenizer),
        "perplexity": _perplexities(model, tokenizer, args),
    }
    tuned_base, _ = load_model(args.model)
    settings = LoraSettings(
        steps=args.steps,
        rank=args.rank,
        alpha=args.alpha,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    started = time.perf_counter()
    run = train_lora(tuned_base, windows, settings)
    merged = run.model.merge_and_unload()
    tuned = {
        "method": "dense + LoRA",
        "sparsity": 0.0,
        "params": count_parameters(merged),
        "sparsity_decoder": 0.0,
        "sparsity_total": 0.0,
        "file_size_bytes": dense["file_size_bytes"],
        "train_seconds": run.seconds,
        "run_seconds": time.perf_counter() - started,
        "training": run.summary,
        "perplexity": _perplexities(merged, tokenizer, args),
    }
    return [dense, tuned]


# --------------------------------------------------------------------------------------- report


def _ppl(row: dict, which: str = "budget") -> str:
    value = row["perplexity"].get(which, {}).get("perplexity")
    return "-" if value is None else f"{value:.2f}"


def markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    rows = results["rows"]
    plain = next(r for r in rows if r["method"] == "dense + LoRA")
    lines = [
        "# Model pruning: LoRAPrune vs one-shot criteria + LoRA recovery (SmolLM2-135M)",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Data: LoRA training / calibration on `{settings['train_data']}`; perplexity on `{settings['eval_data']}`, "
        f"non-overlapping windows of {settings['seq_len']} tokens, first {settings['eval_max_tokens']:,} tokens "
        f"({rows[0]['perplexity']['budget']['dtype']}). Every method: {settings['steps']} LoRA steps of "
        f"{settings['batch_size']} x {settings['seq_len']} tokens, rank {settings['rank']}, lr "
        f"{settings['learning_rate']:g} (AdamW, linear decay), seed {settings['seed']}. One-shot criteria score on "
        f"{settings['calibration_samples']} x {settings['seq_len']} calibration tokens, then get the same LoRA "
        f"training (recovery). LoRAPrune: {_schedule_text(results)}. {PAPER}: `--preset paper` "
        f"({PRESETS['paper'].description}). Groups: KV groups and MLP channels, layers {settings['layers']}, "
        f"{settings['allocation']} ranking (except {PAPER}). Sparsity = fraction of the decoder layers' "
        "attention+MLP parameters removed."
        + (
            f" Confirmation corpus (used for no choice): the first {settings['confirm_max_tokens']:,} tokens of "
            f"`{settings['confirm_data']}` written as text (`Question: ...\\nAnswer: ...`), same windows."
            if settings.get("confirm_data")
            else ""
        ),
        "",
        f"Machine: {results['environment']['device']}, {results['torch_threads']} threads "
        f"(shared with other jobs: absolute times are noisy; ratios are measured side by side).",
        "",
    ]
    full = any("full" in r["perplexity"] for r in rows)
    confirm = any("confirmation" in r["perplexity"] for r in rows)
    header = "| method | sparsity | decoder removed | params | file MiB | ppl | ppl / dense | ppl / dense+LoRA |"
    header += " confirmation ppl |" if confirm else ""
    header += " full-test ppl |" if full else ""
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    dense = next(r for r in rows if r["method"] == "dense")
    for row in rows:
        ppl = row["perplexity"]["budget"]["perplexity"]
        cells = [
            row["method"],
            f"{row['sparsity']:.0%}",
            f"{row['sparsity_decoder']:.2%}",
            f"{row['params']:,}",
            f"{row['file_size_bytes'] / 2**20:.1f}",
            _ppl(row),
            f"{ppl / dense['perplexity']['budget']['perplexity']:.3f}",
            f"{ppl / plain['perplexity']['budget']['perplexity']:.3f}",
        ]
        if confirm:
            cells.append(_ppl(row, "confirmation"))
        if full:
            cells.append(_ppl(row, "full"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Cost",
        "",
        "| method | sparsity | scoring peak MiB | run time / plain LoRA run | forward latency / dense | "
        "FLOPs / dense | latency / FLOPs ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    memory = results["scoring_memory"]
    for row in rows:
        if row["method"] in ("dense", "dense + LoRA"):
            continue
        latency = results["latency"]["ratios"].get(f"{row['method']}-{row['sparsity']:g}", {})
        lat, flops = latency.get("forward_ms"), latency.get("flops")
        cells = [
            row["method"],
            f"{row['sparsity']:.0%}",
            f"{memory[row['method']]['peak_mib']:.0f}",
            f"{row['prune_and_train_seconds'] / plain['train_seconds']:.2f}",
            f"{lat:.3f}" if lat else "-",
            f"{flops:.3f}" if flops else "-",
            f"{lat / flops:.3f}" if lat and flops else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Latency: forward pass of batch "
        f"{settings['latency_batch']} x {settings['seq_len']} tokens, median of {settings['latency_repeats']} "
        "interleaved repeats, on models rebuilt at each run's layer widths (latency depends on the widths only).",
        "",
        f"Plain LoRA step (reference for memory): {memory['lora-step']['peak_mib']:.0f} MiB peak above the "
        f"loaded model ({memory['lora-step']['kind']}); batch {settings['batch_size']} x {settings['seq_len']}.",
        "",
        "Step time, interleaved in one process (median of "
        f"{results['step_time']['repeats']}): LoRAPrune step (scoring every step) "
        f"{results['step_time']['median_seconds']['loraprune']:.2f} s vs plain LoRA step "
        f"{results['step_time']['median_seconds']['lora']:.2f} s = **{results['step_time']['ratio']:.3f}x**"
        + (
            f"; the scoring itself (`observe`) takes {results['step_time']['scoring_share']:.1%} of a plain step."
            if "scoring_share" in results["step_time"]
            else "."
        ),
        *(
            []
            if "resumed" not in results
            else [
                "",
                "This benchmark was resumed (`" + results["resumed"]["command"] + "`): rows ran at different "
                "times under different loads of a shared 2-core machine, so the run-time column compares runs "
                "that did not run side by side; the interleaved step time above is the fair overhead measure.",
            ]
        ),
        "",
        "Memory: on a CPU the peak RSS of a whole step is dominated by activations and the logits, "
        "so the LoRAPrune step and Taylor's scoring pass are close; the scoring itself adds a few MiB "
        "to the LoRA step. Exact GPU figures (incl. a 1B shape): `memory_options_h100.md`.",
        "",
        "## Goals",
        "",
    ]
    lines += [
        f"- {goal['goal']}: **{'met' if goal['met'] else 'not met'}** ({goal['detail']})" for goal in results["goals"]
    ]
    return "\n".join(lines) + "\n"


def _schedule_text(results: dict[str, Any]) -> str:
    schedule = results.get("loraprune_schedule")
    if schedule is None:  # results written before the schedule was recorded
        settings = results["settings"]
        return f"every {settings['prune_every']} steps, warm-up {settings['warmup']}, cool-down {settings['cooldown']}"
    variant = schedule["form"] if schedule["score"] == "activation" else schedule["normalisation"]
    return (
        f"score {schedule['score']} ({variant}), "
        f"an event every {schedule['prune_every']} steps on a cubic ramp between a {schedule['warmup']:.0%} warm-up "
        f"and a {schedule['cooldown']:.0%} cool-down, EMA {schedule['ema']} from the {schedule['ema_start']} step"
    )


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = {(r["method"], r["sparsity"]): r for r in results["rows"]}
    memory = results["scoring_memory"]
    out = []
    for sparsity in results["settings"]["sparsities"]:
        lp, ty = rows.get(("loraprune", sparsity)), rows.get(("taylor", sparsity))
        if not (lp and ty):
            continue
        for corpus in ("budget", "confirmation"):
            if corpus not in lp["perplexity"] or corpus not in ty["perplexity"]:
                continue
            a, b = lp["perplexity"][corpus]["perplexity"], ty["perplexity"][corpus]["perplexity"]
            where = "WikiText-2 test" if corpus == "budget" else "the confirmation corpus"
            out.append(
                {
                    "goal": f"LoRAPrune perplexity below Taylor's at {sparsity:.0%} on {where}",
                    "met": a < b,
                    "detail": f"{a:.2f} vs {b:.2f}",
                }
            )
    if "loraprune" in memory and "lora-step" in memory:
        ratio = memory["loraprune"]["peak_mib"] / memory["lora-step"]["peak_mib"]
        out.append(
            {
                "goal": "LoRAPrune step peak memory <= 1.05x a plain LoRA step",
                "met": ratio <= 1.05,
                "detail": f"{memory['loraprune']['peak_mib']:.0f} / {memory['lora-step']['peak_mib']:.0f} MiB = "
                f"{ratio:.3f}x",
            }
        )
    for name, ratio in results["latency"]["ratios"].items():
        if name.endswith("-0.5"):
            rel = ratio["forward_ms"] / ratio["flops"]
            out.append(
                {
                    "goal": f"{name}: forward latency within 10% of its FLOPs ratio",
                    "met": abs(rel - 1) <= 0.1,
                    "detail": f"latency ratio {ratio['forward_ms']:.3f}, FLOPs ratio {ratio['flops']:.3f}",
                }
            )
    step = results["step_time"]["ratio"]
    out.append(
        {"goal": "LoRAPrune step time <= 1.1x plain LoRA step time", "met": step <= 1.1, "detail": f"{step:.3f}x"}
    )
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe_memory:
        print(json.dumps(probe_memory(args)))
        return 0
    command = "python benchmarks/model_pruning.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / f"{args.name}.json"
    settings = {k: v for k, v in vars(args).items() if k not in ("probe_memory", "resume", "only")}
    given = {name: settings[name] for name in ("prune_every", "warmup", "cooldown") if settings[name] is not None}
    results: dict[str, Any] = {
        "command": command,
        "settings": settings,
        "loraprune_schedule": dataclasses.asdict(LoRAPruneConfig(**given)),
        "environment": environment(),
        "torch_threads": torch.get_num_threads(),
    }
    if args.resume and json_path.exists():
        previous = json.loads(json_path.read_text())
        if previous["settings"] != settings:
            raise SystemExit(f"{json_path} was run with other settings; drop --resume to start over")
        results = {
            **previous,
            "resumed": {"command": command, "torch_threads": torch.get_num_threads(), "environment": environment()},
        }

    def save() -> None:
        write_json(json_path, results)

    if "scoring_memory" not in results:
        memory_methods = [
            "lora-step",
            *[m for m in args.methods if m in ("loraprune", PAPER, "taylor", "activation", "wanda-sp")],
        ]
        results["scoring_memory"] = {m: scoring_memory(args, m) for m in memory_methods}
        results["scoring_memory"].update(
            {m: {"peak_mib": 0.0, "kind": "no data pass"} for m in args.methods if m in ("magnitude", "random")}
        )
        save()
    _, tokenizer = load_model(args.model)
    windows = training_windows(tokenizer, args.train_data, args.seq_len)
    if "step_time" not in results:
        results["step_time"] = step_times(args, windows)
        save()
    if "rows" not in results:
        results["rows"] = dense_rows(args, windows)
        save()
    done = {f"{row['method']}-{row['sparsity']:g}" for row in results["rows"]}
    planned = {f"{method}-{sparsity:g}": (method, sparsity) for sparsity in args.sparsities for method in args.methods}
    unknown = set(args.only or ()) - set(planned)
    if unknown:
        raise SystemExit(f"--only names runs that are not planned: {sorted(unknown)}; planned: {sorted(planned)}")
    with tempfile.TemporaryDirectory(prefix="loraprune-bench-") as scratch:
        for name in args.only or planned:
            if name not in done:
                results["rows"].append(run_method(args, *planned[name], Path(scratch)))
                save()
    dense, _ = load_model(args.model)
    shaped = {
        f"{row['method']}-{row['sparsity']:g}": model_with_widths(dense, row["layers"])
        for row in results["rows"]
        if "layers" in row
    }
    latency = measure_latency(
        {"dense": dense, **shaped},
        batch_size=args.latency_batch,
        seq_len=args.seq_len,
        repeats=args.latency_repeats,
        gen_tokens=0,
        seed=args.seed,
    )
    results["latency"] = latency.to_dict()
    results["goals"] = goals(results)
    save()
    (output_dir / f"{args.name}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
