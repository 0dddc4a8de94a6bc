"""GGUF files of pruned (or dense) Llama-family models, for llama.cpp and the runtimes built on it.

Written with `gguf`, llama.cpp's own Python writer; no llama.cpp build is needed.

- **Same widths in every layer**: llama.cpp's architecture for the model type (`llama` for
  Llama and Mistral, `qwen2` for Qwen2), with the keys, tensor names and tokenizer that
  llama.cpp's `convert_hf_to_gguf.py` writes for the same model.
- **Different widths per layer**: `deci` (DeciLM / Nemotron-NAS). llama.cpp builds every
  `deci` layer from `n_head(il)`, `n_head_kv(il)` and `n_ff(il)`, read from per-layer INT32
  arrays under `deci.attention.head_count`, `deci.attention.head_count_kv` and
  `deci.feed_forward_length`. Checked in llama.cpp's source (src/models/deci.cpp,
  src/llama-model.cpp): a `deci` layer with `n_head > 0` and `n_head_kv > 0` is a Llama
  block — RMS norms before attention and MLP and at the output, optional q/k/v/o and MLP
  biases, the "normal" RoPE on pairs of values (as `llama`, so q/k rows are permuted the same
  way, per layer with that layer's head counts) with Llama-3 frequency factors if present,
  scale 1/sqrt(head_dim), SiLU-gated MLP. `n_head == 0` means an attention-free layer,
  `n_head_kv == 0` a "linear attention" layer, and `n_ff == 0` skips the layer's MLP and
  its residual sum (dropping the attention output too); pruning keeps at least one group of
  each kind per layer, so none of these occur, and the export refuses them. Qwen2's RoPE
  (the rotate-half form, llama.cpp's NEOX) becomes the pair form by the same permutation of
  the q/k rows and biases, so per-layer Qwen2 models run as `deci` exactly too.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import torch
from tqdm.auto import tqdm

from loraprune.errors import LoraPruneError
from loraprune.export.checkpoint import Checkpoint
from loraprune.export.gguf_vocab import add_vocab
from loraprune.io import atomic_file
from loraprune.structure.base import LayerSizes

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
#: --outtype -> (the file type recorded in the header, the type of 2-D weight matrices)
OUTTYPES: dict[str, tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, Q.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
}


@dataclass(frozen=True)
class ArchitectureSpec:
    """How llama.cpp runs one Hugging Face model type when every layer has the same widths."""

    arch: gguf.MODEL_ARCH
    rotate_half: bool  # HF applies RoPE to halves while llama.cpp's arch uses pairs: permute q/k rows
    writes_vocab_size: bool  # the converter adds `vocab_size` and `rope.dimension_count` for this arch


SINGLE_WIDTH = {
    "llama": ArchitectureSpec(gguf.MODEL_ARCH.LLAMA, rotate_half=True, writes_vocab_size=True),
    "mistral": ArchitectureSpec(gguf.MODEL_ARCH.LLAMA, rotate_half=True, writes_vocab_size=True),
    "qwen2": ArchitectureSpec(gguf.MODEL_ARCH.QWEN2, rotate_half=False, writes_vocab_size=False),
}
PER_LAYER = ArchitectureSpec(gguf.MODEL_ARCH.DECI, rotate_half=True, writes_vocab_size=True)


@dataclass
class GgufExport:
    """What was written: the file, llama.cpp's architecture, the widths and the tensor types."""

    path: Path
    architecture: str
    layer_sizes: list[LayerSizes]
    outtype: str
    tensor_types: dict[str, int] = field(default_factory=dict)  # GGML type -> number of tensors
    fallbacks: list[str] = field(default_factory=list)  # tensors written as F16 because rows do not fit Q8_0
    file_size_bytes: int = 0

    @property
    def per_layer(self) -> bool:
        return self.architecture == gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DECI]

    def __str__(self) -> str:
        types = ", ".join(f"{count} {name}" for name, count in sorted(self.tensor_types.items()))
        widths = "per-layer widths" if self.per_layer else "one width for all layers"
        lines = [
            f"wrote {self.path} ({self.file_size_bytes / 2**20:.1f} MiB): llama.cpp architecture "
            f"'{self.architecture}' ({widths}), {len(self.layer_sizes)} layers, tensors {types}"
        ]
        if self.fallbacks:
            lines.append(
                f"{len(self.fallbacks)} matrices kept F16: their rows ({self.fallbacks[0]} ...) are not a multiple "
                "of the 32-wide Q8_0 blocks (prune with --round-to 32 to quantise them all)"
            )
        return "\n".join(lines)


