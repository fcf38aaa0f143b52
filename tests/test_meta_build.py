"""Meta-device build: a rank allocates its shards and at most one full parameter at a time.

Two real processes at tensor size 2 (msp) count every storage allocated while the model is
built (a dispatch mode, :class:`~internevo.train.dryrun.StorageCounter`): the peak stays below
the rank's shards plus two copies of the largest full parameter in fp32 (the generated value and
the slice cut from it), far below the full model that the old build (full model on the CPU, then
sliced) held.  That the initial weights still equal a single process is what the tensor-parallel
and data-parallel equivalence tests check.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from internevo.config import config_from_dict
from internevo.models.build import build_model
from internevo.parallel.apply import parallelize
from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout
from internevo.parallel.spawn import spawn_ranks
from internevo.train.dryrun import StorageCounter, storage_bytes


def config() -> object:
    return config_from_dict(dict(
        model_type="INTERNLM2_PUBLIC",
        model=dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2,
                   vocab_size=256, multiple_of=16, dtype="torch.float32"),
        parallel=dict(zero1=1, tensor=dict(size=2, mode="msp"))))


def build_rank(rank: int, world: int, _root: Path) -> dict:
    cfg = config()
    layout = ParallelLayout.from_config(cfg, world, rank).build_groups()
    with StorageCounter() as counter:
        model = parallelize(cfg, layout, Comm(layout), torch.device("cpu"), 1024)
    return {"peak": counter.peak, "shards": storage_bytes(model.parameters())}


def test_build_holds_shards_plus_one_full_parameter():
    full = {n: p.shape for n, p in build_model(config(), device="meta").named_parameters()}
    full_model = 4 * sum(math.prod(s) for s in full.values())
    largest = 4 * max(math.prod(s) for s in full.values())
    for r in spawn_ranks(build_rank, 2, Path(".")):
        assert r["shards"] < 0.6 * full_model  # tensor parallel halves the big weights
        assert r["peak"] <= r["shards"] + 2 * largest, (r, largest)
        assert r["peak"] < full_model
