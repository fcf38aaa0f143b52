"""The planner against InternEvo's published 7B throughput (A100-80GB, 4x100 Gb RoCE, seq 2048).

``python benchmarks/plan_vs_published.py [--gpus 8 16 ... 1024] [--workers 2]``

Dry-runs InternLM 7B (configs/7B_sft.py, bf16, no activation checkpointing, packed rows of
seq_len windows) for the two published layouts at every GPU count, predicts TGS with the A100
constants of internevo/profiling/planner.py, prints predicted vs published, and writes the dry
runs' byte counts to benchmarks/results/plan_7b_a100.json (tests/test_planner.py re-predicts from
them and checks the 15% band).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from internevo.config import load_config
from internevo.profiling.planner import HARDWARE, measure, predict, with_layout

PUBLISHED = {  # spec §10: TGS at 8, 16, 32, 64, 128, 256, 512, 1024 GPUs
    "tp1/zero1=8": ((1, 8, 2, 4), (4078, 3939, 3919, 3944, 3928, 3920, 3835, 3625)),
    "tp2/zero1=4": ((2, 4, 4, 4), (3761, 3658, 3655, 3650, 3651, 3653, 3589, 3486)),
}
GPUS = (8, 16, 32, 64, 128, 256, 512, 1024)
OUT = Path(__file__).resolve().parent / "results" / "plan_7b_a100.json"
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "7B_sft.py"


def layout_of(tp: int, zero1: int, micro_bsz: int, micro_num: int) -> dict:
    """The planner's layout keys of one published row."""
    return {"parallel.tensor.size": tp, "parallel.tensor.mode": "mtp",
            "parallel.zero1.size": zero1, "parallel.zero1.fsdp": False,
            "model.checkpoint": False, "data.micro_bsz": micro_bsz, "data.micro_num": micro_num}


def main() -> None:
    """Dry-run, predict, print and save."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", type=int, nargs="*", default=list(GPUS))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    cfg = load_config(str(CONFIG), {"data.train_folder": None, "data.valid_folder": None})
    saved = []
    print(f"{'row':<12} {'GPUs':>5} {'published':>9} {'predicted':>9} {'error':>7} {'GiB':>6}")
    for name, (shape, published) in PUBLISHED.items():
        layout = layout_of(*shape)
        c = with_layout(cfg, layout)
        for gpus in args.gpus:
            measured = measure([c], gpus, args.workers, progress=False)[0]
            row = predict(c, gpus, measured, HARDWARE["A100"], 8)
            pub = published[GPUS.index(gpus)]
            print(f"{name:<12} {gpus:>5} {pub:>9} {row['tgs']:>9.0f} "
                  f"{100 * (row['tgs'] / pub - 1):>+6.1f}% {row['memory_gib']:>6.1f}", flush=True)
            saved.append({"row": name, "gpus": gpus, "layout": layout, "published": pub,
                          "measured": measured})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(saved, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
