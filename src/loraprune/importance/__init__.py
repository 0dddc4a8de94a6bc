"""Importance criteria: one score per unit of every group family (higher = more important).

A criterion knows nothing about schedules or budgets. Each lives in its own module and is
listed in `CRITERIA`; `get_criterion(name)` builds one.
"""

from __future__ import annotations

from loraprune.errors import ConfigError
from loraprune.importance.activation_gradient import ActivationGradientCriterion
from loraprune.importance.base import Criterion, unit_scores
from loraprune.importance.lora_guided import LoraGuidedCriterion
from loraprune.importance.magnitude import MagnitudeCriterion
from loraprune.importance.random import RandomCriterion
from loraprune.importance.taylor import TaylorCriterion
from loraprune.importance.wanda_sp import WandaSPCriterion

CRITERIA: dict[str, type[Criterion]] = {
    MagnitudeCriterion.name: MagnitudeCriterion,
    RandomCriterion.name: RandomCriterion,
    TaylorCriterion.name: TaylorCriterion,
    WandaSPCriterion.name: WandaSPCriterion,
    LoraGuidedCriterion.name: LoraGuidedCriterion,
    ActivationGradientCriterion.name: ActivationGradientCriterion,
}


def get_criterion(name: str, **options) -> Criterion:
    """A criterion by its name (see `CRITERIA`)."""
    if name not in CRITERIA:
        raise ConfigError(f"unknown criterion {name!r}; choose one of {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name](**options)


__all__ = ["CRITERIA", "Criterion", "get_criterion", "unit_scores"]
