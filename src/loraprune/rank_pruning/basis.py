"""Rank components in the singular basis of a module's update `B·A`: an exact re-parametrisation.

A LoRA module's components (columns `b_j` of `B`, rows `a_j` of `A`) are an arbitrary basis of
its update: `B·A = (B·T)·(T⁻¹·A)` for every invertible `T`. At initialisation the rows of `A`
are random, so the update's energy is spread over all `r0` components and removing any of them
removes a piece of every direction the adapter learnt. Rotated into the singular basis of
`B·A` (`B·T = U·S·D`, `T⁻¹·A = D⁻¹·Vᵀ`), component `j` carries exactly singular value `σ_j`,
the components are orthogonal on both sides, and removing the `k` weakest is the best
rank-`(r − k)` approximation of the update (Eckart–Young). Measured, though, rotating at every
event of a run trains worse than pruning the adapter's own components (README, PrunedLoRA: the
128 → 8 gap study), which is why `basis="components"` is the default.

The rotation changes nothing the model computes. Everything that lives in the component basis
moves with it, exactly where it is linear in the gradients:

* the gradients: `∂L/∂(B·T) = G_B·T⁻ᵀ`, `∂L/∂(T⁻¹·A) = Tᵀ·G_A`;
* their Gram matrices: `H_B → T⁻¹·H_B·T⁻ᵀ`, `H_A → Tᵀ·H_A·T`;
* Adam's first moment, like a gradient;
* Adam's second moment, elementwise, under the approximation that a row's gradient entries
  are uncorrelated: `v'_ij = Σ_k v_ik·(T⁻ᵀ)_kj²` (and `Σ_k (Tᵀ)_jk²·v_kc` for `A`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: singular values below this fraction of the largest are raised to it in `T` (keeps `T` invertible)
RELATIVE_FLOOR = 1e-6


@dataclass(frozen=True)
class BasisChange:
    """`T` and `T⁻¹` (`(k, k)`, float64) of one module's active components, and the new factors."""

    transform: Tensor  # T: new B = B·T
    inverse: Tensor  # T⁻¹: new A = T⁻¹·A
    weight_b: Tensor  # (out, k) = B·T, columns in decreasing singular value
    weight_a: Tensor  # (k, in) = T⁻¹·A

    def gradient_b(self, grad_b: Tensor) -> Tensor:
        """A gradient (or first moment) of `B`'s active columns, `(out, k)`, in the new basis."""
        return (grad_b.double() @ self.inverse.T).to(grad_b.dtype)

    def gradient_a(self, grad_a: Tensor) -> Tensor:
        """A gradient (or first moment) of `A`'s active rows, `(k, in)`, in the new basis."""
        return (self.transform.T @ grad_a.double()).to(grad_a.dtype)

    def gram_b(self, gram: Tensor) -> Tensor:
        """A Gram sum `Σ G_Bᵀ·G_B` over the active components, `(k, k)`, in the new basis."""
        return (self.inverse @ gram.double() @ self.inverse.T).to(gram.dtype)

    def gram_a(self, gram: Tensor) -> Tensor:
        """A Gram sum `Σ G_A·G_Aᵀ` over the active components, `(k, k)`, in the new basis."""
        return (self.transform.T @ gram.double() @ self.transform).to(gram.dtype)

    def second_moment_b(self, moment: Tensor) -> Tensor:
        """Adam's `exp_avg_sq` of `B`'s active columns in the new basis (entries taken as uncorrelated)."""
        return (moment.double() @ self.inverse.T.square()).to(moment.dtype)

    def second_moment_a(self, moment: Tensor) -> Tensor:
        """Adam's `exp_avg_sq` of `A`'s active rows in the new basis (entries taken as uncorrelated)."""
        return (self.transform.T.square() @ moment.double()).to(moment.dtype)


def singular_basis(weight_b: Tensor, weight_a: Tensor, row_norm: float | None = None) -> BasisChange:
    """The change of basis that makes the components of `weight_b (out, k) · weight_a (k, in)` orthogonal.

    With `Aᵀ = Q·R` and `B·Rᵀ = U·S·Wᵀ`: `T = Rᵀ·W·D`, `T⁻¹ = D⁻¹·Wᵀ·R⁻ᵀ`, so that `B·T = U·S·D`
    and `T⁻¹·A = D⁻¹·(Q·W)ᵀ`. `row_norm=None`: balanced, `D = S^-½` (both factors of component
    `j` have norm `√σ_j`); a number: every row of the new `A` has that norm, `D = 1/row_norm`
    (the rest of the scale in `B`, as in a LoRA adapter whose `A` starts random and `B` at zero,
    which keeps the optimizer's step sizes on the update where they were). Computed in float64;
    the new factors are returned in the input dtype. Singular values are floored at
    `RELATIVE_FLOOR` of the largest, and rows of `A` that are (nearly) dependent leave the basis
    as it is, so `T` stays finite.
    """
    b, a = weight_b.double(), weight_a.double()
    k = a.shape[0]
    eye = torch.eye(k, dtype=torch.float64, device=a.device)
    if k > a.shape[1]:  # more components than input features: the rows of A are dependent
        return BasisChange(eye, eye, weight_b.clone(), weight_a.clone())
    _, r = torch.linalg.qr(a.T)  # Aᵀ = Q·R: (in, k), (k, k)
    diagonal = torch.diagonal(r).abs()
    floor = max(float(diagonal.max()) * RELATIVE_FLOOR, torch.finfo(torch.float64).tiny)
    if bool((diagonal < floor).any()):  # A has (nearly) dependent rows: no basis change
        return BasisChange(eye, eye, weight_b.clone(), weight_a.clone())
    # all k right singular vectors, also when B has fewer rows than components (k_proj of a GQA
    # model at r0 = 512 has 192): the update has rank <= out, the rest get singular value 0
    _, s, wh = torch.linalg.svd(b @ r.T, full_matrices=True)
    s = torch.cat([s, s.new_zeros(k - s.numel())])
    s = s.clamp_min(max(float(s.max()) * RELATIVE_FLOOR, torch.finfo(torch.float64).tiny))
    scale = 1 / s.sqrt() if row_norm is None else torch.full_like(s, 1 / row_norm)
    transform = r.T @ wh.T * scale
    inverse = torch.linalg.solve_triangular(r, wh.T, upper=True, left=True).T / scale[:, None]
    return BasisChange(
        transform,
        inverse,
        (b @ transform).to(weight_b.dtype),
        (inverse @ a).to(weight_a.dtype),
    )
