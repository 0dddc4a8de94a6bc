"""Budget schedules shared by both methods: how much is pruned by optimizer step `t`.

LoRAPrune ramps the sparsity of the base model, PrunedLoRA (global mode) ramps the number
of removed rank components; both use the same cubic ramp between a warm-up and a
cool-down, which removes a lot early (while the model can still recover) and little at
the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loraprune.config import check


@dataclass(frozen=True)
class CubicSchedule:
    """`target·(1 − (1 − (t − t_w)/(T − t_w − t_c))³)` between warm-up and cool-down.

    `fraction(t)` is 0 up to the end of the warm-up and exactly 1 from the start of the
    cool-down on; `amount(t, total)` turns it into a whole number of units that never
    decreases and reaches `total` exactly at the start of the cool-down.
    """

    total_steps: int
    warmup_steps: int
    cooldown_steps: int

    def __post_init__(self) -> None:
        check(self.total_steps >= 1, f"total_steps must be >= 1, got {self.total_steps}")
        check(self.warmup_steps >= 0 and self.cooldown_steps >= 0, "warm-up and cool-down must be >= 0 steps")
        check(
            self.warmup_steps + self.cooldown_steps < self.total_steps,
            f"warm-up ({self.warmup_steps}) + cool-down ({self.cooldown_steps}) must leave at least one "
            f"pruning step out of {self.total_steps}",
        )

    @classmethod
    def from_fractions(cls, total_steps: int, warmup: float = 0.1, cooldown: float = 0.1) -> CubicSchedule:
        """Warm-up and cool-down given as fractions of `total_steps` (rounded down, one step kept free)."""
        check(0 <= warmup < 1 and 0 <= cooldown < 1, "warm-up and cool-down fractions must be in [0, 1)")
        warm, cool = int(total_steps * warmup), int(total_steps * cooldown)
        while warm + cool >= total_steps and (warm or cool):
            if warm >= cool:
                warm -= 1
            else:
                cool -= 1
        return cls(total_steps, warm, cool)

    @property
    def ramp_end(self) -> int:
        """The first step at which the full target is in force."""
        return self.total_steps - self.cooldown_steps

    def fraction(self, step: int) -> float:
        """Fraction of the final target in force after optimizer step `step` (1-based)."""
        span = self.ramp_end - self.warmup_steps
        progress = min(max((step - self.warmup_steps) / span, 0.0), 1.0)
        return 1.0 - (1.0 - progress) ** 3

    def amount(self, step: int, total: int) -> int:
        """Whole units of `total` to have removed after `step`: monotone, exact `total` at the end."""
        if step >= self.ramp_end:
            return total
        return min(total, math.floor(self.fraction(step) * total + 1e-9))
