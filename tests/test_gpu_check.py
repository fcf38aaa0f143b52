"""``benchmarks/gpu_check.py --tiny`` runs end to end here, so the GPU script cannot rot unseen."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_trains_both_loops():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny",
                           "--skip-tests"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [ln for ln in done.stdout.splitlines() if ln.startswith(("internevo", "transformers"))]
    assert len(rows) == 2 and all("losses" in r for r in rows), done.stdout
    assert "attention: scaled_dot_product_attention per segment" in done.stdout
