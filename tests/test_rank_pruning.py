"""PrunedLoRA end to end on tiny random Llama models: schedules, no reactivation, callback, plain loop."""

import pytest
import torch
from transformers import TrainerCallback

from loraprune.errors import ConfigError, LoraPruneError
from loraprune.lora import add_lora
from loraprune.rank_pruning.callback import RankPruningCallback
from loraprune.rank_pruning.config import RankPruningConfig
from loraprune.rank_pruning.pruner import RankPruner, global_removal_counts
from loraprune.rank_pruning.schedule import RankSchedule
from loraprune.rank_pruning.state import CurvatureStats, find_lora_modules
from loraprune.training import TrainingConfig, train
from tiny_models import tiny_model

VOCAB = 64


def token_dataset(count: int = 32, length: int = 12, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (length,), generator=gen)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def collate(batch: list[dict]) -> dict:
    return {key: torch.stack([example[key] for example in batch]) for key in batch[0]}


class Snapshot(TrainerCallback):
    """Copies the trainable weights after step `at` and keeps the optimizer for inspection."""

    def __init__(self, at: int):
        self.at, self.weights, self.optimizer = at, None, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            self.weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        self.optimizer = optimizer


def lora_model(r0: int = 8, alpha: float | None = None, seed: int = 0):
    torch.manual_seed(seed)
    return add_lora(tiny_model(seed=seed), r0, alpha)


def test_paper_schedule_reaches_target_exactly_and_raises_k2_when_needed():
    roomy = RankSchedule.paper(200, r0=16, rank=4, every=10, per_event=2, warmup=0.1, cooldown=0.1)
    assert roomy.events[:3] == (30, 40, 50) and roomy.removed[:3] == (2, 4, 6)
    assert roomy.removed[-1] == 12 and roomy.events[-1] == 180
    tight = RankSchedule.paper(40, r0=32, rank=8, every=10, per_event=2, warmup=0.1, cooldown=0.1)
    assert tight.events == (14, 24, 34, 36)
    assert tight.removed == (6, 12, 18, 24)


def test_cubic_schedule_ends_at_the_exact_total():
    schedule = RankSchedule.cubic(100, total=1000, every=10, warmup=0.1, cooldown=0.2)
    assert schedule.events[-1] == 80 and schedule.removed[-1] == 1000
    assert not schedule.per_module
    assert schedule.removed_after(15) is None and schedule.removed_after(20) == schedule.removed[0]


def test_global_counts_take_lowest_scores_and_respect_min_rank():
    scores = [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([5.0, 6.0]), torch.tensor([0.0, 0.05, 0.4, 0.5])]
    assert global_removal_counts(scores, 4, 0, "none") == [2, 0, 2]
    assert global_removal_counts(scores, 5, 0, "none") == [3, 0, 2]
    assert global_removal_counts(scores, 5, 0, "l2") == [2, 0, 3]  # module scores divided by their norm
    assert global_removal_counts(scores, 3, 2, "none") == [1, 0, 2]
    with pytest.raises(LoraPruneError):
        global_removal_counts(scores, 4, 2, "none")


def test_curvature_stats_are_the_gradient_gram_matrices():
    model = lora_model()
    modules = find_lora_modules(model)
    stats = CurvatureStats(modules, 8, keep_gradients=True)
    grads = []
    for step in range(2):
        gen = torch.Generator().manual_seed(step)
        for module in modules:
            module.lora_a.grad = torch.randn(module.lora_a.shape, generator=gen)
            module.lora_b.grad = torch.randn(module.lora_b.shape, generator=gen)
        grads.append([(m.lora_a.grad.clone(), m.lora_b.grad.clone()) for m in modules])
        assert stats.accumulate()
    index = 3
    g_a = [step[index][0] for step in grads]
    g_b = [step[index][1] for step in grads]
    torch.testing.assert_close(stats.gram_a[index], sum(a @ a.T for a in g_a))
    torch.testing.assert_close(stats.gram_b[index], sum(b.T @ b for b in g_b))
    torch.testing.assert_close(stats.grad_b[index], g_b[0] + g_b[1])
    modules[0].lora_a.grad[0, 0] = float("nan")
    assert not stats.accumulate() and stats.count == 2


