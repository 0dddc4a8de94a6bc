"""Options of LoRAPrune's iterative schedule and criterion (the target is given separately)."""

from __future__ import annotations

from dataclasses import dataclass

from loraprune.config import check, option


@dataclass
class LoRAPruneConfig:
    """How LoRAPrune prunes while LoRA trains: when, how smoothly, with which gradient estimate."""

    prune_every: int = option(10, help="optimizer steps between pruning events")
    warmup: float = option(0.1, help="fraction of the steps trained before pruning starts")
    cooldown: float = option(0.1, help="fraction of the steps trained at the final sparsity")
    ema: float = option(0.9, help="weight of the old score in the moving average S = ema*S + (1-ema)*new")
    second_order: bool = option(False, help="add the second-order term -G_B·G_A to the estimated full-weight gradient")
    min_scoring_steps: int = option(
        2,
        help="a pruning event needs scores averaged over at least this many steps with finite gradients "
        "(capped at the steps before the end of the ramp); an earlier event is postponed with a warning, and a "
        "run that never gets them fails instead of pruning on too little evidence",
    )

    def __post_init__(self) -> None:
        check(self.prune_every >= 1, f"prune_every must be >= 1, got {self.prune_every}")
        check(
            0 <= self.warmup < 1 and 0 <= self.cooldown < 1 and self.warmup + self.cooldown < 1,
            "warmup and cooldown are fractions of the steps in [0, 1) that leave steps to prune in",
        )
        check(0 <= self.ema < 1, f"ema must be in [0, 1), got {self.ema}")
        check(self.min_scoring_steps >= 1, f"min_scoring_steps must be >= 1, got {self.min_scoring_steps}")
