"""The loss-aware score and recovery update of PrunedLoRA (design §1.2), as pure tensor maths.

One LoRA module `W0 + s·B·A` has rank components `j` (column `b_j` of `B`, row `a_j` of `A`).
Each factor is a *side* of the problem: a matrix whose rows share one curvature matrix over
the components (rows of `B` share `H_B`; the columns of `A`, i.e. the rows of `Aᵀ`, share
`H_A`). Per row `w_i` with gradient `g_i` the quadratic model of the loss change is

    f(Δ_i) = g_i·Δ_iᵀ + ½·Δ_i·H·Δ_iᵀ.

Removing a set `Q` forces `Δ_iQ = −w_iQ`. With `M = (H⁻¹)_QQ`:

OBS compensation: `Δ_i = −w_iQ·M⁻¹·(H⁻¹)_Q,:`, the smallest move in the `H` metric that zeroes
`Q`; its exact loss change is `Σ_i ½·w_iQ·M⁻¹·w_iQᵀ − w_iQ·M⁻¹·(g_i·H⁻¹)_Qᵀ`.

The full second-order variant (also taking the Newton step `−g_i·H⁻¹` on the remaining
components, the constrained minimiser of `f`) was removed: with the empirical-Fisher curvature
the step is a natural-gradient step of size one, and on SmolLM2 (r0 = 64, batch 2) it took
max|B| to 4·10⁵ at the first event with the loss-scale curvature (the training loss went from
1.1 to 21); with the plain Gram it had gone 0.19 → 1666 over three events (issue 15).

The score of a component on a side is the loss change of removing it alone with that side's
update, the other factor held fixed. A component is dead as soon as one of its factors is zero,
so one factor's update already accounts for the whole removal; the other factor's slice is then
dropped at no cost. Applying *both* one-sided updates (the literal `score_B + score_A` form)
makes both factors absorb the same removal: on a trained SmolLM2 adapter this overshoot raised
the held-out loss far above plain zeroing, while either one-sided update recovered almost all of
it (README, PrunedLoRA). `remove_components` therefore compensates with one factor by default.

Removing several components either uses the block form above or removes them one
at a time, downdating `H⁻¹` in between; on the quadratic model both give the same weights and
the same total loss change (the tests check this against brute force). After an OBS removal
the gradient of the remaining coordinates is unchanged (`Δ_i·H` only has a `j` entry), which
is what the sequential form uses.

Everything here works on compact matrices of the *active* components only, in the dtype it is
given; callers gather and scatter them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def damped_inverse(gram: Tensor, damping: float) -> Tensor:
    """Inverse of `gram + λ·I` with the relative damping `λ = damping · mean(diag(gram))`.

    Works on a batch `(..., k, k)` of symmetric positive semi-definite matrices. A matrix with
    no curvature information (zero diagonal, e.g. no gradient seen yet) gets `H = I`, for
    which the score reduces to the magnitude criterion.
    """
    size = gram.shape[-1]
    mean_diag = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1)
    lam = torch.where(mean_diag > 0, damping * mean_diag, torch.ones_like(mean_diag))
    eye = torch.eye(size, dtype=gram.dtype, device=gram.device)
    damped = gram + lam[..., None, None] * eye
    return torch.cholesky_inverse(torch.linalg.cholesky(damped))


@dataclass
class Side:
    """One factor of a module as seen by the quadratic model.

    `weight` and `grad` are `(n, k)`: one row per row of `B` (or per column of `A`), one column
    per active component. `hinv` is the `(k, k)` inverse of the damped curvature. `grad=None`
    drops the gradient term (classical OBS saliency). `projected` is `g_i·H⁻¹` for every row,
    computed once here (zeros without a gradient) since scores and updates both need it.
    """

    weight: Tensor
    grad: Tensor | None
    hinv: Tensor
    projected: Tensor | None = None

    def __post_init__(self) -> None:
        if self.projected is None:
            self.projected = torch.zeros_like(self.weight) if self.grad is None else self.grad @ self.hinv


def removal_scores(side: Side) -> Tensor:
    """Loss change of removing each component alone (with its recovery update), shape `(k,)`."""
    w, u = side.weight, side.projected
    return (0.5 * (w * w).sum(0) - (w * u).sum(0)) / torch.diagonal(side.hinv)


def block_update(side: Side, remove: Tensor) -> tuple[Tensor, Tensor]:
    """Update `Δ` (`(n, k)`) that zeroes the components `remove` at once, and its loss change."""
    hinv_rows = side.hinv[remove]  # (q, k)
    block = hinv_rows[:, remove]  # M = (H⁻¹)_QQ
    w_q = side.weight[:, remove]
    u = side.projected
    coef = torch.linalg.solve(block, w_q.T).T  # rows w_iQ·M⁻¹
    delta = -coef @ hinv_rows
    return delta, 0.5 * (coef * w_q).sum() - (coef * u[:, remove]).sum()


def downdate_inverse(hinv: Tensor, position: int) -> Tensor:
    """`H⁻¹` of the remaining components after removing the one at `position`: `(H_FF)⁻¹`."""
    keep = torch.arange(hinv.shape[0], device=hinv.device) != position
    column = hinv[keep, position]
    return hinv[keep][:, keep] - torch.outer(column, column) / hinv[position, position]


def block_removal(sides: Sequence[Side], remove: Tensor) -> tuple[list[Tensor], Tensor]:
    """New weights of every side after removing the components `remove` with the block form.

    Returns the updated `(n, k)` weights (removed columns exactly zero) and the summed
    loss change of the quadratic models.
    """
    new_weights, total = [], torch.zeros((), dtype=sides[0].weight.dtype, device=sides[0].weight.device)
    for side in sides:
        delta, loss = block_update(side, remove)
        weight = side.weight + delta
        weight[:, remove] = 0.0
        new_weights.append(weight)
        total = total + loss
    return new_weights, total


class SequentialRemoval:
    """Removes components of one module one at a time, downdating `H⁻¹` between removals.

    Keeps the compact state of every side over the components still present. `remove(j)`
    applies the single-component OBS update for original component index `j`;
    `greedy(count)` repeatedly removes the lowest-scoring component, rescoring after each
    removal, which accounts for the compensation already done.
    """

    def __init__(self, sides: Sequence[Side]) -> None:
        self.sides = list(sides)
        self.present = list(range(sides[0].weight.shape[1]))
        self.removed: list[int] = []
        self.loss_change = torch.zeros((), dtype=sides[0].weight.dtype, device=sides[0].weight.device)

    def scores(self) -> Tensor:
        """Scores of the components still present (in the order of `present`)."""
        return sum(removal_scores(side) for side in self.sides)

    def remove(self, component: int) -> None:
        """Remove original component `component` and compensate with the others."""
        position = self.present.index(component)
        index = torch.tensor([position], device=self.sides[0].weight.device)
        keep = torch.arange(len(self.present), device=index.device) != position
        updated = []
        for side in self.sides:
            delta, loss = block_update(side, index)
            self.loss_change = self.loss_change + loss
            weight = (side.weight + delta)[:, keep]
            hinv = downdate_inverse(side.hinv, position)
            if side.grad is None:
                updated.append(Side(weight, None, hinv))
            else:  # gradient unchanged on the rest; g_F·(H_FF)⁻¹ = u_F − (u_j / [H⁻¹]_jj)·(H⁻¹)_jF
                pivot = side.hinv[position, position]
                projected = (side.projected - torch.outer(side.projected[:, position] / pivot, side.hinv[position]))[
                    :, keep
                ]
                updated.append(Side(weight, side.grad[:, keep], hinv, projected))
        self.sides = updated
        self.present.pop(position)
        self.removed.append(component)

    def greedy(self, count: int) -> None:
        """Remove `count` components, each time the one with the lowest current score."""
        for _ in range(count):
            self.remove(self.present[int(torch.argmin(self.scores()))])

    def weights(self) -> list[Tensor]:
        """Full `(n, k)` weights of every side: compensated columns, removed columns zero."""
        size = len(self.present) + len(self.removed)
        columns = torch.tensor(self.present, dtype=torch.long, device=self.sides[0].weight.device)
        out = []
        for side in self.sides:
            weight = side.weight.new_zeros(side.weight.shape[0], size)
            weight[:, columns] = side.weight
            out.append(weight)
        return out


COMPENSATED_SIDES = {"b": (0,), "a": (1,), "both": (0, 1)}  # indices into a module's (B side, A side)


def ranking_scores(side_scores: tuple[Tensor, Tensor], compensate: str) -> Tensor:
    """Per-component score used to choose what to remove: the predicted loss change of the removal applied.

    A component is dead once either of its factors is zero, so removing it with the recovery
    update on one factor costs that factor's score; the other factor's slice then goes for free.
    `auto` takes the cheaper factor per component (the update itself picks one factor per module).
    """
    score_b, score_a = side_scores
    if compensate == "both":
        return score_b + score_a
    if compensate == "b":
        return score_b
    if compensate == "a":
        return score_a
    return torch.minimum(score_b, score_a)


@dataclass
class ModuleRemoval:
    """Result of removing components from one module: new compact weights of both factors."""

    positions: Tensor  # removed positions among the active components
    weight_b: Tensor  # (out, k): B's active columns, removed ones zero
    weight_a: Tensor  # (in, k): Aᵀ's active columns, removed ones zero
    loss_change: Tensor | None  # predicted by the quadratic model of the compensating factor(s); None: no model
    compensated: str  # "b", "a" or "both"; "none" for a removal that only zeroes (criteria.py)
    linear_change: Tensor | None = None  # the gradient term of `loss_change` alone (Σ g·Δ); None: no model


def remove_components(
    sides: tuple[Side, Side],
    side_scores: tuple[Tensor, Tensor],
    count: int,
    compensate: str,
    sequential: bool = False,
) -> ModuleRemoval:
    """Remove `count` components of a module (B side, A side) with the recovery update on `compensate`.

    The compensating factor's remaining components absorb the removal (block form, or one at a
    time with downdates when `sequential`); the other factor only loses the removed slices,
    which costs nothing once the compensating factor's slices are zero. `auto` tries B and A and
    keeps the one with the lower predicted loss change.
    """
    best = None
    for choice in ("b", "a") if compensate == "auto" else (compensate,):
        chosen = COMPENSATED_SIDES[choice]
        compensating = [sides[i] for i in chosen]
        if sequential:
            greedy = SequentialRemoval(compensating)
            greedy.greedy(count)
            positions = torch.tensor(greedy.removed, dtype=torch.long, device=sides[0].weight.device)
            weights, loss = greedy.weights(), greedy.loss_change
        else:
            positions = torch.argsort(sum(side_scores[i] for i in chosen), stable=True)[:count]
            weights, loss = block_removal(compensating, positions)
        if best is None or loss < best[2]:
            best = (choice, positions, loss, dict(zip(chosen, weights)))
    choice, positions, loss, updated = best
    new = [updated.get(i, side.weight.clone()) for i, side in enumerate(sides)]
    for weight in new:
        weight[:, positions] = 0.0
    linear = sum(
        ((new[i] - sides[i].weight) * sides[i].grad).sum()
        for i in COMPENSATED_SIDES[choice]
        if sides[i].grad is not None
    )
    return ModuleRemoval(positions, new[0], new[1], loss, choice, torch.as_tensor(linear))
