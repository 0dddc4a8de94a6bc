"""One-shot N:M baselines: weight magnitude, Wanda and SparseGPT, applied in place.

* magnitude: keep the `N` largest `|W_ij|` of every group (no data; a sanity baseline);
* Wanda (Sun et al., 2024): keep the `N` largest `|W_ij|·‖X_j‖₂` of every group, `X_j` being
  input feature `j` over all calibration tokens; no weight update. With N:M the comparison
  group is the `M` inputs of one output row, which is Wanda's per-output comparison group
  restricted to the pattern;
* SparseGPT (Frantar & Alistarh, 2023): `loraprune.semi_structured.sparsegpt`, masks chosen
  by the OBS saliency and the remaining weights updated to reconstruct the layer's output.

Wanda and SparseGPT calibrate layer by layer on the already pruned model
(`loraprune.semi_structured.layerwise`).
"""

from __future__ import annotations

import torch
from torch import nn

from loraprune.config import check
from loraprune.semi_structured.layerwise import InputHessian, InputNorms, InputStatistic, prune_layer_by_layer
from loraprune.semi_structured.pattern import NMPattern, pattern_mask
from loraprune.semi_structured.sparsegpt import sparsegpt_prune
from loraprune.semi_structured.targets import base_linear

ONE_SHOT_METHODS = ("magnitude", "wanda", "sparsegpt")


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """`|W_ij|·‖X_j‖₂` (float32)."""
    return weight.detach().float().abs() * input_norms.float()[None, :]


@torch.no_grad()
def _apply(linear: nn.Linear, weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Write `weight` masked by `keep` into `linear` (zeros are exact in any dtype); returns `keep`."""
    linear.weight.copy_(torch.where(keep, weight.to(linear.weight.dtype), 0.0))
    return keep


def prune_one_shot(
    model: nn.Module,
    method: str,
    pattern: NMPattern,
    modules: list[str],
    batches: torch.Tensor | None = None,
    *,
    batch_size: int = 8,
    block_size: int = 128,
    damp: float = 0.01,
) -> dict[str, torch.Tensor]:
    """Prune `modules` of `model` to `pattern` with `method` (one of `ONE_SHOT_METHODS`); returns the keep-masks.

    Wanda and SparseGPT read the calibration windows `batches` (token ids `[n, seq_len]`),
    processed `batch_size` at a time; `block_size` and `damp` are SparseGPT's.
    """
    check(
        method in ONE_SHOT_METHODS,
        f"unknown one-shot N:M method {method!r}; choose one of {', '.join(ONE_SHOT_METHODS)}",
    )
    if method == "magnitude":
        masks = {}
        for name in modules:
            linear = base_linear(model, name)
            masks[name] = _apply(linear, linear.weight, pattern_mask(linear.weight.abs(), pattern))
        return masks
    check(batches is not None, f"{method} needs calibration windows")

    def wanda(_name: str, linear: nn.Linear, stat: InputStatistic) -> torch.Tensor:
        assert isinstance(stat, InputNorms)
        return _apply(linear, linear.weight, pattern_mask(wanda_scores(linear.weight, stat.norms()), pattern))

    def sparsegpt(_name: str, linear: nn.Linear, stat: InputStatistic) -> torch.Tensor:
        assert isinstance(stat, InputHessian)
        weight, keep = sparsegpt_prune(linear.weight, stat.hessian(), pattern, block_size, damp)
        return _apply(linear, weight, keep)

    if method == "wanda":
        return prune_layer_by_layer(model, batches, modules, InputNorms, wanda, batch_size)
    return prune_layer_by_layer(model, batches, modules, InputHessian, sparsegpt, batch_size)
