"""Reliability suite, in-process part: bad configs, data, checkpoints and HF folders as a careless
or unlucky user would give them.  Every case runs the ``internevo`` command line
(:func:`internevo.cli.main`) and checks the exit code, the one ``internevo:`` line on stderr (no
traceback) and that protected files are unchanged (hash before and after).  Multi-process faults
and signals: tests/test_faults.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_helpers import error_line, tree_hash, write_config

from internevo import cli
from internevo.checkpoint.format import CheckpointError, save_torch
from internevo.config import load_config
from internevo.data.tokenized import encode_line, save_meta

LOCK_FILE = ".lock"
"""The save folder's lock (internevo/checkpoint/lock.py)."""
TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tokenizer_internlm2.model"


def train(capsys, config: Path, run_dir: Path, *sets: str) -> tuple[int, str, str]:
    """``internevo train`` in this process: (exit code, stdout, stderr)."""
    argv = ["train", "--config", str(config), "--run-dir", str(run_dir)]
    for item in sets:
        argv += ["--set", item]
    capsys.readouterr()
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def refused(capsys, config: Path, run_dir: Path, *sets: str, code: int = 2,
            needles: tuple = ()) -> str:
    """Run and check the one-line contract: exit ``code``, one line with every needle."""
    rc, _, err = train(capsys, config, run_dir, *sets)
    return error_line(rc, err, code, *needles)


def saving(folder: Path, **extra) -> str:
    """``--set ckpt=...``: save every step into ``folder``."""
    ck = dict(enable_save_ckpt=True, save_ckpt_folder=str(folder), checkpoint_every=1,
              auto_resume=False, **extra)
    return f"ckpt={ck!r}"


def load_from(folder: Path, **extra) -> str:
    """``--set ckpt=...``: load ``folder`` (everything unless ``content`` says otherwise)."""
    info = {"path": str(folder), "content": ("all",), **extra}
    return f"ckpt={dict(enable_save_ckpt=False, auto_resume=False, load_ckpt_info=info)!r}"


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    """One tiny run with checkpoints at steps 1 and 2 (and a 2-layer one), made once."""
    root = tmp_path_factory.mktemp("shared")
    config = write_config(root / "tiny.py")
    assert cli.main(["train", "--config", str(config), "--run-dir", str(root / "run"),
                     "--set", saving(root / "ckpt")]) == 0
    assert cli.main(["train", "--config", str(config), "--run-dir", str(root / "run2"),
                     "--set", saving(root / "ckpt2"), "--set", "model.num_layers=2",
                     "--set", "data.total_steps=1"]) == 0
    return {"config": config, "ckpt": root / "ckpt", "ckpt2": root / "ckpt2" / "1",
            "hash": tree_hash(root / "ckpt"), "hash2": tree_hash(root / "ckpt2")}


@pytest.fixture
def untouched(shared):
    """The shared checkpoints are byte-identical after the case."""
    yield shared
    assert tree_hash(shared["ckpt"]) == shared["hash"]
    assert tree_hash(shared["ckpt2"].parent) == shared["hash2"]


def copy_ckpt(shared, tmp_path: Path, step: str = "2") -> Path:
    target = tmp_path / "copy" / step
    shutil.copytree(shared["ckpt"] / step, target)
    return target


# ------------------------------------------------------------------------------------ config

CONFIG_CASES = {  # --set value -> words of the expected line
    "ckpt.checkpoint_every=-1": ("ckpt.checkpoint_every", ">= 1", "-1"),
    "data.num_worker=-1": ("data.num_worker", ">= 0"),
    "lr_scheduler.total_steps=-5": ("lr_scheduler.total_steps", ">= 1"),
    "adam.adam_eps=0": ("adam.adam_eps", "> 0"),
    "grad_scaler.backoff_factor=1.5": ("grad_scaler.backoff_factor", "< 1"),
    "data.valid_micro_num=0": ("data.valid_micro_num", ">= 1"),
    "data.totl_steps=2": ("did you mean 'total_steps'",),
    "data.total_steps=0": ("data.total_steps", ">= 1"),
    "adam.lr=-1": ("adam.lr", ">= 0"),
    "model.dtype='float8'": ("model.dtype", "unsupported dtype"),
    "model_type='GPT9'": ("model_type", "registered"),
    "parallel.tensor.size=2": ("world size 1", "tensor.size"),
    "ckpt.load_ckpt_info={'path': 'x', 'conten': 'all'}": ("unknown key 'conten'",),
    "ckpt.load_ckpt_info={'path': 'x', 'ckpt_type': 'gguf'}": ("ckpt_type", "'gguf'"),
    "ckpt.load_ckpt_info={'path': 'x', 'strict': 'yes'}": ("strict", "True or False"),
    "ckpt.load_ckpt_info={'path': 'x', 'content': 'weights'}": ("unknown content 'weights'",),
}


