"""Our training step vs a plain ``transformers`` LlamaForCausalLM + AdamW loop, in one run.

    .venv/bin/python benchmarks/bench_vs_transformers.py [--dtype fp32|bf16] [--steps 4]
        [--warmup 1] [--rounds 1] [--micro-num 1] [--profile] [shape flags: --hidden 512 ...]

Both sides train the same shape (default: hidden 512, 8 layers, 8 heads / 4 KV heads, FFN 1792,
vocab 92,544) on the same tokens: 4 documents of 512 tokens per step.  Ours is the real
``Trainer.train_step`` (INTERNLM2_PUBLIC from ``config_from_dict`` + ``build_model``,
``HybridZeroOptimizer`` with fp32 masters, clipping, our loss and metrics) on packed rows
(``--micro-num 1``: one row of 2048 tokens with 4 segments; ``4``: four rows of 512).  The reference
(``benchmarks/hf_reference.py``) runs afterwards in a Python process of its own, with its own
defaults, as a user would run it: ``model(input_ids [4, 512], labels=...)``, ``clip_grad_norm_``,
``torch.optim.AdamW``.  ``--dtype bf16`` trains our model in bf16 (fp32 masters) and runs the
reference under ``torch.autocast("cpu", torch.bfloat16)``.

The two sides run one after the other (``--rounds N``: N times, alternating, the reference in a
new process each time, so that load changes hit both sides alike), and the machine's load average
is printed before each; run it on a quiet machine.  The table gives medians.  GFLOP/s use the
model FLOPs of :func:`step_flops` (6·N·T-style matmuls plus causal attention) for both sides; the
peak is the best square matmul measured in this run in the training dtype.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from hf_reference import (  # noqa: E402
    ADAM,
    DTYPES,
    Shape,
    add_shape_args,
    make_tokens,
    run_reference,
    shape_from_args,
)

from internevo.config import TrainConfig, config_from_dict  # noqa: E402
from internevo.parallel.comm import Comm  # noqa: E402
from internevo.parallel.layout import ParallelLayout  # noqa: E402
from internevo.train.metrics import measure_cpu_matmul_peak, step_flops  # noqa: E402
from internevo.train.trainer import Trainer  # noqa: E402

DEFAULT_SHAPE = Shape(hidden=512, layers=8, heads=8, kv_heads=4, ffn=1792, vocab=92544, docs=4,
                      seq=512)


def bench_config(shape: Shape, dtype: str, micro_num: int = 1) -> TrainConfig:
    """INTERNLM2_PUBLIC of ``shape``, dummy data, nothing written to disk."""
    return config_from_dict({
        "JOB_NAME": "bench", "model_type": "INTERNLM2_PUBLIC",
        "model": dict(num_layers=shape.layers, hidden_size=shape.hidden,
                      num_attention_heads=shape.heads, num_kv_attention_heads=shape.kv_heads,
                      mlp_ratio=shape.ffn / shape.hidden, multiple_of=128,
                      vocab_size=shape.vocab, rope_base=10000,
                      dtype="torch.float32" if dtype == "fp32" else "torch.bfloat16",
                      checkpoint=False),
        "data": dict(seq_len=shape.seq, micro_bsz=shape.docs // micro_num, micro_num=micro_num,
                     total_steps=1000, train_folder=None, valid_folder=None, valid_every=0,
                     num_worker=0),
        "adam": dict(lr=ADAM["lr"], adam_beta1=ADAM["betas"][0], adam_beta2=ADAM["betas"][1],
                     adam_eps=ADAM["eps"], weight_decay=ADAM["weight_decay"]),
        "lr_scheduler": dict(warmup_ratio=0.0, eta_min=1e-5),
        "hybrid_zero_optimizer": dict(clip_grad_norm=1.0),
        "loss": dict(label_smoothing=0),
        "ckpt": dict(enable_save_ckpt=False),
        "enable_tb": False,
        "parallel": dict(zero1=dict(size=1), tensor=dict(size=1), pipeline=1),
    })


def our_batch(tokens: torch.Tensor, micro_num: int) -> dict:
    """Documents ``[D, S]`` -> packed rows: next-token labels, -100 at each document's end."""
    docs, seq = tokens.shape
    labels = torch.full_like(tokens, -100)
    labels[:, :-1] = tokens[:, 1:]
    per_row = docs // micro_num
    rows = micro_num
    cu = torch.arange(0, per_row * seq + 1, seq, dtype=torch.int32)
    return {"input_ids": tokens.reshape(rows, -1), "labels": labels.reshape(rows, -1),
            "indexes": torch.arange(seq).repeat(docs).reshape(rows, -1),
            "type_ids": torch.zeros(rows, per_row * seq, dtype=torch.long),
            "cu_seqlens": [cu.clone() for _ in range(rows)]}


