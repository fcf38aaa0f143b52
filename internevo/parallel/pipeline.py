"""Pipeline parallel (spec §3.7): layer partition, stage models, 1F1B / interleaved schedules.

A schedule is a plain list of :class:`Action` (forward or backward of one model chunk on one
micro-batch) per pipeline rank, computed by :func:`one_f_one_b`, :func:`interleaved` or
:func:`forward_only`.  :class:`PipelineRunner` executes such a list: it receives the input
activation of a forward (or the output gradient of a backward) from the neighbouring stage, runs
the trainer's callback, and sends the result on.  Every send and receive goes through
:class:`~internevo.parallel.comm.Comm` (counted as ``send`` / ``recv`` on the ``pipeline`` group).

Sends are asynchronous and waited for at the end of the step; receives block only when their
tensor is needed.  Messages are matched by order, as NCCL does (no tags): on every directed
channel (stage a -> stage b) the sender posts its activations and gradients in exactly the order
the receiver posts its receives (``test_every_channel_is_ordered_alike_at_both_ends``).  Messages
to a higher pipeline rank use the ``pipeline`` group, to a lower one ``pipeline_reverse`` (same
members, its own communicator), so that on NCCL a send never queues behind a receive from the
same peer on one stream (two stages sending to each other at once would otherwise wait forever).

Each rank holds one model (:func:`split_model`): the single-device module tree with only the
blocks of its chunks (kept under their global indices, so parameter names and checkpoints do not
depend on the pipeline size), the embedding on the first stage, the final norm and head on the
last.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from internevo.config import TrainConfig
from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout


# --------------------------------------------------------------------------------- partition
def partition(num_layers: int, pp: int, chunks: int = 1) -> list[list[range]]:
    """``parts[rank][chunk]``: the global layer indices of each (rank, chunk), InternEvo's split.

    Chunk ``c`` covers layers ``[c*n, (c+1)*n)`` with ``n = num_layers / chunks``; they are cut
    over the ``pp`` ranks in order, ``n // pp`` each, the *last* ``n % pp`` ranks one more.
    """
    if num_layers % chunks or num_layers // chunks < pp:
        raise ValueError(f"model.num_layers={num_layers} cannot be split into model.num_chunks="
                         f"{chunks} chunks of at least pipeline.size={pp} layers each")
    n = num_layers // chunks
    base, extra = divmod(n, pp)
    parts: list[list[range]] = [[] for _ in range(pp)]
    for c in range(chunks):
        start = c * n
        for r in range(pp):
            size = base + (r >= pp - extra)
            parts[r].append(range(start, start + size))
            start += size
    return parts


@dataclass(frozen=True)
class Chunk:
    """One model chunk of this rank: which blocks it runs and whether it embeds or ends."""

    index: int
    """Chunk index on its rank (virtual stage ``index * pp + rank``)."""
    layers: range
    """Global indices of its blocks."""
    first: bool
    """Holds the embedding (rank 0, chunk 0)."""
    last: bool
    """Holds the final norm and head (last rank, last chunk)."""


def rank_chunks(num_layers: int, pp: int, chunks: int, rank: int) -> list[Chunk]:
    """The chunks of pipeline rank ``rank``."""
    parts = partition(num_layers, pp, chunks)[rank]
    return [Chunk(c, parts[c], rank == 0 and c == 0, rank == pp - 1 and c == chunks - 1)
            for c in range(chunks)]


def split_model(model: nn.Module, chunks: list[Chunk]) -> nn.Module:
    """Keep only what ``chunks`` need in ``model`` (in place): their blocks under their global
    indices, the embedding if one is first, the final norm and head if one is last."""
    blocks = model.transformer_blocks()
    kept = nn.ModuleList()
    for chunk in chunks:
        for i in chunk.layers:
            kept.add_module(str(i), blocks[i])  # "layers.5" stays "layers.5"
    setattr(model, model.blocks_attr, kept)
    if not any(c.first for c in chunks):
        setattr(model, model.embedding_attr, None)
    if not any(c.last for c in chunks):
        setattr(model, model.norm_attr, None)
        setattr(model, model.head_attr, None)
    return model


def layout_chunks(cfg: TrainConfig, layout: ParallelLayout) -> list[Chunk]:
    """The chunks of this rank's pipeline stage."""
    return rank_chunks(cfg.model.num_layers, layout.pipeline, cfg.model.num_chunks,
                       layout.pp_rank)


def chunk_blocks(model: nn.Module, chunk: Chunk) -> list[nn.Module]:
    """The block modules of ``chunk`` in ``model`` (after :func:`split_model`)."""
    blocks = model.transformer_blocks()
    return [getattr(blocks, str(i)) for i in chunk.layers]


# --------------------------------------------------------------------------------- schedules
@dataclass(frozen=True)
class Action:
    """Forward (``"F"``) or backward (``"B"``) of ``chunk`` on micro-batch ``micro``."""

    kind: str
    chunk: int
    micro: int


