"""Intern sequence parallel (isp) with weight parallel (spec §3.2, §3.3).

Every rank holds ``[B, S/sp, h]`` activations for the whole model (``sp = parallel.tensor.size``,
the ``tensor`` group).  Attention needs whole sequences, so the Ulysses all-to-all turns the
sequence shards of q, k and v into head shards of the full row just before the kernel and back
right after it (:class:`UlyssesExchange`, plugged into the blocks through
``ForwardContext.exchange``).  ``cu_seqlens`` stay global (attention never crosses a document);
the RoPE tables are built for the full row and sliced with the sequence.

Every linear of the model spec's per-block list (``tp_plan.block_linears()``), the output head
and the embedding store a ``[out/wp, in]`` row block of their weight (and bias): a ``Shard(0)``
DTensor on the ``weight`` mesh (``wp = parallel.weight.size``), so checkpoints and
initialisation are layout-independent as under tensor parallel.  (``model.embed_split_hidden``
and ``model.parallel_output`` have no effect under isp: the embedding looks up the local tokens
with the gathered table and the head returns full-vocabulary logits of the local tokens.)

:class:`WeightParallel` all-gathers a module's full weight just before its forward and again in
its backward and frees it after use; the full weight gradient is reduce-scattered (SUM)
into the shard inside autograd, so micro-batches accumulate on the shard.  With
``weight.overlap`` the gathers of a whole block are issued together, and the next block's (in
forward) or the previous block's (in backward) are issued while the current one computes.

Per layer and pass the collectives are (docs/parallel.md)::

    forward   5 all-gather (weight, one per linear: weight and bias travel together)
              2 all-to-all (tensor: q,k,v packed into one; attention output)
    backward  5 all-gather + 5 reduce-scatter (weight)  2 all-to-all (tensor)
              2 all-reduce (weight: the two norm-weight gradients)

Gradients are exact sums: a norm weight's gradient is summed over the weight group inside
autograd, then every gradient is summed over ``weight_data`` by the ZeRO step and divided by the
data-parallel size (InternEvo averages over the weight group instead).  Together the weight and
weight-data groups cover every rank once, so each parameter sums the contributions of all tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function

from internevo.config import TrainConfig
from internevo.models.common import RMSNorm
from internevo.models.loss import IGNORE_INDEX, lm_loss, token_stats
from internevo.models.registry import get_spec
from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout
from internevo.parallel.tensor import (
    SequenceParallelRMSNorm,
    TPContext,
    _full_row_context,
    _swap,
    all_reduce,
    split_dim,
)

SEQ = "tensor"
"""The sequence-parallel group (isp reuses the tensor group)."""
WEIGHT = "weight"


# ------------------------------------------------------------------------------------------
# Ulysses all-to-all


def all_to_all_dim(comm: Comm, x: Tensor, scatter_dim: int, gather_dim: int) -> Tensor:
    """Cut ``x`` into ``sp`` chunks along ``scatter_dim``, send chunk ``r`` to sequence rank
    ``r``, and concatenate what arrives along ``gather_dim`` (in rank order)."""
    n = comm.layout.tensor
    if n == 1:
        return x
    send = torch.stack(x.chunk(n, dim=scatter_dim))
    recv = torch.empty_like(send)
    comm.all_to_all(recv.view(-1), send.view(-1), SEQ)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(Function):
    """All-to-all forward; the reverse all-to-all (dims swapped) backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, comm: Comm, scatter_dim: int, gather_dim: int) -> Tensor:
        ctx.comm, ctx.dims = comm, (scatter_dim, gather_dim)
        return all_to_all_dim(comm, x, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        scatter_dim, gather_dim = ctx.dims
        return all_to_all_dim(ctx.comm, grad, gather_dim, scatter_dim), None, None, None


@dataclasses.dataclass
class UlyssesExchange:
    """Sequence shards <-> head shards around attention (``[B, S, H, d]`` tensors)."""

    comm: Comm

    def to_heads(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, S/sp, H, d]`` each -> ``[B, S, H/sp, d]`` each, in one all-to-all.

        Rank ``r`` receives query heads ``[r Hq/sp, (r+1) Hq/sp)`` and KV heads ``[r Hkv/sp, ..)``
        : exactly the KV heads those query heads read under grouped-query attention.
        """
        n = self.comm.layout.tensor
        b, s, _, d = q.shape
        heads = [t.shape[2] // n for t in (q, k, v)]
        packed = torch.cat([t.reshape(b, s, n, h, d) for t, h in zip((q, k, v), heads)], dim=3)
        full = _AllToAll.apply(packed, self.comm, 2, 1).squeeze(2)  # [B, S, sum(heads), d]
        return full.split(heads, dim=2)

    def to_sequence(self, out: Tensor) -> Tensor:
        """``[B, S, H/sp, d]`` -> ``[B, S/sp, H, d]``."""
        return _AllToAll.apply(out, self.comm, 1, 2)


def _sequence_context(model: nn.Module, comm: Comm) -> None:
    """Build the forward context for the full row (segments, positions) and keep this rank's
    slice of the RoPE tables; attention goes through :class:`UlyssesExchange`."""
    sp, rank = comm.layout.tensor, comm.layout.tp_rank
    _full_row_context(model, sp)
    full_context = model.forward_context

    @functools.wraps(full_context)
    def forward_context(x: Tensor, cu_seqlens: Any, indexes: Optional[Tensor]) -> Any:
        ctx = full_context(x, cu_seqlens, indexes)
        cos, sin = (t.chunk(sp, dim=-2)[rank] for t in (ctx.cos, ctx.sin))
        return dataclasses.replace(ctx, cos=cos, sin=sin, exchange=UlyssesExchange(comm))

    model.forward_context = forward_context


# ------------------------------------------------------------------------------------------
# weight parallel


class WeightParallel:
    """All-gathers weight shards when a module needs its full weight; reduce-scatters gradients.

    ``units`` are the transformer blocks' weight-parallel modules in forward order: with
    ``overlap`` a module's first fetch in a pass issues the gathers of its whole block and of
    the neighbour block in the pass's direction (next in forward, previous in backward), as
    asynchronous collectives; each fetch waits for its own.  Every gather is consumed exactly
    once, so the counted collectives equal the plain path's; a block recomputed under activation
    checkpointing gathers for the recomputation and keeps those weights for its backward.
    """

    def __init__(self, comm: Comm, overlap: bool) -> None:
        self.comm, self.overlap = comm, overlap
        self.units: list[list[nn.Module]] = []
        self.unit_of: dict[nn.Module, int] = {}
        self.pending: dict[nn.Module, tuple[Any, Tensor]] = {}
        self.started: set[tuple[int, int]] = set()
        self.retained: dict[nn.Module, list[Tensor]] = {}
        """Weights gathered by a recomputation (activation checkpointing), kept for the
        backward that immediately follows it."""

    def add_unit(self, modules: list[nn.Module]) -> None:
        """Register one block's weight-parallel modules (forward order)."""
        for m in modules:
            self.unit_of[m] = len(self.units)
        self.units.append(modules)

    def reset(self) -> None:
        """Start of a forward: forget prefetches of the previous pass (none in normal use)."""
        for work, _ in self.pending.values():
            if work is not None:
                work.wait()
        self.pending.clear()
        self.started.clear()
        self.retained.clear()

    def _start(self, module: nn.Module) -> None:
        """Issue the all-gather of ``module``'s weight (and bias) shards, as one flat buffer."""
        shards = [p.to_local().detach().reshape(-1) for p in _params(module)]
        flat = torch.cat(shards) if len(shards) > 1 else shards[0]
        out = flat.new_empty(self.comm.layout.weight * flat.numel())
        work = self.comm.all_gather(out, flat, WEIGHT, async_op=self.overlap)
        self.pending[module] = (work, out)

    def _prefetch(self, unit: int, direction: int) -> None:
        for u in (unit, unit + direction):
            if 0 <= u < len(self.units) and (u, direction) not in self.started:
                self.started.add((u, direction))
                for m in self.units[u]:
                    if m not in self.pending:
                        self._start(m)

    def fetch(self, module: nn.Module, direction: int) -> list[Tensor]:
        """The full weight (and bias) of ``module``; ``direction`` +1 in forward, -1 in backward.

        A forward inside backward is a checkpointed block's recomputation: its weights are kept
        for the module's backward, which then gathers nothing.
        """
        if direction < 0 and module in self.retained:
            return self.retained.pop(module)
        unit = self.unit_of.get(module)
        if self.overlap and unit is not None:
            self._prefetch(unit, direction)
        if module not in self.pending:
            self._start(module)
        work, out = self.pending.pop(module)
        if work is not None:
            work.wait()
        full = _unflatten(out, _params(module), self.comm.layout.weight)
        if direction > 0 and torch._C._current_graph_task_id() != -1:
            self.retained[module] = full
        return full

    def reduce_scatter(self, grads: list[Tensor]) -> list[Tensor]:
        """Sum full gradients over the weight group; this rank's row block of each, one flat
        collective (rank ``r``'s rows of every tensor are contiguous in the input)."""
        wp = self.comm.layout.weight
        flat = torch.cat([g.reshape(wp, -1) for g in grads], dim=1)
        out = flat.new_empty(flat.shape[1])
        self.comm.reduce_scatter(out, flat.reshape(-1), WEIGHT)
        sizes = [g.numel() // wp for g in grads]
        shards = [piece.view(g.shape[0] // wp, *g.shape[1:])
                  for piece, g in zip(out.split(sizes), grads)]
        return shards[:1] + [s.clone() for s in shards[1:]]  # a bias grad gets its own storage


def _params(module: nn.Module) -> list[Tensor]:
    return [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]


def _unflatten(out: Tensor, params: list[Tensor], wp: int) -> list[Tensor]:
    """The gathered ``[wp, shard(w) + shard(b)]`` buffer -> the full weight and bias."""
    rows = out.view(wp, -1)
    sizes = [p.to_local().numel() for p in params]
    return [piece.reshape(p.shape) for piece, p in zip(rows.split(sizes, dim=1), params)]


class _WeightParallelLinear(Function):
    """``F.linear`` with gathered weights: saves only the input; re-gathers in backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor], module: nn.Module,
                wp: WeightParallel) -> Tensor:
        full = wp.fetch(module, +1)
        ctx.save_for_backward(x)
        ctx.module, ctx.wp, ctx.has_bias = module, wp, bias is not None
        return F.linear(x, full[0], full[1] if ctx.has_bias else None)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        (x,) = ctx.saved_tensors
        weight = ctx.wp.fetch(ctx.module, -1)[0]
        g2 = grad.reshape(-1, grad.shape[-1])
        grads = [g2.t().mm(x.reshape(-1, x.shape[-1]))] + ([g2.sum(0)] if ctx.has_bias else [])
        shards = ctx.wp.reduce_scatter(grads) + [None]
        return grad.matmul(weight), shards[0], shards[1], None, None


class _GatherWeight(Function):
    """The full weight (all-gather forward); its gradient reduce-scattered into the shard."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, module: nn.Module, wp: WeightParallel) -> Tensor:
        ctx.wp = wp
        return wp.fetch(module, +1)[0]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        return ctx.wp.reduce_scatter([grad])[0], None, None


class WeightParallelLinear(nn.Linear):
    """A linear whose weight and bias are ``[out/wp, ...]`` shards, gathered per use."""

    wp: WeightParallel

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, S/sp, in]`` -> ``[B, S/sp, out]`` with the full weight."""
        bias = self.bias.to_local() if self.bias is not None else None
        return _WeightParallelLinear.apply(x, self.weight.to_local(), bias, self, self.wp)


class WeightParallelEmbedding(nn.Embedding):
    """Token embedding of this rank's sequence chunk with the gathered ``[V, h]`` table."""

    wp: WeightParallel
    comm: Comm

    def forward(self, ids: Tensor) -> Tensor:
        """``ids [B, S]`` (the full row) -> ``[B, S/sp, h]``."""
        local = split_dim(self.comm, ids, 1)
        return F.embedding(local, _GatherWeight.apply(self.weight.to_local(), self, self.wp))


# ------------------------------------------------------------------------------------------
# applying isp, and its loss


def apply_isp(model: nn.Module, cfg: TrainConfig, layout: ParallelLayout, comm: Comm,
              device_type: str = "cpu") -> nn.Module:
    """Shard ``model`` (built for one device) in place for ``tensor.mode="isp"``."""
    if not layout.isp:
        return model
    plan = get_spec(cfg.model_type).tp_plan
    tp = TPContext(comm, "isp", layout.device_mesh(device_type)[WEIGHT])
    wp = WeightParallel(comm, cfg.parallel.weight.overlap)
    for block in model.transformer_blocks():
        linears = [block.get_submodule(name) for name in plan.block_linears()]
        for m in linears:
            _weight_parallel(m, WeightParallelLinear, tp, wp)
        wp.add_unit(linears)
    for name, cls in ((plan.head, WeightParallelLinear), (plan.embedding, WeightParallelEmbedding)):
        if getattr(model, name) is not None:  # a pipeline stage may hold neither
            _weight_parallel(getattr(model, name), cls, tp, wp)
    for module in model.modules():
        if type(module) is RMSNorm:
            _swap(module, SequenceParallelRMSNorm, tp, {})
            module.group = WEIGHT
    _sequence_context(model, comm)
    model.register_forward_pre_hook(lambda *_: wp.reset())
    return model


def _weight_parallel(module: nn.Module, cls: type, tp: TPContext, wp: WeightParallel) -> None:
    _swap(module, cls, tp, {"weight": 0, "bias": 0})
    module.wp, module.comm = wp, tp.comm


class SequenceShardLoss:
    """Cross entropy of logits for this rank's sequence chunk ``[B, S/sp, V]`` against the full
    row's labels: the local tokens' summed loss over the row's supervised-token count.

    Its gradient is this rank's share; its value is the whole row's loss (the shares summed over
    the sequence group, one scalar all-reduce), so logging and averaging are unchanged.
    """

    def __init__(self, comm: Comm, label_smoothing: float) -> None:
        self.comm, self.label_smoothing = comm, label_smoothing

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Token-mean loss of the row (see the class docstring)."""
        local = split_dim(self.comm, labels, 1)
        count = (labels != IGNORE_INDEX).sum().clamp(min=1)
        share = lm_loss(logits, local, self.label_smoothing) * (
            (local != IGNORE_INDEX).sum() / count)
        total = all_reduce(self.comm, share.detach(), group=SEQ)
        return share + (total - share.detach())

    def token_stats(self, logits: Tensor, labels: Tensor, type_ids: Tensor,
                    num_types: int) -> dict[str, Tensor]:
        """Per-type metric sums of the whole row (local sums, all-reduced)."""
        stats = token_stats(logits, split_dim(self.comm, labels, 1),
                            split_dim(self.comm, type_ids, 1), num_types)
        summed = all_reduce(self.comm, torch.stack(list(stats.values())), group=SEQ)
        return dict(zip(stats, summed.unbind(0)))
