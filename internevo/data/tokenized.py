"""InternEvo's tokenized format: ``X.bin`` (JSON lines ``{"tokens": [...]}``) + ``X.bin.meta``.

``X.bin.meta`` is a NumPy ``.npy`` file (written with ``np.save`` to an open handle, so no ``.npy``
suffix is added) holding an ``(N, 2)`` integer array: row k = (byte offset of line k, token
count of line k).  The reader takes column 0 as offsets and the last column as lengths, like
InternEvo; the writer always uses int64 (InternEvo's tokenizer wrote int32, which overflows past
2 GiB).  Negative token ids mean "input |id|, no loss".
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from internevo.data.errors import DataError

META_SUFFIX = ".meta"


def meta_path(bin_path: str | Path) -> Path:
    """The ``.meta`` file that belongs to ``bin_path``."""
    return Path(str(bin_path) + META_SUFFIX)


def encode_line(tokens: Sequence[int]) -> bytes:
    """One ``.bin`` line, byte for byte as InternEvo's tools write it."""
    return (json.dumps({"tokens": [int(t) for t in tokens]}) + "\n").encode()


def save_meta(fh, offsets: Sequence[int], lengths: Sequence[int]) -> None:
    """Write the ``(N, 2)`` int64 meta array to an open binary handle."""
    meta = np.stack([np.asarray(offsets, dtype=np.int64), np.asarray(lengths, dtype=np.int64)],
                    axis=1) if len(offsets) else np.zeros((0, 2), dtype=np.int64)
    np.save(fh, meta)


class TokenizedWriter:
    """Writes ``X.bin`` + ``X.bin.meta`` atomically.

    Lines go to hidden temporary files next to the target; :meth:`commit` renames the ``.bin``
    first and the ``.meta`` last, so a killed run leaves either nothing new or a ``.bin`` without a
    ``.meta`` (which the reader rejects), never a pair that looks complete.  An existing pair is
    replaced only with ``overwrite=True``.  Use as a context manager: an exception aborts.
    """

    def __init__(self, bin_path: str | Path, overwrite: bool = False):
        self.path = Path(bin_path)
        self.meta = meta_path(self.path)
        check_writable(self.path, overwrite)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        suffix = f".tmp{os.getpid()}"
        self._tmp_bin = self.path.with_name(f".{self.path.name}{suffix}")
        self._tmp_meta = self.meta.with_name(f".{self.meta.name}{suffix}")
        self._fh = open(self._tmp_bin, "wb")
        self.offsets: list[int] = []
        self.lengths: list[int] = []
        self.num_tokens = 0
        self._pos = 0

    def write(self, tokens: Sequence[int]) -> None:
        """Append one sample."""
        self.write_line(encode_line(tokens), len(tokens))

    def write_line(self, line: bytes, num_tokens: int) -> None:
        """Append one already-encoded line (see :func:`encode_line`) of ``num_tokens`` tokens."""
        self._fh.write(line)
        self.offsets.append(self._pos)
        self.lengths.append(num_tokens)
        self._pos += len(line)
        self.num_tokens += num_tokens

    def commit(self) -> None:
        """Flush, write the meta and move both files into place (meta last)."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        with open(self._tmp_meta, "wb") as fh:
            save_meta(fh, self.offsets, self.lengths)
        # Remove an old meta first so the old meta never sits next to the new .bin.
        self.meta.unlink(missing_ok=True)
        os.replace(self._tmp_bin, self.path)
        os.replace(self._tmp_meta, self.meta)

    def abort(self) -> None:
        """Drop the temporary files; existing outputs are untouched."""
        self._fh.close()
        for tmp in (self._tmp_bin, self._tmp_meta):
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> TokenizedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def check_writable(bin_path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing ``.bin`` or ``.meta`` unless ``overwrite``."""
    if not str(bin_path).endswith(".bin"):
        raise DataError(f"{bin_path}: output name must end with .bin (the loader reads *.bin)")
    for p in (bin_path, meta_path(bin_path)):
        if p.exists() and not overwrite:
            raise DataError(f"{p}: already exists; pass --overwrite (overwrite=True) to replace it")


