"""A run owns its save folder: ``<save_ckpt_folder>/.lock`` names the holder.

The lock file holds the host, pid, job name and start time of the run that writes the folder.
A second run on the same folder is refused at start with those details; a lock left by a dead
process (same host, pid gone) is taken over with a warning; one from another host is never
taken over (its process cannot be checked from here: the message says how to release it).
The holding process may take its own lock again (several trainers in one process, as in tests).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

from internevo.checkpoint.format import CheckpointError
from internevo.parallel.liveness import process_alive

LOCK_FILE = ".lock"
log = logging.getLogger(__name__)


class FolderLock:
    """The lock of one save folder held by this process (released by :meth:`release`)."""

    def __init__(self, folder: Path, job: str):
        self.folder = folder
        self.path = folder / LOCK_FILE
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "job": job,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    @classmethod
    def acquire(cls, folder: Path, job: str) -> FolderLock:
        """Take the lock of ``folder`` (created if needed) or raise :class:`CheckpointError`
        naming the run that holds it."""
        lock = cls(folder, job)
        folder.mkdir(parents=True, exist_ok=True)
        if not lock._create():
            holder = lock.holder()
            if holder is not None and not lock._takeable(holder):
                raise CheckpointError(
                    f"ckpt.save_ckpt_folder={str(folder)!r} is in use by another run: "
                    f"{_describe(holder)} (lock file {lock.path}); wait for it to end, choose "
                    "another folder, or delete the lock file if that run is gone")
            if holder is not None and holder.get("pid") != os.getpid():
                log.warning("%s: taking over the lock of %s, which has exited", folder,
                            _describe(holder))
            lock._write()
        atexit.register(lock.release)
        return lock

    def _create(self) -> bool:
        """Create the lock file if there is none (atomically); False when one exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.record, f)
        return True

    def _write(self) -> None:
        """Replace a stale lock by ours (atomic rename), then check that ours is the one there
        (two runs taking over the same stale lock: the later rename wins, the other is refused).
        """
        tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps(self.record))
        os.replace(tmp, self.path)
        holder = self.holder()
        if holder != self.record:
            raise CheckpointError(f"ckpt.save_ckpt_folder={str(self.folder)!r}: another run "
                                  f"took it at the same moment: {_describe(holder or {})}")

    def _takeable(self, holder: dict) -> bool:
        """This process holds it already, or its holder ran on this host and has exited."""
        same_host = holder.get("host") == self.record["host"]
        pid = holder.get("pid")
        if not same_host or not isinstance(pid, int):
            return False
        return pid == os.getpid() or not process_alive(pid)

    def holder(self) -> Optional[dict]:
        """The record in the lock file (None: no lock file; ``{}``: unreadable)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            return {}
        return record if isinstance(record, dict) else {}

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        if self.holder() == self.record:
            self.path.unlink(missing_ok=True)


def _describe(holder: dict) -> str:
    return (f"job {holder.get('job', '?')!r}, pid {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')}, started {holder.get('started', '?')}")
