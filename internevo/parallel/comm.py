"""Every collective the framework issues goes through :class:`Comm`, which counts it.

The counter records, per (collective kind, group name), the number of calls and the *payload*
bytes: the size of the full tensor the collective is about — the reduced tensor for all-reduce and
broadcast, the unsharded input for reduce-scatter, the unsharded output for all-gather, the input
for all-to-all, the tensor sent or received for point-to-point (pipeline) transfers.  What a ring
implementation actually sends per rank follows from it (:func:`wire_bytes`).  A group of one rank
is a no-op and is not counted.

Collectives that PyTorch issues on our behalf are routed here too: FSDP2's all-gathers and
reduce-scatters run through :class:`Comm` via its custom-collective hooks, which pass FSDP's own
process group as ``process_group`` (same members as the named group, so they are counted under
that name); see ``parallel/fsdp.py``.  The bytes per step of every mode: docs/parallel.md.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from internevo.errors import PeerError, is_peer_loss, peer_loss_reason
from internevo.parallel.layout import ParallelLayout

_OPS = {
    "sum": dist.ReduceOp.SUM,
    "avg": dist.ReduceOp.AVG,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
}


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.50 KiB"``."""
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


Op = Union[str, Any]
"""A reduction: ``"sum" | "avg" | "max" | "min"`` or a ``torch.distributed.ReduceOp``."""


def _op(op: Op) -> Any:
    return _OPS[op] if isinstance(op, str) else op


def wire_bytes(kind: str, payload: int, group_size: int) -> float:
    """Bytes one rank sends for ``payload`` bytes in a ring implementation of ``kind``."""
    n = group_size
    factor = {"all_reduce": 2 * (n - 1) / n, "reduce_scatter": (n - 1) / n,
              "all_gather": (n - 1) / n, "broadcast": 1.0, "all_to_all": (n - 1) / n,
              "send": 1.0, "recv": 0.0}[kind]
    return payload * factor


