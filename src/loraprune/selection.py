"""From scores and a budget to keep-masks: which units go, in which layers.

The budget is stated in parameters of the decoder layers' attention and MLP blocks
(`sparsity` = fraction of them removed) and turned into whole units per kind. Units are
removed lowest score first, either ranked across all prunable layers (`global`) or the
same number in every prunable layer (`uniform`, which keeps a single-width config
possible). `WidthRules` add the shapes runtimes prefer: MLP widths that are multiples of
a block size, or one head count in every layer while MLP widths vary. Masks only ever
lose units: pruning is monotone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from loraprune.config import check
from loraprune.errors import ConfigError
from loraprune.structure import GroupFamily, Masks
from loraprune.structure.groups import Kind

Allocation = Literal["global", "uniform"]
KINDS: tuple[Kind, ...] = ("attention", "mlp")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WidthRules:
    """Constraints on the widths pruning leaves, for runtimes that run regular shapes faster.

    `round_to`: every prunable layer keeps a multiple of this many MLP channels, so MLP
    channels go in blocks of `round_to` (GPU matmul tiles; GGUF quantises rows in blocks of
    32, and a row length that is not a multiple falls back to a wider type).
    `uniform_attention`: the same number of attention units goes from every prunable layer
    (one head count for all layers) while the MLP widths follow the allocation.
    """

    round_to: int = 1
    uniform_attention: bool = False

    def __post_init__(self) -> None:
        check(self.round_to >= 1, f"round_to must be at least 1, got {self.round_to}")

    @property
    def active(self) -> bool:
        """Whether these rules constrain anything beyond whole groups."""
        return self.round_to > 1 or self.uniform_attention

    def allocation_of(self, kind: Kind, allocation: Allocation) -> Allocation:
        """The allocation `kind` follows: attention is uniform under `uniform_attention`."""
        return "uniform" if kind == "attention" and self.uniform_attention else allocation

    def atom(self, family: GroupFamily) -> int:
        """Units of `family` that go together: a block of `round_to` MLP channels, one query head
        per KV group for `query_head` units, else one."""
        if family.kind == "mlp":
            return self.round_to
        return family.count // family.units_per_kv if family.unit == "query_head" else 1

    def check_families(self, families: list[GroupFamily]) -> None:
        """Refuse MLP widths the rounding cannot keep (a width that is not a multiple of `round_to`)."""
        for family in families:
            check(
                family.kind != "mlp" or family.count % self.round_to == 0,
                f"layer {family.layer} has {family.count} MLP channels, not a multiple of round_to "
                f"{self.round_to}: choose a divisor of it or leave the layer out of the prunable layers",
            )


NO_RULES = WidthRules()


@dataclass(frozen=True)
class Budget:
    """Units of each kind to remove in total (already-removed ones included)."""

    attention: int
    mlp: int

    def of(self, kind: Kind) -> int:
        return self.attention if kind == "attention" else self.mlp

    def at_fraction(self, schedule_amount) -> Budget:
        """The part of this budget in force, given `schedule_amount(total_units) -> units`."""
        return Budget(attention=schedule_amount(self.attention), mlp=schedule_amount(self.mlp))


def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """Prunable layers from `"all"`, `"4-27"`, `"0,2,5-7"` (ends inclusive); validated against the model.

    `"paper"` is the official LoRAPrune code's choice: every layer but the first 10 % and the last.
    """
    if spec is None or spec.strip() in ("", "all"):
        return list(range(num_layers))
    if spec.strip() == "paper":
        return list(range(int(0.1 * num_layers), num_layers - 1))
    layers: set[int] = set()
    try:
        for part in spec.split(","):
            low, _, high = part.strip().partition("-")
            layers.update(range(int(low), int(high or low) + 1))
    except ValueError as error:
        raise ConfigError(f"layers must look like 'all', '4-27' or '0,2,5-7', got {spec!r}") from error
    bad = sorted(i for i in layers if not 0 <= i < num_layers)
    check(not bad, f"layers {bad} do not exist: the model has decoder layers 0-{num_layers - 1}")
    return sorted(layers)


def _min_kept(family: GroupFamily, rules: WidthRules) -> int:
    """Units a layer keeps at least: one KV group's worth, or one block of MLP channels."""
    return max(family.min_kept(), rules.atom(family) if family.kind == "mlp" else 1)


