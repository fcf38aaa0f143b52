"""Our training step vs a plain ``transformers`` LlamaForCausalLM + AdamW loop, in one run.

    .venv/bin/python benchmarks/bench_vs_transformers.py [--dtype fp32|bf16] [--steps 6]
        [--warmup 1] [--micro-num 1] [--profile]

Both sides train the same shape (default: hidden 512, 8 layers, 8 heads / 4 KV heads, FFN 1792,
vocab 92,544) on the same tokens: 4 documents of 512 tokens per step.  Ours is the real
``Trainer.train_step`` (INTERNLM2_PUBLIC from ``config_from_dict`` + ``build_model``,
``HybridZeroOptimizer`` with fp32 masters, clipping, our loss and metrics) on packed rows
(``--micro-num 1``: one row of 2048 tokens with 4 segments; ``4``: four rows of 512).  The reference
is ``model(input_ids [4, 512], labels=...)``, ``clip_grad_norm_``, ``torch.optim.AdamW`` with
default settings.  ``--dtype bf16`` trains our model in bf16 (fp32 masters) and runs the reference
under ``torch.autocast("cpu", torch.bfloat16)``.

Steps alternate between the two sides (ours, theirs, ours, ...) so that machine noise hits both
alike; the table gives medians.  GFLOP/s use the model FLOPs of :func:`step_flops` (6·N·T-style
matmuls plus causal attention) for both sides; the peak is the best square matmul measured in this
run in the training dtype.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from internevo.config import TrainConfig, config_from_dict  # noqa: E402
from internevo.parallel.comm import Comm  # noqa: E402
from internevo.parallel.layout import ParallelLayout  # noqa: E402
from internevo.train.metrics import measure_cpu_matmul_peak, step_flops  # noqa: E402
from internevo.train.trainer import Trainer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bench_config(args: argparse.Namespace) -> TrainConfig:
    """INTERNLM2_PUBLIC of the benchmark shape, dummy data, nothing written to disk."""
    micro_bsz = args.docs // args.micro_num
    return config_from_dict({
        "JOB_NAME": "bench", "model_type": "INTERNLM2_PUBLIC",
        "model": dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=8,
                      num_kv_attention_heads=4, mlp_ratio=args.ffn / args.hidden,
                      multiple_of=128, vocab_size=args.vocab, rope_base=10000,
                      dtype="torch.float32" if args.dtype == "fp32" else "torch.bfloat16",
                      checkpoint=False, use_flash_attn=False),
        "data": dict(seq_len=args.seq, micro_bsz=micro_bsz, micro_num=args.micro_num,
                     total_steps=1000, train_folder=None, valid_folder=None, valid_every=0,
                     num_worker=0),
        "adam": dict(lr=1e-4, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.01),
        "lr_scheduler": dict(warmup_ratio=0.0, eta_min=1e-5),
        "hybrid_zero_optimizer": dict(clip_grad_norm=1.0),
        "loss": dict(label_smoothing=0),
        "ckpt": dict(enable_save_ckpt=False),
        "enable_tb": False,
        "parallel": dict(zero1=dict(size=1), tensor=dict(size=1), pipeline=1),
    })


def make_tokens(args: argparse.Namespace, steps: int) -> list[torch.Tensor]:
    """``[docs, seq]`` token ids per step (the same for both sides)."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, args.vocab, (args.docs, args.seq), generator=gen)
            for _ in range(steps)]


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


def build_ours(cfg: TrainConfig, run_dir: Path) -> Trainer:
    """Our trainer for one process (no process group)."""
    layout = ParallelLayout.from_config(cfg, 1, 0)
    return Trainer(cfg, layout, Comm(layout), torch.device("cpu"), run_dir)


def build_theirs(args: argparse.Namespace, cfg: TrainConfig):
    """``LlamaForCausalLM`` of the same shape (fp32 weights) and a default ``torch.optim.AdamW``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.ffn, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=max(2048, args.seq), rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_cfg).train()
    a = cfg.adam
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(a.adam_beta1, a.adam_beta2),
                            eps=a.adam_eps, weight_decay=a.weight_decay)
    return model, opt


def their_step(model, opt, tokens: torch.Tensor, dtype: torch.dtype) -> float:
    """One plain-loop step; returns the loss."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def timed(fn, *a) -> tuple[float, float]:
    start = time.perf_counter()
    out = fn(*a)
    return time.perf_counter() - start, out


def profile_step(name: str, fn, *a) -> None:
    """Top operators of one step (self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*a)
    print(f"--- profile of one {name} step")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def main() -> None:
    """Interleave the two loops, print tokens/s, the ratio and GFLOP/s vs the measured peak."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--steps", type=int, default=6, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side")
    p.add_argument("--micro-num", type=int, default=1, help="packed rows per step (divides docs)")
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ffn", type=int, default=1792)
    p.add_argument("--vocab", type=int, default=92544)
    p.add_argument("--profile", action="store_true", help="print a profile of one of our steps")
    args = p.parse_args()
    dtype = DTYPES[args.dtype]
    cfg = bench_config(args)
    tokens = make_tokens(args, args.warmup + args.steps)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_ours(cfg, Path(run_dir))
        model, opt = build_theirs(args, cfg)
        peak = max(measure_cpu_matmul_peak(dtype) for _ in range(2))
        ours, theirs, losses = [], [], []
        for i, t in enumerate(tokens):
            t_ours, rec = timed(trainer.train_step, our_batch(t, args.micro_num))
            t_theirs, loss = timed(their_step, model, opt, t, dtype)
            if i >= args.warmup:
                ours.append(t_ours)
                theirs.append(t_theirs)
            losses.append((rec["loss"], loss))
        peak = max(peak, measure_cpu_matmul_peak(dtype))
        if args.profile:
            profile_step("internevo", trainer.train_step, our_batch(tokens[-1], args.micro_num))
            profile_step("transformers", their_step, model, opt, tokens[-1], dtype)
    n_tok = args.docs * args.seq
    flops = step_flops(cfg, n_tok, [args.seq] * args.docs)
    print(f"shape: hidden {args.hidden}, {args.layers} layers, 8 heads / 4 KV, FFN {args.ffn}, "
          f"vocab {args.vocab}; {args.docs} x {args.seq} tokens/step "
          f"({args.micro_num} packed row(s)); {args.dtype}; threads {torch.get_num_threads()}")
    print(f"matmul peak measured in this run ({args.dtype}): {peak / 1e9:.1f} GFLOP/s; "
          f"model FLOPs/step {flops / 1e9:.1f} G")
    print(f"{'loop':<26}{'median s':>10}{'tokens/s':>10}{'GFLOP/s':>10}{'% peak':>8}")
    for name, times in (("internevo", ours), ("transformers + AdamW", theirs)):
        med = statistics.median(times)
        print(f"{name:<26}{med:>10.3f}{n_tok / med:>10.0f}{flops / med / 1e9:>10.1f}"
              f"{100 * flops / med / peak:>7.1f}%")
    ratio = statistics.median(theirs) / statistics.median(ours)
    print(f"ratio internevo / transformers tokens/s: {ratio:.2f}x "
          f"(per-step times ours {[round(t, 3) for t in ours]}, theirs "
          f"{[round(t, 3) for t in theirs]})")
    print("first/last losses (ours, theirs; different inits): "
          f"{losses[0][0]:.3f}/{losses[-1][0]:.3f}, {losses[0][1]:.3f}/{losses[-1][1]:.3f}")


if __name__ == "__main__":
    main()
