"""ParallelLayout: the one object that describes how the world is cut into parallel groups.

Ranks are laid out as InternEvo does (spec §3.1), fastest-varying first: tensor, then data, then
pipeline::

    global_rank = pp_rank * (tp * dp) + dp_rank * tp + tp_rank

Every group is sliced from that grid.  ZeRO-1.5 cuts each data-parallel group into blocks of
``zero1`` consecutive data ranks (``zero1`` groups: optimizer states are sharded inside a block)
and links the ranks holding the same shard across blocks (``zero1_replica`` groups: gradients are
summed across blocks, states are replicated).

The same grid as a 4-D ``DeviceMesh`` (for FSDP2 and DTensor) is :meth:`ParallelLayout.device_mesh`,
with dimensions ``("pipeline", "zero1_replica", "zero1", "tensor")``: row-major over those
dimensions it enumerates the global ranks in order, so each mesh dimension's groups are exactly
the layout's groups of that name.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Optional

from internevo.config import ConfigError, TrainConfig

GROUP_NAMES = ("world", "tensor", "data", "pipeline", "zero1", "zero1_replica")
MESH_DIMS = ("pipeline", "zero1_replica", "zero1", "tensor")


@dataclass
class ParallelLayout:
    """Sizes of every parallel dimension, this rank's coordinates and its process groups."""

    world_size: int = 1
    """Number of processes."""
    rank: int = 0
    """This process's global rank."""
    tensor: int = 1
    """Tensor-parallel degree."""
    pipeline: int = 1
    """Pipeline-parallel degree."""
    zero1: int = 1
    """Ranks sharing one copy of the optimizer states (resolved: 1 <= zero1 <= data)."""
    tensor_mode: str = "mtp"
    """mtp / msp / fsp."""
    fsdp: bool = False
    """Parameters and gradients sharded with FSDP2 over the zero1 group."""
    groups: dict[str, Any] = field(default_factory=dict, repr=False)
    """Process groups by name (only those of more than one rank, filled by ``build_groups``)."""
    _mesh: Any = field(default=None, repr=False)

    # ------------------------------------------------------------------------------- sizes
    @property
    def data(self) -> int:
        """Data-parallel degree."""
        return self.world_size // (self.tensor * self.pipeline)

    @property
    def tp_rank(self) -> int:
        """Rank inside the tensor group."""
        return self.rank % self.tensor

    @property
    def dp_rank(self) -> int:
        """Rank inside the data group."""
        return (self.rank // self.tensor) % self.data

    @property
    def pp_rank(self) -> int:
        """Pipeline stage of this rank."""
        return self.rank // (self.tensor * self.data)

    @property
    def zero1_rank(self) -> int:
        """Which optimizer shard this rank owns."""
        return self.dp_rank % self.zero1

    @property
    def is_log_rank(self) -> bool:
        """The rank that writes logs and metrics: first tensor/data rank of the last stage."""
        return self.tp_rank == 0 and self.dp_rank == 0 and self.pp_rank == self.pipeline - 1

    def size(self, name: str) -> int:
        """Number of ranks in this rank's group ``name``."""
        return len(self.ranks(name))

    def rank_in(self, name: str) -> int:
        """This rank's index inside its group ``name``."""
        return self.ranks(name).index(self.rank)

    def ranks(self, name: str) -> list[int]:
        """Global ranks of this rank's group ``name``."""
        for members in enumerate_groups(self, name):
            if self.rank in members:
                return members
        raise KeyError(name)

    def group(self, name: str) -> Optional[Any]:
        """The process group ``name``, or None when it has one member (no collective needed)."""
        if name not in GROUP_NAMES:
            raise KeyError(f"unknown group {name!r}; known: {', '.join(GROUP_NAMES)}")
        return self.groups.get(name)

    # ------------------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg: TrainConfig, world_size: int, rank: int) -> ParallelLayout:
        """Validate the ``parallel`` section against ``world_size`` and resolve derived sizes."""
        p = cfg.parallel
        where = f"{cfg.source or '<config>'}: parallel"
        tp, pp = p.tensor.size, p.pipeline.size
        if p.tensor.mode == "isp" or p.weight.size > 1:
            raise ConfigError(f"{where}.tensor.mode: 'isp' and weight parallel are not implemented "
                              "yet; use mtp, msp or fsp")
        if pp > 1:
            raise ConfigError(f"{where}.pipeline.size={pp}: pipeline parallel is not implemented "
                              "yet; use 1")
        if world_size % (tp * pp):
            raise ConfigError(f"{where}: world size {world_size} is not divisible by "
                              f"tensor.size*pipeline.size = {tp}*{pp}")
        dp = world_size // (tp * pp)
        zo = dp if p.zero1.size <= 0 else p.zero1.size
        if dp % zo:
            raise ConfigError(f"{where}.zero1.size={zo} does not divide the data-parallel size "
                              f"{dp} (world {world_size} / tensor {tp} / pipeline {pp})")
        _check_divisible_by_tensor(cfg, tp, where)
        return cls(world_size=world_size, rank=rank, tensor=tp, pipeline=pp, zero1=zo,
                   tensor_mode=p.tensor.mode, fsdp=p.zero1.fsdp)

    def build_groups(self) -> ParallelLayout:
        """Create the process groups (every rank creates every group, in the same order)."""
        import torch.distributed as dist

        for name in GROUP_NAMES:
            for members in enumerate_groups(self, name):
                if len(members) == 1:
                    continue
                group = dist.group.WORLD if name == "world" else dist.new_group(members)
                if self.rank in members:
                    self.groups[name] = group
        return self

    def device_mesh(self, device_type: str = "cpu") -> Any:
        """The rank grid as a DeviceMesh with dims :data:`MESH_DIMS` (built once, collectively).

        Every rank must call it (it creates one process group per mesh slice).  Slice it by name,
        e.g. ``mesh["zero1_replica", "zero1"]`` for hybrid sharding.
        """
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            shape = (self.pipeline, self.data // self.zero1, self.zero1, self.tensor)
            self._mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
        return self._mesh

    def describe(self) -> str:
        """One line for the log: sizes and this rank's coordinates."""
        return (f"world={self.world_size} dp={self.data} tp={self.tensor}({self.tensor_mode}) "
                f"pp={self.pipeline} zero1={self.zero1}{' fsdp' if self.fsdp else ''} | rank "
                f"{self.rank}: dp_rank={self.dp_rank} tp_rank={self.tp_rank} "
                f"pp_rank={self.pp_rank}")


def _check_divisible_by_tensor(cfg: TrainConfig, tp: int, where: str) -> None:
    """Reject model shapes the tensor-parallel split cannot cut evenly."""
    if tp == 1:
        return
    m = cfg.model
    for label, value in (("num_attention_heads", m.num_attention_heads),
                         ("num_kv_attention_heads", cfg.num_kv_heads),
                         ("vocab_size", m.vocab_size)):  # embedding and head split the vocab
        if value % tp:
            raise ConfigError(f"{where}.tensor.size={tp} does not divide model.{label}={value}")
    if cfg.parallel.tensor.mode in ("msp", "fsp") and cfg.packed_length % tp:
        raise ConfigError(f"{where}.tensor.size={tp} does not divide the packed row length "
                          f"seq_len*micro_bsz = {cfg.packed_length} (needed by sequence parallel)")


def enumerate_groups(layout: ParallelLayout, name: str) -> list[list[int]]:
    """All groups of kind ``name`` as lists of global ranks, in a fixed order."""
    tp, dp, pp, zo = layout.tensor, layout.data, layout.pipeline, layout.zero1

    def rank(p: int, d: int, t: int) -> int:
        return p * tp * dp + d * tp + t

    if name == "world":
        return [list(range(layout.world_size))]
    if name == "tensor":
        return [[rank(p, d, t) for t in range(tp)] for p in range(pp) for d in range(dp)]
    if name == "data":
        return [[rank(p, d, t) for d in range(dp)] for p in range(pp) for t in range(tp)]
    if name == "pipeline":
        return [[rank(p, d, t) for p in range(pp)] for d in range(dp) for t in range(tp)]
    if name == "zero1":
        return [[rank(p, b * zo + z, t) for z in range(zo)]
                for p, b, t in itertools.product(range(pp), range(dp // zo), range(tp))]
    if name == "zero1_replica":
        return [[rank(p, b * zo + z, t) for b in range(dp // zo)]
                for p, z, t in itertools.product(range(pp), range(zo), range(tp))]
    raise KeyError(f"unknown group {name!r}; known: {', '.join(GROUP_NAMES)}")
