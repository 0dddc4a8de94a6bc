"""Run llama.cpp's own tools on an exported GGUF file: `llama-perplexity` and `llama-bench`.

Used to check exports against their source model (benchmarks/llamacpp_check.py and the tests
that run when `LLAMA_CPP_DIR` points at a build). llama.cpp prints through an asynchronous
logger that can lose its last lines when the process exits; the final estimate is among them,
so a run that lost it is repeated (the computation is deterministic).

Weight repacking (llama.cpp's extra CPU buffer types) is off: on a CPU that reports AMX under a
kernel or VM that does not enable it, llama.cpp's AMX kernels for q8_0 die with SIGILL, and the
same setting on every model keeps the comparisons fair.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path

from loraprune.errors import LoraPruneError

FINAL_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+)")


def find_tool(build: str | Path, name: str) -> Path:
    """`name` (e.g. llama-perplexity) in a llama.cpp build directory, its `bin/`, or the directory itself."""
    build = Path(build).expanduser()
    for candidate in (build / "bin" / name, build / "build" / "bin" / name, build / name):
        if candidate.is_file():
            return candidate
    raise LoraPruneError(f"{name} not found in the llama.cpp build {build} (looked in bin/ and build/bin/)")


def llama_perplexity(
    build: str | Path, model: str | Path, text: str | Path, ctx: int, chunks: int, threads: int = 1, tries: int = 20
) -> float:
    """`llama-perplexity -c ctx --chunks chunks` of the GGUF file `model` on the text file `text`."""
    command = [str(find_tool(build, "llama-perplexity")), "-m", str(model), "-f", str(text), "-c", str(ctx)]
    command += ["-b", str(ctx), "--chunks", str(chunks), "-t", str(threads), "--no-repack"]
    output = ""
    with tempfile.TemporaryDirectory(prefix="llama-perplexity-") as scratch:
        log = Path(scratch) / "log.txt"
        for _ in range(tries):
            log.unlink(missing_ok=True)
            run = subprocess.run([*command, "--log-file", str(log)], capture_output=True, text=True, check=False)
            output = run.stdout + run.stderr + (log.read_text() if log.is_file() else "")
            if run.returncode != 0:
                raise LoraPruneError(f"llama-perplexity failed ({run.returncode}): {output[-2000:]}")
            if match := FINAL_PPL.search(output):
                return float(match.group(1))
    raise LoraPruneError(f"llama-perplexity printed no final estimate in {tries} runs: {output[-2000:]}")


def llama_bench(
    build: str | Path, model: str | Path, prompt: int = 128, generate: int = 32, repeats: int = 3, threads: int = 1
) -> dict[str, float]:
    """Tokens per second of prompt processing (`pp`) and generation (`tg`), mean and spread over repeats."""
    command = [str(find_tool(build, "llama-bench")), "-m", str(model), "-p", str(prompt), "-n", str(generate)]
    command += ["-r", str(repeats), "-t", str(threads), "--repack", "0", "-o", "json"]
    run = subprocess.run(command, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise LoraPruneError(f"llama-bench failed ({run.returncode}): {(run.stdout + run.stderr)[-2000:]}")
    rows = json.loads(run.stdout[run.stdout.index("[") :])
    result = {}
    for row in rows:
        kind = "pp" if row["n_prompt"] > 0 else "tg"
        result[f"{kind}_tokens_per_s"] = row["avg_ts"]
        result[f"{kind}_stddev"] = row["stddev_ts"]
    return result
