"""A sweep specification: a small YAML file turned into validated grid points.

```yaml
name: prunedlora-alpha          # optional; default: the file name
job: adapter                    # model (prune_model) or adapter (prune_adapter + answer-token NLL)
output: sweeps/prunedlora-alpha # optional; default sweeps/NAME (relative to the working directory)
metrics: [test_nll, total_rank] # optional; default: the job's quality metric
keep_outputs: false             # keep every point's model / adapter under OUTPUT/points/ID
fixed:                          # settings shared by every point, by config section
  training: {steps: 60, batch_size: 8}
grid:                           # axes "section.field": values; the points are their cartesian product
  rank_pruning.r0: [64, 256]
  rank_pruning.alpha_over_r0: [0.25, 0.5, 1, 2]
```

Every key is checked against the fields of the job's config dataclasses (so a field added to
them later is a valid axis without changes here), every value against the field's type and
choices, and every point's configs are built (their own validation runs) before anything is
trained. A point's id is a hash of the job kind and its explicit settings (fixed and grid), so
it survives a reordering of the grid or added axis values, and changes with any setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraprune.config import _base_type, suggest
from loraprune.errors import ConfigError, LoraPruneError
from loraprune.safety.user_errors import read_text_file
from loraprune.sweep.jobs import JOBS, Derived, JobKind

_NO_VALUE = object()  # a value that does not fit the field (None is a valid value)

SPEC_KEYS = {
    "name": "a name for the sweep (default: the spec file's name)",
    "job": f"the kind of job every point runs: {', '.join(JOBS)}",
    "output": "directory of sweep.json, sweep.md and the plots (default: sweeps/NAME)",
    "metrics": "metrics shown in the table and the plots (every metric of the job is recorded)",
    "keep_outputs": "keep each point's pruned model or adapter under OUTPUT/points/ID (default: false)",
    "fixed": "settings shared by every point: {section: {field: value}} or {section.field: value}",
    "grid": "axes {section.field: [values]}: every combination is one point",
}


@dataclass(frozen=True)
class Point:
    """One combination of the grid: its axis values and the configs built from them."""

    index: int
    id: str
    settings: dict[str, Any]
    configs: dict[str, Any]

    def config_dict(self, job: JobKind) -> dict[str, dict[str, Any]]:
        """Every field of every config (defaults included), JSON-ready, without the fields the sweep sets."""
        return jsonable(
            {
                section: {k: v for k, v in dataclasses.asdict(config).items() if k not in job.managed.get(section, {})}
                for section, config in self.configs.items()
            }
        )


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep: the job kind, its fixed settings, its axes and its points in grid order."""

    name: str
    job: JobKind
    output: Path
    fixed: dict[str, Any]
    axes: dict[str, list[Any]]
    metrics: tuple[str, ...]
    keep_outputs: bool
    source: dict[str, Any]
    path: Path | None
    points: list[Point]


def jsonable(value: Any) -> Any:
    """`value` as JSON would give it back (tuples become lists; what JSON lacks, e.g. a YAML date, a string)."""
    return json.loads(json.dumps(value, default=str))


