"""Packing: InternEvo's worked examples (spec §5.4) and a literal transcription of its algorithm."""

import itertools
import operator

import numpy as np
import pytest

from internevo.data.dummy import RandomDataset
from internevo.data.errors import DataError
from internevo.data.packing import ConcatPacks, PackedDataset


class ListSource:
    """In-memory samples with the interface the packer reads."""

    def __init__(self, samples, type_id=0):
        self.samples = [np.asarray(s, dtype=np.int64) for s in samples]
        self.lengths = np.array([len(s) for s in samples], dtype=np.int64)
        self.type_id = type_id

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


SAMPLES = [[1, 2], [3, 4], [5, 6, 7], [8, 9, 10, 11, 12, 13]]


def as_lists(pack):
    return {k: v.tolist() for k, v in pack.items()}


def test_worked_example_cut_mode():
    ds = PackedDataset(ListSource(SAMPLES), seq_len=3, packed_length=5, shuffle_seed=None)
    assert len(ds) == 2  # 13 tokens -> 2 packs, tail [11, 12, 13] dropped
    p0, p1 = as_lists(ds[0]), as_lists(ds[1])
    assert p0["input_ids"] == [1, 2, 3, 4, 5]
    assert p0["labels"] == [2, -100, 4, -100, 6]
    assert p0["cu_seqlens"] == [0, 2, 4, 5]
    assert p0["indexes"] == [0, 1, 0, 1, 0]
    assert p1["input_ids"] == [6, 7, 8, 9, 10]
    assert p1["labels"] == [7, -100, 9, 10, 11]
    assert p1["cu_seqlens"] == [0, 2, 5]
    assert p1["indexes"] == [0, 1, 0, 1, 2]
    assert ds[0]["cu_seqlens"].dtype == np.int32


def test_worked_example_into_one_mode():
    ds = PackedDataset(ListSource(SAMPLES), seq_len=3, packed_length=6, into_one=True,
                       shuffle_seed=None)
    p0, p1 = as_lists(ds[0]), as_lists(ds[1])
    assert p0["input_ids"] == [1, 2, 3, 4, 5, 6]
    assert p0["labels"] == [2, -100, 4, -100, 6, -100]
    assert p0["cu_seqlens"] == [0, 3, 6]
    assert p0["indexes"] == [0, 1, 2, 0, 1, 2]
    # pack 1: [7] ends sample 3; [8..12] is cut by the row end -> -100 too in this mode
    assert p1["input_ids"] == [7, 8, 9, 10, 11, 12]
    assert p1["labels"] == [-100, 9, 10, 11, 12, -100]


def test_into_one_needs_whole_windows():
    with pytest.raises(DataError, match="multiple of seq_len"):
        PackedDataset(ListSource(SAMPLES), seq_len=3, packed_length=5, into_one=True)


# --- a literal transcription of InternEvo's PackedDataset (mapping + build_pack) -------------


def internevo_packs(samples, seq_len, packed_length, seed=1024):
    lengths = [len(s) for s in samples]
    idx = np.arange(len(lengths))
    np.random.RandomState(seed).shuffle(idx)
    shuffled = [lengths[i] for i in idx]
    acm = list(itertools.accumulate(shuffled, operator.add))
    n = sum(lengths) // packed_length

    def cal_map(c):
        return np.searchsorted(acm, (c + 1) * packed_length, side="left")

    def mapping(k):
        pre_pos, pre_tok = 0, 0
        if k > 0:
            pre_pos = cal_map(k - 1)
            pre_tok = shuffled[pre_pos] - (acm[pre_pos] - k * packed_length)
            if pre_tok == shuffled[pre_pos]:
                pre_pos, pre_tok = pre_pos + 1, 0
        pos = cal_map(k)
        tok = shuffled[pos] - (acm[pos] - (k + 1) * packed_length)
        return pre_pos, pre_tok, pos, tok

    def add(chunk, labels, out):
        out["tokens"] += chunk
        out["labels"] += labels
        q, r = divmod(len(chunk), seq_len)
        for seg in [seq_len] * q + ([r] if r else []):
            out["cu"].append(out["cu"][-1] + seg)
            out["idx"] += list(range(seg))

    out_packs = []
    for k in range(n):
        pre_pos, pre_tok, pos, tok = mapping(k)
        out = {"tokens": [], "labels": [], "cu": [0], "idx": []}
        while pre_pos < pos:
            chunk = list(samples[idx[pre_pos]][pre_tok:])
            add(chunk, chunk[1:] + [-100], out)
            pre_pos, pre_tok = pre_pos + 1, 0
        sample = list(samples[idx[pos]])
        chunk = sample[pre_tok:tok]
        add(chunk, chunk[1:] + ([-100] if tok == len(sample) else [sample[tok]]), out)
        out["input_ids"] = [abs(t) for t in out["tokens"]]  # packed_collate_fn
        out["labels"] = [t if t > 0 else -100 for t in out["labels"]]
        out_packs.append(out)
    return out_packs


