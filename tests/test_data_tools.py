"""Tokenizer and Alpaca tools against independent references (sentencepiece itself, by-hand
layouts), and their bad-input errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from internevo.data.errors import DataError
from internevo.data.loader import collate
from internevo.data.packing import PackedDataset
from internevo.data.tokenized import TokenizedFile, meta_path
from internevo.data.tokenizer import load_tokenizer
from internevo.data.tools import alpaca_main, tokenize_alpaca, tokenize_file, tokenize_main

ROOT = Path(__file__).resolve().parents[1]
TOK2 = ROOT / "assets" / "tokenizer_internlm2.model"
TOK1 = ROOT / "assets" / "tokenizer_internlm.model"
LINES = ["First Citizen:", "", "Before we proceed any further, hear me speak.",
         "  All:  ", "Speak, speak. 你好，世界！ emoji 🙂 tabs\there"]


@pytest.fixture(scope="module")
def sp2():
    return spm.SentencePieceProcessor(model_file=str(TOK2))


def read_bin(path):
    f = TokenizedFile(path)
    return [f[i].tolist() for i in range(len(f))]


def test_txt_ids_equal_sentencepiece(tmp_path, sp2):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    stats = tokenize_file(str(src), str(tmp_path / "out.bin"), str(TOK2))
    expected = [[sp2.bos_id()] + sp2.encode(t.strip()) + [sp2.eos_id()]
                for t in LINES if t.strip()]
    assert read_bin(tmp_path / "out.bin") == expected
    assert stats["samples"] == 4 and stats["skipped_empty"] == 1
    assert expected[0][0] == 1 and expected[0][-1] == 2
    assert np.load(meta_path(tmp_path / "out.bin")).dtype == np.int64


def test_jsonl_json_and_folder_use_the_text_field(tmp_path, sp2):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl").write_text(
        "\n".join(json.dumps({"content": t, "id": i}) for i, t in enumerate(LINES[:3])) + "\n")
    (folder / "b.json").write_text(json.dumps([{"content": LINES[4]}]))
    (folder / "notes.md").write_text("ignored")
    tokenize_file(str(folder), str(tmp_path / "o.bin"), str(TOK2), text_key="content")
    texts = [LINES[0], LINES[2], LINES[4]]  # the text field, not the raw JSON line
    assert read_bin(tmp_path / "o.bin") == [[1] + sp2.encode(t) + [2] for t in texts]


def test_parallel_workers_write_identical_bytes(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(f"line {i} " * (i % 7 + 1) for i in range(600)))
    tokenize_file(str(src), str(tmp_path / "a.bin"), str(TOK2), workers=1)
    tokenize_file(str(src), str(tmp_path / "b.bin"), str(TOK2), workers=2)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert meta_path(tmp_path / "a.bin").read_bytes() == meta_path(tmp_path / "b.bin").read_bytes()


def test_cli_wrapper_and_errors(tmp_path, capsys, sp2):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n{"text": "b"\n')
    out = tmp_path / "o.bin"
    assert tokenize_main(["--text_input_path", str(src), "--bin_output_path", str(out),
                          "--tokenizer_path", str(TOK2), "--quiet"]) == 1
    assert f"{src}:2: malformed JSON line" in capsys.readouterr().err
    assert not out.exists() and not meta_path(out).exists()
    src.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(DataError, match=rf"{src}:2: record has no 'text' field"):
        tokenize_file(str(src), str(out), str(TOK2))
    src.write_text('{"text": "a"}\n')
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "tokenizer.py"),
                           "--text_input_path", str(src), "--bin_output_path", str(out),
                           "--tokenizer_path", str(TOK2), "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert read_bin(out) == [[1] + sp2.encode("a") + [2]]
    before = out.read_bytes()
    with pytest.raises(DataError, match="already exists"):
        tokenize_file(str(src), str(out), str(TOK2))
    assert out.read_bytes() == before


def test_bad_tokenizer_and_inputs(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    with pytest.raises(DataError, match="tokenizer path does not exist"):
        tokenize_file(str(src), str(tmp_path / "o.bin"), str(tmp_path / "nope.model"))
    with pytest.raises(DataError, match="not a SentencePiece model"):
        tokenize_file(str(src), str(tmp_path / "o.bin"), str(src))
    with pytest.raises(DataError, match="not a Hugging Face tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="folder has no"):
        tokenize_file(str(tmp_path / "empty"), str(tmp_path / "o.bin"), str(TOK2))
    assert not (tmp_path / "o.bin").exists()


def test_hugging_face_tokenizer_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "again": 5}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>")
    hf.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 6)
    assert tok.encode("hello world again") == hf.encode("hello world again",
                                                        add_special_tokens=False) == [3, 4, 5]
    src = tmp_path / "in.txt"
    src.write_text("hello world\nworld zzz\n")
    tokenize_file(str(src), str(tmp_path / "o.bin"), str(tmp_path / "tok"))
    assert read_bin(tmp_path / "o.bin") == [[1, 3, 4, 2], [1, 4, 0, 2]]


# ---------------------------------------------------------------------------- alpaca


RECORDS = [{"instruction": f"Say {i}", "input": "" if i % 2 else f"ctx {i}",
            "output": f"Answer number {i}."} for i in range(20)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_alpaca_internlm_layout_matches_internevo(tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(TOK1))
    ds = write_jsonl(tmp_path / "a.jsonl", RECORDS)
    report = tokenize_alpaca(str(ds), str(tmp_path / "out"), str(TOK1), split_ratio=0.0)
    assert report["template"] == "internlm"
    got = read_bin(tmp_path / "out" / "train" / "en" / "dataset.bin")
    for rec, tokens in zip(RECORDS, got):
        user = f"<|User|>:{rec['instruction']}" + (f"\n{rec['input']}" if rec["input"] else "")
        prompt = sp.encode(user) + [103167, 13] + sp.encode("<|Bot|>:")
        expected = [1] + [-t for t in prompt] + sp.encode(rec["output"]) + [103166, 13] + [2]
        assert tokens == expected
    assert not (tmp_path / "out" / "valid").exists()


def test_alpaca_masking_chatml_positions(tmp_path, sp2):
    ds = write_jsonl(tmp_path / "a.jsonl", RECORDS[:1])
    tokenize_alpaca(str(ds), str(tmp_path / "out"), str(TOK2), split_ratio=0.0)
    f = TokenizedFile(tmp_path / "out" / "train" / "en" / "dataset.bin")
    tokens = f[0]
    response = sp2.encode(RECORDS[0]["output"]) + [92542]
    n_prompt = len(tokens) - len(response) - 2  # minus bos and eos
    assert tokens[0] == 1 and tokens[-1] == 2 and tokens[1] == -92543
    assert (tokens[1:1 + n_prompt] < 0).all() and (tokens[1 + n_prompt:] > 0).all()
    row = collate([PackedDataset(f, len(tokens), len(tokens), shuffle_seed=None)[0]])
    labels = row["labels"][0].tolist()
    # position i predicts token i+1: prompt targets (and the bos target) carry no loss,
    # the first target is the first response token, the last position has no target
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:-1] == response + [2] and labels[-1] == -100
    assert row["input_ids"][0].tolist() == [abs(t) for t in tokens.tolist()]


def test_alpaca_truncation_split_and_cli(tmp_path, capsys):
    records = RECORDS + [{"instruction": "long", "input": "", "output": "word " * 500}]
    ds = tmp_path / "a.json"
    ds.write_text(json.dumps(records))
    assert alpaca_main([str(ds), str(tmp_path / "out"), str(TOK2), "--split_ratio", "0.25",
                        "--max_length", "64"]) == 0
    assert "truncated" in capsys.readouterr().out
    train = read_bin(tmp_path / "out" / "train" / "en" / "dataset.bin")
    valid = read_bin(tmp_path / "out" / "valid" / "en" / "dataset.bin")
    assert len(valid) == int(21 * 0.25) and len(train) + len(valid) == 21
    assert max(map(len, train + valid)) == 64 and all(s[-1] == 2 for s in train + valid)
    assert alpaca_main([str(ds), str(tmp_path / "out"), str(TOK2)]) == 1  # no overwrite
    again = tmp_path / "again"
    tokenize_alpaca(str(ds), str(again), str(TOK2), split_ratio=0.25, max_length=64)
    assert read_bin(again / "valid" / "en" / "dataset.bin") == valid  # deterministic split


def test_alpaca_bad_record_names_the_line(tmp_path):
    ds = write_jsonl(tmp_path / "a.jsonl", RECORDS[:2] + [{"instruction": "x"}])
    with pytest.raises(DataError, match=rf"{ds}:3: record has no text field 'output'"):
        tokenize_alpaca(str(ds), str(tmp_path / "out"), str(TOK2))
    assert not (tmp_path / "out").exists()
