"""Rank grid and group slicing against InternEvo's documented examples (spec §3.1)."""

import pytest

from internevo.config import ConfigError, config_from_dict
from internevo.parallel.layout import ParallelLayout, enumerate_groups


def grid(world, tp, pp, zo):
    return ParallelLayout(world_size=world, rank=0, tensor=tp, pipeline=pp, zero1=zo)


def test_spec_example_w16_pp2_tp4():
    lay = grid(16, 4, 2, 2)
    assert enumerate_groups(lay, "tensor") == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11],
                                               [12, 13, 14, 15]]
    assert enumerate_groups(lay, "pipeline")[:2] == [[0, 8], [1, 9]]
    assert enumerate_groups(lay, "pipeline")[-1] == [7, 15]
    assert enumerate_groups(lay, "data")[:5] == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12]]
    assert enumerate_groups(lay, "zero1") == enumerate_groups(lay, "data")


def test_spec_example_zero1_w16_tp2_pp2():
    groups = enumerate_groups(grid(16, 2, 2, 2), "zero1")
    assert groups[:4] == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_zero1_replica_links_equal_shards():
    lay = grid(8, 1, 1, 2)
    assert enumerate_groups(lay, "zero1") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert enumerate_groups(lay, "zero1_replica") == [[0, 2, 4, 6], [1, 3, 5, 7]]


@pytest.mark.parametrize("world, tp, pp, zo", [(8, 2, 1, 2), (16, 2, 2, 4), (4, 1, 1, 1)])
def test_every_kind_partitions_the_world(world, tp, pp, zo):
    lay = grid(world, tp, pp, zo)
    for name in ("tensor", "data", "pipeline", "zero1", "zero1_replica"):
        members = sorted(r for g in enumerate_groups(lay, name) for r in g)
        assert members == list(range(world)), name


def test_coordinates_match_formula():
    for rank in range(16):
        lay = ParallelLayout(world_size=16, rank=rank, tensor=4, pipeline=2, zero1=2)
        assert rank == lay.pp_rank * 8 + lay.dp_rank * 4 + lay.tp_rank
        assert lay.ranks("tensor")[lay.tp_rank] == rank


def cfg(**parallel):
    return config_from_dict({"parallel": parallel,
                             "model": dict(num_attention_heads=8, hidden_size=64)})


def test_from_config_resolves_zero1_minus_one():
    lay = ParallelLayout.from_config(cfg(zero1=-1, tensor=2), world_size=8, rank=3)
    assert (lay.data, lay.zero1, lay.tensor) == (4, 4, 2)


@pytest.mark.parametrize("parallel, world, message", [
    (dict(tensor=3), 6, "tensor.size=3 does not divide model.num_attention_heads=8"),
    (dict(tensor=2), 3, "world size 3 is not divisible"),
    (dict(zero1=3), 4, "zero1.size=3 does not divide the data-parallel size 4"),
])
def test_bad_sizes_rejected_with_numbers(parallel, world, message):
    with pytest.raises(ConfigError, match=message):
        ParallelLayout.from_config(cfg(**parallel), world_size=world, rank=0)
