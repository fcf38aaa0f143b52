"""Checkpoints: bitwise resume, auto-resume, stop file, keep-last-N, async == sync, bad input."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from internevo.checkpoint.manager import (
    CheckpointError,
    latest_checkpoint,
    local_path,
    parse_load_info,
)
from internevo.config import config_from_dict
from internevo.data.tokenized import TokenizedWriter
from internevo.launch import seed_everything
from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout
from internevo.parallel.spawn import spawn_ranks
from internevo.train.trainer import Trainer

# single-process DCP calls warn that they are single-process (pytest shows it despite the filter)
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

# dropout on, so that resuming also has to restore the RNG streams
MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=256, multiple_of=16,
             drop_rate=0.1)


def make_cfg(save: Path, total: int = 4, dtype: str = "torch.float32", data: Path = None,
             model: dict = None, num_worker: int = 0, **ckpt):
    """A tiny run: 2 packed rows (micro_num=2) of 2x16 tokens per step, LR schedule of 4 steps."""
    return config_from_dict({
        "model": {**MODEL, "dtype": dtype, **(model or {})},
        "data": dict(seq_len=16, micro_bsz=2, micro_num=2, total_steps=total, num_worker=num_worker,
                     train_folder=str(data) if data else None),
        "adam": dict(lr=1e-2),
        "lr_scheduler": dict(total_steps=4, warmup_ratio=0.25, eta_min=1e-3),
        "hybrid_zero_optimizer": dict(clip_grad_norm=1.0),
        "enable_tb": False,
        "ckpt": {"save_ckpt_folder": str(save), **ckpt},
    })


def make_trainer(cfg, run_dir: Path, world: int = 1, rank: int = 0) -> Trainer:
    seed_everything(1024)  # the RNG state a fresh process starts with (what cli.run_train does)
    layout = ParallelLayout.from_config(cfg, world, rank)
    if world > 1:
        layout.build_groups()
    return Trainer(cfg, layout, Comm(layout), torch.device("cpu"), run_dir)


def snapshot(t: Trainer) -> dict:
    return {"model": {k: v.detach().clone() for k, v in t.model.state_dict().items()},
            "optimizer": t.optimizer.state_dict()}


def assert_identical(a, b, where=""):
    """Nested dicts with tensors compared bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def read_dcp(folder: Path) -> dict:
    meta = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=True)
    return state


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    """Real tokenized files (packed by the data loader)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.RandomState(0)
    path = root / "train" / "en" / "a.bin"
    path.parent.mkdir(parents=True)
    with TokenizedWriter(path) as w:
        for _ in range(300):
            w.write([1] + rng.randint(2, 256, size=rng.randint(3, 40)).tolist())
    return root / "train"


@pytest.fixture(scope="module")
def reference(data_folder, tmp_path_factory):
    """Uninterrupted 4-step runs (no saving): losses and final state, per dtype."""
    cache = {}

    def run(dtype):
        if dtype not in cache:
            root = tmp_path_factory.mktemp("reference")
            t = make_trainer(make_cfg(root / "ckpt", dtype=dtype, data=data_folder,
                                      enable_save_ckpt=False), root / "run")
            cache[dtype] = ([r["loss"] for r in t.fit()], snapshot(t))
        return cache[dtype]
    return run


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A finished 2-step run on dummy data with checkpoints 1 and 2 (copy before changing it)."""
    root = tmp_path_factory.mktemp("saved")
    t = make_trainer(make_cfg(root / "ckpt", total=2, checkpoint_every=1), root / "run")
    t.fit()
    return root / "ckpt", snapshot(t)


# ------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("dtype, stop_by, workers", [("torch.float32", "stop_file", 0),
                                                     ("torch.bfloat16", "total_steps", 1)])
def test_resume_is_bitwise(dtype, stop_by, workers, reference, data_folder, tmp_path):
    """The reference loads data in-process; with ``workers`` a DataLoader worker does."""
    losses, final = reference(dtype)
    save = tmp_path / "ckpt"
    if stop_by == "stop_file":
        stop = tmp_path / "stop"
        first = make_trainer(make_cfg(save, dtype=dtype, data=data_folder, num_worker=workers,
                                      stop_file_path=str(stop)), tmp_path / "run")
        assert stop.read_text() == "0"  # created at start (spec §6.5)
        stop.write_text("2")  # +2: save at step 2 and stop
    else:
        first = make_trainer(make_cfg(save, total=2, dtype=dtype, data=data_folder,
                                      num_worker=workers), tmp_path / "run")
    assert [r["loss"] for r in first.fit()] == losses[:2]
    assert names(save) == ["2"]
    second = make_trainer(make_cfg(save, dtype=dtype, data=data_folder, num_worker=workers),
                          tmp_path / "run")
    tail = second.fit()
    assert [r["step"] for r in tail] == [3, 4]
    assert [r["loss"] for r in tail] == losses[2:]  # exactly, not approximately
    assert_identical(snapshot(second), final)
    assert names(save) == ["2", "4"]