@pytest.mark.parametrize("setting", list(CONFIG_CASES))
def test_config_values_refused_with_field(setting, capsys, tmp_path, untouched):
    refused(capsys, untouched["config"], tmp_path / "run", setting,
            needles=CONFIG_CASES[setting])
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_missing_and_broken_config_files(capsys, tmp_path):
    refused(capsys, tmp_path / "nope.py", tmp_path / "run", needles=("config file not found",))
    broken = tmp_path / "broken.py"
    broken.write_text("data = dict(\n")
    refused(capsys, broken, tmp_path / "run", needles=("could not execute",))


def test_override_without_value(capsys, tmp_path, untouched):
    refused(capsys, untouched["config"], tmp_path / "run", "data.total_steps",
            needles=("expected KEY=VALUE",))


def test_save_folder_that_is_a_file_is_found_before_any_step(capsys, tmp_path, untouched):
    blocker = tmp_path / "ckpt"
    blocker.write_text("keep me")
    rc, out, err = train(capsys, untouched["config"], tmp_path / "run", saving(blocker))
    error_line(rc, err, 2, "ckpt.save_ckpt_folder", "regular file")
    assert "step" not in out and blocker.read_text() == "keep me"


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_run_dir_that_is_or_lies_under_a_file(where, capsys, tmp_path, untouched):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    run_dir = blocker if where == "file" else blocker / "run"
    refused(capsys, untouched["config"], run_dir, needles=("--run-dir", "regular file"))
    assert blocker.read_text() == "keep me"


def test_stop_file_that_is_a_folder(capsys, tmp_path, untouched):
    (tmp_path / "stop").mkdir()
    ck = dict(enable_save_ckpt=False, stop_file_path=str(tmp_path / "stop"))
    refused(capsys, untouched["config"], tmp_path / "run", f"ckpt={ck!r}",
            needles=("ckpt.stop_file_path", "is a folder"))


