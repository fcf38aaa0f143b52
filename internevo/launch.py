"""Process start-up: torchrun / Slurm / single process -> rank, world, device, process group, seeds."""

from __future__ import annotations

import datetime
import os
import random
import re
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

DEFAULT_PORT = 8888


@dataclass
class LaunchInfo:
    """Where this process sits in the job."""

    rank: int
    """Global rank."""
    world_size: int
    """Number of processes."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    master_addr: str
    """Address of rank 0's rendezvous store."""
    master_port: int
    """Port of the rendezvous store."""


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list such as ``gpu[03-05,7],cpu1`` -> ``gpu03``."""
    match = re.match(r"([^\[,]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, bracket = match.group(1), match.group(3)
    if not bracket:
        return prefix
    first = bracket.split(",")[0].split("-")[0]
    return prefix + first


def read_launch_env(launcher: Optional[str], env: Mapping[str, str] = os.environ,
                    port: Optional[int] = None) -> LaunchInfo:
    """Read rank/world/master from the launcher's environment (single process when absent)."""
    if launcher == "slurm":
        missing = [k for k in ("SLURM_PROCID", "SLURM_NPROCS", "SLURM_JOB_NODELIST")
                   if k not in env and not (k == "SLURM_NPROCS" and "SLURM_NTASKS" in env)]
        if missing:
            raise RuntimeError(f"--launcher slurm: environment lacks {', '.join(missing)}; "
                               "start the job with srun")
        world = int(env.get("SLURM_NPROCS", env.get("SLURM_NTASKS")))
        return LaunchInfo(rank=int(env["SLURM_PROCID"]), world_size=world,
                          local_rank=int(env.get("SLURM_LOCALID", 0)),
                          master_addr=env.get("MASTER_ADDR", first_slurm_host(env["SLURM_JOB_NODELIST"])),
                          master_port=int(port or env.get("MASTER_PORT", DEFAULT_PORT)))
    if launcher not in (None, "torch"):
        raise ValueError(f"--launcher must be 'torch' or 'slurm', got {launcher!r}")
    # torchrun sets these; a plain `python train.py --launcher torch` runs as one process.
    return LaunchInfo(rank=int(env.get("RANK", 0)), world_size=int(env.get("WORLD_SIZE", 1)),
                      local_rank=int(env.get("LOCAL_RANK", 0)),
                      master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                      master_port=int(port or env.get("MASTER_PORT", DEFAULT_PORT)))


def pick_device(local_rank: int) -> torch.device:
    """The GPU of this local rank when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_process_group(info: LaunchInfo, device: torch.device, timeout_s: float = 1800) -> None:
    """NCCL with GPUs, gloo on CPU; nothing to do for a single process."""
    if info.world_size == 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                            init_method=f"tcp://{info.master_addr}:{info.master_port}",
                            timeout=datetime.timedelta(seconds=timeout_s))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) with one seed: the one RNG policy.

    Weights do not depend on it (each parameter has its own generator, see models/init.py), so
    the remaining randomness is dropout, which is seeded identically on every rank.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def shutdown() -> None:
    """Leave the process group cleanly (barrier first so no rank tears down early)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
