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

At an event every module's active components are scored (design §1.2, `obs.py`): the
curvatures `H_B`, `H_A` are the mean gradient Gram matrices since the last event (or the
current batch), damped, inverted in one batched Cholesky per rank. The gradient term uses
the mean gradient over the same window. The chosen components are removed with the OBS
recovery update of the remaining ones (and optionally the Newton step) on one factor, the
cheaper one per module by default (`compensate`), written back in place; the LoRA scaling
`alpha / r0` is never changed. Pruned slices lose their optimizer
moments; the moments of the compensated components are kept, since they still estimate the
gradient statistics of the same coordinates, which a recovery update moves only slightly.
Under data parallelism (DDP) every rank sees the same all-reduced gradients and takes the same
decisions; rank 0's result is broadcast anyway so that round-off cannot make replicas drift.
Under FSDP2 the (small) LoRA matrices and their gradients are gathered whole for the statistics
and the scores, and each rank writes the recovery update into its own shards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import Tensor

from loraprune.distributed import broadcast_from_main, full_tensor, index_copy_, is_sharded, unwrap_parallel
from loraprune.errors import LoraPruneError
from loraprune.rank_pruning.config import RankPruningConfig
from loraprune.rank_pruning.obs import Side, damped_inverse, ranking_scores, removal_scores, remove_components
from loraprune.rank_pruning.schedule import RankSchedule
from loraprune.rank_pruning.state import CurvatureStats, LoraModule, RankMasks, find_lora_modules

logger = logging.getLogger(__name__)


