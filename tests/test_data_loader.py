"""Training/validation loaders: folder layout, Batch contract, ramp-up, exact resume."""

import io

import numpy as np
import pytest
import torch

from internevo.config import DataConfig, TrainConfig
from internevo.data.errors import DataError
from internevo.data.loader import build_train_loader, build_valid_loaders
from internevo.data.tokenized import TokenizedWriter


def make_cfg(**data):
    return TrainConfig(data=DataConfig(**data))


def write_bin(path, samples):
    path.parent.mkdir(parents=True, exist_ok=True)
    with TokenizedWriter(path) as w:
        for s in samples:
            w.write(s)


def samples(base, n, rng, lo=2, hi=12):
    """Samples whose ids encode their type (base) so rows can be checked by content."""
    return [[1] + (base + rng.randint(0, 99, size=rng.randint(lo, hi))).tolist() for _ in range(n)]


@pytest.fixture
def train_folder(tmp_path):
    rng = np.random.RandomState(0)
    write_bin(tmp_path / "train" / "en" / "a.bin", samples(2000, 30, rng))
    write_bin(tmp_path / "train" / "en" / "sub" / "b.bin", samples(2000, 20, rng))
    write_bin(tmp_path / "train" / "cn" / "c.bin", samples(1000, 25, rng) + [[1, 1001]] * 5)
    return tmp_path / "train"


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("input_ids", "labels", "indexes", "type_ids"):
            assert torch.equal(x[key], y[key]), key
        assert all(torch.equal(u, v) for u, v in zip(x["cu_seqlens"], y["cu_seqlens"]))


