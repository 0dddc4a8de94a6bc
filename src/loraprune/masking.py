"""The masked model: pruned units contribute nothing, but no tensor changes shape.

A unit is silenced by zeroing its columns' inputs in the family's input-side matrices
(`o_proj` for heads, `down_proj` for MLP channels). That is exact — the unit's outputs
never reach the residual stream — and it works the same on frozen, quantised and
LoRA-wrapped layers, because the hook sits in front of the whole layer (base and LoRA).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from loraprune.structure import GroupFamily, Masks, unwrap_model


class MaskHooks:
    """Forward pre-hooks that apply (and follow updates of) a set of keep-masks.

    Use as a context manager, or call `remove()`. `update(masks)` swaps the masks in place
    so an iterative pruner keeps one set of hooks for the whole run.
    """

    def __init__(self, model: nn.Module, families: list[GroupFamily], masks: Masks) -> None:
        self._masks = dict(masks)
        self._cache: dict[tuple, object] = {}
        self._handles = []
        root = unwrap_model(model)
        for family in families:
            for slicing in family.matrices:
                if slicing.dim != 1:
                    continue
                module = root.get_submodule(slicing.module)
                hook = self._make_hook(family, slicing)
                self._handles.append(module.register_forward_pre_hook(hook))

    def _make_hook(self, family: GroupFamily, slicing):
        def hook(_module: nn.Module, args: tuple):
            keep = self._masks.get(family.key)
            if keep is None or bool(keep.all()):
                return None
            x = args[0]
            cache_key = (family.key, slicing.module, x.device, x.dtype)
            scale = self._cache.get(cache_key)
            if scale is None:
                scale = torch.ones(x.shape[-1], dtype=x.dtype)
                scale[family.segment(slicing)] = family.expand(keep, slicing).to(x.dtype)
                scale = scale.to(x.device)
                self._cache[cache_key] = scale
            return (x * scale, *args[1:])

        return hook

    def update(self, masks: Masks) -> None:
        """Use new masks from the next forward pass on."""
        self._masks = dict(masks)
        self._cache.clear()

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Every unit back for the forward passes inside (the dense teacher of self-distillation)."""
        masks, self._masks = self._masks, {}
        try:
            yield
        finally:
            self._masks = masks

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> MaskHooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
