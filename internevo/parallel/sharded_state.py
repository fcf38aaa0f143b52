"""What one rank owns of a parameter's optimizer state, as a DCP ``ShardedTensor`` with global
offsets, so that a checkpoint holds every element once and no rank gathers anything.

A rank owns a contiguous range of the row-major elements of its (tensor-parallel-local) shard of
each parameter: its ZeRO-1.5 slice of the parameter's bucket, or FSDP2's dim-0 chunk.
:func:`flat_boxes` cuts such a range into at most ``2·ndim − 1`` boxes (offsets, sizes), each
contiguous in memory, so each box is a *view* of the rank's flat master or moment: DCP writes the
boxes of every rank (dedupe removes replicas) and, on load, fills them in place from whatever
chunks another layout wrote (global offsets make any layout readable by any other).

Coordinates: the checkpoint shape of the parameter (its global shape, or the model spec's
``checkpoint_shape``, e.g. InternLM v1's ``Wqkv`` as ``[3, H·d, h]``).  When the shard is a dim-0
chunk of the global tensor (no split, or a split of dim 0), the owned range is a range of the
global row-major order and may be cut in the checkpoint shape; otherwise (a split of a later dim)
the boxes are cut in the shard's own shape and shifted by its offset.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import (
    ShardedTensorMetadata,
    TensorProperties,
)

# DCP still reads and writes ShardedTensor; DTensor cannot hold a ZeRO slice (not one box)
warnings.filterwarnings("ignore", message="Please use DTensor instead and we are deprecating "
                        "ShardedTensor", category=FutureWarning)

Box = tuple[tuple[int, ...], tuple[int, ...]]


def flat_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[Box]:
    """Row-major elements ``[start, stop)`` of a ``shape`` tensor as boxes ``(offsets, sizes)``,
    in order, each contiguous in row-major order."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,), (stop - start,))]
    inner = math.prod(shape[1:])
    boxes: list[Box] = []
    row, within = divmod(start, inner)
    if within:  # the head: part of one row
        end = min(stop, (row + 1) * inner)
        boxes += _in_row(shape, row, within, end - row * inner)
        start, row = end, row + 1
    full = (stop - start) // inner
    if full:
        boxes.append(((row,) + (0,) * (len(shape) - 1), (full, *shape[1:])))
        start, row = start + full * inner, row + full
    if start < stop:  # the tail: the start of one row
        boxes += _in_row(shape, row, 0, stop - start)
    return boxes


def _in_row(shape: tuple[int, ...], row: int, start: int, stop: int) -> list[Box]:
    return [((row, *o), (1, *s)) for o, s in flat_boxes(shape[1:], start, stop)]


@dataclass(frozen=True)
class ChunkGeometry:
    """Where a rank's (tensor-parallel-local) shard of one parameter sits in the checkpoint."""

    shape: tuple[int, ...]
    """The checkpoint shape (global)."""
    local_shape: tuple[int, ...]
    """The shard's shape (in ``shape``'s coordinates when ``flat_start`` is None)."""
    offset: tuple[int, ...]
    """The shard's offset in ``shape`` (used when ``flat_start`` is None)."""
    flat_start: Optional[int]
    """The shard's first element in the global row-major order, when it is a dim-0 chunk."""

    def boxes(self, start: int, stop: int) -> list[Box]:
        """Boxes (global offsets) of the shard's row-major elements ``[start, stop)``."""
        if self.flat_start is not None:
            return flat_boxes(self.shape, self.flat_start + start, self.flat_start + stop)
        return [(tuple(o + d for o, d in zip(off, self.offset)), size)
                for off, size in flat_boxes(self.local_shape, start, stop)]


def chunk_geometry(name: str, global_shape: tuple[int, ...], local_shape: tuple[int, ...],
                   offset: tuple[int, ...], checkpoint_shape: Optional[tuple[int, ...]]
                   ) -> ChunkGeometry:
    """The geometry of a shard ``local_shape`` at ``offset`` of a ``global_shape`` parameter
    saved as ``checkpoint_shape`` (None: its own shape)."""
    shape = tuple(checkpoint_shape or global_shape)
    if tuple(local_shape[1:]) == tuple(global_shape[1:]):
        start = offset[0] * math.prod(global_shape[1:]) if global_shape else 0
        return ChunkGeometry(shape, tuple(local_shape), tuple(offset), start)
    if shape != tuple(global_shape):
        raise NotImplementedError(f"{name}: a shard split on a dim > 0 of {global_shape} cannot "
                                  f"be saved in the checkpoint shape {shape}")
    return ChunkGeometry(shape, tuple(local_shape), tuple(offset), None)


def owned_sharded_tensor(flat: torch.Tensor, start: int, geometry: ChunkGeometry,
                         rank: int) -> ShardedTensor:
    """A ShardedTensor of global ``geometry.shape`` whose local shards are views of ``flat`` (the
    shard's row-major elements ``[start, start + flat.numel())``); it may have no local shard.

    Built directly (no collective, no check that the ranks' shards cover the tensor: DCP
    assembles the global picture from every rank's boxes)."""
    shards, pos = [], 0
    for offsets, sizes in geometry.boxes(start, start + flat.numel()):
        n = math.prod(sizes)
        placement = f"rank:{rank}/{flat.device}"
        shards.append(Shard(flat[pos: pos + n].view(sizes),
                            ShardMetadata(list(offsets), list(sizes), placement)))
        pos += n
    return _sharded(shards, geometry.shape, flat.dtype, flat.device)


class _DeviceHint:
    """What ShardedTensor asks its process group for when a rank has no local shard: its
    backend name, from which it infers the device (gloo: the CPU; otherwise the CUDA device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def _get_backend_name(self) -> str:
        return "gloo" if self.device.type == "cpu" else "nccl"


def _sharded(shards: list[Shard], shape: tuple[int, ...], dtype: torch.dtype,
             device: torch.device) -> ShardedTensor:
    st = torch.Tensor._make_wrapper_subclass(ShardedTensor, torch.Size(shape), dtype=dtype,
                                             layout=torch.strided, requires_grad=False)
    st._sharding_spec = None
    st._metadata = ShardedTensorMetadata([s.metadata for s in shards], torch.Size(shape),
                                         TensorProperties(dtype=dtype))
    st._local_shards = shards
    st._process_group = _DeviceHint(device)
    return st


def sharded_to_cpu(st: ShardedTensor) -> ShardedTensor:
    """A copy of ``st`` with its local shards on the CPU (asynchronous-save staging)."""
    shards = [Shard(s.tensor.detach().to("cpu", copy=True), s.metadata)
              for s in st.local_shards()]
    return _sharded(shards, tuple(st.shape), st.dtype, torch.device("cpu"))


@torch.no_grad()
def copy_full_into(st: ShardedTensor, full: torch.Tensor) -> None:
    """Fill ``st``'s local shards from the full (global-shaped) tensor ``full``."""
    full = full.reshape(st.shape)
    for shard in st.local_shards():
        region = full[tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets,
                                                             shard.metadata.shard_sizes))]
        shard.tensor.copy_(region)
