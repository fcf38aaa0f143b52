"""Tensor parallel (mtp) and sequence parallel (msp, fsp), and the vocab-parallel cross entropy.

Sharded parameters are DTensors on the 1-D ``tensor`` mesh (``Shard(0)`` column-parallel,
``Shard(1)`` row-parallel), so DCP checkpoints reshard across tensor sizes and ``init.py`` fills
them layout-independently.  The forward never lets DTensor communicate: it works on
``param.to_local()`` and moves activations with the explicit autograd functions below, which all
call :class:`~internevo.parallel.comm.Comm` (so every collective is counted).  PyTorch's
``ColwiseParallel``/``SequenceParallel`` styles would issue their collectives through DTensor
redistribution, invisible to the counter, and cannot express fsp's re-gather.

The model code is untouched.  A *region* is a module whose input enters the tensor-parallel part
(a block's attention and MLP, and the output head): a forward pre-hook replicates (mtp) or gathers
along the sequence (msp/fsp) its input once; the region's column-parallel linears then compute
their local output features; its row-parallel linear all-reduces (mtp) or reduce-scatters along
the sequence (msp/fsp).  Per mode and layer the collectives are (docs/architecture.md)::

    mtp  fwd: 2 all-reduce (row outputs)          bwd: 2 all-reduce (region input grads)
    msp  fwd: 2 all-gather + 2 reduce-scatter     bwd: 2 reduce-scatter + 2 all-gather
                                                       + 2 all-reduce (norm-weight grads)
    fsp  as msp, + 1 all-gather in bwd per column linear (it re-gathers its input):
         3 for InternLM / InternLM2 (qkv, w1, w3), 5 for LLaMA (wq, wk, wv, w1, w3)

Under sequence parallel the norm weights (and a row-parallel bias) see only the local tokens, so
their gradient is summed over the tensor group inside autograd (every micro-step: tiny, and it
works with overlapped ZeRO reduction, FSDP and activation checkpointing alike).  InternEvo
averages instead of summing; the sum is what one process computes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function

from internevo.config import ConfigError, TrainConfig
from internevo.models.common import RMSNorm, ffn_hidden, head_rows
from internevo.models.loss import IGNORE_INDEX, type_sums
from internevo.models.registry import get_spec
from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout

GROUP = "tensor"
SEQ_DIM = 1  # activations are [B, S, h]; sequence parallel splits S (B == 1 when packed)


# ------------------------------------------------------------------------------------------
# collectives along a tensor dimension (Comm works on dim 0 of flat buffers)


def _size(comm: Comm) -> int:
    return comm.layout.tensor


def gather_dim(comm: Comm, x: Tensor, dim: int) -> Tensor:
    """All-gather ``x`` from every tensor rank and concatenate along ``dim``."""
    n = _size(comm)
    if n == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((n * x.numel(),))
    comm.all_gather(out, x.reshape(-1), GROUP)
    return torch.cat(out.view(n, *x.shape).unbind(0), dim=dim)


def reduce_scatter_dim(comm: Comm, x: Tensor, dim: int) -> Tensor:
    """Sum ``x`` over the tensor ranks and keep this rank's chunk along ``dim``."""
    n = _size(comm)
    if n == 1:
        return x
    chunks = torch.stack(x.chunk(n, dim=dim))  # [n, ...]: rank r's chunk is contiguous row r
    out = x.new_empty(chunks.shape[1:])
    comm.reduce_scatter(out.view(-1), chunks.view(-1), GROUP)
    return out


def split_dim(comm: Comm, x: Tensor, dim: int) -> Tensor:
    """This rank's chunk of ``x`` along ``dim`` (no communication)."""
    n = _size(comm)
    return x if n == 1 else x.chunk(n, dim=dim)[comm.layout.tp_rank].contiguous()


def all_reduce(comm: Comm, x: Tensor, op: str = "sum", group: str = GROUP) -> Tensor:
    """A summed (or max/min) copy of ``x`` over the tensor group (or ``group``)."""
    out = x.clone()
    comm.all_reduce(out, group, op=op)
    return out


# ------------------------------------------------------------------------------------------
# autograd functions (forward / backward collective pairs)


