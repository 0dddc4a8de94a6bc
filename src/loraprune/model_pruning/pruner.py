"""The LoRAPrune loop as plain methods: score every step, prune at scheduled steps, keep pruned slices still.

`ModelPruner` works in any training loop of a PEFT LoRA model:

    pruner = ModelPruner(peft_model, total_steps, sparsity=0.5)
    for step in range(total_steps):
        loss.backward()                     # accumulate micro-batches as usual
        pruner.observe(loss_scale=1.0)      # before optimizer.step(): reads the LoRA gradients
        optimizer.step()
        pruner.after_optimizer_step(optimizer)
        optimizer.zero_grad()
    pruner.finish()                         # physically removes the pruned units (base and LoRA)

`LoRAPruneCallback` calls the same methods from `transformers.Trainer`.

Every optimizer step the scores of the prunable groups (`config.score`: the activation-gradient
loss change by default, or the paper's LoRA-guided estimate) are folded into an
exponential moving average (a step whose gradients are not finite is skipped, with a
warning). Every `prune_every` steps the lowest-scoring kept units are masked until the cubic
schedule's current budget is reached; at the end of the ramp the budget is the exact
target. Masking is monotone and done with forward pre-hooks (`MaskHooks`), so base weights
never change and never get gradients. The LoRA slices of pruned units (rows of `B` in
q/k/v/gate/up, columns of `A` in o/down) are zeroed together with their optimizer state
when pruned, and zeroed again after every optimizer step, so no optimizer (weight decay,
momentum, factored moments) can move them.

The schedule position, the moving-average scores and the masks are the whole state
(`state_dict` / `load_state_dict`): a run resumed from a checkpoint continues exactly.
Under data parallelism (DDP) the gradients are already all-reduced, every rank computes the
same scores, and rank 0's masks are broadcast so that round-off cannot make replicas diverge.
A DDP-wrapped model is unwrapped, so module paths are the model's own. Under FSDP2 the scores
are computed on each rank's shards and reduced (`loraprune.distributed`), pruned slices are
zeroed in the local shards, and `finish` needs the whole model (gather it first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loraprune.config import ALLOCATIONS, ATTENTION_UNITS, check
from loraprune.cubic_schedule import CubicSchedule
from loraprune.distributed import broadcast_from_main, index_fill_, is_distributed, is_sharded, unwrap_parallel
from loraprune.errors import LoraPruneError
from loraprune.importance.activation_gradient import ActivationGradientScores
from loraprune.importance.lora_guided import LoraGuidedCriterion, lora_layer
from loraprune.masking import MaskHooks
from loraprune.model_pruning.config import LoRAPruneConfig
from loraprune.safety.evidence import enough_scoring_steps
from loraprune.selection import KINDS, Budget, WidthRules, granularity, parse_layers, plan_budget, select
from loraprune.shrink import shrink_model
from loraprune.structure import GroupFamily, LayerSizes, Masks, full_masks, get_adapter, unwrap_model
from loraprune.structure.groups import Kind, masks_from_lists, masks_to_lists, removed_params, total_params

logger = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass(frozen=True)
class PruningTarget:
    """What to remove: `sparsity` of the decoder layers' attention+MLP parameters, where and how.

    The fields mean what the options of the same names of `loraprune prune-model` mean:
    per-kind targets override `sparsity` for that kind; `layers` limits pruning to some
    decoder layers ('all', '4-27', '0,2,5-7'); `allocation` ranks units across layers
    ('global') or removes the same number per layer ('uniform'); `attention_unit` picks
    whole KV groups or query heads on GQA models ('auto': heads for MHA, KV groups for GQA);
    `round_to` and `uniform_attention` are the `WidthRules` of `loraprune.selection`.
    """

    sparsity: float
    attention_sparsity: float | None = None
    mlp_sparsity: float | None = None
    layers: str = "all"
    allocation: str = "global"
    attention_unit: str = "auto"
    round_to: int = 1
    uniform_attention: bool = False

    @property
    def rules(self) -> WidthRules:
        """The width constraints (MLP block size, one head count for all layers) of this target."""
        return WidthRules(self.round_to, self.uniform_attention)

    def __post_init__(self) -> None:
        check(self.allocation in ALLOCATIONS, f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        check(
            self.attention_unit in ATTENTION_UNITS,
            f"attention_unit must be one of {ATTENTION_UNITS}, got {self.attention_unit!r}",
        )


@dataclass(frozen=True)
class _Slice:
    """The slice of a LoRA matrix that the pruned units of one family own."""

    param: nn.Parameter
    dim: int
    index: torch.Tensor


class ModelPruner:
    """LoRAPrune state and steps for one training run of `total_steps` optimizer steps."""

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        target: PruningTarget,
        config: LoRAPruneConfig | None = None,
        adapter: str = "default",
    ) -> None:
        model = unwrap_parallel(model)
        self.model = model
        self.target = target
        self.config = config or LoRAPruneConfig()
        self.total_steps = total_steps
        root = unwrap_model(model)
        architecture = get_adapter(root)
        self.families: list[GroupFamily] = architecture.families(root, target.attention_unit)
        self.prunable = parse_layers(target.layers, len(architecture.layer_sizes(root)))
        self.budget: Budget = plan_budget(
            self.families,
            self.prunable,
            target.sparsity,
            allocation=target.allocation,
            attention_sparsity=target.attention_sparsity,
            mlp_sparsity=target.mlp_sparsity,
            rules=target.rules,
        )
        self.schedule = CubicSchedule.from_fractions(total_steps, self.config.warmup, self.config.cooldown)
        self.scored = [f for f in self.families if f.layer in self.prunable and self.budget.of(f.kind) > 0]
        self.criterion = LoraGuidedCriterion(
            adapter, second_order=self.config.second_order, normalisation=self.config.normalisation
        )
        self.criterion.check_families(model, self.scored)
        self.adapter = adapter
        self.masks: Masks = full_masks(self.families)
        self.scores: dict[str, torch.Tensor] = {}
        self.step = 0
        self.observations = 0
        self.skipped_steps = 0
        self.history: list[dict[str, Any]] = []
        self._pruned_slices: list[_Slice] = []
        self._hooks: MaskHooks | None = MaskHooks(model, self.families, self.masks)
        # installed after the mask hooks, so the scored inputs are the masked ones
        self.activation_scores: ActivationGradientScores | None = None
        if self.config.score == "activation":
            self.activation_scores = ActivationGradientScores(model, self.scored, self.config.form).install()

    # ---- progress -----------------------------------------------------------------------------

    def removed_units(self, kind: Kind) -> int:
        return sum(int((~self.masks[f.key]).sum()) for f in self.families if f.kind == kind)

    @property
    def finished(self) -> bool:
        """Whether the final budget is reached (then scores are no longer computed)."""
        return all(self.removed_units(kind) == self.budget.of(kind) for kind in KINDS)

    def decoder_sparsity(self) -> float:
        """Fraction of the decoder's attention+MLP parameters removed by the current masks."""
        return removed_params(self.families, self.masks) / total_params(self.families)

    def _granularity(self, kind: Kind) -> int:
        """Smallest step in units that the selection can take for `kind` (whole atoms, every layer if uniform)."""
        return granularity(self.families, self.prunable, kind, self.target.allocation, self.target.rules)

    def target_at(self, step: int) -> Budget:
        """The budget in force after optimizer step `step`: the cubic ramp, rounded to the nearest feasible units.

        Rounding to the nearest (not down) lets coarse units, such as one KV group in every
        layer under uniform allocation, follow the ramp instead of all going at its end.
        """

        def amount(kind: Kind) -> int:
            unit, total = self._granularity(kind), self.budget.of(kind)
            return min(total, round(self.schedule.amount(step, total) / unit) * unit)

        return Budget(attention=amount("attention"), mlp=amount("mlp"))

    def _due(self, step: int) -> bool:
        if self.finished:
            return False
        return step >= self.schedule.ramp_end or (
            step > self.schedule.warmup_steps and step % self.config.prune_every == 0
        )

    # ---- every step -----------------------------------------------------------------------------

    def observe(self, loss_scale: float = 1.0, backward_scale: float | None = None) -> bool:
        """Fold the current LoRA gradients into the moving-average scores; False if skipped.

        Call once per optimizer step, after the gradients are final (accumulated over
        micro-batches, all-reduced) and before `optimizer.step()`. Pass the AMP loss scale if
        a `GradScaler` has not unscaled them yet. The activation-gradient score reads gradients
        taken during the backward pass, which an unscaling afterwards does not reach: pass the scale
        the backward pass ran with as `backward_scale` (default: `loss_scale`). Nothing is computed
        once the target is reached.
        """
        if self.finished:
            return False
        if self.activation_scores is not None:
            scale = loss_scale if backward_scale is None else backward_scale
            power = 2 if self.config.form == "fisher" else 1
            new = {key: value / scale**power for key, value in self.activation_scores.collect().items()}
        else:
            new = self.criterion.gradient_scores(self.model, self.scored, loss_scale)
        bad = [key for key, value in new.items() if not torch.isfinite(value).all()]
        if bad:
            self.skipped_steps += 1
            logger.warning(
                "LoRAPrune: non-finite importance in %s at step %d (NaN/Inf gradients); this step's scores are skipped",
                ", ".join(bad[:3]) + ("..." if len(bad) > 3 else ""),
                self.step + 1,
            )
            return False
        decay = self.config.ema
        for key, value in new.items():
            if key in self.scores:
                self.scores[key] = decay * self.scores[key] + (1 - decay) * value
            elif self.config.ema_start == "zero":  # the official code: S = 0 before the first step
                self.scores[key] = (1 - decay) * value
            else:  # the first observation initialises the average, so early events are not biased towards 0
                self.scores[key] = value
        self.observations += 1
        return True

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any] | None:
        """Count the step, keep pruned slices at zero, and prune if the schedule says so.

        Returns a record of the pruning event, or None when there was none.
        """
        self.step += 1
        self._zero_pruned_slices()
        if not self._due(self.step):
            return None
        if not enough_scoring_steps(
            "LoRAPrune", self.observations, self.config.min_scoring_steps, self.schedule.ramp_end, self.step
        ):
            return None
        budget = self.target_at(self.step)
        masks = select(
            self.families,
            self.scores,
            self.masks,
            budget,
            prunable_layers=self.prunable,
            allocation=self.target.allocation,
            rules=self.target.rules,
        )
        self._set_masks(_broadcast_from_rank0(masks, _device(self.model)), optimizer)
        event = {
            "step": self.step,
            "schedule_fraction": self.schedule.fraction(self.step),
            "attention_units_removed": self.removed_units("attention"),
            "mlp_units_removed": self.removed_units("mlp"),
            "decoder_sparsity": self.decoder_sparsity(),
            "observations": self.observations,
        }
        self.history.append(event)
        if self.finished:
            self._stop_scoring()
        logger.info(
            "LoRAPrune step %d: %d attention units and %d MLP channels removed (%.2f%% of decoder params)",
            self.step,
            event["attention_units_removed"],
            event["mlp_units_removed"],
            100 * event["decoder_sparsity"],
        )
        return event

    def _stop_scoring(self) -> None:
        if self.activation_scores is not None:
            self.activation_scores.remove()

    def unmasked(self) -> contextlib.AbstractContextManager:
        """A context in which the model runs with every unit kept (the dense teacher of self-distillation)."""
        if self._hooks is None:
            raise LoraPruneError("this pruner has finished: the pruned units are gone")
        return self._hooks.suspended()

    # ---- masks and LoRA slices --------------------------------------------------------------------

    def _set_masks(self, masks: Masks, optimizer: torch.optim.Optimizer | None) -> None:
        for key, mask in masks.items():
            if bool((mask & ~self.masks[key]).any()):
                raise LoraPruneError(f"masks must be monotone: a pruned unit of {key} would come back")
        self.masks = masks
        if self._hooks is not None:
            self._hooks.update(masks)
        self._pruned_slices = self._collect_slices()
        self._zero_pruned_slices(optimizer)

    def _collect_slices(self) -> list[_Slice]:
        """LoRA rows of B (row-side matrices) and columns of A (column-side) owned by pruned units."""
        slices = []
        for family in self.families:
            pruned = ~self.masks[family.key]
            if not bool(pruned.any()):
                continue
            for slicing in family.matrices:
                layer = lora_layer(self.model, slicing.module, self.adapter)
                if layer is None:
                    continue
                side = layer.lora_B if slicing.dim == 0 else layer.lora_A
                param = side[self.adapter].weight
                index = family.index_of(pruned, slicing).to(param.device)
                slices.append(_Slice(param, slicing.dim, index))
        return slices

    @torch.no_grad()
    def _zero_pruned_slices(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero the pruned LoRA slices (and, given an optimizer, every state tensor shaped like them)."""
        for piece in self._pruned_slices:
            index_fill_(piece.param, piece.dim, piece.index, 0.0)
            if optimizer is None:
                continue
            for value in optimizer.state.get(piece.param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == piece.param.shape:
                    index_fill_(value, piece.dim, piece.index, 0.0)

    # ---- end of the run ---------------------------------------------------------------------------

    def finish(self) -> list[LayerSizes]:
        """Remove the mask hooks and physically remove the pruned units from base and LoRA weights.

        Returns the new widths of every decoder layer. The pruner cannot be stepped afterwards.
        """
        if self._hooks is None:
            raise LoraPruneError("this pruner has already finished (the model is shrunk)")
        if any(is_sharded(param) for param in self.model.parameters()):
            raise LoraPruneError(
                "the model is sharded (FSDP): load its full state dict into an unsharded copy and "
                "shrink that with loraprune.shrink.shrink_model(copy, pruner.families, pruner.masks)"
            )
        if not self.finished:
            logger.warning(
                "LoRAPrune: shrinking before the target was reached (%.2f%% of decoder params removed)",
                100 * self.decoder_sparsity(),
            )
        self._hooks.remove()
        self._hooks = None
        self._stop_scoring()
        self._pruned_slices = []
        return shrink_model(self.model, self.families, self.masks)

    # ---- checkpoints --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run: schedule position, moving-average scores, masks."""
        return {
            "version": STATE_VERSION,
            "target": dataclasses.asdict(self.target),
            "config": dataclasses.asdict(self.config),
            "total_steps": self.total_steps,
            "step": self.step,
            "observations": self.observations,
            "skipped_steps": self.skipped_steps,
            "scores": {key: value.clone() for key, value in self.scores.items()},
            "masks": masks_to_lists(self.masks),
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Continue from `state_dict()` of a run with the same target, options and length."""
        expected = {
            "version": STATE_VERSION,
            "target": dataclasses.asdict(self.target),
            "config": dataclasses.asdict(self.config),
            "total_steps": self.total_steps,
        }
        for name, value in expected.items():
            if state.get(name) != value:
                raise LoraPruneError(
                    f"the saved LoRAPrune state has {name}={state.get(name)!r} but this run has "
                    f"{value!r}; resume with the settings of the interrupted run"
                )
        masks = masks_from_lists(state["masks"])
        if set(masks) != set(self.masks) or any(masks[k].shape != self.masks[k].shape for k in masks):
            raise LoraPruneError("the saved LoRAPrune masks do not match this model's groups")
        self.step = state["step"]
        self.observations = state["observations"]
        self.skipped_steps = state["skipped_steps"]
        self.scores = {key: value.clone() for key, value in state["scores"].items()}
        self.history = list(state["history"])
        self._set_masks(masks, optimizer)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _broadcast_from_rank0(masks: Masks, device: torch.device) -> Masks:
    """Rank 0's masks on every rank (a no-op without an initialised process group)."""
    if not is_distributed():
        return masks
    keys = sorted(masks)
    flat = torch.cat([masks[key] for key in keys]).to(device=device, dtype=torch.uint8)
    broadcast_from_main([flat])
    flat = flat.bool().cpu()
    sizes = [masks[key].numel() for key in keys]
    return {key: part.clone() for key, part in zip(keys, torch.split(flat, sizes))}
