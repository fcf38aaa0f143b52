"""Batch sampler: ramp-up answer sequences (spec §5.7), DP partition, state round trip."""

import numpy as np
import pytest

from internevo.data.errors import DataError
from internevo.data.sampler import BatchSampler, batch_size_at, parse_skip_batches


@pytest.mark.parametrize("micro_num,rampup,expected", [
    (4, "1 1 4", [1, 1, 1, 1, 2, 2, 2, 2]),
    (8, "2 2 2", [2, 2, 4, 4, 6, 6, 8, 8]),
])
def test_rampup_sequences(micro_num, rampup, expected):
    assert [batch_size_at(t, micro_num, rampup) for t in range(8)] == expected
    sampler = BatchSampler(100, micro_num, seed=3, rampup=rampup)
    assert [len(sampler.next_batch()) for _ in range(8)] == expected


def test_no_rampup_is_micro_num():
    assert [batch_size_at(t, 3, "") for t in range(3)] == [3, 3, 3]
    assert batch_size_at(0, 3, None) == 3
    with pytest.raises(DataError, match="three integers"):
        batch_size_at(0, 3, "1 2")


def test_dp_ranks_are_disjoint_and_equal_sized():
    samplers = [BatchSampler(41, 2, r, 4, seed=7) for r in range(4)]
    rows = [np.concatenate([s.next_batch() for _ in range(5)]) for s in samplers]
    flat = np.concatenate(rows)
    assert len(set(flat.tolist())) == len(flat) == 40
    assert all(len(r) == 10 for r in rows)


def test_epochs_cover_all_rows_and_reshuffle():
    s = BatchSampler(12, 3, seed=1)
    epoch0 = np.concatenate([s.next_batch() for _ in range(4)])
    epoch1 = np.concatenate([s.next_batch() for _ in range(4)])
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0.tolist() != epoch1.tolist() and s.epoch == 1


def test_state_round_trip_across_epochs():
    run = BatchSampler(10, 3, 1, 2, seed=5, rampup="1 1 2")
    for _ in range(7):
        run.next_batch()
    state = run.state_dict()
    expected = [run.next_batch().tolist() for _ in range(6)]
    restored = BatchSampler(10, 3, 1, 2, seed=5, rampup="1 1 2")
    restored.load_state_dict(state)
    assert [restored.next_batch().tolist() for _ in range(6)] == expected
    assert all(type(v) in (int, str) for v in state.values())


def test_state_mismatch_is_refused():
    state = BatchSampler(10, 2, seed=5).state_dict()
    with pytest.raises(DataError, match="seed"):
        BatchSampler(10, 2, seed=6).load_state_dict(state)
    with pytest.raises(DataError, match="num_rows"):
        BatchSampler(12, 2, seed=5).load_state_dict(state)


def test_dp_size_change_carries_over_without_repeats():
    old = [BatchSampler(40, 3, r, 2, seed=9) for r in range(2)]
    seen = {int(i) for s in old for _ in range(2) for i in s.next_batch()}
    new = [BatchSampler(40, 2, r, 4, seed=9) for r in range(4)]
    for s in new:
        s.load_state_dict(old[0].state_dict())
    rest = [int(i) for s in new for _ in range(2) for i in s.next_batch()]
    assert len(seen) == 12 and not seen & set(rest) and len(set(rest)) == 16
    assert new[0].batch_count == 4 and new[0].epoch == 0


def test_too_few_rows():
    with pytest.raises(DataError, match="micro_num=4"):
        BatchSampler(7, 4, 0, 2)


def test_parse_skip_batches():
    assert parse_skip_batches("10-12,35") == {10, 11, 12, 35}
    assert parse_skip_batches("") == set() and parse_skip_batches(None) == set()
    assert parse_skip_batches(" 3 , 5-5 ") == {3, 5}
    for bad in ("a", "5-3", "1-x"):
        with pytest.raises(DataError):
            parse_skip_batches(bad)
