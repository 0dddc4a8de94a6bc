"""PrunedLoRA's score and recovery update against a brute-force solution of the same quadratic problem."""

import pytest
import torch

from loraprune.rank_pruning.obs import (
    SequentialRemoval,
    Side,
    block_removal,
    block_update,
    damped_inverse,
    downdate_inverse,
    ranking_scores,
    removal_scores,
    remove_components,
)

F64 = torch.float64


def random_problem(seed: int, rows: int = 7, k: int = 6, with_grad: bool = True):
    """Random weights, gradients and a well-conditioned curvature `H` (and its inverse)."""
    gen = torch.Generator().manual_seed(seed)
    factor = torch.randn(k + 3, k, generator=gen, dtype=F64)
    hessian = factor.T @ factor + 0.3 * torch.eye(k, dtype=F64)
    weight = torch.randn(rows, k, generator=gen, dtype=F64)
    grad = torch.randn(rows, k, generator=gen, dtype=F64) if with_grad else None
    return weight, grad, hessian


def quadratic_loss(delta, grad, hessian):
    """f(Δ) = Σ_i g_i·Δ_iᵀ + ½·Δ_i·H·Δ_iᵀ."""
    linear = 0.0 if grad is None else (grad * delta).sum()
    return linear + 0.5 * ((delta @ hessian) * delta).sum()


def brute_force(weight, grad, hessian, remove):
    """Solve the constrained problem directly with `H` (no inverse identities): Δ_Q = −w_Q, free rest.

    OBS: the free coordinates minimise ½ΔHΔᵀ (the gradient term only prices the result).
    """
    k = hessian.shape[0]
    free = torch.tensor([c for c in range(k) if c not in remove.tolist()], dtype=torch.long)
    delta = torch.zeros_like(weight)
    delta[:, remove] = -weight[:, remove]
    rhs = delta[:, remove] @ hessian[remove][:, free]  # H_QF coupling
    delta[:, free] = -torch.linalg.solve(hessian[free][:, free], rhs.T).T
    return delta, quadratic_loss(delta, grad, hessian)


