"""Time from a stopped (SIGSTOP) or killed (SIGKILL) rank to the other rank's exit.

Two ``train.py`` ranks (tiny model, gloo, no torchrun) train until rank 0 prints its first step;
then one rank is stopped or killed and the other's exit is timed (goal: ``--timeout`` + 5 s).

    PYTHONPATH=. python benchmarks/bench_faults.py [--timeout 5] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from reliability_helpers import free_port, train_process, wait_for_line, write_config  # noqa: E402

CASES = (("stop", 1), ("stop", 0), ("kill", 1), ("kill", 0))


def one_trial(fault: str, victim: int, timeout: float, root: Path) -> tuple[float, int, str]:
    """(seconds to the survivor's exit, its exit code, its last stderr line)."""
    config = write_config(root / "tiny.py")
    port = free_port()
    procs = [train_process(config, root / f"r{r}", "data.total_steps=100000", rank=r, world=2,
                           port=port, timeout=timeout) for r in range(2)]
    try:
        wait_for_line(procs[0], "step")
        start = time.monotonic()
        os.kill(procs[victim].pid, signal.SIGSTOP if fault == "stop" else signal.SIGKILL)
        _, err = procs[1 - victim].communicate(timeout=timeout + 120)
        elapsed = time.monotonic() - start
    finally:
        for p in procs:
            p.kill()
            p.wait()
    lines = err.strip().splitlines()
    return elapsed, procs[1 - victim].returncode, lines[-1] if lines else ""


def main() -> None:
    """Print one row per fault and victim: the survivor's exit times and its line."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--timeout", type=float, default=5.0, help="--timeout of the ranks")
    ap.add_argument("--repeat", type=int, default=2, help="trials per case")
    args = ap.parse_args()
    print(f"--timeout {args.timeout:g}; goal: every other rank exits within "
          f"{args.timeout + 5:g} s")
    print(f"{'fault':<6}{'victim':>7}{'exit s (each trial)':>24}  rc  line")
    for fault, victim in CASES:
        times, code, line = [], 0, ""
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as root:
                elapsed, code, line = one_trial(fault, victim, args.timeout, Path(root))
            times.append(f"{elapsed:.1f}")
        print(f"{fault:<6}{victim:>7}{' '.join(times):>24}  {code:>2}  {line[:150]}")


if __name__ == "__main__":
    main()