def _feasible_counts(families: list[GroupFamily], allocation: Allocation, rules: WidthRules) -> list[int]:
    """Every total number of units of one kind that the constraints allow (from the dense model)."""
    if not families:
        return [0]
    step = rules.atom(families[0])
    per_family = families[0].count - _min_kept(families[0], rules)
    if rules.allocation_of(families[0].kind, allocation) == "uniform":
        return [k * len(families) for k in range(0, per_family + 1, step)]
    return list(range(0, sum(f.count - _min_kept(f, rules) for f in families) + 1, step))


def granularity(
    families: list[GroupFamily],
    prunable_layers: list[int],
    kind: Kind,
    allocation: Allocation = "global",
    rules: WidthRules = NO_RULES,
) -> int:
    """Smallest step in units that the selection can take for `kind` (whole atoms, every layer if uniform)."""
    candidates = [f for f in families if f.kind == kind and f.layer in prunable_layers]
    if not candidates:
        return 1
    uniform = rules.allocation_of(kind, allocation) == "uniform"
    return rules.atom(candidates[0]) * (len(candidates) if uniform else 1)


def plan_budget(
    families: list[GroupFamily],
    prunable_layers: list[int],
    sparsity: float,
    *,
    allocation: Allocation = "global",
    attention_sparsity: float | None = None,
    mlp_sparsity: float | None = None,
    tolerance: float = 0.005,
    rules: WidthRules = NO_RULES,
) -> Budget:
    """Units of each kind to remove so that `sparsity` of the decoder's attention+MLP parameters go.

    With `sparsity` alone, attention takes the feasible count nearest to its share and MLP
    channels make up the rest, so the whole-decoder fraction is met to within one channel
    (within one block of channels per layer-step under `rules`: then the nearest feasible
    fraction is taken, whatever its distance, and logged). With per-kind targets each must be
    met to within `tolerance`; otherwise the error names the nearest feasible values.
    """
    check(0 <= sparsity < 1, f"sparsity must be in [0, 1), got {sparsity}")
    for name, value in (("attention_sparsity", attention_sparsity), ("mlp_sparsity", mlp_sparsity)):
        check(value is None or 0 <= value < 1, f"{name} must be in [0, 1), got {value}")
    prunable = {kind: [f for f in families if f.kind == kind and f.layer in prunable_layers] for kind in KINDS}
    rules.check_families(prunable["mlp"])
    unit_params = {kind: next((f.params_per_unit for f in families if f.kind == kind), 0) for kind in KINDS}
    all_units = {kind: sum(f.count for f in families if f.kind == kind) for kind in KINDS}
    decoder_params = sum(unit_params[k] * all_units[k] for k in KINDS)
    feasible = {kind: _feasible_counts(prunable[kind], allocation, rules) for kind in KINDS}

    def nearest(kind: Kind, wanted_units: float) -> int:
        return min(feasible[kind], key=lambda n: (abs(n - wanted_units), n))

    def require(what: str, target: float, options: list[float], achieved: float) -> None:
        if abs(achieved - target) <= tolerance:
            return
        below = max((v for v in options if v <= target), default=None)
        above = min((v for v in options if v >= target), default=None)
        raise ConfigError(
            f"{what} sparsity {target:g} cannot be met with {allocation} allocation over {len(prunable_layers)} "
            f"prunable layers (whole groups only, at least one kept per layer{_describe(rules)}); nearest feasible: "
            + " or ".join(f"{v:.4f}" for v in (below, above) if v is not None)
        )

    if attention_sparsity is None and mlp_sparsity is None:
        attention = nearest("attention", sparsity * all_units["attention"])
        attention_params = attention * unit_params["attention"]
        mlp = nearest("mlp", (sparsity * decoder_params - attention_params) / max(unit_params["mlp"], 1))
        reached = (attention_params + mlp * unit_params["mlp"]) / decoder_params
        if rules.active:
            logger.info("decoder sparsity %g (%s): nearest feasible %.4f", sparsity, _describe(rules)[2:], reached)
        else:
            options = [(attention_params + n * unit_params["mlp"]) / decoder_params for n in feasible["mlp"]]
            require("decoder", sparsity, options, reached)
        return Budget(attention=attention, mlp=mlp)
    counts = {}
    for kind, explicit in (("attention", attention_sparsity), ("mlp", mlp_sparsity)):
        target = sparsity if explicit is None else explicit
        counts[kind] = nearest(kind, target * all_units[kind])
        options = [n / all_units[kind] for n in feasible[kind]]
        require(kind, target, options, counts[kind] / all_units[kind])
    return Budget(attention=counts["attention"], mlp=counts["mlp"])


