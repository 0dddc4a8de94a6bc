"""Layer-by-layer calibration for one-shot pruners (Wanda, SparseGPT): statistics of each linear's inputs.

Both papers prune a decoder layer from statistics of its inputs *as the already pruned model
computes them*: the calibration windows are embedded once, then every decoder layer is run
on the current hidden states with hooks that accumulate its linears' input statistics, its
linears are pruned, and the layer is run again to produce the (pruned) hidden states the next
layer sees. All linears of one decoder layer are pruned from the same pass (as Wanda's
reference procedure does; SparseGPT's optional "true sequential" sub-layer order is not used).

Memory: the hidden states of all windows (`windows × seq_len × hidden` floats) plus one
layer's statistics; no gradients.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from loraprune.errors import LoraPruneError
from loraprune.importance.gradients import micro_batches, model_device
from loraprune.semi_structured.targets import base_linear
from loraprune.structure import unwrap_model


class InputStatistic(ABC):
    """Accumulates a statistic of the inputs `x` (rows = tokens) of one linear layer, in float32."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.in_features = in_features
        self.device = device
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, self.in_features).float()
        self.tokens += rows.shape[0]
        self._add(rows)

    @abstractmethod
    def _add(self, rows: torch.Tensor) -> None: ...


class InputNorms(InputStatistic):
    """`‖X_j‖₂` of every input feature over all calibration tokens (Wanda)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        super().__init__(in_features, device)
        self.squares = torch.zeros(in_features, device=device)

    def _add(self, rows: torch.Tensor) -> None:
        self.squares += rows.square().sum(dim=0)

    def norms(self) -> torch.Tensor:
        return self.squares.sqrt()


class InputHessian(InputStatistic):
    """`XᵀX / tokens`, the Hessian of the layer-wise reconstruction error `‖WXᵀ − ŴXᵀ‖²` up to a factor (SparseGPT)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        super().__init__(in_features, device)
        self.sum = torch.zeros(in_features, in_features, device=device)

    def _add(self, rows: torch.Tensor) -> None:
        self.sum.addmm_(rows.T, rows)

    def hessian(self) -> torch.Tensor:
        if self.tokens == 0:
            raise LoraPruneError("no calibration tokens reached this layer")
        return self.sum / self.tokens


#: prunes one linear layer in place from its input statistic; returns its keep-mask
LinearPruner = Callable[[str, nn.Linear, InputStatistic], torch.Tensor]


class _Captured(Exception):
    """Raised by the hook on the first decoder layer once its inputs are recorded."""


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    return unwrap_model(model).model.layers


def _first_layer_inputs(model: nn.Module, batches: torch.Tensor, batch_size: int) -> list[tuple[tuple, dict]]:
    """The positional and keyword arguments the first decoder layer receives, per micro-batch."""
    records: list[tuple[tuple, dict[str, Any]]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        records.append((args, kwargs))
        raise _Captured

    handle = _decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = model_device(model)
    try:
        for chunk in micro_batches(batches, batch_size):
            with contextlib.suppress(_Captured):
                model(input_ids=chunk.to(device), use_cache=False)
    finally:
        handle.remove()
    return records


def _run_layer(layer: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """Run `layer` on every recorded input; the outputs replace the hidden states (first argument)."""
    outputs = []
    for args, kwargs in inputs:
        out = layer(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        outputs.append(((hidden, *args[1:]), kwargs))
    return outputs


@torch.no_grad()
def prune_layer_by_layer(
    model: nn.Module,
    batches: torch.Tensor,
    modules: list[str],
    statistic: type[InputStatistic],
    prune: LinearPruner,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """Prune the linears `modules` decoder layer by decoder layer on the calibration windows `batches`.

    Returns the keep-mask of every pruned module. The model is left in eval mode with its
    pruned weights in place.
    """
    if batches is None or batches.ndim != 2 or batches.shape[0] == 0:
        raise LoraPruneError("layer-wise pruning needs calibration windows (token ids [n, seq_len])")
    model.eval()
    root = unwrap_model(model)
    linears = {name: base_linear(model, name) for name in modules}
    inputs = _first_layer_inputs(model, batches, batch_size)
    masks: dict[str, torch.Tensor] = {}
    layers = _decoder_layers(model)
    for layer in tqdm(layers, desc="layer-wise pruning", leave=False):
        owned = {id(module) for module in layer.modules()}
        targets = [name for name in modules if id(root.get_submodule(name)) in owned]
        if targets:
            stats = {name: statistic(linears[name].in_features, linears[name].weight.device) for name in targets}
            handles = [
                linears[name].register_forward_pre_hook(lambda _m, args, s=stats[name]: s.add(args[0]))
                for name in targets
            ]
            try:
                _run_layer(layer, inputs)
            finally:
                for handle in handles:
                    handle.remove()
            for name in targets:
                masks[name] = prune(name, linears[name], stats.pop(name))
        if len(masks) == len(modules):
            break  # later layers hold nothing to prune
        inputs = _run_layer(layer, inputs)
    return masks
