"""Options of PrunedLoRA: the starting and final rank, the schedule, the score and the update."""

from __future__ import annotations

from dataclasses import dataclass

from loraprune.config import check, option
from loraprune.lora import DEFAULT_TARGET_MODULES

#: how rank components are scored (`criteria.py`); `obs` is PrunedLoRA's own score
CRITERIA = ("obs", "magnitude", "taylor", "wanda", "sparsegpt")
#: the criteria that read the inputs of the LoRA modules (`activations.py`)
ACTIVATION_CRITERIA = ("wanda", "sparsegpt")


@dataclass
class RankPruningConfig:
    """How an over-parameterised LoRA adapter of rank `r0` is pruned to rank `rank` while it trains."""

    r0: int = option(64, help="initial (over-parameterised) LoRA rank of every module")
    rank: int = option(8, help="final rank: of every module (per_module schedule) or on average (global)")
    alpha: float | None = option(
        None, help="LoRA alpha at rank r0 (default r0, i.e. scaling 1); the scaling alpha/r0 stays fixed"
    )
    target_modules: tuple[str, ...] = option(
        DEFAULT_TARGET_MODULES, help="names (or name suffixes) of the linear modules that get LoRA"
    )
    schedule: str = option(
        "per_module",
        help="per_module: every prune_every steps remove per_event components of each module (the paper); "
        "global: a cubic budget over all modules, components ranked across modules (adaptive ranks)",
        choices=("per_module", "global"),
    )
    prune_every: int = option(10, help="optimizer steps between pruning events (the paper's K1)")
    per_event: int = option(
        2,
        help="components removed per module at each event of the per_module schedule (the paper's K2); "
        "raised automatically when the steps are too few to reach the final rank",
    )
    warmup: float = option(0.1, help="fraction of the steps trained before the first pruning event")
    cooldown: float = option(0.1, help="fraction of the steps trained at the final rank after the last event")
    criterion: str = option(
        "magnitude",
        help="score of a rank component j (row a_j of A, column b_j of B): magnitude = |b_j|*|a_j| (the default; "
        "in the default singular basis that is the singular value, so an event is a truncated SVD of each "
        "module's update); obs = the paper's loss-aware score and recovery update (--preset paper); "
        "taylor = sum |G*W| over a_j and b_j (LLM-Pruner, mean "
        "LoRA gradients); wanda = |X a_j^T|*|b_j| (X: the module's inputs); sparsegpt = OBS on the columns of B "
        "with the input curvature (A X^T X A^T), the remaining columns of B compensating. magnitude, taylor and "
        "wanda only zero the removed components; compensate and use_gradient apply to obs only",
        choices=CRITERIA,
    )
    basis: str = option(
        "singular",
        help="what a rank component is when an event scores and removes: components = the adapter's own "
        "columns of B and rows of A (the paper, --preset paper); singular (the default) = first rotate each "
        "module's active components "
        "into the singular basis of its update B*A (exact: the model is unchanged; gradients, curvatures and "
        "Adam's moments rotate with it), so that a component carries one singular value and removing the "
        "weakest is the best low-rank approximation of the update (basis.py)",
        choices=("components", "singular"),
    )
    curvature: str = option(
        "window",
        help="gradient Gram matrices for the curvature: window = mean since the last pruning event, "
        "batch = the current batch only (the gradient term, taylor's gradients and the input statistics of "
        "wanda and sparsegpt use the same source)",
        choices=("window", "batch"),
    )
    curvature_scale: str = option(
        "fisher",
        help="scale of the curvature against the gradient term: fisher = the empirical Fisher of the mean "
        "loss (each step's gradient Gram times the examples per step, divided by the rows that share it; "
        "state.py derives it), so predicted loss changes are in nats; gram = the plain mean gradient Gram "
        "summed over rows (the design's original form, whose scale depends on batch size and module width); "
        "measured = at every event the planned removal is applied forwards and backwards on the held-out "
        "batch (two extra forward passes): the curvature and first-order change measured along it rescale the "
        "fisher curvature and the gradient term (the latter floored at 0), then the removal is planned again "
        "(needs calibration_examples > 0)",
        choices=("fisher", "gram", "measured"),
    )
    damping: float = option(0.01, help="relative damping: lambda = damping * mean diagonal of each curvature")
    use_gradient: bool = option(True, help="include the gradient term of the loss model (off: classical OBS)")
    compensate: str = option(
        "auto",
        help="which factor's remaining components absorb a removal: b (columns of B, A fixed), a (rows of A, "
        "B fixed), auto (per module and event, the factor whose removal the quadratic model prices lower), "
        "both (the paper's literal sum of the two one-sided updates; measured to overshoot, see the README)",
        choices=("auto", "b", "a", "both"),
    )
    removal: str = option(
        "block",
        help="block: remove the lowest-scoring components of a module at once with the block update; "
        "sequential: remove them one at a time, downdating the inverse curvature and rescoring in between "
        "(obs and sparsegpt; the other criteria zero the lowest scores, which removal does not change)",
        choices=("block", "sequential"),
    )
    normalization: str = option(
        "none",
        help="global schedule: scale each module's scores before ranking across modules (none: the scores "
        "are compared as they are: for obs estimated loss changes, already comparable; l2: divide by the "
        "module's score norm)",
        choices=("none", "l2"),
    )
    min_rank: int = option(0, help="global schedule: no module goes below this rank (0 lets a module vanish)")
    allow_magnitude_fallback: bool = option(
        False,
        help="obs and taylor: when no step since the last pruning event gave finite gradients, score that event "
        "by magnitude (|b_j|*|a_j|) with a warning; off (default), the run fails instead, since such gradients "
        "mean the training diverged",
    )
    calibration_examples: int = option(
        4,
        help="training examples held out (the last ones of the training data, for every method alike) to "
        "measure the loss change of every pruning event against the quadratic model's prediction (0: none)",
    )
    calibration_modules: int = option(
        0,
        help="modules (drawn at random) whose removal is also measured alone at every event, one extra forward "
        "each, for the per-module rank correlation of the run report (e.g. 8)",
    )

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        check(self.criterion in CRITERIA, f"criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        check(self.r0 >= 1, f"r0 must be >= 1, got {self.r0}")
        check(1 <= self.rank < self.r0, f"the final rank must be in [1, r0={self.r0}), got {self.rank}")
        check(self.alpha is None or self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        check(len(self.target_modules) > 0, "target_modules must name at least one module (e.g. q_proj)")
        check(self.prune_every >= 1 and self.per_event >= 1, "prune_every and per_event must be >= 1")
        check(
            0 <= self.warmup < 1 and 0 <= self.cooldown < 1 and self.warmup + self.cooldown < 1,
            "warmup and cooldown are fractions of the steps in [0, 1) that leave steps to prune in",
        )
        check(self.damping > 0, f"damping must be > 0 (the curvature can be singular), got {self.damping}")
        check(0 <= self.min_rank <= self.rank, f"min_rank must be in [0, rank={self.rank}], got {self.min_rank}")
        check(self.calibration_examples >= 0, f"calibration_examples must be >= 0, got {self.calibration_examples}")
        check(self.calibration_modules >= 0, f"calibration_modules must be >= 0, got {self.calibration_modules}")
        check(
            self.curvature_scale != "measured" or (self.calibration_examples > 0 and self.criterion == "obs"),
            "curvature_scale=measured measures the curvature on held-out examples: it needs "
            "calibration_examples > 0 and the obs criterion",
        )

    @property
    def lora_alpha(self) -> float:
        """The alpha the adapter is created with (scaling `lora_alpha / r0` during the whole run)."""
        return self.r0 if self.alpha is None else self.alpha
