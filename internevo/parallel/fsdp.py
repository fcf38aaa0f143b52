"""FSDP2 for ``parallel.zero1.fsdp=True``: parameters, gradients and AdamW states sharded (zero1).

Wrapping (:func:`shard_model`): every transformer block and then the root get ``fully_shard`` over
the zero1 group — a 1-D mesh when ``zero1 == dp``, else the 2-D HSDP mesh
``(zero1_replica, zero1)`` that shards inside zero1 groups and replicates across them (ZeRO-1.5's
answer to cross-node traffic, now for parameters too).  Under tensor parallel the parameters are
already DTensors on the ``tensor`` mesh; FSDP2 then shards each tensor-parallel shard over zero1
(parameters on the 2-D ``(zero1, tensor)`` mesh; docs/parallel.md, "FSDP × tensor parallel").
The sharded parameters are fp32 and are
the master weights; ``MixedPrecisionPolicy(param_dtype=model dtype, reduce_dtype=fp32)`` gathers
them in the model dtype for compute and reduces gradients in fp32.  The model is built on the meta
device, sharded, then materialised and initialised per parameter name from the seed, so the
initial weights are those of a single process (rounded to the model dtype, as the non-FSDP
masters are).

Communication (all counted by :class:`~internevo.parallel.comm.Comm` under the names ``zero1`` /
``zero1_replica``): FSDP2's all-gathers and reduce-scatters are issued *through* Comm by custom
collective objects (``set_custom_all_gather`` / ``set_custom_reduce_scatter``); the replica
all-reduce of hybrid sharding is issued by FSDP itself and counted from its all-reduce hook.
Gradients are reduced once per optimizer step: :meth:`FSDPOptimizer.start_micro_step` turns
``set_requires_gradient_sync`` off for all micro-batches but the last.  Per micro-batch FSDP
all-gathers every parameter in forward and the blocks again in backward (the root keeps its
parameters unsharded between forward and backward); docs/parallel.md has the byte formulas.

:class:`FSDPOptimizer` is :class:`~internevo.parallel.zero.ShardedAdamW` on the FSDP shards:
same clipping, overflow skipping, loss scaling and checkpoint format as ZeRO-1.5.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

from internevo.config import TrainConfig
from internevo.models.build import model_dtype
from internevo.models.common import RMSNorm
from internevo.models.init import init_weights
from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout
from internevo.parallel.scaler import LossScaler
from internevo.parallel.tensor import GROUP as TENSOR
from internevo.parallel.zero import ShardedAdamW, local_tensor

# ------------------------------------------------------------------------------------------
# FSDP2's collectives, issued through Comm


class _Alloc:
    """Plain allocation of FSDP2's communication buffers (what its default collectives do)."""

    def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised buffer."""
        return torch.empty(*size, dtype=dtype, device=device)


class CountedAllGather(_Alloc, AllGather):
    """FSDP2's parameter all-gather, issued by Comm and counted under ``zero1``."""

    def __init__(self, comm: Comm):
        self.comm = comm

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any,
                 async_op: bool = False) -> Any:
        """All-gather ``input_tensor`` of every shard rank into ``output_tensor``."""
        return self.comm.all_gather(output_tensor, input_tensor, "zero1", async_op=async_op,
                                    process_group=group)


class CountedReduceScatter(_Alloc, ReduceScatter):
    """FSDP2's gradient reduce-scatter, issued by Comm and counted under ``zero1``."""

    def __init__(self, comm: Comm):
        self.comm = comm

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any,
                 op: Any, async_op: bool = False) -> Any:
        """Reduce ``input_tensor`` over the shard ranks, keeping this rank's slice."""
        return self.comm.reduce_scatter(output_tensor, input_tensor, "zero1", op=op,
                                        async_op=async_op, process_group=group)


def _count_replica_all_reduce(comm: Comm) -> Any:
    """All-reduce hook of hybrid sharding: FSDP issued it, we count it."""
    def hook(reduce_output: torch.Tensor) -> None:
        comm.record("all_reduce", "zero1_replica",
                    reduce_output.numel() * reduce_output.element_size())
    return hook


# ------------------------------------------------------------------------------------------
# wrapping


