"""`loraprune inspect`: the prunable groups of a model, per layer, with parameter counts."""

from __future__ import annotations

import argparse

from loraprune.config import ATTENTION_UNITS
from loraprune.devices import DEVICE_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    from loraprune.structure import supported_model_types

    parser = subparsers.add_parser(
        "inspect",
        help="list the prunable groups of a model",
        description="Print, for every decoder layer, its attention groups and MLP channels with their "
        "parameter counts, and the model's totals. Supported model types: "
        f"{', '.join(supported_model_types())} (config.json's model_type; Gemma 3 as its text model "
        "Gemma3ForCausalLM; SmolLM2 is a Llama).",
    )
    parser.add_argument(
        "--model", default="smollm2-135m", help="local directory, hub id or 'smollm2-135m' (default: %(default)s)"
    )
    parser.add_argument(
        "--attention-unit",
        default="auto",
        choices=ATTENTION_UNITS,
        help="attention group to list (default: %(default)s)",
    )
    parser.add_argument("--device", default="auto", help=DEVICE_HELP + " (default: %(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loraprune.devices import resolve_device
    from loraprune.models import load_model
    from loraprune.run_report.summary import count_parameters, decoder_parameters
    from loraprune.structure import get_adapter
    from loraprune.structure.groups import total_params

    model, _ = load_model(args.model, device=resolve_device(args.device))
    families = get_adapter(model).families(model, args.attention_unit)
    print(f"model {args.model} ({model.config.model_type}, {len(families) // 2} decoder layers)")
    print(
        f"{'layer':>5}  {'attention groups':<28} {'params/group':>12}  {'MLP channels':>12} {'params/ch':>9}"
        f"  {'layer params':>12}"
    )
    for attention, mlp in zip(families[::2], families[1::2]):
        group = f"{attention.count} x {attention.unit}"
        if attention.unit == "query_head":
            group += f" ({attention.units_per_kv}/KV)"
        layer_params = attention.count * attention.params_per_unit + mlp.count * mlp.params_per_unit
        print(
            f"{attention.layer:>5}  {group:<28} {attention.params_per_unit:>12,}  {mlp.count:>12,} "
            f"{mlp.params_per_unit:>9,}  {layer_params:>12,}"
        )
    total = count_parameters(model)
    decoder = decoder_parameters(model)
    print(
        f"prunable (in groups): {total_params(families):,} parameters "
        f"(attention {total_params(families, 'attention'):,}, MLP {total_params(families, 'mlp'):,})"
    )
    print(f"decoder attention+MLP: {decoder:,}   all parameters: {total:,} (tied weights once)")
    return 0
