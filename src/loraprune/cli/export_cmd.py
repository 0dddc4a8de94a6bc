"""`loraprune export FORMAT`: write a saved (pruned) model in another runtime's format (GGUF for llama.cpp)."""

from __future__ import annotations

import argparse
import logging

GGUF_EPILOG = """\
Same widths in every layer: llama.cpp's architecture for the model (llama for Llama/Mistral/
SmolLM2, qwen2 for Qwen2), with the keys, tensor names and tokenizer that llama.cpp's
convert_hf_to_gguf.py writes. Different widths per layer (the default --allocation global):
llama.cpp's 'deci' architecture, whose head counts and feed-forward lengths are per-layer
arrays; llama.cpp runs it as the same Llama block. Vectors and norms stay f32; with q8_0 a
matrix whose rows are not a multiple of 32 stays f16 (prune with --round-to 32 to avoid it).

examples:
  loraprune prune-model --method taylor --sparsity 0.2 --output smol-20
  loraprune export gguf smol-20 smol-20.gguf --outtype q8_0
  llama-cli -m smol-20.gguf -p "The capital of France is" -n 32 -st
  llama-perplexity -m smol-20.gguf -f wiki.test.raw -c 128 --chunks 64
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a saved (pruned) model for another runtime: gguf (llama.cpp, Ollama, LM Studio)",
        description="Write a model directory saved by prune-model (or any supported Hugging Face model) in "
        "another runtime's format.",
    )
    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    gguf = formats.add_parser(
        "gguf",
        help="a GGUF file for llama.cpp (per-layer widths as its 'deci' architecture)",
        description="Write MODEL_DIR as one GGUF file with the gguf package (llama.cpp's own writer); needs "
        "neither a llama.cpp build nor a network.",
        epilog=GGUF_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gguf.add_argument("model_dir", metavar="MODEL_DIR", help="directory of a saved model (config.json, safetensors)")
    gguf.add_argument("output", metavar="OUT.gguf", help="the GGUF file to write")
    gguf.add_argument(
        "--outtype",
        choices=("f32", "f16", "bf16", "q8_0"),
        default="f16",
        help="type of the weight matrices (default: %(default)s)",
    )
    gguf.add_argument(
        "--tokenizer-pre",
        default=None,
        help="llama.cpp's pre-tokenizer name (e.g. llama-bpe, qwen2, smollm) when it is not recognised",
    )
    gguf.add_argument("--overwrite", action="store_true", help="replace OUT.gguf if it exists")
    gguf.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    gguf.set_defaults(func=run_gguf)


def run_gguf(args: argparse.Namespace) -> int:
    from loraprune.export import export_gguf

    logging.getLogger("gguf").setLevel(logging.WARNING)  # the writer logs every file it opens
    result = export_gguf(
        args.model_dir,
        args.output,
        outtype=args.outtype,
        tokenizer_pre=args.tokenizer_pre,
        overwrite=args.overwrite,
        progress=args.progress,
    )
    print(result)
    return 0
