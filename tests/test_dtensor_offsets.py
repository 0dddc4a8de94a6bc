"""`local_shape_and_offset`: where a rank's shard of a DTensor lies, from the public DTensor API only.

A stand-in carries what the function reads (shape, mesh coordinate and sizes, placements), so every
rank of a 2-D mesh can be checked in one process against `torch.chunk`, which is how DTensor cuts
shards (uneven sizes included).
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from loraprune.distributed import local_shape_and_offset
from loraprune.errors import LoraPruneError


class FakeMesh:
    def __init__(self, sizes: tuple[int, ...], coordinate: tuple[int, ...] | None) -> None:
        self.sizes, self.coordinate = sizes, coordinate

    def get_coordinate(self):
        return None if self.coordinate is None else list(self.coordinate)

    def size(self, dim: int) -> int:
        return self.sizes[dim]


def _fake(shape, sizes, coordinate, placements):
    return SimpleNamespace(
        shape=torch.Size(shape), ndim=len(shape), device_mesh=FakeMesh(sizes, coordinate), placements=placements
    )


def _chunked(whole: torch.Tensor, sizes, coordinate, placements) -> torch.Tensor:
    """This rank's shard cut the way DTensor does: mesh dim by mesh dim, with `torch.chunk`."""
    part = whole
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Shard):
            chunks = torch.chunk(part, sizes[mesh_dim], dim=placement.dim)
            index = coordinate[mesh_dim]
            part = chunks[index] if index < len(chunks) else part.narrow(placement.dim, 0, 0)
    return part


@pytest.mark.parametrize(
    ("shape", "sizes", "placements"),
    [
        ((10, 7), (4,), (Shard(0),)),  # uneven: 3, 3, 3, 1
        ((5, 3), (4,), (Shard(0),)),  # uneven with an empty last shard
        ((10, 7), (2, 3), (Shard(0), Shard(1))),
        ((11, 6), (2, 3), (Shard(0), Shard(0))),  # the same dim sharded twice
        ((9, 4), (2, 2), (Replicate(), Shard(-2))),  # HSDP: replicated across, sharded within
    ],
)
def test_shards_tile_the_tensor_as_torch_chunk_cuts_it(shape, sizes, placements):
    whole = torch.arange(torch.Size(shape).numel()).view(shape)
    for coordinate in itertools.product(*(range(size) for size in sizes)):
        local, offset = local_shape_and_offset(_fake(shape, sizes, coordinate, placements))
        expected = _chunked(whole, sizes, coordinate, placements)
        assert list(expected.shape) == local, (coordinate, local)
        region = tuple(slice(start, start + size) for start, size in zip(offset, local))
        assert torch.equal(whole[region], expected), (coordinate, offset)


def test_a_rank_outside_the_mesh_holds_nothing():
    assert local_shape_and_offset(_fake((4, 4), (2,), None, (Shard(0),))) == ([0, 0], [0, 0])


def test_strided_shards_are_refused():
    class _StridedShard(Shard):  # what FSDP2 combined with tensor parallelism lays out
        pass

    with pytest.raises(LoraPruneError, match="_StridedShard placements are not supported"):
        local_shape_and_offset(_fake((4, 4), (2,), (0,), (_StridedShard(0),)))
