"""Where a command runs: the one place that turns `--device` / `--device-map` into a placement.

Every command resolves its device here and loads the model there (`loraprune.models.load_model`).
The phases that follow read the device from the model (`next(model.parameters()).device`):
one-shot scoring, calibration passes, the LoRA training (`loraprune.training` keeps the
`Trainer` on the CPU when the model is there), perplexity before and after, latency. So a
run is on one device from start to end, and a phase cannot pick another one by itself.

`--device-map auto` spreads the layers over every visible GPU (accelerate's big-model
dispatch, then its hooks move activations between them) for models larger than one GPU. It
serves the passes that only read the weights and their gradients: `eval` (perplexity,
zero-shot, latency) and `prune-model` with a one-shot method and no recovery training
(`--steps 0`); `check_device_map` refuses the rest.
"""

from __future__ import annotations

import os

import torch

from loraprune.errors import ConfigError

#: `--device` values besides explicit torch devices
AUTO = "auto"
#: `--device-map` values: none (the whole model on `--device`) or accelerate's automatic placement
DEVICE_MAPS = ("none", "auto")

DEVICE_HELP = (
    "torch device of the whole run (loading, scoring, calibration, training, perplexity, latency): 'auto' "
    "(CUDA when available, under torchrun this process' GPU; else the CPU), 'cpu', 'cuda', 'cuda:N'"
)
DEVICE_MAP_HELP = (
    "'auto': spread the layers over all visible GPUs with accelerate, for a model larger than one GPU; "
    "supported by eval and by prune-model with a one-shot method and --steps 0 (not by LoRA training, "
    "loraprune, prune-nm or prune-adapter); 'none': the whole model on --device"
)


def check(condition: bool, message: str) -> None:
    """Raise a `ConfigError` with `message` unless `condition` holds (`loraprune.config` builds on this module)."""
    if not condition:
        raise ConfigError(message)


def local_cuda_device() -> str:
    """The CUDA device of this process: `cuda:LOCAL_RANK` under torchrun / accelerate launch, else `cuda:0`."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def default_device() -> str:
    """This process' GPU when CUDA is available (`local_cuda_device`), else the CPU."""
    return local_cuda_device() if torch.cuda.is_available() else "cpu"


def resolve_device(name: str | None, *, trains: bool = False) -> str:
    """The device a run uses for `--device name` ('auto' or None: `default_device()`), checked to exist
    and, for a run that `trains`, to be the one the Trainer uses (`check_training_device`)."""
    device = _resolve(name)
    if trains:
        check_training_device(device)
    return device


def _resolve(name: str | None) -> str:
    if name is None or name == AUTO:
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        check(torch.cuda.is_available(), f"--device {name}: no CUDA device is visible (use --device cpu or auto)")
        index = torch.cuda.current_device() if device.index is None else device.index
        count = torch.cuda.device_count()
        check(index < count, f"--device {name}: only {count} CUDA device(s) are visible (cuda:0 to cuda:{count - 1})")
        return f"cuda:{index}"
    check(device.type == "cpu", f"--device {name}: loraprune runs on 'cpu' or 'cuda' devices")
    return "cpu"


def check_device_map(device_map: str, *, trains: bool, command: str) -> None:
    """Refuse `--device-map auto` where a run trains (the Trainer and the pruners need one device per process)."""
    check(device_map in DEVICE_MAPS, f"device-map must be one of {DEVICE_MAPS}, got {device_map!r}")
    check(
        device_map == "none" or not trains,
        f"--device-map auto is for scoring and evaluating a model larger than one GPU: {command} trains here "
        "(LoRA training needs the whole model on one device per process; use torchrun with FSDP2 instead, or "
        "--steps 0 with a one-shot method)",
    )


def check_training_device(device: str) -> None:
    """The Trainer puts a single-process CUDA run on this process' GPU: refuse another index, naming the fix."""
    if device.startswith("cuda"):
        expected = default_device()
        check(
            device == expected,
            f"--device {device}: training runs on {expected}, the Trainer's device for this process; "
            f"select the GPU with CUDA_VISIBLE_DEVICES={device.split(':')[-1]} and --device cuda",
        )


def placement(model: torch.nn.Module) -> str:
    """Where the weights of `model` are, for run reports: 'cpu', 'cuda:0', or 'cuda:0, cuda:1' for a device map."""
    return ", ".join(sorted({str(param.device) for param in model.parameters()}))


def check_in_memory(model: torch.nn.Module) -> None:
    """Refuse to prune a model some of whose weights accelerate offloaded (to the CPU or disk: they are on `meta`)."""
    check(
        all(param.device.type != "meta" for param in model.parameters()),
        "the device map offloads some weights (they do not fit on the GPUs): they cannot be scored and sliced "
        "in place; use more GPUs, --dtype bfloat16, or --device cpu",
    )