@pytest.mark.parametrize(
    ("criterion", "use_gradient", "grams", "gradients"),
    [
        ("obs", True, True, True),
        ("obs", False, True, False),
        ("taylor", True, False, True),
        ("magnitude", True, False, False),
    ],
)
def test_pruner_keeps_only_the_statistics_its_criterion_reads(criterion, use_gradient, grams, gradients):
    """obs needs the Gram sums (and the gradient sums for its gradient term), taylor only the gradient
    sums, magnitude nothing: at r0 = 512 the two (m, r0, r0) Grams alone are 440 MB on SmolLM2."""
    model = lora_model()
    config = RankPruningConfig(r0=8, rank=2, criterion=criterion, use_gradient=use_gradient)
    pruner = RankPruner(model, config, total_steps=20)
    modules = pruner.modules
    for module in modules:
        module.lora_a.grad = torch.ones_like(module.lora_a)
        module.lora_b.grad = torch.ones_like(module.lora_b)
    pruner.observe_gradients()
    assert pruner.stats.keep_grams is grams and (pruner.stats.gram_a.numel() > 0) is grams
    assert bool(pruner.stats.grad_a) is gradients
    gram_bytes = 2 * len(modules) * 8 * 8 * 4
    adapter_bytes = sum(m.lora_a.numel() + m.lora_b.numel() for m in modules) * 4
    assert pruner.stats.nbytes == grams * gram_bytes + gradients * adapter_bytes
    if not (grams or gradients):
        modules[0].lora_a.grad[0, 0] = float("nan")  # nothing read, nothing to reject
    assert pruner.stats.accumulate()


def test_pruner_rejects_an_adapter_with_another_rank_or_scaling():
    with pytest.raises(LoraPruneError, match="scaling"):
        RankPruner(lora_model(r0=8, alpha=16), RankPruningConfig(r0=8, rank=2), total_steps=10)
    with pytest.raises(LoraPruneError, match="rank 8"):
        RankPruner(lora_model(r0=8), RankPruningConfig(r0=16, rank=2), total_steps=10)
    with pytest.raises(ConfigError):
        RankPruningConfig(r0=8, rank=8)


def test_trainer_callback_prunes_without_reactivation():
    model = lora_model(r0=8)
    config = RankPruningConfig(r0=8, rank=3, prune_every=2, per_event=2, warmup=0.1, cooldown=0.5)
    callback, keep = RankPruningCallback(config), Snapshot(at=10)
    train(
        model,
        token_dataset(),
        collate,
        TrainingConfig(steps=20, batch_size=4, learning_rate=5e-2, weight_decay=0.1, logging_steps=50),
        callbacks=[callback, keep],
    )
    pruner = callback.pruner
    assert pruner.finished and pruner.history[-1].step == 10  # pruning ended at step 10, training ran to 20
    assert set(pruner.ranks().values()) == {3}
    for module, active in zip(pruner.modules, pruner.masks.active):
        for param, pruned in ((module.lora_a, (~active,)), (module.lora_b, (slice(None), ~active))):
            assert torch.all(param[pruned] == 0)
            state = keep.optimizer.state[param]
            assert torch.all(state["exp_avg"][pruned] == 0) and torch.all(state["exp_avg_sq"][pruned] == 0)
        # the active components kept training for 10 more steps
        prefix = f"base_model.model.{module.name}"
        assert not torch.equal(module.lora_a, keep.weights[f"{prefix}.lora_A.default.weight"])
        assert not torch.equal(module.lora_b, keep.weights[f"{prefix}.lora_B.default.weight"])


def test_global_budget_is_met_exactly_with_adaptive_ranks():
    model = lora_model(r0=8)
    config = RankPruningConfig(r0=8, rank=3, schedule="global", prune_every=2, min_rank=1, removal="sequential")
    callback = RankPruningCallback(config)
    train(
        model,
        token_dataset(),
        collate,
        TrainingConfig(steps=12, batch_size=4, learning_rate=2e-2, logging_steps=50),
        callbacks=[callback],
    )
    ranks = list(callback.pruner.ranks().values())
    assert sum(ranks) == 3 * len(ranks)
    assert min(ranks) >= 1
    assert len(set(ranks)) > 1  # allocated across modules, not uniformly


def test_plain_loop_api_matches_the_schedule():
    model = lora_model(r0=6)
    config = RankPruningConfig(
        r0=6, rank=2, criterion="obs", prune_every=1, per_event=1, warmup=0.0, cooldown=0.0, curvature="batch"
    )
    pruner = RankPruner(model, config, total_steps=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = collate(token_dataset(4))
    for step in range(1, 5):
        model(**batch).loss.backward()
        pruner.observe_gradients()
        optimizer.step()
        event = pruner.step(step, optimizer)
        optimizer.zero_grad()
        assert event is not None and set(pruner.ranks().values()) == {6 - event.step}
    assert all(event.window_steps == 1 for event in pruner.history)


def test_global_events_skip_modules_already_at_rank_zero():
    model = lora_model(r0=4)
    config = RankPruningConfig(r0=4, rank=2, schedule="global", prune_every=1, warmup=0.0, cooldown=0.0)
    pruner = RankPruner(model, config, total_steps=3)
    pruner.masks.prune(0, pruner.masks.active_indices(0))  # a module that already vanished
    batch = collate(token_dataset(2))
    for step in range(1, 4):
        model(**batch).loss.backward()
        pruner.observe_gradients()
        pruner.step(step)
        model.zero_grad()
    ranks = list(pruner.ranks().values())
    assert ranks[0] == 0 and sum(ranks) == 2 * len(ranks)