class TokenizedFile:
    """Random access to the samples of one ``.bin`` file, validated against its ``.meta``.

    ``min_length`` drops samples with fewer tokens (InternEvo's ``min_length``); indices then
    refer to the kept samples, and errors still name the original line number.  The file is
    memory-mapped lazily per process, so the object pickles cheaply into loader workers.
    """

    def __init__(self, path: str | Path, min_length: int = 0, type_id: int = 0):
        self.path = Path(path)
        self.type_id = type_id
        offsets, lengths = _load_meta(self.path)
        self._size = self.path.stat().st_size
        _check_offsets(self.path, offsets, self._size)
        keep = np.nonzero(lengths >= min_length)[0] if min_length > 0 else np.arange(len(lengths))
        self.rows = keep.astype(np.int64)
        self.offsets = offsets[keep]
        self.lengths = lengths[keep]
        self.num_dropped = len(lengths) - len(keep)
        self._mm: Optional[mmap.mmap] = None

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        """Tokens of kept sample ``i`` as int64 (negative = no loss)."""
        line = self._line(int(i))
        try:
            tokens = json.loads(line)["tokens"]
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{self.path}:{self.rows[i] + 1}: not a {{\"tokens\": [...]}} JSON "
                            f"line ({err!r})") from err
        if len(tokens) != self.lengths[i]:
            raise DataError(f"{self.path}:{self.rows[i] + 1}: the .meta says {self.lengths[i]} "
                            f"tokens but the line has {len(tokens)}; the .meta does not match "
                            "its .bin (re-run the tokenizer)")
        return np.asarray(tokens, dtype=np.int64)

    def read_concat(self, indices: np.ndarray) -> np.ndarray:
        """The tokens of kept samples ``indices`` laid end to end (one JSON parse for all)."""
        lines = [self._line(int(i)) for i in indices]
        want = self.lengths[indices]
        try:
            toks = [rec["tokens"] for rec in json.loads(b"[" + b",".join(lines) + b"]")]
            ok = [len(t) for t in toks] == want.tolist()
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:  # find and name the bad line
            for i in indices:
                self[int(i)]
            raise DataError(f"{self.path}: lines {indices.tolist()} do not parse together")
        return np.fromiter(itertools.chain.from_iterable(toks), np.int64, count=int(want.sum()))

    def _line(self, i: int) -> bytes:
        if self._mm is None:
            with open(self.path, "rb") as fh:
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        start = int(self.offsets[i])
        end = self._mm.find(b"\n", start)
        return self._mm[start: self._size if end < 0 else end]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_mm"] = None  # each worker maps the file itself
        return state


def _load_meta(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: .bin file not found")
    meta_file = meta_path(path)
    if not meta_file.is_file():
        raise DataError(f"{path}: has no {meta_file.name} next to it (an interrupted tokenizer "
                        "run, or the .meta was not copied); re-run the tokenizer")
    try:
        meta = np.load(meta_file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{meta_file}: not a NumPy .npy meta file ({err})") from err
    if meta.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if meta.ndim != 2 or meta.shape[1] < 2 or not np.issubdtype(meta.dtype, np.integer):
        raise DataError(f"{meta_file}: expected an (N, 2) integer array, got shape "
                        f"{meta.shape} dtype {meta.dtype}")
    return meta[:, 0].astype(np.int64), meta[:, -1].astype(np.int64)


def _check_offsets(path: Path, offsets: np.ndarray, size: int) -> None:
    """Cheap consistency checks between a ``.meta`` and its ``.bin`` (O(N), no full scan)."""
    where = f"{meta_path(path)} does not match {path.name}"
    if len(offsets) == 0:
        if size:
            raise DataError(f"{where}: the .meta lists no lines but the .bin has {size} bytes")
        return
    if offsets[0] != 0 or np.any(np.diff(offsets) <= 0) or offsets[-1] >= size:
        raise DataError(f"{where}: offsets must start at 0, increase and stay below the file "
                        f"size {size} (first {offsets[0]}, last {offsets[-1]})")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    bad = np.nonzero(data[offsets[1:] - 1] != ord("\n"))[0]
    if len(bad):
        raise DataError(f"{where}: line {bad[0] + 2} does not start at offset "
                        f"{offsets[bad[0] + 1]} (no newline before it)")
    tail = bytes(data[offsets[-1]:]).rstrip(b"\n")
    if b"\n" in tail:
        raise DataError(f"{where}: the .bin has more lines than the .meta's {len(offsets)} "
                        "(was the .bin appended to without regenerating the .meta?)")
