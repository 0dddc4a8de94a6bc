"""Options of LoRAPrune's iterative schedule and criterion (the target is given separately)."""

from __future__ import annotations

from dataclasses import dataclass

from loraprune.config import check, option
from loraprune.importance.activation_gradient import FORMS
from loraprune.importance.lora_guided import NORMALISATIONS

#: how LoRAPrune scores units while LoRA trains
SCORES = ("activation", "lora-guided")
#: where the moving average starts
EMA_STARTS = ("first", "zero")


@dataclass
class LoRAPruneConfig:
    """How LoRAPrune prunes while LoRA trains: when, how smoothly, with which score."""

    prune_every: int = option(2, help="optimizer steps between pruning events (the paper: 10)")
    warmup: float = option(0.1, help="fraction of the steps trained before pruning starts")
    cooldown: float = option(
        0.5,
        help="fraction of the steps trained at the final sparsity: recovery after the last pruning event "
        "(the paper: 0.1)",
    )
    ema: float = option(0.9, help="weight of the old score in the moving average S = ema*S + (1-ema)*new")
    ema_start: str = option(
        "first",
        help="'first': the first step's scores start the moving average; 'zero': it starts from 0 (the official code)",
        choices=EMA_STARTS,
    )
    score: str = option(
        "activation",
        help="'activation': the loss change of removing each unit, from the gradients of the inputs of "
        "o_proj / down_proj that LoRA training computes anyway (no weight gradient); 'lora-guided': the "
        "paper's |G_hat * W| with G_hat = G_B·A + B·G_A from LoRA's gradients",
        choices=SCORES,
    )
    form: str = option(
        "fisher",
        help="activation score: 'fisher' sums the squared per-window loss changes (comparable across "
        "layers), 'first-order' takes |sum of the changes|",
        choices=FORMS,
    )
    normalisation: str = option(
        "none",
        help="lora-guided score: 'matrix' divides each matrix's unit scores by their L2 norm before "
        "summing (the paper; layers are then no longer comparable in a global ranking), 'none' sums them",
        choices=NORMALISATIONS,
    )
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
        check(self.ema_start in EMA_STARTS, f"ema_start must be one of {EMA_STARTS}, got {self.ema_start!r}")
        check(self.score in SCORES, f"score must be one of {SCORES}, got {self.score!r}")
        check(self.form in FORMS, f"form must be one of {FORMS}, got {self.form!r}")
        check(
            self.normalisation in NORMALISATIONS,
            f"normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}",
        )
        check(self.min_scoring_steps >= 1, f"min_scoring_steps must be >= 1, got {self.min_scoring_steps}")
