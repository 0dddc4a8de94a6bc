"""LoRAPrune: prune the base model's heads and MLP channels while LoRA fine-tunes it (design §1.1).

`ModelPruner` is the plain API for custom training loops, `LoRAPruneCallback` runs it inside
`transformers.Trainer`; both score with `loraprune.importance.lora_guided` and never create
gradients of base weights.
"""

from loraprune.model_pruning.callback import STATE_FILE, LoRAPruneCallback
from loraprune.model_pruning.config import LoRAPruneConfig
from loraprune.model_pruning.pruner import ModelPruner, PruningTarget

__all__ = ["STATE_FILE", "LoRAPruneCallback", "LoRAPruneConfig", "ModelPruner", "PruningTarget"]
