"""N:M semi-structured sparsity side by side: LoRAPrune N:M against Wanda, SparseGPT and magnitude (2:4, 4:8).

Every method prunes the same 210 projections (q, k, v, o, gate, up, down of all 30 layers of
SmolLM2-135M) to the same pattern, from the same text (`--train-data`, WikiText-2's
validation split): LoRAPrune N:M scores every weight with LoRA's weights and gradients while
LoRA trains for `--steps` steps (2:4 via 3:4, 4:8 via 7:8, 6:8, 5:8 on the cubic schedule);
Wanda and SparseGPT calibrate layer by layer on `--calibration-samples` random windows of it;
magnitude needs no data. With recovery (the default), the one-shot methods then get the same
LoRA training (steps, rank, lr, batch, seed) under their fixed mask, so the comparison with
LoRAPrune is at the same training budget; their one-shot perplexity is reported too. Two
reference rows: the dense model, and "dense + LoRA" (the same fine-tuning without pruning:
WikiText fine-tuning also adapts the domain).

Every N:M model is the merged `mask ⊙ (W0 + s·B·A)` and is checked to hold its pattern exactly
(groups of M counted). Perplexity: first `--eval-max-tokens` tokens of the test text in
non-overlapping windows of `--seq-len`.

`--speed` (CUDA only; skipped with a note on CPU): the LoRAPrune 2:4 model in float16, its
projection weights converted with `torch.sparse.to_sparse_semi_structured`, against the same
weights in dense storage: forward latency, interleaved repeats, median, per batch size, and the
largest logit difference between the two.

Full run:

    nice python benchmarks/semi_structured.py --steps 40 --eval-max-tokens 16384

The committed benchmarks/results/semi_structured.* were run at reduced CPU settings (their
`command` field): `--steps 20 --eval-max-tokens 8192 --calibration-samples 32 --threads 1`.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from loraprune.data import calibration_batches
from loraprune.errors import LoraPruneError
from loraprune.evaluation.latency import measure_latency
from loraprune.evaluation.perplexity import evaluate_perplexity
from loraprune.io import write_json
from loraprune.model_pruning import LoRAPruneConfig
from loraprune.model_pruning.run import LoraSettings, train_lora, training_windows
from loraprune.models import load_model
from loraprune.run_report.summary import environment
from loraprune.semi_structured import (
    NMPattern,
    loraprune_nm,
    masked_recovery,
    nm_modules,
    nm_summary,
    prune_one_shot,
    to_semi_structured,
)
from loraprune.semi_structured.config import NM_METHODS
from loraprune.semi_structured.run import require_pattern
from loraprune.semi_structured.targets import base_linear

ROOT = Path(__file__).resolve().parents[1]
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
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--patterns", nargs="+", default=["2:4", "4:8"])
    parser.add_argument("--methods", nargs="+", default=list(NM_METHODS), choices=NM_METHODS)
    parser.add_argument("--steps", type=int, default=40, help="LoRA steps (LoRAPrune, recovery, dense + LoRA)")
    parser.add_argument(
        "--no-recovery",
        dest="recovery",
        action="store_false",
        help="one-shot methods without the LoRA training under their mask",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--sparsegpt-block-size", type=int, default=128)
    parser.add_argument("--sparsegpt-damp", type=float, default=0.01)
    parser.add_argument("--prune-every", type=int, default=4)
    parser.add_argument("--warmup", type=float, default=0.1)
    parser.add_argument("--cooldown", type=float, default=0.1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--speed", action="store_true", help="time the 2:4 model on sparse tensor cores (CUDA)")
    parser.add_argument(
        "--speed-only",
        action="store_true",
        help="only time a 2:4 model (magnitude masks: the kernels' time does not depend on which "
        "weights are kept); no training, no perplexity",
    )
    parser.add_argument("--speed-batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--speed-repeats", type=int, default=20)
    parser.add_argument(
        "--matches-within",
        type=float,
        default=0.05,
        help="'LoRAPrune matches a baseline' = its perplexity is at most this fraction above",
    )
    parser.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default="semi_structured", help="results are written to NAME.json and NAME.md")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ runs


def _perplexity(model, tokenizer, args: argparse.Namespace) -> dict[str, Any]:
    return evaluate_perplexity(
        model, tokenizer, args.eval_data, seq_len=args.seq_len, max_tokens=args.eval_max_tokens, model_name=args.model
    ).to_dict()


def _lora(args: argparse.Namespace) -> LoraSettings:
    return LoraSettings(
        steps=args.steps,
        rank=args.rank,
        alpha=args.alpha,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        seed=args.seed,
    )


def dense_rows(args: argparse.Namespace, windows: list[dict]) -> list[dict[str, Any]]:
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    rows = [{"method": "dense", "pattern": None, "perplexity": _perplexity(model, tokenizer, args)}]
    if args.steps:
        started = time.perf_counter()
        run = train_lora(model, windows, _lora(args))
        merged = run.model.merge_and_unload()
        rows.append(
            {
                "method": "dense + LoRA",
                "pattern": None,
                "training": run.summary,
                "run_seconds": time.perf_counter() - started,
                "perplexity": _perplexity(merged, tokenizer, args),
            }
        )
    return rows


def nm_row(
    args: argparse.Namespace, method: str, pattern: NMPattern, windows: list[dict], batches: torch.Tensor
) -> tuple[dict[str, Any], torch.nn.Module]:
    """One method at one pattern: prune (and train), check the pattern, evaluate."""
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    modules = nm_modules(model, pattern)
    row: dict[str, Any] = {"method": method, "pattern": str(pattern)}
    started = time.perf_counter()
    if method == "loraprune":
        schedule = LoRAPruneConfig(prune_every=args.prune_every, warmup=args.warmup, cooldown=args.cooldown)
        model, run, _ = loraprune_nm(model, windows, _lora(args), pattern, schedule)
        row["training"] = run.summary
    else:
        masks = prune_one_shot(
            model,
            method,
            pattern,
            modules,
            batches,
            batch_size=args.batch_size,
            block_size=args.sparsegpt_block_size,
            damp=args.sparsegpt_damp,
        )
        row["one_shot_seconds"] = time.perf_counter() - started
        row["perplexity_one_shot"] = _perplexity(model, tokenizer, args)
        if args.recovery and args.steps:
            model, run = masked_recovery(model, masks, windows, _lora(args))
            row["training"] = run.summary
    row["run_seconds"] = time.perf_counter() - started
    row["nm"] = nm_summary(model, modules, pattern)
    require_pattern(row["nm"])
    if method == "loraprune" or (args.recovery and args.steps):
        row["perplexity"] = _perplexity(model, tokenizer, args)
    return row, model


# ----------------------------------------------------------------------------------------- speed


SPARSE_BACKENDS = ("cusparselt", "cutlass")


def _linear_ms(weight: torch.Tensor, x: torch.Tensor, repeats: int) -> float:
    """Median time of `F.linear(x, weight)` in milliseconds (CUDA events, after warm-up)."""
    times = []
    for index in range(repeats + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.nn.functional.linear(x, weight)
        end.record()
        torch.cuda.synchronize()
        if index >= 3:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def speed(model: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """A 2:4 model on sparse tensor cores (cuSPARSELt and CUTLASS) vs the same weights stored dense (float16, CUDA).

    Whole-model forward latency (interleaved repeats, median) per batch size, and the time of
    one projection's matrix product alone, which separates the kernels from per-call overheads.
    """
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device: torch's semi-structured sparse kernels run on NVIDIA GPUs only"}
    dense = copy.deepcopy(model).to(device="cuda", dtype=torch.float16).eval()
    modules = nm_modules(dense, NMPattern(2, 4))
    models: dict[str, torch.nn.Module] = {"dense storage": dense}
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "dtype": "float16",
        "torch": torch.__version__,
        "backends": {},
        "max_logit_difference": {},
        "by_batch": {},
        "projection_ms": {},
    }
    probe = torch.randint(0, dense.config.vocab_size, (2, args.seq_len), device="cuda")
    with torch.no_grad():
        reference = dense(input_ids=probe).logits
        for backend in SPARSE_BACKENDS:  # a backend may convert but not run on this GPU (CUTLASS: Ampere only)
            sparse = copy.deepcopy(dense)
            try:
                result["backends"][backend] = to_semi_structured(sparse, modules, backend)
                logits = sparse(input_ids=probe).logits
            except (RuntimeError, LoraPruneError) as error:
                result["backends"][backend] = f"unavailable: {str(error).splitlines()[0]}"
                continue
            models[f"2:4 {backend}"] = sparse
            result["max_logit_difference"][f"2:4 {backend}"] = float((logits - reference).abs().max())
    for batch in args.speed_batches:
        latency = measure_latency(
            models,
            batch_size=batch,
            seq_len=args.seq_len,
            repeats=args.speed_repeats,
            warmup=3,
            gen_tokens=0,
            seed=args.seed,
            progress=False,
        )
        medians = {cost.name: cost.forward_median_ms for cost in latency.models}
        result["by_batch"][str(batch)] = {
            "tokens": batch * args.seq_len,
            "median_ms": medians,
            "over_dense": {name: ms / medians["dense storage"] for name, ms in medians.items()},
        }
    tokens = max(args.speed_batches) * args.seq_len
    with torch.no_grad():
        for module in (modules[4], modules[6]):  # gate_proj and down_proj of layer 0: the largest shapes
            weights = {name: base_linear(m, module).weight for name, m in models.items()}
            x = torch.randn(tokens, weights["dense storage"].shape[1], device="cuda", dtype=torch.float16)
            shape = "x".join(str(size) for size in weights["dense storage"].shape)
            result["projection_ms"][f"{module} ({shape}, {tokens} tokens)"] = {
                name: _linear_ms(weight, x, args.speed_repeats) for name, weight in weights.items()
            }
    return result


# --------------------------------------------------------------------------------------- report


def _ppl(entry: dict[str, Any] | None) -> float | None:
    return None if entry is None else entry["perplexity"]


def verdicts(results: dict[str, Any]) -> list[dict[str, Any]]:
    """For each pattern: LoRAPrune against the best baseline, one-shot and at the same LoRA budget."""
    rows = results["rows"]
    tolerance = results["settings"]["matches_within"]
    out = []
    for pattern in results["settings"]["patterns"]:
        mine = next((r for r in rows if r["method"] == "loraprune" and r["pattern"] == pattern), None)
        if mine is None:
            continue
        for label, key in (("one-shot, no training", "perplexity_one_shot"), ("same LoRA training", "perplexity")):
            baselines = [
                (r["method"], _ppl(r.get(key)))
                for r in rows
                if r["pattern"] == pattern and r["method"] in ("wanda", "sparsegpt") and r.get(key)
            ]
            if not baselines:
                continue
            name, best = min(baselines, key=lambda item: item[1])
            ratio = _ppl(mine["perplexity"]) / best
            out.append(
                {
                    "pattern": pattern,
                    "against": label,
                    "best_baseline": name,
                    "baseline_perplexity": best,
                    "loraprune_perplexity": _ppl(mine["perplexity"]),
                    "ratio": ratio,
                    "matches": ratio <= 1 + tolerance,
                    "better": ratio < 1,
                }
            )
    return out


def speed_markdown(speed_result: dict[str, Any] | None, seq_len: int) -> list[str]:
    """The lines of the speed section."""
    lines: list[str] = []
    if speed_result is None:
        lines.append("Not measured (run with `--speed` on a CUDA GPU).")
    elif "skipped" in speed_result:
        lines.append(f"Skipped: {speed_result['skipped']}.")
    else:
        names = list(next(iter(speed_result["by_batch"].values()))["median_ms"])
        differences = ", ".join(f"{name} {value:.3g}" for name, value in speed_result["max_logit_difference"].items())
        lines += [
            f"{speed_result['device']}, {speed_result['dtype']}, torch {speed_result['torch']}; backends: "
            + ", ".join(f"{k} = {v}" for k, v in speed_result["backends"].items())
            + f". Largest logit difference to dense storage: {differences}.",
            "",
            "Whole-model forward, median ms (ratio to dense storage):",
            "",
            "| batch x seq_len | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for batch, entry in speed_result["by_batch"].items():
            cells = [f"{entry['median_ms'][n]:.2f} ({entry['over_dense'][n]:.2f}x)" for n in names]
            lines.append(f"| {batch} x {seq_len} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "One projection's product alone, median ms:",
            "",
            "| projection | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for module, entry in speed_result["projection_ms"].items():
            lines.append(f"| {module} | " + " | ".join(f"{entry[n]:.3f}" if n in entry else "-" for n in names) + " |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    rows = results["rows"]
    dense = _ppl(next(r for r in rows if r["method"] == "dense")["perplexity"])
    tuned_row = next((r for r in rows if r["method"] == "dense + LoRA"), None)
    tuned = _ppl(tuned_row["perplexity"]) if tuned_row else None
    budget = rows[0]["perplexity"]
    lines = [
        "# N:M semi-structured sparsity: LoRAPrune N:M vs Wanda, SparseGPT, magnitude (SmolLM2-135M)",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Model `{s['model']}` ({budget['dtype']}); all 210 decoder projections (q, k, v, o, gate, up, down of every "
        f"layer) pruned to the pattern. Text for LoRA training and calibration: `{s['train_data']}`; LoRA: "
        f"{s['steps']} steps of {s['batch_size']} x {s['seq_len']} tokens, rank {s['rank']}, lr "
        f"{s['learning_rate']:g} (AdamW, linear decay), seed {s['seed']}. LoRAPrune N:M: moving average of the "
        f"LoRA-guided element importance, pattern tightened every {s['prune_every']} steps on the cubic schedule "
        f"(warm-up {s['warmup']:.0%}, cool-down {s['cooldown']:.0%}). Wanda / SparseGPT: layer by layer on "
        f"{s['calibration_samples']} x {s['seq_len']} calibration tokens (SparseGPT block {s['sparsegpt_block_size']}, "
        f"damping {s['sparsegpt_damp']:g})"
        + ("; then the same LoRA training under their mask." if s["recovery"] else "; no LoRA training.")
        + f" Perplexity: `{s['eval_data']}`, first {budget['tokens']:,} tokens in windows of {budget['seq_len']}.",
        "",
        f"Machine: {results['environment']['device']}, {results['torch_threads']} threads (shared: times are noisy).",
        "",
        "| method | pattern | zeros in projections | one-shot ppl | ppl after LoRA | ppl / dense | "
        "ppl / dense+LoRA | run s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        final = _ppl(row.get("perplexity")) or _ppl(row.get("perplexity_one_shot"))
        one_shot = _ppl(row.get("perplexity_one_shot"))
        after = _ppl(row.get("perplexity")) if row["method"] != "dense" else None
        cells = [
            row["method"],
            row["pattern"] or "-",
            f"{row['nm']['sparsity']:.2%}" if "nm" in row else "0",
            f"{one_shot:.2f}" if one_shot else ("-" if row["method"] != "dense" else f"{final:.2f}"),
            f"{after:.2f}" if after else "-",
            f"{final / dense:.3f}",
            f"{final / tuned:.3f}" if tuned else "-",
            f"{row['run_seconds']:.0f}" if "run_seconds" in row else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Every N:M row was checked after merging: no group of M holds more than N non-zeros.",
        "",
        "## LoRAPrune's claim",
        "",
        "The LoRAPrune paper reports that its LoRA-guided criterion, applied to semi-structured sparsity, "
        "matches dedicated semi-structured pruners (SparseGPT, Wanda). Here 'matches' = perplexity at most "
        f"{s['matches_within']:.0%} above the best of Wanda and SparseGPT at the same pattern.",
        "",
    ]
    for verdict in results["verdicts"]:
        outcome = "better" if verdict["better"] else ("matches" if verdict["matches"] else "worse")
        lines.append(
            f"- {verdict['pattern']}, against {verdict['against']}: LoRAPrune "
            f"{verdict['loraprune_perplexity']:.2f} vs {verdict['best_baseline']} "
            f"{verdict['baseline_perplexity']:.2f} (ratio {verdict['ratio']:.3f}): **{outcome}**"
        )
    lines += ["", "## Speed of the 2:4 model", "", *speed_markdown(results.get("speed"), s["seq_len"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    patterns = [NMPattern.parse(text) for text in args.patterns]
    command = "python benchmarks/semi_structured.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": command,
        "settings": vars(args),
        "environment": environment(),
        "torch_threads": torch.get_num_threads(),
        "rows": [],
    }

    def save() -> None:
        write_json(output_dir / f"{args.name}.json", results)

    if args.speed_only:
        model, _ = load_model(args.model, dtype=args.dtype)
        prune_one_shot(model, "magnitude", NMPattern(2, 4), nm_modules(model, NMPattern(2, 4)))
        results["speed"] = speed(model, args)
        save()
        text = (
            "\n".join(
                [
                    "# Speed of a 2:4 model (magnitude masks)",
                    "",
                    f"Command: `{command}`",
                    "",
                    *speed_markdown(results["speed"], args.seq_len),
                ]
            )
            + "\n"
        )
        (output_dir / f"{args.name}.md").write_text(text)
        print(text)
        return 0
    _, tokenizer = load_model(args.model)
    windows = training_windows(tokenizer, args.train_data, args.seq_len)
    batches = calibration_batches(tokenizer, args.train_data, args.calibration_samples, args.seq_len, args.seed)
    results["rows"] = dense_rows(args, windows)
    save()
    two_four = None
    for pattern in patterns:
        for method in args.methods:
            row, model = nm_row(args, method, pattern, windows, batches)
            results["rows"].append(row)
            save()
            if pattern == NMPattern(2, 4) and (two_four is None or method == "loraprune"):
                two_four = model
            del model
    results["verdicts"] = verdicts(results)
    if args.speed:
        results["speed"] = speed(two_four, args) if two_four is not None else {"skipped": "no 2:4 model was built"}
    save()
    (output_dir / f"{args.name}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
