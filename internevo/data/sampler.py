"""The seeded batch sampler over packed rows, batch-size ramp-up and ``skip_batches``.

Epoch e uses the e-th shuffle of one ``RandomState(seed)`` stream (the RNG carries over epochs,
as in InternEvo's ``StaticBatchSampler``).  Data-parallel rank r takes ``perm[r::dp]`` cut to
``N // dp`` rows (every rank the same count) and yields consecutive slices whose size is the
ramp-up batch size of the global batch index; when fewer rows than the next batch needs are left,
the rest of the epoch is dropped and the next epoch starts, so every rank always yields batches of
the same size in lock step.  The whole position is three integers (``epoch``, ``offset``,
``batch_count``): the state is tiny and rank independent (and survives a change of the
data-parallel size approximately, see :meth:`BatchSampler.load_state_dict`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Optional

import numpy as np

from internevo.data.errors import DataError

log = logging.getLogger(__name__)


def parse_rampup(text: Optional[str]) -> Optional[tuple[int, int, int]]:
    """``"start incr every"`` -> ``(start, incr, every)``; ``""``/None -> None (no ramp-up)."""
    if not text or not str(text).strip():
        return None
    parts = str(text).split()
    try:
        start, incr, every = (int(p) for p in parts)
    except ValueError:
        raise DataError(f"data.rampup_batch_size={text!r}: expected three integers "
                        "'start incr every'") from None
    if start < 1 or incr < 1 or every < 1:
        raise DataError(f"data.rampup_batch_size={text!r}: start, incr and every must be >= 1")
    return start, incr, every


def batch_size_at(batch_index: int, micro_num: int, rampup: Optional[str]) -> int:
    """Rows of batch ``batch_index``: ``min(start + incr * (t // every), micro_num)``."""
    ramp = parse_rampup(rampup)
    if ramp is None:
        return micro_num
    start, incr, every = ramp
    return min(start + incr * (batch_index // every), micro_num)


def parse_skip_batches(text: Optional[str]) -> set[int]:
    """``"10-20,35"`` -> ``{10, ..., 20, 35}`` (inclusive ranges; every batch counts)."""
    out: set[int] = set()
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise DataError(f"data.skip_batches={text!r}: {part!r} is not N or N-M") from None
        if a < 0 or b < a:
            raise DataError(f"data.skip_batches={text!r}: bad range {part!r}")
        out.update(range(a, b + 1))
    return out


class BatchSampler:
    """Infinite, resumable batch sampler over ``num_rows`` packed rows (see module doc)."""

    def __init__(self, num_rows: int, micro_num: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 1024, rampup: Optional[str] = ""):
        parse_rampup(rampup)  # validate early
        self.num_rows, self.micro_num = num_rows, micro_num
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.rampup = seed, rampup or ""
        self.rows_per_rank = num_rows // dp_size
        if self.rows_per_rank < micro_num:
            raise DataError(f"only {num_rows} packed rows for {dp_size} data-parallel rank(s): "
                            f"a step needs micro_num={micro_num} rows per rank; add data or "
                            "lower micro_num / micro_bsz / seq_len")
        self.epoch = self.offset = self.batch_count = 0
        self._rng = np.random.RandomState(seed)
        self._rows, self._rows_epoch = np.zeros(0, np.int64), -1

    def _rows_of(self, epoch: int) -> np.ndarray:
        """This rank's rows of ``epoch`` (shuffled lazily: building a sampler costs nothing)."""
        if self._rows_epoch > epoch:
            self._rng, self._rows_epoch = np.random.RandomState(self.seed), -1
        while self._rows_epoch < epoch:  # the RNG stream runs on across epochs
            perm = np.arange(self.num_rows)
            self._rng.shuffle(perm)
            self._rows = perm[self.dp_rank::self.dp_size][: self.rows_per_rank]
            self._rows_epoch += 1
        return self._rows

    def next_batch(self) -> np.ndarray:
        """Row indices of the next batch (and advance)."""
        size = batch_size_at(self.batch_count, self.micro_num, self.rampup)
        if self.offset + size > self.rows_per_rank:
            self.epoch += 1
            self.offset = 0
        batch = self._rows_of(self.epoch)[self.offset: self.offset + size]
        self.offset += size
        self.batch_count += 1
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch().tolist()

    def state_dict(self) -> dict:
        """Plain-int state (position plus what must match on resume)."""
        return {"epoch": self.epoch, "offset": self.offset, "batch_count": self.batch_count,
                "seed": self.seed, "dp_size": self.dp_size, "rampup": self.rampup,
                "num_rows": self.num_rows}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by :meth:`state_dict` (same seed, data and ramp-up).

        Saved with another data-parallel size, the position carries over approximately: the
        ranks together consumed the first ``offset * dp_size`` rows of the epoch's permutation,
        and the new ranks start just past them (rounded up: rows may be skipped, none repeated).
        """
        for key in ("seed", "rampup", "num_rows"):  # num_rows None: unknown (from InternEvo)
            if state[key] is not None and state[key] != getattr(self, key):
                raise DataError(f"data state mismatch: saved {key}={state[key]!r}, now "
                                f"{getattr(self, key)!r}; the data, seed and ramp-up must not "
                                "change on resume")
        self.epoch, self.offset = state["epoch"], state["offset"]
        self.batch_count = state["batch_count"]
        if state["dp_size"] != self.dp_size:
            consumed = state["offset"] * state["dp_size"]
            self.offset = -(-consumed // self.dp_size)
            log.warning("data state saved with %d data-parallel ranks, resumed with %d: the "
                        "position carries over approximately (%d rows of the epoch consumed)",
                        state["dp_size"], self.dp_size, consumed)
