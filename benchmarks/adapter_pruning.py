"""PrunedLoRA against LoRA r, LoRA r0 and AdaLoRA r0 -> r on GSM8K SFT with the default model.

Every run: the same base model (fp32), the same tokenised GSM8K training set (prompt
`Question: ...\\nAnswer: `, loss on answer tokens, answers cut at `--max-answer-tokens`), the
same steps, batch, AdamW learning-rate schedule and seed (`loraprune.training.train`). Then,
on a fixed subset of the GSM8K test set (the first N problems in file order):

* mean answer-token NLL (token-weighted over all answer tokens of the first `--nll-problems`);
* exact match of the final number (`#### n`) with greedy decoding on the first `--em-problems`,
  at most `--max-new-tokens` new tokens (an answer cut before `####` counts as wrong);
* WikiText-2 test perplexity (first `--ppl-tokens` tokens, windows of 128) to measure forgetting;

and the costs: adapter file size, parameters in the saved adapter, training wall time (also
relative to LoRA at the same r0), the final rank of every module (heatmap layer x module).

Results are merged into benchmarks/results/adapter_pruning.json (runs keyed by name, so the
benchmark can be run in parts) and rendered to .md and .png. Example (small, minutes):

    python benchmarks/adapter_pruning.py --steps 4 --batch-size 2 --r0 16 --nll-problems 4 \\
        --em-problems 2 --max-new-tokens 16 --ppl-tokens 1024 --output-prefix /tmp/adapter_pruning
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from tqdm import tqdm

from loraprune.data import SFTCollator, final_answer, format_prompt, load_sft_records, tokenize_sft
from loraprune.evaluation.perplexity import evaluate_perplexity
from loraprune.evaluation.sft import answer_nll
from loraprune.io import write_json
from loraprune.lora import add_lora
from loraprune.models import DEFAULT_MODEL, load_model
from loraprune.rank_pruning.config import RankPruningConfig
from loraprune.rank_pruning.entry import ADAPTER_LR_SCHEDULE
from loraprune.rank_pruning.presets import PRESETS, preset_values
from loraprune.rank_pruning.pruner import RankPruner
from loraprune.rank_pruning.run import load_sft_dataset, save_adapter, split_held_out, train_adapter
from loraprune.run_report.plots import draw_rank_heatmap, new_figure, save_figure
from loraprune.training import LR_SCHEDULES, TrainingConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("LORAPRUNE_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--r0", type=int, nargs="+", default=[32, 128], help="initial ranks")
    parser.add_argument("--rank", type=int, default=8, help="final rank")
    parser.add_argument(
        "--schedules",
        nargs="+",
        default=["per_module", "global"],
        choices=["per_module", "global"],
        help="PrunedLoRA schedules to run",
    )
    parser.add_argument("--runs", nargs="*", default=None, help="run only these run names (default: all)")
    parser.add_argument(
        "--measured-curvature",
        action="store_true",
        help="PrunedLoRA with curvature_scale=measured (its held-out batch: the --held-out examples); its runs get "
        "the suffix -measured",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="PrunedLoRA runs with a named preset of loraprune prune-adapter (paper: the published score and "
        "recovery update in the adapter's own components); its runs get the suffix -PRESET",
    )
    parser.add_argument(
        "--no-gradient",
        action="store_true",
        help="PrunedLoRA without the gradient term of its score (use_gradient=False); its runs get the suffix -nograd",
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--lr-scheduler-type",
        default=ADAPTER_LR_SCHEDULE,
        choices=LR_SCHEDULES,
        help="learning-rate schedule of every run (the default of loraprune prune-adapter)",
    )
    parser.add_argument(
        "--decay-fraction", type=float, default=0.2, help="warmup_stable_decay: fraction of the steps decaying"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prune-every", type=int, default=10, help="K1 (and AdaLoRA's deltaT)")
    parser.add_argument("--per-event", type=int, default=2, help="K2 of the per-module schedule")
    defaults = RankPruningConfig()
    parser.add_argument(
        "--warmup", type=float, default=defaults.warmup, help="PrunedLoRA: fraction of the steps before the first event"
    )
    parser.add_argument(
        "--cooldown",
        type=float,
        default=defaults.cooldown,
        help="PrunedLoRA: fraction of the steps trained at the final rank after the last event",
    )
    parser.add_argument(
        "--held-out",
        type=int,
        default=defaults.calibration_examples,
        help="the last N training examples are held out for every method (as `loraprune prune-adapter` does); "
        "PrunedLoRA measures its pruning events on them",
    )
    parser.add_argument(
        "--compensate",
        nargs="+",
        default=["auto"],
        choices=("auto", "b", "a", "both"),
        help="PrunedLoRA recovery-update variants to run (runs other than auto get a -VARIANT suffix)",
    )
    parser.add_argument("--max-answer-tokens", type=int, default=256)
    parser.add_argument("--nll-problems", type=int, default=64)
    parser.add_argument(
        "--confirm-problems",
        type=int,
        default=128,
        help="also the answer-token NLL on this many test problems after the first --nll-problems: a second "
        "set that played no part in choosing the defaults (0: none)",
    )
    parser.add_argument("--em-problems", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--ppl-tokens", type=int, default=16384)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output-prefix", default=str(REPO_ROOT / "benchmarks" / "results" / "adapter_pruning"))
    parser.add_argument("--fresh", action="store_true", help="discard earlier runs in the JSON instead of merging")
    parser.add_argument(
        "--step-time",
        type=int,
        default=0,
        metavar="STEPS",
        help="instead of the runs: time STEPS optimizer steps of LoRA at r0 and of PrunedLoRA "
        "(per-step scoring and its pruning events included), interleaved in one process, per r0",
    )
    return parser.parse_args(argv)


def _variant(args: argparse.Namespace, compensate: str) -> str:
    suffix = "" if compensate == "auto" else f"-{compensate}"
    suffix += "-nograd" if args.no_gradient else ""
    suffix += "-measured" if args.measured_curvature else ""
    return suffix + (f"-{args.preset}" if args.preset else "")


def planned_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run specifications in the order they run: the per-module comparisons first, global variants last."""
    runs = [{"name": f"lora-r{args.rank}", "method": "lora", "r0": max(args.r0), "schedule": "per_module"}]
    for r0 in args.r0:
        runs.append({"name": f"lora-r{r0}", "method": "lora-r0", "r0": r0, "schedule": "per_module"})
        if "per_module" in args.schedules:
            runs += [
                {
                    "name": f"prunedlora-{r0}to{args.rank}{_variant(args, c)}",
                    "method": "prunedlora",
                    "r0": r0,
                    "schedule": "per_module",
                    "compensate": c,
                }
                for c in args.compensate
            ]
        runs.append({"name": f"adalora-{r0}to{args.rank}", "method": "adalora", "r0": r0, "schedule": "global"})
    if "global" in args.schedules:
        runs += [
            {
                "name": f"prunedlora-{r0}to{args.rank}-global{_variant(args, c)}",
                "method": "prunedlora",
                "r0": r0,
                "schedule": "global",
                "compensate": c,
            }
            for r0 in args.r0
            for c in args.compensate
        ]
    return [run for run in runs if args.runs is None or run["name"] in args.runs]


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def greedy_exact_match(
    model: torch.nn.Module, tokenizer: Any, records: list, max_new_tokens: int, batch_size: int
) -> dict[str, Any]:
    """Greedy decoding (left-padded batches), exact match of the final number after `####`."""
    tokenizer.padding_side = "left"
    correct, outputs = 0, []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        encoded = tokenizer(
            [format_prompt(r.question) for r in chunk], return_tensors="pt", padding=True, add_special_tokens=False
        )
        generated = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        for record, text in zip(chunk, texts):
            predicted, expected = final_answer(text), final_answer(record.answer)
            correct += int(predicted is not None and predicted == expected)
            outputs.append({"predicted": predicted, "expected": expected})
    return {
        "exact_match": correct / len(records),
        "correct": correct,
        "problems": len(records),
        "with_final_number": sum(o["predicted"] is not None for o in outputs),
    }


