"""`loraprune prune-model`: remove heads / KV groups and MLP channels from the base model."""

from __future__ import annotations

import argparse
from pathlib import Path

from loraprune.config import PruneModelConfig, add_dataclass_arguments, add_preset_option, dataclass_from_args
from loraprune.model_pruning.config import LoRAPruneConfig
from loraprune.model_pruning.presets import PRESETS, get_preset


def preset_values(name: str) -> dict:
    """The option values of preset `name` (`--preset`), by destination name."""
    preset = get_preset(name)
    return {**preset.run, **preset.schedule}


EPILOG = """\
sparsity: the fraction of the decoder layers' attention+MLP parameters removed (embeddings,
norms and the LM head are kept). Groups are removed whole (a KV group with its query heads,
or an MLP channel with its gate/up rows and down column); with --sparsity alone the MLP
absorbs what attention's coarse groups cannot hit, so the decoder fraction is met to within
one channel. The report gives the fraction of all parameters too. --round-to N keeps every
prunable layer's MLP width a multiple of N (channels go in blocks of N) and --uniform-attention
one head count for all layers; then the nearest feasible sparsity is taken and reported.

--steps: LoRA training steps for every method. loraprune prunes iteratively during them
(cubic schedule, exact target at the end of the ramp; by default pruning is done by mid-run
and the second half recovers) and never creates a base-weight gradient: --score activation
(default) scores each unit by the loss change of removing it, from the activation gradients
LoRA training computes anyway; --score lora-guided is the paper's estimate from LoRA's weights
and gradients. taylor, activation, wanda-sp, magnitude and random prune one-shot on
--calibration-samples windows and then fine-tune the same LoRA adapter for the same steps
(0 = no recovery). The LoRA adapter is merged into the shrunk weights. --preset paper is the
published LoRAPrune (see --preset); --distill-weight adds self-distillation from the unpruned
model to any method's training.

--device: the whole run (loading, scoring, calibration, training, perplexity) runs there;
'auto' is the GPU when there is one. --device-map auto spreads a model larger than one GPU
over all GPUs, for the one-shot methods with --steps 0. --config RUN.yaml reads any of
these options from a file (keys as the flags); the flags given override it.

examples:
  loraprune prune-model --method loraprune --sparsity 0.2 --steps 200 --output smol-20
  loraprune prune-model --method loraprune --preset paper --sparsity 0.2 --steps 200 --output smol-20-paper
  loraprune prune-model --method taylor --sparsity 0.2 --steps 200 --output smol-20-taylor
  loraprune prune-model --method magnitude --sparsity 0.2 --output smol-20
  loraprune prune-model --method taylor --sparsity 0.5 --round-to 32 --output smol-50-r32   # GGUF-friendly
  loraprune prune-model --model ./my-llama --method random --layers 4-27 --allocation uniform \\
      --eval-data wikitext2 --eval-max-tokens 16384 --output my-llama-pruned
  loraprune prune-model --config run.yaml --sparsity 0.3 --device cuda
  loraprune prune-model --model ./llama-70b --method wanda-sp --data allenai/c4:en:validation:text \
      --device-map auto --dtype bfloat16 --output llama-70b-20
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prune-model",
        help="remove attention heads and MLP channels from the base model",
        description="Score attention groups and MLP channels, remove the lowest-scoring ones to reach a "
        "parameter budget, and save the physically smaller model (loads with from_pretrained).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_arguments(parser, PruneModelConfig)
    add_dataclass_arguments(parser.add_argument_group("LoRAPrune schedule (--method loraprune)"), LoRAPruneConfig)
    add_preset_option(parser, PRESETS, preset_values)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loraprune.distributed import is_main_process
    from loraprune.model_pruning.entry import prune_model
    from loraprune.model_pruning.run import METHODS
    from loraprune.run_report.summary import format_perplexity
    from loraprune.safety.output import claim_run_output

    config = dataclass_from_args(PruneModelConfig, args)
    if config.method not in METHODS:
        from loraprune.errors import ConfigError

        raise ConfigError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)}")
    with claim_run_output(config.output, f"--output {config.output}"):
        result = prune_model(config, dataclass_from_args(LoRAPruneConfig, args))
    if not is_main_process():  # torchrun / accelerate launch: the main process reports
        return 0
    report = result.report
    layers = report["prunable_layers"]
    print(f"method            {report['method']} ({report['attention_unit']} attention units)")
    print(f"prunable layers   {layers[0]}-{layers[-1]} ({len(layers)} layers)" if layers else "prunable layers   none")
    print(
        f"parameters        {report['params_before']:,} -> {report['params_after']:,} "
        f"({report['sparsity_total']:.2%} of all parameters removed)"
    )
    reached = (
        f"the nearest feasible to --sparsity {config.sparsity:.2%} under --round-to / --uniform-attention"
        if config.width_rules.active
        else "the --sparsity target"
    )
    print(
        f"decoder attn+MLP  {report['decoder_params_before']:,} -> {report['decoder_params_after']:,} "
        f"({report['sparsity_decoder']:.2%} removed, {reached})"
    )
    if report["perplexity_before"] is not None:
        settings = report["perplexity_before"]
        print(
            f"perplexity        {format_perplexity(report['perplexity_before'])} -> "
            f"{format_perplexity(report['perplexity_after'])} ({settings['data']}, seq_len {settings['seq_len']}, "
            f"{settings['tokens']:,} tokens, {settings['dtype']})"
        )
    if report["training"] is not None:
        training = report["training"]
        print(
            f"LoRA training     {training['steps']} steps, rank {training['rank']}, "
            f"lr {training['learning_rate']:g}, {training['train_seconds']:.0f} s (merged into the saved weights)"
        )
    print(f"saved to          {result.output} ({report['file_size_bytes'] / 2**20:.1f} MiB of weights)")
    print(f"run report        {Path(result.output) / 'report.html'} (also report.md, loraprune_report.json)")
    return 0
