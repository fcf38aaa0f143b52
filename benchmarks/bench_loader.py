"""Loader throughput next to the trainer's consumption, for the demo model, in one run.

    .venv/bin/python benchmarks/bench_loader.py [--batches 200] [--steps 1] [--dtype torch.float32]

Prints tokens/s of the training loader on the three data paths (tokenized tiny-shakespeare,
streaming the same text with on-the-fly tokenization, dummy data) and the tokens/s the demo
model consumes in a forward + backward + AdamW step; the ratio must stay well above 1
(aim: >= 20x) so data loading is never the bottleneck.  Loaders run with 0 workers
(the worst case) unless noted.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from internevo.config import TrainConfig, load_config
from internevo.data.loader import build_train_loader
from internevo.data.tools import tokenize_file

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "assets" / "tinyshakespeare.txt"
TOKENIZER = ROOT / "assets" / "tokenizer_internlm2.model"


def demo_config() -> TrainConfig:
    """The demo config (InternLM2, vocab 92544) with loader workers off (worst case)."""
    cfg = load_config(ROOT / "configs" / "demo.py")
    cfg.data.num_worker = 0
    return cfg


def loader_tokens_per_s(cfg: TrainConfig, batches: int) -> float:
    """Tokens/s of ``build_train_loader`` for ``cfg`` over ``batches`` batches (after one)."""
    it = iter(build_train_loader(cfg, 0, 1))
    next(it)  # first batch pays for opening files / streams
    start, tokens = time.perf_counter(), 0
    for _ in range(batches):
        tokens += next(it)["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def trainer_tokens_per_s(cfg: TrainConfig, steps: int) -> float:
    """Tokens/s of forward + backward + AdamW on the demo model (packed rows, cu_seqlens).

    Uses ``internevo.models.build.build_model``; the batches come from dummy data so that
    this number does not depend on the loader being measured.  No warm-up step: on CPU one step
    takes many seconds, so first-call overheads do not matter.
    """
    from internevo.models.build import build_model

    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dummy = TrainConfig(data=copy.deepcopy(cfg.data), model=cfg.model)
    dummy.data.train_folder = None
    it = iter(build_train_loader(dummy, 0, 1))
    start, tokens = time.perf_counter(), 0
    for _ in range(steps):
        batch = next(it)
        for m in range(batch["input_ids"].shape[0]):
            logits = model(batch["input_ids"][m:m + 1], cu_seqlens=batch["cu_seqlens"][m],
                           indexes=batch["indexes"][m])
            F.cross_entropy(logits.float().flatten(0, 1), batch["labels"][m]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def prepare(tmp: Path, cfg: TrainConfig) -> dict[str, TrainConfig]:
    """Tokenize the corpus once; one config per data path."""
    tokenize_file(str(CORPUS), str(tmp / "train" / "en" / "shakespeare.bin"), str(TOKENIZER),
                  workers=2)
    with open(tmp / "shakespeare.jsonl", "w") as fh:
        for line in CORPUS.read_text(encoding="utf-8").splitlines():
            if line.strip():
                fh.write(json.dumps({"text": line.strip()}) + "\n")
    out = {}
    for name, data in {
        "tokenized": dict(train_folder=str(tmp / "train")),
        "streaming": dict(type="streaming", train_folder=str(tmp / "shakespeare.jsonl"),
                          tokenizer_path=str(TOKENIZER)),
        "dummy": dict(train_folder=None),
    }.items():
        c = demo_config()
        for key, value in data.items():
            setattr(c.data, key, value)
        out[name] = c
    return out


def main() -> None:
    """Measure and print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, default=200, help="loader batches per data path")
    ap.add_argument("--steps", type=int, default=1, help="timed training steps")
    ap.add_argument("--dtype", default=None, help="override the demo's model.dtype")
    args = ap.parse_args()
    cfg = demo_config()
    if args.dtype:
        cfg.model.dtype = args.dtype
    d, m = cfg.data, cfg.model
    print(f"demo shape: {cfg.model_type} L={m.num_layers} h={m.hidden_size} V={m.vocab_size} "
          f"{m.dtype}; row = seq_len {d.seq_len} x micro_bsz {d.micro_bsz} = "
          f"{cfg.packed_length} tokens, micro_num {d.micro_num}; torch threads "
          f"{torch.get_num_threads()}", flush=True)
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, c in prepare(Path(tmp), cfg).items():
            for workers in (0, 2) if name == "tokenized" else (0,):
                c.data.num_worker = workers
                rates[f"loader {name} ({workers} workers)"] = loader_tokens_per_s(c, args.batches)
                print(f"{'loader ' + name + f' ({workers} workers)':<30}"
                      f"{rates[f'loader {name} ({workers} workers)']:>12,.0f} tokens/s", flush=True)
    train = trainer_tokens_per_s(cfg, args.steps)
    print(f"{'trainer fwd+bwd+AdamW':<30}{train:>12,.1f} tokens/s")
    for name, rate in rates.items():
        print(f"{name:<30}{rate / train:>12,.0f}x the trainer")


if __name__ == "__main__":
    main()
