"""The data tools: raw text -> ``.bin``/``.meta`` (:func:`tokenize_main`) and Alpaca records ->
supervised ``train/`` and ``valid/`` folders (:func:`alpaca_main`).

Both keep InternEvo's command lines (``tools/tokenizer.py``, ``tools/alpaca_tokenizer.py``) and
write InternEvo's format atomically; neither replaces an existing output without
``--overwrite``.  Bad input is one :class:`DataError` naming the file and line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from internevo.data.chat import TEMPLATES, alpaca_sample, pick_template
from internevo.data.errors import DataError
from internevo.data.tokenized import TokenizedWriter, check_writable, encode_line
from internevo.data.tokenizer import Tokenizer, load_tokenizer

ASSETS = Path(__file__).resolve().parents[2] / "assets"
DEFAULT_TOKENIZER = ASSETS / "tokenizer_internlm.model"  # InternEvo's default (InternLM v1)
TEXT_SUFFIXES = (".txt", ".json", ".jsonl")
CHUNK = 256  # texts per worker task


# ------------------------------------------------------------------------------ reading


@dataclass
class Chunk:
    """Texts handed to one worker, and the input bytes they came from (for the progress bar)."""

    texts: list[str]
    nbytes: int


def input_files(path: str | Path) -> list[Path]:
    """The text files of an input path (a file, or a folder searched recursively, sorted)."""
    p = Path(path)
    if p.is_file():
        if p.suffix not in TEXT_SUFFIXES:
            raise DataError(f"{p}: unsupported input type {p.suffix!r}; use "
                            f"{', '.join(TEXT_SUFFIXES)} or a folder of them")
        return [p]
    if not p.is_dir():
        raise DataError(f"{p}: input path does not exist")
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
    if not files:
        raise DataError(f"{p}: folder has no {', '.join(TEXT_SUFFIXES)} files")
    return files


def _field(record: object, key: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict) or key not in record:
        fields = list(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: record has no {key!r} field (--text_key; it has {fields})")
    if not isinstance(record[key], str):
        raise DataError(f"{where}: field {key!r} is {type(record[key]).__name__}, not text")
    return record[key]


def _json_records(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from err
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: byte {err.start} is not UTF-8 ({err.reason}); re-encode the "
                        "file as UTF-8") from None
    return data if isinstance(data, list) else [data]


def read_records(path: Path) -> Iterator[tuple[str, object, int]]:
    """``(where, record, nbytes)`` of a .jsonl (one per non-empty line) or .json (a list) file."""
    if path.suffix == ".json":
        for i, rec in enumerate(_json_records(path)):
            yield f"{path}: record {i}", rec, 0
        return
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(_utf8(raw, f"{path}:{lineno}"))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({err.msg})") from err
            yield f"{path}:{lineno}", rec, len(raw)


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: byte {err.start} is not UTF-8 ({err.reason}); re-encode the "
                        "file as UTF-8") from None


def read_texts(path: Path, text_key: str) -> Iterator[tuple[str, int]]:
    """``(text, nbytes)`` per sample: .txt = each stripped line (empty ones give ""), .json/.jsonl
    = the ``text_key`` field of each record."""
    if path.suffix == ".txt":
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                yield _utf8(raw, f"{path}:{lineno}").strip(), len(raw)
        return
    for where, rec, nbytes in read_records(path):
        yield _field(rec, text_key, where), nbytes


def chunks(files: list[Path], text_key: str, stats: dict) -> Iterator[Chunk]:
    """Non-empty texts in chunks of :data:`CHUNK`; empty texts are counted in ``stats``."""
    texts, nbytes = [], 0
    for path in files:
        for text, n in read_texts(path, text_key):
            nbytes += n
            if not text.strip():
                stats["skipped_empty"] += 1
                continue
            texts.append(text)
            if len(texts) == CHUNK:
                yield Chunk(texts, nbytes)
                texts, nbytes = [], 0
        if path.suffix == ".json":
            nbytes += path.stat().st_size
    yield Chunk(texts, nbytes)


# ------------------------------------------------------------------------------ encoding

_WORKER_TOK: Optional[Tokenizer] = None


def _init_worker(tokenizer_path: str) -> None:
    global _WORKER_TOK  # one tokenizer per worker process, loaded once
    _WORKER_TOK = load_tokenizer(tokenizer_path, num_threads=1)


def _encode_chunk(texts: list[str], tok: Optional[Tokenizer] = None) -> list[tuple[bytes, int]]:
    tok = tok or _WORKER_TOK
    out = []
    for ids in (tok.encode_batch(texts) if texts else []):
        sample = tok.sample(ids)
        out.append((encode_line(sample), len(sample)))
    return out


def encoded_chunks(source: Iterator[Chunk], tokenizer_path: str,
                   workers: int) -> Iterator[tuple[list[tuple[bytes, int]], int]]:
    """Encoded lines per chunk, in input order; ``workers`` > 1 encodes in a process pool."""
    if workers <= 1:
        tok = load_tokenizer(tokenizer_path)
        for chunk in source:
            yield _encode_chunk(chunk.texts, tok), chunk.nbytes
        return
    import multiprocessing as mp

    # fork: workers need nothing from __main__, so callers need no `if __name__` guard
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers, _init_worker, (tokenizer_path,)) as pool:
        pending: deque = deque()
        for chunk in source:  # a bounded window keeps memory flat on huge inputs
            pending.append((pool.apply_async(_encode_chunk, (chunk.texts,)), chunk.nbytes))
            if len(pending) >= 4 * workers:
                job, n = pending.popleft()
                yield job.get(), n
        while pending:
            job, n = pending.popleft()
            yield job.get(), n


# ------------------------------------------------------------------------------ tokenize CLI


def tokenize_file(input_path: str, bin_output_path: str, tokenizer_path: str,
                  text_key: str = "text", workers: int = 1, overwrite: bool = False,
                  progress: bool = False) -> dict:
    """Tokenize ``input_path`` (.txt/.json/.jsonl or a folder) into ``bin_output_path`` + .meta.

    Each sample is ``[bos] + ids + [eos]``; empty texts are skipped and counted.
    Returns ``{"samples", "tokens", "skipped_empty", "bin", "meta"}``.
    """
    files = input_files(input_path)
    load_tokenizer(tokenizer_path)  # a bad tokenizer fails before any output is touched
    out = Path(bin_output_path)
    check_writable(out, overwrite)
    stats = {"samples": 0, "tokens": 0, "skipped_empty": 0}
    total = sum(f.stat().st_size for f in files)
    bar = _progress(total, progress)
    with TokenizedWriter(out, overwrite=overwrite) as writer:
        for lines, nbytes in encoded_chunks(chunks(files, text_key, stats), tokenizer_path,
                                            workers):
            for line, n in lines:
                writer.write_line(line, n)
            bar.update(nbytes)
        stats.update(samples=len(writer.lengths), tokens=writer.num_tokens)
    bar.close()
    return {**stats, "bin": str(out), "meta": str(writer.meta)}


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", disable=not enabled)


def tokenize_main(argv: Optional[Sequence[str]] = None) -> int:
    """``tools/tokenizer.py`` / ``internevo tokenize``: raw text -> ``.bin`` + ``.bin.meta``."""
    ap = argparse.ArgumentParser(prog="tokenizer.py", description=tokenize_main.__doc__)
    ap.add_argument("--text_input_path", required=True,
                    help=".txt (one sample per non-empty line), .json (list of records), "
                         ".jsonl (one record per line) or a folder of them")
    ap.add_argument("--bin_output_path", required=True, help="output X.bin (X.bin.meta beside)")
    ap.add_argument("--tokenizer_path", default=str(DEFAULT_TOKENIZER),
                    help="SentencePiece .model file or Hugging Face tokenizer folder "
                         "(default: the bundled InternLM tokenizer, as in InternEvo)")
    ap.add_argument("--text_key", default="text", help="record field holding the text")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="tokenizer processes (1 = in this process)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        stats = tokenize_file(args.text_input_path, args.bin_output_path, args.tokenizer_path,
                              args.text_key, args.workers, args.overwrite, not args.quiet)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {stats['samples']} samples, {stats['tokens']} tokens to {stats['bin']} "
          f"(+ .meta); skipped {stats['skipped_empty']} empty texts")
    return 0


# ------------------------------------------------------------------------------ alpaca CLI


def read_alpaca(path: str | Path) -> list[tuple[str, dict]]:
    """``(where, record)`` of an Alpaca JSON list or JSONL file, each with instruction/output."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: dataset file does not exist")
    out = []
    for where, rec, _ in read_records(p):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object with instruction/input/output")
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str):
                raise DataError(f"{where}: record has no text field {key!r}")
        if not isinstance(rec.get("input") or "", str):
            raise DataError(f"{where}: field 'input' is not text")
        out.append((where, rec))
    if not out:
        raise DataError(f"{p}: no records")
    return out


