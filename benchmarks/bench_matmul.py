"""A square matmul in fp32, bf16 and fp16 on this CPU, next to the CPU flags that decide the speed.

    .venv/bin/python benchmarks/bench_matmul.py [--size 1024] [--repeats 10]

Prints the CPU model, which of the flags avx2 / avx512f / avx512_bf16 / amx_bf16 / avx512_fp16 /
amx_fp16 it has (``/proc/cpuinfo``), and the best time and GFLOP/s of ``size x size`` matmuls per
dtype (:func:`internevo.train.metrics.measure_cpu_matmul_peak`), measured in turn in one run.
Whether bf16 trains fast on a CPU depends on these flags: without bf16 hardware the matmul falls
back to a slow path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from internevo.train.metrics import measure_cpu_matmul_peak  # noqa: E402

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_info() -> tuple[str, list[str]]:
    """CPU model name and the flags of :data:`FLAGS` it has (empty off Linux)."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return "unknown", []
    text = path.read_text()
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                 if ln.startswith("model name")), "unknown")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                  if ln.startswith("flags")), [])
    return name, [f for f in FLAGS if f in flags]


def main() -> None:
    """Measure each dtype twice (interleaved), keep the best; print time and ratio to fp32."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    name, flags = cpu_info()
    print(f"CPU: {name}; flags: {', '.join(flags) or 'none of ' + ', '.join(FLAGS)}; "
          f"threads {torch.get_num_threads()}; torch {torch.__version__}")
    best = dict.fromkeys(DTYPES, 0.0)
    for _ in range(2):
        for key, dtype in DTYPES.items():
            best[key] = max(best[key], measure_cpu_matmul_peak(dtype, args.size, args.repeats))
    flops = 2 * args.size**3
    for key, rate in best.items():
        print(f"{key}: {args.size}x{args.size} matmul {1e3 * flops / rate:8.2f} ms "
              f"{rate / 1e9:8.1f} GFLOP/s  ({best['fp32'] / rate:.2f}x the fp32 time)")


if __name__ == "__main__":
    main()