def load_spec(path: str | Path, output: str | Path | None = None) -> SweepSpec:
    """Read and validate the YAML spec at `path`; `output` overrides its output directory."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise LoraPruneError(f"sweep spec {path} not found")
    try:
        source = yaml.safe_load(read_text_file(path, "sweep spec"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    return parse_spec(source, path=path, output=output)


def parse_spec(source: Any, *, path: Path | None = None, output: str | Path | None = None) -> SweepSpec:
    """Validate a spec mapping (as read from YAML) and expand its grid into points."""
    where = str(path) if path is not None else "the sweep spec"
    if not isinstance(source, dict):
        raise ConfigError(f"{where} must be a mapping with the keys {', '.join(SPEC_KEYS)}")
    for key in source:
        if key not in SPEC_KEYS:
            raise ConfigError(
                f"{where}: unknown key {key!r}{suggest(str(key), SPEC_KEYS)}; the keys are:\n"
                + "\n".join(f"  {k}: {h}" for k, h in SPEC_KEYS.items())
            )
    job_name = source.get("job")
    if not isinstance(job_name, str) or job_name not in JOBS:
        raise ConfigError(f"{where}: 'job' must be one of {', '.join(JOBS)}, got {job_name!r}")
    job = JOBS[job_name]
    name = str(source.get("name") or (path.stem if path is not None else "sweep"))
    fixed = {key: _coerce(job, key, value) for key, value in _flatten_fixed(source.get("fixed") or {}).items()}
    axes = _parse_grid(job, source.get("grid") or {})
    both = sorted(fixed.keys() & axes.keys())
    if both:
        raise ConfigError(f"{', '.join(both)}: both fixed and a grid axis; keep one")
    metrics = _parse_metrics(job, source.get("metrics", list(job.default_metrics)))
    keep_outputs = source.get("keep_outputs", False)
    if not isinstance(keep_outputs, bool):
        raise ConfigError(f"keep_outputs must be true or false, got {keep_outputs!r}")
    points = []
    for index, values in enumerate(itertools.product(*axes.values())):
        settings = dict(zip(axes, values))
        explicit = {**fixed, **settings}
        try:
            configs = build_configs(job, explicit)
            job.check(configs, metrics)
        except ConfigError as error:
            label = ", ".join(f"{k}={v!r}" for k, v in settings.items()) or "the fixed settings"
            raise ConfigError(f"grid point {label}: {error}") from error
        points.append(Point(index, point_id(job, explicit), settings, configs))
    return SweepSpec(
        name=name,
        job=job,
        output=Path(output or source.get("output") or Path("sweeps") / name),
        fixed=fixed,
        axes=axes,
        metrics=metrics,
        keep_outputs=keep_outputs,
        source=source,
        path=path,
        points=points,
    )


def point_id(job: JobKind, explicit: Mapping[str, Any]) -> str:
    """A stable 12-hex-digit id of a point: the hash of its job kind and explicit settings."""
    canonical = json.dumps({"job": job.name, "settings": dict(sorted(explicit.items()))}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def build_configs(job: JobKind, explicit: Mapping[str, Any]) -> dict[str, Any]:
    """The job's config instances from dotted settings (derived settings resolved, the rest defaults)."""
    by_section: dict[str, dict[str, Any]] = {section: {} for section in job.sections}
    for key, value in explicit.items():
        section, name = key.split(".", 1)
        by_section[section][name] = value
    for section, placeholders in job.managed.items():
        by_section[section].update(placeholders)
    configs = {}
    for section, cls in job.sections.items():
        values = by_section[section]
        for name, derived in job.derived.get(section, {}).items():
            if name not in values:
                continue
            if derived.target in values:
                raise ConfigError(f"set either {section}.{derived.target} or {section}.{name}, not both")
            value = values.pop(name)
            values[derived.target] = derived.resolve(value, {**_defaults(cls), **values})
        configs[section] = cls(**values)
    return configs


def _defaults(cls: type) -> dict[str, Any]:
    return {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(cls)
    }


def _flatten_fixed(fixed: Any) -> dict[str, Any]:
    """`{section: {field: value}}` and `{section.field: value}` alike, as dotted keys."""
    if not isinstance(fixed, dict):
        raise ConfigError("'fixed' must be a mapping {section: {field: value}}")
    flat = {}
    for key, value in fixed.items():
        if "." in str(key):
            flat[str(key)] = value
        elif isinstance(value, dict):
            flat.update({f"{key}.{name}": inner for name, inner in value.items()})
        else:
            raise ConfigError(f"fixed setting {key!r}: give it as {key}: {{field: value}} or as {key}.FIELD: value")
    return flat


