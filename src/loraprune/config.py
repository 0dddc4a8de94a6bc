"""Dataclass configs: every field carries its help text, and `__post_init__` validates.

The command line is generated from these dataclasses (`add_dataclass_arguments`), so the
help a user reads in `--help` is the same text the Python API documents.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from loraprune.devices import DEVICE_HELP, DEVICE_MAP_HELP, DEVICE_MAPS, check, check_device_map
from loraprune.errors import ConfigError
from loraprune.safety.options import DIVERGENCE_FACTOR, DIVERGENCE_HELP, RESUME_HELP, SAVE_STEPS_HELP

if TYPE_CHECKING:
    from loraprune.selection import WidthRules

T = TypeVar("T")


def option(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    cli: bool = True,
    aliases: tuple[str, ...] = (),
    **kwargs: Any,
) -> Any:
    """A dataclass field with help text (and optional choices / extra flag names) for the command line."""
    metadata = {"help": help, "choices": choices, "cli": cli, "aliases": aliases}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def _base_type(annotation: Any) -> tuple[type, bool]:
    """Reduce `X | None` to `(X, True)`; other annotations to `(X, False)`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add one `--option` per field of dataclass `cls` (underscores become dashes)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip or not field.metadata.get("cli", True):
            continue
        flags = ["--" + field.name.replace("_", "-"), *field.metadata.get("aliases", ())]
        base, _optional = _base_type(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = field.metadata.get("help", "")
        if base is bool:
            parser.add_argument(
                *flags, dest=field.name, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
            continue
        kwargs: dict[str, Any] = {"dest": field.name, "default": default, "help": help_text + " (default: %(default)s)"}
        if field.metadata.get("choices"):
            kwargs["choices"] = field.metadata["choices"]
        if typing.get_origin(base) in (list, tuple):
            kwargs["nargs"] = "+"
            kwargs["type"] = typing.get_args(base)[0]
        elif base in (int, float, str):
            kwargs["type"] = base
        parser.add_argument(*flags, **kwargs)


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Build dataclass `cls` from parsed arguments (fields missing from `args` keep their default)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


def suggest(word: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' with the choice nearest to `word` (difflib), or '' when none is near."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ------------------------------------------------------------------------------------- run config files

CONFIG_HELP = (
    "YAML file of this command's options (keys as the flags without '--', with '-' or '_', e.g. "
    "'sparsity: 0.3'); flags given on the command line override it; the run report records the resolved values"
)


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """Give `parser` (one sub-command) a `--config RUN.yaml` option read by `parse_args_with_config`."""
    parser.add_argument("--config", metavar="RUN.yaml", default=None, help=CONFIG_HELP)
    parser.set_defaults(config_parser=parser)


def _option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every name a config key may use for an option of `parser` (dest, flags, aliases; '-' read as '_')."""
    names: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "config"):
            continue
        names[action.dest] = action
        for flag in action.option_strings:
            if flag.startswith("--") and not flag.startswith("--no-"):
                names.setdefault(flag[2:].replace("-", "_"), action)
    return names


def _config_value(key: str, value: Any, action: argparse.Action, where: str) -> Any:
    """`value` of config key `key` converted and checked as the command line would (type, choices)."""
    if value is None:
        check(action.default is None, f"{where}: {key} needs a value (its default is {action.default!r})")
        return None
    if isinstance(action, argparse.BooleanOptionalAction):
        check(isinstance(value, bool), f"{where}: {key} must be true or false, got {value!r}")
        return value
    if action.nargs == "+":
        values = value if isinstance(value, list) else [value]
        return [_config_scalar(key, item, action, where) for item in values]
    return _config_scalar(key, value, action, where)


def _config_scalar(key: str, value: Any, action: argparse.Action, where: str) -> Any:
    kind = action.type
    check(not isinstance(value, (dict, list)), f"{where}: {key} takes one value, got {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif kind is not None and isinstance(value, str):
        try:
            value = kind(value)
        except ValueError:
            raise ConfigError(f"{where}: {key} must be {kind.__name__}, got {value!r}") from None
    check(
        kind is None or (isinstance(value, kind) and not isinstance(value, bool)),
        f"{where}: {key} must be {getattr(kind, '__name__', kind)}, got {value!r}",
    )
    if kind is None:
        value = str(value)
    choices = action.choices
    check(not choices or value in choices, f"{where}: {key} must be one of {', '.join(map(str, choices or ()))}")
    return value


def read_config_file(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The options in YAML file `path` as `{dest: value}` for `parser`; unknown keys name the nearest valid one."""
    import yaml

    path = Path(path).expanduser()
    check(path.is_file(), f"config file {path} not found")
    try:
        source = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(error, 'problem', None) or error}") from error
    source = {} if source is None else source
    check(isinstance(source, dict), f"{path} must be a mapping of option names to values, like 'sparsity: 0.3'")
    actions = _option_actions(parser)
    values: dict[str, Any] = {}
    for raw_key, value in source.items():
        key = str(raw_key).replace("-", "_")
        if key not in actions:
            raise ConfigError(
                f"{path}: unknown key {raw_key!r}{suggest(key, sorted({a.dest for a in actions.values()}))}; "
                f"`loraprune {parser.prog.split()[-1]} --help` lists the options"
            )
        action = actions[key]
        check(action.dest not in values, f"{path}: {action.dest} is given twice (as {raw_key!r} too)")
        values[action.dest] = _config_value(str(raw_key), value, action, str(path))
    return values


def add_preset_option(
    parser: argparse.ArgumentParser, presets: Mapping[str, Any], values: Callable[[str], dict[str, Any]]
) -> None:
    """`--preset NAME` for a sub-command: `presets` maps a name to an object with a `description`,
    `values` a name to `{dest: value}`, applied by `parse_args_with_config` under --config and the flags."""
    parser.add_argument(
        "--preset",
        choices=sorted(presets),
        default=None,
        help="named settings, overridden by --config and by the flags given: "
        + "; ".join(f"'{name}': {preset.description}" for name, preset in presets.items()).replace("%", "%%"),
    )
    parser.set_defaults(preset_values=values)


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `argv`; when the sub-command got `--config FILE`, its values become the defaults and the
    command line is parsed again, so flags override the file (`config_file` is kept in the result).

    A sub-command with named presets (`--preset NAME`, its parser's default `preset_values`: a
    function from a name to `{dest: value}`) gets the preset's values as defaults first, so the
    file and then the flags override them; the preset may also be named in the file.
    """
    args = parser.parse_args(argv)
    path = getattr(args, "config", None)
    file_values = read_config_file(path, args.config_parser) if path is not None else {}
    preset = getattr(args, "preset", None) or file_values.get("preset")
    defaults = {**(args.preset_values(preset) if preset else {}), **file_values}
    if not defaults:
        return args
    args.config_parser.set_defaults(**defaults)
    return parser.parse_args(argv)


ATTENTION_UNITS = ("auto", "kv_group", "query_head", "head")
ALLOCATIONS = ("global", "uniform")
#: base weights in full precision, or as bitsandbytes NF4 / LLM.int8() k-bit weights (`loraprune.kbit`)
QUANTIZE_CHOICES = ("none", "4bit", "8bit")


def check_pruning_run(config: Any) -> None:
    """Validate the settings that `prune-model` and `prune-nm` share: output, calibration, evaluation, LoRA."""
    check(bool(config.output), "an output directory is required (--output DIR)")
    check(config.calibration_samples >= 1, "calibration samples must be >= 1")
    check(config.seq_len >= 2 and config.eval_seq_len >= 2, "sequence lengths must be >= 2")
    check(
        config.eval_max_tokens is None or config.eval_max_tokens >= config.eval_seq_len,
        "eval-max-tokens must be at least one window (eval-seq-len)",
    )
    check(config.steps >= 0, f"steps must be >= 0, got {config.steps}")
    check(
        config.steps >= 1 or config.method != "loraprune",
        "loraprune prunes while LoRA trains: give the number of training steps (--steps N, e.g. 200)",
    )
    check(config.lora_rank >= 1 and config.batch_size >= 1, "lora-rank and batch-size must be >= 1")
    check(config.learning_rate > 0, f"learning-rate must be > 0, got {config.learning_rate}")


@dataclasses.dataclass
class PruneModelConfig:
    """Settings of `loraprune prune-model` / `loraprune.api.prune_model`."""

    output: str = option("", help="directory to write the pruned model, its tokenizer and loraprune_report.json")
    model: str = option(
        "smollm2-135m", help="local Hugging Face directory, hub id, or the embedded default 'smollm2-135m'"
    )
    method: str = option(
        "magnitude",
        help="loraprune (iterative, LoRA-guided, needs --steps) or a one-shot criterion: taylor, "
        "wanda-sp, magnitude, random",
    )
    sparsity: float = option(
        0.2,
        help="fraction of the decoder layers' attention+MLP parameters to remove (embeddings, norms and the "
        "LM head are never pruned; the report also gives the fraction of all parameters)",
    )
    attention_sparsity: float | None = option(
        None, help="separate target for attention (fraction of all heads / KV groups); overrides --sparsity for it"
    )
    mlp_sparsity: float | None = option(
        None, help="separate target for MLP channels (fraction of all channels); overrides --sparsity for them"
    )
    allocation: str = option(
        "global",
        help="'global': rank units across all prunable layers; 'uniform': remove the same number in every "
        "prunable layer (a single-width model that loads with the stock config)",
        choices=ALLOCATIONS,
    )
    attention_unit: str = option(
        "auto",
        help="what an attention group is: 'kv_group' (a key/value head with its query heads), 'query_head' "
        "(query heads, the same number from every KV group), 'head' (multi-head attention); 'auto' picks "
        "'head' for MHA and 'kv_group' for GQA",
        choices=ATTENTION_UNITS,
    )
    layers: str = option(
        "all",
        help="prunable decoder layers, e.g. 'all', '4-27', '0,2,5-7' (ends inclusive), or 'paper': all but the "
        "first 10%% and the last layer (the official LoRAPrune code)",
    )
    round_to: int = option(
        1,
        help="keep every prunable layer's MLP channel count a multiple of N (e.g. 32 for GGUF's quantisation "
        "blocks, 64/128 for GPU tiles): channels go in blocks of N, and --sparsity is met to the nearest "
        "feasible value (the report gives the reached sparsity_decoder)",
    )
    uniform_attention: bool = option(
        False,
        help="remove the same number of attention groups from every prunable layer (one head count for all "
        "layers) while MLP widths follow --allocation",
    )
    calibration_data: str = option(
        "wikitext2",
        help="text for data-driven criteria and LoRA training: corpus name, text file, or Hugging Face dataset "
        "ID[:CONFIG[:SPLIT[:COLUMN]]] (e.g. allenai/c4:en:validation:text; default split validation)",
        aliases=("--data",),
    )
    calibration_samples: int = option(16, help="number of calibration windows for one-shot criteria")
    seq_len: int = option(128, help="tokens per calibration / training window")
    eval_data: str | None = option(
        None,
        help="evaluate perplexity before and after on this corpus, text file or dataset ID[:CONFIG[:SPLIT[:COLUMN]]]",
    )
    eval_seq_len: int = option(128, help="window length of the perplexity evaluation")
    eval_max_tokens: int | None = option(None, help="evaluate on the first N tokens only (default: the whole text)")
    dtype: str = option("float32", help="dtype to load and prune the model in (float32, bfloat16, float16)")
    quantize: str = option(
        "none",
        help="load the base weights in 4 or 8 bits with bitsandbytes for the LoRA training (CUDA only, "
        "--method loraprune; de-quantised to --dtype one matrix at a time for scoring); the pruned model is "
        "shrunk and merged from the same checkpoint re-loaded in --dtype",
        choices=QUANTIZE_CHOICES,
    )
    bf16: bool = option(False, help="LoRA training in bfloat16 autocast (CUDA or CPU)")
    fp16: bool = option(False, help="LoRA training in float16 autocast with a loss scaler (CUDA only)")
    gradient_checkpointing: bool = option(
        False, help="LoRA training recomputes activations in the backward pass (less memory, same gradients)"
    )
    steps: int = option(
        0,
        help="LoRA training steps, for every method: loraprune prunes during them; the one-shot methods "
        "fine-tune after pruning (recovery; 0 = none)",
    )
    lora_rank: int = option(8, help="rank of the LoRA adapter trained for --steps steps (all seven projections)")
    lora_alpha: float | None = option(None, help="LoRA alpha (default: the rank, i.e. scaling 1)")
    learning_rate: float = option(1e-3, help="peak AdamW learning rate of the LoRA training (linear decay)")
    batch_size: int = option(4, help="windows of seq_len tokens per LoRA training step")
    merge_adapter: bool = option(
        True,
        help="merge the trained LoRA adapter into the shrunk weights (--no-merge-adapter: save the shrunk "
        "base model and the adapter separately, in OUTPUT/adapter)",
    )
    seed: int = option(0, help="seed for calibration sampling, random scores and training")
    report_to: str = option(
        "none",
        help="where the LoRA training's metrics go (transformers' report_to): 'none', or trackers such as "
        "'tensorboard', 'wandb', 'mlflow' (comma-separated, installed separately)",
    )
    logging_dir: str | None = option(
        None, help="directory for the trackers' local files (tensorboard event files under LOGGING_DIR/runs/)"
    )
    overwrite: bool = option(False, help="replace OUTPUT if it exists (the old one stays until the new one is done)")
    distill_weight: float = option(
        0.0,
        help="weight of a KL term to the unpruned model's next-token distribution in the LoRA training of every "
        "method (0 = off). The teacher is the same weights with masks and LoRA off (one extra no-grad forward "
        "per step, no second model); one-shot methods then recover under masks and shrink afterwards",
    )
    distill_temperature: float = option(1.0, help="softmax temperature of the distillation term")
    device: str = option("auto", help=DEVICE_HELP)
    device_map: str = option("none", help=DEVICE_MAP_HELP, choices=DEVICE_MAPS)
    save_steps: int = option(0, help=SAVE_STEPS_HELP)
    resume: str | None = option(None, help=RESUME_HELP)
    divergence_factor: float = option(DIVERGENCE_FACTOR, help=DIVERGENCE_HELP)

    def __post_init__(self) -> None:
        check_pruning_run(self)
        check_device_map(self.device_map, trains=self.steps > 0 or self.method == "loraprune", command="prune-model")
        check(self.distill_weight >= 0, f"distill-weight must be >= 0, got {self.distill_weight}")
        check(self.distill_temperature > 0, f"distill-temperature must be > 0, got {self.distill_temperature}")
        check(
            self.distill_weight == 0 or self.quantize == "none",
            "--distill-weight needs full-precision base weights (not --quantize)",
        )
        check(0 <= self.sparsity < 1, f"sparsity must be in [0, 1), got {self.sparsity}")
        for name in ("attention_sparsity", "mlp_sparsity"):
            value = getattr(self, name)
            check(value is None or 0 <= value < 1, f"{name.replace('_', '-')} must be in [0, 1), got {value}")
        check(self.allocation in ALLOCATIONS, f"allocation must be one of {ALLOCATIONS}")
        check(self.round_to >= 1, f"round-to must be at least 1, got {self.round_to}")
        check(self.attention_unit in ATTENTION_UNITS, f"attention unit must be one of {ATTENTION_UNITS}")
        check(self.quantize in QUANTIZE_CHOICES, f"quantize must be one of {QUANTIZE_CHOICES}, got {self.quantize!r}")
        check(
            self.quantize == "none" or self.method == "loraprune",
            f"--quantize {self.quantize} works with --method loraprune only: the one-shot criteria read or "
            "differentiate the base weights themselves and shrink them before training",
        )

    @property
    def width_rules(self) -> WidthRules:
        """`--round-to` and `--uniform-attention` as the selection's width constraints."""
        from loraprune.selection import WidthRules  # selection imports this module's `check`

        return WidthRules(self.round_to, self.uniform_attention)