def fsdp_mesh(layout: ParallelLayout, device_type: str) -> Any:
    """The mesh FSDP shards over: zero1 (1-D) or (zero1_replica, zero1) for hybrid sharding."""
    mesh = layout.device_mesh(device_type)
    if layout.data // layout.zero1 > 1:
        return mesh["zero1_replica", "zero1"]
    return mesh["zero1"]


def shard_model(model: nn.Module, cfg: TrainConfig, layout: ParallelLayout, comm: Comm,
                device: torch.device, seed: int) -> nn.Module:
    """``fully_shard`` a meta-device ``model`` (blocks, then root), materialise, initialise."""
    if layout.pipeline > 1:
        raise NotImplementedError("parallel.zero1.fsdp with pipeline parallel is not "
                                  "implemented yet")
    mesh = fsdp_mesh(layout, device.type)
    dtype = model_dtype(cfg)
    model.float()  # the sharded parameters are the fp32 master weights
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    if cfg.use_fp32_norm:
        _shard_norms_in_fp32(model, mesh)
    for block in model.transformer_blocks():
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    _route_collectives(model, comm, hybrid=mesh.ndim == 2)
    model.to_empty(device=device)
    init_weights(model, cfg, seed)
    _round_to(model, dtype)
    return model


def _shard_norms_in_fp32(model: nn.Module, mesh: Any) -> None:
    """``use_fp32_norm``: norms are units of their own whose weights are gathered in fp32.

    RMSNorm computes in fp32 and returns its input's dtype, so its input must not be cast.
    """
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                cast_forward_inputs=False)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            fully_shard(module, mesh=mesh, mp_policy=fp32)


