"""Pruned models in the formats other runtimes load: GGUF for llama.cpp (`loraprune export gguf`)."""

from loraprune.export.gguf import GgufExport, export_gguf

__all__ = ["GgufExport", "export_gguf"]
