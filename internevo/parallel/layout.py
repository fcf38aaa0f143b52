"""ParallelLayout: the one object that describes how the world is cut into parallel groups.

Ranks are laid out as InternEvo does (spec §3.1), fastest-varying first: tensor, then data, then
pipeline::

    global_rank = pp_rank * (tp * dp) + dp_rank * tp + tp_rank

Every group is sliced from that grid.  ZeRO-1.5 cuts each data-parallel group into blocks of
``zero1`` consecutive data ranks (``zero1`` groups: optimizer states are sharded inside a block)
and links the ranks holding the same shard across blocks (``zero1_replica`` groups: gradients are
summed across blocks, states are replicated).

Under ``tensor.mode="isp"`` the tensor size is the sequence-parallel degree ``sp`` and weight
parallel is laid out independently of it (spec §3.1, §3.3): ``weight`` groups are consecutive
blocks of ``wp`` ranks, ``weight_data`` groups stride by ``wp`` (``wdp = W / (pp * wp)``
members), and ZeRO works inside ``weight_data``: each block of ``wp * zero1`` ranks holds one
``zero1`` group per weight lane (stride ``wp``), ``zero1_replica`` links the blocks.

The same grid as a 4-D ``DeviceMesh`` (for FSDP2 and DTensor) is :meth:`ParallelLayout.device_mesh`,
with dimensions ``("pipeline", "zero1_replica", "zero1", "tensor")``: row-major over those
dimensions it enumerates the global ranks in order, so each mesh dimension's groups are exactly
the layout's groups of that name.
"""

from __future__ import annotations

import datetime
import itertools
from dataclasses import dataclass, field
from typing import Any, Optional

from internevo.config import ConfigError, TrainConfig

GROUP_NAMES = ("world", "tensor", "data", "pipeline", "pipeline_reverse", "zero1", "zero1_replica",
               "weight", "weight_data")