@pytest.mark.parametrize("seq_len,micro_bsz", [(4, 2), (8, 1), (3, 3)])
def test_matches_internevo_algorithm(seq_len, micro_bsz):
    rng = np.random.RandomState(0)
    samples = [rng.randint(-50, 50, size=rng.randint(1, 20)).tolist() for _ in range(40)]
    packed_length = seq_len * micro_bsz
    ref = internevo_packs(samples, seq_len, packed_length)
    ds = PackedDataset(ListSource(samples), seq_len, packed_length)  # default seed 1024
    assert len(ds) == len(ref)
    for k, r in enumerate(ref):
        got = as_lists(ds[k])
        assert got["input_ids"] == r["input_ids"]
        assert got["labels"] == r["labels"]
        assert got["cu_seqlens"] == r["cu"]
        assert got["indexes"] == r["idx"]


def test_long_sample_split_into_seq_len_segments():
    ds = PackedDataset(ListSource([list(range(1, 11))]), seq_len=4, packed_length=10,
                       shuffle_seed=None)
    p = as_lists(ds[0])
    assert p["cu_seqlens"] == [0, 4, 8, 10]
    assert p["indexes"] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    # labels across the internal seq_len cuts are not masked (InternEvo)
    assert p["labels"] == [2, 3, 4, 5, 6, 7, 8, 9, 10, -100]


def test_negative_ids_and_id_zero_are_never_targets():
    ds = PackedDataset(ListSource([[1, -5, -6, 7, 0, 8]]), seq_len=6, packed_length=6,
                       shuffle_seed=None)
    p = as_lists(ds[0])
    assert p["input_ids"] == [1, 5, 6, 7, 0, 8]
    assert p["labels"] == [-100, -100, 7, -100, 8, -100]


def test_empty_samples_are_skipped_and_type_ids_kept():
    a = PackedDataset(ListSource([[1, 2], [], [3, 4]], type_id=2), 4, 4, shuffle_seed=None)
    p = as_lists(a[0])
    assert p["input_ids"] == [1, 2, 3, 4] and p["type_ids"] == [2, 2, 2, 2]
    b = PackedDataset(ListSource([[5, 6, 7, 8]], type_id=0), 4, 4, shuffle_seed=None)
    cat = ConcatPacks([a, b])
    assert len(cat) == 2 and as_lists(cat[1])["input_ids"] == [5, 6, 7, 8]


def internevo_random_sample(n, r, max_len, fixed):
    d = list(range(n)) * r
    if fixed:
        while len(d) < max_len:
            r *= 2
            d = list(range(n)) * r
    return ([n, r] + d)[:max_len]


@pytest.mark.parametrize("fixed", [False, True])
def test_dummy_dataset_formula(fixed):
    ds = RandomDataset(50, max_len=300, fixed_seqlen=fixed)
    rng = np.random.RandomState(1999)
    ns, rs = rng.randint(1, 30, size=50), rng.randint(10, 200, size=50)
    for i in range(50):
        ref = internevo_random_sample(int(ns[i]), int(rs[i]), 300, fixed)
        assert ds[i].tolist() == ref and ds.lengths[i] == len(ref)