def test_stop_file_minus_n_saves_and_continues(tmp_path):
    stop = tmp_path / "flags" / "stop"
    t = make_trainer(make_cfg(tmp_path / "ckpt", total=3, stop_file_path=f"local:{stop}"),
                     tmp_path / "run")
    stop.write_text("-1\n")
    assert len(t.fit()) == 3
    assert names(tmp_path / "ckpt") == ["1", "3"]  # step 1 (stop file) and the last step


def test_auto_resume_ignores_incomplete(saved, tmp_path):
    save = tmp_path / "ckpt"
    shutil.copytree(saved[0], save)
    shutil.copytree(save / "2", save / ".tmp-3")  # a save that died before its marker
    (save / ".tmp-3" / "2.step").unlink()
    shutil.copytree(save / "2", save / "5")  # a numbered folder without its marker
    (save / "5" / "2.step").unlink()
    assert latest_checkpoint(save) == save / "2"
    t = make_trainer(make_cfg(save, total=2), tmp_path / "run")
    assert not (save / ".tmp-3").exists()  # stale temporary folders are cleaned at start
    assert t.ckpt.maybe_resume() and t.state.step_count == 2
    assert_identical(snapshot(t), saved[1])
    with pytest.raises(CheckpointError, match=re.escape(f"{save / '5'}: incomplete checkpoint")):
        t.ckpt.load(parse_load_info({"path": str(save / "5"), "content": ("all",)}))


def test_load_model_only_refreshes_masters(saved, tmp_path):
    t = make_trainer(make_cfg(tmp_path / "empty", load_ckpt_info=dict(
        path=f"local:{saved[0]}", content=("model",), ckpt_type="internevo")), tmp_path / "run")
    assert t.ckpt.maybe_resume()  # a run's save folder: its newest checkpoint (2)
    assert t.state.step_count == 0 and t.schedules.updates_done == 0
    assert_identical(snapshot(t)["model"], saved[1]["model"])
    masters = t.optimizer.state_dict()["params"]
    for name, p in t.model.named_parameters():
        assert torch.equal(masters[name]["master"], p.detach().float())
        assert not masters[name]["exp_avg"].any()
    missing = tmp_path / "nothing"
    with pytest.raises(CheckpointError, match=re.escape(f"ckpt.load_ckpt_info.path: {missing} "
                                                        "does not exist")):
        t.ckpt.load(parse_load_info({"path": str(missing)}))


# ------------------------------------------------------------------ keep-last-N and async


