"""GGUF exports of the default model checked by llama.cpp itself: perplexity agreement and speed.

1. Builds llama.cpp (`llama-perplexity`, `llama-bench`, `llama-cli`) from the llama-cpp-python
   source distribution, once, into `--cache` (outside the repository):
   `pip download --no-deps --no-binary :all: llama-cpp-python`, then in `vendor/llama.cpp`
   `cmake -B build -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release` and `cmake --build build`.
2. Prunes the default model one-shot with the Taylor criterion (full gradients on 16 calibration
   windows of 128 tokens of WikiText-2 valid, seed 0: what `loraprune prune-model --method taylor
   --steps 0` does; the scores are computed once and every setting selects from them): dense;
   20 % and 50 % with the default global allocation (per-layer widths, llama.cpp's `deci`);
   20 % uniform (`llama`); and 50 % global with `--round-to` N for the width study.
3. For each model: loraprune's perplexity under llama.cpp's protocol (`loraprune eval --protocol
   llama.cpp`) in float32, and `llama-perplexity -c 128 --chunks 64` on the f32 and q8_0 exports;
   the relative gaps against the goals (1 % at f32, 3 % at q8_0); `llama-bench` prompt-processing
   and generation tokens/s of each export beside the FLOPs ratio to dense.

Writes `OUTPUT.json` and `OUTPUT.md` (default benchmarks/results/llamacpp_check), and the widths of
the round-to models as rows for `benchmarks/pruned_latency.py --results` (`OUTPUT_widths.json`).
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraprune.data import calibration_batches, load_text
from loraprune.evaluation import evaluate_perplexity
from loraprune.evaluation.latency import forward_flops
from loraprune.export import export_gguf
from loraprune.export.llamacpp import find_tool, llama_bench, llama_perplexity
from loraprune.importance import get_criterion
from loraprune.io import save_pruned_model, write_json
from loraprune.models import DEFAULT_MODEL, load_model
from loraprune.run_report.summary import environment, layer_table, size_summary
from loraprune.selection import WidthRules, plan_budget, select
from loraprune.shrink import shrink_model
from loraprune.structure import full_masks, get_adapter

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("LORAPRUNE_CACHE", Path.home() / ".cache" / "loraprune"))
GOALS = {"f32": 0.01, "q8_0": 0.03}
TOOLS = ("llama-perplexity", "llama-bench", "llama-cli")


@dataclass(frozen=True)
class Setting:
    name: str
    sparsity: float = 0.0
    allocation: str = "global"
    round_to: int = 1
    outtypes: tuple[str, ...] = ("f32", "q8_0")
    check_perplexity: bool = True  # the width study only times the exports


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=str(CACHE), help="llama.cpp source and build, models and GGUF files")
    parser.add_argument("--llama-cpp-dir", default=None, help="an existing llama.cpp build (skips building)")
    parser.add_argument("--text", default=None, help="text file (default: $LORAPRUNE_DATA_DIR/wikitext2/wiki.test.raw)")
    parser.add_argument("--ctx", type=int, default=128, help="llama-perplexity -c: window length")
    parser.add_argument("--chunks", type=int, default=8, help="llama-perplexity --chunks: windows scored")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1 on a shared machine)")
    parser.add_argument("--bench-repeats", type=int, default=2, help="llama-bench -r")
    parser.add_argument("--bench-rounds", type=int, default=3, help="interleaved llama-bench rounds over all files")
    parser.add_argument("--round-to", type=int, nargs="*", default=[32, 128, 8, 64], help="N for the width study")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "llamacpp_check"))
    parser.add_argument(
        "--widths-only",
        action="store_true",
        help="only write OUTPUT_widths.json (the 50 %% models' widths, for pruned_latency.py); no llama.cpp",
    )
    return parser.parse_args(argv)


def ensure_build(cache: Path) -> Path:
    """A llama.cpp build with the tools, built from the llama-cpp-python sdist if there is none yet."""
    sources = cache / "llama.cpp-src"
    for build in sorted(sources.glob("*/vendor/llama.cpp/build")):
        if all((build / "bin" / tool).is_file() for tool in TOOLS):
            return build
    sources.mkdir(parents=True, exist_ok=True)
    sdists = sorted(sources.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python"]
        subprocess.run([*pip, "-d", str(sources)], check=True)
        sdists = sorted(sources.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdists[-1]) as archive:
        archive.extractall(sources, filter="data")
    source = sources / sdists[-1].name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    nice = ["nice", "-n", "5"]
    subprocess.run([*nice, "cmake", "-B", "build", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release"], cwd=source,
                   check=True)  # fmt: skip
    subprocess.run([*nice, "cmake", "--build", "build", "--target", *TOOLS, "-j", "2"], cwd=source, check=True)
    return source / "build"


def settings(round_to: list[int]) -> list[Setting]:
    main = [
        Setting("dense"),
        Setting("global-20", 0.2),
        Setting("uniform-20", 0.2, allocation="uniform"),
        Setting("global-50", 0.5),
    ]
    study = [
        Setting(f"global-50-round{n}", 0.5, round_to=n, outtypes=("q8_0",), check_perplexity=False) for n in round_to
    ]
    return main + study


def pruned(model, families, scores, prunable, setting: Setting):
    """A shrunk copy of `model` for `setting`, selected from the shared Taylor scores."""
    copy_ = copy.deepcopy(model)
    if setting.sparsity == 0:
        return copy_
    rules = WidthRules(round_to=setting.round_to)
    budget = plan_budget(families, prunable, setting.sparsity, allocation=setting.allocation, rules=rules)
    masks = select(
        families, scores, full_masks(families), budget, prunable_layers=prunable, allocation=setting.allocation,
        rules=rules,
    )  # fmt: skip
    shrink_model(copy_, families, masks)
    return copy_


def measure(args: argparse.Namespace, build: Path, text: Path, work: Path, results: dict[str, Any]) -> None:
    """Fill `results["rows"]`, one setting after the other, then time every export (`speed_pass`)."""
    model, tokenizer = load_model(DEFAULT_MODEL)
    adapter = get_adapter(model)
    families = adapter.families(model, "auto")
    prunable = list(range(len(adapter.layer_sizes(model))))
    started = time.perf_counter()
    scores_file = work / "taylor_scores.pt"  # the same for every run: computed once
    if scores_file.is_file():
        scores = torch.load(scores_file)
    else:
        batches = calibration_batches(tokenizer, "wikitext2", 16, 128, seed=0)
        scores = get_criterion("taylor").score(model, families, batches)
        torch.save(scores, scores_file)
    rows, dense_flops, files = results.setdefault("rows", []), None, []
    for setting in settings(args.round_to):
        print(f"== {setting.name}", flush=True)
        candidate = pruned(model, families, scores, prunable, setting)
        if args.widths_only:
            rows.append(
                {"setting": setting.name, "sparsity_target": setting.sparsity, "layers": layer_table(candidate)}
            )
            continue
        directory = work / "models" / setting.name
        save_pruned_model(candidate, tokenizer, directory, overwrite=True)
        ours = None
        if setting.check_perplexity:
            ours = evaluate_perplexity(
                candidate, tokenizer, str(text), seq_len=args.ctx, max_tokens=args.chunks * args.ctx,
                protocol="llama.cpp", progress=False,
            )  # fmt: skip
        flops = forward_flops(candidate, args.ctx)
        dense_flops = dense_flops or flops
        row: dict[str, Any] = {
            "setting": setting.name,
            "sparsity_target": setting.sparsity,
            "allocation": setting.allocation,
            "round_to": setting.round_to,
            "params": size_summary(candidate)["params"],
            "sparsity_decoder": 1 - size_summary(candidate)["decoder_params"] / size_summary(model)["decoder_params"],
            "flops_ratio": flops / dense_flops,
            "loraprune_ppl": ours and ours.perplexity,
            "layers": layer_table(candidate),
            "exports": {},
        }
        for outtype in setting.outtypes:
            path = work / f"{setting.name}-{outtype}.gguf"
            export = export_gguf(directory, path, outtype=outtype, overwrite=True, progress=False)
            files.append((row, outtype, path))
            entry: dict[str, Any] = {
                "architecture": export.architecture,
                "file_size_bytes": export.file_size_bytes,
                "tensor_types": export.tensor_types,
                "f16_fallbacks": len(export.fallbacks),
            }
            if ours is not None:
                ppl = llama_perplexity(build, path, text, args.ctx, args.chunks, args.threads)
                gap = ppl / ours.perplexity - 1
                entry.update(llama_cpp_ppl=ppl, relative_gap=gap, goal=GOALS[outtype], met=abs(gap) <= GOALS[outtype])
                print(f"   {outtype}: llama.cpp {ppl:.4f} vs loraprune {ours.perplexity:.4f} ({gap:+.3%})", flush=True)
            row["exports"][outtype] = entry
        rows.append(row)
    if not args.widths_only:
        speed_pass(args, build, files)
    results["seconds"] = time.perf_counter() - started
    write_results(args, results)


def speed_pass(args: argparse.Namespace, build: Path, files: list[tuple[dict[str, Any], str, Path]]) -> None:
    """llama-bench of every export, interleaved: `--bench-rounds` rounds over all files, the median per
    file, so that a change of the shared machine's load hits every model alike; then the files go."""
    measured: dict[Path, list[dict[str, float]]] = {path: [] for _, _, path in files}
    for round_ in range(args.bench_rounds):
        print(f"== llama-bench round {round_ + 1}/{args.bench_rounds}", flush=True)
        for _, _, path in files:
            measured[path].append(llama_bench(build, path, repeats=args.bench_repeats, threads=args.threads))
    dense = {outtype: path for row, outtype, path in files if row["setting"] == "dense"}

    def median(path: Path, key: str) -> float:
        return float(statistics.median(run[key] for run in measured[path]))

    for row, outtype, path in files:
        entry = row["exports"][outtype]
        for kind in ("pp", "tg"):
            entry[f"{kind}_tokens_per_s"] = median(path, f"{kind}_tokens_per_s")
            entry[f"{kind}_rounds"] = [run[f"{kind}_tokens_per_s"] for run in measured[path]]
            entry[f"{kind}_speedup"] = entry[f"{kind}_tokens_per_s"] / median(dense[outtype], f"{kind}_tokens_per_s")
        path.unlink()