def test_debug_adds_the_traceback(capsys, tmp_path, untouched):
    capsys.readouterr()
    rc = cli.main(["train", "--config", str(untouched["config"]), "--run-dir",
                   str(tmp_path / "r"), "--set", "data.num_worker=-1", "--debug"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith(
        "config error: ")


# -------------------------------------------------------------------------------------- data


def bin_folder(root: Path, lines: list[bytes], lengths: list[int]) -> Path:
    """``root/en/a.bin`` + meta from raw lines (so a line can be malformed on purpose)."""
    (root / "en").mkdir(parents=True)
    offsets = np.cumsum([0] + [len(x) for x in lines[:-1]]).tolist()
    (root / "en" / "a.bin").write_bytes(b"".join(lines))
    with open(root / "en" / "a.bin.meta", "wb") as fh:
        save_meta(fh, offsets, lengths)
    return root


def good_lines(n: int = 6, top: int = 200) -> tuple[list[bytes], list[int]]:
    rng = np.random.default_rng(0)
    toks = [rng.integers(1, top, size=20).tolist() for _ in range(n)]
    return [encode_line(t) for t in toks], [len(t) for t in toks]


def data_case(tmp_path: Path, kind: str) -> Path:
    """A train folder broken in the way ``kind`` names."""
    root = tmp_path / "data"
    if kind == "missing":
        return root
    if kind == "empty":
        root.mkdir()
        return root
    lines, lengths = good_lines()
    if kind == "bad_json":  # every line: the first one the sampler reads fails
        lines = [b'{"tokens": [1, 2,, 3]}' + b" " * (len(x) - 23) + b"\n" for x in lines]
    if kind == "vocab":
        lines, lengths = good_lines(top=1000)
    bin_folder(root, lines, lengths)
    if kind == "no_meta":
        (root / "en" / "a.bin.meta").unlink()
    if kind == "appended":
        with open(root / "en" / "a.bin", "ab") as f:
            f.write(encode_line([1, 2, 3]))
    if kind == "top_level_bin":
        shutil.move(root / "en" / "a.bin", root / "a.bin")
    return root


DATA_CASES = {
    "missing": ("data error", "not a directory"),
    "empty": ("data error", "no .bin files"),
    "no_meta": ("data error", "a.bin", ".meta"),
    "appended": ("data error", "more lines than the .meta"),
    "bad_json": ("data error", "a.bin:", "not a {\"tokens\": [...]} JSON line"),
    "vocab": ("data error", "model.vocab_size=256"),
    "top_level_bin": ("data error", "type sub-folder"),
}


@pytest.mark.parametrize("kind", list(DATA_CASES))
def test_bad_data_is_one_line(kind, capsys, tmp_path, untouched):
    root = data_case(tmp_path, kind)
    before = tree_hash(root) if root.exists() else {}
    refused(capsys, untouched["config"], tmp_path / "run", f"data.train_folder={str(root)!r}",
            needles=DATA_CASES[kind])
    assert (tree_hash(root) if root.exists() else {}) == before


def tokenize(capsys, src: Path, out: Path, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli.main(["tokenize", "--text_input_path", str(src), "--bin_output_path", str(out),
                   "--tokenizer_path", str(TOKENIZER), "--workers", "1", "--quiet", *extra])
    return rc, capsys.readouterr().err


def test_tokenizer_tool_bad_inputs(capsys, tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    rc, err = tokenize(capsys, latin, tmp_path / "o" / "x.bin")
    assert "Traceback" not in err and rc != 0 and len(err.strip().splitlines()) == 1
    assert "latin.txt:1: byte 3 is not UTF-8" in err
    good = tmp_path / "good.txt"
    good.write_text("hello world\n")
    (tmp_path / "file").write_text("keep me")
    rc, err = tokenize(capsys, good, tmp_path / "file" / "x.bin")
    assert "Traceback" not in err and rc != 0 and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "file").read_text() == "keep me"


def test_tokenizer_tool_never_overwrites(capsys, tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("hello world\n")
    out = tmp_path / "o" / "x.bin"
    assert tokenize(capsys, good, out)[0] == 0
    before = tree_hash(out.parent)
    rc, err = tokenize(capsys, good, out)
    assert rc != 0 and "already exists" in err and "Traceback" not in err
    assert tree_hash(out.parent) == before


# ------------------------------------------------------------------------------- checkpoints


def test_second_run_on_a_locked_folder_is_refused(capsys, tmp_path, untouched):
    folder = tmp_path / "ckpt"
    shutil.copytree(untouched["ckpt"], folder)
    (folder / ".tmp-7").mkdir()  # another run's save in progress
    holder = {"host": socket.gethostname(), "pid": os.getppid(), "job": "other",
              "started": "2026-01-01 00:00:00"}
    (folder / LOCK_FILE).write_text(json.dumps(holder))
    before = tree_hash(folder)
    refused(capsys, untouched["config"], tmp_path / "run", saving(folder),
            needles=("in use by another run", f"pid {os.getppid()}", "2026-01-01", "'other'"))
    assert tree_hash(folder) == before and (folder / ".tmp-7").is_dir()


def test_lock_of_another_host_is_never_taken(capsys, tmp_path, untouched):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "job": "x",
                                                "started": "then"}))
    refused(capsys, untouched["config"], tmp_path / "run", saving(folder),
            needles=("in use by another run", "host elsewhere"))


def test_stale_lock_of_a_dead_process_is_taken_over(capsys, tmp_path, untouched, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                "job": "gone", "started": "then"}))
    rc, out, err = train(capsys, untouched["config"], tmp_path / "run", saving(folder))
    assert rc == 0, err
    assert f"pid {dead.pid}" in caplog.text and "has exited" in caplog.text  # the warning
    assert (folder / "2" / "2.step").is_file() and not (folder / LOCK_FILE).exists()


