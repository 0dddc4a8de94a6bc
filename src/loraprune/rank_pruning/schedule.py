"""When PrunedLoRA prunes, and how many rank components must be gone after each event."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from loraprune.config import check
from loraprune.cubic_schedule import CubicSchedule

logger = logging.getLogger(__name__)


def _event_steps(cubic: CubicSchedule, every: int) -> tuple[int, ...]:
    """Every `every` steps after the warm-up, plus the first step of the cool-down (the last event)."""
    steps = list(range(cubic.warmup_steps + every, cubic.ramp_end + 1, every))
    if not steps or steps[-1] != cubic.ramp_end:
        steps.append(cubic.ramp_end)
    return tuple(steps)


@dataclass(frozen=True)
class RankSchedule:
    """Pruning events and the cumulative number of removed components required after each.

    `per_module`: the count is per module (every module loses the same number); `global`: the
    count is the total over all modules, distributed by score. The last event always requires
    the full amount, so the final budget is met exactly.
    """

    events: tuple[int, ...]
    removed: tuple[int, ...]
    per_module: bool

    def __post_init__(self) -> None:
        check(len(self.events) == len(self.removed) > 0, "a rank schedule needs at least one event")
        check(all(a <= b for a, b in zip(self.removed, self.removed[1:])), "removed counts must not decrease")

    @classmethod
    def paper(
        cls, total_steps: int, r0: int, rank: int, every: int, per_event: int, warmup: float, cooldown: float
    ) -> RankSchedule:
        """Every `every` (K1) steps remove `per_event` (K2) components per module until `rank` remains.

        When the events that fit between warm-up and cool-down cannot remove `r0 - rank`
        components at K2 per event, K2 is raised to the smallest value that can.
        """
        events = _event_steps(CubicSchedule.from_fractions(total_steps, warmup, cooldown), every)
        total = r0 - rank
        needed = math.ceil(total / len(events))
        if needed > per_event:
            logger.warning(
                "%d pruning events cannot remove %d components at %d per event; removing %d per event",
                len(events),
                total,
                per_event,
                needed,
            )
            per_event = needed
        removed = tuple(min(total, per_event * (i + 1)) for i in range(len(events)))
        return cls(events, removed, per_module=True)

    @classmethod
    def cubic(cls, total_steps: int, total: int, every: int, warmup: float, cooldown: float) -> RankSchedule:
        """AdaLoRA-style timing: the total removed follows the cubic ramp, sampled every `every` steps."""
        cubic = CubicSchedule.from_fractions(total_steps, warmup, cooldown)
        events = _event_steps(cubic, every)
        return cls(events, tuple(cubic.amount(step, total) for step in events), per_module=False)

    def removed_after(self, step: int) -> int | None:
        """Components that must be gone after optimizer step `step`, or None when `step` is no event."""
        if step not in self.events:
            return None
        return self.removed[self.events.index(step)]