def _route_collectives(model: nn.Module, comm: Comm, hybrid: bool) -> None:
    """Make every FSDP module of ``model`` communicate through (or be counted by) ``comm``."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_all_gather(CountedAllGather(comm))
            module.set_custom_reduce_scatter(CountedReduceScatter(comm))
            if hybrid:
                module.set_all_reduce_hook(_count_replica_all_reduce(comm))


@torch.no_grad()
def _round_to(model: nn.Module, dtype: torch.dtype) -> None:
    """Round the fp32 shards to ``dtype`` values: the masters a non-FSDP run starts from."""
    if dtype == torch.float32:
        return
    for p in model.parameters():
        local = local_tensor(p)
        local.copy_(local.to(dtype))


# ------------------------------------------------------------------------------------------
# the optimizer


def tensor_placement(p: torch.Tensor) -> Optional[Any]:
    """The placement of ``p`` on the ``tensor`` mesh dimension (None: not tensor-parallel)."""
    mesh = getattr(p, "device_mesh", None)
    names = (mesh.mesh_dim_names or ()) if mesh is not None else ()
    return p.placements[names.index(TENSOR)] if TENSOR in names else None


def tensor_local_shape(p: torch.Tensor, tp: int) -> tuple[int, ...]:
    """Shape of the tensor-parallel shard of ``p`` (what FSDP2 cuts into zero1 chunks)."""
    shape = list(p.shape)
    placement = tensor_placement(p)
    if placement is not None and placement.is_shard():
        shape[placement.dim] //= tp  # the tensor split is exact (checked with the layout)
    return tuple(shape)


class FSDPOptimizer(ShardedAdamW):
    """AdamW on FSDP2's fp32 parameter shards, with ZeRO-1.5's clipping, scaler and checkpoints.

    The masters are the sharded parameters themselves (DTensors), so after an update there is
    nothing to gather: FSDP all-gathers the new values at the next forward.  Loading optimizer
    state therefore also loads the weights.  Under tensor parallel the parameters are DTensors on
    the ``(zero1, tensor)`` mesh (FSDP2 over the tensor-parallel DTensors): FSDP cuts dim 0 of
    each tensor-parallel shard, and the checkpoint tensors are those tensor-parallel shards as
    DTensors on the ``tensor`` mesh, exactly as :class:`~internevo.parallel.zero.
    HybridZeroOptimizer` writes them.
    """

    def __init__(self, model: nn.Module, named_params: list[tuple[str, nn.Parameter]],
                 cfg: TrainConfig, layout: ParallelLayout, comm: Comm, scaler: LossScaler):
        super().__init__(named_params, [p for _, p in named_params], cfg, layout, comm, scaler)
        self.model = model
        self.tp_shapes = [tensor_local_shape(p, layout.tensor) for p in self.params]
        # FSDP2 cuts dim 0 into zero1 chunks of ceil(dim0 / zero1) rows (the last ones shorter)
        self.rows = [math.ceil(shape[0] / layout.zero1) for shape in self.tp_shapes]
        self.norm_weights = [self._norm_weight(p) for p in self.params]

    def _norm_weight(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        """Parameters replicated over the tensor group count once in the norm (tensor rank 0)."""
        placement = tensor_placement(p)
        if self.layout.tensor == 1 or self.layout.tp_rank == 0 or (
                placement is not None and placement.is_shard()):
            return None
        return torch.zeros(local_tensor(p).numel(), device=local_tensor(p).device)

    def start_micro_step(self, last: bool) -> None:
        """Reduce gradients only in the last micro-batch's backward."""
        self.model.set_requires_gradient_sync(last)

    def reduce_gradients(self) -> list[torch.Tensor]:
        """FSDP already reduced them in backward: the fp32 gradient shard of each parameter."""
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def _padded(self, i: int, t: torch.Tensor) -> torch.Tensor:
        """Parameter ``i``'s local shard ``t`` padded to ``rows[i]`` rows, flattened."""
        flat = t.new_zeros((self.rows[i],) + self.tp_shapes[i][1:])
        flat[: t.shape[0]] = t
        return flat.reshape(-1)

    def gather_full(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Full fp32 per-parameter tensors: one all-gather over zero1 of the padded shards."""
        mine = torch.cat([self._padded(i, local_tensor(t).detach().float())
                          for i, t in enumerate(tensors)])
        full = mine.new_empty(self.layout.zero1, mine.numel())
        self.comm.all_gather(full.view(-1), mine, "zero1")
        out, start = [], 0
        for p, shape, rows in zip(self.params, self.tp_shapes, self.rows):
            width = rows * math.prod(shape[1:])
            block = full[:, start: start + width].reshape((-1,) + shape[1:])
            out.append(self._as_tensor_shard(p, block[: shape[0]].clone()))
            start += width
        return out

    def _as_tensor_shard(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A tensor-parallel shard ``t`` of ``p`` as a DTensor on the ``tensor`` mesh."""
        placement = tensor_placement(p)
        if placement is None or not placement.is_shard():
            return t
        from torch.distributed.tensor import DTensor

        # the layout's own tensor mesh: slicing FSDP's concatenated 2-D mesh would build a new one
        mesh = self.layout.device_mesh(t.device.type)[TENSOR]
        return DTensor.from_local(t, mesh, [placement], run_check=False, shape=p.shape,
                                  stride=p.stride())

    def shard_full(self, fulls: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's rows of each full (tensor-parallel-local) tensor (FSDP2's dim-0 chunks)."""
        r = self.layout.zero1_rank
        return [full[r * rows: (r + 1) * rows] for full, rows in zip(fulls, self.rows)]

    def refresh_masters_from_params(self) -> None:
        """Nothing to do: the sharded parameters are the masters."""

    def owned(self) -> list[tuple[int, dict[str, torch.Tensor]]]:
        """FSDP2's dim-0 chunk of each tensor-parallel shard (see :meth:`ShardedAdamW.owned`)."""
        states, r = self._state_tensors(), self.layout.zero1_rank
        return [(r * rows * math.prod(shape[1:]),
                 {k: local_tensor(t[i]).detach().reshape(-1) for k, t in states.items()})
                for i, (rows, shape) in enumerate(zip(self.rows, self.tp_shapes))]

    def tensor_chunk(self, i: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The tensor-parallel shard of parameter ``i`` (FSDP's cut inside it is :meth:`owned`)."""
        p, shape = self.params[i], self.tp_shapes[i]
        offset = [0] * len(shape)
        placement = tensor_placement(p)
        if placement is not None and placement.is_shard():
            offset[placement.dim] = self.layout.tp_rank * shape[placement.dim]
        return shape, tuple(offset)