def permute_rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the rows of each head from RoPE on halves (x_i with x_{i+d/2}, Hugging Face) to RoPE
    on pairs (x_{2i} with x_{2i+1}, llama.cpp's "normal" RoPE); works for weights and biases."""
    head_dim = weight.shape[0] // heads
    return weight.reshape(heads, 2, head_dim // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> torch.Tensor:
    """Llama 3.1's per-frequency RoPE divisors (`rope_type: llama3`), as llama.cpp's `rope_freqs` tensor.

    Wavelengths shorter than `original_max_position_embeddings / high_freq_factor` keep their
    frequency (factor 1), longer than `... / low_freq_factor` are slowed by `factor`, and the
    band between interpolates smoothly.
    """
    base = rope.get("rope_theta", 10000.0)
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    context = rope.get("original_max_position_embeddings", 8192)
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    factors = []
    for wavelength in (2 * math.pi / inv_freq).tolist():
        if wavelength < context / high:
            factors.append(1.0)
        elif wavelength > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings from a transformers 5 (`rope_parameters`) or 4.x (`rope_theta`, `rope_scaling`) config."""
    rope = dict(config.get("rope_parameters") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope.update(config.get("rope_scaling") or {})
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    return rope


def _check_representable(checkpoint: Checkpoint, sizes: list[LayerSizes]) -> None:
    """Refuse what llama.cpp's architectures would run differently from transformers."""
    config, kind = checkpoint.config, checkpoint.model_type
    if config.get("hidden_act", "silu") != "silu":
        raise LoraPruneError(f"llama.cpp's Llama block uses SiLU; this model uses {config['hidden_act']!r}")
    rope_type = _rope_parameters(config).get("rope_type", "default")
    if rope_type not in ("default", "linear", "llama3"):
        raise LoraPruneError(f"RoPE scaling {rope_type!r} is not exported (supported: none, linear, llama3)")
    if kind == "qwen2" and config.get("use_sliding_window"):
        raise LoraPruneError("Qwen2 sliding-window attention is not represented in llama.cpp's qwen2 architecture")
    if kind == "mistral" and config.get("sliding_window"):
        logger.warning(
            "llama.cpp's llama architecture has no sliding window: attention beyond %d tokens differs from "
            "transformers (llama.cpp's converter drops the window too)",
            config["sliding_window"],
        )
    empty = [i for i, s in enumerate(sizes) if 0 in (s.num_attention_heads, s.num_key_value_heads, s.intermediate_size)]
    if empty:
        raise LoraPruneError(f"layers {empty} have no attention heads or no MLP channels; llama.cpp cannot run that")


def _add_hyperparameters(
    writer: gguf.GGUFWriter, checkpoint: Checkpoint, sizes: list[LayerSizes], spec: ArchitectureSpec, outtype: str
) -> None:
    config = checkpoint.config
    per_layer = spec is PER_LAYER

    def widths(key: str) -> int | list[int]:
        values = [getattr(s, key) for s in sizes]
        return values if per_layer else values[0]

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(checkpoint.directory.resolve().name)
    writer.add_block_count(checkpoint.num_layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(widths("intermediate_size"))
    writer.add_head_count(widths("num_attention_heads"))
    writer.add_head_count_kv(widths("num_key_value_heads"))
    rope = _rope_parameters(config)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim") or per_layer:  # llama.cpp's default, hidden / heads, is wrong once heads go
        writer.add_key_length(checkpoint.head_dim)
        writer.add_value_length(checkpoint.head_dim)
    writer.add_file_type(OUTTYPES[outtype][0])
    if spec.writes_vocab_size:
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(checkpoint.head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tensors(checkpoint: Checkpoint, sizes: list[LayerSizes], spec: ArchitectureSpec):
    """(GGUF name, float32 tensor) pairs in the converter's order: extra tensors first, then the file's."""
    rope = _rope_parameters(checkpoint.config)
    if rope.get("rope_type") == "llama3":
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        yield name, llama3_rope_factors(rope, checkpoint.head_dim)
    names = gguf.get_tensor_name_map(spec.arch, checkpoint.num_layers)
    tied = checkpoint.config.get("tie_word_embeddings", False)
    if not tied and not checkpoint.has("lm_head.weight"):
        raise LoraPruneError(f"{checkpoint.directory} has untied embeddings but no lm_head.weight")
    for name in checkpoint.names():
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue  # recomputed by llama.cpp / llama.cpp reuses token_embd for a tied head
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise LoraPruneError(f"tensor {name!r} has no place in llama.cpp's {gguf.MODEL_ARCH_NAMES[spec.arch]}")
        tensor = checkpoint.tensor(name).to(torch.float32)
        if spec.rotate_half and (".q_proj." in name or ".k_proj." in name):
            layer = sizes[int(name.split(".")[2])]
            heads = layer.num_attention_heads if ".q_proj." in name else layer.num_key_value_heads
            tensor = permute_rotary_rows(tensor, heads)
        yield new_name, tensor


def _encode(name: str, tensor: torch.Tensor, weight_type: gguf.GGMLQuantizationType, fallbacks: list[str]):
    """The tensor's bytes in GGUF: vectors and norms in F32 (as the converter does), matrices in `weight_type`."""
    data = tensor.contiguous().numpy()
    qtype = Q.F32 if data.ndim <= 1 or name.endswith("_norm.weight") else weight_type
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:  # rows not a multiple of the block size: the converter falls back to F16
        fallbacks.append(name)
        return gguf.quants.quantize(data, Q.F16), Q.F16


def export_gguf(
    model_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    outtype: str = "f16",
    tokenizer_pre: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> GgufExport:
    """Write the model saved in `model_dir` (stock or per-layer widths) as the GGUF file `output`.

    Checks everything before writing, and writes to a temporary file beside `output` that
    replaces it only when complete.
    """
    if outtype not in OUTTYPES:
        raise LoraPruneError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    output = Path(output)
    if output.exists() and not overwrite:
        raise LoraPruneError(f"{output} already exists; pass --overwrite to replace it")
    if not output.parent.is_dir():
        raise LoraPruneError(f"cannot write {output}: directory {output.parent} does not exist")
    checkpoint = Checkpoint.open(model_dir)
    if checkpoint.model_type not in SINGLE_WIDTH:
        raise LoraPruneError(
            f"GGUF export supports model types {', '.join(SINGLE_WIDTH)}; {checkpoint.directory} is "
            f"{checkpoint.model_type!r}"
        )
    sizes = checkpoint.layer_sizes()
    _check_representable(checkpoint, sizes)
    spec = SINGLE_WIDTH[checkpoint.model_type] if all(s == sizes[0] for s in sizes) else PER_LAYER
    arch_name = gguf.MODEL_ARCH_NAMES[spec.arch]
    result = GgufExport(output, arch_name, sizes, outtype)
    with atomic_file(output) as temporary:
        writer = gguf.GGUFWriter(temporary, arch_name)
        _add_hyperparameters(writer, checkpoint, sizes, spec, outtype)
        add_vocab(writer, checkpoint.directory, checkpoint.config["vocab_size"], tokenizer_pre)
        weight_type = OUTTYPES[outtype][1]
        items = _tensors(checkpoint, sizes, spec)
        for name, tensor in tqdm(items, desc="GGUF tensors", total=len(checkpoint.files), disable=not progress):
            data, qtype = _encode(name, tensor, weight_type, result.fallbacks)
            writer.add_tensor(name, data, raw_dtype=qtype)
            result.tensor_types[qtype.name] = result.tensor_types.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    result.file_size_bytes = output.stat().st_size
    return result