def _parse_grid(job: JobKind, grid: Any) -> dict[str, list[Any]]:
    if not isinstance(grid, dict):
        raise ConfigError("'grid' must be a mapping {section.field: [values]}")
    axes = {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid axis {key} needs a non-empty list of values (a single setting goes under fixed)")
        coerced = [_coerce(job, str(key), value) for value in values]
        if len({json.dumps(v) for v in coerced}) != len(coerced):
            raise ConfigError(f"grid axis {key} repeats a value: {values}")
        axes[str(key)] = coerced
    return axes


def _parse_metrics(job: JobKind, metrics: Any) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = [metrics]
    if not isinstance(metrics, list) or not metrics:
        raise ConfigError("'metrics' must be a non-empty list of metric names")
    for metric in metrics:
        if metric not in job.metrics:
            raise ConfigError(
                f"unknown metric {metric!r}{suggest(str(metric), job.metrics)} for {job.name} jobs; "
                "they report:\n" + "\n".join(f"  {k}: {h}" for k, h in job.metrics.items())
            )
    return tuple(metrics)


def _coerce(job: JobKind, key: str, value: Any) -> Any:
    """Check that `key` names a setting of `job` and that `value` fits its type and choices."""
    section, _, name = key.partition(".")
    if section not in job.sections:
        raise ConfigError(
            f"unknown section {section!r} in {key!r}{suggest(section, job.sections)}; {job.name} jobs "
            f"have: {', '.join(job.sections)}"
        )
    cls = job.sections[section]
    derived: Mapping[str, Derived] = job.derived.get(section, {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name in job.managed.get(section, {}):
        raise ConfigError(
            f"{key} is set by the sweep (each point writes its own output; keep_outputs: true keeps "
            "them under OUTPUT/points/ID)"
        )
    if name in derived:
        return _coerce_value(value, float, None, key)
    if name not in fields:
        known = [n for n in fields if n not in job.managed.get(section, {})] + list(derived)
        raise ConfigError(f"unknown setting {key!r}{suggest(name, known)}; {section} settings are: {', '.join(known)}")
    hint = typing.get_type_hints(cls)[name]
    return _coerce_value(value, hint, fields[name].metadata.get("choices"), key)


def type_name(hint: Any) -> str:
    base, optional = _base_type(hint)
    if typing.get_origin(base) in (list, tuple):
        name = f"a list of {typing.get_args(base)[0].__name__}"
    else:
        name = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(base, str(base))
    return name + (" or null" if optional else "")


def _coerce_value(value: Any, hint: Any, choices: tuple | None, key: str) -> Any:
    """`value` converted to the field type (ints to floats, lists to tuples), or a `ConfigError`.

    A float field also takes a numeric string: YAML 1.1 (PyYAML) reads `1e-3` as a string.
    """
    base, optional = _base_type(hint)
    origin = typing.get_origin(base)
    result: Any = _NO_VALUE
    if value is None:
        result = None if optional else _NO_VALUE
    elif origin in (list, tuple) and isinstance(value, (list, tuple)):
        element = typing.get_args(base)[0]
        return tuple(_coerce_value(item, element, None, f"{key} item") for item in value)
    elif base is bool:
        result = value if isinstance(value, bool) else _NO_VALUE
    elif base is int:
        result = value if isinstance(value, int) and not isinstance(value, bool) else _NO_VALUE
    elif base is float:
        result = _as_float(value)
    elif base is str:
        result = value if isinstance(value, str) else _NO_VALUE
    if result is _NO_VALUE:
        raise ConfigError(f"{key}: {value!r} is not {type_name(hint)}")
    if choices and result is not None and result not in choices:
        raise ConfigError(f"{key}: {result!r} is not one of {', '.join(map(str, choices))}")
    return result


def _as_float(value: Any) -> Any:
    if isinstance(value, bool):
        return _NO_VALUE
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return _NO_VALUE
    return _NO_VALUE
