"""Criteria for the rank components of a LoRA module, side by side with PrunedLoRA's own (`obs`).

Component `j` of `W0 + s·B·A` is row `a_j` of `A` with column `b_j` of `B`. Everything here sees
one module's *active* components in the compact layout of `obs.py`: `weight_b` `(out, k)` holds
`B`'s active columns, `weight_a` `(in, k)` those of `Aᵀ`; `grad_b`, `grad_a` are the mean LoRA
gradients over the statistics window (same layout); `gram_z` `(k, k)` is the mean Gram matrix
`E[z·zᵀ]` of the component activations `z = A·x` over the module's inputs `x` (`activations.py`),
i.e. `A·(XᵀX/N)·Aᵀ` for the `N` input rows `X`.

* `obs` (default): PrunedLoRA's loss-aware score with the recovery update of one factor
  (design §1.2, `obs.py`).
* `magnitude`: `‖b_j‖·‖a_j‖`, the norm of the component's rank-one product `b_j·a_j`.
* `taylor`: `Σ_i |G_B,ij·b_ij| + Σ_l |G_A,jl·a_jl|`, LLM-Pruner's first-order element importance
  `|G ⊙ W|` summed over the component's column of `B` and row of `A`.
* `wanda`: `‖X·a_jᵀ‖·‖b_j‖` (Wanda's `|W|·‖X‖` at the granularity of a component), computed as
  `sqrt([gram_z]_jj)·‖b_j‖`: with the *mean* Gram the common factor `sqrt(N)` is dropped, which
  changes no ranking (every module sees the same tokens).
* `sparsegpt`: OBS on the columns of `B` with the layer-reconstruction curvature
  `H = gram_z + λI` (the relative damping `config.damping`) and no gradient term: score
  `½·‖b_j‖² / [H⁻¹]_jj`, and the remaining columns of `B` move to minimise `‖(B' − B)·Z‖` with
  the removed columns forced to zero (`Z` the activations) — SparseGPT's update, on components.
  This is `obs.Side(weight_b, None, H⁻¹)` compensated on `B`; `A` is left as it is.

`magnitude`, `taylor` and `wanda` only zero the removed components: no other weight moves, and
there is no model of the loss change to report (`ModuleRemoval.loss_change` is None). Their
scores are on each module's own scale; with the global schedule, `normalization="l2"` makes
them comparable across modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from loraprune.rank_pruning.obs import ModuleRemoval, Side, ranking_scores, removal_scores, remove_components


def magnitude_scores(weight_b: Tensor, weight_a: Tensor) -> Tensor:
    """`‖b_j‖·‖a_j‖` for every component, shape `(k,)`."""
    return weight_b.norm(dim=0) * weight_a.norm(dim=0)


def taylor_scores(weight_b: Tensor, grad_b: Tensor, weight_a: Tensor, grad_a: Tensor) -> Tensor:
    """`Σ |G ⊙ W|` over each component's column of `B` and row of `A`, shape `(k,)`."""
    return (grad_b * weight_b).abs().sum(0) + (grad_a * weight_a).abs().sum(0)


def wanda_scores(weight_b: Tensor, gram_z: Tensor) -> Tensor:
    """`sqrt(E[z_j²])·‖b_j‖`, i.e. `‖X·a_jᵀ‖·‖b_j‖ / sqrt(N)`, shape `(k,)`."""
    return torch.diagonal(gram_z).clamp_min(0).sqrt() * weight_b.norm(dim=0)


@dataclass
class CompensatedPlan:
    """A module under a criterion with a quadratic model and a recovery update (`obs`, `sparsegpt`)."""

    sides: tuple[Side, Side]  # (B side, A side)
    compensate: str
    sequential: bool = False

    def __post_init__(self) -> None:
        self.side_scores = tuple(removal_scores(side) for side in self.sides)
        self.scores = ranking_scores(self.side_scores, self.compensate)

    def remove(self, count: int) -> ModuleRemoval:
        """Remove the `count` components the criterion picks, the compensating factor absorbing them."""
        return remove_components(self.sides, self.side_scores, count, self.compensate, self.sequential)


@dataclass
class ZeroingPlan:
    """A module under a criterion that only zeroes what it removes (`magnitude`, `taylor`, `wanda`)."""

    weight_b: Tensor
    weight_a: Tensor
    scores: Tensor

    def remove(self, count: int) -> ModuleRemoval:
        """Zero the `count` lowest-scoring components (ties: the lower index first); nothing else moves."""
        positions = torch.argsort(self.scores, stable=True)[:count]
        weight_b, weight_a = self.weight_b.clone(), self.weight_a.clone()
        weight_b[:, positions] = 0.0
        weight_a[:, positions] = 0.0
        return ModuleRemoval(positions, weight_b, weight_a, None, "none")


def sparsegpt_plan(weight_b: Tensor, weight_a: Tensor, hinv_z: Tensor, sequential: bool = False) -> CompensatedPlan:
    """OBS on the columns of `B` with `hinv_z`, the inverse of the damped input Gram `E[z·zᵀ] + λI`.

    `A` takes no part in the update: its side carries its weights (to drop the removed slices)
    with an identity curvature, and its scores are not used (`compensate="b"`). The removal's
    `loss_change` is the reconstruction error `½·E‖ΔB·z‖²` of the output (without the scaling
    `s`), not a loss change; `RankPruner` does not report it as one.
    """
    eye = torch.eye(hinv_z.shape[0], dtype=weight_a.dtype, device=weight_a.device)
    return CompensatedPlan((Side(weight_b, None, hinv_z), Side(weight_a, None, eye)), "b", sequential)


def zeroing_plan(
    criterion: str,
    weight_b: Tensor,
    weight_a: Tensor,
    grads: tuple[Tensor, Tensor] | None = None,
    gram_z: Tensor | None = None,
) -> ZeroingPlan:
    """The plan of `magnitude`, `taylor` (needs `grads` = (grad_b, grad_a)) or `wanda` (needs `gram_z`).

    `taylor` without gradients (no finite gradient in the window) falls back to magnitude; the
    caller says so.
    """
    if criterion == "magnitude" or (criterion == "taylor" and grads is None):
        scores = magnitude_scores(weight_b, weight_a)
    elif criterion == "taylor":
        scores = taylor_scores(weight_b, grads[0], weight_a, grads[1])
    elif criterion == "wanda" and gram_z is not None:
        scores = wanda_scores(weight_b, gram_z)
    else:
        raise ValueError(f"{criterion!r} is not a zeroing criterion, or its statistics are missing")
    return ZeroingPlan(weight_b, weight_a, scores)
