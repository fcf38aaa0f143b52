"""HybridZeroOptimizer: fp32 master weights and AdamW states sharded over zero1 groups (ZeRO-1.5).

All trainable parameters (their local tensor-parallel shards) are viewed as one flat vector,
padded to a multiple of ``zero1`` and cut into equal contiguous shards; zero1-rank ``r`` owns
shard ``r`` and keeps its fp32 master copy and AdamW moments, so optimizer-state bytes per rank
are exactly ``total / zero1`` (plus < zero1 padding elements).

One step (gradients were accumulated over ``micro_num`` backward passes without communication):

1. flatten the gradients (model dtype) and **reduce-scatter** them (AVG) inside the zero1 group;
2. **all-reduce** (AVG) the shard across zero1 replicas (data ranks holding the same shard) —
   together this averages over the whole data-parallel group;
3. global gradient norm: local sum of squares, SUM-all-reduced over zero1 and tensor groups;
4. non-finite norm -> skip the update on every rank (all ranks see the same norm) and back off the
   loss scale; otherwise unscale and clip, AdamW on the master shard;
5. **all-gather** the updated shard (model dtype) inside the zero1 group into the parameters.

Per step and rank the payload is ``N·g`` (reduce-scatter) + ``N·g/zo`` (replica all-reduce, only
when zo < dp) + ``N·g`` (all-gather), with ``N`` padded elements and ``g`` bytes per element of the
model dtype; InternEvo's all-reduce + broadcast moves the same gradient volume twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from internevo.config import TrainConfig
from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout
from internevo.train.schedules import LossScaler

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = ()  # type: ignore[assignment]

STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")


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


class HybridZeroOptimizer:
    """AdamW over flat fp32 master shards, with clipping, loss scaling and overflow skipping."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], cfg: TrainConfig,
                 layout: ParallelLayout, comm: Comm, scaler: LossScaler):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.layout, self.comm, self.scaler = layout, comm, scaler
        self.clip = cfg.hybrid_zero_optimizer.clip_grad_norm
        self.numels = [local_tensor(p).numel() for p in self.params]
        self.total = sum(self.numels)
        self.shard_size = math.ceil(self.total / layout.zero1)
        self.pre_reduce_hooks: list[Callable[[], None]] = []
        """Called at the start of :meth:`step` (e.g. tensor-parallel norm-gradient reduction)."""
        self.master = self._flat_params(torch.float32)[self._my_slice()].clone()
        self.inner = torch.optim.AdamW([self.master], lr=cfg.adam.lr, eps=cfg.adam.adam_eps,
                                       betas=(cfg.adam.adam_beta1, cfg.init_beta2),
                                       weight_decay=cfg.adam.weight_decay)
        self.inner.state[self.master] = {"step": torch.tensor(0.0),
                                         "exp_avg": torch.zeros_like(self.master),
                                         "exp_avg_sq": torch.zeros_like(self.master)}
        self._norm_weight = self._build_norm_weight()

    # -------------------------------------------------------------------------- flat views
    def _my_slice(self) -> slice:
        start = self.layout.zero1_rank * self.shard_size
        return slice(start, start + self.shard_size)

    def _flat(self, tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        flat = torch.zeros(self.shard_size * self.layout.zero1, dtype=dtype)
        torch.cat([t.reshape(-1).to(dtype) for t in tensors], out=flat[: self.total])
        return flat

    def _flat_params(self, dtype: torch.dtype) -> torch.Tensor:
        return self._flat([local_tensor(p.detach()) for p in self.params], dtype)

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a full flat vector shaped like each local parameter."""
        pieces = torch.split(flat[: self.total], self.numels)
        return [v.view(local_tensor(p).shape) for v, p in zip(pieces, self.params)]

    def _build_norm_weight(self) -> torch.Tensor | None:
        """Tensor-replicated params would be counted ``tp`` times in the norm: count them once."""
        if self.layout.tensor == 1 or self.layout.tp_rank == 0:
            return None
        weights = [torch.full((n,), 0.0 if not is_tensor_sharded(p) else 1.0)
                   for p, n in zip(self.params, self.numels)]
        return self._flat(weights, torch.float32)[self._my_slice()]

    # ----------------------------------------------------------------------------- stepping
    def zero_grad(self) -> None:
        """Drop the parameters' gradients."""
        for p in self.params:
            p.grad = None

    def reduce_gradients(self) -> torch.Tensor:
        """Average gradients over data parallel; returns this rank's fp32 gradient shard."""
        grads = [local_tensor(p.grad) if p.grad is not None else torch.zeros_like(local_tensor(p))
                 for p in self.params]
        grad_dtype = grads[0].dtype if grads else torch.float32
        flat = self._flat(grads, grad_dtype)
        shard = torch.empty(self.shard_size, dtype=grad_dtype)
        self.comm.reduce_scatter(shard, flat, "zero1", op="avg")
        self.comm.all_reduce(shard, "zero1_replica", op="avg")
        return shard.float()

    def global_grad_norm(self, shard: torch.Tensor) -> float:
        """L2 norm of the full (unscaled by nothing) gradient over all shards and tensor ranks."""
        sq = shard.square() if self._norm_weight is None else shard.square() * self._norm_weight
        total = sq.sum(dtype=torch.float64).reshape(1)
        self.comm.all_reduce(total, "zero1")
        self.comm.all_reduce(total, "tensor")
        return math.sqrt(total.item()) if math.isfinite(total.item()) else float(total.item())

    def step(self, lr: float, beta2: float) -> StepOutcome:
        """Reduce, check, clip and apply one AdamW update; skip it on non-finite gradients."""
        for hook in self.pre_reduce_hooks:
            hook()
        scale = self.scaler.scale
        shard = self.reduce_gradients()
        norm = self.global_grad_norm(shard)
        self.zero_grad()
        if not math.isfinite(norm):
            self.scaler.update(overflow=True)
            return StepOutcome(False, norm / scale, scale)
        norm /= scale
        divisor = scale * max(1.0, norm / self.clip) if self.clip > 0 else scale
        self.master.grad = shard.div_(divisor) if divisor != 1.0 else shard
        group = self.inner.param_groups[0]
        group["lr"], group["betas"] = lr, (group["betas"][0], beta2)
        self.inner.step()
        self.master.grad = None
        self.scaler.update(overflow=False)
        self.gather_params()
        return StepOutcome(True, norm, scale)

    @torch.no_grad()
    def gather_params(self) -> None:
        """Copy the updated master shards (all zero1 ranks) into the model parameters."""
        dtype = local_tensor(self.params[0]).dtype
        full = torch.empty(self.shard_size * self.layout.zero1, dtype=dtype)
        self.comm.all_gather(full, self.master.to(dtype), "zero1")
        targets = [local_tensor(p) for p in self.params]
        torch._foreach_copy_(targets, [v.to(t.dtype) for v, t in zip(self._split(full), targets)])

    # ------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Per-parameter master weights and AdamW moments (full local shapes, DTensor under TP).

        Gathered over the zero1 group so that a checkpoint does not depend on zero1 / dp sizes.
        """
        state = self.inner.state[self.master]
        flats = {"master": self.master, "exp_avg": state["exp_avg"],
                 "exp_avg_sq": state["exp_avg_sq"]}
        per_param: dict[str, dict[str, torch.Tensor]] = {n: {} for n in self.names}
        for key, shard in flats.items():
            full = torch.empty(self.shard_size * self.layout.zero1, dtype=torch.float32)
            self.comm.all_gather(full, shard.detach(), "zero1")
            for name, p, view in zip(self.names, self.params, self._split(full)):
                per_param[name][key] = _like_param(view.clone(), p)
        return {"params": per_param, "step": float(state["step"]), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        """Restore masters and moments from :meth:`state_dict` output (any zero1 / dp layout)."""
        state = self.inner.state[self.master]
        targets = {"master": self.master, "exp_avg": state["exp_avg"],
                   "exp_avg_sq": state["exp_avg_sq"]}
        for key, target in targets.items():
            tensors = [local_tensor(sd["params"][n][key]) for n in self.names]
            target.copy_(self._flat(tensors, torch.float32)[self._my_slice()])
        state["step"].fill_(sd["step"])
        self.scaler.load_state_dict(sd["scaler"])

    def refresh_masters_from_params(self) -> None:
        """After loading model weights only: masters take the (possibly lower-precision) weights."""
        self.master.copy_(self._flat_params(torch.float32)[self._my_slice()])

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (fp32 master + two AdamW moments)."""
        state = self.inner.state[self.master]
        return sum(t.numel() * t.element_size()
                   for t in (self.master, state["exp_avg"], state["exp_avg_sq"]))


def _like_param(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Wrap a local tensor as a DTensor laid out like ``p`` when ``p`` is one."""
    if isinstance(p, DTensor):
        return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())
    return t
