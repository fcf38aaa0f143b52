"""Measured pipeline bubble vs theory, and per-stage memory, on CPU with 2 and 4 stages.

    .venv/bin/python benchmarks/bench_pipeline.py [--steps 4] [--micro-num 8] [--modes pp2,pp4]

An 8-layer InternLM2 (hidden 128, vocab 1024, packed rows of 256 tokens) trains on dummy data with
1F1B (``ppN``) and interleaved 1F1B with 2 chunks per rank (``ppN_chunks2``), one gloo process per
stage, one thread each.  Every stage times its forward and backward compute (``pipeline/busy_s``);
the rest of its step is waiting for neighbours.  Printed per mode, medians over the steps after
a warm-up step:

* measured bubble: ``1 - sum(busy) / (pp * step time)`` (step time: the slowest stage's), next to
  the theory ``(pp - 1) / (chunks * M + pp - 1)`` (equal stages, free communication);
* per stage: its idle share, busy seconds, most micro-batches in flight (activations held at
  once: ``pp - rank`` for 1F1B), parameter bytes and optimizer-state bytes (fp32 master + 2
  moments).

With more processes than cores (4 stages on a 2-core machine) stages share cores and the measured
bubble says more about the machine than about the schedule.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from internevo.config import TrainConfig, config_from_dict  # noqa: E402
from internevo.parallel.comm import Comm, human_bytes  # noqa: E402
from internevo.parallel.layout import ParallelLayout  # noqa: E402
from internevo.parallel.spawn import spawn_ranks  # noqa: E402
from internevo.train.trainer import Trainer  # noqa: E402

MODES = {"pp2": (2, 1), "pp4": (4, 1), "pp2_chunks2": (2, 2), "pp4_chunks2": (4, 2)}


def bench_config(pp: int, chunks: int, micro_num: int, steps: int) -> TrainConfig:
    """The benchmark model on ``pp`` stages of ``chunks`` chunks."""
    return config_from_dict(dict(
        model_type="INTERNLM2_PUBLIC",
        data=dict(seq_len=256, micro_bsz=1, micro_num=micro_num, total_steps=steps,
                  num_worker=0),
        model=dict(num_layers=8, hidden_size=128, num_attention_heads=4,
                   num_kv_attention_heads=2, vocab_size=1024, num_chunks=chunks),
        parallel=dict(pipeline=dict(size=pp, interleaved_overlap=True)),
        ckpt=dict(enable_save_ckpt=False), enable_tb=False))


def stage_main(rank: int, world: int, chunks: int, micro_num: int, steps: int) -> dict:
    """Train ``steps`` steps on this stage; its records and memory."""
    torch.set_num_threads(1)
    cfg = bench_config(world, chunks, micro_num, steps)
    layout = ParallelLayout.from_config(cfg, world, rank).build_groups()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, layout, Comm(layout), torch.device("cpu"), Path(run_dir))
        loader = iter(trainer.loader)
        records = [trainer.train_step(next(loader)) for _ in range(steps)]
        params = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
        return {"records": records[1:], "param_bytes": params,
                "state_bytes": trainer.optimizer.state_bytes()}


def report(name: str, pp: int, chunks: int, micro_num: int, stages: list[dict]) -> None:
    """Print one mode's measured and theoretical bubble and its per-stage table."""
    steps = len(stages[0]["records"])
    bubbles = []
    for i in range(steps):
        rec = [s["records"][i] for s in stages]
        span = max(r["step_time"] for r in rec)
        bubbles.append(1 - sum(r["pipeline/busy_s"] for r in rec) / (pp * span))
    theory = (pp - 1) / (chunks * micro_num + pp - 1)
    print(f"\n{name}: M={micro_num} chunks={chunks}  measured bubble "
          f"{statistics.median(bubbles):.3f}  theory {theory:.3f}")
    print(f"  {'stage':<6}{'idle':>7}{'busy s':>9}{'in flight':>11}{'params':>12}{'opt state':>12}")
    for rank, s in enumerate(stages):
        idle = statistics.median(r["pipeline/idle_fraction"] for r in s["records"])
        busy = statistics.median(r["pipeline/busy_s"] for r in s["records"])
        flight = max(r["pipeline/max_in_flight"] for r in s["records"])
        print(f"  {rank:<6}{idle:>7.3f}{busy:>9.3f}{flight:>11}{human_bytes(s['param_bytes']):>12}"
              f"{human_bytes(s['state_bytes']):>12}")


def main() -> None:
    """Run the chosen modes one after the other."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="steps per mode (the first is dropped)")
    ap.add_argument("--micro-num", type=int, default=8, help="micro-batches per step (M)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"CPU cores: {os.cpu_count()}")
    for name in args.modes.split(","):
        pp, chunks = MODES[name]
        stages = spawn_ranks(stage_main, pp, chunks, args.micro_num, args.steps, timeout=900)
        report(name, pp, chunks, args.micro_num, stages)


if __name__ == "__main__":
    main()
