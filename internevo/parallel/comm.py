"""Every collective the framework issues goes through :class:`Comm`, which counts it.

The counter records, per (collective kind, group name), the number of calls and the *payload*
bytes: the size of the full tensor the collective is about — the reduced tensor for all-reduce and
broadcast, the unsharded input for reduce-scatter, the unsharded output for all-gather, the input
for all-to-all.  What a ring implementation actually sends per rank follows from it
(:func:`wire_bytes`).  A group of one rank is a no-op and is not counted.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
import torch.distributed as dist

from internevo.parallel.layout import ParallelLayout

_OPS = {
    "sum": dist.ReduceOp.SUM,
    "avg": dist.ReduceOp.AVG,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
}


def wire_bytes(kind: str, payload: int, group_size: int) -> float:
    """Bytes one rank sends for ``payload`` bytes in a ring implementation of ``kind``."""
    n = group_size
    factor = {"all_reduce": 2 * (n - 1) / n, "reduce_scatter": (n - 1) / n,
              "all_gather": (n - 1) / n, "broadcast": 1.0, "all_to_all": (n - 1) / n}[kind]
    return payload * factor


class Comm:
    """Counting front-end for torch.distributed collectives over the layout's named groups."""

    def __init__(self, layout: ParallelLayout):
        self.layout = layout
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)

    # ------------------------------------------------------------------------------ counting
    def _record(self, kind: str, group: str, tensor: torch.Tensor) -> None:
        self.calls[(kind, group)] += 1
        self.bytes[(kind, group)] += tensor.numel() * tensor.element_size()

    def reset(self) -> None:
        """Forget the counts (called at the start of each step)."""
        self.calls.clear()
        self.bytes.clear()

    def snapshot(self) -> dict[str, int]:
        """Counts since the last reset as flat ``{"comm/<kind>/<group>/bytes": n, ...}``."""
        out = {}
        for (kind, group), n in sorted(self.bytes.items()):
            out[f"comm/{kind}/{group}/bytes"] = n
            out[f"comm/{kind}/{group}/calls"] = self.calls[(kind, group)]
        return out

    def total_bytes(self) -> int:
        """Payload bytes of every counted collective since the last reset."""
        return sum(self.bytes.values())

    def report(self) -> str:
        """A table of calls, payload bytes and ring wire bytes per collective and group."""
        lines = [f"{'collective':<15}{'group':<15}{'calls':>7}{'payload MB':>13}{'wire MB':>11}"]
        for (kind, group), n in sorted(self.bytes.items()):
            wire = wire_bytes(kind, n, self.layout.size(group))
            lines.append(f"{kind:<15}{group:<15}{self.calls[(kind, group)]:>7}"
                         f"{n / 2**20:>13.3f}{wire / 2**20:>11.3f}")
        return "\n".join(lines)

    # ----------------------------------------------------------------------------- collectives
    def _group(self, name: str):
        return self.layout.group(name)

    def all_reduce(self, tensor: torch.Tensor, group: str, op: str = "sum",
                   async_op: bool = False) -> Optional[dist.Work]:
        """In-place all-reduce of ``tensor`` over ``group``."""
        pg = self._group(group)
        if pg is None:
            return None
        self._record("all_reduce", group, tensor)
        return dist.all_reduce(tensor, op=_OPS[op], group=pg, async_op=async_op)

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, group: str,
                       op: str = "sum", async_op: bool = False) -> Optional[dist.Work]:
        """Reduce ``input`` over ``group`` and keep this rank's equal slice in ``output``."""
        pg = self._group(group)
        if pg is None:
            output.copy_(input)
            return None
        self._record("reduce_scatter", group, input)
        return dist.reduce_scatter_tensor(output, input, op=_OPS[op], group=pg, async_op=async_op)

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, group: str,
                   async_op: bool = False) -> Optional[dist.Work]:
        """Concatenate every rank's ``input`` along dim 0 into ``output``."""
        pg = self._group(group)
        if pg is None:
            output.copy_(input)
            return None
        self._record("all_gather", group, output)
        return dist.all_gather_into_tensor(output, input, group=pg, async_op=async_op)

    def broadcast(self, tensor: torch.Tensor, group: str, src_in_group: int = 0) -> None:
        """Broadcast ``tensor`` from the group's ``src_in_group``-th member."""
        pg = self._group(group)
        if pg is None:
            return
        self._record("broadcast", group, tensor)
        dist.broadcast(tensor, src=self.layout.ranks(group)[src_in_group], group=pg)

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, group: str) -> None:
        """Equal-split all-to-all along dim 0."""
        pg = self._group(group)
        if pg is None:
            output.copy_(input)
            return
        self._record("all_to_all", group, input)
        dist.all_to_all_single(output, input, group=pg)

    def barrier(self) -> None:
        """Barrier over the world (not counted: no payload)."""
        if self._group("world") is not None:
            dist.barrier()
