"""Validation of a device name (`--device`) before anything is loaded on it."""

from __future__ import annotations

import torch

from loraprune.errors import ConfigError

DEVICE_HELP = "cpu, cuda, cuda:N, mps or auto"


def check_device(name: str) -> str:
    """`name` resolved ("auto": cuda when a GPU is visible, else cpu) and checked to exist on this machine.

    Raises `ConfigError` for a name torch does not know, and for a CUDA / MPS device this build or
    machine does not have, instead of the `AssertionError` torch raises at the first tensor moved there.
    """
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; use {DEVICE_HELP}") from None
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ConfigError(f"device {name!r}: this torch build has no CUDA support; use --device cpu")
        count = torch.cuda.device_count()
        if count == 0:
            raise ConfigError(f"device {name!r}: no CUDA GPU is visible; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {name!r}: only {count} CUDA device(s) are visible (cuda:0 to cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {name!r} is not supported; use {DEVICE_HELP}")
    return name
