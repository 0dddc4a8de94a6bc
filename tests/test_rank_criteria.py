"""Rank-component criteria (magnitude, taylor, wanda, sparsegpt) against direct computations, and end to end."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loraprune.errors import ConfigError
from loraprune.rank_pruning.activations import ActivationStats
from loraprune.rank_pruning.callback import RankPruningCallback
from loraprune.rank_pruning.config import CRITERIA, RankPruningConfig
from loraprune.rank_pruning.criteria import (
    magnitude_scores,
    sparsegpt_plan,
    taylor_scores,
    wanda_scores,
    zeroing_plan,
)
from loraprune.rank_pruning.export import export_pruned_adapter
from loraprune.rank_pruning.obs import damped_inverse
from loraprune.rank_pruning.pruner import RankPruner
from loraprune.rank_pruning.state import find_lora_modules
from loraprune.training import TrainingConfig, train
from test_rank_pruning import collate, lora_model, token_dataset
from tiny_models import tiny_model, token_batch

F64 = torch.float64


def random_factors(seed: int, out: int = 7, inp: int = 9, k: int = 5):
    """Random `B` (out × k) and `A` (k × in) in float64."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out, k, generator=gen, dtype=F64), torch.randn(k, inp, generator=gen, dtype=F64)


def reconstruction_optimum(weight_b, z_aug, removed):
    """min_B' ‖Z_aug·(B' − B)ᵀ‖² with the columns `removed` of B' forced to zero, by least squares.

    Returns B' and the minimum over 2N (N = rows of `Z_aug` minus the k damping rows), i.e. ½·ΔHΔᵀ.
    """
    k = weight_b.shape[1]
    free = [j for j in range(k) if j not in removed]
    target = z_aug @ weight_b.T  # (N + k, out): Z_aug·b_iᵀ for every row i of B
    solution = torch.linalg.lstsq(z_aug[:, free], target).solution  # (|F|, out)
    new_b = torch.zeros_like(weight_b)
    new_b[:, free] = solution.T
    rows = z_aug.shape[0] - k
    return new_b, ((z_aug @ (new_b - weight_b).T) ** 2).sum() / (2 * rows)


def damped_activations(z, damping):
    """Z stacked over sqrt(N·λ)·I, so that Z_augᵀZ_aug / N = ZᵀZ/N + λI with λ = damping·mean diag(ZᵀZ/N)."""
    rows, k = z.shape
    lam = damping * torch.diagonal(z.T @ z / rows).mean()
    return torch.cat([z, (rows * lam).sqrt() * torch.eye(k, dtype=z.dtype)])


# ---------------------------------------------------------------------------- scores on random matrices


def test_magnitude_scores_are_the_norms_of_the_rank_one_products():
    weight_b, weight_a = random_factors(0)
    direct = torch.stack([torch.outer(weight_b[:, j], weight_a[j]).norm() for j in range(weight_b.shape[1])])
    torch.testing.assert_close(magnitude_scores(weight_b, weight_a.T), direct)


def test_taylor_scores_sum_g_times_w_over_the_component_with_autograd_gradients():
    weight_b, weight_a = random_factors(1)
    gen = torch.Generator().manual_seed(11)
    w0 = torch.randn(7, 9, generator=gen, dtype=F64)
    x, y = torch.randn(13, 9, generator=gen, dtype=F64), torch.randn(13, 7, generator=gen, dtype=F64)
    b, a = weight_b.clone().requires_grad_(), weight_a.clone().requires_grad_()
    torch.tanh(x @ (w0 + 0.5 * b @ a).T - y).pow(2).sum().backward()
    direct = torch.zeros(5, dtype=F64)
    for j in range(5):
        for i in range(7):
            direct[j] += abs(b.grad[i, j] * weight_b[i, j])
        for col in range(9):
            direct[j] += abs(a.grad[j, col] * weight_a[j, col])
    torch.testing.assert_close(taylor_scores(weight_b, b.grad, weight_a.T, a.grad.T), direct)


def test_wanda_scores_are_input_norms_of_each_component_times_its_b_column():
    weight_b, weight_a = random_factors(2)
    x = torch.randn(40, 9, generator=torch.Generator().manual_seed(12), dtype=F64)
    direct = torch.stack([(x @ weight_a[j]).norm() * weight_b[:, j].norm() for j in range(5)])
    gram_z = weight_a @ (x.T @ x / 40) @ weight_a.T  # the mean Gram E[z zᵀ] the pruner accumulates
    torch.testing.assert_close(wanda_scores(weight_b, gram_z) * 40**0.5, direct)


