"""The .bin/.meta format: bytes as InternEvo's reader expects them, validation, atomic writes."""

import json

import numpy as np
import pytest

from internevo.data.errors import DataError
from internevo.data.tokenized import TokenizedFile, TokenizedWriter, meta_path

SAMPLES = [[1, 2, 3], [1, -7, -8, 9, 2], [4], [1, 100000, 2]]


def write(path, samples=SAMPLES, **kw):
    with TokenizedWriter(path, **kw) as w:
        for s in samples:
            w.write(s)
    return path


def test_bytes_match_internevo_reader_by_hand(tmp_path):
    path = write(tmp_path / "x.bin")
    raw = path.read_bytes()
    with open(meta_path(path), "rb") as fh:  # InternEvo: np.load on the .meta handle
        meta = np.load(fh)
    assert meta.dtype == np.int64 and meta.shape == (len(SAMPLES), 2)
    lines = raw.split(b"\n")[:-1]
    starts = np.cumsum([0] + [len(line) + 1 for line in lines[:-1]])
    assert meta[:, 0].tolist() == starts.tolist()
    for (off, n), sample in zip(meta.tolist(), SAMPLES):
        end = raw.index(b"\n", off)
        assert json.loads(raw[off:end]) == {"tokens": sample}
        assert n == len(sample)
    assert lines[0] == b'{"tokens": [1, 2, 3]}'


def test_reader_round_trip_and_min_length(tmp_path):
    path = write(tmp_path / "x.bin")
    f = TokenizedFile(path)
    assert [f[i].tolist() for i in range(len(f))] == SAMPLES
    assert f[0].dtype == np.int64
    g = TokenizedFile(path, min_length=3, type_id=2)
    assert len(g) == 3 and g.num_dropped == 1 and g[2].tolist() == SAMPLES[3]


def test_reads_internevo_int32_and_three_column_meta(tmp_path):
    path = write(tmp_path / "x.bin")
    meta = np.load(meta_path(path))
    with open(meta_path(path), "wb") as fh:
        np.save(fh, np.stack([meta[:, 0], meta[:, 1] * 0 + 7, meta[:, 1]], 1).astype(np.int32))
    assert TokenizedFile(path).lengths.tolist() == [3, 5, 1, 3]  # last column = lengths


def test_missing_meta(tmp_path):
    path = tmp_path / "x.bin"
    path.write_text('{"tokens": [1]}\n')
    with pytest.raises(DataError, match=r"x\.bin: has no x\.bin\.meta"):
        TokenizedFile(path)


def test_meta_that_does_not_match(tmp_path):
    path = write(tmp_path / "x.bin")
    meta = np.load(meta_path(path))
    bad = meta.copy()
    bad[2, 0] += 3
    np.save(open(meta_path(path), "wb"), bad)
    with pytest.raises(DataError, match="does not match x.bin: line 3"):
        TokenizedFile(path)
    with open(path, "ab") as fh:  # appended .bin, stale .meta
        fh.write(b'{"tokens": [5]}\n')
    np.save(open(meta_path(path), "wb"), meta)
    with pytest.raises(DataError, match="more lines than the .meta"):
        TokenizedFile(path)


def test_wrong_length_and_malformed_line_name_the_line(tmp_path):
    path = write(tmp_path / "x.bin")
    meta = np.load(meta_path(path))
    meta[1, 1] = 4
    np.save(open(meta_path(path), "wb"), meta)
    with pytest.raises(DataError, match=r"x\.bin:2: the .meta says 4 tokens"):
        TokenizedFile(path)[1]
    path.write_bytes(path.read_bytes().replace(b'{"tokens": [4]}', b'{"tokens": [4}}'))
    with pytest.raises(DataError, match=r"x\.bin:3: not a"):
        TokenizedFile(path)[2]


def test_meta_not_npy(tmp_path):
    path = write(tmp_path / "x.bin")
    meta_path(path).write_text("hello")
    with pytest.raises(DataError, match="not a NumPy"):
        TokenizedFile(path)


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    path = tmp_path / "out" / "x.bin"
    with pytest.raises(RuntimeError):
        with TokenizedWriter(path) as w:
            w.write([1, 2])
            assert not path.exists() and not meta_path(path).exists()  # nothing visible yet
            raise RuntimeError("killed")
    assert list(path.parent.iterdir()) == []


def test_no_accidental_overwrite(tmp_path):
    path = write(tmp_path / "x.bin")
    before = path.read_bytes()
    with pytest.raises(DataError, match="already exists"):
        write(path, [[9]])
    assert path.read_bytes() == before
    write(path, [[9]], overwrite=True)
    assert TokenizedFile(path)[0].tolist() == [9]
    with pytest.raises(DataError, match="must end with .bin"):
        TokenizedWriter(tmp_path / "x.jsonl")


def test_empty_file(tmp_path):
    path = write(tmp_path / "x.bin", [])
    assert len(TokenizedFile(path)) == 0