class _AllReduceGrad(Function):
    """Identity forward, gradient summed over the tensor group (or ``group``) in backward: the mtp
    region entry, and the replicated parameters (norms, row bias) whose gradients are partial
    under sp (under isp: over the weight group)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, comm: Comm, group: str = GROUP) -> Tensor:
        ctx.comm, ctx.group = comm, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        return all_reduce(ctx.comm, grad, group=ctx.group), None, None


class _ReduceFromTP(Function):
    """mtp row-linear exit: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, comm: Comm) -> Tensor:
        return all_reduce(comm, x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        return grad, None


Collective = Callable[[Comm, Tensor, int], Tensor]


def _dim_pair(name: str, forward: Collective, backward: Collective, doc: str) -> type[Function]:
    """An autograd function ``(x, comm, dim)``: ``forward`` on the input along ``dim``,
    ``backward`` on the gradient along the same ``dim``."""

    def fwd(ctx: Any, x: Tensor, comm: Comm, dim: int) -> Tensor:
        ctx.comm, ctx.dim = comm, dim
        return forward(comm, x, dim)

    def bwd(ctx: Any, grad: Tensor) -> tuple:
        return backward(ctx.comm, grad.contiguous(), ctx.dim), None, None

    return type(name, (Function,), {"__doc__": doc, "forward": staticmethod(fwd),
                                    "backward": staticmethod(bwd)})


_GatherScatter = _dim_pair("_GatherScatter", gather_dim, reduce_scatter_dim,
                           "sp region entry: all-gather along ``dim``; backward reduce-scatters.")
_ScatterGather = _dim_pair("_ScatterGather", reduce_scatter_dim, gather_dim,
                           "sp row-linear exit: reduce-scatter along ``dim``, all-gather backward.")
_GatherSplit = _dim_pair("_GatherSplit", gather_dim, split_dim,
                         "Gather a tensor whose gradient is replicated: all-gather forward, local "
                         "split backward.")
_SplitGather = _dim_pair("_SplitGather", split_dim, gather_dim,
                         "Keep the local chunk of a replicated tensor: split forward, all-gather "
                         "backward.")


class _FSPLinear(Function):
    """fsp column linear: saves the local sequence shard only and re-gathers it in backward.

    ``x_full`` (the region's gathered input) carries the gradient; ``x_local`` is what is kept.
    """

    @staticmethod
    def forward(ctx: Any, x_full: Tensor, x_local: Tensor, weight: Tensor,
                bias: Optional[Tensor], comm: Comm) -> Tensor:
        ctx.comm, ctx.has_bias = comm, bias is not None
        ctx.save_for_backward(x_local, weight)
        return F.linear(x_full, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        x_local, weight = ctx.saved_tensors
        x_full = gather_dim(ctx.comm, x_local, SEQ_DIM)  # the extra all-gather of fsp
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_w = g2.t().mm(x_full.reshape(-1, x_full.shape[-1]))
        grad_b = g2.sum(0) if ctx.has_bias else None
        return grad.matmul(weight), None, grad_w, grad_b, None


# ------------------------------------------------------------------------------------------
# parallel modules (class-swapped in place: parameter names and state_dict keys are unchanged)


@dataclass
class TPContext:
    """What every tensor-parallel module needs: the counter, the mode, the mesh."""

    comm: Comm
    mode: str
    mesh: Any
    local_input: list = field(default_factory=list)
    """fsp: the local sequence shard of each open region's input (a stack: regions nest)."""

    @property
    def sequence_parallel(self) -> bool:
        """msp or fsp."""
        return self.mode in ("msp", "fsp")


def _local(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.to_local() if t is not None and hasattr(t, "to_local") else t


class ColumnParallelLinear(nn.Linear):
    """Output features split across the tensor group; the input is the region's full input."""

    tp: TPContext
    fsp_input: Optional[list] = None

    def forward(self, x: Tensor) -> Tensor:
        """Local output features; under fsp only the region's local input shard is saved."""
        weight, bias = self.local_weight(), _local(self.bias)
        if self.tp.mode == "fsp" and self.tp.local_input:
            return _FSPLinear.apply(x, self.tp.local_input[-1], weight, bias, self.tp.comm)
        return F.linear(x, weight, bias)

    def local_weight(self) -> Tensor:
        """This rank's ``[out/tp, in]`` rows (normalised ones for a ``NormHead``)."""
        return head_rows(self, self.weight.to_local())


class FusedQKVColumnLinear(ColumnParallelLinear):
    """InternLM v1 ``Wqkv``: the parameter is a ``[3, H*d, h]`` DTensor sharded on dim 1, so each
    rank's rows are its heads of Q, K and V (the canonical ``[Q; K; V]`` order is kept globally)."""

    def forward(self, x: Tensor) -> Tensor:
        """As :class:`ColumnParallelLinear` on the flattened local ``[Q_r; K_r; V_r]`` rows."""
        weight, bias = self.local_weight(), _local(self.bias)
        bias = bias.reshape(-1) if bias is not None else None
        if self.tp.mode == "fsp" and self.tp.local_input:
            return _FSPLinear.apply(x, self.tp.local_input[-1], weight, bias, self.tp.comm)
        return F.linear(x, weight, bias)

    def local_weight(self) -> Tensor:
        """``[3 * H*d/tp, h]``."""
        w = self.weight.to_local()
        return w.reshape(-1, w.shape[-1])


class RowParallelLinear(nn.Linear):
    """Input features split; partial outputs all-reduced (mtp) or reduce-scattered (sp); the
    (replicated) bias is added once, after the reduction."""

    tp: TPContext

    def forward(self, x: Tensor) -> Tensor:
        """Local partial product, reduced over the tensor group, plus the bias."""
        out = F.linear(x, self.weight.to_local())
        if self.tp.sequence_parallel:
            out = _ScatterGather.apply(out, self.tp.comm, SEQ_DIM)
        else:
            out = _ReduceFromTP.apply(out, self.tp.comm)
        if self.bias is None:
            return out
        bias = self.bias
        if self.tp.sequence_parallel:
            bias = _AllReduceGrad.apply(bias, self.tp.comm)
        return out + bias


class SequenceParallelRMSNorm(RMSNorm):
    """RMSNorm on the local tokens; the weight gradient is summed over the tensor group (isp: the
    weight group, ``group``)."""

    tp: TPContext
    group: str = GROUP

    def forward(self, x: Tensor) -> Tensor:
        """Normalise the last dimension (fp32 math, as :class:`RMSNorm`)."""
        weight = _AllReduceGrad.apply(self.weight, self.tp.comm, self.group)
        return F.rms_norm(x.float(), weight.shape, weight.float(), self.eps).to(x.dtype)


class VocabParallelEmbedding(nn.Embedding):
    """Rows (vocabulary) split: masked local lookup, then all-reduce (mtp) or reduce-scatter
    along the sequence (sp: the sum and the sequence split in one collective)."""

    tp: TPContext

    def forward(self, ids: Tensor) -> Tensor:
        """Embed ``ids [B, S]``."""
        weight = self.weight.to_local()
        start = self.tp.comm.layout.tp_rank * weight.shape[0]
        outside = (ids < start) | (ids >= start + weight.shape[0])
        out = F.embedding((ids - start).masked_fill(outside, 0), weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.tp.sequence_parallel:
            return _ScatterGather.apply(out, self.tp.comm, SEQ_DIM)
        return _ReduceFromTP.apply(out, self.tp.comm)


class HiddenParallelEmbedding(nn.Embedding):
    """``embed_split_hidden``: columns (hidden) split; all-gather the hidden dim, then keep the
    local sequence chunk under sp."""

    tp: TPContext

    def forward(self, ids: Tensor) -> Tensor:
        """Embed ``ids [B, S]``."""
        out = _GatherSplit.apply(F.embedding(ids, self.weight.to_local()), self.tp.comm, -1)
        if self.tp.sequence_parallel:
            return _SplitGather.apply(out, self.tp.comm, SEQ_DIM)
        return out


class ParallelHead(ColumnParallelLinear):
    """Output head: column-parallel over the vocabulary.  ``parallel_output=True`` returns the
    logits as a vocab-sharded DTensor (``Shard(-1)``); otherwise they are all-gathered."""

    parallel_output: bool = True

    def forward(self, x: Tensor) -> Tensor:
        """``[B, S, h]`` (full sequence: the region entry gathered it) -> logits."""
        local = super().forward(x)
        if not self.parallel_output:
            return _GatherSplit.apply(local, self.tp.comm, -1)
        from torch.distributed.tensor import DTensor, Shard

        return DTensor.from_local(local, self.tp.mesh, [Shard(local.dim() - 1)], run_check=False)


# ------------------------------------------------------------------------------------------
# applying the model's plan (``spec.tp_plan``): which module gets which treatment


def check_tensor_shapes(cfg: TrainConfig, tp: int) -> None:
    """Reject shapes the tensor split cannot cut exactly (vocabulary and FFN width)."""
    if tp == 1:
        return
    m = cfg.model
    where = f"{cfg.source or '<config>'}: parallel.tensor.size={tp}"
    if m.vocab_size % tp:
        raise ConfigError(f"{where} does not divide model.vocab_size={m.vocab_size} (the "
                          "embedding and output head are split on the vocabulary; pad the "
                          "vocabulary to a multiple of the tensor size)")
    ffn = ffn_hidden(m.hidden_size, m.mlp_ratio, m.multiple_of)
    if ffn % tp:
        raise ConfigError(f"{where} does not divide the FFN width {ffn} (model.hidden_size * "
                          "model.mlp_ratio rounded to model.multiple_of)")


def apply_tensor_parallel(model: nn.Module, cfg: TrainConfig, layout: ParallelLayout,
                          comm: Comm, device_type: str = "cpu") -> nn.Module:
    """Shard ``model`` (built for one device, any device incl. meta) in place for tp > 1."""
    if layout.tensor == 1:
        return model
    if layout.tensor_mode not in ("mtp", "msp", "fsp"):
        raise ConfigError(f"parallel.tensor.mode={layout.tensor_mode!r} is not implemented here")
    check_tensor_shapes(cfg, layout.tensor)
    plan = get_spec(cfg.model_type).tp_plan
    tp = TPContext(comm, layout.tensor_mode, layout.device_mesh(device_type)["tensor"])
    for block in model.transformer_blocks():
        for region, (columns, rows) in plan.regions.items():
            module = block.get_submodule(region)
            for name in columns:
                fused = name in plan.fused_qkv
                _to_column(module.get_submodule(name), tp, fused)
            for name in rows:
                _swap(module.get_submodule(name), RowParallelLinear, tp, {"weight": 1})
            _enter_region(module, tp)
    embedding, head = getattr(model, plan.embedding), getattr(model, plan.head)
    if embedding is not None:  # a later pipeline stage has none
        _parallel_embedding(embedding, tp, cfg.model.embed_split_hidden)
    if head is not None:  # only the last pipeline stage has one
        _swap(head, ParallelHead, tp, {"weight": 0, "bias": 0})
        head.parallel_output = cfg.model.parallel_output
        _enter_region(head, tp)
    if tp.sequence_parallel:
        for module in model.modules():
            if type(module) is RMSNorm:
                _swap(module, SequenceParallelRMSNorm, tp, {})
        _full_row_context(model, layout.tensor)
    return model


def _swap(module: nn.Module, cls: type, tp: TPContext, shard_dims: dict[str, int]) -> None:
    """Turn ``module`` into ``cls`` and its parameters named in ``shard_dims`` into DTensors."""
    module.__class__ = cls
    module.tp = tp
    for name, dim in shard_dims.items():
        param = getattr(module, name, None)
        if param is not None:
            _distribute(module, name, param.data, dim, tp)


def _distribute(module: nn.Module, name: str, data: Tensor, dim: int, tp: TPContext) -> None:
    """Replace parameter ``name`` with a ``Shard(dim)`` DTensor (local slice, no communication)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    dt = distribute_tensor(data, tp.mesh, [Shard(dim)], src_data_rank=None)
    setattr(module, name, nn.Parameter(dt, requires_grad=getattr(module, name).requires_grad))


def _to_column(linear: nn.Module, tp: TPContext, fused_qkv: bool) -> None:
    """Column-parallel; a fused ``[Q; K; V]`` weight is viewed as ``[3, H*d, h]`` first, so that
    the shard of each of Q, K and V holds this rank's heads (see :class:`FusedQKVColumnLinear`)."""
    if not fused_qkv:
        _swap(linear, ColumnParallelLinear, tp, {"weight": 0, "bias": 0})
        return
    _swap(linear, FusedQKVColumnLinear, tp, {})
    w = linear.weight.data
    _distribute(linear, "weight", w.view(3, w.shape[0] // 3, w.shape[1]), 1, tp)
    if linear.bias is not None:
        _distribute(linear, "bias", linear.bias.data.view(3, -1), 1, tp)


def _parallel_embedding(emb: nn.Module, tp: TPContext, split_hidden: bool) -> None:
    if split_hidden:
        _swap(emb, HiddenParallelEmbedding, tp, {"weight": 1})
    else:
        _swap(emb, VocabParallelEmbedding, tp, {"weight": 0})


def _enter_region(module: nn.Module, tp: TPContext) -> None:
    """Forward pre-hook: replicate (mtp) or gather the sequence (sp) of the region's input."""
    def enter(_: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if not tp.sequence_parallel:
            return (_AllReduceGrad.apply(x, tp.comm), *args[1:])
        if tp.mode == "fsp":
            tp.local_input.append(x)
        return (_GatherScatter.apply(x, tp.comm, SEQ_DIM), *args[1:])

    def leave(_: nn.Module, args: tuple, out: Any) -> None:
        if tp.mode == "fsp":
            tp.local_input.pop()

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)


def _full_row_context(model: nn.Module, tp: int) -> None:
    """Sequence-parallel hidden states hold ``S/tp`` tokens, but segments, RoPE positions and
    attention cover the whole row: build the forward context for the full length."""
    original = model.forward_context

    @functools.wraps(original)
    def forward_context(x: Tensor, cu_seqlens: Any, indexes: Optional[Tensor]) -> Any:
        full = x.new_empty((x.shape[0], x.shape[1] * tp, 0))  # only shape/dtype/device are read
        return original(full, cu_seqlens, indexes)

    model.forward_context = forward_context


# ------------------------------------------------------------------------------------------
# vocab-parallel cross entropy


def _local_logits(logits: Tensor) -> Tensor:
    return logits.to_local() if hasattr(logits, "to_local") else logits


def vocab_parallel_lm_loss(logits: Tensor, labels: Tensor, comm: Comm,
                           label_smoothing: float = 0.0) -> Tensor:
    """Token-mean cross entropy of vocab-sharded ``logits [..., V/tp]`` (this rank's slice
    ``[r V/tp, (r+1) V/tp)``) against global ``labels`` — equal to
    :func:`~internevo.models.loss.lm_loss` on the full logits.

    Forward: one MAX all-reduce (row maxima) and one SUM all-reduce of ``[N, 3]`` (sum of exp,
    target logit, sum of logits for smoothing).  The sums are reduced with an all-reduce whose
    backward is the identity: every rank computes the same loss, so each rank's gradient is
    ``softmax - (1-eps) onehot - eps/V`` on its slice without any backward communication.
    """
    z = _local_logits(logits).reshape(-1, _local_logits(logits).shape[-1]).float()
    flat = labels.reshape(-1)
    vocab = z.shape[-1] * comm.layout.tensor
    start = comm.layout.tp_rank * z.shape[-1]
    row_max = all_reduce(comm, z.detach().max(-1).values, "max")
    shifted = z - row_max.unsqueeze(-1)
    local_t = flat - start
    mine = (local_t >= 0) & (local_t < z.shape[-1])
    target = shifted.gather(1, local_t.clamp(0, z.shape[-1] - 1).unsqueeze(1)).squeeze(1)
    parts = torch.stack([shifted.exp().sum(-1), target * mine, shifted.sum(-1)], dim=1)
    sums = _ReduceFromTP.apply(parts, comm)
    lse = sums[:, 0].log()
    nll = lse - sums[:, 1]
    smooth = lse - sums[:, 2] / vocab
    per_token = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    valid = flat != IGNORE_INDEX
    count = valid.sum().clamp(min=1)
    return (per_token * valid).sum() / count


@torch.no_grad()
def vocab_parallel_token_stats(logits: Tensor, labels: Tensor, type_ids: Tensor, num_types: int,
                               comm: Comm) -> dict[str, Tensor]:
    """:func:`~internevo.models.loss.token_stats` for vocab-sharded logits, without gathering
    them: MAX all-reduce of row maxima, SUM of ``[N, 2]`` (sum of exp, target logit), MIN of the
    first index attaining the maximum (argmax ties resolved as ``torch.argmax`` does)."""
    z = _local_logits(logits).reshape(-1, _local_logits(logits).shape[-1]).float()
    flat = labels.reshape(-1)
    width, start = z.shape[-1], comm.layout.tp_rank * z.shape[-1]
    local_max, local_arg = z.max(-1)
    row_max = all_reduce(comm, local_max, "max")
    local_t = flat - start
    mine = (local_t >= 0) & (local_t < width)
    target = z.gather(1, local_t.clamp(0, width - 1).unsqueeze(1)).squeeze(1) * mine
    sums = all_reduce(comm, torch.stack([(z - row_max.unsqueeze(-1)).exp().sum(-1), target], 1))
    big = width * comm.layout.tensor
    first = torch.where(local_max == row_max, local_arg + start, torch.full_like(local_arg, big))
    argmax = all_reduce(comm, first, "min")
    nll = sums[:, 0].log() + row_max - sums[:, 1]
    return type_sums(type_ids, flat != IGNORE_INDEX, num_types, argmax == flat, nll)


class VocabParallelLoss:
    """The loss callable of the trainer when logits are vocab-sharded, with its metric path."""

    def __init__(self, comm: Comm, label_smoothing: float) -> None:
        self.comm, self.label_smoothing = comm, label_smoothing

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Token-mean cross entropy (see :func:`vocab_parallel_lm_loss`)."""
        return vocab_parallel_lm_loss(logits, labels, self.comm, self.label_smoothing)

    def token_stats(self, logits: Tensor, labels: Tensor, type_ids: Tensor,
                    num_types: int) -> dict[str, Tensor]:
        """Per-type metric sums (see :func:`vocab_parallel_token_stats`)."""
        return vocab_parallel_token_stats(logits, labels, type_ids, num_types, self.comm)