def test_zeroing_plans_zero_the_lowest_scores_and_move_nothing_else():
    weight_b, weight_a = random_factors(3)
    plan = zeroing_plan("magnitude", weight_b, weight_a.T)
    removal = plan.remove(2)
    lowest = sorted(torch.argsort(magnitude_scores(weight_b, weight_a.T))[:2].tolist())
    assert sorted(removal.positions.tolist()) == lowest
    keep = [j for j in range(5) if j not in lowest]
    assert torch.equal(removal.weight_b[:, keep], weight_b[:, keep]) and torch.all(removal.weight_b[:, lowest] == 0)
    assert torch.equal(removal.weight_a[:, keep], weight_a.T[:, keep]) and torch.all(removal.weight_a[:, lowest] == 0)
    assert removal.loss_change is None and removal.compensated == "none"
    # taylor without gradients falls back to magnitude; wanda without input statistics is refused
    torch.testing.assert_close(zeroing_plan("taylor", weight_b, weight_a.T).scores, plan.scores)
    with pytest.raises(ValueError):
        zeroing_plan("wanda", weight_b, weight_a.T)


@pytest.mark.parametrize("sequential", [False, True], ids=["block", "sequential"])
def test_sparsegpt_compensates_b_as_the_least_squares_reconstruction(sequential):
    weight_b, weight_a = random_factors(4, out=6, inp=8, k=6)
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(13), dtype=F64)
    z = x @ weight_a.T
    hinv = damped_inverse(z.T @ z / 30, 0.01)
    z_aug = damped_activations(z, 0.01)
    plan = sparsegpt_plan(weight_b, weight_a.T, hinv, sequential)
    # the score of each component is the reconstruction error of removing it alone, compensated
    single = torch.stack([reconstruction_optimum(weight_b, z_aug, [j])[1] for j in range(6)])
    torch.testing.assert_close(plan.scores, single)
    removal = plan.remove(3)
    removed = removal.positions.tolist()
    if sequential:  # greedy: each time the component whose compensated removal costs least given the earlier ones
        expected: list[int] = []
        for _ in range(3):
            rest = [j for j in range(6) if j not in expected]
            expected.append(min(rest, key=lambda j: float(reconstruction_optimum(weight_b, z_aug, [*expected, j])[1])))
        assert removed == expected
    else:
        assert sorted(removed) == sorted(torch.argsort(single)[:3].tolist())
    best_b, error = reconstruction_optimum(weight_b, z_aug, removed)
    torch.testing.assert_close(removal.weight_b, best_b)
    torch.testing.assert_close(removal.loss_change, error)
    kept = [j for j in range(6) if j not in removed]
    assert torch.equal(removal.weight_a[:, kept], weight_a.T[:, kept]) and torch.all(removal.weight_a[:, removed] == 0)
    assert removal.compensated == "b"


# ---------------------------------------------------------------------------- input statistics


def test_activation_stats_are_the_component_gram_of_training_inputs():
    model = lora_model(r0=4)
    modules = find_lora_modules(model)
    stats = ActivationStats(modules, 4)
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(modules))}
    for index, module in enumerate(modules):
        module.layer.register_forward_pre_hook(
            lambda _m, args, i=index: inputs[i].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        )
    model.train()
    with torch.no_grad():
        model(token_batch(batch=2, seed=1))
        model(token_batch(batch=3, seed=2))  # two micro-batches of one step
    assert stats.commit()
    model.eval()
    with torch.no_grad():
        model(token_batch(batch=2, seed=3))  # evaluation: not counted
    assert stats.commit()
    grams, seen = stats.means()
    assert bool(seen.all())
    for index in (0, 5, len(modules) - 1):
        x = torch.cat(inputs[index][:2])  # the two training forward passes
        a = modules[index].lora_a.detach()
        torch.testing.assert_close(grams[index], a @ (x.T @ x) @ a.T / x.shape[0], rtol=1e-5, atol=1e-6)
    # a new step with replace=True makes its own statistics the window (curvature="batch")
    model.train()
    with torch.no_grad():
        model(token_batch(batch=1, seed=4))
    assert stats.commit(replace=True)
    x, a = inputs[0][-1], modules[0].lora_a.detach()
    torch.testing.assert_close(stats.means()[0][0], a @ (x.T @ x) @ a.T / x.shape[0], rtol=1e-5, atol=1e-6)
    # a non-finite step is left out; without hooks nothing is added any more
    stats._step_gram[1, 0, 0] = float("inf")
    assert not stats.commit()
    torch.testing.assert_close(stats.means()[0][0], a @ (x.T @ x) @ a.T / x.shape[0], rtol=1e-5, atol=1e-6)
    stats.remove_hooks()
    model(token_batch(batch=1, seed=5))
    assert stats.commit() and stats.rows[0] == x.shape[0]


def test_config_rejects_an_unknown_criterion():
    with pytest.raises(ConfigError, match="criterion"):
        RankPruningConfig(r0=8, rank=2, criterion="fisher")


# ---------------------------------------------------------------------------- through the pruner


