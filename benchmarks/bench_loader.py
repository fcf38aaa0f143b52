"""Loader throughput next to the trainer's consumption, for the demo model, in one run.

    .venv/bin/python benchmarks/bench_loader.py [--batches 200] [--steps 3]

Prints tokens/s of the training loader on the three data paths (tokenized tiny-shakespeare,
streaming the same text with on-the-fly tokenization, dummy data) and the tokens/s the demo
model consumes in a forward + backward + AdamW step; the ratio must stay well above 1
(aim: >= 20x) so data loading is never the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

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

    Needs ``internevo.models.registry.build_model``; the batches come from dummy data so that
    this number does not depend on the loader being measured.
    """
    from internevo.models.registry import build_model
    from torch.nn import functional as F

    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dummy = TrainConfig(data=cfg.data, model=cfg.model)
    dummy.data.train_folder = None
    it = iter(build_train_loader(dummy, 0, 1))

    def step(batch: dict) -> None:
        for m in range(batch["input_ids"].shape[0]):
            logits = model(batch["input_ids"][m:m + 1], cu_seqlens=batch["cu_seqlens"][m],
                           indexes=batch["indexes"][m])
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"][m],
                                   ignore_index=-100)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(next(it))  # warm-up
    start, tokens = time.perf_counter(), 0
    for _ in range(steps):
        batch = next(it)
        step(batch)
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
    ap.add_argument("--steps", type=int, default=3, help="timed training steps")
    args = ap.parse_args()
    cfg = demo_config()
    d, m = cfg.data, cfg.model
    print(f"demo shape: {cfg.model_type} L={m.num_layers} h={m.hidden_size} V={m.vocab_size} "
          f"{m.dtype}; row = seq_len {d.seq_len} x micro_bsz {d.micro_bsz} = "
          f"{cfg.packed_length} tokens, micro_num {d.micro_num}; torch threads "
          f"{torch.get_num_threads()}")
    train = trainer_tokens_per_s(cfg, args.steps)
    print(f"{'trainer (fwd+bwd+AdamW)':<28}{train:>14,.0f} tokens/s")
    with tempfile.TemporaryDirectory() as tmp:
        for name, c in prepare(Path(tmp), cfg).items():
            rate = loader_tokens_per_s(c, args.batches)
            print(f"{'loader ' + name + ' (0 workers)':<28}{rate:>14,.0f} tokens/s"
                  f"   {rate / train:8.1f}x the trainer")


if __name__ == "__main__":
    main()
