"""Exceptions that a user's input causes, and the one-line messages the command line prints for them.

`loraprune.cli.main` is the one error boundary: `LoraPruneError` and the types `user_error_message`
recognises become `loraprune COMMAND: error: MESSAGE` with exit status 2; anything else is a bug
and keeps its traceback. `read_text_file` reads the user's text files (data, specs) so that a
binary or non-UTF-8 file, a directory or an unreadable file fails with its name in the message.
"""

from __future__ import annotations

from pathlib import Path

from loraprune.errors import LoraPruneError


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of the file `path` (`what` names it in errors: "data file", "sweep spec", ...)."""
    if path.is_dir():
        raise LoraPruneError(f"{what} {path} is a directory; give a text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise LoraPruneError(
            f"{what} {path} is not UTF-8 text (byte {error.object[error.start : error.start + 1]!r} at offset "
            f"{error.start}); convert it to UTF-8"
        ) from error
    except OSError as error:
        raise LoraPruneError(f"cannot read {what} {path}: {error.strerror or error}") from error


def user_error_message(error: BaseException) -> str | None:
    """The one-line message for an exception the user's input caused, or None if it is a bug."""
    if isinstance(error, LoraPruneError):
        return str(error)
    if isinstance(error, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({error}); convert it to UTF-8"
    if isinstance(error, OSError) and error.filename is not None:
        return f"cannot access {error.filename}: {error.strerror or error}"
    from huggingface_hub.errors import StrictDataclassError
    from peft.tuners.tuners_utils import NoMatchingPeftModuleError

    if isinstance(error, StrictDataclassError):
        detail = " ".join(str(error).split())
        return f"the model's config.json has an invalid value: {detail}"
    if isinstance(error, NoMatchingPeftModuleError):
        return (
            f"no module of the model matches --target-modules ({' '.join(str(error).split())}); use names such as "
            "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj"
        )
    return None
