"""Process start-up: torchrun / Slurm / single process -> rank, world, device, process group, seeds.

* ``--launcher torch``: ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR`` and ``MASTER_PORT``; with none of them the job is a single process.
* ``--launcher slurm``: ``srun … python train.py --config … --launcher slurm``: rank from
  ``SLURM_PROCID``, world from ``SLURM_NPROCS`` (or ``SLURM_NTASKS``), local rank from
  ``SLURM_LOCALID``, master address = the first host of ``SLURM_JOB_NODELIST`` (``MASTER_ADDR``
  wins when set), port from ``--port``, else ``MASTER_PORT``, else 8888 (InternEvo's default).

The backend follows the device: NCCL when a GPU is visible, gloo on CPU.  Collectives time out
after ``--timeout`` seconds (InternEvo: 1800).  One RNG policy: :func:`seed_everything` seeds
Python, NumPy and torch with the same seed on every rank; weights do not depend on it.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from internevo.config import TrainConfig
from internevo.errors import InternEvoError

DEFAULT_PORT = 8888
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


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


class LaunchError(InternEvoError, RuntimeError):
    """The launcher's environment is incomplete or inconsistent."""

    kind = "launch error"


# ------------------------------------------------------------------------------------------
# Slurm node lists


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """All hosts of a Slurm node list: ``gpu[03-05,7],cpu1`` -> gpu03 gpu04 gpu05 gpu7 cpu1.

    Zero padding of a range is kept (``[08-10]`` -> 08 09 10), as ``scontrol show hostnames``.
    """
    hosts = []
    for prefix, bracket, rest in re.findall(r"([^,\[]+)(?:\[([^\]]+)\])?([^,\[]*)",
                                            nodelist.strip()):
        if not bracket:
            hosts.append(prefix + rest)
            continue
        for part in bracket.split(","):
            match = _RANGE.match(part)
            if match is None:
                raise LaunchError(f"cannot parse SLURM node list {nodelist!r} at {part!r}")
            lo, hi = match.group(1), match.group(2) or match.group(1)
            hosts.extend(f"{prefix}{str(i).zfill(len(lo))}{rest}"
                         for i in range(int(lo), int(hi) + 1))
    if not hosts:
        raise LaunchError(f"cannot parse SLURM node list {nodelist!r}")
    return hosts


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list such as ``gpu[03-05,7],cpu1`` -> ``gpu03``."""
    return expand_slurm_nodelist(nodelist)[0]


# ------------------------------------------------------------------------------------------
# environment


def read_launch_env(launcher: Optional[str], env: Mapping[str, str] = os.environ,
                    port: Optional[int] = None) -> LaunchInfo:
    """Read rank/world/master from the launcher's environment (single process when absent)."""
    if launcher == "slurm":
        info = _slurm_info(env, port)
    elif launcher in (None, "torch"):
        info = _torch_info(env, port)
    else:
        raise LaunchError(f"--launcher must be 'torch' or 'slurm', got {launcher!r}")
    if not 0 <= info.rank < info.world_size:
        raise LaunchError(f"rank {info.rank} is outside the world of {info.world_size} processes")
    return info


def _slurm_info(env: Mapping[str, str], port: Optional[int]) -> LaunchInfo:
    nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST"))
    world = env.get("SLURM_NPROCS", env.get("SLURM_NTASKS"))
    missing = [name for name, value in (("SLURM_PROCID", env.get("SLURM_PROCID")),
                                        ("SLURM_NPROCS (or SLURM_NTASKS)", world),
                                        ("SLURM_JOB_NODELIST", nodelist)) if value is None]
    if missing:
        raise LaunchError(f"--launcher slurm: environment lacks {', '.join(missing)}; "
                          "start the job with srun")
    return LaunchInfo(rank=int(env["SLURM_PROCID"]), world_size=int(world),
                      local_rank=int(env.get("SLURM_LOCALID", 0)),
                      master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodelist),
                      master_port=int(port or env.get("MASTER_PORT", DEFAULT_PORT)))


