"""InternEvo's dummy training data (used when ``data.train_folder`` is None).

``RandomState(1999)`` draws, per sample, ``n`` in [1, 30) and ``r`` in [10, 200); the sample is
``[n, r] + (0..n-1) repeated r times`` cut to ``max_len`` (with ``fixed_seqlen``, ``r`` doubles
until the sample reaches ``max_len``).  Periodic, hence learnable: the loss falls quickly.
Samples are built on demand, so a million of them cost two small arrays.
"""

from __future__ import annotations

import numpy as np

DUMMY_SEED = 1999
DUMMY_TRAIN_SAMPLES = 1_000_000
DUMMY_TYPES = ["en", "cn", "code"]  # InternEvo's metric types when there is no train_folder


class RandomDataset:
    """``num_samples`` periodic samples of at most ``max_len`` tokens, all of type 0."""

    type_id = 0

    def __init__(self, num_samples: int, max_len: int, fixed_seqlen: bool = False):
        rng = np.random.RandomState(DUMMY_SEED)
        self.max_num = rng.randint(1, 30, size=num_samples)
        self.rep_num = rng.randint(10, 200, size=num_samples)
        self.max_len, self.fixed_seqlen = max_len, fixed_seqlen
        if fixed_seqlen:
            self.lengths = np.full(num_samples, max_len, dtype=np.int64)
        else:
            self.lengths = np.minimum(2 + self.max_num * self.rep_num, max_len).astype(np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        n, r = int(self.max_num[i]), int(self.rep_num[i])
        if self.fixed_seqlen:
            while n * r < self.max_len:
                r *= 2
        return np.concatenate([[n, r], np.tile(np.arange(n), r)])[: self.max_len].astype(np.int64)
