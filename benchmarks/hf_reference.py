"""The reference side of the benchmarks: a plain ``transformers`` LlamaForCausalLM + AdamW loop.

    .venv/bin/python benchmarks/hf_reference.py [--device cpu|cuda] [--dtype fp32|bf16]
        [--steps 4] [--warmup 1] [shape flags]

The benchmarks start it with :func:`run_reference` in a process of its own, as a user would run
it: its own torch defaults (threads, allocator), nothing of internevo imported, no other model in
memory.  The loop is ``model(input_ids [docs, seq], labels=...)``, ``clip_grad_norm_(1.0)`` and
``torch.optim.AdamW`` (fp32 weights; ``bf16`` runs the forward under ``torch.autocast``), with
the attention ``sdpa``.  It prints one JSON line: per-step seconds and losses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ADAM = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
"""AdamW settings used by both sides of every benchmark."""


@dataclass(frozen=True)
class Shape:
    """Model and batch shape shared by both sides (InternLM2 / Llama, GQA, no tied head)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    docs: int
    """Documents per step (each one causal sequence; packed into one row on our side)."""
    seq: int
    """Tokens per document."""

    @property
    def tokens(self) -> int:
        """Tokens per step."""
        return self.docs * self.seq


def add_shape_args(p: argparse.ArgumentParser, default: Shape) -> None:
    """One ``--<field>`` flag per :class:`Shape` field, defaulting to ``default``."""
    for f in fields(Shape):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=getattr(default, f.name))


def shape_from_args(args: argparse.Namespace) -> Shape:
    """The :class:`Shape` given by :func:`add_shape_args` flags."""
    return Shape(**{f.name: getattr(args, f.name) for f in fields(Shape)})


def shape_flags(shape: Shape) -> list[str]:
    """Command-line flags that reproduce ``shape``."""
    return [x for f in fields(Shape)
            for x in (f"--{f.name.replace('_', '-')}", str(getattr(shape, f.name)))]


def make_tokens(shape: Shape, steps: int) -> list[torch.Tensor]:
    """``[docs, seq]`` token ids per step, the same on both sides (seeded)."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, shape.vocab, (shape.docs, shape.seq), generator=gen)
            for _ in range(steps)]


def build_llama(shape: Shape, device: torch.device):
    """``LlamaForCausalLM`` of ``shape`` (fp32 weights, sdpa) and a ``torch.optim.AdamW``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden,
                      intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
                      num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                      max_position_embeddings=max(2048, shape.seq), rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    with device:  # initialised where it trains (a 1.8B model initialises slowly on a CPU)
        model = LlamaForCausalLM(cfg).train()
    return model, torch.optim.AdamW(model.parameters(), **ADAM)


def their_step(model, opt, tokens: torch.Tensor, dtype: torch.dtype) -> float:
    """One plain-loop step; returns the loss (``.item()`` waits for the device)."""
    with torch.autocast(tokens.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def run_loop(shape: Shape, device: torch.device, dtype: torch.dtype, steps: int,
             warmup: int) -> dict:
    """Train ``warmup + steps`` steps; seconds of the timed ones, every loss, peak device bytes."""
    model, opt = build_llama(shape, device)
    times, losses = [], []
    for i, tokens in enumerate(make_tokens(shape, warmup + steps)):
        tokens = tokens.to(device)
        start = time.perf_counter()
        losses.append(their_step(model, opt, tokens, dtype))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"times": times, "losses": losses, "threads": torch.get_num_threads(),
            "peak_bytes": peak}


def run_reference(shape: Shape, device: str, dtype: str, steps: int, warmup: int) -> dict:
    """:func:`run_loop` in a fresh Python process (this script); returns its JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--device", device, "--dtype", dtype,
           "--steps", str(steps), "--warmup", str(warmup), *shape_flags(shape)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"reference loop failed (exit {done.returncode}): {' '.join(cmd)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Parse the flags, train, print the JSON result."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    add_shape_args(p, Shape(512, 8, 8, 4, 1792, 92544, 4, 512))
    args = p.parse_args()
    shape = shape_from_args(args)
    result = run_loop(shape, torch.device(args.device), DTYPES[args.dtype], args.steps,
                      args.warmup)
    print(json.dumps({"shape": asdict(shape), **result}))


if __name__ == "__main__":
    main()
