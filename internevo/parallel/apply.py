"""Apply parallelism to a single-device model, in one fixed order, and build what depends on it.

Order: build the model on the meta device (only this pipeline stage's part of it under
pipeline parallel) -> tensor / sequence parallel (or isp + weight parallel) -> activation
checkpointing -> FSDP (shard, materialise, initialise) or materialise this rank's shards on the
device and initialise each from (seed, name) (layout-independent initial weights).  The
optimizer and the loss are chosen to match (ZeRO-1.5 flat shards or
FSDP's own shards; plain, vocab-parallel or sequence-shard cross entropy).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from internevo.config import TrainConfig
from internevo.models.build import apply_activation_checkpointing, build_model
from internevo.models.init import init_weights
from internevo.models.loss import lm_loss
from internevo.parallel.comm import Comm
from internevo.parallel.fsdp import FSDPOptimizer, shard_model
from internevo.parallel.isp import SequenceShardLoss, apply_isp
from internevo.parallel.layout import ParallelLayout
from internevo.parallel.pipeline import chunk_blocks, layout_chunks, split_model
from internevo.parallel.scaler import LossScaler
from internevo.parallel.tensor import VocabParallelLoss, apply_tensor_parallel
from internevo.parallel.zero import HybridZeroOptimizer, ShardedAdamW


def parallelize(cfg: TrainConfig, layout: ParallelLayout, comm: Comm, device: torch.device,
                seed: int) -> nn.Module:
    """Build the model for this rank with every configured parallel mode applied."""
    model = build_model(cfg, seed=seed, device="meta")  # only this rank's shards are allocated
    if layout.pipeline > 1:  # keep this stage's chunks
        split_model(model, layout_chunks(cfg, layout))
    if layout.isp:
        apply_isp(model, cfg, layout, comm, device.type)
    else:
        apply_tensor_parallel(model, cfg, layout, comm, device.type)
    if cfg.model.checkpoint and layout.pipeline > 1:  # the fraction counts per chunk
        for chunk in layout_chunks(cfg, layout):
            apply_activation_checkpointing(model, cfg.model.checkpoint, chunk_blocks(model, chunk))
    elif cfg.model.checkpoint:
        apply_activation_checkpointing(model, cfg.model.checkpoint)
    if layout.fsdp:
        return shard_model(model, cfg, layout, comm, device, seed)
    if any(p.is_meta for p in model.parameters()):
        materialize(model, cfg, device, seed)
    return model


def materialize(model: nn.Module, cfg: TrainConfig, device: torch.device, seed: int) -> None:
    """Allocate the (tensor-parallel-local) parameters of a meta model on ``device`` and
    initialise each from (seed, name): its shard of the full value, one full parameter at a time
    (:func:`~internevo.models.init.init_weights`)."""
    model.to_empty(device=device)
    init_weights(model, cfg, seed)


def build_optimizer(model: nn.Module, cfg: TrainConfig, layout: ParallelLayout, comm: Comm,
                    scaler: LossScaler) -> ShardedAdamW:
    """The optimizer matching how the parameters are sharded (FSDP's shards or ZeRO-1.5's)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if layout.fsdp:
        return FSDPOptimizer(model, params, cfg, layout, comm, scaler)
    return HybridZeroOptimizer(params, cfg, layout, comm, scaler)


def build_loss(cfg: TrainConfig, layout: ParallelLayout,
               comm: Comm) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross entropy with the configured label smoothing (vocab-parallel on sharded logits)."""
    smoothing = cfg.loss.label_smoothing
    if layout.isp:
        return SequenceShardLoss(comm, smoothing)
    if layout.tensor > 1 and cfg.model.parallel_output:
        return VocabParallelLoss(comm, smoothing)
    return lambda logits, labels: lm_loss(logits, labels, smoothing)
