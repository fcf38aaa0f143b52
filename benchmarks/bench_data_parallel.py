"""Plain data parallel vs ZeRO-1.5 vs FSDP for the demo model on 2 CPU processes, in one run.

    .venv/bin/python benchmarks/bench_data_parallel.py [--ranks 2] [--steps 3]

The demo config (InternLM2, 4 layers, hidden 256, vocab 92544) trains on dummy data
(``train_folder=None``: no tokenized corpus needed).  The same 2 gloo processes hold one trainer
per mode and step them in turn (A, B, C, A, B, C, ...), so that a machine shared with other work
slows every mode alike.  Per mode it prints the median step time over ``--steps`` steps (after
one warm-up step; the slowest rank's time), tokens/s, the payload and per-rank ring-wire bytes
the Comm layer counted in one step, and the optimizer-state bytes each rank holds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from internevo.config import TrainConfig, load_config  # noqa: E402
from internevo.parallel.comm import Comm, human_bytes, wire_bytes  # noqa: E402
from internevo.parallel.layout import ParallelLayout  # noqa: E402
from internevo.parallel.spawn import spawn_ranks  # noqa: E402
from internevo.train.trainer import Trainer  # noqa: E402

MODES = {
    "plain DP (zero1=1)": {"parallel.zero1": {"size": 1}},
    "ZeRO-1.5 (zero1=-1)": {"parallel.zero1": {"size": -1}},
    "FSDP (zero1=-1)": {"parallel.zero1": {"size": -1, "fsdp": True}},
}


def demo_config(overrides: dict) -> TrainConfig:
    """configs/demo.py on dummy data, without checkpoints, validation or TensorBoard."""
    base = {"data.train_folder": None, "data.valid_folder": None, "data.valid_every": 0,
            "ckpt.enable_save_ckpt": False, "enable_tb": False}
    return load_config(ROOT / "configs" / "demo.py", {**base, **overrides})


def build(cfg: TrainConfig, rank: int, world: int, run_dir: Path) -> Trainer:
    """A trainer of ``cfg`` on this rank."""
    layout = ParallelLayout.from_config(cfg, world, rank).build_groups()
    return Trainer(cfg, layout, Comm(layout), torch.device("cpu"), run_dir)


def summarise(trainer: Trainer, records: list[dict]) -> dict:
    """Step times (warm-up dropped), bytes of the last step and state bytes of one trainer."""
    comm = trainer.comm
    wire = sum(wire_bytes(kind, n, comm.layout.size(group)) for (kind, group), n in
               comm.bytes.items())
    return {"times": [r["step_time"] for r in records[1:]], "tokens": records[-1]["tokens"],
            "payload": comm.total_bytes(), "wire": wire,
            "state": trainer.optimizer.state_bytes(), "report": comm.report()}


def run_all(rank: int, world: int, steps: int) -> dict:
    """One trainer per mode in the same processes, stepped in turn."""
    with tempfile.TemporaryDirectory() as run_dir:
        trainers = {name: build(demo_config(over), rank, world, Path(run_dir) / str(i))
                    for i, (name, over) in enumerate(MODES.items())}
        batches = {name: iter(t.loader) for name, t in trainers.items()}
        records: dict[str, list[dict]] = {name: [] for name in trainers}
        for _ in range(steps + 1):
            for name, trainer in trainers.items():
                records[name].append(trainer.train_step(next(batches[name])))
        return {name: summarise(trainers[name], records[name]) for name in trainers}


def main() -> None:
    """Spawn the ranks, run every mode, print the table (rank 0's view; state: max over ranks)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--report", action="store_true", help="print each mode's comm table")
    args = parser.parse_args()
    results = spawn_ranks(run_all, args.ranks, args.steps, timeout=1800)
    print(f"demo model, {args.ranks} gloo processes on CPU, median of {args.steps} steps")
    print(f"{'mode':<22}{'step s':>8}{'tokens/s':>10}{'payload/step':>15}{'wire/rank/step':>16}"
          f"{'optim state/rank':>18}")
    for name in MODES:
        r0 = results[0][name]
        step = statistics.median(max(r[name]["times"][i] for r in results)
                                 for i in range(args.steps))
        state = max(r[name]["state"] for r in results)
        print(f"{name:<22}{step:>8.2f}{r0['tokens'] / step:>10.0f}{human_bytes(r0['payload']):>15}"
              f"{human_bytes(r0['wire']):>16}{human_bytes(state):>18}")
        if args.report:
            print(r0["report"])


if __name__ == "__main__":
    main()
