"""No save from broken numbers: every tensor about to be written must be finite."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from loraprune.errors import LoraPruneError


class NonFiniteError(LoraPruneError):
    """A tensor that would be saved holds NaN or Inf; nothing was written."""


def first_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor of `tensors` (name, tensor pairs) with a NaN or Inf, or None."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def require_finite(tensors: Iterable[tuple[str, torch.Tensor]], what: str, nonfinite_loss_step: int | None) -> None:
    """Raise `NonFiniteError` naming the first non-finite tensor of `tensors` (and the step where the
    training loss first went non-finite, if it did) before anything of `what` is written."""
    bad = first_nonfinite(tensors)
    if bad is None:
        return
    when = (
        f"; the training loss first went non-finite at step {nonfinite_loss_step}"
        if nonfinite_loss_step is not None
        else ""
    )
    raise NonFiniteError(
        f"not saving {what}: tensor {bad} holds NaN/Inf{when}. The training diverged: lower --learning-rate. "
        "Nothing was written"
    )
