"""Named settings of `prune-model --method loraprune`: the paper's method as published, next to our defaults.

A preset is a set of field values for `PruneModelConfig` (`run`) and `LoRAPruneConfig`
(`schedule`). On the command line it replaces the defaults; a flag given explicitly (or a
`--config` file) still wins.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from loraprune.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    """Field values for the run config and the LoRAPrune config, and what they reproduce."""

    description: str
    run: dict[str, Any]
    schedule: dict[str, Any]


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        description="LoRAPrune as published (Zhang et al., 2024) and in its official code: the LoRA-guided "
        "score |G_hat * W| with the second-order term, each matrix's scores L2-normalised, the same "
        "number of units removed in every layer, layers 'paper' (all but the first 10 % and the last), "
        "EMA 0.9 from zero, pruning every 10 steps between a 10 % warm-up and a 10 % cool-down",
        run={"allocation": "uniform", "layers": "paper"},
        schedule={
            "score": "lora-guided",
            "normalisation": "matrix",
            "second_order": True,
            "ema": 0.9,
            "ema_start": "zero",
            "prune_every": 10,
            "warmup": 0.1,
            "cooldown": 0.1,
        },
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def apply_preset(name: str, run: Any, schedule: Any, **overrides: Any) -> tuple[Any, Any]:
    """Copies of `run` and `schedule` with preset `name`'s values, then `overrides` (by field name) on top."""
    preset = get_preset(name)
    run_fields = {f.name for f in dataclasses.fields(run)}
    run_values = {**preset.run, **{k: v for k, v in overrides.items() if k in run_fields}}
    schedule_values = {**preset.schedule, **{k: v for k, v in overrides.items() if k not in run_fields}}
    return dataclasses.replace(run, **run_values), dataclasses.replace(schedule, **schedule_values)
