"""Dataclass configs: every field carries its help text, and `__post_init__` validates.

The command line is generated from these dataclasses (`add_dataclass_arguments`), so the
help a user reads in `--help` is the same text the Python API documents.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

from loraprune.errors import ConfigError

T = TypeVar("T")


def option(default: Any, help: str, *, choices: tuple | None = None, cli: bool = True, **kwargs: Any) -> Any:
    """A dataclass field with help text (and optional choices) for the generated command line."""
    metadata = {"help": help, "choices": choices, "cli": cli}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def check(condition: bool, message: str) -> None:
    """Raise a `ConfigError` with `message` unless `condition` holds."""
    if not condition:
        raise ConfigError(message)


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
        flag = "--" + field.name.replace("_", "-")
        base, _optional = _base_type(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = field.metadata.get("help", "")
        if base is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
            continue
        kwargs: dict[str, Any] = {"dest": field.name, "default": default, "help": help_text + " (default: %(default)s)"}
        if field.metadata.get("choices"):
            kwargs["choices"] = field.metadata["choices"]
        if typing.get_origin(base) in (list, tuple):
            kwargs["nargs"] = "+"
            kwargs["type"] = typing.get_args(base)[0]
        elif base in (int, float, str):
            kwargs["type"] = base
        parser.add_argument(flag, **kwargs)


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Build dataclass `cls` from parsed arguments (fields missing from `args` keep their default)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)
