"""loraprune: structured pruning of LLMs and their LoRA adapters, guided by low-rank adaptation.

Importing the package registers the per-layer-width ("pruned") model classes with the
``transformers`` Auto classes, so pruned models with different widths per layer load with
plain ``AutoModelForCausalLM.from_pretrained`` while ``loraprune`` is imported.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from loraprune.errors import LoraPruneError
from loraprune.remote.modeling_loraprune import PRUNED_CLASSES

__version__ = "0.1.0"


def _register_pruned_classes() -> None:
    for config_class, model_class in PRUNED_CLASSES.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)


_register_pruned_classes()

__all__ = ["LoraPruneError", "__version__"]