def test_batch_contract_and_types(train_folder):
    cfg = make_cfg(seq_len=8, micro_bsz=2, micro_num=3, train_folder=str(train_folder),
                   num_worker=0, min_length=3)
    loader = build_train_loader(cfg, 0, 1)
    assert loader.dataset_types == ["cn", "en"]
    for batch in take(iter(loader), 4):
        assert batch["input_ids"].shape == (3, 16)
        for key in ("input_ids", "labels", "indexes", "type_ids"):
            assert batch[key].dtype == torch.int64 and batch[key].shape == (3, 16)
        assert len(batch["cu_seqlens"]) == 3
        for m, cu in enumerate(batch["cu_seqlens"]):
            assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == 16
            seg = torch.diff(cu)
            assert (seg > 0).all() and (seg <= 8).all()
            pos = torch.cat([torch.arange(int(n)) for n in seg])
            assert torch.equal(batch["indexes"][m], pos)
        ids, types = batch["input_ids"], batch["type_ids"]
        body = ids > 1  # every id > 1 tells its type: 1xxx = cn (0), 2xxx = en (1)
        assert torch.equal(types[body], (ids[body] // 1000 - 1))
        assert (batch["labels"][batch["labels"] != -100] > 0).all()
    assert loader.batch_count == 4 and loader.micro_num_at(0) == 3


def test_min_length_drops_short_samples(train_folder):
    cfg = make_cfg(seq_len=4, micro_bsz=1, micro_num=1, train_folder=str(train_folder),
                   num_worker=0, min_length=3)
    rows = torch.cat([b["input_ids"] for b in take(iter(build_train_loader(cfg, 0, 1)), 60)])
    assert not (rows == 1001).any()  # the 2-token samples [1, 1001] were dropped
    cfg.data.min_length = 0
    rows = torch.cat([b["input_ids"] for b in take(iter(build_train_loader(cfg, 0, 1)), 60)])
    assert (rows == 1001).any()
    cfg.data.min_length_dict = {"/cn/": 3}  # the per-path override drops them again
    rows = torch.cat([b["input_ids"] for b in take(iter(build_train_loader(cfg, 0, 1)), 60)])
    assert not (rows == 1001).any()


def torch_round_trip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("num_worker", [0, 2])
def test_resume_is_exact(train_folder, num_worker):
    cfg = make_cfg(seq_len=6, micro_bsz=2, micro_num=4, train_folder=str(train_folder),
                   num_worker=num_worker, rampup_batch_size="1 1 3", seed=11)
    full = take(iter(build_train_loader(cfg, 1, 2)), 16)  # crosses epoch ends
    loader = build_train_loader(cfg, 1, 2)
    it = iter(loader)
    take(it, 7)
    state = torch_round_trip(loader.state_dict())
    restored = build_train_loader(cfg, 1, 2)
    restored.load_state_dict(state)
    assert_batches_equal(take(iter(restored), 9), full[7:])
    assert [b["input_ids"].shape[0] for b in full[:8]] == [1, 1, 1, 2, 2, 2, 3, 3]


def test_restore_while_iterating(train_folder):
    cfg = make_cfg(seq_len=6, micro_bsz=1, micro_num=2, train_folder=str(train_folder),
                   num_worker=0)
    loader = build_train_loader(cfg, 0, 1)
    it = iter(loader)
    first = take(it, 3)
    state = loader.state_dict()
    later = take(it, 2)
    loader.load_state_dict(state)
    assert_batches_equal(take(it, 2), later)
    loader.load_state_dict(build_train_loader(cfg, 0, 1).state_dict())
    assert_batches_equal(take(it, 3), first)


def test_dp_ranks_see_different_rows(train_folder):
    cfg = make_cfg(seq_len=8, micro_bsz=1, micro_num=2, train_folder=str(train_folder),
                   num_worker=0)
    a, b = (next(iter(build_train_loader(cfg, r, 2))) for r in range(2))
    assert not torch.equal(a["input_ids"], b["input_ids"])
    other = build_train_loader(cfg, 1, 2)
    cfg.data.seed += 1
    with pytest.raises(DataError, match="seed"):
        build_train_loader(cfg, 1, 2).load_state_dict(other.state_dict())


def test_dummy_data_is_deterministic_and_resumable():
    cfg = make_cfg(seq_len=16, micro_bsz=2, micro_num=2, num_worker=0)
    loader = build_train_loader(cfg, 0, 1)
    assert loader.dataset_types == ["en", "cn", "code"]
    full = take(iter(loader), 5)
    again = build_train_loader(cfg, 0, 1)
    it = iter(again)
    take(it, 2)
    resumed = build_train_loader(cfg, 0, 1)
    resumed.load_state_dict(again.state_dict())
    assert_batches_equal(take(iter(resumed), 3), full[2:])
    assert (full[0]["type_ids"] == 0).all()
    cfg.data.pack_sample_into_one = True
    b = next(iter(build_train_loader(cfg, 0, 1)))
    assert [c.tolist() for c in b["cu_seqlens"]] == [[0, 16, 32]] * 2


def test_folder_errors(tmp_path):
    (tmp_path / "empty" / "en").mkdir(parents=True)
    with pytest.raises(DataError, match="no .bin files"):
        build_train_loader(make_cfg(train_folder=str(tmp_path / "empty")), 0, 1)
    (tmp_path / "nometa" / "en").mkdir(parents=True)
    (tmp_path / "nometa" / "en" / "x.bin").write_text('{"tokens": [1, 2]}\n')
    with pytest.raises(DataError, match=r"en/x\.bin: has no x\.bin\.meta"):
        build_train_loader(make_cfg(train_folder=str(tmp_path / "nometa")), 0, 1)
    write_bin(tmp_path / "flat" / "x.bin", [[1, 2]])
    with pytest.raises(DataError, match="type sub-folder"):
        build_train_loader(make_cfg(train_folder=str(tmp_path / "flat")), 0, 1)
    write_bin(tmp_path / "small" / "en" / "x.bin", [[1, 2, 3]])
    with pytest.raises(DataError, match="packed rows"):
        build_train_loader(make_cfg(seq_len=2, micro_num=2,
                                     train_folder=str(tmp_path / "small")), 0, 1)


def test_valid_loaders(tmp_path):
    rng = np.random.RandomState(1)
    write_bin(tmp_path / "valid" / "en" / "a.bin", samples(2000, 9, rng, hi=20))
    write_bin(tmp_path / "valid" / "code" / "x" / "b.bin", samples(3000, 5, rng))
    cfg = make_cfg(seq_len=8, micro_bsz=2, micro_num=3, valid_micro_num=2,
                   valid_folder=str(tmp_path / "valid"))
    sets = build_valid_loaders(cfg, 0, 1)
    assert sorted(sets) == ["en", "x"]
    batches = list(sets["en"])
    assert len(batches) == 2 and len(list(sets["en"])) == 2  # 9 samples, 4 per batch
    b = batches[0]
    assert b["input_ids"].shape == (2, 16) and b["cu_seqlens"][0].tolist() == [0, 8, 16]
    first = sets["en"]._sample(0)[:8]
    assert b["input_ids"][0, :len(first)].tolist() == first.tolist()
    assert b["labels"][0, :len(first) - 1].tolist() == first[1:].tolist()
    assert (b["labels"][0, len(first) - 1:8] == -100).all()
    halves = [build_valid_loaders(cfg, r, 2)["en"] for r in range(2)]
    assert set(halves[0].indices) & set(halves[1].indices) == set()
    assert build_valid_loaders(make_cfg(), 0, 1) == {}
