"""Slow-rank diagnostics and cache flushes every ``data.empty_cache_and_diag_interval`` batches.

As InternEvo's ``empty_cache_and_diag``: every interval each rank's step time is all-gathered over
its data-parallel group, ranks slower than ``(1 + data.diag_outlier_ratio) x`` the group's mean
are reported with their global rank and host, and on CUDA ``torch.cuda.empty_cache()`` returns
the allocator's cached blocks.  The first rank of each data-parallel group writes the report (a
warning: it prints on every rank, tagged with its rank by the log setup of
:func:`internevo.launch.setup_logging`).  The gather runs after the step's metrics were taken, so
it never shows in a step's communication counts.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

import torch

from internevo.config import TrainConfig
from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout

log = logging.getLogger(__name__)
GROUP = "data"


@dataclass(frozen=True)
class SlowRank:
    """One rank whose step took longer than the threshold."""

    rank: int
    """Global rank."""
    host: str
    """Its host name."""
    seconds: float
    """Its step time."""
    mean: float
    """The data-parallel group's mean step time."""


def slow_ranks(times: list[float], ratio: float) -> list[int]:
    """Indices of the ``times`` above ``(1 + ratio) * mean``."""
    mean = sum(times) / len(times)
    return [i for i, t in enumerate(times) if t > (1.0 + ratio) * mean]


class StepDiagnostics:
    """Called after every training step; acts every ``interval`` batches (0: never)."""

    def __init__(self, cfg: TrainConfig, layout: ParallelLayout, comm: Comm,
                 device: torch.device) -> None:
        self.interval = cfg.data.empty_cache_and_diag_interval
        self.ratio = cfg.data.diag_outlier_ratio
        self.layout, self.comm, self.device = layout, comm, device
        self.members = layout.ranks(GROUP) if layout.data > 1 else [layout.rank]
        self._hosts: list[str] = []

    def after_step(self, batch_count: int, step_seconds: float) -> list[SlowRank]:
        """At every ``interval``-th batch: flush the CUDA cache, gather the step times of the
        data-parallel group and report (and return) its slow ranks; otherwise nothing."""
        if not self.interval or batch_count % self.interval:
            return []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        times = self._gather(step_seconds)
        mean = sum(times) / len(times)
        hosts = self.hosts()
        slow = [SlowRank(self.members[i], hosts[i], times[i], mean)
                for i in slow_ranks(times, self.ratio)]
        if slow and self.layout.rank == self.members[0]:
            log.warning("batch %d: slow data-parallel ranks (step time > %.2f x mean %.3fs): %s",
                        batch_count, 1.0 + self.ratio, mean,
                        ", ".join(f"rank {s.rank} on {s.host} {s.seconds:.3f}s" for s in slow))
        return slow

    def _gather(self, seconds: float) -> list[float]:
        """Every member's value (the data-parallel group's order)."""
        mine = torch.tensor([seconds], dtype=torch.float64, device=self.device)
        out = torch.empty(len(self.members), dtype=torch.float64, device=self.device)
        self.comm.all_gather(out, mine, GROUP)
        return out.tolist()

    def hosts(self) -> list[str]:
        """Host names of the group's members, gathered once (as fixed-width byte tensors)."""
        if not self._hosts:
            width = 64
            name = socket.gethostname().encode()[:width].ljust(width, b"\0")
            mine = torch.tensor(list(name), dtype=torch.uint8, device=self.device)
            out = torch.empty(width * len(self.members), dtype=torch.uint8, device=self.device)
            self.comm.all_gather(out, mine, GROUP)
            raw = bytes(out.cpu().tolist())
            self._hosts = [raw[i * width:(i + 1) * width].rstrip(b"\0").decode(errors="replace")
                           for i in range(len(self.members))]
        return self._hosts