@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "wanda", "sparsegpt"])
def test_an_event_removes_what_the_direct_computation_picks(criterion):
    """Two steps (a window of two batches, weights unchanged), then one event removing 3 of 6 components."""
    r0, remove = 6, 3
    model = lora_model(r0=r0)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data.normal_(0, 0.2)
    config = RankPruningConfig(
        r0=r0,
        rank=r0 - remove,
        criterion=criterion,
        basis="components",  # the direct computation scores the adapter's own components
        prune_every=2,
        per_event=remove,
        warmup=0.0,
        cooldown=0.0,
        use_gradient=False,
    )  # taylor keeps its gradients anyway
    pruner = RankPruner(model, config, total_steps=2)
    modules = pruner.modules
    before = [(m.lora_a.detach().clone(), m.lora_b.detach().clone()) for m in modules]
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(modules))}
    for index, module in enumerate(modules):
        module.layer.register_forward_pre_hook(
            lambda _m, args, i=index: inputs[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
        )
    grads: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    model.train()
    for step in (1, 2):
        batch = collate(token_dataset(4, seed=step))
        model(**batch).loss.backward()
        grads.append([(m.lora_a.grad.double().clone(), m.lora_b.grad.double().clone()) for m in modules])
        pruner.observe_gradients()
        event = pruner.step(step)
        model.zero_grad()
    assert event is not None and event.step == 2 and set(pruner.ranks().values()) == {r0 - remove}
    assert event.predicted_loss_change is None
    for index, module in enumerate(modules):
        a0, b0 = (t.double() for t in before[index])
        grad_a = (grads[0][index][0] + grads[1][index][0]) / 2  # mean over the window
        grad_b = (grads[0][index][1] + grads[1][index][1]) / 2
        x = torch.cat(inputs[index])
        if criterion == "magnitude":
            direct = torch.stack([torch.outer(b0[:, j], a0[j]).norm() for j in range(r0)])
        elif criterion == "taylor":
            direct = (grad_b * b0).abs().sum(0) + (grad_a * a0).abs().sum(1)
        elif criterion == "wanda":
            direct = torch.stack([(x @ a0[j]).norm() * b0[:, j].norm() for j in range(r0)])
        else:
            z_aug = damped_activations(x @ a0.T, config.damping)
            direct = torch.stack([reconstruction_optimum(b0, z_aug, [j])[1] for j in range(r0)])
        removed = sorted(torch.argsort(direct)[:remove].tolist())
        assert sorted(event.removed[module.name]) == removed, module.name
        kept = [j for j in range(r0) if j not in removed]
        expected_b = reconstruction_optimum(b0, z_aug, removed)[0] if criterion == "sparsegpt" else b0.clone()
        expected_b[:, removed] = 0.0
        torch.testing.assert_close(module.lora_b.detach().double(), expected_b, rtol=1e-4, atol=1e-5)
        assert torch.equal(module.lora_a[kept], before[index][0][kept]) and torch.all(module.lora_a[removed] == 0)
        assert event.compensated[module.name] == ("b" if criterion == "sparsegpt" else "none")
        assert not module.layer.lora_A["default"]._forward_hooks  # input statistics stopped after the last event


@pytest.mark.parametrize("schedule", ["per_module", "global"])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_reaches_the_target_in_training_and_exports(tmp_path, criterion, schedule):
    base_dir = tmp_path / "base"
    tiny_model(seed=0).save_pretrained(base_dir)
    model = lora_model(r0=8)
    config = RankPruningConfig(
        r0=8,
        rank=3,
        criterion=criterion,
        schedule=schedule,
        prune_every=2,
        per_event=2,
        warmup=0.1,
        cooldown=0.3,
        normalization="none" if criterion == "obs" else "l2",
    )
    callback = RankPruningCallback(config)
    train(
        model,
        token_dataset(),
        collate,
        TrainingConfig(steps=12, batch_size=4, learning_rate=2e-2, logging_steps=50),
        callbacks=[callback],
    )
    pruner = callback.pruner
    assert pruner.finished
    ranks = pruner.ranks()
    if schedule == "per_module":
        assert set(ranks.values()) == {3}
    else:
        assert sum(ranks.values()) == 3 * len(ranks)
    assert all((event.predicted_loss_change is None) == (criterion != "obs") for event in pruner.history)

    exported = export_pruned_adapter(
        model, pruner.active_components(), tmp_path / "adapter", base_model_name_or_path=str(base_dir)
    )
    assert exported.ranks == {name: rank for name, rank in ranks.items() if rank > 0}
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter").eval()
    ids = token_batch(batch=2, length=9, seed=5)
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
        assert (loaded(ids).logits - expected).abs().max().item() <= 1e-5
        with model.disable_adapter():  # the adapter is not a no-op
            assert (model(ids).logits - expected).abs().max().item() > 1e-4
