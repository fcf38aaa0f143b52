"""Step metrics: FLOPs from the model's real shapes, TGS, TFLOPS, MFU, and where they are written.

FLOPs count every matmul of the actual model (GQA-sized k/v projections, the real FFN width, the
vocabulary head) plus causal attention over the actual packed segments; backward is twice the
forward, and recomputed blocks add one more forward.  MFU divides achieved FLOP/s per device by a
*known* peak: a table for GPUs, on CPUs the best square-matmul rate measured on this machine
(cached); otherwise it is reported as unknown, never guessed.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from internevo.config import TrainConfig

# Dense peak TFLOP/s (no sparsity) by GPU name fragment and dtype.
GPU_PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0, "tf32": 494.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0, "tf32": 494.0},
    "H800": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0, "tf32": 494.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5, "tf32": 156.0},
    "A800": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5, "tf32": 156.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6, "tf32": 183.0},
    "V100": {"bf16": None, "fp16": 125.0, "fp32": 15.7, "tf32": None},
}
_DTYPE_KEY = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32",
              "torch.tf32": "tf32"}


def ffn_width(cfg: TrainConfig) -> int:
    """FFN hidden size: int(h * mlp_ratio) rounded up to ``multiple_of``."""
    m = cfg.model
    raw = int(m.hidden_size * m.mlp_ratio)
    return m.multiple_of * ((raw + m.multiple_of - 1) // m.multiple_of)


def matmul_flops_per_token(cfg: TrainConfig) -> tuple[float, float]:
    """Forward matmul FLOPs per token: (per transformer block, output head)."""
    m = cfg.model
    h, d = m.hidden_size, m.hidden_size // m.num_attention_heads
    qkv_out = (m.num_attention_heads + 2 * cfg.num_kv_heads) * d
    block = 2 * h * qkv_out + 2 * h * h + 3 * 2 * h * ffn_width(cfg)
    return float(block), float(2 * h * m.vocab_size)


def attention_flops(cfg: TrainConfig, segment_lengths: Sequence[int]) -> float:
    """Forward FLOPs of causal attention over packed segments, per block."""
    h = cfg.model.hidden_size
    # token i of a segment attends to i + 1 keys: QK^T and PV each cost 2 * h per key.
    return float(sum(4 * h * n * (n + 1) / 2 for n in segment_lengths))


def step_flops(cfg: TrainConfig, tokens: int, segment_lengths: Sequence[int]) -> float:
    """Training FLOPs of one step on this rank's rows (forward + 2x backward + recompute)."""
    block, head = matmul_flops_per_token(cfg)
    layers = cfg.model.num_layers
    fwd_blocks = layers * (block * tokens + attention_flops(cfg, segment_lengths))
    fwd_head = head * tokens
    ck = cfg.model.checkpoint
    recompute = (1.0 if ck is True else float(ck or 0.0))
    recomputed = int(layers * recompute) / layers * fwd_blocks if layers else 0.0
    return 3 * (fwd_blocks + fwd_head) + recomputed


def _cpu_peak_cache() -> Path:
    root = os.environ.get("INTERNEVO_CACHE", Path.home() / ".cache" / "internevo")
    return Path(root) / "peak.json"


def measure_cpu_matmul_peak(dtype: torch.dtype, size: int = 1024, repeats: int = 10) -> float:
    """Best FLOP/s of a square matmul on this CPU in ``dtype`` (the attainable peak)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def device_peak_flops(cfg: TrainConfig, device: torch.device) -> Optional[float]:
    """Peak FLOP/s per device for the training dtype, or None when it is not known."""
    key = _DTYPE_KEY[cfg.model.dtype]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peaks in GPU_PEAK_TFLOPS.items():
            if fragment in name and peaks.get(key):
                return peaks[key] * 1e12
        return None
    if device.type != "cpu":
        return None
    dtype = torch.bfloat16 if key == "bf16" else torch.float32
    if key == "fp16":
        return None  # CPU fp16 matmuls run a slow fallback; no meaningful peak.
    cpu = platform.processor() or platform.machine()
    cache_key = f"{cpu}|threads={torch.get_num_threads()}|{key}"
    path = _cpu_peak_cache()
    cached = json.loads(path.read_text()) if path.is_file() else {}
    # Measured at every start (well under a second) but the cache keeps the best value ever seen,
    # so a measurement taken while the machine was busy cannot lower the peak and inflate MFU.
    best = max(cached.get(cache_key, 0.0), measure_cpu_matmul_peak(dtype))
    if best != cached.get(cache_key):
        cached[cache_key] = best
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached, indent=1))
    return best


class MetricsWriter:
    """Console line, TensorBoard scalars and ``metrics.jsonl``, written by the log rank only."""

    def __init__(self, run_dir: Path, enable_tb: bool, tb_folder: Optional[str], active: bool):
        self.active = active
        self.tb = None
        self.jsonl = None
        if not active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if enable_tb:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_dir = Path(tb_folder) if tb_folder else run_dir / "tensorboard"
            self.tb = SummaryWriter(str(self.tb_dir))

    def write(self, record: dict, console: str) -> None:
        """Write one step's record everywhere."""
        if not self.active:
            return
        print(console, flush=True)
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and value is not None:
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        """Flush and close the files."""
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