def evaluate(model: torch.nn.Module, tokenizer: Any, test: dict[str, Any], args: argparse.Namespace) -> dict:
    model.eval()
    started = time.perf_counter()
    result = {"test_nll": answer_nll(model, test["nll_examples"], tokenizer.pad_token_id, args.eval_batch_size)}
    if test.get("confirm_examples"):
        result["confirm_nll"] = {
            **answer_nll(model, test["confirm_examples"], tokenizer.pad_token_id, args.eval_batch_size),
            "skip": args.nll_problems,
            "problems": len(test["confirm_examples"]),
        }
    result["gsm8k_greedy"] = greedy_exact_match(
        model, tokenizer, test["em_records"], args.max_new_tokens, args.eval_batch_size
    )
    ppl = evaluate_perplexity(
        model,
        tokenizer,
        str(data_root() / "wikitext2" / "wiki.test.raw"),
        seq_len=128,
        max_tokens=args.ppl_tokens,
        batch_size=args.eval_batch_size,
        progress=False,
    )
    result["wikitext2"] = {"perplexity": ppl.perplexity, "tokens": ppl.tokens, "seq_len": ppl.seq_len}
    result["eval_seconds"] = time.perf_counter() - started
    return result


# ---------------------------------------------------------------------------- runs


def pruning_config(args: argparse.Namespace, r0: int, prunedlora: bool, **fields: Any) -> RankPruningConfig:
    """The run's RankPruningConfig: `--preset` (PrunedLoRA runs only) under the benchmark's own options."""
    preset = preset_values(args.preset) if prunedlora and args.preset else {}
    explicit = {
        "r0": r0,
        "rank": args.rank,
        "prune_every": args.prune_every,
        "per_event": args.per_event,
        "warmup": args.warmup,
        "cooldown": args.cooldown,
        **fields,
    }
    return RankPruningConfig(**{**preset, **explicit})