def test_saving_a_step_that_exists_never_replaces_it(capsys, tmp_path, untouched):
    folder = tmp_path / "ckpt"
    shutil.copytree(untouched["ckpt"], folder)
    before = tree_hash(folder)
    rc, out, err = train(capsys, untouched["config"], tmp_path / "run", saving(folder),
                         "adam.lr=0.5")
    assert rc == 0, err
    assert {k: v for k, v in tree_hash(folder).items() if k in before} == before
    assert (folder / "1.1" / "1.step").is_file() and (folder / "2.1" / "2.step").is_file()
    assert "never replaced" in out


def test_resume_picks_the_newest_save_of_a_repeated_step(capsys, tmp_path, untouched):
    folder = tmp_path / "ckpt"
    shutil.copytree(untouched["ckpt"], folder)
    shutil.copytree(folder / "2", folder / "2.1")
    ck = dict(enable_save_ckpt=True, save_ckpt_folder=str(folder), auto_resume=True)
    rc, out, err = train(capsys, untouched["config"], tmp_path / "run", f"ckpt={ck!r}",
                         "data.total_steps=3")
    assert rc == 0, err
    assert f"from {folder / '2.1'}" in out and (folder / "3" / "3.step").is_file()


@pytest.mark.parametrize("name", ["__0_0.distcp", "loader/dp0.pt", "rng/rank0.pt",
                                  "meta.json", ".metadata"])
