"""Reliability suite, multi-process part: signals, two runs on one folder, a stopped or killed
peer, and the collective timeout on every process group.  ``train.py`` runs as child
processes (2 ranks join through MASTER_ADDR/PORT without torchrun), as a scheduler would start
them; each case checks the exit code, the one ``internevo:`` line and protected files.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from reliability_helpers import (
    error_line,
    free_port,
    train_process,
    tree_hash,
    wait_for_line,
    write_config,
)

from internevo.parallel.spawn import spawn_ranks

TIMEOUT_S = 5.0
"""``--timeout`` of the peer-loss cases; every other rank must leave within it + 5 s."""
LONG = "data.total_steps=100000"


def saving(folder: Path, every: int = 1) -> str:
    ck = dict(enable_save_ckpt=True, save_ckpt_folder=str(folder), checkpoint_every=every,
              auto_resume=False)
    return f"ckpt={ck!r}"


def test_second_run_refused_then_sigterm_saves_first(tmp_path):
    config = write_config(tmp_path / "tiny.py")
    folder = tmp_path / "ckpt"
    first = train_process(config, tmp_path / "a", LONG, saving(folder, every=2))
    wait_for_line(first, "[internevo] checkpoint: saved step 2")
    kept = tree_hash(folder / "2")
    second = train_process(config, tmp_path / "b", LONG, saving(folder))
    out, err = second.communicate(timeout=120)
    error_line(second.returncode, err, 2, "in use by another run", f"pid {first.pid}")
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=120)
    line = error_line(first.returncode, err, 128 + signal.SIGTERM, "interrupted: SIGTERM after",
                      "saved step")
    assert tree_hash(folder / "2") == kept  # byte-identical after the second run and the stop
    saved = Path(line.rsplit(" to ", 1)[1])
    assert (saved / f"{saved.name.split('.')[0]}.step").is_file()
    assert not (folder / ".lock").exists()


def test_sigint_without_saving_says_so(tmp_path):
    config = write_config(tmp_path / "tiny.py")
    proc = train_process(config, tmp_path / "a", LONG)
    wait_for_line(proc, "step")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    error_line(proc.returncode, err, 130, "interrupted: SIGINT after", "no checkpoint saved")
    assert "KeyboardInterrupt" not in err


def test_second_signal_exits_at_once(tmp_path):
    config = write_config(tmp_path / "tiny.py")  # long steps: the second signal lands in one
    proc = train_process(config, tmp_path / "a", LONG, "data.micro_num=256",
                         saving(tmp_path / "ckpt", every=10**6))
    wait_for_line(proc, "step")
    proc.send_signal(signal.SIGTERM)
    assert proc.stderr.readline().startswith("[internevo] received SIGTERM")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    error_line(proc.returncode, err, 128 + signal.SIGTERM, "second SIGTERM", "without saving")


@pytest.mark.parametrize("fault,victim", [("stop", 1), ("kill", 1), ("stop", 0)])
def test_lost_peer_ends_the_other_rank_naming_it(fault, victim, tmp_path):
    """SIGSTOP (a hung node) or SIGKILL one of two ranks: the other leaves within --timeout + 5 s
    with a line naming the rank, the collective and the group."""
    config = write_config(tmp_path / "tiny.py")
    port = free_port()
    procs = [train_process(config, tmp_path / f"r{r}", LONG, rank=r, world=2, port=port,
                           timeout=TIMEOUT_S) for r in range(2)]
    try:
        wait_for_line(procs[0], "step")
        start = time.monotonic()
        os.kill(procs[victim].pid, signal.SIGSTOP if fault == "stop" else signal.SIGKILL)
        other = procs[1 - victim]
        out, err = other.communicate(timeout=TIMEOUT_S + 60)
        elapsed = time.monotonic() - start
    finally:
        for p in procs:
            p.kill()
            p.wait()
    state = "stopped answering" if fault == "stop" else "has exited"
    line = error_line(other.returncode, err, 1, f"peer lost: rank {1 - victim}: ",
                      f"rank {victim} (pid {procs[victim].pid}", state, "on group '")
    print(f"\n{fault} rank {victim}: rank {1 - victim} left after {elapsed:.1f}s "
          f"(--timeout {TIMEOUT_S:g}): {line}")
    assert elapsed < TIMEOUT_S + 30  # generous on a shared machine; the printed time is the fact


def _group_timeouts(rank: int, world: int, timeout_s: float) -> dict[str, float]:
    """Timeout of the layout's groups and of a group made later by other code (DeviceMesh,
    libraries) without a timeout of its own, on this rank."""
    import torch
    import torch.distributed as dist

    from internevo.launch import set_default_timeout
    from internevo.parallel.layout import ParallelLayout

    set_default_timeout(timeout_s)  # what init_process_group(--timeout) does
    layout = ParallelLayout(world_size=world, rank=rank, zero1=2).build_groups(timeout_s)
    groups = {name: g for name, g in layout.groups.items() if name != "world"}
    groups["later new_group()"] = dist.new_group([0, 1])
    cpu = torch.device("cpu")
    return {name: g._get_backend(cpu).options._timeout.total_seconds()
            for name, g in groups.items()}


def test_every_group_gets_the_timeout():
    for per_rank in spawn_ranks(_group_timeouts, 2, 7.0, timeout=120):
        assert set(per_rank) == {"data", "zero1", "later new_group()"}
        assert set(per_rank.values()) == {7.0}, per_rank


def test_a_rank_that_never_starts_is_one_line(tmp_path):
    """Rank 0 of 2 started alone: the rendezvous times out after --timeout with one line."""
    config = write_config(tmp_path / "tiny.py")
    proc = train_process(config, tmp_path / "r0", rank=0, world=2, port=free_port(), timeout=2)
    out, err = proc.communicate(timeout=120)
    error_line(proc.returncode, err, 1, "launch error: the rendezvous failed", "1/2",
               "within --timeout")
