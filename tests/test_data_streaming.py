"""Streaming: same rows as the tokenized path for the same text, sharding, exact resume."""

import json
from pathlib import Path

import pytest
import torch

from internevo.config import DataConfig, TrainConfig
from internevo.data.errors import DataError
from internevo.data.loader import build_train_loader
from internevo.data.packing import PackedDataset
from internevo.data.streaming import StreamPacker, start_position
from internevo.data.tokenized import TokenizedFile
from internevo.data.tokenizer import load_tokenizer
from internevo.data.tools import tokenize_file

ROOT = Path(__file__).resolve().parents[1]
TOK2 = str(ROOT / "assets" / "tokenizer_internlm2.model")


@pytest.fixture(scope="module")
def lines():
    text = (ROOT / "assets" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines()[:400] if line.strip()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, lines):
    d = tmp_path_factory.mktemp("stream")
    (d / "in.txt").write_text("\n".join(lines) + "\n")
    tokenize_file(str(d / "in.txt"), str(d / "tok.bin"), TOK2)
    with open(d / "in.jsonl", "w") as fh:
        for line in lines:
            fh.write(json.dumps({"text": line, "meta": 1}) + "\n")
    return d


def stream_cfg(path, **data):
    base = dict(type="streaming", train_folder=str(path), tokenizer_path=TOK2, seq_len=16,
                micro_bsz=4, micro_num=2, num_worker=0)
    return TrainConfig(data=DataConfig(**{**base, **data}))


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    for x, y in zip(a, b, strict=True):
        for key in ("input_ids", "labels", "indexes", "type_ids"):
            assert torch.equal(x[key], y[key]), key
        assert all(torch.equal(u, v) for u, v in zip(x["cu_seqlens"], y["cu_seqlens"]))


@pytest.mark.parametrize("into_one", [False, True])
def test_same_rows_as_tokenized_path(corpus, into_one):
    tokenized = PackedDataset(TokenizedFile(corpus / "tok.bin"), 16, 64, into_one,
                              shuffle_seed=None)
    packer = StreamPacker(str(corpus / "in.jsonl"), load_tokenizer(TOK2), 16, 64, into_one)
    stream = packer.packs(start_position())
    for k in range(len(tokenized)):  # the whole first epoch, chunk boundaries included
        got, _ = next(stream)
        ref = tokenized[k]
        for key in ref:
            assert got[key].tolist() == ref[key].tolist(), (k, key)
    got, pos = next(stream)  # the tail is dropped and the stream starts again
    assert pos["epoch"] == 1 and got["input_ids"].tolist() == tokenized[0]["input_ids"].tolist()


def test_loader_rows_follow_the_stream(corpus):
    tokenized = PackedDataset(TokenizedFile(corpus / "tok.bin"), 16, 64, shuffle_seed=None)
    loader = build_train_loader(stream_cfg(corpus / "in.jsonl"), 0, 1)
    for k, batch in enumerate(take(iter(loader), 3)):
        for m in range(2):
            assert batch["input_ids"][m].tolist() == tokenized[2 * k + m]["input_ids"].tolist()


@pytest.mark.parametrize("num_worker", [0, 1])
def test_resume_mid_stream_is_exact(corpus, num_worker):
    cfg = stream_cfg(corpus / "in.jsonl", num_worker=num_worker, rampup_batch_size="1 1 2")
    full = take(iter(build_train_loader(cfg, 0, 1)), 40)  # > one epoch (~66 rows), 3 chunks
    for k in (9, 33):
        loader = build_train_loader(cfg, 0, 1)
        take(iter(loader), k)
        state = loader.state_dict()
        assert state["position"]["record"] >= 0
        restored = build_train_loader(cfg, 0, 1)
        restored.load_state_dict(json.loads(json.dumps(state)))  # plain Python values
        assert_batches_equal(take(iter(restored), 40 - k), full[k:])


def test_sharded_across_ranks(tmp_path, lines):
    for i in range(2):
        with open(tmp_path / f"part{i}.jsonl", "w") as fh:
            for line in lines[i * 150:(i + 1) * 150]:
                fh.write(json.dumps({"body": line}) + "\n")
    tok = load_tokenizer(TOK2)
    firsts = []
    for rank in range(2):
        packer = StreamPacker(str(tmp_path), tok, 16, 32, content_name="body",
                              dp_rank=rank, dp_size=2)
        firsts.append(next(packer.packs(start_position()))[0]["input_ids"].tolist())
    for rank in range(2):
        first = tok.sample(tok.encode(lines[rank * 150]))
        assert firsts[rank][:len(first)] == first
    cfg = stream_cfg(tmp_path, content_name="body")
    state = build_train_loader(cfg, 1, 2).state_dict()
    with pytest.raises(DataError, match="rank 1/2 loaded on rank 0/2"):
        build_train_loader(cfg, 0, 2).load_state_dict(state)
    single = build_train_loader(cfg, 0, 1)  # another dp size: restart the shard, keep the count
    single.load_state_dict({**state, "batch_count": 5})
    assert single.batch_count == 5 and single.state_dict()["position"]["record"] == -1


def test_parquet_file_and_missing_field(tmp_path, lines):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": lines[:50]}), tmp_path / "d.parquet")
    batch = next(iter(build_train_loader(stream_cfg(tmp_path / "d.parquet"), 0, 1)))
    tok = load_tokenizer(TOK2)
    first = tok.sample(tok.encode(lines[0]))
    assert batch["input_ids"][0, :len(first)].tolist() == first
    (tmp_path / "bad.jsonl").write_text('{"text": "a b c"}\n{"content": "x"}\n')
    with pytest.raises(DataError, match="has no field 'text'"):
        next(iter(build_train_loader(stream_cfg(tmp_path / "bad.jsonl", micro_num=1,
                                                micro_bsz=1, seq_len=8), 0, 1)))
    with pytest.raises(DataError, match="does not exist"):
        build_train_loader(stream_cfg(tmp_path / "nope"), 0, 1)