def run_one(
    spec: dict[str, Any], args: argparse.Namespace, train_set: list, held_out: list, test: dict
) -> dict[str, Any]:
    model, tokenizer = load_model(args.model)
    collator = SFTCollator(tokenizer.pad_token_id)
    prunedlora = spec["method"] == "prunedlora"
    pruning = pruning_config(
        args,
        spec["r0"],
        prunedlora,
        schedule=spec["schedule"],
        calibration_examples=args.held_out,
        compensate=spec.get("compensate", "auto"),
        use_gradient=not (prunedlora and args.no_gradient),
        **({"curvature_scale": "measured"} if prunedlora and args.measured_curvature else {}),
    )
    training = TrainingConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type,
        decay_fraction=args.decay_fraction,
        seed=args.seed,
        logging_steps=max(1, args.steps // 10),
    )
    run = train_adapter(model, train_set, collator, spec["method"], pruning, training, held_out=held_out)
    with tempfile.TemporaryDirectory() as scratch:
        exported = save_adapter(run, Path(scratch) / "adapter", model.name_or_path)
    result = {
        **spec,
        "command": "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0])), *sys.argv[1:]]),
        "rank": args.rank if spec["method"] != "lora-r0" else spec["r0"],
        "pruning_config": {k: v for k, v in vars(pruning).items() if k != "target_modules"},
        "train_seconds": run.train_seconds,
        "seconds_per_step": run.train_seconds / args.steps,
        "final_ranks": run.ranks,
        "total_rank": sum(run.ranks.values()),
        "modules_at_rank_zero": sum(r == 0 for r in run.ranks.values()),
        "adapter_parameters": exported.parameters,
        "adapter_file_bytes": exported.file_bytes,
        "train_loss": [{"step": h["step"], "loss": h["loss"]} for h in run.log_history if "loss" in h],
        "pruning_events": run.pruning_events,
    }
    result.update(evaluate(run.model, tokenizer, test, args))
    return result


def step_times(args: argparse.Namespace, train_set: list, r0: int) -> dict[str, Any]:
    """Wall time of LoRA at `r0` and of PrunedLoRA `r0 -> rank` over the same `args.step_time` steps.

    One process, the same batches, the order of the two alternating every step; PrunedLoRA's
    time includes its per-step gradient statistics and the pruning events of its schedule, so
    the ratio of the totals is its training-time overhead on a machine whose load varies.
    """
    base, tokenizer = load_model(args.model)
    collator = SFTCollator(tokenizer.pad_token_id)
    config = pruning_config(args, r0, prunedlora=True)
    models, optimizers = {}, {}
    for name in ("lora-r0", "prunedlora"):
        torch.manual_seed(args.seed)
        models[name] = add_lora(copy.deepcopy(base), r0, config.lora_alpha, config.target_modules)
        optimizers[name] = torch.optim.AdamW(
            [p for p in models[name].parameters() if p.requires_grad], lr=args.learning_rate
        )
    pruner = RankPruner(models["prunedlora"], config, args.step_time)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for step in tqdm(range(1, args.step_time + 1), desc=f"step time r0={r0}"):
        batch = collator(train_set[(step - 1) * args.batch_size : step * args.batch_size])
        order = list(models) if step % 2 else list(reversed(models))
        for name in order:
            started = time.perf_counter()
            models[name](**batch).loss.backward()
            if name == "prunedlora":
                pruner.observe_gradients()
            optimizers[name].step()
            if name == "prunedlora":
                pruner.step(step, optimizers[name])
            optimizers[name].zero_grad()
            seconds[name].append(time.perf_counter() - started)
    totals = {name: sum(values) for name, values in seconds.items()}
    return {
        "r0": r0,
        "rank": args.rank,
        "steps": args.step_time,
        "batch_size": args.batch_size,
        "pruning_events": [event.step for event in pruner.history],
        "final_total_rank": sum(pruner.ranks().values()),
        "seconds": seconds,
        "total_seconds": totals,
        "ratio": totals["prunedlora"] / totals["lora-r0"],
        "criterion": config.criterion,
        "basis": config.basis,
        "curvature_statistics_bytes": pruner.stats.nbytes,
        "torch_threads": torch.get_num_threads(),
    }


