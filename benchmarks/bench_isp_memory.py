"""Per-rank memory of isp + weight parallel at a long sequence, measured on gloo processes.

One process (no parallelism) and ``--world`` processes with ``tensor=dict(size=sp, mode="isp")``
and ``weight=dict(size=wp)`` each build the same 2-layer InternLM2 (GQA) model and count, for
one packed row of ``--seq`` tokens (4 documents), fp32:

* saved activations of one block: the distinct storages it saves for backward
  (``saved_tensors_hooks``, parameters excluded), and
* weight bytes: the storages of this rank's parameters (local shards).

Usage::

    .venv/bin/python benchmarks/bench_isp_memory.py [--seq 16384] [--world 4] [--sp 4] [--wp 4]
"""

from __future__ import annotations

import argparse

import torch

from internevo.config import TrainConfig, config_from_dict
from internevo.parallel.apply import parallelize
from internevo.parallel.comm import Comm, human_bytes
from internevo.parallel.layout import ParallelLayout
from internevo.parallel.spawn import spawn_ranks
from internevo.parallel.zero import local_tensor
from tests.oracles import saved_activation_bytes


def make_config(seq: int, hidden: int, sp: int, wp: int) -> TrainConfig:
    """2-layer InternLM2 of width ``hidden`` (8 heads, 4 KV heads), fp32, rows of ``seq``."""
    model = dict(num_layers=2, hidden_size=hidden, num_attention_heads=8,
                 num_kv_attention_heads=4, vocab_size=1024, multiple_of=64,
                 dtype="torch.float32")
    mode = "isp" if sp * wp > 1 else "mtp"
    return config_from_dict(dict(
        model_type="INTERNLM2_PUBLIC", model=model, enable_tb=False,
        data=dict(seq_len=seq, micro_bsz=1, num_worker=0),
        parallel=dict(tensor=dict(size=sp, mode=mode), weight=dict(size=wp))))


def measure(rank: int, world: int, seq: int, hidden: int, sp: int, wp: int) -> dict:
    """Saved block activations and parameter bytes on this rank."""
    cfg = make_config(seq, hidden, sp, wp)
    layout = ParallelLayout.from_config(cfg, world, rank)
    if world > 1:
        layout.build_groups()
    model = parallelize(cfg, layout, Comm(layout), torch.device("cpu"), seed=0)
    ids = torch.randint(0, 1024, (1, seq), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, seq // 4, seq // 2, 3 * seq // 4, seq], dtype=torch.int32)
    weights = sum(local_tensor(p).untyped_storage().nbytes() for p in model.parameters())
    return {"saved": saved_activation_bytes(model, ids, cu, None), "weights": weights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--sp", type=int, default=4)
    parser.add_argument("--wp", type=int, default=4)
    a = parser.parse_args()
    one = measure(0, 1, a.seq, a.hidden, 1, 1)
    ranks = spawn_ranks(measure, a.world, a.seq, a.hidden, a.sp, a.wp, timeout=900)
    print(f"seq={a.seq} hidden={a.hidden} world={a.world} sp={a.sp} wp={a.wp} (fp32)")
    print(f"{'':<22}{'saved / block':>16}{'ratio':>8}{'weights':>14}{'ratio':>8}")
    rows = [("1 process", one)] + [(f"isp rank {r}", m) for r, m in enumerate(ranks)]
    for label, m in rows:
        print(f"{label:<22}{human_bytes(m['saved']):>16}{m['saved'] / one['saved']:>8.3f}"
              f"{human_bytes(m['weights']):>14}{m['weights'] / one['weights']:>8.3f}")


if __name__ == "__main__":
    main()
