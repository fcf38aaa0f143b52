"""Per-rank bytes and per-step traffic of the 7B configs at world 8, 64 and 1024, by dry run.

    PYTHONPATH=. python benchmarks/dryrun_table.py [--configs configs/7B_sft.py ...]
        [--worlds 8 64 1024] [--tensor 1 4 8] [--modes mtp msp fsp] [--out table.md]

Each row is one ``dry_run`` (internevo/train/dryrun.py) of rank 0 on the fake accelerator:
zero1 = 8 (or the data-parallel size when that is smaller), tensor size 1 / 4 / 8 in each mode.
Prints a markdown table (the one in docs/parallel.md "Dry run").
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from internevo.config import load_config
from internevo.parallel.comm import human_bytes
from internevo.train.dryrun import dry_run

COLUMNS = ("params", "master", "optimizer_states", "activations_peak", "checkpoint_save_peak",
           "total_peak")


def combos(tensors: list[int], modes: list[str]) -> list[tuple[int, str]]:
    """(tensor size, mode) pairs: the mode only matters when the tensor size is above 1."""
    return [(tp, mode) for tp in tensors for mode in (modes if tp > 1 else ["-"])]


def row(config: str, world: int, tp: int, mode: str) -> str:
    """One markdown row (config, layout, bytes, traffic, seconds)."""
    dp = world // tp
    overrides = {"parallel.tensor.size": tp, "parallel.zero1.size": min(8, dp)}
    if tp > 1:
        overrides["parallel.tensor.mode"] = mode
    cfg = load_config(config, overrides)
    start = time.perf_counter()
    report = dry_run(cfg, world, 0, "cuda")
    seconds = time.perf_counter() - start
    b = report["bytes"]
    comm = sum(report["comm"].values())
    return (f"| {Path(config).stem} | {world} | {tp} {mode} | {min(8, dp)} | "
            + " | ".join(human_bytes(b[k]) for k in COLUMNS)
            + f" | {human_bytes(comm)} | {seconds:.0f} |")


def main() -> None:
    """Run every combination and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+",
                        default=["configs/7B_sft.py", "configs/7B_internlm2.py"])
    parser.add_argument("--worlds", nargs="+", type=int, default=[8, 64, 1024])
    parser.add_argument("--tensor", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--modes", nargs="+", default=["mtp", "msp", "fsp"])
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    lines = ["| config | world | tensor | zero1 | " + " | ".join(COLUMNS)
             + " | comm / step | dry run s |", "|" + " --- |" * (len(COLUMNS) + 6)]
    for config in args.configs:
        for world in args.worlds:
            for tp, mode in combos(args.tensor, args.modes):
                lines.append(row(config, world, tp, mode))
                print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
