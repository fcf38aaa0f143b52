"""The counting layer: payload bytes per collective and group, the report, the analytic formulas.

Collectives run on PyTorch's fake process group (one process pretending to be rank 1 of 4): the
calls go through torch.distributed without moving data, which is all the counter needs.  That
counted bytes equal the formulas in real training is tested over real processes in
tests/test_data_parallel.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from oracles import analytic_step_bytes
from torch.testing._internal.distributed.fake_pg import FakeStore

from internevo.config import config_from_dict
from internevo.parallel.comm import Comm, human_bytes, wire_bytes
from internevo.parallel.layout import ParallelLayout
from internevo.parallel.zero import plan_buckets


@pytest.fixture(scope="module")
def comm():
    """A Comm over the groups of rank 1 in world=4, dp=4, zero1=2 (fake process group)."""
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=4)
    try:
        yield Comm(ParallelLayout(world_size=4, rank=1, zero1=2).build_groups())
    finally:
        dist.destroy_process_group()


def test_each_collective_counts_its_payload(comm):
    comm.reset()
    full, shard = torch.zeros(8), torch.zeros(4)  # fp32: 32 and 16 bytes
    comm.reduce_scatter(shard, full, "zero1", op="avg")
    comm.all_gather(full, shard, "zero1")
    comm.all_gather(full, shard, "zero1")
    comm.all_reduce(shard, "zero1_replica")
    comm.broadcast(full.half(), "data")
    comm.all_to_all(torch.zeros(4), shard, "world")
    assert comm.snapshot() == {
        "comm/all_gather/zero1/bytes": 64, "comm/all_gather/zero1/calls": 2,
        "comm/all_reduce/zero1_replica/bytes": 16, "comm/all_reduce/zero1_replica/calls": 1,
        "comm/all_to_all/world/bytes": 16, "comm/all_to_all/world/calls": 1,
        "comm/broadcast/data/bytes": 16, "comm/broadcast/data/calls": 1,
        "comm/reduce_scatter/zero1/bytes": 32, "comm/reduce_scatter/zero1/calls": 1,
    }
    assert comm.total_bytes() == 64 + 16 + 16 + 16 + 32
    comm.reset()
    assert comm.snapshot() == {} and comm.total_bytes() == 0


def test_one_member_group_is_a_local_no_op(comm):
    comm.reset()
    src, out = torch.arange(4.0), torch.zeros(4)
    assert comm.all_reduce(src, "tensor") is None  # tensor parallel size 1
    comm.reduce_scatter(out, src, "tensor")
    assert torch.equal(out, src) and comm.snapshot() == {}


def test_foreign_process_group_counts_under_the_name(comm):
    comm.reset()
    pg = dist.new_group([0, 1])  # what FSDP2 passes: its own group, same members as zero1
    comm.all_gather(torch.zeros(8), torch.zeros(4), "zero1", process_group=pg)
    comm.record("all_reduce", "zero1_replica", 100)  # a collective FSDP issued itself
    assert comm.snapshot() == {
        "comm/all_gather/zero1/bytes": 32, "comm/all_gather/zero1/calls": 1,
        "comm/all_reduce/zero1_replica/bytes": 100, "comm/all_reduce/zero1_replica/calls": 1,
    }


def test_report_is_a_table_with_totals(comm):
    comm.reset()
    comm.all_reduce(torch.zeros(256), "zero1_replica")  # 1 KiB over 2 ranks
    lines = comm.report().splitlines()
    assert lines[0].split() == ["collective", "group", "calls", "payload", "wire/rank"]
    assert lines[1].split() == ["all_reduce", "zero1_replica", "1", "1.00", "KiB", "1.00", "KiB"]
    assert lines[-1].split()[:2] == ["total", "1"]


@pytest.mark.parametrize("kind, factor", [("all_reduce", 1.5), ("reduce_scatter", 0.75),
                                          ("all_gather", 0.75), ("broadcast", 1.0)])
def test_ring_wire_bytes(kind, factor):
    assert wire_bytes(kind, 1000, 4) == 1000 * factor


def test_human_bytes():
    assert [human_bytes(n) for n in (12, 1536, 3 * 2**20, 5 * 2**30)] == \
        ["12 B", "1.50 KiB", "3.00 MiB", "5.00 GiB"]


# --------------------------------------------------------------------------------------------
# buckets and formulas


def test_buckets_fill_in_reverse_order():
    buckets = plan_buckets([5, 3, 10, 2], bucket_size=6, zero1=4)
    assert [b.indices for b in buckets] == [[3], [2], [1], [0]]
    buckets = plan_buckets([5, 3, 1, 2], bucket_size=6, zero1=4)
    assert [b.indices for b in buckets] == [[3, 2, 1], [0]]
    assert [(b.numel, b.shard, b.offset) for b in buckets] == [(6, 2, 0), (5, 2, 2)]


SHAPES = {"embed.weight": (10, 4), "layers.0.w": (3, 4), "layers.0.norm": (4,),
          "layers.1.w": (3, 4), "layers.1.norm": (4,), "norm.weight": (4,), "head.weight": (10, 4)}
TOTAL = sum(math.prod(s) for s in SHAPES.values())  # 116


def _layout(world: int, zero1: int, fsdp: bool = False, dtype: str = "torch.bfloat16"):
    cfg = config_from_dict({"parallel": {"zero1": {"size": zero1, "fsdp": fsdp}},
                            "model": {"dtype": dtype}})
    return cfg, ParallelLayout.from_config(cfg, world, 0)


def test_zero_formula():
    cfg, lay = _layout(4, 2)  # bf16, one bucket of 116 elements: shards of 58
    assert analytic_step_bytes(cfg, lay, SHAPES, [], micro_num=3) == {
        "comm/all_gather/zero1/bytes": 116 * 2, "comm/reduce_scatter/zero1/bytes": 116 * 2,
        "comm/all_reduce/zero1_replica/bytes": 58 * 2, "comm/all_reduce/zero1/bytes": 8,
        "comm/all_reduce/data/bytes": 8}
    cfg, lay = _layout(4, 1)  # plain data parallel: one all-reduce of the gradients
    assert analytic_step_bytes(cfg, lay, SHAPES, [], micro_num=3) == {
        "comm/all_reduce/zero1_replica/bytes": 116 * 2, "comm/all_reduce/data/bytes": 8}


def test_fsdp_formula():
    cfg, lay = _layout(4, 2, fsdp=True)
    # dim 0 padded to a multiple of 2: (3, 4) -> 16 elements; the rest divide evenly
    blocks, root = 2 * (16 + 4), 40 + 4 + 40
    got = analytic_step_bytes(cfg, lay, SHAPES, ["layers.0", "layers.1"], micro_num=3)
    assert got == {
        "comm/all_gather/zero1/bytes": 3 * (root + 2 * blocks) * 2,  # bf16 gathers
        "comm/reduce_scatter/zero1/bytes": (root + blocks) * 4,  # fp32 gradients, once
        "comm/all_reduce/zero1_replica/bytes": (root + blocks) // 2 * 4,
        "comm/all_reduce/zero1/bytes": 8, "comm/all_reduce/data/bytes": 8}