"""``pipeline_reverse``: the pipeline group again, for point-to-point messages to a lower stage
(each direction its own communicator: see ``parallel/pipeline.py``)."""
MESH_DIMS = ("pipeline", "zero1_replica", "zero1", "tensor")
ISP_MESH_DIMS = ("pipeline", "zero1_replica", "zero1", "weight")
"""Under isp the innermost mesh dimension is the weight group (DTensor shards live on it)."""


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
    """mtp / msp / fsp / isp."""
    weight: int = 1
    """Weight-parallel degree (isp only)."""
    fsdp: bool = False
    """Parameters and gradients sharded with FSDP2 over the zero1 group."""
    timeout_s: Optional[float] = None
    """Collective timeout of every group this layout creates (seconds; None = PyTorch's)."""
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
    def isp(self) -> bool:
        """Intern sequence parallel: tensor = sequence shards, weights sharded over ``weight``."""
        return self.tensor_mode == "isp"

    @property
    def weight_data(self) -> int:
        """Ranks holding the same weight shard in a stage (``wdp``; isp only, else 1)."""
        return self.world_size // (self.pipeline * self.weight) if self.isp else 1

    @property
    def wp_rank(self) -> int:
        """Rank inside the weight group."""
        return self.rank % self.weight

    @property
    def zero1_rank(self) -> int:
        """Which optimizer shard this rank owns."""
        if self.isp:
            return (self.rank % (self.world_size // self.pipeline)) // self.weight % self.zero1
        return self.dp_rank % self.zero1

    @property
    def shard_group(self) -> str:
        """The group whose ranks hold different shards of the model's sharded parameters."""
        return "weight" if self.isp else "tensor"

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
        _check_pipeline_split(cfg, pp, where)
        if world_size % (tp * pp):
            raise ConfigError(f"{where}: world size {world_size} is not divisible by "
                              f"tensor.size*pipeline.size = {tp}*{pp}")
        dp = world_size // (tp * pp)
        zero_dp, zero_what = dp, f"data-parallel size {dp} (world {world_size} / tensor {tp}"
        if p.tensor.mode == "isp":
            zero_dp = _weight_data_size(cfg, world_size, where)
            zero_what = (f"weight-data size {zero_dp} (world {world_size} / weight "
                         f"{p.weight.size}")
        zo = zero_dp if p.zero1.size <= 0 else p.zero1.size
        if zero_dp % zo:
            raise ConfigError(f"{where}.zero1.size={zo} does not divide the {zero_what} / "
                              f"pipeline {pp})")
        _check_divisible_by_tensor(cfg, tp, where)
        return cls(world_size=world_size, rank=rank, tensor=tp, pipeline=pp, zero1=zo,
                   tensor_mode=p.tensor.mode, fsdp=p.zero1.fsdp, weight=p.weight.size)

    def build_groups(self, timeout_s: Optional[float] = None) -> ParallelLayout:
        """Create the process groups (every rank creates every group, in the same order), each
        with the collective timeout ``timeout_s`` (``--timeout``; kept for later groups)."""
        import torch.distributed as dist

        if timeout_s is not None:
            self.timeout_s = timeout_s
        for name in GROUP_NAMES:
            if name.startswith("weight") and not self.isp:
                continue
            for members in enumerate_groups(self, name):
                if len(members) == 1:
                    continue
                group = (dist.group.WORLD if name == "world"
                         else dist.new_group(members, timeout=self.timeout))
                if self.rank in members:
                    self.groups[name] = group
        return self

    @property
    def timeout(self) -> Optional[datetime.timedelta]:
        """:attr:`timeout_s` as the timedelta ``new_group`` takes (None: PyTorch's default)."""
        return None if self.timeout_s is None else datetime.timedelta(seconds=self.timeout_s)

    def device_mesh(self, device_type: str = "cpu") -> Any:
        """The rank grid as a DeviceMesh with dims :data:`MESH_DIMS` (built once, collectively).

        Every rank must call it (it creates one process group per mesh slice).  Slice it by name,
        e.g. ``mesh["zero1_replica", "zero1"]`` for hybrid sharding.
        """
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            inner, dims = (self.weight, ISP_MESH_DIMS) if self.isp else (self.tensor, MESH_DIMS)
            shape = (self.pipeline, self.world_size // self.pipeline // inner // self.zero1,
                     self.zero1, inner)
            self._mesh = init_device_mesh(device_type, shape, mesh_dim_names=dims)
        return self._mesh

    def describe(self) -> str:
        """One line for the log: sizes and this rank's coordinates."""
        weight = f" wp={self.weight} wdp={self.weight_data}" if self.isp else ""
        return (f"world={self.world_size} dp={self.data} tp={self.tensor}({self.tensor_mode})"
                f"{weight} pp={self.pipeline} zero1={self.zero1}{' fsdp' if self.fsdp else ''}"
                f" | rank {self.rank}: dp_rank={self.dp_rank} tp_rank={self.tp_rank} "
                f"pp_rank={self.pp_rank}")


def _weight_data_size(cfg: TrainConfig, world_size: int, where: str) -> int:
    """``wdp = W / (pp * wp)`` after checking that ``wp`` cuts the world and every weight."""
    from internevo.models.common import ffn_hidden

    wp, pp, m = cfg.parallel.weight.size, cfg.parallel.pipeline.size, cfg.model
    if world_size % (wp * pp):
        raise ConfigError(f"{where}: world size {world_size} is not divisible by "
                          f"weight.size*pipeline.size = {wp}*{pp}")
    head_dim = m.hidden_size // m.num_attention_heads
    qkv_rows = (m.num_attention_heads + 2 * cfg.num_kv_heads) * head_dim
    for label, value in (("model.hidden_size", m.hidden_size), ("model.vocab_size", m.vocab_size),
                         ("the FFN width (hidden_size * mlp_ratio rounded to multiple_of)",
                          ffn_hidden(m.hidden_size, m.mlp_ratio, m.multiple_of)),
                         ("the fused QKV rows (heads + 2 * kv heads) * head_dim", qkv_rows)):
        if value % wp:  # every weight-parallel weight is cut into wp row blocks
            raise ConfigError(f"{where}.weight.size={wp} does not divide {label}={value}")
    return world_size // (wp * pp)


def _check_pipeline_split(cfg: TrainConfig, pp: int, where: str) -> None:
    """Every (stage, chunk) needs a layer; the interleaved schedule needs micro_num % pp == 0."""
    layers, chunks, micro = cfg.model.num_layers, cfg.model.num_chunks, cfg.data.micro_num
    if layers % chunks or layers // chunks < pp:
        raise ConfigError(f"{where}.pipeline.size={pp}: model.num_layers={layers} must be a "
                          f"multiple of model.num_chunks={chunks} with at least {pp} layers per "
                          "chunk")
    if chunks > 1 and micro % pp:
        raise ConfigError(f"{where}.pipeline.size={pp} does not divide data.micro_num={micro} "
                          f"(needed by the interleaved schedule, model.num_chunks={chunks})")


def _check_divisible_by_tensor(cfg: TrainConfig, tp: int, where: str) -> None:
    """Reject model shapes the tensor-parallel (isp: sequence-parallel) split cannot cut evenly."""
    if tp == 1:
        return
    m = cfg.model
    checks = [("num_attention_heads", m.num_attention_heads),
              ("num_kv_attention_heads", cfg.num_kv_heads)]
    if cfg.parallel.tensor.mode != "isp":  # isp splits the vocabulary over weight parallel
        checks.append(("vocab_size", m.vocab_size))  # embedding and head split the vocab
    for label, value in checks:
        if value % tp:
            raise ConfigError(f"{where}.tensor.size={tp} does not divide model.{label}={value}")
    if cfg.parallel.tensor.mode in ("msp", "fsp", "isp") and cfg.packed_length % tp:
        raise ConfigError(f"{where}.tensor.size={tp} does not divide the packed row length "
                          f"seq_len*micro_bsz = {cfg.packed_length} (needed by sequence parallel)")


def enumerate_groups(layout: ParallelLayout, name: str) -> list[list[int]]:
    """All groups of kind ``name`` as lists of global ranks, in a fixed order."""
    tp, dp, pp, zo = layout.tensor, layout.data, layout.pipeline, layout.zero1
    if layout.isp and name in ("weight", "weight_data", "zero1", "zero1_replica"):
        return _weight_groups(layout, name)

    def rank(p: int, d: int, t: int) -> int:
        return p * tp * dp + d * tp + t

    if name == "world":
        return [list(range(layout.world_size))]
    if name == "tensor":
        return [[rank(p, d, t) for t in range(tp)] for p in range(pp) for d in range(dp)]
    if name == "data":
        return [[rank(p, d, t) for d in range(dp)] for p in range(pp) for t in range(tp)]
    if name in ("pipeline", "pipeline_reverse"):
        return [[rank(p, d, t) for p in range(pp)] for d in range(dp) for t in range(tp)]
    if name == "zero1":
        return [[rank(p, b * zo + z, t) for z in range(zo)]
                for p, b, t in itertools.product(range(pp), range(dp // zo), range(tp))]
    if name == "zero1_replica":
        return [[rank(p, b * zo + z, t) for b in range(dp // zo)]
                for p, z, t in itertools.product(range(pp), range(zo), range(tp))]
    if name in ("weight", "weight_data"):  # no weight parallel: wp = 1
        return [[r] for r in range(layout.world_size)]
    raise KeyError(f"unknown group {name!r}; known: {', '.join(GROUP_NAMES)}")


def _weight_groups(layout: ParallelLayout, name: str) -> list[list[int]]:
    """isp groups on the grid ``global = p * R + (b * zo + z) * wp + j`` (stage p, weight lane
    j < wp, weight-data index ``b * zo + z`` < wdp): spec §3.1."""
    wp, wdp, pp, zo = layout.weight, layout.weight_data, layout.pipeline, layout.zero1
    per_stage = layout.world_size // pp

    def rank(p: int, w: int, j: int) -> int:
        return p * per_stage + w * wp + j

    if name == "weight":
        return [[rank(p, w, j) for j in range(wp)] for p in range(pp) for w in range(wdp)]
    if name == "weight_data":
        return [[rank(p, w, j) for w in range(wdp)] for p in range(pp) for j in range(wp)]
    if name == "zero1":
        return [[rank(p, b * zo + z, j) for z in range(zo)]
                for p, b, j in itertools.product(range(pp), range(wdp // zo), range(wp))]
    return [[rank(p, b * zo + z, j) for b in range(wdp // zo)]
            for p, z, j in itertools.product(range(pp), range(zo), range(wp))]