def assert_same_checkpoint(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert_identical(read_dcp(a), read_dcp(b))
    meta_a, meta_b = (json.loads((f / "meta.json").read_text()) for f in (a, b))
    meta_a.pop("saved_at"), meta_b.pop("saved_at")
    assert meta_a == meta_b
    for name in files:
        if name.endswith(".pt"):
            assert_identical(torch.load(a / name, weights_only=True),
                             torch.load(b / name, weights_only=True), name)
        elif name in ("config.py", "model_config.json") or name.endswith(".step"):
            assert (a / name).read_bytes() == (b / name).read_bytes()


def test_async_save_equals_sync_and_keep_last_n(data_folder, tmp_path):
    sync, asyn = tmp_path / "sync", tmp_path / "async"
    make_trainer(make_cfg(sync, total=3, data=data_folder, checkpoint_every=1),
                 tmp_path / "run1").fit()
    make_trainer(make_cfg(asyn, total=3, data=data_folder, checkpoint_every=1, async_save=True,
                          keep_last_n=2), tmp_path / "run2").fit()
    assert names(sync) == ["1", "2", "3"]
    assert names(asyn) == ["2", "3"]  # step 1 went once step 3 was complete
    for step in ("2", "3"):
        assert_same_checkpoint(sync / step, asyn / step)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("info, message", [
    (dict(path="x", content=("weights",)), "ckpt.load_ckpt_info.content: unknown content"),
    (dict(path="x", content=()), "ckpt.load_ckpt_info.content: names no content"),
    (dict(path="x", ckpt_type="megatron"), "ckpt.load_ckpt_info.ckpt_type: 'megatron'"),
    (dict(path="x", contents=("all",)), "ckpt.load_ckpt_info: unknown key 'contents'"),
    (dict(path="boto3:s3://bucket/ckpt"), "ckpt.load_ckpt_info.path: storage backend 'boto3'"),
    (dict(content=("all",)), "ckpt.load_ckpt_info.path is not set"),
    (dict(path="x", ckpt_type="hf", content=("all",)), "holds model weights only"),
])
def test_load_info_errors_name_the_key(info, message):
    with pytest.raises(CheckpointError, match=re.escape(message)):
        parse_load_info(info)


def test_paths():
    assert local_path("local:/a/b", "k") == Path("/a/b")
    assert local_path("rel/x", "k") == Path("rel/x")
    with pytest.raises(CheckpointError, match="ckpt.save_ckpt_folder: storage backend 'volc'"):
        local_path("volc:vc://bucket/x", "ckpt.save_ckpt_folder")


def test_truncated_or_corrupted_files_are_named(saved, tmp_path):
    ck = tmp_path / "2"
    shutil.copytree(saved[0] / "2", ck)
    t = make_trainer(make_cfg(tmp_path / "empty"), tmp_path / "run")
    request = parse_load_info({"path": str(ck), "content": "all"})
    data = (ck / "__0_0.distcp").read_bytes()
    (ck / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    distcp = re.escape(f"{ck / '__0_0.distcp'}: ")
    with pytest.raises(CheckpointError, match=distcp + ".*truncated"):
        t.ckpt.load(request)
    (ck / "__0_0.distcp").write_bytes(data)
    meta = (ck / "meta.json").read_bytes()
    (ck / "meta.json").write_bytes(b"#" * len(meta))  # same size: the checksum tells
    with pytest.raises(CheckpointError, match=re.escape(f"{ck / 'meta.json'}: checksum mismatch")):
        t.ckpt.load(request)
    (ck / "meta.json").write_bytes(meta)
    (ck / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"{ck / '.metadata'}: missing")):
        t.ckpt.load(request)


def test_other_model_shape_names_tensor_and_shapes(saved, tmp_path):
    t = make_trainer(make_cfg(tmp_path / "empty", model={"hidden_size": 64}, load_ckpt_info=dict(
        path=str(saved[0] / "2"), content=("model",))), tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"tensor 'model\.[\w.]+' has shape \(\d+, 32\) in "
                       r"the checkpoint but \(\d+, 64\) in this model.*hidden_size=32 \(now 64\)"):
        t.fit()


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    save = tmp_path / "ckpt"
    t = make_trainer(make_cfg(save, total=2, checkpoint_every=1), tmp_path / "run")
    real_write = dcp.FileSystemWriter.write_data

    def disk_full_at_step_2(self, plan, planner):
        if ".tmp-2" in str(self.path):
            raise OSError(28, "No space left on device")
        return real_write(self, plan, planner)

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", disk_full_at_step_2)
    with pytest.raises(CheckpointError, match=r"\.tmp-2 failed: .*No space left on device.*"
                                              "earlier checkpoints are untouched"):
        t.fit()
    assert latest_checkpoint(save) == save / "1"
    monkeypatch.undo()
    again = make_trainer(make_cfg(save, total=2), tmp_path / "run")
    assert again.ckpt.maybe_resume() and again.state.step_count == 1


def test_hf_folder_loads_and_bad_folders_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    from internevo.convert.hf_folder import export_hf

    t = make_trainer(make_cfg(tmp_path / "empty"), tmp_path / "run")
    weights = {k: v * 0.5 for k, v in t.model.state_dict().items()}
    hf = export_hf(weights, t.cfg, tmp_path / "hf", None, fmt="llama", dtype=torch.float32)
    t.ckpt.load(parse_load_info({"path": str(hf), "ckpt_type": "hf"}))
    assert_identical(snapshot(t)["model"], weights)
    masters = t.optimizer.state_dict()["params"]
    assert all(torch.equal(masters[k]["master"], weights[k]) for k in masters)

    bad = tmp_path / "hf-config"
    shutil.copytree(hf, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(CheckpointError, match=r"config\.json.*hidden_size"):
        t.ckpt.load(parse_load_info({"path": str(bad), "ckpt_type": "hf"}))

    bad = tmp_path / "hf-tensor"
    shutil.copytree(hf, bad)
    for f in bad.glob("*.safetensors"):
        tensors = load_file(f)
        tensors.pop("lm_head.weight", None)
        save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        t.ckpt.load(parse_load_info({"path": str(bad), "ckpt_type": "hf"}))


# ----------------------------------------------------------------------- two processes


def _two_rank_resume(rank, world, root):
    """Per rank: uninterrupted 3 steps vs async-saved stop at 2 (stop file) + auto-resume."""
    root = Path(root)
    ref = make_trainer(make_cfg(root / "ref", total=3, enable_save_ckpt=False), root / "run",
                       world, rank)
    losses = [r["loss"] for r in ref.fit()]
    cfg = make_cfg(root / "ckpt", total=3, async_save=True, stop_file_path=str(root / "stop"))
    first = make_trainer(cfg, root / "run", world, rank)
    if rank == 0:
        (root / "stop").write_text("2")
    head = [r["loss"] for r in first.fit()]
    second = make_trainer(make_cfg(root / "ckpt", total=3), root / "run", world, rank)
    tail = [r["loss"] for r in second.fit()]
    return losses, head + tail, snapshot(ref), snapshot(second)


def test_two_ranks_resume_and_load_into_one_process(tmp_path):
    results = spawn_ranks(_two_rank_resume, 2, str(tmp_path))
    for losses, resumed, ref_state, state in results:
        assert resumed == losses
        assert_identical(state, ref_state)
    assert names(tmp_path / "ckpt") == ["2", "3"]
    assert names(tmp_path / "ckpt" / "3" / "loader") == ["dp0.pt", "dp1.pt"]
    # the data-parallel checkpoint loads into one process (other zero1 / dp layout)
    one = make_trainer(make_cfg(tmp_path / "none", load_ckpt_info=dict(
        path=str(tmp_path / "ckpt" / "3"), content=("model", "optimizer"))), tmp_path / "run1")
    one.ckpt.maybe_resume()
    assert_identical(snapshot(one), results[0][3])