def write_results(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """OUTPUT.json, OUTPUT.md, and the widths of the 50 % models for benchmarks/pruned_latency.py."""
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if not args.widths_only:
        write_json(output.with_suffix(".json"), results)
        output.with_suffix(".md").write_text(markdown(results))
    widths = [
        {"method": row["setting"], "sparsity": row["sparsity_target"], "layers": row["layers"]}
        for row in results["rows"]
        if row["setting"].startswith("global-50")
    ]
    write_json(output.parent / f"{output.name}_widths.json", {"rows": widths})


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        "# GGUF exports checked by llama.cpp",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Model {DEFAULT_MODEL} (fp32), pruned one-shot with the Taylor criterion (16 x 128 calibration tokens of "
        f"WikiText-2 valid, seed 0, no recovery: `prune-model --method taylor --steps 0`). Text: {s['text']}. "
        f"Perplexity protocol of `llama-perplexity -c {s['ctx']} --chunks {s['chunks']}` on both sides (windows of "
        f"{s['ctx']}, second half of each scored, no BOS: the tokenizer adds none); loraprune in float32 on the CPU "
        f"(`loraprune eval --protocol llama.cpp`). llama.cpp {results['llama_cpp']}, {s['threads']} thread(s), "
        f"CPU; llama-bench pp128 / tg32 ({s['bench_repeats']} repeats), the median of {s['bench_rounds']} rounds "
        "interleaved over all files. Goals: gap within 1 % at f32, 3 % at q8_0.",
        "",
        "| model | arch | decoder sparsity | params | FLOPs / dense | loraprune ppl | type | llama.cpp ppl | gap "
        "| goal | pp tok/s | pp vs dense | tg tok/s | tg vs dense | F16 fallbacks |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        for outtype, e in row["exports"].items():
            checked = "llama_cpp_ppl" in e
            agreement = (
                f"{row['loraprune_ppl']:.4f} | {outtype} | {e['llama_cpp_ppl']:.4f} | {e['relative_gap']:+.3%} | "
                f"{'met' if e['met'] else '**missed**'}"
                if checked
                else f"- | {outtype} | - | - | -"
            )
            lines.append(
                f"| {row['setting']} | {e['architecture']} | {row['sparsity_decoder']:.2%} | {row['params']:,} | "
                f"{row['flops_ratio']:.3f} | {agreement} | {e['pp_tokens_per_s']:.1f} | {e['pp_speedup']:.2f}x | "
                f"{e['tg_tokens_per_s']:.1f} | {e['tg_speedup']:.2f}x | {e['f16_fallbacks']} |"
            )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cache = Path(args.cache).expanduser()
    build = Path(args.llama_cpp_dir).expanduser() if args.llama_cpp_dir else None
    if not args.widths_only:
        build = build or ensure_build(cache)
        for tool in TOOLS[:2]:
            find_tool(build, tool)
    data_dir = os.environ.get("LORAPRUNE_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    source = Path(args.text or Path(data_dir) / "wikitext2" / "wiki.test.raw")
    work = cache / "llamacpp-check"
    work.mkdir(parents=True, exist_ok=True)
    # llama-perplexity reads the file's bytes as they are (wiki.test.raw has CRLF line ends); loraprune
    # reads text with universal newlines: both sides get the text loraprune reads, written with LF
    text = work / "text.txt"
    text.write_text(load_text(str(source)), encoding="utf-8")
    torch.manual_seed(0)
    results: dict[str, Any] = {
        "command": "python benchmarks/llamacpp_check.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "settings": {**vars(args), "text": str(source)},
        "environment": environment(),
        "llama_cpp": None
        if build is None
        else build.parent.parent.parent.name
        if "vendor" in build.parts
        else str(build),
        "torch_threads": torch.get_num_threads(),
    }
    measure(args, build, text, work, results)
    if not args.widths_only:
        print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
