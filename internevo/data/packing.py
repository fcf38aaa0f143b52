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
from typing import Optional, Protocol

import numpy as np

from internevo.data.errors import DataError

IGNORE = -100
PACK_SEED = 1024  # InternEvo fixes the per-file shuffle so a restart packs identically
Pack = dict  # input_ids, labels, indexes, type_ids: int64 [P]; cu_seqlens: int32 [n + 1]


class SampleSource(Protocol):
    """What a packer reads: sample lengths and random access to samples.

    A source may also offer ``read_concat(indices)`` (all those samples' tokens, concatenated)
    to read many short samples at once.
    """

    lengths: np.ndarray

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> np.ndarray: ...


def read_concat(source: SampleSource, indices: np.ndarray) -> np.ndarray:
    """The tokens of ``source[indices]`` laid end to end."""
    if hasattr(source, "read_concat"):
        return source.read_concat(indices)
    parts = [source[int(i)] for i in indices]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def build_pack(tokens: np.ndarray, frag_lens: np.ndarray, last_label: int,
               type_ids: np.ndarray | int, seq_len: int, into_one: bool) -> Pack:
    """One packed row from its tokens, the lengths of its fragments and the label after the
    last token (every other fragment ends its sample, so its last label is -100)."""
    n = len(tokens)
    raw_labels = np.empty(n, np.int64)
    raw_labels[:-1] = tokens[1:]
    raw_labels[np.cumsum(frag_lens)[:-1] - 1] = IGNORE
    raw_labels[-1] = IGNORE if into_one else last_label
    if into_one:
        seglens = np.full(n // seq_len, seq_len, np.int64)
    else:
        seglens = split_segments(frag_lens, seq_len)
    cu = np.concatenate([[0], np.cumsum(seglens)])
    return {
        "input_ids": np.abs(tokens),
        "labels": np.where(raw_labels > 0, raw_labels, IGNORE),
        "indexes": np.arange(n) - np.repeat(cu[:-1], seglens),
        "type_ids": np.broadcast_to(np.asarray(type_ids, np.int64), (n,)).copy(),
        "cu_seqlens": cu.astype(np.int32),
    }


def split_segments(frag_lens: np.ndarray, seq_len: int) -> np.ndarray:
    """Each fragment cut into ``seq_len``-sized segments plus a remainder, in order."""
    frag_lens = np.asarray(frag_lens, np.int64)
    nseg = -(-frag_lens // seq_len)
    first = np.repeat(np.cumsum(nseg) - nseg, nseg)
    k = np.arange(int(nseg.sum())) - first  # segment number inside its fragment
    return np.minimum(seq_len, np.repeat(frag_lens, nseg) - k * seq_len)


def cut_window(samples: Iterator[tuple[np.ndarray, int]], offset: int, size: int,
               seq_len: int, into_one: bool) -> tuple[Pack, int]:
    """Pack ``size`` tokens of ``samples`` (tokens, type_id), starting ``offset`` tokens into the
    first one (the streaming packer).  Returns the row and how many tokens of the last sample
    used are consumed.  Pulls no sample beyond the last one it needs; raises ``StopIteration``
    if the samples run out first.
    """
    parts, types, lens = [], [], []
    need, end, last_label = size, 0, IGNORE
    while need > 0:
        tokens, type_id = next(samples)
        end = min(len(tokens), offset + need)
        if end <= offset:  # empty sample, or the offset already at its end
            offset = 0
            continue
        if end < len(tokens):  # only the row's last fragment can be cut mid-sample
            last_label = int(tokens[end])
        parts.append(tokens[offset:end])
        types.append(type_id)
        lens.append(end - offset)
        need -= end - offset
        offset = 0
    frag_lens = np.array(lens, np.int64)
    type_ids = np.repeat(np.array(types, np.int64), frag_lens)
    return build_pack(np.concatenate(parts), frag_lens, last_label, type_ids, seq_len,
                      into_one), end


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
        start, end = k * self.packed_length, (k + 1) * self.packed_length
        # samples j0..j1 hold stream positions [start, end); read them in one go
        j0 = int(np.searchsorted(self.cum, start, side="right"))
        j1 = int(np.searchsorted(self.cum, end - 1, side="right"))
        tokens = read_concat(self.source, self.order[j0:j1 + 1])
        base = int(self.cum[j0] - self.lengths[j0])
        a, b = start - base, end - base
        sample_ends = self.cum[j0:j1 + 1] - base
        inner = np.unique(sample_ends[(sample_ends > a) & (sample_ends < b)]) - a
        frag_lens = np.diff(np.concatenate([[0], inner, [self.packed_length]]))
        last_label = int(tokens[b]) if b < len(tokens) else IGNORE
        return build_pack(tokens[a:b], frag_lens, last_label, self.type_id, self.seq_len,
                          self.into_one)


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
