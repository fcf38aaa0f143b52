"""Which ranks stopped answering: heartbeats in the job's rendezvous store.

gloo and NCCL say *that* a collective timed out or lost its connection, never *which* rank is to
blame (gloo names a socket address).  Every rank therefore counts a heartbeat in the rendezvous
store (``internevo/beat/<rank>``, one increment per :data:`INTERVAL_S` from a daemon thread)
and records its host and pid (``internevo/who/<rank>``).  When a collective fails,
:meth:`Liveness.silent` reads the counters of the group's other members twice, a few intervals
apart: a counter that did not move belongs to a rank that is stopped (SIGSTOP, a hung node) or
dead; on this host a dead one is told apart by its pid.  The store lives in rank 0's process,
so a store that does not answer means rank 0 is the one.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any, Optional

INTERVAL_S = 0.5
"""Seconds between two heartbeats of a rank."""
PROBE_S = 3 * INTERVAL_S
"""How long a failing rank watches the others' counters before naming the silent ones."""
REGISTER_S = 10.0
"""At most this long a rank waits at start for every other rank's host and pid."""
_BEAT, _WHO = "internevo/beat/", "internevo/who/"


class Liveness:
    """This rank's heartbeat and the check of the others' (one per process, after rendezvous)."""

    def __init__(self, store: Any, rank: int, world_size: int):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.host = socket.gethostname()
        self.who: dict[int, tuple[str, str]] = {}
        """rank -> (host, pid) of every rank seen in the store (read by the heartbeat thread,
        so a rank 0 that took the store with it can still be named)."""
        store.set(f"{_WHO}{rank}", f"{self.host} {os.getpid()}")
        store.add(f"{_BEAT}{rank}", 1)
        self._wait_for_everyone()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="internevo-heartbeat",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def connect(cls, addr: str, port: int, rank: int, world_size: int,
                timeout_s: float) -> Optional[Liveness]:
        """A heartbeat over a new client of the store at ``addr:port`` (None if unreachable)."""
        import torch.distributed as dist

        try:
            store = dist.TCPStore(addr, port, is_master=False, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=max(timeout_s, 1.0)))
            return cls(store, rank, world_size)
        except (RuntimeError, OSError):
            return None

    def _wait_for_everyone(self) -> None:
        """Learn every rank's host and pid now (they register right after rendezvous), so a
        rank 0 stopped before the first heartbeat can still be named; bounded by
        :data:`REGISTER_S`, after which the heartbeat keeps looking."""
        keys = [f"{_WHO}{r}" for r in range(self.world_size)]
        try:
            self.store.wait(keys, datetime.timedelta(seconds=REGISTER_S))
        except (RuntimeError, OSError):  # late ranks: the heartbeat thread learns them
            pass
        self._learn_who()

    def _beat(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            try:
                self.store.add(f"{_BEAT}{self.rank}", 1)
                self._learn_who()
            except (RuntimeError, OSError):  # the store (rank 0) is gone: nothing to tell
                return

    def _learn_who(self) -> None:
        """Read the host and pid of the ranks that have registered since the last beat."""
        for r in range(self.world_size):
            if r not in self.who and self.store.check([f"{_WHO}{r}"]):
                host, _, pid = self.store.get(f"{_WHO}{r}").decode().partition(" ")
                self.who[r] = (host, pid)

    def close(self) -> None:
        """Stop beating (the others will then see this rank as silent)."""
        self._stop.set()

    def silent(self, members: Iterable[int]) -> str:
        """Which of ``members`` (other than this rank) stopped answering, as words.

        Takes about :data:`PROBE_S`; a store that does not answer within 1.5 s more (a stopped
        rank 0 keeps its sockets open, so reads block) names rank 0.
        """
        others = [r for r in members if r != self.rank]
        found: list[str] = []
        probe = threading.Thread(target=self._probe, args=(others, found), daemon=True)
        probe.start()
        probe.join(PROBE_S + 1.5)
        if not found:
            return f"{self._what(0)} (it hosts the rendezvous store, which does not answer)"
        return found[0] or f"every other member ({_ranks(others)}) still answers"

    def _probe(self, others: list[int], found: list[str]) -> None:
        try:
            before = {r: self.store.add(f"{_BEAT}{r}", 0) for r in others}
            time.sleep(PROBE_S)
            silent = [r for r in others if self.store.add(f"{_BEAT}{r}", 0) == before[r]]
            found.append("; ".join(self._what(r) for r in silent))
        except (RuntimeError, OSError):
            return

    def _what(self, rank: int) -> str:
        """``rank 1 (pid 42 on host h) has exited`` or ``... stopped answering``."""
        host, pid = self.who.get(rank, ("an unknown host", "unknown"))
        state = "stopped answering"
        if host == self.host and pid.isdigit() and not process_alive(int(pid)):
            state = "has exited"
        return f"rank {rank} (pid {pid} on {host}) {state}"


def process_alive(pid: int) -> bool:
    """A process ``pid`` exists on this host and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _ranks(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)
