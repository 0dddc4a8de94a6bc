"""`loraprune prune-nm`: N:M semi-structured sparsity (LoRAPrune N:M, Wanda, SparseGPT, magnitude)."""

from __future__ import annotations

import argparse

from loraprune.config import add_dataclass_arguments, dataclass_from_args
from loraprune.model_pruning.config import LoRAPruneConfig

EPILOG = """\
pattern N:M: every attention and MLP projection of the decoder layers keeps N of every M
consecutive input weights of each row (2:4 runs on sparse tensor cores; 4:8 is the looser
pattern). Shapes do not change: the zeros are in the saved weights and the config is the
stock one.

--method loraprune scores every weight with LoRA's weights and gradients (|Ĝ ⊙ (W0 + s·B·A)|,
moving average) while LoRA trains for --steps steps, tightens the pattern gradually (2:4 via
3:4) with the cubic schedule of the options below, and trains with the masked merged weight
mask ⊙ (W0 + s·B·A), which is what is saved. wanda and sparsegpt prune one-shot, layer by layer,
on --calibration-samples windows (sparsegpt also updates the kept weights); magnitude needs no
data. With --steps, the one-shot methods then train LoRA under their fixed mask (recovery).

examples:
  loraprune prune-nm --method loraprune --pattern 2:4 --steps 200 --eval-data wikitext2 --output smol-2-4
  loraprune prune-nm --method sparsegpt --pattern 4:8 --calibration-samples 128 --output smol-4-8-sparsegpt
"""


#: LoRAPrune options that do not apply to N:M, whose element scores are always the LoRA-guided estimate
NOT_FOR_NM = ("score", "form", "normalisation")
#: prune-nm's defaults for the schedule (the paper's)
NM_SCHEDULE = {"prune_every": 10, "cooldown": 0.1}


def register(subparsers: argparse._SubParsersAction) -> None:
    from loraprune.semi_structured.config import PruneNMConfig

    parser = subparsers.add_parser(
        "prune-nm",
        help="N:M semi-structured sparsity (2:4, 4:8) of the decoder projections",
        description="Keep N of every M consecutive input weights of every attention and MLP projection, chosen by "
        "LoRA-guided importance while LoRA trains (loraprune) or one-shot (wanda, sparsegpt, magnitude); save the "
        "merged model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_arguments(parser, PruneNMConfig)
    add_dataclass_arguments(
        parser.add_argument_group("LoRAPrune schedule (--method loraprune)"), LoRAPruneConfig, skip=NOT_FOR_NM
    )
    # N:M keeps the paper's schedule: the 2026-12 study that changed prune-model's defaults did not cover it
    parser.set_defaults(func=run, **NM_SCHEDULE)


def run(args: argparse.Namespace) -> int:
    from loraprune.run_report.summary import format_perplexity
    from loraprune.safety.output import claim_run_output
    from loraprune.semi_structured import prune_nm
    from loraprune.semi_structured.config import PruneNMConfig

    config = dataclass_from_args(PruneNMConfig, args)
    with claim_run_output(config.output, f"--output {config.output}"):
        result = prune_nm(config, dataclass_from_args(LoRAPruneConfig, args))
    report = result.report
    nm = report["nm"]
    print(f"method            {report['method']}, pattern {nm['pattern']} on {nm['modules']} projections")
    print(
        f"zeros             {nm['zeros']:,} of {nm['weights']:,} projection weights ({nm['sparsity']:.2%}); "
        f"groups breaking the pattern: {nm['violating_groups']}"
    )
    if report["perplexity_before"] is not None:
        settings = report["perplexity_before"]
        one_shot = report["perplexity_one_shot"]
        middle = f" -> {format_perplexity(one_shot)} (one-shot)" if one_shot is not None else ""
        print(
            f"perplexity        {format_perplexity(settings)}{middle} -> "
            f"{format_perplexity(report['perplexity_after'])} ({settings['data']}, seq_len {settings['seq_len']}, "
            f"{settings['tokens']:,} tokens, {settings['dtype']})"
        )
    if report["training"] is not None:
        training = report["training"]
        print(
            f"LoRA training     {training['steps']} steps, rank {training['rank']}, "
            f"lr {training['learning_rate']:g}, {training['train_seconds']:.0f} s (merged as mask * (W0 + s*B*A))"
        )
    print(
        f"saved to          {result.output} ({report['file_size_bytes'] / 2**20:.1f} MiB of weights; "
        "report in loraprune_report.json)"
    )
    return 0
