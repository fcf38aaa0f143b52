"""FSDP2 for ``parallel.zero1.fsdp=True``: parameters, gradients and AdamW states sharded (zero1).

Wrapping (:func:`shard_model`): every transformer block and then the root get ``fully_shard`` over
the zero1 group — a 1-D mesh when ``zero1 == dp``, else the 2-D HSDP mesh
``(zero1_replica, zero1)`` that shards inside zero1 groups and replicates across them (ZeRO-1.5's
answer to cross-node traffic, now for parameters too).  The sharded parameters are fp32 and are
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
from typing import Any

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
    if layout.tensor > 1 or layout.pipeline > 1:
        raise NotImplementedError("parallel.zero1.fsdp with tensor or pipeline parallel is not "
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


class FSDPOptimizer(ShardedAdamW):
    """AdamW on FSDP2's fp32 parameter shards, with ZeRO-1.5's clipping, scaler and checkpoints.

    The masters are the sharded parameters themselves (DTensors), so after an update there is
    nothing to gather: FSDP all-gathers the new values at the next forward.  Loading optimizer
    state therefore also loads the weights.
    """

    def __init__(self, model: nn.Module, named_params: list[tuple[str, nn.Parameter]],
                 cfg: TrainConfig, layout: ParallelLayout, comm: Comm, scaler: LossScaler):
        super().__init__(named_params, [p for _, p in named_params], cfg, layout, comm, scaler)
        self.model = model
        # FSDP2 cuts dim 0 into zero1 chunks of ceil(dim0 / zero1) rows (the last ones shorter)
        self.rows = [math.ceil(p.shape[0] / layout.zero1) for p in self.params]

    def start_micro_step(self, last: bool) -> None:
        """Reduce gradients only in the last micro-batch's backward."""
        self.model.set_requires_gradient_sync(last)

    def reduce_gradients(self) -> list[torch.Tensor]:
        """FSDP already reduced them in backward: the fp32 gradient shard of each parameter."""
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def _padded(self, i: int, t: torch.Tensor) -> torch.Tensor:
        """Parameter ``i``'s local shard ``t`` padded to ``rows[i]`` rows, flattened."""
        flat = t.new_zeros((self.rows[i],) + tuple(self.params[i].shape[1:]))
        flat[: t.shape[0]] = t
        return flat.reshape(-1)

    def gather_full(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Full fp32 per-parameter tensors: one all-gather over zero1 of the padded shards."""
        mine = torch.cat([self._padded(i, local_tensor(t).detach().float())
                          for i, t in enumerate(tensors)])
        full = mine.new_empty(self.layout.zero1, mine.numel())
        self.comm.all_gather(full.view(-1), mine, "zero1")
        out, start = [], 0
        for p, rows in zip(self.params, self.rows):
            width = rows * math.prod(p.shape[1:])
            block = full[:, start: start + width].reshape((-1,) + tuple(p.shape[1:]))
            out.append(block[: p.shape[0]].clone())
            start += width
        return out

    def shard_full(self, fulls: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's rows of each full tensor (FSDP2's dim-0 chunks)."""
        r = self.layout.zero1_rank
        return [full[r * rows: (r + 1) * rows] for full, rows in zip(fulls, self.rows)]

    def refresh_masters_from_params(self) -> None:
        """Nothing to do: the sharded parameters are the masters."""
