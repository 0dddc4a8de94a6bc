"""LoRAPrune with an N:M pattern: LoRA-guided element importance, moving average, gradual N:M masks.

    pruner = NMPruner(peft_model, total_steps, NMPattern(2, 4))
    for step in range(total_steps):
        loss.backward()
        pruner.observe()                  # before optimizer.step(): reads the LoRA gradients
        optimizer.step()
        pruner.after_optimizer_step()
        optimizer.zero_grad()
    model = pruner.finish()               # mask ⊙ (W0 + s·B·A) merged, adapter removed

Importance. Every optimizer step, each masked projection's element importance
`|Ĝ ⊙ (W0 + s·B·A)|` (`loraprune.importance.lora_guided`: `Ĝ = G_B·A + B·G_A` estimated from
the LoRA gradients only) is folded into an exponential moving average, as LoRAPrune does for
its structured scores; a step whose gradients are not finite is skipped. The averages are
one float32 tensor per weight (as much memory as the weights in float32) until the final
pattern is in force, then freed.

Schedule (a decision, not in the paper, which describes structured pruning only): the pattern
is tightened gradually with LoRAPrune's cubic schedule (`LoRAPruneConfig`: warm-up, pruning
every `prune_every` steps, cool-down), applied to the number of weights removed from every
group of `M`: `M − N` in total, so 2:4 passes through 3:4 and 4:8 through 7:8, 6:8, 5:8. Each
intermediate mask is itself an N':M pattern, every group loses weights at the same pace (no
group is ever below the final density), and the final `N:M` is in force exactly from the
start of the cool-down. Why gradual rather than one mask at the end of a scoring phase: the
point of LoRAPrune is that LoRA adapts while weights disappear and the moving average follows
the adapting model; with a one-shot mask the scores of the late phase are never used. (A
one-shot mask is still expressible: a long warm-up and a ramp of one step, e.g.
`warmup=0.5, cooldown=1 - 0.5 - 1/steps`.)

Masks are monotone (a pruned weight never returns, the selection at each event is among the
weights still kept) and the forward of every masked projection is the masked merged weight
(`MaskedMergedForward`), so the trained network is the one `finish()` merges.

Not supported: resuming from a checkpoint (the element averages would have to be saved with
it), LoRA dropout, DoRA, quantised base weights.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from peft.utils.integrations import dequantize_module_weight
from torch import nn

from loraprune.cubic_schedule import CubicSchedule
from loraprune.errors import LoraPruneError
from loraprune.importance.lora_guided import element_importance
from loraprune.model_pruning.config import LoRAPruneConfig
from loraprune.safety.evidence import enough_scoring_steps
from loraprune.semi_structured.masked_lora import MaskedMergedForward, merge_masked
from loraprune.semi_structured.pattern import NMPattern, nm_mask
from loraprune.semi_structured.targets import base_linear, nm_modules

logger = logging.getLogger(__name__)

STATE_VERSION = 1


class NMPruner:
    """LoRAPrune N:M state and steps for one training run of `total_steps` optimizer steps."""

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        pattern: NMPattern,
        config: LoRAPruneConfig | None = None,
        layers: str = "all",
        adapter: str = "default",
    ) -> None:
        self.model = model
        self.pattern = pattern
        self.config = config or LoRAPruneConfig()
        self.adapter = adapter
        self.modules = nm_modules(model, pattern, layers)
        self.schedule = CubicSchedule.from_fractions(total_steps, self.config.warmup, self.config.cooldown)
        self.masks = {name: torch.ones_like(base_linear(model, name).weight, dtype=torch.bool) for name in self.modules}
        self.forward = MaskedMergedForward(model, self.masks, adapter)
        self.scores: dict[str, torch.Tensor] = {}
        self.removed_per_group = 0
        self.step = 0
        self.observations = 0
        self.skipped_steps = 0
        self.history: list[dict[str, Any]] = []

    @property
    def finished(self) -> bool:
        """Whether the final N:M pattern is in force (then scores are no longer computed)."""
        return self.removed_per_group == self.pattern.m - self.pattern.n

    @property
    def current(self) -> NMPattern | None:
        """The pattern in force (None while nothing is pruned)."""
        kept = self.pattern.m - self.removed_per_group
        return NMPattern(kept, self.pattern.m) if self.removed_per_group else None

    @torch.no_grad()
    def observe(self, loss_scale: float = 1.0) -> bool:
        """Fold the importance from the current LoRA gradients into the moving averages; False if skipped.

        Call once per optimizer step, after the gradients are final and before `optimizer.step()`;
        pass the AMP loss scale if a `GradScaler` has not unscaled them yet.
        """
        if self.finished:
            return False
        new = {}
        for name, layer in self.forward.layers.items():
            lora_a, lora_b = layer.lora_A[self.adapter].weight, layer.lora_B[self.adapter].weight
            if lora_a.grad is None or lora_b.grad is None:
                raise LoraPruneError(f"{name}'s LoRA weights have no gradient: call observe() after backward()")
            importance = element_importance(
                dequantize_module_weight(layer.get_base_layer()),
                lora_a,
                lora_b,
                layer.scaling[self.adapter],
                lora_a.grad.float() / loss_scale,
                lora_b.grad.float() / loss_scale,
                self.config.second_order,
            )
            if not bool(torch.isfinite(importance).all()):
                self.skipped_steps += 1
                logger.warning(
                    "LoRAPrune N:M: non-finite importance in %s at step %d; this step's scores are skipped",
                    name,
                    self.step + 1,
                )
                return False
            new[name] = importance
        decay = self.config.ema
        for name, importance in new.items():
            old = self.scores.get(name)
            # the first observation initialises the average, so early events are not biased towards 0
            self.scores[name] = importance if old is None else old.mul_(decay).add_(importance, alpha=1 - decay)
        self.observations += 1
        return True

    def _due(self, step: int) -> bool:
        if self.finished:
            return False
        return step >= self.schedule.ramp_end or (
            step > self.schedule.warmup_steps and step % self.config.prune_every == 0
        )

    def after_optimizer_step(self) -> dict[str, Any] | None:
        """Count the step and tighten the masks if the schedule says so; returns the event, or None."""
        self.step += 1
        if not self._due(self.step):
            return None
        target = self.schedule.amount(self.step, self.pattern.m - self.pattern.n)
        if target <= self.removed_per_group:
            return None
        if not enough_scoring_steps(
            "LoRAPrune N:M", self.observations, self.config.min_scoring_steps, self.schedule.ramp_end, self.step
        ):
            return None
        keep = self.pattern.m - target
        masks = {
            name: nm_mask(self.scores[name], self.pattern.m, keep, allowed=self.masks[name]) for name in self.modules
        }
        self.masks = masks
        self.forward.update(masks)
        self.removed_per_group = target
        event = {
            "step": self.step,
            "pattern": str(self.current),
            "observations": self.observations,
            "schedule_fraction": self.schedule.fraction(self.step),
        }
        self.history.append(event)
        logger.info("LoRAPrune N:M step %d: %s in force", self.step, event["pattern"])
        if self.finished:
            self.scores = {}
        return event

    def finish(self) -> nn.Module:
        """Merge `mask ⊙ (W0 + s·B·A)` into the base weights and return the plain model (adapter removed)."""
        if not self.finished:
            logger.warning(
                "LoRAPrune N:M: finishing before the %s pattern was reached (%s in force)", self.pattern, self.current
            )
        self.forward.remove()
        return merge_masked(self.model, self.masks, self.adapter)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run: schedule position, element scores, masks, history."""
        return {
            "version": STATE_VERSION,
            "pattern": str(self.pattern),
            "config": dataclasses.asdict(self.config),
            "total_steps": self.schedule.total_steps,
            "modules": list(self.modules),
            "step": self.step,
            "observations": self.observations,
            "skipped_steps": self.skipped_steps,
            "removed_per_group": self.removed_per_group,
            "scores": {name: value.cpu().clone() for name, value in self.scores.items()},
            "masks": {name: mask.cpu().clone() for name, mask in self.masks.items()},
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()` of a run with the same pattern, options, length and modules."""
        expected = {
            "version": STATE_VERSION,
            "pattern": str(self.pattern),
            "config": dataclasses.asdict(self.config),
            "total_steps": self.schedule.total_steps,
            "modules": list(self.modules),
        }
        for name, value in expected.items():
            if state.get(name) != value:
                raise LoraPruneError(
                    f"the saved LoRAPrune N:M state has another {name}; resume with the settings of the interrupted run"
                )
        device = {name: base_linear(self.model, name).weight.device for name in self.modules}
        self.step = state["step"]
        self.observations = state["observations"]
        self.skipped_steps = state["skipped_steps"]
        self.removed_per_group = state["removed_per_group"]
        self.scores = {name: value.to(device[name]) for name, value in state["scores"].items()}
        self.masks = {name: mask.to(device[name]) for name, mask in state["masks"].items()}
        self.forward.update(self.masks)
        self.history = list(state["history"])

    def summary(self) -> dict[str, Any]:
        return {
            "events": list(self.history),
            "observations": self.observations,
            "skipped_steps": self.skipped_steps,
            "reached_target": self.finished,
        }
