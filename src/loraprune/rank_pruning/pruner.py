"""The PrunedLoRA loop as plain functions: observe gradients every step, prune at scheduled steps.

`RankPruner` works in any training loop:

    pruner = RankPruner(peft_model, config, total_steps)
    for step in range(1, total_steps + 1):
        loss.backward()                    # (unscale AMP gradients first if you use a loss scaler)
        pruner.observe_gradients()         # Gram accumulation, pruned gradients zeroed
        optimizer.step()
        pruner.step(step, optimizer)       # prunes when the schedule says so (gradients still present)
        optimizer.zero_grad()

`RankPruningCallback` calls the same two methods from `transformers.Trainer`.

At an event every module's active components are scored by `config.criterion` (`criteria.py`);
the default, PrunedLoRA's own score (design §1.2, `obs.py`), works as follows. The
curvatures `H_B`, `H_A` are the empirical Fisher of the mean loss built from the gradient Gram
matrices since the last event (or of the current batch), on the loss's own scale
(`CurvatureStats`: times the examples per step, divided by the rows sharing the curvature; or
the plain mean Gram with `curvature_scale="gram"`), damped, inverted in one batched Cholesky
per rank. The gradient term uses the mean gradient over the same window. With a held-out
batch (`held_out`) every event also measures its real loss change, and that of a few modules'
removals alone, next to the quadratic model's prediction (`calibration.py`). The chosen
components are removed with the OBS recovery update of the remaining ones on one factor, the
cheaper one per module by default (`compensate`), written back in place; the LoRA scaling
`alpha / r0` is never changed. Pruned slices lose their optimizer moments; the moments of the
compensated components are kept, since they still estimate the gradient statistics of the same
coordinates, which a recovery update moves only slightly.
The other criteria read the mean LoRA gradients of the same window (`taylor`) or the Gram
matrices of the component activations, accumulated by forward hooks from the first step to the
last event (`wanda`, `sparsegpt`; `activations.py`); only `obs` and `sparsegpt` compensate.
Under data parallelism (DDP) every rank sees the same all-reduced gradients (the activation
statistics are summed over ranks) and takes the same decisions; rank 0's result is broadcast
anyway so that round-off cannot make replicas drift.
Under FSDP2 the (small) LoRA matrices and their gradients are gathered whole for the statistics
and the scores, and each rank writes the recovery update into its own shards.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel
from torch import Tensor

from loraprune.distributed import broadcast_from_main, full_tensor, index_copy_, is_sharded, unwrap_parallel
from loraprune.errors import LoraPruneError
from loraprune.rank_pruning.activations import ActivationStats
from loraprune.rank_pruning.basis import singular_basis
from loraprune.rank_pruning.calibration import HeldOutLoss, ModuleCheck
from loraprune.rank_pruning.config import ACTIVATION_CRITERIA, RankPruningConfig
from loraprune.rank_pruning.criteria import CompensatedPlan, ZeroingPlan, sparsegpt_plan, zeroing_plan
from loraprune.rank_pruning.obs import ModuleRemoval, Side, damped_inverse
from loraprune.rank_pruning.schedule import RankSchedule
from loraprune.rank_pruning.state import CurvatureStats, LoraModule, RankMasks, find_lora_modules

logger = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass
class PruningEvent:
    """What one pruning event did."""

    step: int
    removed: dict[str, list[int]]
    predicted_loss_change: float | None  # of the quadratic loss model: obs only, None for the other criteria
    total_rank: int
    window_steps: int
    seconds: float
    compensated: dict[str, str]  # per module: the factor(s) whose remaining components absorbed the removal,
    # "none" for the criteria that only zero
    measured_loss_change: float | None = None  # on the held-out batch (None without one)
    module_checks: list[ModuleCheck] = field(default_factory=list)  # sampled modules' removals measured alone
    curvature_factor: float | None = None  # curvature_scale="measured": the measured / the Fisher curvature
    gradient_factor: float | None = None  # curvature_scale="measured": the measured / the modelled first-order term


def global_removal_counts(scores: Sequence[Tensor], need: int, min_rank: int, normalization: str) -> list[int]:
    """How many components each module loses when the `need` lowest scores over all modules go.

    Scores are optionally divided by their module's L2 norm; no module drops below `min_rank`.
    """
    values, owners = [], []
    for index, module_scores in enumerate(scores):
        if normalization == "l2":
            module_scores = module_scores / module_scores.norm().clamp_min(torch.finfo(module_scores.dtype).tiny)
        allowed = torch.sort(module_scores).values[: max(module_scores.numel() - min_rank, 0)]
        values.append(allowed)
        owners.append(torch.full_like(allowed, index, dtype=torch.long))
    values_all, owners_all = torch.cat(values), torch.cat(owners)
    if need > values_all.numel():
        raise LoraPruneError(f"cannot remove {need} components with min_rank={min_rank}")
    chosen = owners_all[torch.argsort(values_all, stable=True)[:need]]
    return torch.bincount(chosen, minlength=len(scores)).tolist()


@contextmanager
def single_threaded(device: torch.device) -> Iterator[None]:
    """Run CPU work on one thread: the pruning bookkeeping is many small `r0`-wide matrix products,
    which gain nothing from several threads and become an order of magnitude slower when the
    cores are shared with other processes (threads wait on each other). No-op off the CPU."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class RankPruner:
    """Scores, removes and masks rank components of a PEFT LoRA adapter created at rank `config.r0`."""

    def __init__(
        self,
        model: PeftModel,
        config: RankPruningConfig,
        total_steps: int,
        adapter: str = "default",
        examples_per_step: int = 1,
        held_out: HeldOutLoss | None = None,
    ) -> None:
        """`examples_per_step`: the examples whose mean loss each optimizer step's gradient is (all
        micro-batches and processes together; it scales the `fisher` curvature). `held_out`: the loss
        on a held-out batch, measured around every event to check the quadratic model (optional)."""
        if examples_per_step < 1:
            raise LoraPruneError(f"examples_per_step must be >= 1, got {examples_per_step}")
        self.config = config
        self.examples_per_step = examples_per_step
        self.held_out = held_out
        self.modules: list[LoraModule] = find_lora_modules(unwrap_parallel(model), adapter)
        expected_scaling = config.lora_alpha / config.r0
        for module in self.modules:
            rank, scaling = module.layer.r[adapter], module.layer.scaling[adapter]
            if rank != config.r0 or abs(scaling - expected_scaling) > 1e-12 * expected_scaling:
                raise LoraPruneError(
                    f"{module.name} has rank {rank} and scaling {scaling}, but the pruning config expects rank "
                    f"{config.r0} and scaling alpha/r0 = {expected_scaling}; create the adapter with "
                    f"add_lora(model, r={config.r0}, alpha={config.lora_alpha})"
                )
        self.masks = RankMasks(self.modules, config.r0)
        self.stats = CurvatureStats(
            self.modules,
            config.r0,
            keep_gradients=(config.criterion == "obs" and config.use_gradient) or config.criterion == "taylor",
            keep_grams=config.criterion == "obs",
        )
        self.activations = ActivationStats(self.modules, config.r0) if config.criterion in ACTIVATION_CRITERIA else None
        if config.schedule == "per_module":
            self.schedule = RankSchedule.paper(
                total_steps,
                config.r0,
                config.rank,
                config.prune_every,
                config.per_event,
                config.warmup,
                config.cooldown,
            )
        else:
            self.schedule = RankSchedule.cubic(
                total_steps,
                len(self.modules) * (config.r0 - config.rank),
                config.prune_every,
                config.warmup,
                config.cooldown,
            )
        self.history: list[PruningEvent] = []
        self.skipped_steps = 0

    # ---- every step -------------------------------------------------------------------------

    def observe_gradients(self) -> None:
        """Zero pruned gradient slices and add the current gradients to the curvature statistics.

        Call once per optimizer step, after the gradients are final (accumulated, all-reduced,
        unscaled) and before `optimizer.step()`. With `curvature="batch"` the statistics are
        only computed at pruning steps (in `step`, from the gradients still present). The input
        statistics of `wanda` / `sparsegpt`, gathered by hooks during this step's forward passes,
        are committed here (for `curvature="batch"` they replace the window).
        """
        with single_threaded(self.masks.active.device):
            self.masks.zero_gradients()
            if self.config.curvature == "window":
                self._accumulate()
            if self.activations is not None and not self.activations.commit(replace=self.config.curvature == "batch"):
                logger.warning("non-finite LoRA activations: this step is left out of the input statistics")

    def _accumulate(self) -> None:
        if not self.stats.accumulate():
            self.skipped_steps += 1
            logger.warning("non-finite LoRA gradients: this step is left out of the curvature statistics")

    def step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> PruningEvent | None:
        """Prune if optimizer step `step` (1-based, just completed) is a pruning event."""
        target = self.schedule.removed_after(step)
        if target is None:
            return None
        with single_threaded(self.masks.active.device):
            if self.config.curvature == "batch":  # the gradients of this step, not yet zeroed
                self.stats.reset()
                self._accumulate()
            event = self._prune(step, target, optimizer)
        if self.finished and self.activations is not None:
            self.activations.remove_hooks()  # no event left that needs the inputs
        return event

    def _prune(self, step: int, target: int, optimizer: torch.optim.Optimizer | None) -> PruningEvent:
        """Score, select and remove components until `target` are gone (per module or in total)."""
        start = time.perf_counter()
        if self.config.basis == "singular":
            self._rotate_to_singular_basis(optimizer)
        removals = self._plan_removals(target, self._plans())
        before = None if self.held_out is None else self.held_out()
        factor = gradient_factor = None
        if self.config.curvature_scale == "measured" and before is not None and removals:
            factor, gradient_factor = self._measured_scales(removals, before)
            removals = self._plan_removals(target, self._plans(factor, gradient_factor))
        predicted = None if self.config.criterion != "obs" else sum(float(r.loss_change) for r in removals.values())
        checks = [] if before is None or predicted is None else self._check_modules(step, removals, before)
        removed: dict[str, list[int]] = {}
        compensated: dict[str, str] = {}
        for index, removal in removals.items():
            name = self.modules[index].name
            removed[name] = self._remove(index, removal, optimizer).tolist()
            compensated[name] = removal.compensated
        self._broadcast()
        event = PruningEvent(
            step,
            removed,
            predicted,
            sum(self.masks.ranks()),
            self.stats.count,
            time.perf_counter() - start,
            compensated,
            None if before is None else self.held_out() - before,
            checks,
            factor,
            gradient_factor,
        )
        self.history.append(event)
        self.stats.reset()
        if self.activations is not None:
            self.activations.reset()
        logger.log(
            logging.INFO if removed else logging.DEBUG,
            "step %d: pruned %d components (%s), total rank %d, predicted loss change %s, measured %s (%.2fs)",
            step,
            sum(len(v) for v in removed.values()),
            self.config.criterion,
            event.total_rank,
            "-" if predicted is None else f"{predicted:.4g}",
            "-" if event.measured_loss_change is None else f"{event.measured_loss_change:.4g}",
            event.seconds,
        )
        return event

    # ---- scoring and removal ----------------------------------------------------------------

    def _plan_removals(
        self, target: int, plans: list[CompensatedPlan | ZeroingPlan | None]
    ) -> dict[int, ModuleRemoval]:
        """The removal of every module that loses components at this event (by module index)."""
        ranks = self.masks.ranks()
        if self.schedule.per_module:
            counts = [max(0, target - (self.config.r0 - rank)) for rank in ranks]
        else:
            empty = torch.zeros(0, device=self.masks.active.device)  # modules at rank 0
            scores = [empty if plan is None else plan.scores for plan in plans]
            need = target - sum(self.config.r0 - rank for rank in ranks)
            counts = global_removal_counts(scores, max(need, 0), self.config.min_rank, self.config.normalization)
        return {index: plans[index].remove(count) for index, count in enumerate(counts) if count > 0}

    @contextmanager
    def _weights_restored(self, indices: Iterable[int]) -> Iterator[dict[int, tuple[Tensor, Tensor]]]:
        """Copies of the LoRA weights `(A, B)` of modules `indices`, written back on leaving: for the
        held-out probes that try a removal and take it back."""
        saved = {i: (self.modules[i].lora_a.detach().clone(), self.modules[i].lora_b.detach().clone()) for i in indices}
        try:
            yield saved
        finally:
            with torch.no_grad():
                for index, (lora_a, lora_b) in saved.items():
                    self.modules[index].lora_a.copy_(lora_a)
                    self.modules[index].lora_b.copy_(lora_b)

    @torch.no_grad()
    def _measured_scales(self, removals: dict[int, ModuleRemoval], before: float) -> tuple[float, float]:
        """`(curvature factor, gradient factor)`: how the held-out loss along the planned removal compares
        with the quadratic model's two terms.

        The removal `Δ` of the compensating factors is applied forwards and backwards (`θ ± Δ`, the
        other factor as it is): `(L(θ+Δ) + L(θ−Δ) − 2·L(θ)) / 2` is the curvature term along `Δ`,
        compared with the model's `Σ ½·Δ·H·Δᵀ`, and `(L(θ+Δ) − L(θ−Δ)) / 2` the first-order term,
        compared with `Σ g·Δ` (the window's mean training gradient). A factor whose measurement or
        model is not positive says nothing about the scale: the curvature factor falls back to 1 (with
        a warning); the gradient factor is floored at 0 (a gradient term of the wrong sign is dropped).
        """
        with self._weights_restored(removals) as saved:
            for index, removal in removals.items():
                self._write(index, removal)
            plus = self.held_out()
            for index, removal in removals.items():
                module, (old_a, old_b) = self.modules[index], saved[index]
                new_a, new_b = module.lora_a.detach().clone(), module.lora_b.detach().clone()
                sides = "ab" if removal.compensated == "both" else removal.compensated
                module.lora_a.copy_(2 * old_a - new_a if "a" in sides else old_a)
                module.lora_b.copy_(2 * old_b - new_b if "b" in sides else old_b)
            minus = self.held_out()
        curvature, first_order = (plus + minus - 2 * before) / 2, (plus - minus) / 2
        linear = sum(float(r.linear_change) for r in removals.values())
        quadratic = sum(float(r.loss_change) for r in removals.values()) - linear
        gradient_factor = 1.0 if linear == 0 else max(first_order / linear, 0.0)
        if not (curvature > 0 and quadratic > 0 and math.isfinite(curvature / quadratic)):
            logger.warning(
                "the held-out loss is not convex along this event's removal (measured curvature term %.3g, "
                "modelled %.3g): the Fisher curvature is used as it is",
                curvature,
                quadratic,
            )
            return 1.0, gradient_factor
        return curvature / quadratic, gradient_factor

    def _plans(
        self, curvature_factor: float = 1.0, gradient_factor: float = 1.0
    ) -> list[CompensatedPlan | ZeroingPlan | None]:
        """Every module's scores and removal under `config.criterion`, over its active components (None at rank 0).

        `curvature_factor` and `gradient_factor` multiply the obs curvature and gradient term
        (`curvature_scale="measured"`).

        Gradients and curvatures are the means over the statistics window. The `(n, k)` products
        run in float32, which is ample for ranking components and compensating them.
        """
        criterion = self.config.criterion
        count = max(self.stats.count, 1)
        if self.stats.count == 0 and criterion in ("obs", "taylor"):
            if not self.config.allow_magnitude_fallback:
                raise LoraPruneError(
                    f"PrunedLoRA: no step since the last pruning event gave finite gradients, so the {criterion} "
                    "score has no evidence (the training diverged: lower --learning-rate); "
                    "--allow-magnitude-fallback scores such events by magnitude instead"
                )
            logger.warning("pruning without gradient statistics: the score falls back to magnitude")
        hinv_b: list[Tensor | None] = [None] * len(self.modules)
        hinv_a: list[Tensor | None] = [None] * len(self.modules)
        grams_z = self._input_grams() if criterion in ACTIVATION_CRITERIA else None
        if criterion == "obs":
            form = "fisher" if self.config.curvature_scale == "measured" else self.config.curvature_scale
            examples = self.examples_per_step
            divisors_b = self.stats.divisors("b", form, examples) / curvature_factor
            divisors_a = self.stats.divisors("a", form, examples) / curvature_factor
            hinv_b = self._inverses(self.stats.gram_b, divisors_b)
            hinv_a = self._inverses(self.stats.gram_a, divisors_a)
        elif criterion == "sparsegpt":
            hinv_b = self._inverses(grams_z)
        sequential = self.config.removal == "sequential"
        plans: list[CompensatedPlan | ZeroingPlan | None] = []
        for index, module in enumerate(self.modules):
            active = self.masks.active_indices(index)
            if active.numel() == 0:
                plans.append(None)
                continue
            weight_b = full_tensor(module.lora_b.detach()).float().index_select(1, active)
            weight_a = full_tensor(module.lora_a.detach()).float().index_select(0, active).T
            grads = None
            if self.stats.keep_gradients and self.stats.count:
                grads = (
                    self.stats.grad_b[index].index_select(1, active) * (gradient_factor / count),
                    self.stats.grad_a[index].index_select(0, active).T * (gradient_factor / count),
                )
            if criterion == "obs":
                grad_b, grad_a = grads if grads is not None else (None, None)
                sides = (Side(weight_b, grad_b, hinv_b[index]), Side(weight_a, grad_a, hinv_a[index]))
                plans.append(CompensatedPlan(sides, self.config.compensate, sequential))
            elif criterion == "sparsegpt":
                plans.append(sparsegpt_plan(weight_b, weight_a, hinv_b[index], sequential))
            else:
                gram_z = None if grams_z is None else grams_z[index][active][:, active]
                plans.append(zeroing_plan(criterion, weight_b, weight_a, grads, gram_z))
        return plans

    @torch.no_grad()
    def _rotate_to_singular_basis(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Re-express every module's active components in the singular basis of its update (`basis.py`),
        with the window's gradient statistics and the optimizer's moments of those components."""
        for index, module in enumerate(self.modules):
            active = self.masks.active_indices(index)
            if active.numel() < 2:
                continue
            weight_b = full_tensor(module.lora_b.detach()).float().index_select(1, active)
            weight_a = full_tensor(module.lora_a.detach()).float().index_select(0, active)
            if not (torch.isfinite(weight_b).all() and torch.isfinite(weight_a).all()):
                raise LoraPruneError(
                    f"PrunedLoRA: {module.name} has non-finite LoRA factors at this pruning event, so it has no "
                    "singular basis (the training diverged: lower --learning-rate)"
                )
            change = singular_basis(weight_b, weight_a, row_norm=float(weight_a.square().sum(1).mean().sqrt()))
            index_copy_(module.lora_b, 1, active, change.weight_b.to(module.lora_b.dtype))
            index_copy_(module.lora_a, 0, active, change.weight_a.to(module.lora_a.dtype))
            self.stats.rotate(index, active, change)
            sides = (
                (module.lora_b, 1, change.gradient_b, change.second_moment_b),
                (module.lora_a, 0, change.gradient_a, change.second_moment_a),
            )
            for param, dim, first, second in sides:
                state = optimizer.state.get(param, {}) if optimizer is not None else {}
                for key, value in state.items():
                    if isinstance(value, Tensor) and value.shape == param.shape:
                        moment = full_tensor(value).index_select(dim, active)
                        index_copy_(value, dim, active, second(moment) if key == "exp_avg_sq" else first(moment))

    def _inverses(self, grams: Tensor, divisors: Tensor | None = None) -> list[Tensor | None]:
        """`(H + λI)⁻¹` over the active components of every module (None at rank 0), `H = grams / divisors`
        (one divisor per module, `CurvatureStats.divisors`; none: `grams` as they are) from `(m, r0, r0)`
        Gram sums: one batched float64 Cholesky per distinct rank (they can be ill-conditioned)."""
        ranks = self.masks.ranks()
        out: list[Tensor | None] = [None] * len(self.modules)
        for rank in sorted(set(ranks) - {0}):
            members = [i for i, r in enumerate(ranks) if r == rank]
            indices = torch.stack([self.masks.active_indices(i) for i in members])  # (m, rank)
            selected = grams[members].double()
            if divisors is not None:
                selected = selected / divisors[members, None, None]
            selected = torch.gather(selected, 1, indices[:, :, None].expand(-1, -1, selected.shape[2]))
            selected = torch.gather(selected, 2, indices[:, None, :].expand(-1, rank, -1))
            for position, hinv in zip(members, damped_inverse(selected, self.config.damping).float()):
                out[position] = hinv
        return out

    def _input_grams(self) -> Tensor:
        """Mean `E[z·zᵀ]` (`z = A·x`) of every module over the window, `(m, r0, r0)`.

        A module that saw no input since the last event (or only non-finite ones) gets `A·Aᵀ`, the
        Gram of white inputs: wanda then scores by magnitude and sparsegpt minimises `‖ΔB·A‖_F`.
        """
        grams, seen = self.activations.means()
        missing = torch.nonzero(~seen).flatten().tolist()
        if missing:
            logger.warning(
                "%d LoRA modules saw no input since the last pruning event: white inputs assumed", len(missing)
            )
        for index in missing:
            lora_a = full_tensor(self.modules[index].lora_a.detach()).float()
            grams[index] = lora_a @ lora_a.T
        return grams

    @torch.no_grad()
    def _write(self, index: int, removal: ModuleRemoval) -> Tensor:
        """Write `removal`'s weights into module `index`'s active components; returns those indices among the `r0`."""
        active = self.masks.active_indices(index)
        module = self.modules[index]
        index_copy_(module.lora_b, 1, active, removal.weight_b.to(module.lora_b.dtype))
        index_copy_(module.lora_a, 0, active, removal.weight_a.T.to(module.lora_a.dtype))
        return active

    @torch.no_grad()
    def _remove(self, index: int, removal: ModuleRemoval, optimizer: torch.optim.Optimizer | None) -> Tensor:
        """Apply `removal` to module `index` in place (weights, masks, moments); returns the removed components
        (indices among the `r0`)."""
        components = self._write(index, removal)[removal.positions]
        self.masks.prune(index, components, optimizer)
        return components

    @torch.no_grad()
    def _check_modules(self, step: int, removals: dict[int, ModuleRemoval], before: float) -> list[ModuleCheck]:
        """Measure the removals of up to `config.calibration_modules` modules alone on the held-out batch.

        The modules are drawn at random (seeded by the step, so every process draws the same); each
        one's removal is written, measured, and its weights put back before the next.
        """
        candidates = sorted(removals)
        generator = torch.Generator().manual_seed(step)
        order = torch.randperm(len(candidates), generator=generator)[: self.config.calibration_modules]
        checks = []
        for index in sorted(candidates[i] for i in order.tolist()):
            module, removal = self.modules[index], removals[index]
            with self._weights_restored([index]):
                self._write(index, removal)
                measured = self.held_out() - before
            checks.append(ModuleCheck(module.name, float(removal.loss_change), float(removal.linear_change), measured))
        return checks

    def _broadcast(self) -> None:
        """Make every data-parallel replica hold rank 0's masks and LoRA weights (FSDP shards stay each rank's)."""
        replicated = [
            param.data for module in self.modules for param in (module.lora_a, module.lora_b) if not is_sharded(param)
        ]
        broadcast_from_main([self.masks.active, *replicated])

    # ---- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run besides the LoRA weights and the optimizer (which the
        Trainer checkpoints): masks, the statistics window, the history."""
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "config": dataclasses.asdict(self.config),
            "events": list(self.schedule.events),
            "active": self.masks.active.cpu().clone(),
            "gram_a": self.stats.gram_a.cpu().clone(),
            "gram_b": self.stats.gram_b.cpu().clone(),
            "grad_a": [g.cpu().clone() for g in self.stats.grad_a],
            "grad_b": [g.cpu().clone() for g in self.stats.grad_b],
            "count": self.stats.count,
            "skipped_steps": self.skipped_steps,
            "history": [dataclasses.asdict(event) for event in self.history],
        }
        if self.activations is not None:
            state["activation_gram"] = self.activations.gram.cpu().clone()
            state["activation_rows"] = self.activations.rows.cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()` of a run with the same options and length."""
        config = dataclasses.asdict(self.config)
        config["target_modules"] = list(config["target_modules"])
        saved = dict(state.get("config", {}))
        saved["target_modules"] = list(saved.get("target_modules", ()))
        if state.get("version") != STATE_VERSION or saved != config or state["events"] != list(self.schedule.events):
            raise LoraPruneError(
                "the saved PrunedLoRA state belongs to a run with other options or steps; resume with the "
                "settings of the interrupted run"
            )
        if state["active"].shape != self.masks.active.shape:
            raise LoraPruneError("the saved PrunedLoRA masks do not match this adapter's modules")
        device = self.masks.active.device
        self.masks.active.copy_(state["active"].to(device))
        self.stats.gram_a.copy_(state["gram_a"].to(device))
        self.stats.gram_b.copy_(state["gram_b"].to(device))
        self.stats.grad_a = [g.to(device) for g in state["grad_a"]]
        self.stats.grad_b = [g.to(device) for g in state["grad_b"]]
        self.stats.count = state["count"]
        self.skipped_steps = state["skipped_steps"]
        self.history = [PruningEvent(**event) for event in state["history"]]
        if self.activations is not None:
            self.activations.gram.copy_(state["activation_gram"].to(device))
            self.activations.rows.copy_(state["activation_rows"].to(device))
            if self.finished:
                self.activations.remove_hooks()

    # ---- results ----------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """True once the last scheduled event has run (the final budget is in force)."""
        return bool(self.history) and self.history[-1].step >= self.schedule.events[-1]

    def ranks(self) -> dict[str, int]:
        """Current rank of every module, by module path."""
        return {module.name: rank for module, rank in zip(self.modules, self.masks.ranks())}

    def active_components(self) -> dict[str, Tensor]:
        """Boolean mask of the active components of every module (on the CPU), by module path."""
        return {module.name: self.masks.active[i].cpu() for i, module in enumerate(self.modules)}
