"""PrunedLoRA: train an over-parameterised LoRA adapter and prune its rank (design §1.2).

Modules, one job each: `config` (options), `obs` (score and recovery update, pure maths),
`criteria` (the other component scores: magnitude, taylor, wanda, sparsegpt), `activations`
(input statistics those need), `calibration` (predicted against measured loss changes),
`schedule` (when and how much), `state` (masks and curvature statistics), `pruner` (the loop
as plain methods), `callback` (the same inside `transformers.Trainer`), `export` (a physically
small standard PEFT adapter), `adalora` (the AdaLoRA baseline), `run` (all methods in one
harness: create, train, save and report an adapter), `entry` (`prune_adapter`, the Python entry
point behind `loraprune prune-adapter`).
"""

from loraprune.rank_pruning.callback import RankPruningCallback
from loraprune.rank_pruning.config import RankPruningConfig
from loraprune.rank_pruning.entry import prune_adapter
from loraprune.rank_pruning.export import ExportedAdapter, export_pruned_adapter
from loraprune.rank_pruning.pruner import PruningEvent, RankPruner
from loraprune.rank_pruning.run import (
    METHODS,
    AdapterRun,
    AdapterRunConfig,
    create_adapter,
    save_adapter,
    train_adapter,
)

__all__ = [
    "METHODS",
    "AdapterRun",
    "AdapterRunConfig",
    "ExportedAdapter",
    "PruningEvent",
    "RankPruner",
    "RankPruningCallback",
    "RankPruningConfig",
    "create_adapter",
    "export_pruned_adapter",
    "prune_adapter",
    "save_adapter",
    "train_adapter",
]