def split_indices(n: int, ratio: float, seed: int = 0) -> np.ndarray:
    """Sorted validation indices: ``int(n * ratio)`` distinct records, seeded (no duplicates)."""
    if not 0.0 <= ratio < 1.0:
        raise DataError(f"--split_ratio={ratio}: must be in [0, 1)")
    return np.sort(np.random.RandomState(seed).permutation(n)[: int(n * ratio)])


def tokenize_alpaca(dataset_path: str, output_path: str, tokenizer_path: str,
                    split_ratio: float = 0.1, max_length: int = 2048, template: str = "auto",
                    seed: int = 0, overwrite: bool = False) -> dict:
    """Alpaca records -> ``output/train/en/dataset.bin`` and ``output/valid/en/dataset.bin``.

    Returns per split ``{"samples", "tokens", "truncated"}`` and the chosen template.
    """
    records = read_alpaca(dataset_path)
    tok = load_tokenizer(tokenizer_path)
    template = pick_template(tok, template)
    valid = set(split_indices(len(records), split_ratio, seed).tolist())
    splits = {"train": [r for i, (_, r) in enumerate(records) if i not in valid],
              "valid": [r for i, (_, r) in enumerate(records) if i in valid]}
    outs = {name: Path(output_path) / name / "en" / "dataset.bin" for name in splits}
    for name, path in outs.items():  # check every output before writing any
        if splits[name]:
            check_writable(path, overwrite)
    report: dict = {"template": template}
    for name, recs in splits.items():
        if recs:
            report[name] = _write_alpaca(outs[name], recs, tok, template, max_length, overwrite)
    return report


