"""loraprune: structured pruning of LLMs and their LoRA adapters, guided by low-rank adaptation.

Importing the package registers the per-layer-width ("pruned") model classes with the
``transformers`` Auto classes, so pruned models with different widths per layer load with
plain ``AutoModelForCausalLM.from_pretrained`` while ``loraprune`` is imported.
"""

from loraprune.errors import LoraPruneError

__version__ = "0.1.0"
__all__ = ["LoraPruneError", "__version__"]
