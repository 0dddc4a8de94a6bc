"""k-bit base weights (bitsandbytes): load a model in 4 or 8 bits, and bring its LoRA adapter back to full precision.

A frozen base model in 4 bits takes about a quarter of its bfloat16 memory, which is what lets
a large model be pruned on one GPU (QLoRA's recipe). Everything LoRAPrune and PrunedLoRA do
during training works on such a model unchanged: the LoRA layers wrap bitsandbytes' linear
layers, masking hooks sit in front of whole layers, and the LoRA-guided criterion
de-quantises one base matrix at a time while it scores (with bitsandbytes' own functions,
through `peft.utils.integrations.dequantize_module_weight`).

What cannot work on packed k-bit weights is slicing them. A run on k-bit weights therefore
ends by re-loading the base model in full precision, copying the trained LoRA adapter onto it
(`full_precision_copy`) and shrinking that copy with the run's masks; the adapter is merged
into full-precision weights, as QLoRA adapters usually are.

bitsandbytes is optional (`pip install "loraprune[kbit]"` or `pip install bitsandbytes`) and
only imported when a k-bit model is asked for. Its k-bit matrix products are GPU kernels, so
loading in k bits needs a CUDA device.
"""

from __future__ import annotations

import copy
import importlib.util

import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers import BitsAndBytesConfig, PreTrainedModel

from loraprune.config import QUANTIZE_CHOICES
from loraprune.errors import LoraPruneError

#: class names of bitsandbytes' packed parameters (compared by name: bitsandbytes may not be installed)
KBIT_PARAMETER_CLASSES = ("Params4bit", "Int8Params")

INSTALL_HINT = 'pip install bitsandbytes (or pip install "loraprune[kbit]")'


def require_kbit_support(quantize: str, device: str | torch.device) -> None:
    """Raise a `LoraPruneError` saying what is missing unless `quantize` can be loaded on `device`."""
    if quantize not in QUANTIZE_CHOICES:
        raise LoraPruneError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise LoraPruneError(
            f"--quantize {quantize} (bitsandbytes k-bit base weights) needs a CUDA GPU, and "
            f"{'no CUDA device is visible' if not torch.cuda.is_available() else f'the device is {device}'}; "
            "on the CPU load the model in full precision (--quantize none, --dtype float32 or bfloat16)"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LoraPruneError(
            f"--quantize {quantize} needs the bitsandbytes package, which is not installed: {INSTALL_HINT}"
        )


def quantization_config(quantize: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """The `BitsAndBytesConfig` of `quantize`: NF4 with double quantisation (QLoRA), or LLM.int8().

    `compute_dtype` is the dtype the 4-bit weights are de-quantised to for each product; the
    layers that stay unquantised (embeddings, norms, LM head) are loaded in it too.
    """
    if quantize == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise LoraPruneError(f"no quantization config for quantize={quantize!r}; use 4bit or 8bit")


def is_kbit_weight(param: torch.Tensor) -> bool:
    """Whether `param` is a packed bitsandbytes weight (4-bit `Params4bit` or 8-bit `Int8Params`)."""
    return type(param).__name__ in KBIT_PARAMETER_CLASSES


def logical_numel(param: torch.Tensor) -> int:
    """Number of weights `param` stands for: a 4-bit weight packs two in each byte of its storage."""
    if type(param).__name__ == "Params4bit" and getattr(param, "quant_state", None) is not None:
        return torch.Size(param.quant_state.shape).numel()
    return param.numel()


def is_kbit_model(model: nn.Module) -> bool:
    """Whether any parameter of `model` is a packed bitsandbytes weight."""
    return any(is_kbit_weight(param) for param in model.parameters())


def full_precision_copy(peft_model: PeftModel, base: PreTrainedModel, adapter: str = "default") -> PeftModel:
    """`base` (the same checkpoint in full precision) wrapped in a copy of `peft_model`'s LoRA adapter.

    The adapter's configuration and weights are copied; `base` must have the architecture and
    widths of the model under `peft_model` (a model re-loaded from the same checkpoint).
    """
    config = copy.deepcopy(peft_model.peft_config[adapter])
    weights = {
        name: value.detach().cpu()
        for name, value in get_peft_model_state_dict(peft_model, adapter_name=adapter).items()
    }
    copied = get_peft_model(base, config, adapter_name=adapter)
    result = set_peft_model_state_dict(copied, weights, adapter_name=adapter)
    missing = [key for key in result.missing_keys if "lora_" in key]
    if result.unexpected_keys or missing:
        raise LoraPruneError(
            f"the LoRA adapter does not fit the full-precision model: unexpected "
            f"{result.unexpected_keys[:3]}, missing {missing[:3]}; load the same checkpoint"
        )
    return copied
