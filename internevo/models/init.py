"""Layout-independent initialisation: every parameter from its own generator seeded by (seed, name).

No global RNG is touched, so the initial weights do not depend on construction order, on the
device, or on how parameters are later sharded: a shard is a slice of the full tensor generated
here (:func:`init_parameter`).  Norm weights are 1 and biases 0; every other parameter's std
(and normal / uniform) comes from the model's spec (``spec.init_std``, ``spec.init_kind``: the
rules are InternEvo's, spec §4.4, and live in ``models/<name>/spec.py``).  ``uniform`` draws
U(-a, a) with ``a = sqrt(3 * std)``: InternEvo's formula, kept as is although ``sqrt(3) * std``
would give the std (its quirk: a much wider distribution).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from internevo.config import TrainConfig
from internevo.models.registry import get_spec

# module-name components added by wrappers (torch.compile, DDP, FSDP1, checkpoint_wrapper)
_WRAPPER_PARTS = {"_orig_mod", "module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}


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


def init_rule(cfg: TrainConfig, name: str) -> InitRule:
    """The rule for parameter ``name`` of a ``cfg.model_type`` model; unknown names raise."""
    name = canonical_name(name)
    if re.search(r"norm\d*\.weight$", name):
        return InitRule("ones")
    if name.endswith(".bias"):
        return InitRule("zeros")
    spec = get_spec(cfg.model_type)
    std = spec.init_std(name, spec.layer_index(name), cfg.model)
    if std is None:
        raise KeyError(f"no initialisation rule for parameter {name!r} of {cfg.model_type}")
    return InitRule(spec.init_kind(cfg.model), std)


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