@dataclass
class PruningEvent:
    """What one pruning event did."""

    step: int
    removed: dict[str, list[int]]
    predicted_loss_change: float
    total_rank: int
    window_steps: int
    seconds: float
    compensated: dict[str, str]  # per module: the factor(s) whose remaining components absorbed the removal


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

    def __init__(self, model: PeftModel, config: RankPruningConfig, total_steps: int,
                 adapter: str = "default") -> None:
        self.config = config
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
        self.stats = CurvatureStats(self.modules, config.r0, keep_gradients=config.use_gradient)
        if config.schedule == "per_module":
            self.schedule = RankSchedule.paper(total_steps, config.r0, config.rank, config.prune_every,
                                               config.per_event, config.warmup, config.cooldown)
        else:
            self.schedule = RankSchedule.cubic(total_steps, len(self.modules) * (config.r0 - config.rank),
                                               config.prune_every, config.warmup, config.cooldown)
        self.history: list[PruningEvent] = []
        self.skipped_steps = 0

    # ---- every step -------------------------------------------------------------------------

    def observe_gradients(self) -> None:
        """Zero pruned gradient slices and add the current gradients to the curvature statistics.

        Call once per optimizer step, after the gradients are final (accumulated, all-reduced,
        unscaled) and before `optimizer.step()`. With `curvature="batch"` the statistics are
        only computed at pruning steps (in `step`, from the gradients still present).
        """
        with single_threaded(self.masks.active.device):
            self.masks.zero_gradients()
            if self.config.curvature == "window":
                self._accumulate()

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
            return self._prune(step, target, optimizer)

    def _prune(self, step: int, target: int, optimizer: torch.optim.Optimizer | None) -> PruningEvent:
        """Score, select and remove components until `target` are gone (per module or in total)."""
        start = time.perf_counter()
        ranks = self.masks.ranks()
        sides = self._sides()
        side_scores = [None if pair is None else
                       tuple(removal_scores(side, self.config.newton_step) for side in pair) for pair in sides]
        empty = torch.zeros(0, device=self.masks.active.device)  # modules at rank 0
        scores = [empty if pair is None else ranking_scores(pair, self.config.compensate) for pair in side_scores]
        if self.schedule.per_module:
            counts = [max(0, target - (self.config.r0 - rank)) for rank in ranks]
        else:
            need = target - sum(self.config.r0 - rank for rank in ranks)
            counts = global_removal_counts(scores, max(need, 0), self.config.min_rank, self.config.normalization)
        removed: dict[str, list[int]] = {}
        compensated: dict[str, str] = {}
        predicted = 0.0
        for index, count in enumerate(counts):
            if count > 0:
                name = self.modules[index].name
                components, loss, compensated[name] = self._remove(index, sides[index], side_scores[index], count,
                                                                   optimizer)
                removed[name] = components.tolist()
                predicted += float(loss)
        self._broadcast()
        event = PruningEvent(step, removed, predicted, sum(self.masks.ranks()), self.stats.count,
                             time.perf_counter() - start, compensated)
        self.history.append(event)
        self.stats.reset()
        logger.log(logging.INFO if removed else logging.DEBUG,
                   "step %d: pruned %d components, total rank %d, predicted loss change %.4g (%.2fs)",
                   step, sum(len(v) for v in removed.values()), event.total_rank, predicted, event.seconds)
        return event

    # ---- scoring and removal ----------------------------------------------------------------

    def _sides(self) -> list[tuple[Side, Side] | None]:
        """The quadratic models (B side, A side) of every module over its active components (None at rank 0).

        Curvatures are inverted in float64 (they can be ill-conditioned); the `(n, k)` products
        run in float32, which is ample for ranking components and compensating them.
        """
        count = max(self.stats.count, 1)
        if self.stats.count == 0:
            logger.warning("pruning without gradient statistics: the score falls back to magnitude")
        ranks = self.masks.ranks()
        hinv_b: list[Tensor | None] = [None] * len(self.modules)
        hinv_a: list[Tensor | None] = [None] * len(self.modules)
        for rank in sorted(set(ranks) - {0}):  # one batched inverse per distinct rank
            members = [i for i, r in enumerate(ranks) if r == rank]
            indices = torch.stack([self.masks.active_indices(i) for i in members])  # (m, rank)
            for grams, out in ((self.stats.gram_b, hinv_b), (self.stats.gram_a, hinv_a)):
                selected = grams[members].double() / count
                selected = torch.gather(selected, 1, indices[:, :, None].expand(-1, -1, selected.shape[2]))
                selected = torch.gather(selected, 2, indices[:, None, :].expand(-1, rank, -1))
                for position, hinv in zip(members, damped_inverse(selected, self.config.damping).float()):
                    out[position] = hinv
        sides: list[tuple[Side, Side] | None] = []
        for index, module in enumerate(self.modules):
            active = self.masks.active_indices(index)
            if active.numel() == 0:
                sides.append(None)
                continue
            weight_b = full_tensor(module.lora_b.detach()).float().index_select(1, active)
            weight_a = full_tensor(module.lora_a.detach()).float().index_select(0, active).T
            grad_b = grad_a = None
            if self.config.use_gradient and self.stats.count:
                grad_b = self.stats.grad_b[index].index_select(1, active) / count
                grad_a = self.stats.grad_a[index].index_select(0, active).T / count
            sides.append((Side(weight_b, grad_b, hinv_b[index]), Side(weight_a, grad_a, hinv_a[index])))
        return sides

    @torch.no_grad()
    def _remove(self, index: int, sides: tuple[Side, Side], side_scores: tuple[Tensor, Tensor], count: int,
                optimizer: torch.optim.Optimizer | None) -> tuple[Tensor, Tensor, str]:
        """Remove `count` components of module `index` with the recovery update, in place.

        Returns the removed components, the predicted loss change and which factor compensated.
        """
        removal = remove_components(sides, side_scores, count, self.config.compensate,
                                    self.config.removal == "sequential", self.config.newton_step)
        active = self.masks.active_indices(index)
        module = self.modules[index]
        index_copy_(module.lora_b, 1, active, removal.weight_b.to(module.lora_b.dtype))
        index_copy_(module.lora_a, 0, active, removal.weight_a.T.to(module.lora_a.dtype))
        components = active[removal.positions]
        self.masks.prune(index, components, optimizer)
        return components, removal.loss_change, removal.compensated

    def _broadcast(self) -> None:
        """Make every data-parallel replica hold rank 0's masks and LoRA weights (FSDP shards stay each rank's)."""
        replicated = [param.data for module in self.modules for param in (module.lora_a, module.lora_b)
                      if not is_sharded(param)]
        broadcast_from_main([self.masks.active, *replicated])

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
