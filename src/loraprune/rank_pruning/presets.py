"""Named settings of `prune-adapter --method prunedlora`: the paper's method next to our default.

Our default removes, at every event, the weakest singular components of each module's update
(`basis="singular"`, `criterion="magnitude"`: a truncated SVD while the adapter trains); at
128 -> 8 on SmolLM2 it beats LoRA at r0 = 128, which the paper's loss-aware score in the adapter's
own components does not (README, "The 128 -> 8 gap"). `paper` keeps the published method
reachable: that score and its one-sided recovery update, in the adapter's own components.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraprune.errors import ConfigError


@dataclass(frozen=True)
class RankPreset:
    """Field values of `RankPruningConfig`, and what they reproduce."""

    description: str
    values: dict[str, Any]


PRESETS: dict[str, RankPreset] = {
    "paper": RankPreset(
        description="PrunedLoRA as published (Yu et al., 2025): the adapter's own components scored by the "
        "loss-aware OBS score with its gradient term (empirical-Fisher curvature) and removed with a "
        "recovery update of one factor, every 10 steps per module between a 10 % warm-up and a 10 % "
        "cool-down (the default of loraprune before 2026-12-02)",
        values={
            "criterion": "obs",
            "basis": "components",
            "curvature_scale": "fisher",
            "use_gradient": True,
            "compensate": "auto",
            "schedule": "per_module",
            "prune_every": 10,
            "per_event": 2,
            "warmup": 0.1,
            "cooldown": 0.1,
        },
    ),
}


def preset_values(name: str) -> dict[str, Any]:
    """The `RankPruningConfig` field values of preset `name`."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name].values)
