"""Memory profiler of a real run (``--profiling memory``): bytes per module, per rank, over steps.

What is counted, per rank (every number is the bytes of real storages this rank holds):

- ``params``: the local tensor of every parameter (the tensor-parallel shard of a DTensor; under
  FSDP the fp32 shard, which is also the master weight, so FSDP's ``master`` is 0);
- ``grads``: the local gradient of every parameter, read when it is final (the post-accumulate
  hook of the last micro-batch, and the ``.grad`` left when the optimizer step starts);
- ``master`` and ``optimizer_states`` (AdamW's two moments): ZeRO-1.5 keeps them in one flat fp32
  vector per rank (the owned shard of every bucket); each element is attributed back to the
  parameter it belongs to through the optimizer's bucket plan (bucket padding shows as the entry
  ``(zero1 padding)``); FSDP keeps one tensor per parameter shard.  AdamW's scalar ``step`` counters
  are left out;
- ``activations_peak``: tensors saved for backward (``saved_tensors_hooks`` around the whole
  forward-backward of a step, pipeline schedules included), each storage counted once while it is
  alive (weak references), parameter and buffer storages excluded, attributed to the innermost
  module running when it was saved (module forward pre/post hooks keep the stack; code outside
  every module, such as the fused head + loss, goes to ``(no module)``).  The per-module numbers
  are each module's live bytes at the moment the total was largest, so they sum to the total.
  Blocks under activation checkpointing hide their inner tensors behind
  ``torch.utils.checkpoint``'s own hooks: they show the (small) bytes saved around them.

``timeline``: after every phase of each profiled step (``forward`` / ``backward`` of each
micro-batch, ``optimizer``, ``checkpoint``) the sum of the five categories as they are at that
moment (live saved activations tracked by weak references; on CUDA also the allocator's
``memory_allocated``).  Outputs in ``<run-dir>/memory/rank<r>/``: ``memory.json``, ``memory.csv``,
``report.html`` (self-contained charts, :mod:`internevo.profiling.memory_html`) and on CUDA
``snapshot.pickle`` for https://pytorch.org/memory_viz.
"""

from __future__ import annotations

import csv
import functools
import json
import weakref
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from internevo.parallel.zero import HybridZeroOptimizer, local_tensor
from internevo.train.dryrun import storage_bytes

CATEGORIES = ("params", "grads", "master", "optimizer_states", "activations_peak")
PADDING = "(zero1 padding)"
NO_MODULE = "(no module)"
ROOT = "model"


def module_of(param_name: str) -> str:
    """Dotted name of the module that owns parameter ``param_name`` (``model`` for the root)."""
    owner = param_name.rpartition(".")[0]
    return f"{ROOT}.{owner}" if owner else ROOT


def nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's local elements."""
    t = local_tensor(t)
    return t.numel() * t.element_size()


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    """(storage address, storage bytes) of a tensor's local data."""
    storage = local_tensor(t).untyped_storage()
    return storage.data_ptr(), storage.nbytes()


# ------------------------------------------------------------------------------ static bytes
def param_bytes(model: nn.Module) -> dict[str, int]:
    """Local parameter bytes per owning module."""
    out: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        out[module_of(name)] += nbytes(p)
    return out


def zero_elements(opt: HybridZeroOptimizer) -> tuple[list[int], int]:
    """Elements of this rank's flat ZeRO shard per parameter index, and the padding elements."""
    per_param = [0] * len(opt.params)
    padding = 0
    for b in opt.buckets:
        lo = opt.layout.zero1_rank * b.shard
        hi = lo + b.shard
        start = 0
        for i in b.indices:  # bucket b's flat vector: its parameters back to back, then padding
            end = start + opt.numels[i]
            per_param[i] += max(0, min(end, hi) - max(start, lo))
            start = end
        padding += hi - max(lo, b.numel) if hi > b.numel else 0
    return per_param, padding


def optimizer_bytes(opt: Any) -> dict[str, dict[str, int]]:
    """``{"master": {module: bytes}, "optimizer_states": {...}}`` of a ZeRO or FSDP optimizer."""
    master: dict[str, int] = defaultdict(int)
    states: dict[str, int] = defaultdict(int)
    moments = [(k, t) for m in opt.masters for k, t in opt.inner.state[m].items() if k != "step"]
    if isinstance(opt, HybridZeroOptimizer):
        elems, padding = zero_elements(opt)
        owners = [module_of(n) for n in opt.names] + [PADDING]
        per_moment = sum(t.element_size() for _, t in moments)
        for owner, count in zip(owners, elems + [padding]):
            master[owner] += count * opt.master.element_size()
            states[owner] += count * per_moment
    else:  # FSDP: the sharded parameters are the masters; one moment tensor per parameter
        for name, p in zip(opt.names, opt.params):
            states[module_of(name)] += sum(nbytes(t) for k, t in opt.inner.state[p].items()
                                           if k != "step")
    return {"master": master, "optimizer_states": states}


