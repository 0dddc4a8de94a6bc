"""Pruning decisions need valid evidence: enough finite scoring steps before an event, and a run
that cannot reach its target on them fails instead of claiming it did."""

from __future__ import annotations

import logging

from loraprune.errors import LoraPruneError
from loraprune.safety.divergence import nonfinite_loss_step

logger = logging.getLogger(__name__)


class TargetNotReachedError(LoraPruneError):
    """A pruning run ended without reaching its target on valid scores."""


def enough_scoring_steps(method: str, observations: int, minimum: int, ramp_end: int, step: int) -> bool:
    """Whether a pruning event at `step` may use scores averaged over `observations` finite steps;
    warns that the event is postponed when they are fewer than `minimum`. The minimum is capped at
    `ramp_end` (the step where the schedule reaches its target), so that a run without skipped
    steps always has the evidence for its final event."""
    minimum = max(1, min(minimum, ramp_end))
    if observations >= minimum:
        return True
    logger.warning(
        "%s: only %d finite scoring step(s) by step %d, fewer than the %d a pruning event needs "
        "(--min-scoring-steps); pruning postponed",
        method,
        observations,
        step,
        minimum,
    )
    return False


def require_target(reached: bool, method: str, scoring_steps: int, steps: int, log_history: list[dict]) -> None:
    """Fail a run whose pruning did not reach its target, instead of saving a model that pretends it did.

    The schedule always reaches the target by the last step, so this happens only when pruning
    events were postponed for lack of finite scores.
    """
    if reached:
        return
    loss_step = nonfinite_loss_step(log_history)
    loss = f"; the training loss first went non-finite at step {loss_step}" if loss_step is not None else ""
    raise TargetNotReachedError(
        f"{method} did not reach its pruning target: only {scoring_steps} of {steps} steps gave finite scores, "
        f"too few for the scheduled pruning events{loss}. Lower --learning-rate. Nothing was written"
    )
