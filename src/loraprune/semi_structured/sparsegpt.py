"""SparseGPT with an N:M pattern (Frantar & Alistarh, 2023): optimal-brain-surgeon pruning with weight updates.

For one linear layer with calibration inputs `X` (tokens × in), pruning minimises the
reconstruction error `‖X·Wᵀ − X·Ŵᵀ‖²`, whose Hessian for every output row is
`H = XᵀX` (here the mean over tokens, plus a damping `λ·I` with `λ` = `damp` × the mean of
its diagonal; inputs that are never active get `H_jj = 1` and their weights are zeroed).

Columns are processed left to right. Removing weight `w_j` of a row and letting the columns
*to its right* compensate is the OBS step `δ = −(w_j / [H_F⁻¹]_jj)·[H_F⁻¹]_{j,:}`, where
`H_F⁻¹` is the inverse Hessian of the not-yet-processed columns `F`. With the upper Cholesky
factor `U` of `H⁻¹` (`H⁻¹ = UᵀU`), row `j` of `U` divided by `U_jj` is exactly that row for
`F = {j, j+1, …}`, so one factorisation serves every step: the error `e = w_j / U_jj` is
spread as `W[:, j:] −= e·U[j, j:]`. Columns are handled in blocks of `block_size`: updates
inside a block are applied at once per column, and the block's accumulated errors reach the
columns after it in one product (lazy batch updates; the result does not depend on the block
size).

N:M masks are chosen when the first column of each group of `M` is reached, from the
(updated) weights of the group: the `N` largest `w_j² / U_jj²` (the OBS saliency) of each row
are kept.
"""

from __future__ import annotations

import torch

from loraprune.errors import LoraPruneError
from loraprune.semi_structured.pattern import NMPattern, pattern_mask


def damped_inverse_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of `(H + λI)⁻¹` (float32 or the input's wider dtype), and the mask of dead inputs."""
    h = hessian.clone() if hessian.dtype == torch.float64 else hessian.float()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    diagonal = torch.diagonal(h)
    diagonal += damp * diagonal.mean()
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info):
        raise LoraPruneError("the damped input Hessian is not positive definite; increase the damping")
    inverse = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inverse, upper=True), dead


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor, hessian: torch.Tensor, pattern: NMPattern, block_size: int = 128, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """The N:M-pruned, compensated weight (dtype of the computation) and its keep-mask.

    `weight` is `out × in`, `hessian` `in × in` (e.g. `InputHessian.hessian()`). The
    computation is float32 (float64 if the Hessian is float64); pruned weights are exactly 0.
    """
    rows, columns = weight.shape
    pattern.check_width(columns, "the weight")
    if hessian.shape != (columns, columns):
        raise LoraPruneError(f"the Hessian must be {columns} x {columns}, got {tuple(hessian.shape)}")
    if block_size < 1 or block_size % pattern.m:
        raise LoraPruneError(f"block_size must be a positive multiple of M={pattern.m}, got {block_size}")
    upper, dead = damped_inverse_cholesky(hessian, damp)
    w = weight.to(upper.dtype).clone()
    w[:, dead] = 0.0
    keep = torch.zeros(rows, columns, dtype=torch.bool, device=w.device)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        u = upper[start:end, start:end]
        diagonal = torch.diagonal(u)
        for i in range(end - start):
            if i % pattern.m == 0:
                saliency = block[:, i : i + pattern.m].square() / diagonal[i : i + pattern.m].square()
                keep[:, start + i : start + i + pattern.m] = pattern_mask(saliency, pattern)
            column = block[:, i]
            kept = torch.where(keep[:, start + i], column, 0.0)
            error = (column - kept) / u[i, i]
            block[:, i:].sub_(error[:, None] * u[i, i:][None, :])
            block[:, i] = kept  # exactly the kept value (and exact zeros), whatever the rounding of the update
            errors[:, i] = error
        w[:, start:end] = block
        w[:, end:].sub_(errors @ upper[start:end, end:])
    return w, keep