def storage_totals(model: nn.Module, opt: Any) -> dict[str, int]:
    """Totals read from the storages themselves (not from the per-module attribution)."""
    moments = [t for m in opt.masters for k, t in opt.inner.state[m].items() if k != "step"]
    master = [opt.master] if isinstance(opt, HybridZeroOptimizer) else []
    return {"params": storage_bytes(model.parameters()), "master": storage_bytes(master),
            "optimizer_states": storage_bytes(moments)}


# ------------------------------------------------------------------------------- activations
class ActivationTracker:
    """Saved-for-backward bytes per module while they are alive, and their split at the peak."""

    def __init__(self, model: nn.Module):
        self.names = {m: (f"{ROOT}.{n}" if n else ROOT) for n, m in model.named_modules()}
        self.stack: list[str] = []
        self.excluded: set[int] = set()
        """Storage addresses of parameters and buffers (not activations)."""
        self.live: dict[int, list] = {}
        """Storage address -> [live saved references, bytes, owning module]."""
        self.by_module: dict[str, int] = defaultdict(int)
        """Live saved bytes per module."""
        self.total = 0
        self.peak: dict[str, int] = {}
        """``by_module`` at the moment ``total`` was largest."""
        self.handles = [h for m in self.names for h in (
            m.register_forward_pre_hook(self._enter), m.register_forward_hook(self._leave))]
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _enter(self, module: nn.Module, args: Any) -> None:
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            self.excluded.add(_storage_key(t)[0])  # under FSDP: the gathered parameters
        self.stack.append(self.names[module])

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.stack:
            self.stack.pop()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "meta":
            return t
        key, size = _storage_key(t)
        if key == 0 or key in self.excluded:
            return t
        entry = self.live.get(key)
        if entry is None:  # newly saved storage: owned by the innermost running module
            entry = self.live[key] = [0, size, self.stack[-1] if self.stack else NO_MODULE]
            self.by_module[entry[2]] += size
            self.total += size
            if self.total > sum(self.peak.values()):
                self.peak = dict(self.by_module)
        entry[0] += 1
        weakref.finalize(t, self._release, key)
        return t

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] <= 0:
                del self.live[key]
                self.by_module[entry[2]] -= entry[1]
                self.total -= entry[1]

    def live_bytes(self) -> int:
        """Bytes of saved tensors still referenced by some autograd graph."""
        return self.total

    def close(self) -> None:
        """Remove the module hooks."""
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------------- profiler
class MemoryProfiler:
    """Wraps a :class:`~internevo.train.trainer.Trainer`'s phases for the first ``steps`` steps."""

    def __init__(self, trainer: Any, steps: int):
        self.trainer, self.steps = trainer, steps
        self.model, self.opt = trainer.model, trainer.optimizer
        self.out_dir = Path(trainer.run_dir) / "memory" / f"rank{trainer.layout.rank}"
        self.static = {"params": param_bytes(self.model), **optimizer_bytes(self.opt)}
        self.totals = storage_totals(self.model, self.opt)
        self.grads: dict[int, int] = {}
        self.timeline: list[dict] = []
        self.step = 0
        self.micro = 0
        self.acts = ActivationTracker(self.model)
        self.cuda = trainer.device.type == "cuda"
        if self.cuda:
            torch.cuda.memory._record_memory_history()
        self._grad_handles = [p.register_post_accumulate_grad_hook(
            functools.partial(self._grad_final, i)) for i, p in enumerate(self.opt.params)
            if not trainer.layout.fsdp]
        self._restore = self._wrap_phases()
        self.done = False

    # -------------------------------------------------------------------------- phase hooks
    def _wrap_phases(self) -> list[tuple[Any, str, Any]]:
        """Replace the trainer's phase methods by recording versions; returns how to undo it."""
        t = self.trainer
        targets = [(t, "forward_backward", self._forward_backward), (t, "row_loss", self._forward),
                   (self.opt, "start_micro_step", self._micro),
                   (self.opt, "step", self._optimizer), (t.ckpt, "after_step", self._ckpt),
                   (t.ckpt, "finish", self._finish)]
        restore = []
        for obj, name, wrapper in targets:
            original = getattr(obj, name)
            restore.append((obj, name, obj.__dict__.get(name)))
            setattr(obj, name, functools.partial(wrapper, original))
        return restore

    def _forward_backward(self, original: Callable, *args: Any) -> Any:
        with self.acts.hooks:  # every forward of the step, pipeline stages included
            return original(*args)

    def _forward(self, original: Callable, *args: Any) -> Any:
        out = original(*args)
        self.record(f"forward {self.micro}")
        return out

    def _micro(self, original: Callable, last: bool) -> Any:
        if self.micro_started():
            self.record(f"backward {self.micro}")
            self.micro += 1
        return original(last=last)

    def micro_started(self) -> bool:
        """True when a micro-batch's forward has been recorded in this step."""
        return bool(self.timeline) and self.timeline[-1]["phase"] == f"forward {self.micro}"

    def _optimizer(self, original: Callable, *args: Any) -> Any:
        self.record(f"backward {self.micro}")
        for i, p in enumerate(self.opt.params):
            if p.grad is not None:
                self.grads[i] = max(self.grads.get(i, 0), nbytes(p.grad))
        out = original(*args)
        self.record("optimizer")
        return out

    def _ckpt(self, original: Callable) -> Any:
        out = original()
        self.record("checkpoint")
        self.step += 1
        self.micro = 0
        if self.step >= self.steps:
            self.finish()
        return out

    def _finish(self, original: Callable) -> Any:
        self.finish()
        return original()

    def _grad_final(self, index: int, param: torch.Tensor) -> None:
        if param.grad is not None:
            self.grads[index] = max(self.grads.get(index, 0), nbytes(param.grad))

    # ------------------------------------------------------------------------------ numbers
    def live_grad_bytes(self) -> int:
        """Bytes of the gradients the parameters hold right now."""
        return sum(nbytes(p.grad) for p in self.opt.params if p.grad is not None)

    def record(self, phase: str) -> None:
        """One timeline point: every category's bytes as they are now."""
        point = {"step": self.step + 1, "phase": phase, "params": self.totals["params"],
                 "grads": self.live_grad_bytes(), "master": self.totals["master"],
                 "optimizer_states": self.totals["optimizer_states"],
                 "activations": self.acts.live_bytes()}
        point["total"] = sum(point[k] for k in ("params", "grads", "master",
                                                "optimizer_states", "activations"))
        if self.cuda:
            point["cuda_allocated"] = torch.cuda.memory_allocated()
        self.timeline.append(point)

    def modules(self) -> dict[str, dict[str, int]]:
        """Per-module bytes of every category (modules with nothing at all left out)."""
        grads: dict[str, int] = defaultdict(int)
        for i, size in self.grads.items():
            grads[module_of(self.opt.names[i])] += size
        columns = {**self.static, "grads": grads, "activations_peak": self.acts.peak}
        names = sorted({n for col in columns.values() for n in col})
        rows = {n: {c: int(columns[c].get(n, 0)) for c in CATEGORIES} for n in names}
        return {n: row for n, row in rows.items() if any(row.values())}

    def result(self) -> dict:
        """``{"modules", "total", "timeline", "rank", "layout"}`` (bytes)."""
        total = {**self.totals, "grads": sum(self.grads.values()),
                 "activations_peak": sum(self.acts.peak.values())}
        lay = self.trainer.layout
        return {"rank": lay.rank, "layout": lay.describe(), "modules": self.modules(),
                "total": {c: int(total[c]) for c in CATEGORIES}, "timeline": self.timeline}

    # ------------------------------------------------------------------------------ output
    def finish(self) -> Optional[Path]:
        """Write the outputs once and unhook everything; returns the output folder."""
        if self.done:
            return None
        self.done = True
        self.acts.close()
        for h in self._grad_handles:
            h.remove()
        for obj, name, previous in self._restore:
            if previous is None:
                delattr(obj, name)
            else:
                setattr(obj, name, previous)
        return write_outputs(self.result(), self.out_dir, self.cuda)


def write_outputs(result: dict, out_dir: Path, cuda: bool = False) -> Path:
    """``memory.json``, ``memory.csv``, ``report.html`` (and the CUDA snapshot) in ``out_dir``."""
    from internevo.profiling.memory_html import render_html

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "memory.json").write_text(json.dumps(result, indent=1))
    with open(out_dir / "memory.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["module", *CATEGORIES])
        for name, row in result["modules"].items():
            writer.writerow([name, *(row[c] for c in CATEGORIES)])
        writer.writerow(["total", *(result["total"][c] for c in CATEGORIES)])
    (out_dir / "report.html").write_text(render_html(result))
    if cuda:
        torch.cuda.memory._dump_snapshot(str(out_dir / "snapshot.pickle"))
        torch.cuda.memory._record_memory_history(enabled=None)
    return out_dir


def attach_memory_profiler(trainer: Any, steps: Optional[int] = None) -> MemoryProfiler:
    """Profile ``trainer``'s first ``steps`` steps (default ``monitor.memory_profile_steps``)."""
    count = trainer.cfg.monitor.memory_profile_steps if steps is None else steps
    return MemoryProfiler(trainer, max(1, count))
