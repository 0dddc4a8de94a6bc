"""Settings of `loraprune prune-nm` / `loraprune.semi_structured.prune_nm`."""

from __future__ import annotations

from dataclasses import dataclass

from loraprune.config import check, check_pruning_run, option
from loraprune.devices import DEVICE_HELP
from loraprune.models import DTYPES
from loraprune.safety.options import DIVERGENCE_FACTOR, DIVERGENCE_HELP, RESUME_HELP, SAVE_STEPS_HELP
from loraprune.semi_structured.one_shot import ONE_SHOT_METHODS
from loraprune.semi_structured.pattern import NMPattern

#: LoRAPrune N:M, and the one-shot baselines
NM_METHODS = ("loraprune", *ONE_SHOT_METHODS)


@dataclass
class PruneNMConfig:
    """What to prune to which N:M pattern, with which method, data and LoRA training, and where to save it."""

    output: str = option("", help="directory to write the N:M model, its tokenizer and loraprune_report.json")
    model: str = option(
        "smollm2-135m", help="local Hugging Face directory, hub id, or the embedded default 'smollm2-135m'"
    )
    method: str = option(
        "loraprune",
        help="loraprune (LoRA-guided element importance while LoRA trains, needs --steps) or a "
        "one-shot baseline: wanda, sparsegpt, magnitude",
        choices=NM_METHODS,
    )
    pattern: str = option("2:4", help="keep N of every M consecutive input weights of each projection row")
    layers: str = option("all", help="decoder layers whose attention+MLP projections get the pattern ('all', '4-27')")
    calibration_data: str = option(
        "wikitext2",
        help="text for calibration (wanda, sparsegpt) and LoRA training: corpus name, text file, or Hugging Face "
        "dataset ID[:CONFIG[:SPLIT[:COLUMN]]] (default split validation)",
        aliases=("--data",),
    )
    calibration_samples: int = option(128, help="calibration windows for wanda and sparsegpt")
    seq_len: int = option(128, help="tokens per calibration / training window")
    steps: int = option(
        0,
        help="LoRA training steps: loraprune prunes during them; the one-shot methods fine-tune after pruning "
        "under their fixed mask (recovery; 0 = none)",
    )
    lora_rank: int = option(8, help="rank of the LoRA adapter (all seven projections)")
    lora_alpha: float | None = option(None, help="LoRA alpha (default: the rank, i.e. scaling 1)")
    learning_rate: float = option(1e-3, help="peak AdamW learning rate of the LoRA training (linear decay)")
    batch_size: int = option(4, help="windows per LoRA training step, and per calibration forward")
    sparsegpt_block_size: int = option(128, help="SparseGPT: columns per lazy-update block (a multiple of M)")
    sparsegpt_damp: float = option(0.01, help="SparseGPT: damping, as a fraction of the mean Hessian diagonal")
    eval_data: str | None = option(
        None,
        help="evaluate perplexity before and after on this corpus, text file or dataset ID[:CONFIG[:SPLIT[:COLUMN]]]",
    )
    eval_seq_len: int = option(128, help="window length of the perplexity evaluation")
    eval_max_tokens: int | None = option(None, help="evaluate on the first N tokens only (default: the whole text)")
    dtype: str = option("float32", help="dtype to load, prune and save the model in (float32, bfloat16, float16)")
    seed: int = option(0, help="seed for calibration sampling and training")
    overwrite: bool = option(False, help="replace OUTPUT if it exists (the old one stays until the new one is done)")
    device: str = option("auto", help=DEVICE_HELP)
    save_steps: int = option(0, help=SAVE_STEPS_HELP)
    resume: str | None = option(None, help=RESUME_HELP)
    divergence_factor: float = option(DIVERGENCE_FACTOR, help=DIVERGENCE_HELP)

    def __post_init__(self) -> None:
        check_pruning_run(self)
        check(self.method in NM_METHODS, f"method must be one of {', '.join(NM_METHODS)}, got {self.method!r}")
        pattern = NMPattern.parse(self.pattern)
        block = self.sparsegpt_block_size
        check(
            self.method != "sparsegpt" or (block >= 1 and block % pattern.m == 0),
            f"sparsegpt-block-size must be a positive multiple of M={pattern.m}, got {block}",
        )
        check(self.sparsegpt_damp > 0, f"sparsegpt-damp must be > 0, got {self.sparsegpt_damp}")
        check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    @property
    def nm_pattern(self) -> NMPattern:
        return NMPattern.parse(self.pattern)
