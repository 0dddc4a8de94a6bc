"""The stable import path of loraprune's Python entry points: what the command line calls.

Import from here in notebooks and scripts (`from loraprune.api import prune_model`); the modules
behind these names (`loraprune.model_pruning.entry`, `loraprune.rank_pruning.entry`,
`loraprune.semi_structured.entry`, `loraprune.results`) may move, this module keeps them:

* `prune_model` (`loraprune prune-model`): structured pruning of heads and MLP channels,
  returns a `PruneResult`;
* `prune_adapter` (`loraprune prune-adapter`): adapter-rank pruning (PrunedLoRA) and its
  baselines, returns an `AdapterRun` and the `ExportedAdapter` it saved;
* `prune_nm` (`loraprune prune-nm`): semi-structured N:M sparsity, returns an `NMResult`
  (the same type as `PruneResult`).
"""

from __future__ import annotations

from loraprune.model_pruning.entry import prune_model
from loraprune.rank_pruning.entry import prune_adapter
from loraprune.rank_pruning.export import ExportedAdapter
from loraprune.rank_pruning.run import AdapterRun
from loraprune.results import PruneResult
from loraprune.semi_structured.entry import NMResult, prune_nm

__all__ = ["AdapterRun", "ExportedAdapter", "NMResult", "PruneResult", "prune_adapter", "prune_model", "prune_nm"]