def _write_alpaca(path: Path, records: list[dict], tok: Tokenizer, template: str,
                  max_length: int, overwrite: bool) -> dict:
    truncated = 0
    with TokenizedWriter(path, overwrite=overwrite) as writer:
        for rec in records:
            sample, cut = alpaca_sample(rec, tok, template, max_length)
            truncated += cut
            writer.write(sample)
    return {"samples": len(records), "tokens": writer.num_tokens, "truncated": truncated,
            "bin": str(path)}


def alpaca_main(argv: Optional[Sequence[str]] = None) -> int:
    """``tools/alpaca_tokenizer.py`` / ``internevo tokenize-alpaca``: Alpaca -> train/valid."""
    ap = argparse.ArgumentParser(prog="alpaca_tokenizer.py", description=alpaca_main.__doc__)
    ap.add_argument("dataset_path", help="Alpaca records: a JSON list or a JSONL file")
    ap.add_argument("output_path", help="output folder (train/en/, valid/en/ inside)")
    ap.add_argument("tokenizer_path", help="SentencePiece .model or Hugging Face folder")
    ap.add_argument("--split_ratio", type=float, default=0.1, help="validation share")
    ap.add_argument("--max_length", type=int, default=2048, help="longest sample in tokens")
    ap.add_argument("--template", default="auto", choices=TEMPLATES,
                    help="chat template (auto: internlm for InternLM v1, else chatml)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the train/valid split")
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = ap.parse_args(argv)
    try:
        report = tokenize_alpaca(args.dataset_path, args.output_path, args.tokenizer_path,
                                 args.split_ratio, args.max_length, args.template, args.seed,
                                 args.overwrite)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for name in ("train", "valid"):
        if name in report:
            r = report[name]
            print(f"{name}: {r['samples']} samples, {r['tokens']} tokens "
                  f"({r['truncated']} truncated to {args.max_length}) -> {r['bin']}")
    print(f"chat template: {report['template']}")
    return 0
