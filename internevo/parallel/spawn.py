"""Run a function on N real processes joined by a gloo process group (tests and benchmarks).

Each rank writes its result (or its traceback) to a file and leaves with ``os._exit`` after a
barrier, so that gloo's occasional abort during teardown cannot turn a finished run into a failure:
success is judged by the per-rank result files, never by exit codes alone.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable, rank: int, world: int, port: int, out_dir: str, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    path = Path(out_dir) / f"rank{rank}.pkl"
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                init_method=f"tcp://127.0.0.1:{port}")
        result = ("ok", fn(rank, world, *args))
        dist.barrier()
    except BaseException:  # report any failure to the parent, with its traceback
        result = ("error", traceback.format_exc())
    with open(path.with_suffix(".tmp"), "wb") as f:
        pickle.dump(result, f)
    os.replace(path.with_suffix(".tmp"), path)
    os._exit(0)


def spawn_ranks(fn: Callable[..., Any], world_size: int, *args: Any,
                timeout: float = 300.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return their results.

    ``fn`` must be importable (a module-level function).  Raises with the failing rank's
    traceback if any rank fails or does not report within ``timeout`` seconds.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, out_dir, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        files = [Path(out_dir) / f"rank{r}.pkl" for r in range(world_size)]
        while not all(f.exists() for f in files) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs):
                time.sleep(1.0)  # a rank died; give the others a moment to report, then stop
                break
            time.sleep(0.05)
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        return [_read_result(f, r) for r, f in enumerate(files)]


def _read_result(path: Path, rank: int) -> Any:
    if not path.exists():
        raise RuntimeError(f"rank {rank} did not report a result (crashed or timed out)")
    with open(path, "rb") as f:
        status, value = pickle.load(f)
    if status != "ok":
        raise RuntimeError(f"rank {rank} failed:\n{value}")
    return value
