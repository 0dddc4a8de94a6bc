"""The curvature's normalisation (`curvature_scale`) and the calibration check of PrunedLoRA.

The normalisation test needs a model whose loss change under a removal is known: one LoRA linear
layer `y = (W0 + s·B·A)·x` under the Gaussian negative log-likelihood `½‖y − ŷ‖²`, with white
inputs `x` and targets drawn from the model itself (`y = ŷ + ε`, `ε ~ N(0, I)`). There the loss is
exactly quadratic in `B` (and in `A`), its Hessian is block-diagonal over the rows of `B` with one
shared block `s²·E[zzᵀ]` (`z = A·x`), and the empirical Fisher of the mean loss equals it in
expectation: the setting in which the design's shared-row curvature is exact. A correctly
normalised curvature must then predict the measured held-out loss change of an OBS removal.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from loraprune.rank_pruning.calibration import (
    HeldOutLoss,
    ModuleCheck,
    calibration_summary,
    sign_agreement,
    spearman,
)
from loraprune.rank_pruning.config import RankPruningConfig
from loraprune.rank_pruning.pruner import RankPruner
from loraprune.rank_pruning.run import split_held_out
from loraprune.rank_pruning.state import CurvatureStats, find_lora_modules

IN, OUT, R0 = 24, 40, 6


class GaussianLinear(nn.Module):
    """One linear layer whose loss is the Gaussian NLL (unit variance, constant dropped), averaged over examples."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(IN, OUT, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=0.5 * ((y - self.proj(x)) ** 2).sum(-1).mean())


def gaussian_lora_model() -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(GaussianLinear(), LoraConfig(r=R0, lora_alpha=R0, target_modules=["proj"]))
    for module in find_lora_modules(model):
        nn.init.normal_(module.lora_b, std=0.3)  # a trained-looking adapter: B is not zero
        nn.init.normal_(module.lora_a, std=0.3)
    return model


def sample(model: nn.Module, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`count` white inputs with targets drawn from the model's own predictive distribution."""
    x = torch.randn(count, IN, generator=generator)
    with torch.no_grad():
        mean = model.base_model.model.proj(x)
    return {"x": x, "y": mean + torch.randn(count, OUT, generator=generator)}


def pruning_event(curvature_scale: str, compensate: str, examples: int = 4, told_examples: int | None = None):
    """Observe gradients of `examples`-example batches for 400 steps, remove 2 of 6 components, measure.

    `told_examples`: the examples per step the pruner is told (default: the true count)."""
    model = gaussian_lora_model()
    config = RankPruningConfig(
        r0=R0,
        rank=R0 - 2,
        criterion="obs",
        basis="components",
        target_modules=("proj",),
        prune_every=400,
        per_event=2,
        warmup=0.0,
        cooldown=0.0,
        use_gradient=False,  # the true gradient is zero here; the window mean would only add noise
        curvature_scale=curvature_scale,
        compensate=compensate,
        damping=1e-4,
    )
    generator = torch.Generator().manual_seed(1)
    held_out = HeldOutLoss(model, sample(model, 50_000, generator))
    told = examples if told_examples is None else told_examples
    pruner = RankPruner(model, config, total_steps=400, examples_per_step=told, held_out=held_out)
    for step in range(1, 401):
        model.zero_grad()
        model(**sample(model, examples, generator)).loss.backward()
        pruner.observe_gradients()
        event = pruner.step(step)
    assert event is not None and event.total_rank == R0 - 2
    return event


def predicted_and_measured(curvature_scale: str, compensate: str) -> tuple[float, float]:
    event = pruning_event(curvature_scale, compensate)
    return event.predicted_loss_change, event.measured_loss_change


@pytest.mark.parametrize("compensate", ["b", "a"])
def test_fisher_curvature_predicts_the_measured_loss_change_of_a_removal(compensate):
    predicted, measured = predicted_and_measured("fisher", compensate)
    assert measured > 0.05  # the removal costs something measurable
    # Tolerance 10 %: the Fisher is estimated from 400 x 4 samples (about 5 % error on a 6 x 6
    # curvature), the damping adds 0.01 %, the held-out mean of 50,000 examples under 1 %.
    assert predicted == pytest.approx(measured, rel=0.10)


def test_gram_curvature_misprices_by_the_rows_over_the_batch():
    """The old form is the Fisher times rows / N (40 / 4 for B): off by an order of magnitude."""
    predicted, measured = predicted_and_measured("gram", "b")
    assert predicted / measured == pytest.approx(OUT / 4, rel=0.15)


@pytest.mark.parametrize("compensate", ["b", "a"])
def test_measured_curvature_corrects_a_misscaled_fisher(compensate):
    """Told 1 example per step instead of 4, the Fisher is 4x too flat; the factor measured along the
    removal on the held-out batch restores the scale, and with it the prediction."""
    event = pruning_event("measured", compensate, examples=4, told_examples=1)
    assert event.curvature_factor == pytest.approx(4.0, rel=0.15)
    assert event.gradient_factor == 1.0  # use_gradient=False: no gradient term to rescale
    assert event.predicted_loss_change == pytest.approx(event.measured_loss_change, rel=0.10)


def test_measured_curvature_needs_held_out_examples():
    with pytest.raises(Exception, match="calibration_examples"):
        RankPruningConfig(r0=R0, rank=2, criterion="obs", curvature_scale="measured", calibration_examples=0)


def test_curvature_divisors_normalise_by_steps_rows_and_examples():
    model = gaussian_lora_model()
    stats = CurvatureStats(find_lora_modules(model), R0, keep_gradients=False)
    for module in stats.modules:
        module.lora_a.grad = torch.ones_like(module.lora_a)
        module.lora_b.grad = torch.ones_like(module.lora_b)
    stats.accumulate()
    stats.accumulate()
    assert stats.divisors("b", "fisher", 8).tolist() == [2 * OUT / 8]
    assert stats.divisors("a", "fisher", 8).tolist() == [2 * IN / 8]
    assert stats.divisors("b", "gram", 8).tolist() == [2.0]


def test_pruner_rejects_a_step_of_no_examples():
    with pytest.raises(Exception, match="examples_per_step"):
        RankPruner(
            gaussian_lora_model(), RankPruningConfig(r0=R0, rank=2, target_modules=("proj",)), 4, examples_per_step=0
        )


def test_module_checks_measure_each_removal_alone_and_restore_the_weights():
    model = gaussian_lora_model()
    config = RankPruningConfig(
        r0=R0,
        rank=2,
        criterion="obs",
        basis="components",
        target_modules=("proj",),
        prune_every=1,
        per_event=4,
        warmup=0.0,
        cooldown=0.0,
        calibration_modules=1,
    )
    generator = torch.Generator().manual_seed(2)
    batch = sample(model, 256, generator)
    held_out = HeldOutLoss(model, batch)
    pruner = RankPruner(model, config, total_steps=1, examples_per_step=8, held_out=held_out)
    before = held_out()
    model.zero_grad()
    model(**sample(model, 8, generator)).loss.backward()
    pruner.observe_gradients()
    event = pruner.step(1)
    (check,) = event.module_checks  # one module, measured alone: the same as the whole event
    assert check.module == "proj"
    assert check.measured == pytest.approx(event.measured_loss_change, abs=1e-6)
    assert event.measured_loss_change == pytest.approx(held_out() - before, abs=1e-6)
    assert check.predicted == pytest.approx(event.predicted_loss_change)
    assert pruner.ranks() == {"proj": 2}


def test_spearman_and_sign_agreement():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486833)  # ties get their mean rank
    assert spearman([1], [2]) is None and spearman([1, 1], [1, 2]) is None
    assert sign_agreement([(0.1, 0.2), (-0.1, 0.3), (-1.0, -2.0), (0.0, 0.0)]) == 0.75
    assert sign_agreement([]) is None