def test_damped_inverse_is_relative_and_batched():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, generator=gen, dtype=F64)
    gram = x.transpose(1, 2) @ x
    gram[1] = 0.0  # no information: identity
    hinv = damped_inverse(gram, 0.01)
    for m in (0, 2):
        lam = 0.01 * torch.diagonal(gram[m]).mean()
        torch.testing.assert_close(hinv[m], torch.linalg.inv(gram[m] + lam * torch.eye(4, dtype=F64)))
    torch.testing.assert_close(hinv[1], torch.eye(4, dtype=F64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_removal_matches_brute_force(seed):
    weight, grad, hessian = random_problem(seed)
    side = Side(weight, grad, torch.linalg.inv(hessian))
    scores = removal_scores(side)
    for j in range(hessian.shape[0]):
        remove = torch.tensor([j])
        expected_delta, expected_loss = brute_force(weight, grad, hessian, remove)
        delta, loss = block_update(side, remove)
        torch.testing.assert_close(delta, expected_delta, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(loss, expected_loss, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(scores[j], expected_loss, atol=1e-10, rtol=1e-9)
        assert torch.all((weight + delta)[:, j].abs() < 1e-12)


@pytest.mark.parametrize("seed", [3, 4])
def test_block_and_sequential_removal_match_brute_force(seed):
    weight, grad, hessian = random_problem(seed, rows=5, k=7)
    remove = torch.tensor([5, 1, 3])
    expected_delta, expected_loss = brute_force(weight, grad, hessian, remove)
    side = Side(weight, grad, torch.linalg.inv(hessian))

    (block_weight,), block_loss = block_removal([side], remove)
    torch.testing.assert_close(block_weight, weight + expected_delta, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(block_loss, expected_loss, atol=1e-10, rtol=1e-9)

    sequential = SequentialRemoval([side])
    for j in remove.tolist():
        sequential.remove(j)
    torch.testing.assert_close(sequential.weights()[0], weight + expected_delta, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(sequential.loss_change, expected_loss, atol=1e-10, rtol=1e-9)


def test_downdate_is_inverse_of_the_remaining_block():
    _, _, hessian = random_problem(5)
    keep = [0, 1, 3, 4, 5]
    torch.testing.assert_close(downdate_inverse(torch.linalg.inv(hessian), 2), torch.linalg.inv(hessian[keep][:, keep]))


def test_greedy_rescoring_picks_minimum_and_reports_its_true_loss():
    weight, grad, hessian = random_problem(6, rows=4, k=8)
    side_b = Side(weight, grad, torch.linalg.inv(hessian))
    weight_a, grad_a, hessian_a = random_problem(7, rows=9, k=8)
    side_a = Side(weight_a, grad_a, torch.linalg.inv(hessian_a))
    first = int(torch.argmin(removal_scores(side_b) + removal_scores(side_a)))

    greedy = SequentialRemoval([side_b, side_a])
    greedy.greedy(3)
    assert greedy.removed[0] == first
    removed = torch.tensor(greedy.removed)
    _, loss_b = brute_force(weight, grad, hessian, removed)
    _, loss_a = brute_force(weight_a, grad_a, hessian_a, removed)
    torch.testing.assert_close(greedy.loss_change, loss_b + loss_a, atol=1e-10, rtol=1e-9)


def test_special_cases_obs_saliency_and_magnitude():
    weight, _, hessian = random_problem(8)
    hinv = torch.linalg.inv(hessian)
    obs = removal_scores(Side(weight, None, hinv))
    torch.testing.assert_close(obs, 0.5 * (weight**2).sum(0) / torch.diagonal(hinv))
    magnitude = removal_scores(Side(weight, None, torch.eye(6, dtype=F64)))
    torch.testing.assert_close(magnitude, 0.5 * (weight**2).sum(0))


@pytest.mark.parametrize("seed", range(5))
def test_compensation_beats_plain_zeroing_on_the_quadratic_model(seed):
    weight, _, hessian = random_problem(seed + 20)
    hinv = torch.linalg.inv(hessian)
    remove = torch.tensor([0, 4])
    zeroing = torch.zeros_like(weight)
    zeroing[:, remove] = -weight[:, remove]
    # OBS compensation with no gradient (with one it can be worse than zeroing: it ignores g)
    (obs_weight,), obs_loss = block_removal([Side(weight, None, hinv)], remove)
    assert obs_loss < quadratic_loss(zeroing, None, hessian)
    torch.testing.assert_close(obs_loss, quadratic_loss(obs_weight - weight, None, hessian))


def redundant_lora_problem(seed: int = 0, rows: int = 6, inputs: int = 5, k: int = 4):
    """LoRA factors whose components 0 and 1 share the same row of `A`, with empirical-Fisher curvatures.

    The loss is a least-squares regression through `W = B·A` over random mini-batches; the Gram
    matrices of the per-batch gradients of `B` and `Aᵀ` are the curvatures, as in the pruner.
    """
    gen = torch.Generator().manual_seed(seed)
    lora_b = torch.randn(rows, k, generator=gen, dtype=F64)
    lora_a = torch.randn(k, inputs, generator=gen, dtype=F64)
    lora_a[1] = lora_a[0]
    target = torch.randn(rows, inputs, generator=gen, dtype=F64)
    gram_b, gram_a = torch.zeros(k, k, dtype=F64), torch.zeros(k, k, dtype=F64)
    for _ in range(16):
        x = torch.randn(8, inputs, generator=gen, dtype=F64)
        grad_w = (x @ (lora_b @ lora_a - target).T).T @ x / 8  # dL/dW of ½‖x·(W − T)ᵀ‖²/8
        grad_b, grad_a = grad_w @ lora_a.T, (lora_b.T @ grad_w).T
        gram_b += grad_b.T @ grad_b
        gram_a += grad_a.T @ grad_a
    sides = (Side(lora_b, None, damped_inverse(gram_b, 1e-6)), Side(lora_a.T, None, damped_inverse(gram_a, 1e-6)))
    return lora_b, lora_a, sides


@pytest.mark.parametrize("sequential", [False, True])
def test_one_sided_compensation_absorbs_a_redundant_component(sequential):
    lora_b, lora_a, sides = redundant_lora_problem()
    scores = tuple(removal_scores(side) for side in sides)
    product = lora_b @ lora_a
    removal_b = remove_components(sides, (scores[0], scores[1]), 1, "b", sequential)
    removal_both = remove_components(sides, scores, 1, "both", sequential)
    zeroing_error = (lora_b[:, :1] @ lora_a[:1]).norm()
    # component 0 (or 1) goes and its twin takes over its contribution: the product barely changes
    assert removal_b.positions.tolist() in ([0], [1])
    error_b = (removal_b.weight_b @ removal_b.weight_a.T - product).norm()
    assert error_b < 1e-3 * zeroing_error
    assert torch.all(removal_b.weight_b[:, removal_b.positions] == 0)
    assert torch.all(removal_b.weight_a[:, removal_b.positions] == 0)
    # compensating both factors for the same removal overshoots: about as bad as no compensation
    error_both = (removal_both.weight_b @ removal_both.weight_a.T - product).norm()
    assert error_both > 0.5 * zeroing_error


def test_auto_compensation_takes_the_cheaper_factor():
    _, _, sides = redundant_lora_problem(seed=1)
    scores = tuple(removal_scores(side) for side in sides)
    auto = remove_components(sides, scores, 2, "auto")
    by_side = {choice: remove_components(sides, scores, 2, choice) for choice in ("b", "a")}
    cheaper = min(by_side, key=lambda choice: float(by_side[choice].loss_change))
    assert auto.compensated == cheaper
    torch.testing.assert_close(auto.weight_b, by_side[cheaper].weight_b)
    torch.testing.assert_close(auto.weight_a, by_side[cheaper].weight_a)
    assert torch.equal(ranking_scores(scores, "auto"), torch.minimum(*scores))
    torch.testing.assert_close(ranking_scores(scores, "both"), scores[0] + scores[1])
