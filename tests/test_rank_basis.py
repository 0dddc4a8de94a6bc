"""PrunedLoRA's singular basis (`basis="singular"`): an exact re-parametrisation whose truncation is the SVD's."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from loraprune.rank_pruning.basis import singular_basis
from loraprune.rank_pruning.config import RankPruningConfig
from loraprune.rank_pruning.pruner import RankPruner
from loraprune.rank_pruning.state import find_lora_modules

IN, OUT, R0 = 20, 30, 6


def factors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(OUT, R0, generator=generator), torch.randn(R0, IN, generator=generator)


def test_singular_basis_keeps_the_update_and_makes_components_orthogonal_and_balanced():
    weight_b, weight_a = factors()
    change = singular_basis(weight_b, weight_a)
    torch.testing.assert_close(change.weight_b @ change.weight_a, weight_b @ weight_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(change.transform @ change.inverse, torch.eye(R0, dtype=torch.float64))
    singular = torch.linalg.svdvals((weight_b @ weight_a).double()).float()[:R0]
    gram_b = change.weight_b.T @ change.weight_b
    gram_a = change.weight_a @ change.weight_a.T
    torch.testing.assert_close(gram_b, torch.diag(singular), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(gram_a, torch.diag(singular), atol=1e-3, rtol=1e-4)


def test_gradients_and_their_grams_rotate_with_the_basis():
    """The transformed gradient statistics are those the rotated factors would have produced."""
    weight_b, weight_a = factors(1)
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, IN, generator=generator), torch.randn(16, OUT, generator=generator)

    def gradients(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, a = b.double().requires_grad_(), a.double().requires_grad_()
        loss = ((x.double() @ a.T @ b.T - y.double()) ** 2).mean()
        return torch.autograd.grad(loss, (b, a))

    change = singular_basis(weight_b, weight_a)
    grad_b, grad_a = gradients(weight_b, weight_a)
    new_grad_b, new_grad_a = gradients(change.weight_b, change.weight_a)
    torch.testing.assert_close(change.gradient_b(grad_b), new_grad_b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(change.gradient_a(grad_a), new_grad_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(change.gram_b(grad_b.T @ grad_b), new_grad_b.T @ new_grad_b, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(change.gram_a(grad_a @ grad_a.T), new_grad_a @ new_grad_a.T, atol=1e-6, rtol=1e-4)


def test_a_scaled_basis_gives_every_row_of_a_the_norm_asked_for():
    weight_b, weight_a = factors(3)
    change = singular_basis(weight_b, weight_a, row_norm=0.5)
    torch.testing.assert_close(change.weight_b @ change.weight_a, weight_b @ weight_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(change.weight_a.norm(dim=1), torch.full((R0,), 0.5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("row_norm", [None, 0.5])
def test_more_components_than_rows_of_b_still_give_an_exact_square_change(row_norm):
    """k_proj of SmolLM2 has 192 output rows: at r0 = 512 the update B*A has rank <= 192 < k."""
    generator = torch.Generator().manual_seed(4)
    weight_b, weight_a = torch.randn(4, R0, generator=generator), torch.randn(R0, IN, generator=generator)
    change = singular_basis(weight_b, weight_a, row_norm=row_norm)
    assert change.transform.shape == change.inverse.shape == (R0, R0)
    assert change.weight_b.shape == (4, R0) and change.weight_a.shape == (R0, IN)
    torch.testing.assert_close(change.weight_b @ change.weight_a, weight_b @ weight_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(change.transform @ change.inverse, torch.eye(R0, dtype=torch.float64))
    magnitude = change.weight_b.norm(dim=0) * change.weight_a.norm(dim=1)
    singular = torch.linalg.svdvals((weight_b @ weight_a).double()).float()
    torch.testing.assert_close(magnitude[:4], singular[:4], atol=1e-4, rtol=1e-4)
    assert magnitude[4:].max() < 1e-4 * singular[0]  # the components beyond the update's rank carry nothing


def test_more_components_than_input_features_leave_the_basis_alone():
    generator = torch.Generator().manual_seed(5)
    weight_b, weight_a = torch.randn(OUT, 8, generator=generator), torch.randn(8, 5, generator=generator)
    change = singular_basis(weight_b, weight_a)
    torch.testing.assert_close(change.weight_b, weight_b)
    torch.testing.assert_close(change.weight_a, weight_a)


def test_dependent_rows_of_a_leave_the_basis_alone():
    weight_b, weight_a = factors()
    weight_a[1] = 2 * weight_a[0]
    change = singular_basis(weight_b, weight_a)
    torch.testing.assert_close(change.weight_b, weight_b)
    torch.testing.assert_close(change.weight_a, weight_a)


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(IN, OUT, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def trained_model_and_optimizer(steps: int = 5) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    model = get_peft_model(Regression(), LoraConfig(r=R0, lora_alpha=R0, target_modules=["proj"]))
    for module in find_lora_modules(model):
        nn.init.normal_(module.lora_b, std=0.3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(32, IN)
    target = torch.randn(32, OUT)
    for _ in range(steps):
        optimizer.zero_grad()
        ((model(x) - target) ** 2).mean().backward()
        optimizer.step()
    return model, optimizer, x


@pytest.mark.parametrize("criterion", ["magnitude", "obs"])
def test_pruner_in_the_singular_basis(criterion):
    """Rotating leaves the outputs and Adam's first moment exact; by magnitude the event is the truncated SVD."""
    model, optimizer, x = trained_model_and_optimizer()
    module = find_lora_modules(model)[0]
    config = RankPruningConfig(
        r0=R0,
        rank=2,
        target_modules=("proj",),
        basis="singular",
        criterion=criterion,
        prune_every=1,
        per_event=4,
        warmup=0.0,
        cooldown=0.0,
        use_gradient=False,
    )
    pruner = RankPruner(model, config, total_steps=1)
    ((model(x) - 1.0) ** 2).mean().backward()
    pruner.observe_gradients()
    update = (module.lora_b @ module.lora_a).detach().double()
    with torch.no_grad():
        before = model(x)
    moment_b = optimizer.state[module.lora_b]["exp_avg"].clone()
    row_norm = float(module.lora_a.detach().square().sum(1).mean().sqrt())  # the pruner keeps A's scale
    change = singular_basis(module.lora_b.detach(), module.lora_a.detach(), row_norm=row_norm)
    pruner._rotate_to_singular_basis(optimizer)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(optimizer.state[module.lora_b]["exp_avg"], change.gradient_b(moment_b))
    event = pruner.step(1, optimizer)
    assert event is not None and pruner.ranks() == {module.name: 2}
    if criterion == "magnitude":  # the two largest singular directions remain, exactly
        u, s, vh = torch.linalg.svd(update)
        best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
        torch.testing.assert_close((module.lora_b @ module.lora_a).detach().double(), best, atol=1e-4, rtol=1e-4)
