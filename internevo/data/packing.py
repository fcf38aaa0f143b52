"""Packing samples into rows of ``P = seq_len * micro_bsz`` tokens, exactly as InternEvo does.

The samples of one source (a ``.bin`` file, the dummy data, a stream) are laid end to end in a
fixed order (for files: ``RandomState(1024).shuffle(arange(n))``) to form one token stream; row k
covers stream positions ``[k*P, (k+1)*P)`` and the tail is dropped.  Each row is cut into
*fragments* (the part of one sample that falls in the row), and then:

* cut mode (``pack_sample_into_one=False``, InternEvo's ``PackedDataset``): every fragment is a
  segment of ``cu_seqlens``, split further into ``seq_len``-sized pieces; positions restart in
  each piece; a fragment's last label is -100 if it ends its sample, else the sample's next token
  (labels across the ``seq_len`` pieces are not masked, as in InternEvo).
* into-one mode (``True``, ``PackedDatasetWithoutCuSeqlen``): ``cu_seqlens = [0, s, 2s, ..., P]``
  whatever the samples are, positions ``0..s-1`` per window, every fragment's last label -100.

Then InternEvo's collate rule: ``input_ids = |tokens|``, ``labels = l if l > 0 else -100``
(negative ids carry no loss; id 0 is never a target).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np

from internevo.data.errors import DataError

IGNORE = -100
PACK_SEED = 1024  # InternEvo fixes the per-file shuffle so a restart packs identically
Pack = dict  # input_ids, labels, indexes, type_ids: int64 [P]; cu_seqlens: int32 [n + 1]


class SampleSource(Protocol):
    """What a packer reads: sample lengths and random access to samples."""

    lengths: np.ndarray

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> np.ndarray: ...


@dataclass
class Fragment:
    """The part of one sample inside a row, and the label that follows its last token."""

    tokens: np.ndarray
    next_label: int
    type_id: int


def cut_window(samples: Iterator[tuple[np.ndarray, int]], offset: int, size: int,
               into_one: bool) -> tuple[list[Fragment], int]:
    """Take ``size`` tokens from ``samples`` (tokens, type_id) starting ``offset`` tokens into the
    first one.  Returns the fragments and how many tokens of the last sample used were consumed.
    Pulls no sample beyond the last one it needs.  Raises ``StopIteration`` if the samples run
    out first.
    """
    frags: list[Fragment] = []
    need, end = size, 0
    while need > 0:
        tokens, type_id = next(samples)
        end = min(len(tokens), offset + need)
        if end <= offset:  # empty sample, or the offset already at its end
            offset = 0
            continue
        cut = end < len(tokens)
        nxt = int(tokens[end]) if cut and not into_one else IGNORE
        frags.append(Fragment(tokens[offset:end], nxt, type_id))
        need -= end - offset
        offset = 0
    return frags, end


def build_pack(frags: list[Fragment], seq_len: int, packed_length: int, into_one: bool) -> Pack:
    """Turn a row's fragments into the arrays of one packed row (see module doc)."""
    tokens = np.concatenate([f.tokens for f in frags])
    raw_labels = np.concatenate([np.append(f.tokens[1:], f.next_label) for f in frags])
    type_ids = np.concatenate([np.full(len(f.tokens), f.type_id, np.int64) for f in frags])
    if into_one:
        seglens = np.full(packed_length // seq_len, seq_len)
    else:
        seglens = np.concatenate([_split(len(f.tokens), seq_len) for f in frags])
    cu = np.concatenate([[0], np.cumsum(seglens)])
    return {
        "input_ids": np.abs(tokens),
        "labels": np.where(raw_labels > 0, raw_labels, IGNORE),
        "indexes": np.arange(packed_length) - np.repeat(cu[:-1], seglens),
        "type_ids": type_ids,
        "cu_seqlens": cu.astype(np.int32),
    }


def _split(n: int, seq_len: int) -> np.ndarray:
    q, r = divmod(n, seq_len)
    return np.array([seq_len] * q + ([r] if r else []), dtype=np.int64)


def check_pack_shape(seq_len: int, packed_length: int, into_one: bool) -> None:
    """``pack_sample_into_one`` needs whole ``seq_len`` windows in a row."""
    if into_one and packed_length % seq_len:
        raise DataError(f"pack_sample_into_one needs packed_length={packed_length} to be a "
                        f"multiple of seq_len={seq_len}")


class PackedDataset:
    """Packed rows of one sample source (InternEvo's ``PackedDataset`` and
    ``PackedDatasetWithoutCuSeqlen``, chosen by ``into_one``).

    ``shuffle_seed=None`` keeps the source order (what the streaming packer sees).
    """

    def __init__(self, source: SampleSource, seq_len: int, packed_length: int,
                 into_one: bool = False, type_id: Optional[int] = None,
                 shuffle_seed: Optional[int] = PACK_SEED):
        check_pack_shape(seq_len, packed_length, into_one)
        self.source = source
        self.seq_len, self.packed_length, self.into_one = seq_len, packed_length, into_one
        self.type_id = getattr(source, "type_id", 0) if type_id is None else type_id
        order = np.arange(len(source.lengths))
        if shuffle_seed is not None:
            np.random.RandomState(shuffle_seed).shuffle(order)
        self.order = order
        self.lengths = np.asarray(source.lengths, dtype=np.int64)[order]
        self.cum = np.cumsum(self.lengths)
        self.num_tokens = int(self.cum[-1]) if len(self.cum) else 0

    def __len__(self) -> int:
        return self.num_tokens // self.packed_length

    def __getitem__(self, k: int) -> Pack:
        if not 0 <= k < len(self):
            raise IndexError(f"pack {k} out of range [0, {len(self)})")
        start = k * self.packed_length
        j = int(np.searchsorted(self.cum, start, side="right"))
        offset = start - (int(self.cum[j - 1]) if j else 0)
        frags, _ = cut_window(self._samples(j), offset, self.packed_length, self.into_one)
        return build_pack(frags, self.seq_len, self.packed_length, self.into_one)

    def _samples(self, j: int) -> Iterator[tuple[np.ndarray, int]]:
        for pos in range(j, len(self.order)):
            if self.lengths[pos]:  # skip empty samples without reading them
                yield self.source[int(self.order[pos])], self.type_id


class ConcatPacks:
    """Several packed datasets behind one index (InternEvo's ``ConcatDataset`` of files)."""

    def __init__(self, datasets: list):
        self.datasets = [d for d in datasets if len(d)]
        self.ends = np.cumsum([len(d) for d in self.datasets]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, k: int) -> Pack:
        i = int(np.searchsorted(self.ends, k, side="right"))
        return self.datasets[i][k - (int(self.ends[i - 1]) if i else 0)]
