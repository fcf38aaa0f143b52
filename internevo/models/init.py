"""Layout-independent initialisation: every parameter from its own generator seeded by (seed, name).

No global RNG is touched, so the initial weights do not depend on construction order, on the
device, or on how parameters are later sharded: a shard is a slice of the full tensor generated
here (:func:`init_parameter`).  The rules are InternEvo's (spec §4.4):

* ``INTERNLM``: embedding and head N(0, 0.0052); ``Wqkv``, ``w1``, ``w3`` N(0, 0.006);
  ``out_proj`` and ``w2`` N(0, 0.006 / sqrt(2 (layer + 1))) with ``use_scaled_init``; biases 0.
* ``INTERNLM2_PUBLIC``: the ``*_init_std`` fields, ``wo``/``w2`` scaled the same way.
  ``init_type="uniform"`` draws U(-a, a) with ``a = sqrt(3 * std)``: InternEvo's formula, kept as
  is although ``sqrt(3) * std`` would give the std (its quirk: a much wider distribution).
* Norm weights 1.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from internevo.config import ModelConfig, TrainConfig

# module-name components added by wrappers (torch.compile, DDP, FSDP1, checkpoint_wrapper)
_WRAPPER_PARTS = {"_orig_mod", "module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}
_LAYER = re.compile(r"(?:^|\.)(?:blocks|layers)\.(\d+)\.")


@dataclass(frozen=True)
class InitRule:
    """How one parameter is initialised."""

    kind: str
    """``normal``, ``uniform``, ``zeros`` or ``ones``."""
    std: float = 0.0
    """Standard deviation (normal) or the InternEvo std from which ``a`` is derived (uniform)."""


def canonical_name(name: str) -> str:
    """Parameter name without wrapper components (what the init seed and the rules use)."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_PARTS)


def param_seed(seed: int, name: str) -> int:
    """Stable 63-bit seed of one parameter (same on every platform and Python run)."""
    digest = hashlib.sha256(f"{seed}/{canonical_name(name)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _layer_scale(name: str, m: ModelConfig) -> float:
    """``1 / sqrt(2 (layer + 1))`` for output projections under ``use_scaled_init``, else 1."""
    match = _LAYER.search(name)
    if not m.use_scaled_init or match is None:
        return 1.0
    return 1.0 / math.sqrt(2.0 * (int(match.group(1)) + 1))


def _internlm_std(name: str, m: ModelConfig) -> float | None:
    if name.endswith(("embedding.weight", "word_embeddings.weight")) or name == "head.weight":
        return 0.0052
    if name.endswith(("Wqkv.weight", "mlp.w1.weight", "mlp.w3.weight")):
        return 0.006
    if name.endswith(("out_proj.weight", "mlp.w2.weight")):
        return 0.006 * _layer_scale(name, m)
    return None


def _internlm2_std(name: str, m: ModelConfig) -> float | None:
    table = {
        "tok_embeddings.weight": m.embedding_init_std,
        "tok_embeddings.word_embeddings.weight": m.embedding_init_std,
        "output.weight": m.out_head_init_std,
        "attention.wqkv.weight": m.attn_wqkv_init_std,
        "attention.wo.weight": m.attn_other_init_std * _layer_scale(name, m),
        "feed_forward.w1.weight": m.ffn_uplayer_init_std,
        "feed_forward.w3.weight": m.ffn_uplayer_init_std,
        "feed_forward.w2.weight": m.ffn_other_init_std * _layer_scale(name, m),
    }
    for suffix, std in table.items():
        if name == suffix or name.endswith("." + suffix):
            return std
    return None


def init_rule(cfg: TrainConfig, name: str) -> InitRule:
    """The rule for parameter ``name`` of a ``cfg.model_type`` model; unknown names raise."""
    name = canonical_name(name)
    if re.search(r"norm\d*\.weight$", name):
        return InitRule("ones")
    if name.endswith(".bias"):
        return InitRule("zeros")
    if cfg.model_type == "INTERNLM":
        std, kind = _internlm_std(name, cfg.model), "normal"
    elif cfg.model_type == "INTERNLM2_PUBLIC":
        std, kind = _internlm2_std(name, cfg.model), cfg.model.init_type
    else:
        raise ValueError(f"no initialisation rules for model_type {cfg.model_type!r}")
    if std is None:
        raise KeyError(f"no initialisation rule for parameter {name!r} of {cfg.model_type}")
    return InitRule(kind, std)


def init_parameter(cfg: TrainConfig, name: str, shape: torch.Size | tuple[int, ...],
                   seed: int) -> torch.Tensor:
    """The FULL fp32 initial value of parameter ``name`` (on CPU), a function of (seed, name)."""
    rule = init_rule(cfg, name)
    if rule.kind == "ones":
        return torch.ones(shape)
    if rule.kind == "zeros":
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed(param_seed(seed, name))
    out = torch.empty(shape)
    if rule.kind == "uniform":
        a = math.sqrt(3.0 * rule.std)
        return out.uniform_(-a, a, generator=gen)
    return out.normal_(0.0, rule.std, generator=gen)


@torch.no_grad()
def init_weights(model: nn.Module, cfg: TrainConfig, seed: int) -> None:
    """Initialise every parameter of ``model`` in place from (seed, name), whatever its dtype.

    A DTensor parameter (FSDP2 / DTensor tensor parallel) receives its local shard of the full
    tensor; the shard is cut locally (no communication), since every rank generates the same values.
    """
    for name, param in model.named_parameters():
        full = init_parameter(cfg, name, tuple(param.shape), seed)
        _copy_into(param, full)


def _copy_into(param: torch.Tensor, full: torch.Tensor) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        full = distribute_tensor(full.to(param.device), param.device_mesh, param.placements,
                                 src_data_rank=None)
        param.to_local().copy_(full.to_local())
    else:
        param.copy_(full)
