"""Saving pruned models so that the ecosystem loads them, and atomic output directories.

Same widths in every layer: the architecture's stock config, loadable anywhere.
Different widths: the per-layer config plus the shipped `modeling_loraprune.py`
(`auto_map`), loadable by stock `transformers` with `trust_remote_code=True`, and
without it whenever `loraprune` is imported.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from loraprune.errors import LoraPruneError
from loraprune.safety.finite import require_finite
from loraprune.safety.staging import owned_temp_dir, temp_prefix
from loraprune.structure import get_adapter, unwrap_model

REMOTE_CODE = Path(__file__).parent / "remote" / "modeling_loraprune.py"


class OutputExistsError(LoraPruneError):
    """The output directory exists and overwriting was not asked for."""


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (before any long work) if `output_dir` exists and `overwrite` is off."""
    path = Path(output_dir)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output directory {path} already exists; pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output path {path} exists and is not a directory")
    return path


def _umask_mode(directory: bool) -> int:
    """Permissions a plain `open`/`mkdir` would give under the process umask (temp files get 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _apply_umask(directory: Path) -> None:
    """Give everything written into `directory` the umask's permissions: writers that go through
    temp files of their own (safetensors, our `write_json`) otherwise leave them at 0600."""
    file_mode, dir_mode = _umask_mode(directory=False), _umask_mode(directory=True)
    for path in directory.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, dir_mode if path.is_dir() else file_mode)


@contextmanager
def atomic_directory(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces `output_dir` only if the block succeeds.

    A failure (or a kill) leaves `output_dir` as it was: absent, or the previous content. The
    temporary directories carry this process' PID (`loraprune.safety.staging`), so a later run on
    the same output removes those a SIGKILL left behind.
    """
    target = check_output_dir(output_dir, overwrite).absolute()
    staging = owned_temp_dir(target.parent, temp_prefix(target, "partial"))
    os.chmod(staging, _umask_mode(directory=True))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _apply_umask(staging)
    if target.exists():
        retired = owned_temp_dir(target.parent, temp_prefix(target, "old"))
        os.rename(target, retired / target.name)
        os.rename(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, target)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` that replaces it only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _umask_mode(directory=False))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.chmod(tmp, _umask_mode(directory=False))
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pruned_model(
    model: nn.Module,
    tokenizer: Any,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    extra_json: dict[str, Any] | None = None,
    extra_dirs: dict[str, str | os.PathLike] | None = None,
    finalize: Callable[[Path], None] | None = None,
    nonfinite_loss_step: int | None = None,
) -> bool:
    """Save a (shrunk) model with its tokenizer; returns True if the config is the stock one.

    Refuses (`NonFiniteError`, nothing written) a model with a NaN/Inf tensor; `nonfinite_loss_step`,
    the step where the training loss first went non-finite, goes into that message.

    `extra_json` maps file names to JSON payloads written beside the model (reports);
    `extra_dirs` maps sub-directory names to directories copied in (a separate LoRA adapter);
    `finalize(staging)` runs last, on the complete staging directory (files derived from the
    saved model, such as its report), so that it too is written atomically with the model.
    A PEFT model must be merged (or unloaded) first: its adapter is saved separately.
    """
    if hasattr(model, "peft_config"):
        raise LoraPruneError("merge the LoRA adapter (merge_and_unload) before saving the pruned base model")
    root = unwrap_model(model)
    require_finite(root.state_dict().items(), "the pruned model", nonfinite_loss_step)
    adapter = get_adapter(root)
    config, stock = adapter.config_for_sizes(root, adapter.layer_sizes(root))
    architectures = list(config.architectures)
    with atomic_directory(output_dir, overwrite) as staging:
        previous_config, root.config = root.config, config
        try:
            root.save_pretrained(staging)
        finally:
            root.config = previous_config
        config.architectures = architectures  # save_pretrained writes the in-memory class name
        config.save_pretrained(staging)
        if not stock:
            shutil.copy(REMOTE_CODE, staging / REMOTE_CODE.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name, payload in (extra_json or {}).items():
            write_json(staging / name, payload)
        for name, source in (extra_dirs or {}).items():
            shutil.copytree(source, staging / name)
        if finalize is not None:
            finalize(staging)
    return stock
