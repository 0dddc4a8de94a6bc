"""Re-evaluate the adapters a sweep kept on a second test set, one that played no part in choosing.

A sweep spec with `keep_outputs: true` leaves every point's saved adapter in `OUTPUT/points/ID`.
This script loads each of them (through stock PEFT, as the sweep did) and measures the mean
answer-token NLL on `--problems` GSM8K test problems after the first `--skip` (default: problems
64-191, while the sweeps chose on the first 64), then writes JSON and a Markdown table with both
numbers side by side. Nothing is trained. Points already in the output JSON are not evaluated
again (the run resumes), unless `--fresh`.

    python benchmarks/confirm_adapters.py benchmarks/results/sweep-prunedlora-gap-*-cpu \\
        --output benchmarks/results/prunedlora_gap_confirm
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from loraprune.evaluation.sft import SFTEvalConfig, evaluate_answer_nll
from loraprune.io import write_json
from loraprune.models import load_model
from loraprune.run_report.document import markdown_table
from loraprune.sweep.runner import POINTS_DIR, RESULTS_FILE


def kept_points(sweep_dirs: list[Path]) -> list[dict[str, Any]]:
    """Every finished point of the sweeps whose adapter was kept, with its sweep's name."""
    points = []
    for directory in sweep_dirs:
        results = json.loads((directory / RESULTS_FILE).read_text())
        for point in results["points"]:
            adapter = directory / POINTS_DIR / point["id"]
            if point["status"] == "ok" and adapter.is_dir():
                points.append({"sweep": results["name"], "adapter": adapter, **point})
    return points


def label(point: dict[str, Any]) -> str:
    """The point's grid settings, the way a sweep table writes them."""
    return ", ".join(f"{key}={value}" for key, value in point["settings"].items())


def markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    rows = [
        (
            entry["sweep"],
            f"`{entry['id']}`",
            entry["label"],
            f"{entry['choice_nll']:.4f}",
            f"{entry['confirm_nll']:.4f}",
            str(entry["confirm_tokens"]),
        )
        for entry in results["points"].values()
    ]
    return "\n".join(
        [
            "# Sweep adapters on a second evaluation set",
            "",
            f"Reproduce: `{results['command']}`",
            "",
            f"Every adapter the sweeps kept, evaluated again: mean answer-token NLL on GSM8K test problems "
            f"{settings['skip']}-{settings['skip'] + settings['problems'] - 1} (file order; answers cut at "
            f"{settings['max_answer_tokens']} tokens), which played no part in choosing, next to the sweep's own "
            f"number (the choice set: its `eval` settings, the first 64 problems). Model `{settings['model']}`, "
            f"{settings['dtype']}, {results['environment']['device']}. Training settings: each sweep's spec.",
            "",
            markdown_table(
                ("sweep", "point", "settings", "NLL, choice set", "NLL, confirmation set", "answer tokens"), rows
            ),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep output directories (with kept points)")
    parser.add_argument("--output", type=Path, required=True, help="prefix of the .json and .md written")
    parser.add_argument("--skip", type=int, default=64, help="test problems left out at the start")
    parser.add_argument("--problems", type=int, default=128, help="test problems evaluated after them")
    parser.add_argument("--max-answer-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--fresh", action="store_true", help="evaluate every point again")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = SFTEvalConfig(problems=args.problems, skip=args.skip, max_answer_tokens=args.max_answer_tokens)
    json_path = args.output.with_suffix(".json")
    previous = json.loads(json_path.read_text()) if json_path.exists() and not args.fresh else None
    results = previous or {
        "command": "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0])), *sys.argv[1:]]),
        "settings": {},
        "environment": {"device": f"cpu ({os.cpu_count()} cores)", "torch": torch.__version__},
        "points": {},
    }
    for point in tqdm(kept_points(args.sweeps), desc="adapters"):
        if point["id"] in results["points"]:
            continue
        run = point["config"]["run"]
        results["settings"] = {
            "model": run["model"],
            "dtype": run["dtype"],
            "skip": args.skip,
            "problems": args.problems,
            "max_answer_tokens": args.max_answer_tokens,
        }
        started = time.perf_counter()
        model, tokenizer = load_model(run["model"], dtype=run["dtype"], adapter=str(point["adapter"]))
        nll = evaluate_answer_nll(model, tokenizer, config)
        results["points"][point["id"]] = {
            "sweep": point["sweep"],
            "id": point["id"],
            "label": label(point),
            "choice_nll": point["metrics"]["test_nll"],
            "confirm_nll": nll["nll"],
            "confirm_tokens": nll["tokens"],
            "seconds": round(time.perf_counter() - started, 1),
        }
        write_json(json_path, results)
        args.output.with_suffix(".md").write_text(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
