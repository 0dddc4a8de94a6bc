"""The loss change of removing a unit, from activation gradients alone (no weight gradient).

A unit (an MLP channel, a head or a KV group's query heads) owns a block of columns of its
family's input-side matrix (`down_proj`, `o_proj`). Removing it sets its block of that
matrix's input `h` to zero, so to first order the loss of window `w` changes by

    ΔL_w(u) = − Σ_tokens Σ_{d ∈ u} h_d · ∂L_w/∂h_d .

Two forms turn these per-window changes into one score per unit:

* `fisher` (the default): `Σ_w ΔL_w(u)²`, the squared change summed over windows (an
  empirical-Fisher estimate of the loss increase). Its value is on the loss's own scale
  and the same for every layer, so a global ranking compares like with like.
* `first-order`: `|Σ_w ΔL_w(u)|`, the magnitude of the first-order change of the mean loss.

The gradients `∂L/∂h` reach `h` in any backward pass whose graph passes through it: LoRA
training computes them anyway (the LoRA layers below need them), and a one-shot pass gets
them by making only the input embeddings' output require grad. The hooks reduce to one
number per window and unit inside the backward hook, so nothing per token is kept beyond
the inputs that autograd holds for the LoRA layers already (with LoRA dropout 0 `h` itself).
Under gradient checkpointing autograd frees those inputs after the forward pass, but the hooks
keep each scored input until its gradient arrives: one `o_proj` and one `down_proj` input per
layer and micro-batch, which checkpointing would otherwise have saved.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from loraprune.distributed import all_reduce_sum, world_size
from loraprune.errors import LoraPruneError
from loraprune.importance.base import Criterion
from loraprune.importance.gradients import backward_mean_loss
from loraprune.structure import GroupFamily, MatrixSlicing, unwrap_model

FORMS = ("fisher", "first-order")


def input_side(family: GroupFamily) -> MatrixSlicing:
    """The matrix whose input columns the family's units own (o_proj for heads, down_proj for channels)."""
    columns = [slicing for slicing in family.matrices if slicing.dim == 1]
    if len(columns) != 1:
        raise LoraPruneError(
            f"{family.key}: the activation-gradient score needs exactly one input-side (column) matrix, "
            f"found {len(columns)}"
        )
    return columns[0]


class ActivationGradientScores:
    """Hooks that accumulate, per unit, the per-window first-order loss changes of every backward pass.

    Install with `install()` (or use as a context manager); every backward pass through the
    hooked matrices adds its windows. `collect()` returns the scores accumulated since the last
    call, summed over processes under data parallelism, and starts a new accumulation.
    """

    def __init__(self, model: nn.Module, families: list[GroupFamily], form: str = "fisher") -> None:
        if form not in FORMS:
            raise LoraPruneError(f"form must be one of {FORMS}, got {form!r}")
        self.form = form
        self.families = list(families)
        self._root = unwrap_model(model)
        self._slicings = {family.key: input_side(family) for family in self.families}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._squares: dict[str, torch.Tensor] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self.windows = 0

    def install(self) -> ActivationGradientScores:
        """Register the forward pre-hooks (after any existing ones, so masked inputs are seen)."""
        if self._handles:
            return self
        for family in self.families:
            module = self._root.get_submodule(self._slicings[family.key].module)
            self._handles.append(module.register_forward_pre_hook(self._forward_hook(family)))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> ActivationGradientScores:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _forward_hook(self, family: GroupFamily) -> Callable:
        slicing = self._slicings[family.key]
        block, segment = slicing.block, family.segment(slicing)

        def hook(_module: nn.Module, args: tuple) -> None:
            h = args[0]
            if not (torch.is_grad_enabled() and h.requires_grad):
                return
            # the grad hook reads `h` through this one-element list, which it empties: no cycle through `h`
            held = [h.detach()]

            def on_grad(grad: torch.Tensor) -> None:
                value = held.pop()
                with torch.no_grad(), torch.autocast(device_type=grad.device.type, enabled=False):
                    products = (value[..., segment].float() * grad[..., segment].float()).flatten(1, -2)
                    per_unit = products.sum(1).view(value.shape[0], family.count, block).sum(-1)
                    self._add(family.key, per_unit)

            h.register_hook(on_grad)

        return hook

    def _add(self, key: str, per_unit: torch.Tensor) -> None:
        squares, sums = (per_unit**2).sum(0), per_unit.sum(0)
        if key in self._squares:
            self._squares[key] += squares
            self._sums[key] += sums
        else:
            self._squares[key], self._sums[key] = squares, sums
        if key == self.families[0].key:
            self.windows += per_unit.shape[0]

    def has_scores(self) -> bool:
        return bool(self._squares)

    def collect(self) -> dict[str, torch.Tensor]:
        """Scores accumulated since the last call (float32 CPU, `[family.count]` each); then reset.

        A family that no backward pass reached since the last call gets zeros.
        """
        scores = {}
        for family in self.families:
            squares = self._squares.get(family.key)
            if squares is None:
                squares = sums = torch.zeros(family.count)
            else:
                sums = self._sums[family.key]
            squares, sums = all_reduce_sum([squares, sums])
            # each process's loss is the mean over its own windows: as a share of the mean over all
            # processes' windows (what data parallelism trains), every gradient is `world` times too large
            world = world_size()
            value = squares / world**2 if self.form == "fisher" else sums.abs() / world
            scores[family.key] = value.float().cpu()
        self._squares.clear()
        self._sums.clear()
        self.windows = 0
        return scores


class ActivationGradientCriterion(Criterion):
    """One-shot: the activation-gradient score of every unit over the calibration windows.

    One backward pass of the mean loss per micro-batch with every parameter frozen: the
    gradient reaches the scored activations through the input embeddings' output, which is
    made to require grad for the pass. No parameter gets a gradient.
    """

    name = "activation"
    needs_data = True

    def __init__(self, form: str = "fisher", batch_size: int = 4) -> None:
        if form not in FORMS:
            raise LoraPruneError(f"form must be one of {FORMS}, got {form!r}")
        self.form = form
        self.batch_size = batch_size

    def score(
        self, model: nn.Module, families: list[GroupFamily], batches: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if batches is None:
            raise LoraPruneError("the activation-gradient criterion needs calibration batches (token windows)")
        previous = {param: param.requires_grad for param in model.parameters()}
        embeddings = unwrap_model(model).get_input_embeddings()
        handle = embeddings.register_forward_hook(lambda _m, _i, output: output.requires_grad_(True))
        try:
            for param in model.parameters():
                param.requires_grad_(False)
            with ActivationGradientScores(model, families, self.form) as scores:
                # each window's change is squared on its own inside the hooks, whatever the micro-batch
                backward_mean_loss(model, batches, self.batch_size, desc="activation-gradient scoring")
                return scores.collect()
        finally:
            handle.remove()
            for param, flag in previous.items():
                param.requires_grad_(flag)
