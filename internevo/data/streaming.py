"""Streaming data: Hugging Face ``datasets`` streaming, tokenized on the fly, packed like files.

``train_folder`` is a local dataset folder (``load_dataset(folder, data_dir=subset_name)``) or one
data file (json/jsonl/parquet/arrow/txt).  Each data-parallel rank reads its own part
(``split_dataset_by_node``).  A record's ``content_name`` field becomes ``[bos] + ids + [eos]``
(empty texts and samples shorter than ``min_length`` are skipped, as in the tokenizer tool), and
the samples are packed **in stream order with the same cut/into-one packer as tokenized files**
(InternEvo's streaming pad-packer is not used): the same samples in the same order give the same
rows on both paths.  When the stream ends, the partial row is dropped and the next epoch starts
from the beginning.

Position (the resume state, plain Python): records are read in chunks of :data:`CHUNK`; a
position is the ``datasets`` state taken before the chunk holding the current sample, the
sample's index inside that chunk and how many of its tokens are consumed.  Resuming re-reads that
one chunk, so restoring is cheap and exact.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any, Optional

import numpy as np

from internevo.data.errors import DataError
from internevo.data.packing import Pack, check_pack_shape, cut_window
from internevo.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CHUNK = 64  # records tokenized together; part of the position format, so fixed
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow",
             ".txt": "text"}


def open_stream(path: str, subset_name: Optional[str], dp_rank: int, dp_size: int) -> Any:
    """This rank's part of a streaming ``datasets.IterableDataset`` (local folder or file)."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: data.train_folder does not exist")
    try:
        if p.is_file():
            if p.suffix not in _BUILDERS:
                raise DataError(f"{path}: unsupported data file type {p.suffix!r}; use one of "
                                f"{', '.join(sorted(_BUILDERS))} or a dataset folder")
            ds = datasets.load_dataset(_BUILDERS[p.suffix], data_files=str(p), split="train",
                                       streaming=True)
        else:
            ds = datasets.load_dataset(str(p), data_dir=subset_name, split="train",
                                       streaming=True)
    except DataError:
        raise
    except Exception as err:  # datasets raises many kinds (empty folder, unknown layout ...)
        raise DataError(f"{path}: cannot open as a streaming dataset ({err})") from err
    return split_dataset_by_node(ds, rank=dp_rank, world_size=dp_size)


def start_position() -> dict:
    """Position of a fresh run."""
    return {"epoch": 0, "chunk_state": None, "record": -1, "offset": 0, "chunk": CHUNK}


class StreamPacker:
    """Packed rows of one rank's stream, each with the position right after it."""

    def __init__(self, path: str, tokenizer: Tokenizer, seq_len: int, packed_length: int,
                 into_one: bool = False, content_name: str = "text", min_length: int = 0,
                 subset_name: Optional[str] = None, dp_rank: int = 0, dp_size: int = 1):
        check_pack_shape(seq_len, packed_length, into_one)
        self.path, self.tokenizer, self.content_name = path, tokenizer, content_name
        self.seq_len, self.packed_length, self.into_one = seq_len, packed_length, into_one
        self.min_length, self.subset_name = min_length, subset_name
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_skipped = 0
        open_stream(path, subset_name, dp_rank, dp_size)  # fail now, not in the first step

    def packs(self, pos: dict) -> Iterator[tuple[Pack, dict]]:
        """Rows from ``pos`` on, forever (epoch after epoch)."""
        if pos.get("chunk") != CHUNK:
            raise DataError(f"streaming position was saved with chunk={pos.get('chunk')}, "
                            f"this version reads chunks of {CHUNK}")
        while True:
            produced = False
            for pack, after in self._epoch(pos):
                produced = True
                yield pack, after
            if not produced and pos == {**start_position(), "epoch": pos["epoch"]}:
                raise DataError(f"{self.path}: rank {self.dp_rank}'s part of the stream has "
                                f"fewer than packed_length={self.packed_length} tokens")
            pos = {**start_position(), "epoch": pos["epoch"] + 1}

    def _epoch(self, pos: dict) -> Iterator[tuple[Pack, dict]]:
        cursor = _Cursor(self._samples(pos))
        offset = pos["offset"]
        while True:
            try:
                pack, end = cut_window(cursor.samples(), offset, self.packed_length,
                                       self.seq_len, self.into_one)
            except StopIteration:
                return  # the tail shorter than a row is dropped, as for files
            _, state, record = cursor.current
            offset = end
            yield pack, {**pos, "chunk_state": state, "record": record, "offset": end}

    def _samples(self, pos: dict) -> Iterator[tuple[np.ndarray, Any, int]]:
        """(tokens, state before its chunk, index in chunk), starting at ``pos``'s sample."""
        ds = open_stream(self.path, self.subset_name, self.dp_rank, self.dp_size)
        state = pos["chunk_state"]
        if state is not None:
            ds.load_state_dict(state)
        it, skip = iter(ds), pos["record"]
        while True:
            records = self._read(it)
            if not records:
                return
            next_state = ds.state_dict()  # taken before the next chunk's first record
            for r, tokens in enumerate(self._tokenize(records)):
                if r >= skip and tokens is not None:
                    yield tokens, state, r
            state, skip = next_state, -1

    def _read(self, it: Iterator) -> list:
        try:
            return list(islice(it, CHUNK))
        except Exception as err:  # a malformed file surfaces here, deep inside datasets
            raise DataError(f"{self.path}: cannot read records ({err})") from err

    def _tokenize(self, records: list) -> list[Optional[np.ndarray]]:
        texts = [self._text(rec) for rec in records]
        keep = [i for i, t in enumerate(texts) if t.strip()]
        ids = self.tokenizer.encode_batch([texts[i] for i in keep]) if keep else []
        out: list[Optional[np.ndarray]] = [None] * len(records)
        for i, toks in zip(keep, ids):
            sample = self.tokenizer.sample(toks)
            if len(sample) >= self.min_length:
                out[i] = np.asarray(sample, dtype=np.int64)
        self.num_skipped += sum(t is None for t in out)
        return out

    def _text(self, record: dict) -> str:
        text = record.get(self.content_name)
        if not isinstance(text, str):
            shown = json.dumps(record, default=str)[:200]
            what = "has no" if text is None else "has a non-string"
            raise DataError(f"{self.path}: record {what} field {self.content_name!r} "
                            f"(data.content_name): {shown}")
        return text


class _Cursor:
    """Feeds the packer: the partly used current sample first, then the rest of the stream."""

    def __init__(self, gen: Iterator[tuple[np.ndarray, Any, int]]):
        self.gen = gen
        self.current: Optional[tuple[np.ndarray, Any, int]] = None

    def samples(self) -> Iterator[tuple[np.ndarray, int]]:
        if self.current is not None:
            yield self.current[0], 0
        for item in self.gen:
            self.current = item
            yield item[0], 0