def build_ours(cfg: TrainConfig, run_dir: Path, device: torch.device) -> Trainer:
    """Our trainer for one process (no process group)."""
    layout = ParallelLayout.from_config(cfg, 1, 0)
    return Trainer(cfg, layout, Comm(layout), device, run_dir)


def run_ours(trainer: Trainer, batches: list[dict], warmup: int) -> dict:
    """Step ``trainer`` over ``batches``: seconds of the steps after ``warmup``, every loss."""
    times, losses = [], []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        losses.append(trainer.train_step(batch)["loss"])
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"times": times, "losses": losses}


def profile_step(trainer: Trainer, batch: dict) -> None:
    """Top operators of one of our steps (self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step(batch)
    print("--- profile of one internevo step")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def load() -> str:
    """The 1-minute load average, for the record."""
    return f"{os.getloadavg()[0]:.2f}"


def main() -> None:
    """Our loop here, theirs in its own process; tokens/s, the ratio, GFLOP/s vs the peak."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--steps", type=int, default=4, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side")
    p.add_argument("--micro-num", type=int, default=1, help="packed rows per step (divides docs)")
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate the sides this many times (theirs: a new process each time)")
    p.add_argument("--profile", action="store_true", help="print a profile of one of our steps")
    add_shape_args(p, DEFAULT_SHAPE)
    args = p.parse_args()
    shape, dtype = shape_from_args(args), DTYPES[args.dtype]
    cfg = bench_config(shape, args.dtype, args.micro_num)
    tokens = make_tokens(shape, args.warmup + args.steps * args.rounds)
    batches = [our_batch(t, args.micro_num) for t in tokens]
    ours, theirs, loads = {"times": [], "losses": []}, {"times": [], "losses": []}, []
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_ours(cfg, Path(run_dir), torch.device("cpu"))
        peak = max(measure_cpu_matmul_peak(dtype) for _ in range(2))
        for r in range(args.rounds):  # ours, theirs, ours, theirs, ...: load hits both alike
            start = 0 if r == 0 else args.warmup + r * args.steps
            loads.append(load())
            part = run_ours(trainer, batches[start:args.warmup + (r + 1) * args.steps],
                            args.warmup if r == 0 else 0)
            loads.append(load())
            other = run_reference(shape, "cpu", args.dtype, args.steps, args.warmup)
            for side, res in ((ours, part), (theirs, other)):
                side["times"] += res["times"]
                side["losses"] += res["losses"]
            theirs["threads"] = other["threads"]
        if args.profile:
            profile_step(trainer, batches[-1])
    loads.append(load())
    peak = max(peak, measure_cpu_matmul_peak(dtype))
    report(shape, cfg, args, peak, ours, theirs, loads)


def report(shape: Shape, cfg: TrainConfig, args: argparse.Namespace, peak: float, ours: dict,
           theirs: dict, loads: list[str]) -> None:
    """Print the comparison table."""
    flops = step_flops(cfg, shape.tokens, [shape.seq] * shape.docs)
    print(f"shape: hidden {shape.hidden}, {shape.layers} layers, {shape.heads} heads / "
          f"{shape.kv_heads} KV, FFN {shape.ffn}, vocab {shape.vocab}; {shape.docs} x "
          f"{shape.seq} tokens/step ({args.micro_num} packed row(s)); {args.dtype}; threads "
          f"ours {torch.get_num_threads()}, theirs {theirs['threads']} (own process)")
    print(f"matmul peak measured in this run ({args.dtype}): {peak / 1e9:.1f} GFLOP/s; "
          f"model FLOPs/step {flops / 1e9:.1f} G; load average before ours / theirs, ... , "
          f"after: {' / '.join(loads)}")
    print(f"{'loop':<26}{'median s':>10}{'tokens/s':>10}{'GFLOP/s':>10}{'% peak':>8}")
    for name, times in (("internevo", ours["times"]), ("transformers + AdamW", theirs["times"])):
        med = statistics.median(times)
        print(f"{name:<26}{med:>10.3f}{shape.tokens / med:>10.0f}{flops / med / 1e9:>10.1f}"
              f"{100 * flops / med / peak:>7.1f}%")
    ratio = statistics.median(theirs["times"]) / statistics.median(ours["times"])
    print(f"ratio internevo / transformers tokens/s: {ratio:.2f}x "
          f"(per-step times ours {[round(t, 3) for t in ours['times']]}, theirs "
          f"{[round(t, 3) for t in theirs['times']]})")
    print("first/last losses (ours, theirs; different inits): "
          f"{ours['losses'][0]:.3f}/{ours['losses'][-1]:.3f}, "
          f"{theirs['losses'][0]:.3f}/{theirs['losses'][-1]:.3f}")


if __name__ == "__main__":
    main()
