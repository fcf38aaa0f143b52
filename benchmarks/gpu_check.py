"""One-command GPU check: the tests marked ``gpu``, then InternLM2-1.8B vs transformers.

    python benchmarks/gpu_check.py [--steps 10] [--warmup 3] [--skip-tests] [--tiny]

Needs only torch >= 2.10, transformers, sentencepiece, safetensors, tensorboard and tqdm, with the
project installed by ``pip install --no-deps -e .``; nothing is downloaded (random weights, random
tokens).  Three parts, each reported even when another one fails:

1. ``pytest -m gpu tests/`` (packed-attention kernels against the naive reference, ...);
2. our ``Trainer.train_step`` on InternLM2-1.8B's shape (hidden 2048, 24 layers, 16 heads / 8 KV
   heads, FFN 8192, vocab 92,544), one packed row of 4096 tokens per step, bf16 weights with fp32
   masters, no activation checkpointing, the attention backend chosen automatically;
3. ``benchmarks/hf_reference.py`` in its own process: ``LlamaForCausalLM`` of the same shape
   (sdpa, fp32 weights under bf16 autocast) + ``clip_grad_norm_`` + ``torch.optim.AdamW``.

It prints TGS (tokens per GPU per second), TFLOPS (model FLOPs of
:func:`internevo.train.metrics.step_flops`, the same count for both sides) and MFU against the
GPU's dense bf16 peak (:data:`internevo.train.metrics.GPU_PEAK_TFLOPS`).  ``--tiny`` runs a small
shape for a few steps (on the CPU where there is no GPU) so that the script itself can be checked
anywhere; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bench_vs_transformers import bench_config, build_ours, our_batch, run_ours  # noqa: E402
from hf_reference import Shape, make_tokens, run_reference  # noqa: E402

from internevo.models.attention import describe_backend  # noqa: E402
from internevo.train.metrics import device_peak_flops, step_flops  # noqa: E402

INTERNLM2_1_8B = Shape(hidden=2048, layers=24, heads=16, kv_heads=8, ffn=8192, vocab=92544,
                       docs=1, seq=4096)
TINY = Shape(hidden=128, layers=2, heads=4, kv_heads=2, ffn=384, vocab=1000, docs=2, seq=128)


def run_gpu_tests(timeout: int) -> str:
    """``pytest -m gpu`` in a subprocess; returns its summary line (or why it did not finish)."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-rs", "-p", "no:cacheprovider",
           str(ROOT / "tests")]
    try:
        done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"TIMEOUT after {timeout} s"
    print(done.stdout[-6000:])
    lines = [ln for ln in done.stdout.strip().splitlines() if ln.strip()]
    summary = lines[-1] if lines else "no output"
    if done.returncode != 0:
        return f"FAILED (exit {done.returncode}): {summary}"
    return f"{'PASSED' if ' passed' in summary else 'NOT RUN (all skipped)'}: {summary}"


def run_internevo(shape: Shape, device: torch.device, steps: int, warmup: int) -> dict:
    """Our trainer on ``shape`` in bf16; per-step seconds, losses and peak device bytes."""
    cfg = bench_config(shape, "bf16")
    batches = [our_batch(t, 1) for t in make_tokens(shape, warmup + steps)]
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_ours(cfg, Path(run_dir), device)
        result = run_ours(trainer, batches, warmup)
        del trainer
    if device.type == "cuda":  # free the GPU for the reference process
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        gc.collect()
        torch.cuda.empty_cache()
    return result


def guarded(name: str, fn, *args) -> dict | None:
    """Run one part; on an error print the traceback and go on with the next part."""
    start = time.perf_counter()
    try:
        result = fn(*args)
    except Exception:  # noqa: BLE001 - every part reports, whatever breaks
        print(f"--- {name} FAILED:\n{traceback.format_exc()}")
        return None
    print(f"--- {name}: done in {time.perf_counter() - start:.0f} s")
    return result


def report(shape: Shape, device: torch.device, rows: dict[str, dict | None]) -> None:
    """TGS, TFLOPS, MFU (and peak memory) of each side."""
    cfg = bench_config(shape, "bf16")
    flops = step_flops(cfg, shape.tokens, [shape.seq] * shape.docs)
    peak = device_peak_flops(cfg, device)
    print(f"shape: hidden {shape.hidden}, {shape.layers} layers, {shape.heads} heads / "
          f"{shape.kv_heads} KV, FFN {shape.ffn}, vocab {shape.vocab}; {shape.docs} x "
          f"{shape.seq} tokens/step; bf16; model FLOPs/step {flops / 1e12:.2f} T; peak "
          f"{'unknown' if peak is None else f'{peak / 1e12:.1f} TFLOP/s'} ({device})")
    print(f"{'loop':<34}{'median s':>10}{'TGS':>10}{'TFLOPS':>9}{'MFU':>8}{'peak GiB':>10}")
    for name, res in rows.items():
        if res is None:
            print(f"{name:<34}{'failed':>10}")
            continue
        med = statistics.median(res["times"])
        mfu = "n/a" if peak is None else f"{100 * flops / med / peak:.1f}%"
        mem = res.get("peak_bytes")
        mem = "-" if mem is None else f"{mem / 2**30:.1f}"
        print(f"{name:<34}{med:>10.3f}{shape.tokens / med:>10.0f}{flops / med / 1e12:>9.2f}"
              f"{mfu:>8}{mem:>10}   losses {res['losses'][0]:.3f} -> {res['losses'][-1]:.3f}")
    if all(rows.values()):
        names = list(rows)
        ratio = statistics.median(rows[names[1]]["times"]) / statistics.median(
            rows[names[0]]["times"])
        print(f"ratio internevo / transformers tokens/s: {ratio:.2f}x")


def main() -> int:
    """Tests, our loop, the reference loop, the table; exit 1 if any part failed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side")
    p.add_argument("--skip-tests", action="store_true", help="only the two training loops")
    p.add_argument("--test-timeout", type=int, default=240, help="seconds for pytest -m gpu")
    p.add_argument("--tiny", action="store_true",
                   help="small shape, 2 steps: checks the script itself (CPU without a GPU)")
    args = p.parse_args()
    shape = TINY if args.tiny else INTERNLM2_1_8B
    steps, warmup = (2, 1) if args.tiny else (args.steps, args.warmup)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        print("no CUDA device: this check is for a GPU (use --tiny to exercise it on a CPU)")
        return 2
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"torch {torch.__version__}, GPU {gpu}; {describe_backend(device)}")
    tests = "skipped" if args.skip_tests else run_gpu_tests(args.test_timeout)
    rows = {"internevo (Trainer.train_step)": guarded("internevo", run_internevo, shape,
                                                      device, steps, warmup),
            "transformers Llama (own process)": guarded("transformers", run_reference, shape,
                                                        device.type, "bf16", steps, warmup)}
    report(shape, device, rows)
    print(f"gpu tests: {tests}")
    ok = all(rows.values()) and not tests.startswith(("FAILED", "TIMEOUT"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
