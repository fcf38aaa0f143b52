"""Saved-activation bytes per transformer layer for tp=1 and mtp / msp / fsp at tp=2.

Runs 2 gloo processes on CPU; each builds the model, applies the mode, and counts the distinct
storages one block saves for backward (``saved_tensors_hooks``, parameters excluded) for one
packed row of ``--seq`` tokens, fp32.  Also prints the counted tensor-group collectives of that
block's forward + backward.  Usage::

    .venv/bin/python benchmarks/bench_tensor_memory.py [--seq 512] [--hidden 256]
"""

from __future__ import annotations

import argparse

import torch

from internevo.config import TrainConfig, config_from_dict
from internevo.models.build import build_model
from internevo.parallel.comm import Comm, human_bytes
from internevo.parallel.layout import ParallelLayout
from internevo.parallel.spawn import spawn_ranks
from internevo.parallel.tensor import apply_tensor_parallel
from tests.oracles import saved_activation_bytes

MODELS = ("INTERNLM2_PUBLIC", "INTERNLM")


def make_config(model_type: str, seq: int, hidden: int, tp: int, mode: str) -> TrainConfig:
    """One-layer model of width ``hidden`` (8 heads; 4 KV heads for InternLM2), fp32."""
    model = dict(num_layers=1, hidden_size=hidden, num_attention_heads=8, vocab_size=1024,
                 multiple_of=64, dtype="torch.float32")
    if model_type == "INTERNLM2_PUBLIC":
        model["num_kv_attention_heads"] = 4
    return config_from_dict(dict(model_type=model_type, model=model, enable_tb=False,
                                 data=dict(seq_len=seq, micro_bsz=1, num_worker=0),
                                 parallel=dict(tensor=dict(size=tp, mode=mode))))


def measure(rank: int, world: int, seq: int, hidden: int) -> dict:
    """Saved bytes and block collectives per (model, mode) on this rank."""
    ids = torch.randint(0, 1024, (1, seq), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, seq // 2, seq], dtype=torch.int32)
    out = {}
    for model_type in MODELS:
        for mode in ("mtp", "msp", "fsp"):
            cfg = make_config(model_type, seq, hidden, world, mode)
            layout = ParallelLayout.from_config(cfg, world, rank).build_groups()
            comm = Comm(layout)
            model = apply_tensor_parallel(build_model(cfg), cfg, layout, comm)
            saved = saved_activation_bytes(model, ids, cu, None)
            x = model.get_submodule(model.embedding_attr)(ids).detach().requires_grad_()
            comm.reset()  # the block's collectives only
            model.transformer_blocks()[0](x, model.forward_context(x, cu, None)).sum().backward()
            out[(model_type, mode)] = (saved, comm.report())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    single = {}
    for model_type in MODELS:
        cfg = make_config(model_type, args.seq, args.hidden, 1, "mtp")
        ids = torch.randint(0, 1024, (1, args.seq), generator=torch.Generator().manual_seed(0))
        cu = torch.tensor([0, args.seq // 2, args.seq], dtype=torch.int32)
        single[model_type] = saved_activation_bytes(build_model(cfg), ids, cu, None)
    results = spawn_ranks(measure, 2, args.seq, args.hidden)[0]
    print(f"saved activations per layer, one row of {args.seq} tokens, hidden {args.hidden}, "
          "fp32, per rank (tp=2)")
    for model_type in MODELS:
        print(f"\n{model_type}: tp=1 {human_bytes(single[model_type])}")
        for mode in ("mtp", "msp", "fsp"):
            saved, report = results[(model_type, mode)]
            print(f"  {mode}: {human_bytes(saved):>12} ({saved} B)")
            print("    " + report.replace("\n", "\n    "))


if __name__ == "__main__":
    main()
