"""Data-parallel and sharded runs: one writer, the same decisions on every rank, sharded tensors read whole.

DDP (`torchrun` / `accelerate launch`): every rank holds the whole model. DDP all-reduces the
gradients during the backward pass of the last micro-batch of an optimizer step, so by the
time `transformers.Trainer` calls `on_pre_optimizer_step` every rank holds the same averaged
gradients and the same weights, and the pruners compute the same statistics everywhere.
Their decisions are still broadcast from rank 0 (`broadcast_from_main`), so that floating-point
round-off can never make replicas diverge.

FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and optimizer states are
`DTensor`s sharded along dim 0. Scores are computed on the local shards with DTensor
operations and reduced to whole vectors (`full_tensor`); the LoRA matrices, which are small,
are gathered whole where a computation needs them; in-place edits of a parameter or of its
optimizer state touch only the rows this rank holds (`index_fill_`, `index_copy_`). FSDP1
(`FullyShardedDataParallel`, flattened parameters) is not supported (`check_supported`).

Only the main process writes files (`is_main_process`, then `wait_for_everyone`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import extract_model_from_parallel
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from loraprune.errors import LoraPruneError


def is_distributed() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """True on the process that writes outputs (global rank 0), and in a run without a process group.

    Before any process group exists (`torchrun` started us, but no `Trainer` has run yet) this
    asks accelerate's `PartialState` with the device choice `loraprune.training` makes: a bare
    `PartialState()` on a machine without CUDA would not see the CPU processes as one job.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return PartialState(cpu=not torch.cuda.is_available()).is_main_process


def wait_for_everyone() -> None:
    """Barrier across all processes (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The model inside a DDP / DataParallel / compile wrapper (FSDP2 shards in place and has no wrapper).

    Module paths are then the model's own (no `module.` prefix), the same as in a single process.
    """
    check_supported(model)
    return extract_model_from_parallel(model, keep_fp32_wrapper=True, keep_torch_compile=False)


def check_supported(model: nn.Module) -> None:
    """Raise for FSDP1, whose flattened parameters hide the matrices the pruners read and edit."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        raise LoraPruneError(
            "FSDP1 (FullyShardedDataParallel) is not supported: use FSDP2 (torch.distributed.fsdp.fully_shard; "
            "with transformers.Trainer, fsdp_config={'version': 2}, the default) or DDP"
        )


def is_sharded(tensor: Tensor) -> bool:
    """Whether `tensor` is a DTensor (an FSDP2 parameter, gradient or optimizer state)."""
    return isinstance(tensor, DTensor)


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor on every rank: gathers (or reduces) a DTensor, returns anything else as it is.

    A collective for DTensors: every rank must call it, in the same order.
    """
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_shape_and_offset(tensor: DTensor) -> tuple[list[int], list[int]]:
    """The shape of this rank's shard of `tensor` and where it starts in the whole tensor, per dim.

    Walks the mesh dims in order, as DTensor lays shards out: a `Shard(d)` placement cuts the
    part held so far along `d` into `mesh.size(i)` chunks the way `torch.chunk` does
    (`Shard.local_shard_size_and_offset`), and this rank keeps chunk number `coordinate[i]`;
    `Replicate` and `Partial` keep it whole. A rank outside the mesh holds nothing. Public DTensor
    API only, no communication.
    """
    shape, offset = list(tensor.shape), [0] * tensor.ndim
    coordinate = tensor.device_mesh.get_coordinate()
    if coordinate is None:
        return [0] * tensor.ndim, offset
    for mesh_dim, placement in enumerate(tensor.placements):
        if isinstance(placement, Shard):
            if type(placement) is not Shard:  # strided sharding (FSDP2 combined with tensor parallelism)
                raise LoraPruneError(f"{type(placement).__name__} placements are not supported; use FSDP2 or DDP")
            dim = placement.dim if placement.dim >= 0 else placement.dim + tensor.ndim
            size, start = Shard.local_shard_size_and_offset(
                shape[dim], tensor.device_mesh.size(mesh_dim), coordinate[mesh_dim]
            )
            shape[dim], offset[dim] = int(size), offset[dim] + int(start)
    return shape, offset


def _shard_view(tensor: DTensor, dim: int, index: Tensor) -> tuple[Tensor, Tensor, Tensor, tuple[slice, ...]]:
    """For an in-place edit of `tensor` at the global `index` along `dim`: its local shard, the positions
    in the shard, which entries of `index` they are, and the region of a whole-tensor value the shard
    holds (along the other dims). No communication."""
    shape, offset = local_shape_and_offset(tensor)
    positions = index.to(tensor.device) - offset[dim]
    held = torch.nonzero((positions >= 0) & (positions < shape[dim])).flatten()
    region = [slice(start, start + size) for start, size in zip(offset, shape)]
    region[dim] = slice(None)
    return tensor.to_local(), positions[held], held, tuple(region)


@torch.no_grad()
def index_fill_(tensor: Tensor, dim: int, index: Tensor, value: float) -> None:
    """`tensor.index_fill_(dim, index, value)` with global indices, also on a DTensor (its local shard)."""
    if not isinstance(tensor, DTensor):
        tensor.index_fill_(dim, index.to(tensor.device), value)
        return
    local, positions, _, _ = _shard_view(tensor, dim, index)
    local.index_fill_(dim, positions, value)


@torch.no_grad()
def index_copy_(tensor: Tensor, dim: int, index: Tensor, source: Tensor) -> None:
    """`tensor.index_copy_(dim, index, source)` with global indices and a whole `source`, also on a DTensor
    (each rank writes the part of `source` its shard holds)."""
    if not isinstance(tensor, DTensor):
        tensor.index_copy_(dim, index.to(tensor.device), source.to(tensor.device))
        return
    local, positions, held, region = _shard_view(tensor, dim, index)
    local.index_copy_(dim, positions, source.to(local.device)[region].index_select(dim, held))


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The whole state dict of a (possibly FSDP2-sharded) model, on the CPU of the main process.

    A collective: every rank must call it; ranks other than the main one get an empty dict
    when the model is sharded. Load it into an unsharded copy of the model (same structure,
    same adapter) to shrink it (`ModelPruner.families` / `masks`) or export its adapter
    (`RankPruner.active_components()`).
    """
    if not any(isinstance(param, DTensor) for param in model.parameters()):
        return {key: value.detach().cpu() for key, value in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def broadcast_from_main(tensors: Iterable[Tensor]) -> None:
    """Overwrite `tensors` in place with rank 0's values (no-op without a process group).

    Plain tensors only; they must be on the process group's device (CUDA for NCCL).
    """
    if not is_distributed():
        return
    for tensor in tensors:
        dist.broadcast(tensor, src=0)


def all_reduce_sum(tensors: list[Tensor]) -> list[Tensor]:
    """The sums of `tensors` over all processes (the tensors themselves without a process group).

    For statistics every rank accumulates from its own data (activation-gradient scores);
    they must be on the process group's device (CUDA for NCCL).
    """
    if not is_distributed():
        return tensors
    reduced = [tensor.clone() for tensor in tensors]
    for tensor in reduced:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return reduced


def world_size() -> int:
    """The number of processes of the running process group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1