def load_test_sets(tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    path = data_root() / "gsm8k" / "test.jsonl"
    limit = max(args.nll_problems + args.confirm_problems, args.em_problems)
    records = load_sft_records(str(path), split="test", limit=limit)
    confirm = records[args.nll_problems : args.nll_problems + args.confirm_problems]
    return {
        "path": str(path),
        "nll_examples": tokenize_sft(records[: args.nll_problems], tokenizer, args.max_answer_tokens),
        "confirm_examples": tokenize_sft(confirm, tokenizer, args.max_answer_tokens) if confirm else [],
        "em_records": records[: args.em_problems],
    }


def with_relative_times(results: dict[str, Any]) -> None:
    """Training time of every run relative to plain LoRA at the same r0 (when that run exists)."""
    for run in results["runs"].values():
        reference = results["runs"].get(f"lora-r{run['r0']}")
        run["time_vs_lora_r0"] = (run["train_seconds"] / reference["train_seconds"]) if reference else None


def goals(results: dict[str, Any], rank: int) -> list[dict[str, Any]]:
    """The benchmark's goals, checked on the recorded numbers (None where a run is missing)."""
    runs = results["runs"]
    out = []
    for name, run in runs.items():
        if run["method"] != "prunedlora":
            continue
        nll = run["test_nll"]["nll"]
        lora_r = runs.get(f"lora-r{rank}")
        lora_r0 = runs.get(f"lora-r{run['r0']}")
        adalora = runs.get(f"adalora-{run['r0']}to{rank}")
        step = results.get("step_time", {}).get(str(run["r0"]))  # interleaved: fair on a loaded machine
        time_ratio = step["ratio"] if step else run["time_vs_lora_r0"]
        out.append(
            {
                "run": name,
                "nll_below_lora_r": None if lora_r is None else nll < lora_r["test_nll"]["nll"],
                "nll_below_adalora": None if adalora is None else nll < adalora["test_nll"]["nll"],
                "nll_within_2pct_of_lora_r0": None if lora_r0 is None else nll <= 1.02 * lora_r0["test_nll"]["nll"],
                "time_ratio": time_ratio,
                "time_measured_by": "interleaved steps" if step else "whole runs",
                "time_at_most_1.25x_lora_r0": None if time_ratio is None else time_ratio <= 1.25,
            }
        )
    return out


# ---------------------------------------------------------------------------- reports


def plot_heatmaps(results: dict[str, Any], path: Path) -> None:
    adaptive = [(n, r) for n, r in results["runs"].items() if r["method"] in ("prunedlora", "adalora")]
    if not adaptive:
        return
    figure = new_figure(2.6 * len(adaptive) + 1, 7)
    axes = figure.subplots(1, len(adaptive), squeeze=False)[0]
    vmax = max(max(r["final_ranks"].values()) for _, r in adaptive)
    image = None
    for axis, (name, run) in zip(axes, adaptive):
        image = draw_rank_heatmap(axis, run["final_ranks"], vmax=vmax)
        axis.set_title(name, fontsize=8)
    for axis in axes[1:]:
        axis.set_ylabel("")
    figure.colorbar(image, ax=axes.tolist(), label="final rank", shrink=0.8)
    figure.suptitle(f"Final rank per module (layer x projection), target mean rank {results['settings']['rank']}")
    save_figure(figure, path)


def _confirm(result: dict[str, Any]) -> str:
    """The NLL on the confirmation problems, or '-' for a run measured before they existed."""
    return f"{result['confirm_nll']['nll']:.4f}" if "confirm_nll" in result else "-"


def _held_out_text(settings: dict[str, Any]) -> str:
    """The held-out examples of the table's runs, in words ('' for tables recorded before they existed)."""
    if "held_out" not in settings:
        return ""
    return (
        f"The last {settings['held_out']} training examples are held out for every method (PrunedLoRA measures "
        "its pruning events on them). "
    )


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    base = results["before_training"]
    lines = [
        "# Adapter-rank pruning: PrunedLoRA vs LoRA and AdaLoRA (GSM8K SFT, SmolLM2-135M)",
        "",
        f"Reproduce: `{results['command']}`",
        "",
        f"Training: {s['steps']} steps, batch {s['batch_size']}, AdamW lr {s['learning_rate']} "
        f"({s.get('lr_scheduler_type', 'linear')} schedule), "
        f"seed {s['seed']}, fp32 on {results['environment']['device']}, all seven projections, scaling "
        f"alpha/r = 1 for every method, answers cut at {s['max_answer_tokens']} tokens, loss on answer tokens. "
        f"{_held_out_text(s)}"
        f"PrunedLoRA: prune every {s['prune_every']} steps after a {s.get('warmup', 0.1):.0%} warm-up until the "
        f"start of a {s.get('cooldown', 0.1):.0%} cool-down (per_module: K2 = {s['per_event']} raised to reach "
        f"the target in time; global: cubic budget). Each run's score is in its `pruning_config`: `magnitude` "
        f"in the `singular` basis (the default since 2026-12-02: the weakest singular components of each "
        f"module's update B*A removed at every event, a truncated SVD), or `obs` in the adapter's own "
        f"`components` (runs suffixed -paper, and the runs recorded without a `basis`): "
        f"OBS score with gradient term, recovery update on one factor (auto: the one the quadratic model prices "
        f"lower; runs suffixed -both apply both one-sided updates, the paper's literal form), "
        f"curvature from the gradient Gram matrices since the last event (each run's "
        f"`pruning_config.curvature_scale`; runs recorded without it used the plain mean Gram, `gram`), "
        f"damping 1 %. "
        f"AdaLoRA: PEFT defaults, tinit/tfinal/deltaT = the same warm-up/cool-down/interval.",
        "",
        f"Evaluation: answer-token NLL on the first {s['nll_problems']} problems of GSM8K test.jsonl (file "
        f"order); greedy exact match of the `####` number on the first {s['em_problems']} problems, at most "
        f"{s['max_new_tokens']} new tokens; WikiText-2 test perplexity on the first {s['ppl_tokens']} tokens in "
        "windows of 128."
        + (
            " Confirmation set: the answer-token NLL on the next problems of GSM8K test "
            f"(problems {s['nll_problems']}-{s['nll_problems'] + s['confirm_problems'] - 1}), which played "
            "no part in choosing the defaults ('-': measured before it existed)."
            if s.get("confirm_problems")
            else ""
        ),
        "",
        "| run | final total rank (mean) | modules at 0 | test NLL | NLL, confirmation set | EM | WikiText-2 ppl | "
        "adapter params | file (MB) | train s/step | time vs LoRA r0 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| base model (no training) | - | - | {base['test_nll']['nll']:.4f} | {_confirm(base)} | "
        f"{base['gsm8k_greedy']['correct']}/{base['gsm8k_greedy']['problems']} | "
        f"{base['wikitext2']['perplexity']:.2f} | - | - | - | - |",
    ]
    for name, r in results["runs"].items():
        modules = len(r["final_ranks"])
        rel = "-" if r["time_vs_lora_r0"] is None else f"{r['time_vs_lora_r0']:.2f}x"
        lines.append(
            f"| {name} | {r['total_rank']} ({r['total_rank'] / modules:.2f}) | {r['modules_at_rank_zero']} | "
            f"{r['test_nll']['nll']:.4f} | {_confirm(r)} | "
            f"{r['gsm8k_greedy']['correct']}/{r['gsm8k_greedy']['problems']} | "
            f"{r['wikitext2']['perplexity']:.2f} | {r['adapter_parameters']:,} | "
            f"{r['adapter_file_bytes'] / 2**20:.2f} | {r['seconds_per_step']:.2f} | {rel} |"
        )
    lines += [
        "",
        "## Goals",
        "",
        "| PrunedLoRA run | NLL < LoRA r | NLL < AdaLoRA | NLL within 2 % of LoRA r0 | time <= 1.25x LoRA r0 |",
        "|---|---|---|---|---|",
    ]
    mark = {True: "met", False: "**not met**", None: "n/a"}
    for goal in results["goals"]:
        lines.append(
            f"| {goal['run']} | {mark[goal['nll_below_lora_r']]} | {mark[goal['nll_below_adalora']]} | "
            f"{mark[goal['nll_within_2pct_of_lora_r0']]} | {mark[goal['time_at_most_1.25x_lora_r0']]} |"
        )
    if results.get("step_time"):
        lines += [
            "",
            "## Training time",
            "",
            "LoRA at r0 and PrunedLoRA (its per-step statistics and pruning events included) on the same "
            "batches in one process, the order alternating every step (`--step-time STEPS`); the goal uses "
            "this ratio, since the whole runs above ran at different times on a shared machine.",
            "",
            "| r0 | steps | pruning events at | LoRA r0 s | PrunedLoRA s | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for r0, step in results["step_time"].items():
            lines.append(
                f"| {r0} | {step['steps']} | {', '.join(map(str, step['pruning_events']))} | "
                f"{step['total_seconds']['lora-r0']:.1f} | {step['total_seconds']['prunedlora']:.1f} | "
                f"{step['ratio']:.3f}x |"
            )
    lines += ["", f"![final ranks]({Path(results['heatmap']).name})", ""]
    if results.get("notes"):
        lines += ["## Notes", "", *results["notes"], ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    obs_variants = args.no_gradient or args.measured_curvature or args.compensate != ["auto"]
    if obs_variants and args.preset is None:  # the default criterion (magnitude) has no such variants
        raise SystemExit(
            "--no-gradient, --measured-curvature and --compensate are variants of the obs criterion; add --preset paper"
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    prefix = Path(args.output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path = prefix.with_suffix(".json")
    # per-run choices (recorded in each run's pruning_config) are not settings of the whole table
    per_run = ("runs", "fresh", "output_prefix", "step_time", "no_gradient", "measured_curvature", "preset")
    settings = {k: v for k, v in vars(args).items() if k not in per_run}
    if args.lr_scheduler_type != "warmup_stable_decay":
        settings.pop("decay_fraction")
    previous = json.loads(json_path.read_text()) if json_path.exists() and not args.fresh else None
    if previous is not None and previous["settings"] != settings:
        raise SystemExit(f"{json_path} holds runs with other settings; pass --fresh to start over")
    results = previous or {
        "command": "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0])), *sys.argv[1:]]),
        "settings": settings,
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
            "device": "cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
            "torch_threads": torch.get_num_threads(),
        },
        "data": {
            "train": str(data_root() / "gsm8k" / "train.jsonl"),
            "test": str(data_root() / "gsm8k" / "test.jsonl"),
            "wikitext2": str(data_root() / "wikitext2" / "wiki.test.raw"),
        },
        "runs": {},
    }
    _, tokenizer = load_model(args.model)
    examples, _ = load_sft_dataset(
        str(data_root() / "gsm8k" / "train.jsonl"), tokenizer, max_answer_tokens=args.max_answer_tokens
    )
    # as `loraprune prune-adapter` does: every method trains without the held-out examples on
    # which PrunedLoRA measures its pruning events, so a run here is the command's run
    train_set, held_out = split_held_out(examples, args.held_out)
    if args.step_time:
        results["step_time"] = {str(r0): step_times(args, train_set, r0) for r0 in args.r0}
        results["goals"] = goals(results, args.rank)
        write_json(json_path, results)
        if "before_training" in results:  # the runs exist: redo the table with the new timing
            prefix.with_suffix(".md").write_text(markdown(results))
        print({r0: f"{step['ratio']:.3f}x" for r0, step in results["step_time"].items()})
        return 0
    test = load_test_sets(tokenizer, args)
    if "before_training" not in results:
        model, _ = load_model(args.model)
        results["before_training"] = evaluate(model, tokenizer, test, args)
    for spec in tqdm(planned_runs(args), desc="runs"):
        torch.manual_seed(args.seed)
        results["runs"][spec["name"]] = run_one(spec, args, train_set, held_out, test)
        with_relative_times(results)
        results["goals"] = goals(results, args.rank)
        results["heatmap"] = str(prefix.with_suffix(".png"))
        write_json(json_path, results)
        plot_heatmaps(results, prefix.with_suffix(".png"))
        prefix.with_suffix(".md").write_text(markdown(results))
    print(prefix.with_suffix(".md").read_text())
    return 0 if all(math.isfinite(r["test_nll"]["nll"]) for r in results["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
