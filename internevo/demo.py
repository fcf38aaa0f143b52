"""``make demo``: tokenize the bundled corpus, train the demo model on CPU, summarise the run.

Steps: split ``assets/tinyshakespeare.txt`` into speeches (blank-line separated blocks; every
20th goes to validation) as JSONL, tokenize them with the raw-data tokenizer and the real
InternLM2 tokenizer into ``demo_data/{train,valid}/en/``, train ``configs/demo.py`` into
``runs/demo``, print the loss curve's ends, throughput and where the logs are, then export the
final checkpoint to a Hugging Face folder and generate a continuation with ``transformers``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CORPUS = ASSETS / "tinyshakespeare.txt"
TOKENIZER = ASSETS / "tokenizer_internlm2.model"
DATA = Path("demo_data")
RUN_DIR = Path("runs/demo")
CONFIG = "configs/demo.py"


def split_corpus(corpus: Path, out_dir: Path, valid_every: int = 20) -> tuple[Path, Path]:
    """Write the corpus's speeches to ``train.jsonl`` / ``valid.jsonl`` (deterministic split)."""
    blocks = [b.strip() for b in corpus.read_text(encoding="utf-8").split("\n\n") if b.strip()]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "train.jsonl", out_dir / "valid.jsonl"
    with open(paths[0], "w") as train, open(paths[1], "w") as valid:
        for i, block in enumerate(blocks):
            (valid if i % valid_every == valid_every - 1 else train).write(
                json.dumps({"text": block}) + "\n")
    return paths


def prepare_data() -> None:
    """Tokenize the demo corpus once (kept in ``demo_data/`` for later runs)."""
    from internevo.data.tools import tokenize_main

    targets = [DATA / "train/en/shakespeare.bin", DATA / "valid/en/shakespeare.bin"]
    if all(p.exists() and Path(str(p) + ".meta").exists() for p in targets):
        print(f"[demo] using tokenized data in {DATA}/")
        return
    raw = split_corpus(CORPUS, DATA / "raw")
    for target, source in zip(targets, raw):
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"[demo] tokenizing {source} -> {target}")
        tokenize_main(["--text_input_path", str(source), "--bin_output_path", str(target),
                       "--tokenizer_path", str(TOKENIZER), "--overwrite"])


def train(extra: list[str]) -> list[dict]:
    """Train the demo config into a fresh ``runs/demo``."""
    from internevo.cli import add_train_arguments, run_train

    if RUN_DIR.exists():
        shutil.rmtree(RUN_DIR)  # the demo's own folder: every demo run starts fresh
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return run_train(parser.parse_args(["--config", CONFIG, "--run-dir", str(RUN_DIR), *extra]))


def summarise(history: list[dict]) -> None:
    """Print first/last loss, throughput and where the logs are."""
    from internevo.profiling.report import report_path

    steps = [r for r in history if "loss" in r and r.get("success", True)]
    first, last = steps[0], steps[-1]
    tail = steps[len(steps) // 2:]  # second half: past start-up effects
    tgs = statistics.median(r["tgs"] for r in tail)
    mfus = [r["mfu"] for r in tail if r["mfu"] is not None]
    mfu = f"{100 * statistics.median(mfus):.1f}%" if mfus else "unknown"
    print("\n[demo] summary")
    print(f"  loss: first step {first['loss']:.3f} -> last step {last['loss']:.3f} "
          f"({len(steps)} steps)")
    print(f"  throughput (median of the second half): {tgs:.0f} tokens/s per process, MFU {mfu}")
    print(f"  metrics: {RUN_DIR / 'metrics.jsonl'}")
    print(f"  TensorBoard: tensorboard --logdir {RUN_DIR / 'tensorboard'}")
    print(f"  picture of the run: {report_path(RUN_DIR)}")


def export_and_generate(prompt: str = "ROMEO:") -> None:
    """Export the final checkpoint to a Hugging Face Llama folder; continue ``prompt`` with it."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from internevo.cli import convert_main

    hf_dir = RUN_DIR / "hf"
    convert_main(["to-hf", "--src", str(RUN_DIR / "checkpoints"), "--tgt", str(hf_dir),
                  "--tokenizer", str(TOKENIZER), "--format", "llama", "--dtype", "float32",
                  "--overwrite"])
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = LlamaForCausalLM.from_pretrained(hf_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=40, do_sample=False, repetition_penalty=1.3)
    print(f"\n[demo] exported to {hf_dir} (stock transformers LlamaForCausalLM); "
          "greedy continuation:")
    print(tokenizer.decode(out[0], skip_special_tokens=True))


def main(argv: list[str] | None = None) -> int:
    """Run the whole demo; extra arguments go to the trainer (``--set data.total_steps=20``)."""
    extra = list(sys.argv[1:] if argv is None else argv)
    prepare_data()
    history = train(extra)
    summarise(history)
    export_and_generate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
