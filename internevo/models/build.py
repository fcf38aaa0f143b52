"""Building a registered model: meta construction, dtype casting, initialisation, activation
checkpointing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import nn

from internevo.config import TrainConfig
from internevo.models.common import Block, RMSNorm
from internevo.models.init import init_weights
from internevo.models.registry import get_spec

_DTYPES = {
    "torch.float32": torch.float32,
    "torch.tf32": torch.float32,  # fp32 parameters; TF32 matmuls are a backend switch
    "torch.bfloat16": torch.bfloat16,
    "torch.float16": torch.float16,
}


def model_dtype(cfg: TrainConfig) -> torch.dtype:
    """Parameter dtype of ``cfg.model.dtype`` (``torch.tf32`` -> float32)."""
    if cfg.model.dtype not in _DTYPES:
        raise ValueError(f"model.dtype {cfg.model.dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[cfg.model.dtype]


def build_model(cfg: TrainConfig, seed: int = 1024,
                device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Build, initialise (from seed and parameter names) and cast the model of ``cfg``.

    The values equal "build in fp32, initialise, cast to ``cfg.model.dtype``" (norm weights stay
    fp32 with ``cfg.use_fp32_norm``), but the model is built on the meta device and each fp32 value
    is copied straight into its final dtype, so no fp32 copy of the whole model is ever allocated.
    ``device="meta"`` returns the uninitialised meta model (for FSDP: shard, ``to_empty``, then
    :func:`~internevo.models.init.init_weights`).
    """
    spec = get_spec(cfg.model_type)
    with torch.device("meta"):
        model = spec.build(cfg)
    model.to(model_dtype(cfg))
    if cfg.use_fp32_norm:
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.float()
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    init_weights(model, cfg, seed)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (full sizes for DTensor shards; shared tensors once)."""
    return sum(p.numel() for p in model.parameters())


def apply_activation_checkpointing(model: nn.Module, fraction: Union[bool, float],
                                   blocks: Optional[Sequence[nn.Module]] = None) -> int:
    """Recompute the first ``int(L * fraction)`` blocks in backward (True = all, False = none).

    ``blocks``: the blocks to count from (default: all of the model's; a pipeline chunk passes its
    own, as InternEvo counts ``L`` per chunk).

    Non-reentrant ``torch.utils.checkpoint`` (RNG state preserved, so dropout masks match) run
    inside each block: parameter names and ``state_dict()`` keys are unchanged.  Returns the number
    of checkpointed blocks.  (InternEvo's InternLM2 compares the layer index with the unrounded
    product, e.g. 32 x 0.2 -> 7 layers; here it is ``int()`` for both models.)
    """
    blocks = model.transformer_blocks() if blocks is None else blocks
    frac = 1.0 if fraction is True else float(fraction)
    count = int(len(blocks) * frac)
    for i, block in enumerate(blocks):
        if not isinstance(block, Block):
            raise TypeError(f"block {i} is a {type(block).__name__}, not a checkpointable Block")
        block.recompute = i < count
    return count
