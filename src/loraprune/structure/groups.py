"""Pruning groups as data: which slices of which matrices are removed together.

All units of one kind in one decoder layer form a `GroupFamily` (the 3 KV groups of
layer 5, or its 1,536 MLP channels). Unit `u` of a family owns the block
`[offset + u·block, offset + (u+1)·block)` of rows (dim 0, biases included) or columns
(dim 1) of each of the family's matrix slicings. The offset is 0 for a matrix of its own;
a fused matrix (Phi-3's `qkv_proj`, `gate_up_proj`) appears once per segment, each with
the offset where that segment starts. Groups know nothing about how they are scored or chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Kind = Literal["attention", "mlp"]
Unit = Literal["head", "kv_group", "query_head", "channel"]

#: keep-masks of every family, by `GroupFamily.key`: True = the unit is kept
Masks = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MatrixSlicing:
    """The part of one linear layer that a unit owns: `block` rows (dim 0) or columns (dim 1),
    counted from row (column) `offset`, where the family's segment of a fused matrix starts."""

    module: str
    dim: int
    block: int
    offset: int = 0


@dataclass(frozen=True)
class GroupFamily:
    """All units of one kind in one decoder layer, with the matrices they slice.

    For `query_head` units `units_per_kv` > 0: query head `u` reads key/value head
    `u // units_per_kv`, and pruning must remove the same number of query heads from
    every KV group (and keep at least one in each).
    """

    layer: int
    kind: Kind
    unit: Unit
    count: int
    matrices: tuple[MatrixSlicing, ...]
    params_per_unit: int
    units_per_kv: int = 0

    @property
    def key(self) -> str:
        return f"layers.{self.layer}.{self.kind}"

    def kv_of(self, unit_index: torch.Tensor) -> torch.Tensor:
        """KV group of each query-head unit (only for `query_head` families)."""
        return unit_index // self.units_per_kv

    def segment(self, slicing: MatrixSlicing) -> slice:
        """The rows (or columns) of `slicing`'s matrix that the family's units own together."""
        return slice(slicing.offset, slicing.offset + self.count * slicing.block)

    def index_of(self, keep: torch.Tensor, slicing: MatrixSlicing) -> torch.Tensor:
        """Row or column indices of `slicing`'s matrix that the kept units own."""
        units = torch.nonzero(keep, as_tuple=False).flatten()
        offsets = torch.arange(slicing.block)
        return (slicing.offset + units[:, None] * slicing.block + offsets[None, :]).flatten()

    def expand(self, keep: torch.Tensor, slicing: MatrixSlicing) -> torch.Tensor:
        """Per-row (or per-column) keep mask of the family's segment of `slicing`'s matrix."""
        return keep.repeat_interleave(slicing.block)

    def min_kept(self) -> int:
        """Units that must stay so the layer still computes something (one per KV group)."""
        return self.count // self.units_per_kv if self.unit == "query_head" else 1

    def is_feasible(self, keep: torch.Tensor) -> bool:
        """Whether a keep-mask respects the family's constraints."""
        if self.unit != "query_head":
            return bool(keep.sum() >= 1)
        per_kv = keep.view(-1, self.units_per_kv).sum(dim=1)
        return bool((per_kv == per_kv[0]).all() and per_kv[0] >= 1)


def full_masks(families: list[GroupFamily]) -> Masks:
    """Masks that keep every unit."""
    return {family.key: torch.ones(family.count, dtype=torch.bool) for family in families}


def removed_params(families: list[GroupFamily], masks: Masks, kind: Kind | None = None) -> int:
    """Parameters removed by `masks` (of one kind, or of both)."""
    return sum(int((~masks[f.key]).sum()) * f.params_per_unit for f in families if kind is None or f.kind == kind)


def total_params(families: list[GroupFamily], kind: Kind | None = None) -> int:
    """Parameters of all units (of one kind, or of both)."""
    return sum(f.count * f.params_per_unit for f in families if kind is None or f.kind == kind)


def masks_to_lists(masks: Masks) -> dict[str, list[bool]]:
    """JSON-friendly copy of masks (checkpoints, reports)."""
    return {key: [bool(v) for v in mask.tolist()] for key, mask in masks.items()}


def masks_from_lists(data: dict[str, list[bool]]) -> Masks:
    """Inverse of `masks_to_lists`."""
    return {key: torch.tensor(values, dtype=torch.bool) for key, values in data.items()}