def test_calibration_summary_of_events():
    events = [
        {
            "predicted_loss_change": p,
            "measured_loss_change": m,
            "module_checks": [vars(ModuleCheck("q", p / 2, 0.0, m / 2)), vars(ModuleCheck("k", p, 0.0, -m))],
        }
        for p, m in ((0.1, 0.2), (0.3, 0.5), (0.2, 0.1))
    ]
    summary = calibration_summary(events)
    assert summary["events"] == 3 and summary["module_checks"] == 6
    assert summary["spearman_events"] == pytest.approx(0.5)
    assert summary["sign_agreement_events"] == 1.0 and summary["sign_agreement_modules"] == 0.5
    assert summary["predicted_total"] == pytest.approx(0.6) and summary["measured_total"] == pytest.approx(0.8)
    assert calibration_summary([{"predicted_loss_change": 0.1, "measured_loss_change": None}]) is None


def test_split_held_out_keeps_the_last_examples_and_spares_small_data():
    examples = [{"input_ids": [i]} for i in range(6)]
    assert split_held_out(examples, 2) == (examples[:4], examples[4:])
    assert split_held_out(examples, 0) == (examples, [])
    assert split_held_out(examples, 6) == (examples, [])  # nothing left to train on otherwise


def test_run_report_states_the_measured_factors_and_the_statistics_size():
    from loraprune.run_report.contents import _statistics_paragraph

    record = {
        "pruning_events": [
            {"curvature_factor": 1297.0, "gradient_factor": 0.25},
            {"curvature_factor": None, "gradient_factor": None},
        ],
        "curvature_statistics_bytes": 3 * 2**20,
    }
    (paragraph,) = _statistics_paragraph(record)
    assert "1.3e+03" in paragraph.text or "1297" in paragraph.text
    assert "0.25" in paragraph.text and "3.0 MiB" in paragraph.text
    assert _statistics_paragraph({"pruning_events": [], "curvature_statistics_bytes": None}) == []