def _describe(rules: WidthRules) -> str:
    """The active rules as a phrase, each part led by ', ' (empty without rules)."""
    parts = [f"MLP widths multiples of {rules.round_to}"] if rules.round_to > 1 else []
    parts += ["the same attention units in every layer"] if rules.uniform_attention else []
    return "".join(f", {part}" for part in parts)


def select(
    families: list[GroupFamily],
    scores: dict[str, torch.Tensor],
    masks: Masks,
    budget: Budget,
    *,
    prunable_layers: list[int],
    allocation: Allocation = "global",
    rules: WidthRules = NO_RULES,
) -> Masks:
    """New masks removing the lowest-scoring kept units until each kind's budget is reached.

    Already-removed units stay removed. `scores` are higher-is-more-important, one per unit.
    Under `rules.round_to` MLP channels go in blocks of that many, the lowest-scoring ones of
    a layer together, ranked by their summed score.
    """
    new_masks = {key: mask.clone() for key, mask in masks.items()}
    for kind in KINDS:
        candidates = [f for f in families if f.kind == kind and f.layer in prunable_layers]
        removed = sum(int((~masks[f.key]).sum()) for f in families if f.kind == kind)
        need = budget.of(kind) - removed
        if need <= 0 or not candidates:
            continue
        if rules.allocation_of(kind, allocation) == "uniform":
            per_family = need // len(candidates)
            for family in candidates:
                _remove_lowest(family, scores[family.key], new_masks[family.key], per_family, rules)
        else:
            _remove_globally(candidates, scores, new_masks, need, rules)
    return new_masks


def _tiers(
    family: GroupFamily, score: torch.Tensor, keep: torch.Tensor, rules: WidthRules
) -> list[tuple[float, list[int]]]:
    """Removable atoms of a family in the order they must go, with their summed score."""
    if family.unit != "query_head":
        size = rules.atom(family)
        kept = torch.nonzero(keep).flatten()
        order = kept[torch.argsort(score[kept], stable=True)].tolist()
        removable = (len(order) - _min_kept(family, rules)) // size * size
        blocks = [order[start : start + size] for start in range(0, removable, size)]
        return [(float(score[block].sum()), block) for block in blocks]
    per_kv = family.units_per_kv
    columns = []
    for kv in range(family.count // per_kv):
        heads = torch.arange(kv * per_kv, (kv + 1) * per_kv)
        heads = heads[keep[heads]]
        columns.append(heads[torch.argsort(score[heads], stable=True)].tolist())
    tiers = []
    for t in range(len(columns[0]) - 1):  # keep one query head per KV group
        units = [column[t] for column in columns]
        tiers.append((float(score[units].sum()), units))
    return tiers


def _remove_lowest(family: GroupFamily, score: torch.Tensor, keep: torch.Tensor, units: int, rules: WidthRules) -> None:
    removed = 0
    for _, atom in _tiers(family, score, keep, rules):
        if removed + len(atom) > units:
            break
        keep[atom] = False
        removed += len(atom)
    if removed != units:
        raise ConfigError(f"{family.key}: cannot remove {units} units ({removed} possible)")


def _remove_globally(
    candidates: list[GroupFamily], scores: dict[str, torch.Tensor], masks: Masks, need: int, rules: WidthRules
) -> None:
    atoms = []
    for index, family in enumerate(candidates):
        for rank, (value, units) in enumerate(_tiers(family, scores[family.key], masks[family.key], rules)):
            atoms.append((value, index, rank, units))
    atoms.sort(key=lambda atom: atom[:3])
    removed = 0
    for _value, index, _rank, units in atoms:
        if removed + len(units) > need:
            continue
        masks[candidates[index].key][units] = False
        removed += len(units)
        if removed == need:
            break
    if removed != need:
        raise ConfigError(f"cannot remove {need} units of {candidates[0].kind} (only {removed} possible)")