def one_f_one_b(pp: int, rank: int, micro_num: int) -> list[Action]:
    """Non-interleaved 1F1B: ``min(pp - rank - 1, M)`` warm-up forwards, then pairs of one
    forward and one backward, then the remaining backwards."""
    warmup = min(pp - rank - 1, micro_num)
    out = [Action("F", 0, m) for m in range(warmup)]
    for i in range(micro_num - warmup):
        out += [Action("F", 0, warmup + i), Action("B", 0, i)]
    out += [Action("B", 0, m) for m in range(micro_num - warmup, micro_num)]
    return out


def interleaved_order(k: int, pp: int, chunks: int, backward: bool) -> tuple[int, int]:
    """(chunk, micro-batch) of this rank's ``k``-th forward (or backward) micro-step."""
    group = pp * chunks
    chunk = (k % group) // pp
    micro = (k // group) * pp + k % pp
    return (chunks - 1 - chunk if backward else chunk), micro


def interleaved(pp: int, rank: int, micro_num: int, chunks: int) -> list[Action]:
    """Interleaved 1F1B (Megatron / InternEvo order; ``micro_num % pp == 0``): ``T = M·chunks``
    micro-steps, warm-up ``T`` if ``M == pp`` else ``min(T, 2(pp - rank - 1) + (chunks - 1)pp)``."""
    if micro_num % pp:
        raise ValueError(f"the interleaved schedule needs micro_num ({micro_num}) divisible by "
                         f"pipeline.size ({pp})")
    total = micro_num * chunks
    warmup = total if micro_num == pp else min(total, 2 * (pp - rank - 1) + (chunks - 1) * pp)

    def act(kind: str, k: int) -> Action:
        return Action(kind, *interleaved_order(k, pp, chunks, kind == "B"))

    out = [act("F", k) for k in range(warmup)]
    for i in range(total - warmup):
        out += [act("F", warmup + i), act("B", i)]
    out += [act("B", k) for k in range(total - warmup, total)]
    return out


def train_schedule(pp: int, rank: int, micro_num: int, chunks: int) -> list[Action]:
    """1F1B for one chunk per rank, interleaved for more."""
    if chunks == 1:
        return one_f_one_b(pp, rank, micro_num)
    return interleaved(pp, rank, micro_num, chunks)


def forward_only(micro_num: int, chunks: int) -> list[Action]:
    """Evaluation: every chunk's forwards, chunk by chunk, micro-batches in order (data only
    flows to later virtual stages, so no stage waits for one that waits for it)."""
    return [Action("F", c, m) for c in range(chunks) for m in range(micro_num)]


def simulate(pp: int, micro_num: int, chunks: int,
             forward_cost: float = 1.0) -> list[list[tuple]]:
    """Idealised timeline: per rank, ``(start, end, action)`` with equal chunks (a forward costs
    ``forward_cost``, a backward twice that) and free communication.  Used by the tests (every
    schedule completes, no deadlock) and the docs' timelines; its idle share is the bubble."""
    plans = [train_schedule(pp, r, micro_num, chunks) for r in range(pp)]
    done: dict[tuple, float] = {}
    pos, clock = [0] * pp, [0.0] * pp
    timeline: list[list[tuple]] = [[] for _ in range(pp)]
    while any(pos[r] < len(plans[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            if pos[r] == len(plans[r]):
                continue
            a = plans[r][pos[r]]
            dep = _dependency(a, r, pp, chunks)
            if dep is not None and dep not in done:
                continue
            start = max(clock[r], done.get(dep, 0.0))
            end = start + forward_cost * (1.0 if a.kind == "F" else 2.0)
            done[(a.kind, r, a.chunk, a.micro)] = clock[r] = end
            timeline[r].append((start, end, a))
            pos[r] += 1
            progressed = True
        if not progressed:
            raise RuntimeError(f"schedule deadlocks: pp={pp} micro_num={micro_num} chunks={chunks}")
    return timeline


def render_timeline(pp: int, micro_num: int, chunks: int) -> str:
    """:func:`simulate` as text, one line per stage, two characters per unit of time: ``f3`` =
    forward of micro-batch 3, ``b3--`` its backward (twice as long), upper case for chunk 1 (then
    chunk 2 lower case again), ``..`` idle."""
    lines = []
    for rank, row in enumerate(simulate(pp, micro_num, chunks)):
        text, clock = "", 0.0
        for start, end, a in row:
            text += ".." * int(start - clock)
            cell = f"{'fb'[a.kind == 'B']}{a.micro}".ljust(2 * int(end - start), "-")
            text += cell.upper() if a.chunk % 2 else cell
            clock = end
        lines.append(f"stage {rank}: {text}")
    return "\n".join(lines)


def _dependency(a: Action, rank: int, pp: int, chunks: int) -> Optional[tuple]:
    """The action on another stage whose result ``a`` needs (None: it starts from local data)."""
    stage = a.chunk * pp + rank  # virtual stage
    if a.kind == "F":
        if stage == 0:
            return None
        return ("F", (stage - 1) % pp, (stage - 1) // pp, a.micro)
    if stage == pp * chunks - 1:
        return ("F", rank, a.chunk, a.micro)  # the loss of its own forward
    return ("B", (stage + 1) % pp, (stage + 1) // pp, a.micro)


# ------------------------------------------------------------------------------- execution
@dataclass
class StepTiming:
    """Where one rank's pipeline step went."""

    busy_s: float = 0.0
    """Seconds in forward and backward compute (waits for neighbours excluded)."""
    total_s: float = 0.0
    """Seconds from the first action to the last send completed."""
    max_in_flight: int = 0
    """Most micro-batch activations held at once (forwards waiting for their backward)."""

    @property
    def idle_fraction(self) -> float:
        """Share of the step this stage waited (its bubble)."""
        return 1.0 - self.busy_s / self.total_s if self.total_s > 0 else 0.0


@dataclass
class PipelineRunner:
    """Runs a schedule on this rank, moving activations and gradients between the stages."""

    comm: Comm
    rank: int
    """Pipeline rank."""
    pp: int
    chunks: int
    split: int = 1
    """Under mtp every tensor rank holds the same hidden state: each sends only its ``1/split``
    slice and the receiver all-gathers it over the tensor group (InternEvo's scatter-gather)."""
    pending: list = field(default_factory=list)
    """Sends in flight (tensor, work), waited for at the end of the step."""

    def neighbour(self, chunk: int, step: int) -> tuple[int, int]:
        """(pipeline rank, chunk) of the virtual stage ``step`` after (``-1``: before) ours."""
        stage = chunk * self.pp + self.rank + step
        return stage % self.pp, stage // self.pp

    def channel(self, src: int, dst: int) -> Any:
        """The communicator of messages from pipeline rank ``src`` to ``dst``."""
        return self.comm.layout.group("pipeline" if src < dst else "pipeline_reverse")

    def send(self, tensor: Tensor, chunk: int, step: int) -> None:
        """Send ``tensor`` to the neighbour ``step`` virtual stages away (asynchronous)."""
        peer, _ = self.neighbour(chunk, step)
        tensor = tensor.detach().reshape(self.split, -1)[self.comm.layout.tp_rank % self.split]
        tensor = tensor.clone() if self.split > 1 else tensor.contiguous()
        work = self.comm.send(tensor, "pipeline", peer, self.channel(self.rank, peer))
        self.pending.append((tensor, work))

    def recv(self, shape: tuple, dtype: torch.dtype, device: torch.device, chunk: int,
             step: int) -> Tensor:
        """Receive a ``shape`` tensor from the neighbour ``step`` virtual stages away."""
        peer, _ = self.neighbour(chunk, step)
        numel = math.prod(shape)
        piece = torch.empty(numel // self.split, dtype=dtype, device=device)
        self.comm.recv(piece, "pipeline", peer, self.channel(peer, self.rank))
        if self.split == 1:
            return piece.view(shape)
        full = torch.empty(numel, dtype=dtype, device=device)
        self.comm.all_gather(full, piece, "tensor")
        return full.view(shape)

    def run(self, actions: list[Action], chunk_info: list[Chunk],
            forward: Callable[[Chunk, int, Optional[Tensor]], Tensor],
            before_backward: Callable[[bool], None], shape: tuple, dtype: torch.dtype,
            device: torch.device, loss_scale: float = 1.0) -> StepTiming:
        """Execute ``actions``.  ``forward(chunk, micro, x)`` runs a chunk (``x`` None on the first
        stage) and returns its output: the hidden state, or on the last chunk the loss to
        back-propagate.  ``before_backward(last)`` is called before every backward (``last``:
        it is this rank's final one, the one after which gradients may be synchronised)."""
        timing, start = StepTiming(), time.perf_counter()
        saved: dict[tuple[int, int], tuple[Optional[Tensor], Tensor]] = {}
        last_b = max((i for i, a in enumerate(actions) if a.kind == "B"), default=-1)
        for i, a in enumerate(actions):
            chunk = chunk_info[a.chunk]
            if a.kind == "F":
                x = None if chunk.first else self.recv(shape, dtype, device, a.chunk, -1)
                if x is not None and torch.is_grad_enabled():
                    x.requires_grad_()
                t0 = time.perf_counter()
                out = forward(chunk, a.micro, x)
                timing.busy_s += time.perf_counter() - t0
                if not chunk.last:
                    self.send(out, a.chunk, 1)
                if torch.is_grad_enabled():
                    saved[(a.chunk, a.micro)] = (x, out)
                    timing.max_in_flight = max(timing.max_in_flight, len(saved))
                continue
            x, out = saved.pop((a.chunk, a.micro))
            grad = None if chunk.last else self.recv(out.shape, out.dtype, device, a.chunk, 1)
            before_backward(i == last_b)
            t0 = time.perf_counter()
            if chunk.last:
                out = out * loss_scale if loss_scale != 1.0 else out
            torch.autograd.backward(out, grad)
            timing.busy_s += time.perf_counter() - t0
            if x is not None:
                self.send(x.grad, a.chunk, -1)
        self.finish()
        timing.total_s = time.perf_counter() - start
        return timing

    def finish(self) -> None:
        """Wait for every send of this step."""
        for _, work in self.pending:
            if work is not None:
                work.wait()
        self.pending.clear()