class Comm:
    """Counting front-end for torch.distributed collectives over the layout's named groups."""

    def __init__(self, layout: ParallelLayout, device: Optional[torch.device] = None,
                 liveness: Any = None):
        self.layout = layout
        self.device = device
        """Where every communicated tensor must live (None: unchecked); NCCL rejects CPU tensors,
        so a buffer left on the CPU fails here with its collective and group named."""
        self.liveness = liveness
        """:class:`~internevo.parallel.liveness.Liveness` naming the silent ranks of a failed
        collective (None: the error names the group's members)."""
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)

    # ------------------------------------------------------------------------------ counting
    def _record(self, kind: str, group: str, tensor: torch.Tensor) -> None:
        if self.device is not None and tensor.device.type != self.device.type:
            raise RuntimeError(f"{kind} on group {group!r}: a {tuple(tensor.shape)} "
                               f"{tensor.dtype} tensor on {tensor.device}, but this run "
                               f"communicates on {self.device}")
        self.record(kind, group, tensor.numel() * tensor.element_size())

    def record(self, kind: str, group: str, nbytes: int) -> None:
        """Count one ``kind`` collective of ``nbytes`` payload on ``group`` that ran elsewhere.

        Used where PyTorch issues the collective itself and only lets us observe it (the
        all-reduce of FSDP2's hybrid sharding, seen through its all-reduce hook).
        """
        self.calls[(kind, group)] += 1
        self.bytes[(kind, group)] += nbytes

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
        """A table of calls, payload bytes and ring wire bytes (sent per rank) per collective
        and group, since the last reset, with a total line."""
        rows = [(kind, group, self.calls[(kind, group)], n,
                 wire_bytes(kind, n, self.layout.size(group)))
                for (kind, group), n in sorted(self.bytes.items())]
        rows.append(("total", "", sum(r[2] for r in rows), sum(r[3] for r in rows),
                     sum(r[4] for r in rows)))
        lines = [f"{'collective':<15}{'group':<15}{'calls':>7}{'payload':>13}{'wire/rank':>13}"]
        lines += [f"{kind:<15}{group:<15}{calls:>7}{human_bytes(n):>13}{human_bytes(w):>13}"
                  for kind, group, calls, n, w in rows]
        return "\n".join(lines)

    # ----------------------------------------------------------------------------- collectives
    def _group(self, name: str, process_group: Any = None) -> Any:
        """The process group to use: ``process_group`` if given (None when it has one member)."""
        if process_group is None:
            return self.layout.group(name)
        return process_group if process_group.size() > 1 else None

    def all_reduce(self, tensor: torch.Tensor, group: str, op: Op = "sum",
                   async_op: bool = False) -> Optional[dist.Work]:
        """In-place all-reduce of ``tensor`` over ``group``."""
        pg = self._group(group)
        if pg is None:
            return None
        self._record("all_reduce", group, tensor)
        return self._guard("all_reduce", group, async_op,
                           lambda: dist.all_reduce(tensor, op=_op(op), group=pg, async_op=async_op))

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, group: str,
                       op: Op = "sum", async_op: bool = False,
                       process_group: Any = None) -> Optional[dist.Work]:
        """Reduce ``input`` over ``group`` and keep this rank's equal slice in ``output``.

        ``process_group`` replaces the layout's group of that name (FSDP2 brings its own).
        """
        pg = self._group(group, process_group)
        if pg is None:
            output.copy_(input)
            return None
        self._record("reduce_scatter", group, input)
        return self._guard("reduce_scatter", group, async_op and process_group is None,
                           lambda: dist.reduce_scatter_single(output, input, op=_op(op), group=pg,
                                                              async_op=async_op))

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, group: str,
                   async_op: bool = False, process_group: Any = None) -> Optional[dist.Work]:
        """Concatenate every rank's ``input`` along dim 0 into ``output``."""
        pg = self._group(group, process_group)
        if pg is None:
            output.copy_(input)
            return None
        self._record("all_gather", group, output)
        return self._guard("all_gather", group, async_op and process_group is None,
                           lambda: dist.all_gather_single(output, input, group=pg,
                                                          async_op=async_op))

    def broadcast(self, tensor: torch.Tensor, group: str, src_in_group: int = 0) -> None:
        """Broadcast ``tensor`` from the group's ``src_in_group``-th member."""
        pg = self._group(group)
        if pg is None:
            return
        self._record("broadcast", group, tensor)
        src = self.layout.ranks(group)[src_in_group]
        self._guard("broadcast", group, False, lambda: dist.broadcast(tensor, src=src, group=pg))

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, group: str) -> None:
        """Equal-split all-to-all along dim 0 (over gloo, 16-bit dtypes travel as fp32: gloo's
        all-to-all in them gave wrong results on 4 ranks)."""
        pg = self._group(group)
        if pg is None:
            output.copy_(input)
            return
        self._record("all_to_all", group, input)
        if input.element_size() == 2 and dist.get_backend(pg) == "gloo":
            wide = torch.empty_like(output, dtype=torch.float32)
            self._guard("all_to_all", group, False,
                        lambda: dist.all_to_all_single(wide, input.float(), group=pg))
            output.copy_(wide)
            return
        self._guard("all_to_all", group, False,
                    lambda: dist.all_to_all_single(output, input, group=pg))

    def send(self, tensor: torch.Tensor, group: str, peer_in_group: int,
             process_group: Any = None) -> Optional[dist.Work]:
        """Asynchronous point-to-point send to the group's ``peer_in_group``-th member
        (``process_group``: another communicator over the same members, counted as ``group``)."""
        pg = self._group(group, process_group)
        if pg is None:
            return None
        self._record("send", group, tensor)
        return dist.isend(tensor, dst=self.layout.ranks(group)[peer_in_group], group=pg)

    def recv(self, tensor: torch.Tensor, group: str, peer_in_group: int,
             process_group: Any = None) -> None:
        """Point-to-point receive into ``tensor`` from the group's ``peer_in_group``-th member
        (blocks until it arrived; ``process_group`` as in :meth:`send`)."""
        pg = self._group(group, process_group)
        if pg is None:
            return
        self._record("recv", group, tensor)
        dist.recv(tensor, src=self.layout.ranks(group)[peer_in_group], group=pg)

    def barrier(self) -> None:
        """Barrier over the world (not counted: no payload)."""
        if self._group("world") is not None:
            self._guard("barrier", "world", False, dist.barrier)

    # ---------------------------------------------------------------------- lost peers
    def _guard(self, kind: str, group: str, watch: bool, fn: Any) -> Any:
        """Run the collective ``fn``; a lost peer becomes a :class:`PeerError` naming the
        collective, the group and the silent ranks (``watch``: also when waiting on its Work)."""
        try:
            work = fn()
        except RuntimeError as err:
            if not is_peer_loss(err):
                raise
            raise self.peer_error(kind, group, err) from err
        return _WatchedWork(work, self, kind, group) if watch and work is not None else work

    def peer_error(self, kind: str, group: str, err: RuntimeError) -> PeerError:
        """A lost peer (``err``) as one line: this rank, the collective, the group, the ranks
        that stopped answering."""
        members = self.layout.ranks(group)
        who = (self.liveness.silent(members) if self.liveness is not None
               else f"one of ranks {members} stopped answering")
        return PeerError(f"rank {self.layout.rank}: {kind} on group '{group}' (ranks "
                         f"{members}) {peer_loss_reason(err)}: {who}")


class _WatchedWork:
    """An asynchronous collective's Work whose ``wait`` turns a lost peer into a PeerError."""

    def __init__(self, work: Any, comm: Comm, kind: str, group: str):
        self.work, self.comm, self.kind, self.group = work, comm, kind, group

    def wait(self, *args: Any) -> Any:
        """Wait for the collective (a lost peer: :class:`PeerError`)."""
        try:
            return self.work.wait(*args)
        except RuntimeError as err:
            if not is_peer_loss(err):
                raise
            raise self.comm.peer_error(self.kind, self.group, err) from err

    def __getattr__(self, name: str) -> Any:
        return getattr(self.work, name)