def _torch_info(env: Mapping[str, str], port: Optional[int]) -> LaunchInfo:
    present = [name for name in TORCHRUN_VARS if name in env]
    if not present:  # `python train.py` without a launcher: one process
        return LaunchInfo(0, 1, 0, "127.0.0.1", int(port or DEFAULT_PORT))
    missing = [name for name in TORCHRUN_VARS if name not in env]
    if missing and int(env.get("WORLD_SIZE", 1)) > 1:
        raise LaunchError(f"--launcher torch: environment has {', '.join(present)} but lacks "
                          f"{', '.join(missing)}; start the job with torchrun")
    return LaunchInfo(rank=int(env.get("RANK", 0)), world_size=int(env.get("WORLD_SIZE", 1)),
                      local_rank=int(env.get("LOCAL_RANK", 0)),
                      master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                      master_port=int(port or env.get("MASTER_PORT", DEFAULT_PORT)))


# ------------------------------------------------------------------------------------------
# device, process group, seeds


def pick_device(local_rank: int) -> torch.device:
    """The GPU of this local rank when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def choose_backend(device: torch.device) -> str:
    """NCCL for GPUs, gloo for CPUs."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(info: LaunchInfo, device: torch.device, timeout_s: float = 1800) -> None:
    """Join the job's process group (nothing to do for a single process).

    ``timeout_s`` bounds every collective: a rank that waits longer fails instead of hanging.
    """
    if info.world_size == 1 or dist.is_initialized():
        return
    set_default_timeout(timeout_s)
    dist.init_process_group(backend=choose_backend(device), rank=info.rank,
                            world_size=info.world_size,
                            init_method=f"tcp://{info.master_addr}:{info.master_port}",
                            timeout=datetime.timedelta(seconds=timeout_s))


def apply_backend_flags(cfg: TrainConfig, device: torch.device) -> None:
    """``cudnn_deterministic`` / ``cudnn_benchmark`` -> ``torch.backends.cudnn`` (on CUDA; the
    flags mean nothing to the CPU backends, which are left alone)."""
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = cfg.cudnn_deterministic
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark


class _RankFormatter(logging.Formatter):
    """``[internevo] msg`` on the log rank, ``[internevo][rank N] msg`` elsewhere; the level is
    named from WARNING up."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname}: "
        return f"{self.prefix} {level}{record.getMessage()}"


def setup_logging(rank: int, is_log_rank: bool) -> logging.Handler:
    """The one log setup of a run: the ``internevo`` loggers print to stdout, INFO and up on the
    log rank, WARNING and up on the others (tagged ``[rank N]``).  Calling it again replaces the
    handler; returns it."""
    logger = logging.getLogger("internevo")
    for old in [h for h in logger.handlers if getattr(h, "internevo_run", False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler(sys.stdout)
    handler.internevo_run = True
    handler.setLevel(logging.INFO if is_log_rank else logging.WARNING)
    handler.setFormatter(_RankFormatter("[internevo]" if is_log_rank else
                                        f"[internevo][rank {rank}]"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def set_default_timeout(timeout_s: float) -> None:
    """Make ``timeout_s`` the timeout of every process group created without one (DeviceMesh's
    groups, those of libraries): PyTorch's default is 30 minutes whatever the world group has."""
    from torch.distributed import distributed_c10d

    timeout = datetime.timedelta(seconds=timeout_s)
    distributed_c10d.default_pg_timeout = timeout
    if isinstance(getattr(distributed_c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        distributed_c10d.default_pg_nccl_timeout = timeout


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) with one seed: the one RNG policy.

    Weights do not depend on it (each parameter has its own generator, see models/init.py), so
    the remaining randomness is dropout, which is seeded identically on every rank.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def start_liveness(info: LaunchInfo, timeout_s: float) -> Any:
    """This rank's heartbeat in the rendezvous store, so that a failed collective can name the
    ranks that stopped answering (None for a single process)."""
    if info.world_size == 1:
        return None
    from internevo.parallel.liveness import Liveness

    return Liveness.connect(info.master_addr, info.master_port, info.rank, info.world_size,
                            timeout_s)


def shutdown() -> None:
    """Leave the process group cleanly (barrier first so no rank tears down early)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
