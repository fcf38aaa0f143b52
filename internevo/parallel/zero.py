"""Sharded AdamW: the core every sharding mode shares, and HybridZeroOptimizer (ZeRO-1.5).

:class:`ShardedAdamW` holds what does not depend on how the fp32 master weights are laid out: the
global gradient norm, overflow skipping, unscaling and clipping, the AdamW update and a
per-parameter checkpoint format.  :class:`HybridZeroOptimizer` (here) and
:class:`~internevo.parallel.fsdp.FSDPOptimizer` only say where masters and gradients live.

ZeRO-1.5 layout.  The trainable parameters (their local tensor-parallel shards) are cut into
buckets of at most ``hybrid_zero_optimizer.reduce_bucket_size`` elements, in reverse registration
order (the order backward produces gradients).  Each bucket is one flat vector padded to a multiple
of ``zero1`` and cut into ``zero1`` equal contiguous shards; zero1-rank ``r`` owns shard ``r`` of
every bucket and keeps its fp32 master copy and AdamW moments (one flat tensor, the owned shards
back to back), so optimizer-state bytes per rank are exactly ``total / zero1`` plus fewer than
``zero1`` padding elements per bucket.

One step (gradients were accumulated over ``micro_num`` backward passes without communication):

1. per bucket, **reduce-scatter** (SUM) the flat gradient (model dtype) inside the zero1 group,
   then **all-reduce** (SUM) the shard across zero1 replicas (data ranks holding the same shard),
   and divide by the data-parallel size — an average over data parallel (with ``zero1 == 1`` only
   the all-reduce over data parallel remains).  Under isp the zero1 groups cut ``weight_data``
   (``wdp = W / wp`` ranks, not ``dp = W / sp``): the sum then covers every token of the step
   once, and dividing by ``dp`` (not ``wdp``) keeps it the average over data-parallel replicas.
   With ``overlap_sync_grad`` a bucket's first collective starts asynchronously from a
   post-accumulate-grad hook as soon as the last micro-step's backward has produced all its
   gradients; ``step`` waits for it;
2. global gradient norm: local sum of squares, SUM-all-reduced over the zero1, tensor (isp:
   weight) and pipeline groups;
3. non-finite norm -> skip the update on every rank (all ranks see the same norm) and back off the
   loss scale; otherwise unscale and clip, AdamW on the master shard;
4. per bucket, **all-gather** the updated shard (model dtype) inside the zero1 group into the
   parameters.

Per step and rank the payload is ``N·g`` (reduce-scatter) + ``N·g/zo`` (replica all-reduce, only
when zo < dp) + ``N·g`` (all-gather), with ``N`` padded elements and ``g`` bytes per element of the
model dtype; InternEvo's all-reduce + broadcast moves ``2·N·g + N·g``.  docs/parallel.md has the
comparison and the formulas of every mode.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from internevo.config import TrainConfig
from internevo.models.registry import get_spec
from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout
from internevo.parallel.scaler import LossScaler
from internevo.parallel.sharded_state import ChunkGeometry, chunk_geometry, owned_sharded_tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = ()  # type: ignore[assignment]

STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")
_NORM_PIECE = 1 << 20
"""Elements squared at a time in the gradient norm."""


@dataclass
class StepOutcome:
    """What one optimizer step did."""

    success: bool
    """False when the update was skipped (non-finite gradients)."""
    grad_norm: float
    """Global gradient norm before clipping, unscaled (inf/nan on overflow)."""
    loss_scale: float
    """Loss scale the gradients of this step carried."""


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


def is_tensor_sharded(p: torch.Tensor) -> bool:
    """True for a DTensor sharded over some mesh dimension (tensor parallel)."""
    return isinstance(p, DTensor) and any(pl.is_shard() for pl in p.placements)


# ------------------------------------------------------------------------------------------
# the shared core


class ShardedAdamW:
    """AdamW on this rank's fp32 master tensors, with clipping, loss scaling and overflow skipping.

    Subclasses lay out the masters and implement :meth:`reduce_gradients` (the fp32 gradient of
    each master, averaged over data parallel), :meth:`after_update`, and the two conversions
    between masters-shaped tensors and full per-parameter tensors (:meth:`gather_full`,
    :meth:`shard_full`) that make checkpoints independent of the layout.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], masters: list[torch.Tensor],
                 cfg: TrainConfig, layout: ParallelLayout, comm: Comm, scaler: LossScaler):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.layout, self.comm, self.scaler = layout, comm, scaler
        self.clip = cfg.hybrid_zero_optimizer.clip_grad_norm
        self.checkpoint_shape = get_spec(cfg.model_type).checkpoint_shape
        """Model spec: the layout-independent shape a parameter is saved in (None: its own)."""
        self.masters = masters
        self.norm_weights: list[Optional[torch.Tensor]] = [None] * len(masters)
        """Per master: weights of each element in the gradient norm (None = all 1)."""
        self.pre_reduce_hooks: list[Callable[[], None]] = []
        """Called at the start of :meth:`step` (e.g. tensor-parallel norm-gradient reduction)."""
        # the fused kernel is one pass over the masters (~6x faster than the per-op loop on CPU)
        fused = all(type(m) is torch.Tensor and m.dtype == torch.float32 for m in masters)
        self.inner = torch.optim.AdamW(masters, lr=cfg.adam.lr, eps=cfg.adam.adam_eps,
                                       betas=(cfg.adam.adam_beta1, cfg.init_beta2),
                                       weight_decay=cfg.adam.weight_decay, fused=fused or None)
        for m in masters:  # allocated now so that state bytes and checkpoints exist from step 0
            step = torch.tensor(0.0, device=m.device if fused else "cpu")
            self.inner.state[m] = {"step": step, "exp_avg": torch.zeros_like(m),
                                   "exp_avg_sq": torch.zeros_like(m)}

    # ------------------------------------------------------------------ what subclasses define
    def start_micro_step(self, last: bool) -> None:
        """Called before each micro-batch; ``last`` marks the one whose backward ends the step."""

    def reduce_gradients(self) -> list[torch.Tensor]:
        """This rank's fp32 gradient of each master, averaged over data parallel."""
        raise NotImplementedError

    def after_update(self) -> None:
        """Bring the model parameters up to date after a successful update."""

    def gather_full(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Masters-shaped ``tensors`` -> one full (tensor-parallel-local) tensor per parameter."""
        raise NotImplementedError

    def shard_full(self, fulls: list[torch.Tensor]) -> list[torch.Tensor]:
        """One full tensor per parameter -> this rank's part of each master."""
        raise NotImplementedError

    def refresh_masters_from_params(self) -> None:
        """After loading model weights only: masters take the (possibly lower-precision) weights."""
        raise NotImplementedError

    def owned(self) -> list[tuple[int, dict[str, torch.Tensor]]]:
        """Per parameter: where this rank's elements start in the row-major order of the
        parameter's (tensor-parallel-local) shard, and those elements of each state tensor
        (``master``, ``exp_avg``, ``exp_avg_sq``) as 1-D views (empty when it owns none)."""
        raise NotImplementedError

    def tensor_chunk(self, i: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shape and global offset of parameter ``i``'s tensor-parallel shard (a DTensor's local
        chunk; the whole parameter otherwise)."""
        p = self.params[i]
        if isinstance(p, DTensor):
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh,
                                                                  p.placements)
            return tuple(shape), tuple(offset)
        return tuple(p.shape), (0,) * p.dim()

    # ---------------------------------------------------------------------------- stepping
    def zero_grad(self) -> None:
        """Drop the parameters' gradients."""
        for p in self.params:
            p.grad = None

    def global_grad_norm(self, grads: list[torch.Tensor]) -> float:
        """L2 norm of the whole gradient: every shard, every tensor-parallel rank, counted once."""
        total = torch.zeros(1, dtype=torch.float64, device=self.masters[0].device)
        for grad, weight in zip(grads, self.norm_weights):
            grad = local_tensor(grad).reshape(-1)
            for start in range(0, grad.numel(), _NORM_PIECE):  # cache-sized temporaries
                sq = grad[start: start + _NORM_PIECE].square()
                if weight is not None:
                    sq *= weight[start: start + _NORM_PIECE]
                total += sq.sum(dtype=torch.float64)
        self.comm.all_reduce(total, "zero1")
        self.comm.all_reduce(total, self.layout.shard_group)
        self.comm.all_reduce(total, "pipeline")  # each stage holds different parameters
        value = total.item()
        return math.sqrt(value) if math.isfinite(value) else value

    @torch.no_grad()
    def step(self, lr: float, beta2: float) -> StepOutcome:
        """Reduce, check, clip and apply one AdamW update; skip it on non-finite gradients."""
        for hook in self.pre_reduce_hooks:
            hook()
        scale = self.scaler.scale
        grads = self.reduce_gradients()
        norm = self.global_grad_norm(grads)
        self.zero_grad()
        if not math.isfinite(norm):  # the same norm on every rank: every rank skips
            self.scaler.update(overflow=True)
            return StepOutcome(False, norm / scale, scale)
        norm /= scale
        divisor = scale * max(1.0, norm / self.clip) if self.clip > 0 else scale
        self._adamw(grads, divisor, lr, beta2)
        self.scaler.update(overflow=False)
        self.after_update()
        return StepOutcome(True, norm, scale)

    def _adamw(self, grads: list[torch.Tensor], divisor: float, lr: float, beta2: float) -> None:
        """Unscale + clip (one division) and run the inner AdamW on the masters."""
        if divisor != 1.0:
            torch._foreach_div_([local_tensor(g) for g in grads], divisor)
        for master, grad in zip(self.masters, grads):
            master.grad = grad
        group = self.inner.param_groups[0]
        group["lr"], group["betas"] = lr, (group["betas"][0], beta2)
        self.inner.step()
        for master in self.masters:
            master.grad = None

    # ------------------------------------------------------------------------- checkpoints
    def _state_tensors(self) -> dict[str, list[torch.Tensor]]:
        states = [self.inner.state[m] for m in self.masters]
        return {"master": list(self.masters), "exp_avg": [s["exp_avg"] for s in states],
                "exp_avg_sq": [s["exp_avg_sq"] for s in states]}

    def state_dict(self) -> dict:
        """Per-parameter fp32 master weights and AdamW moments, in full (tensor-parallel-local)
        shapes, gathered over zero1 (every rank holds all of it: for tools and tests;
        checkpoints use :meth:`sharded_state_dict`).

        ``{"params": {name: {"master", "exp_avg", "exp_avg_sq"}}, "step": float, "scaler": dict}``.
        """
        per_param: dict[str, dict[str, torch.Tensor]] = {n: {} for n in self.names}
        for key, tensors in self._state_tensors().items():
            for name, full in zip(self.names, self.gather_full(tensors)):
                per_param[name][key] = full
        return {"params": per_param, **self._scalars()}

    def sharded_state_dict(self) -> dict:
        """:meth:`state_dict` without gathering: each entry is a ShardedTensor of the parameter's
        global (checkpoint) shape whose local shards are views of what this rank owns, so DCP
        writes every element once and loads in place, into any other layout
        (internevo/parallel/sharded_state.py)."""
        rank = self.layout.rank
        per_param = {}
        for name, geometry, (start, views) in zip(self.names, self._geometries(), self.owned()):
            per_param[name] = {key: owned_sharded_tensor(view, start, geometry, rank)
                               for key, view in views.items()}
        return {"params": per_param, **self._scalars()}

    def _geometries(self) -> list[ChunkGeometry]:
        if getattr(self, "_geometry_cache", None) is None:
            self._geometry_cache = []
            for i, (name, p) in enumerate(zip(self.names, self.params)):
                shape = tuple(p.shape)
                self._geometry_cache.append(chunk_geometry(
                    name, shape, *self.tensor_chunk(i), self.checkpoint_shape(name, shape)))
        return self._geometry_cache

    def _scalars(self) -> dict:
        return {"step": float(self.inner.state[self.masters[0]]["step"]),
                "scaler": self.scaler.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """Restore masters and moments from :meth:`state_dict` output (any zero1 / dp / FSDP),
        or the step and scaler after DCP loaded :meth:`sharded_state_dict` in place."""
        for key, targets in self._state_tensors().items():
            entries = [sd["params"][n][key] for n in self.names]
            if all(isinstance(e, ShardedTensor) for e in entries):
                continue  # views of this rank's state: DCP already wrote into them
            pieces = self.shard_full([local_tensor(e) for e in entries])
            for target, piece in zip(targets, pieces):
                local_tensor(target).copy_(piece)
        for m in self.masters:
            self.inner.state[m]["step"].fill_(sd["step"])
        self.scaler.load_state_dict(sd["scaler"])

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (fp32 master + two AdamW moments)."""
        return sum(local_tensor(t).numel() * local_tensor(t).element_size()
                   for tensors in self._state_tensors().values() for t in tensors)


# ------------------------------------------------------------------------------------------
# ZeRO-1.5


@dataclass
class Bucket:
    """Parameters whose gradients are reduced together (one flat vector, one shard per rank)."""

    indices: list[int]
    """Parameter indices, in flat order."""
    numel: int
    """Elements before padding."""
    shard: int
    """Elements per zero1 rank: ``ceil(numel / zero1)``."""
    offset: int
    """Start of this bucket's shard inside the rank's flat master."""
    dtype: torch.dtype = torch.float32
    """Dtype the gradients and gathered parameters travel in."""
    ready: int = 0
    """Parameters whose last-micro-step gradient has arrived (overlap)."""
    work: Any = None
    """The pending asynchronous collective, once launched."""
    buffers: list[torch.Tensor] = field(default_factory=list)
    """(flat input, shard output) kept alive while the collective runs."""


def plan_buckets(numels: list[int], bucket_size: int, zero1: int) -> list[Bucket]:
    """Greedy buckets of <= ``bucket_size`` elements over the parameters in reverse order.

    Reverse order, because backward produces gradients roughly from the last layer to the first.
    A parameter larger than ``bucket_size`` gets a bucket of its own.
    """
    groups: list[list[int]] = [[]]
    count = 0
    for i in reversed(range(len(numels))):
        if groups[-1] and count + numels[i] > bucket_size:
            groups.append([])
            count = 0
        groups[-1].append(i)
        count += numels[i]
    buckets, offset = [], 0
    for indices in (g for g in groups if g):
        numel = sum(numels[i] for i in indices)
        buckets.append(Bucket(indices, numel, math.ceil(numel / zero1), offset))
        offset += buckets[-1].shard
    return buckets


class HybridZeroOptimizer(ShardedAdamW):
    """ZeRO-1.5: fp32 masters and AdamW moments sharded over zero1, bucketed gradient reduction."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], cfg: TrainConfig,
                 layout: ParallelLayout, comm: Comm, scaler: LossScaler):
        params = [p for _, p in named_params]
        self.numels = [local_tensor(p).numel() for p in params]
        self.shapes = [local_tensor(p).shape for p in params]
        self.total = sum(self.numels)
        self.device = local_tensor(params[0]).device
        """Where the parameters, and so every flat buffer and master, live."""
        hz = cfg.hybrid_zero_optimizer
        self.buckets = plan_buckets(self.numels, hz.reduce_bucket_size, layout.zero1)
        for b in self.buckets:
            b.dtype = functools.reduce(torch.promote_types,
                                       [local_tensor(params[i]).dtype for i in b.indices])
        self.shard_size = sum(b.shard for b in self.buckets)
        self.layout, self.params = layout, params  # the master shards are cut before super()
        self.master = self._to_shards([local_tensor(p.detach()) for p in params], torch.float32)
        super().__init__(named_params, [self.master], cfg, layout, comm, scaler)
        self.norm_weights = [self._build_norm_weight()]
        self.overlap = hz.overlap_sync_grad
        self._armed = False
        if self.overlap:
            self._register_grad_hooks()

    def _register_grad_hooks(self) -> None:
        """``overlap_sync_grad``: each parameter reports its final gradient to its bucket."""
        self._bucket_of = {i: b for b in self.buckets for i in b.indices}
        for i, p in enumerate(self.params):
            p.register_post_accumulate_grad_hook(functools.partial(self._grad_ready, i))

    # -------------------------------------------------------------------------- flat views
    def _part(self, b: Bucket) -> slice:
        """This rank's shard inside bucket ``b``'s padded flat vector."""
        start = self.layout.zero1_rank * b.shard
        return slice(start, start + b.shard)

    def _bucket_flat(self, b: Bucket, tensors: list[torch.Tensor], dtype: torch.dtype,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Bucket ``b``'s parameters' ``tensors`` as one zero-padded flat vector (into ``out``)."""
        if out is None:
            out = torch.empty(b.shard * self.layout.zero1, dtype=dtype, device=self.device)
        flat = out
        flat[b.numel:].zero_()
        torch.cat([tensors[i].reshape(-1).to(dtype) for i in b.indices], out=flat[: b.numel])
        return flat

    def _grad_target(self, b: Bucket) -> Optional[torch.Tensor]:
        """Where bucket ``b``'s flat gradient goes when it is already the fp32 master-layout shard
        (zero1 == 1, fp32 bucket): a slice of one persistent buffer, so that
        :meth:`reduce_gradients` needs neither a per-step allocation nor a concatenation."""
        if self.layout.zero1 != 1 or b.dtype != torch.float32:
            return None
        if getattr(self, "_grad_buffer", None) is None:
            self._grad_buffer = torch.empty(self.shard_size, dtype=torch.float32,
                                            device=self.master.device)
        return self._grad_buffer[b.offset: b.offset + b.shard]

    def _to_shards(self, tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Per-parameter ``tensors`` -> this rank's flat shards (master layout)."""
        return torch.cat([self._bucket_flat(b, tensors, dtype)[self._part(b)]
                          for b in self.buckets])

    def _gather(self, shards: torch.Tensor,
                dtype: Optional[torch.dtype] = None) -> list[torch.Tensor]:
        """Master-layout ``shards`` of every zero1 rank -> per-parameter full tensors.

        One all-gather per bucket, in ``dtype`` (default: the bucket's dtype).
        """
        out: list[torch.Tensor] = [torch.empty(0)] * len(self.params)
        for b in self.buckets:
            mine = shards[b.offset: b.offset + b.shard].to(dtype or b.dtype)
            if self.layout.zero1 == 1:  # nothing to gather: a view (callers copy out of it)
                full = mine
            else:
                full = mine.new_empty(b.shard * self.layout.zero1)
                self.comm.all_gather(full, mine, "zero1")
            pieces = torch.split(full[: b.numel], [self.numels[i] for i in b.indices])
            for i, piece in zip(b.indices, pieces):
                out[i] = piece.view(self.shapes[i])
        return out

    def _build_norm_weight(self) -> Optional[torch.Tensor]:
        """Params replicated over the shard group (tensor; isp: weight) would be counted once per
        shard-group rank in the norm: count them once."""
        group = self.layout.shard_group
        if self.layout.size(group) == 1 or self.layout.rank_in(group) == 0:
            return None
        weights = [torch.full((n,), 1.0 if is_tensor_sharded(p) else 0.0, device=self.device)
                   for p, n in zip(self.params, self.numels)]
        return self._to_shards(weights, torch.float32)

    # ------------------------------------------------------------------ gradient reduction
    def start_micro_step(self, last: bool) -> None:
        """With ``overlap_sync_grad``, arm the gradient hooks for the last micro-step's backward."""
        self._armed = self.overlap and last
        for b in self.buckets:
            b.ready = 0

    def _grad_ready(self, index: int, param: torch.Tensor) -> None:
        """Post-accumulate-grad hook: launch a bucket once all its gradients are final."""
        if not self._armed:
            return
        b = self._bucket_of[index]
        b.ready += 1
        if b.ready == len(b.indices):
            self._launch(b)
            for i in b.indices:  # copied into the bucket: the full-size gradients can go
                self.params[i].grad = None

    def _launch(self, b: Bucket) -> None:
        """Start averaging bucket ``b``: reduce-scatter in zero1 (all-reduce when zero1 == 1)."""
        flat = self._bucket_flat(b, self._bucket_grads(b), b.dtype, self._grad_target(b))
        if self.layout.zero1 == 1:
            b.buffers, b.work = [flat], self.comm.all_reduce(flat, "zero1_replica", op="sum",
                                                             async_op=True)
        else:
            shard = flat.new_empty(b.shard)
            b.buffers = [flat, shard]
            b.work = self.comm.reduce_scatter(shard, flat, "zero1", op="sum", async_op=True)

    def _bucket_grads(self, b: Bucket) -> list[torch.Tensor]:
        """Per-parameter gradients of bucket ``b`` (zeros where a parameter got none)."""
        grads: list[torch.Tensor] = [torch.empty(0)] * len(self.params)
        for i in b.indices:
            grad = self.params[i].grad
            grads[i] = (local_tensor(grad) if grad is not None
                        else torch.zeros(self.shapes[i], device=self.device))
        return grads

    def _finish(self, b: Bucket) -> torch.Tensor:
        """Wait for bucket ``b``'s first collective, finish the average, return the fp32 shard."""
        if not b.buffers:  # never launched: no hook fired (overlap off, or unused parameters)
            self._launch(b)
        if b.work is not None:
            b.work.wait()
        shard = b.buffers[-1]
        if self.layout.zero1 > 1:
            self.comm.all_reduce(shard, "zero1_replica", op="sum")
        b.buffers, b.work = [], None
        return shard.float().div_(self.layout.data)

    def reduce_gradients(self) -> list[torch.Tensor]:
        """Average gradients over data parallel; returns this rank's fp32 gradient shard."""
        self._armed = False
        shards = [self._finish(b) for b in self.buckets]
        if all(self._grad_target(b) is not None for b in self.buckets):
            return [self._grad_buffer]  # the shards are its slices already
        return [torch.cat(shards)]

    # ----------------------------------------------------------------- parameters, checkpoints
    @torch.no_grad()
    def after_update(self) -> None:
        """Copy the updated master shards (all zero1 ranks) into the model parameters."""
        targets = [local_tensor(p) for p in self.params]
        gathered = self._gather(self.master)
        torch._foreach_copy_(targets, [v.to(t.dtype) for v, t in zip(gathered, targets)])

    gather_params = after_update

    def gather_full(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Full fp32 per-parameter tensors (DTensor under tensor parallel) from flat shards."""
        views = self._gather(tensors[0].detach(), torch.float32)
        return [_like_param(v.clone(), p) for v, p in zip(views, self.params)]

    def shard_full(self, fulls: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's flat shard of per-parameter full tensors."""
        return [self._to_shards(fulls, torch.float32)]

    def owned(self) -> list[tuple[int, dict[str, torch.Tensor]]]:
        """Each parameter's part of this rank's bucket shards (see :meth:`ShardedAdamW.owned`)."""
        states = self._state_tensors()
        out: list[tuple[int, dict[str, torch.Tensor]]] = [(0, {})] * len(self.params)
        for b in self.buckets:
            part, pos = self._part(b), 0
            for i in b.indices:
                lo = max(pos, part.start)
                hi = max(lo, min(pos + self.numels[i], part.stop))
                first = b.offset + lo - part.start
                out[i] = (lo - pos, {k: t[0].detach()[first: first + hi - lo]
                                     for k, t in states.items()})
                pos += self.numels[i]
        return out

    @torch.no_grad()
    def refresh_masters_from_params(self) -> None:
        """After loading model weights only: masters take the (possibly lower-precision) weights."""
        self.master.copy_(self._to_shards([local_tensor(p) for p in self.params], torch.float32))


def _like_param(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Wrap a local tensor as a DTensor laid out like ``p`` when ``p`` is one."""
    if isinstance(p, DTensor):
        return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())
    return t