def test_flipped_byte_is_named(name, capsys, tmp_path, untouched):
    ck = copy_ckpt(untouched, tmp_path)
    data = bytearray((ck / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (ck / name).write_bytes(bytes(data))
    refused(capsys, untouched["config"], tmp_path / "run", load_from(ck),
            needles=("checksum mismatch", str(ck / name)))


def test_truncated_file_is_named(capsys, tmp_path, untouched):
    ck = copy_ckpt(untouched, tmp_path)
    data = (ck / "__0_0.distcp").read_bytes()
    (ck / "__0_0.distcp").write_bytes(data[: len(data) // 3])
    refused(capsys, untouched["config"], tmp_path / "run", load_from(ck),
            needles=("truncated", "__0_0.distcp"))


def nan_checkpoint(config: Path, folder: Path) -> None:
    """A complete, correctly check-summed checkpoint whose weights are NaN."""
    from internevo.parallel.comm import Comm
    from internevo.parallel.layout import ParallelLayout
    from internevo.train.trainer import Trainer

    cfg = load_config(config, {"ckpt": {"enable_save_ckpt": True, "auto_resume": False,
                                         "save_ckpt_folder": str(folder)}})
    layout = ParallelLayout.from_config(cfg, 1, 0)
    trainer = Trainer(cfg, layout, Comm(layout), torch.device("cpu"), folder.parent / "run")
    with torch.no_grad():
        next(iter(trainer.model.parameters())).fill_(float("nan"))
    trainer.optimizer.refresh_masters_from_params()
    trainer.ckpt.save()
    trainer.ckpt.finish()
    trainer.ckpt.release()


def test_nan_weights_are_refused_with_the_tensor_name(capsys, tmp_path, untouched):
    nan_checkpoint(untouched["config"], tmp_path / "nan")
    ck = dict(enable_save_ckpt=True, save_ckpt_folder=str(tmp_path / "nan"), auto_resume=True)
    before = tree_hash(tmp_path / "nan")
    refused(capsys, untouched["config"], tmp_path / "run", f"ckpt={ck!r}",
            needles=("non-finite", "tensor 'model.", "weight'"))
    assert tree_hash(tmp_path / "nan") == before


def test_extra_layer_is_refused_unless_not_strict(capsys, tmp_path, untouched, caplog):
    refused(capsys, untouched["config"], tmp_path / "run",
            load_from(untouched["ckpt2"], content=("model",)),
            needles=("tensors this model does not have", "model.layers.1.", "num_layers=2",
                     "strict=False"))
    rc, out, err = train(capsys, untouched["config"], tmp_path / "run",
                         load_from(untouched["ckpt2"], content=("model",), strict=False))
    assert rc == 0 and "leaving out" in caplog.text and "model.layers.1." in caplog.text, err


def test_missing_layer_is_refused(capsys, tmp_path, untouched):
    refused(capsys, untouched["config"], tmp_path / "run", load_from(untouched["ckpt"] / "2"),
            "model.num_layers=2", needles=("model.layers.1.", "is not in the checkpoint"))


def test_other_hidden_size_is_refused(capsys, tmp_path, untouched):
    refused(capsys, untouched["config"], tmp_path / "run", load_from(untouched["ckpt"] / "2"),
            "model.hidden_size=64", needles=("has shape", "hidden_size=32 (now 64)"))


def test_incomplete_checkpoint_is_refused(capsys, tmp_path, untouched):
    ck = copy_ckpt(untouched, tmp_path)
    (ck / "2.step").unlink()
    refused(capsys, untouched["config"], tmp_path / "run", load_from(ck),
            needles=("incomplete checkpoint",))


def test_missing_load_path_is_refused(capsys, tmp_path, untouched):
    refused(capsys, untouched["config"], tmp_path / "run", load_from(tmp_path / "nowhere"),
            needles=("does not exist", "load_ckpt_info.path"))


def test_resume_from_a_good_checkpoint_still_works(capsys, tmp_path, untouched):
    ck = copy_ckpt(untouched, tmp_path)
    rc, out, err = train(capsys, untouched["config"], tmp_path / "run", load_from(ck),
                         "data.total_steps=3")
    assert rc == 0, err
    assert "step     3" in out


def test_disk_full_names_the_file(tmp_path):
    from internevo.errors import describe

    with pytest.raises(CheckpointError, match=r"/dev/full: the write came out short.*no space"):
        save_torch(Path("/dev/full"), {"x": torch.zeros(1000)})
    line, code = describe(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "f")))
    assert code == 1 and line == f"OS error: {tmp_path / 'f'}: no space left on the device; " \
                                 "free space or choose another folder"


def test_stop_file_naming_a_passed_step_is_a_warning(tmp_path, untouched, caplog):
    from internevo.parallel.comm import Comm
    from internevo.parallel.layout import ParallelLayout
    from internevo.train.trainer import Trainer

    stop = tmp_path / "stop"
    cfg = load_config(untouched["config"], {"ckpt": {"enable_save_ckpt": False,
                                                      "stop_file_path": str(stop)}})
    layout = ParallelLayout.from_config(cfg, 1, 0)
    trainer = Trainer(cfg, layout, Comm(layout), torch.device("cpu"), tmp_path / "run")
    trainer.fit()
    stop.write_text("1")
    with caplog.at_level(logging.WARNING):
        assert trainer.ckpt.after_step() is False
    assert "names step 1, which this run passed already (now at step 2)" in caplog.text


# ------------------------------------------------------------------------------- HF folders


@pytest.fixture(scope="session")
def hf_folder(shared, tmp_path_factory):
    """A Hugging Face folder of the shared step-2 checkpoint (no tokenizer: vocabulary 256)."""
    from internevo.convert.hf_folder import export_hf, load_model_state_for_export

    out = tmp_path_factory.mktemp("hf") / "hf"
    sd, cfg = load_model_state_for_export(shared["ckpt"] / "2")
    export_hf(sd, cfg, out, None, "internlm2", torch.float32, 10**9)
    return out


def truncated_hf(hf_folder: Path, tmp_path: Path) -> Path:
    damaged = tmp_path / "hf"
    shutil.copytree(hf_folder, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    return damaged


def test_truncated_safetensors_in_training(capsys, tmp_path, hf_folder, untouched):
    damaged = truncated_hf(hf_folder, tmp_path)
    ck = dict(enable_save_ckpt=False, auto_resume=False,
              load_ckpt_info=dict(path=str(damaged), content=("model",), ckpt_type="hf"))
    refused(capsys, untouched["config"], tmp_path / "run", f"ckpt={ck!r}",
            needles=("model.safetensors", "truncated or damaged"))


def test_truncated_safetensors_in_revert(capsys, tmp_path, hf_folder):
    damaged = truncated_hf(hf_folder, tmp_path)
    capsys.readouterr()
    rc = cli.main(["convert", "from-hf", "--src", str(damaged), "--tgt", str(tmp_path / "back")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "model.safetensors" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "back").exists()
