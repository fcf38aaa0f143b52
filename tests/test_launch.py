"""Launch environments (torchrun, Slurm, none), backend choice, timeout, seeds; one torchrun job."""

from __future__ import annotations

import datetime
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from internevo import launch
from internevo.launch import (
    LaunchError,
    LaunchInfo,
    choose_backend,
    expand_slurm_nodelist,
    first_slurm_host,
    read_launch_env,
    seed_everything,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[03-05,7]", ["gpu03", "gpu04", "gpu05", "gpu7"]),
    ("node01", ["node01"]),
    ("gpu[08-10],cpu1", ["gpu08", "gpu09", "gpu10", "cpu1"]),
    ("a[1,3]x,b", ["a1x", "a3x", "b"]),
])
def test_expand_slurm_nodelist(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts
    assert first_slurm_host(nodelist) == hosts[0]


def test_bad_nodelist_is_rejected():
    with pytest.raises(LaunchError, match="gpu\\[a-b\\]"):
        expand_slurm_nodelist("gpu[a-b]")


SLURM = {"SLURM_PROCID": "5", "SLURM_NPROCS": "8", "SLURM_LOCALID": "1",
         "SLURM_JOB_NODELIST": "gpu[03-05,7]"}


def test_slurm_env():
    info = read_launch_env("slurm", env=SLURM)
    assert info == LaunchInfo(rank=5, world_size=8, local_rank=1, master_addr="gpu03",
                              master_port=8888)


def test_slurm_ntasks_master_and_port_overrides():
    env = {k: v for k, v in SLURM.items() if k != "SLURM_NPROCS"}
    env.update(SLURM_NTASKS="8", MASTER_ADDR="10.0.0.1", MASTER_PORT="1234")
    info = read_launch_env("slurm", env=env)
    assert (info.world_size, info.master_addr, info.master_port) == (8, "10.0.0.1", 1234)
    assert read_launch_env("slurm", env=env, port=4321).master_port == 4321


def test_slurm_missing_vars_are_named():
    env = {"SLURM_PROCID": "0"}
    with pytest.raises(LaunchError, match="SLURM_NPROCS .*SLURM_JOB_NODELIST.*srun"):
        read_launch_env("slurm", env=env)


def test_torchrun_env():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "host",
           "MASTER_PORT": "29500"}
    assert read_launch_env("torch", env=env) == LaunchInfo(3, 4, 1, "host", 29500)


def test_no_launcher_env_is_one_process():
    assert read_launch_env("torch", env={}).world_size == 1
    assert read_launch_env(None, env={}).rank == 0


@pytest.mark.parametrize("env, message", [
    ({"RANK": "1", "WORLD_SIZE": "2"}, "lacks MASTER_ADDR, MASTER_PORT"),
    ({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     "rank 4 is outside the world of 4"),
])
def test_inconsistent_torch_env(env, message):
    with pytest.raises(LaunchError, match=message):
        read_launch_env("torch", env=env)


def test_unknown_launcher():
    with pytest.raises(LaunchError, match="'mpi'"):
        read_launch_env("mpi", env={})


def test_backend_follows_device():
    assert choose_backend(torch.device("cpu")) == "gloo"
    assert choose_backend(torch.device("cuda", 0)) == "nccl"


def test_process_group_gets_backend_and_timeout(monkeypatch):
    seen = {}
    monkeypatch.setattr(launch.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(launch.dist, "init_process_group", lambda **kw: seen.update(kw))
    launch.init_process_group(LaunchInfo(1, 2, 1, "h", 9), torch.device("cpu"), timeout_s=42)
    assert seen["backend"] == "gloo" and seen["init_method"] == "tcp://h:9"
    assert seen["timeout"] == datetime.timedelta(seconds=42)
    assert (seen["rank"], seen["world_size"]) == (1, 2)


def test_single_process_needs_no_process_group(monkeypatch):
    monkeypatch.setattr(launch.dist, "init_process_group", lambda **kw: pytest.fail("called"))
    launch.init_process_group(LaunchInfo(0, 1, 0, "h", 9), torch.device("cpu"))


def test_seed_everything_is_one_policy():
    def draw():
        return random.random(), float(np.random.rand()), torch.rand(1).item()

    seed_everything(7)
    first = draw()
    seed_everything(7)
    assert draw() == first


CONFIG = """
model_type = "INTERNLM2_PUBLIC"
data = dict(seq_len=32, micro_bsz=1, micro_num=2, total_steps=2, num_worker=0)
model = dict(num_layers=1, hidden_size=32, num_attention_heads=4, num_kv_attention_heads=2,
             vocab_size=256, multiple_of=16, dtype="torch.float32")
ckpt = dict(enable_save_ckpt=False)
enable_tb = False
parallel = dict(zero1=-1)
"""


def test_torchrun_job_with_comm_report(tmp_path):
    """``torchrun train.py --launcher torch``: 2 gloo ranks train and print the byte table.

    Success is read from the output (gloo may abort during teardown after all work is done).
    """
    config = tmp_path / "tiny.py"
    config.write_text(CONFIG)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "train.py"), "--config", str(config), "--launcher", "torch",
           "--run-dir", str(tmp_path / "run"), "--comm-report"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = out.stdout + out.stderr
    assert "world=2 dp=2" in text, text
    assert "batch 2/2" in text, text
    for row in ("reduce_scatter", "all_gather", "zero1"):
        assert row in text, text
