"""Dry run: rank R's real training step at world size N, on fake tensors, with per-rank bytes.

:func:`dry_run` builds the :class:`~internevo.train.trainer.Trainer` of one rank exactly as a
real run does (same layout, groups, model build, tensor parallel, sharding, optimizer, loss), but
under :class:`~torch._subclasses.fake_tensor.FakeTensorMode` and PyTorch's fake process group
(every collective returns at once, nothing is computed or allocated), then runs one real
``Trainer.train_step`` (forward, backward, optimizer step) and builds the state dict a checkpoint
save would hand to DCP (:meth:`CheckpointManager.save_state`; no file is written).

What it measures (bytes of this rank, see docs/parallel.md "Dry run"):

* ``params`` / ``grads``: the model's local parameter (and gradient) storages;
* ``master`` / ``optimizer_states``: the optimizer's fp32 masters and AdamW moments;
* ``activations_peak``: the most bytes saved for backward at one moment (``saved_tensors_hooks``,
  each storage counted once while it is alive);
* ``checkpoint_save_peak``: the most bytes alive while the checkpoint state dict is built;
* ``total_peak``: the most bytes alive at once during build, step and state dict — every storage
  a dispatched op creates is counted from its creation until it is freed (weakref finalizers).

``comm`` is the payload of every collective of the step, per ``<kind>/<group>`` (from
:class:`~internevo.parallel.comm.Comm`).

Devices: ``device="cuda"`` uses fake CUDA tensors on a CUDA build.  A CPU-only build cannot
record autograd on fake CUDA tensors (its autograd engine asks the missing CUDA device guard for
streams and aborts), so there the accelerator is a stand-in device ``gpu`` (PyTorch's Python
PrivateUse1 backend): a CPU tensor meeting a parameter, gradient or batch tensor raises exactly
as it would on CUDA, and every collective checks that its tensor is on the run's device, as NCCL
does.

Scalars: ``.item()`` on a fake tensor has no value.  Small integer tensors derived from the real
batch (``cu_seqlens``, token ids) are shadowed by their real values, so segment boundaries and
token checks see the truth; any other scalar reads as 1 (losses, norms, metric counts).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import DynamicOutputShapeException, is_fake
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    _disable_current_modes,
    is_traceable_wrapper_subclass,
)
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from internevo.models import attention

STAND_IN = "gpu"
"""Name of the stand-in accelerator on CPU-only builds (PyTorch's PrivateUse1 backend)."""
_SHADOW_LIMIT = 1 << 18
"""Integer tensors up to this many elements keep their real values next to the fake ones."""
BYTE_KEYS = ("params", "grads", "master", "optimizer_states", "activations_peak",
             "checkpoint_save_peak", "total_peak")


def storage_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages of ``tensors`` (DTensors count their local shard)."""
    seen: set = set()
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        storage = t.untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            total += storage.nbytes()
    return total


# ------------------------------------------------------------------------------------ devices


def dry_run_device(device: str) -> torch.device:
    """The device fake tensors live on: ``cpu``, ``cuda`` (a CUDA build) or the stand-in."""
    if device == "cpu":
        return torch.device("cpu")
    if device != "cuda":
        raise ValueError(f"--device {device!r}: valid are cuda, cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if not hasattr(torch, STAND_IN):
        from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

        _setup_privateuseone_for_python_backend(STAND_IN, backend_module=_StandInModule())
    attention.ACCELERATOR_STAND_INS.add(STAND_IN)  # pick the kernel a real GPU picks
    return torch.device(STAND_IN, 0)


class _StandInStream:
    """Streams and events of the stand-in: ordering is moot when nothing runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        """No-op."""

    def wait_event(self, event: Any) -> None:
        """No-op."""

    def record(self, stream: Any = None) -> _StandInStream:
        """No-op (an event records itself)."""
        return self

    def record_event(self, event: Any = None) -> _StandInStream:
        """An event stub."""
        return _StandInStream()

    def synchronize(self) -> None:
        """No-op."""

    def query(self) -> bool:
        """Always done."""
        return True


class _StandInModule:
    """``torch.gpu``: what FSDP2 and DeviceMesh ask of a device module."""

    Stream = Event = _StandInStream

    def is_available(self) -> bool:
        """Yes."""
        return True

    def is_initialized(self) -> bool:
        """Yes."""
        return True

    def current_device(self) -> int:
        """Device 0."""
        return 0

    def device_count(self) -> int:
        """One device per rank."""
        return 1

    def set_device(self, index: Any) -> None:
        """No-op."""

    def manual_seed_all(self, seed: int) -> None:
        """No-op."""

    def _is_in_bad_fork(self) -> bool:
        return False

    def current_stream(self, device: Any = None) -> _StandInStream:
        """A stream stub."""
        return _StandInStream()

    def stream(self, stream: Any) -> contextlib.AbstractContextManager:
        """No-op context."""
        return contextlib.nullcontext()

    def synchronize(self, device: Any = None) -> None:
        """No-op."""

    def get_amp_supported_dtype(self) -> list[torch.dtype]:
        """Autocast (asked by activation checkpointing) may use both half types."""
        return [torch.float16, torch.bfloat16]


def init_fake_process_group(world: int, rank: int, device: torch.device) -> None:
    """PyTorch's fake process group (collectives are no-ops) for ``world`` ranks."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    backend = "fake" if device.type in ("cpu", "cuda") else f"cpu:fake,{device.type}:fake"
    dist.init_process_group(backend, store=FakeStore(), rank=rank, world_size=world)


# ---------------------------------------------------------------------------- accounting


class StorageCounter(TorchDispatchMode):
    """Bytes of the storages alive that dispatched ops created, and their peak (real or fake
    tensors; meta tensors allocate nothing): each storage counts from its creation until it is
    freed (weakref finalizer)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        """Most bytes alive at once since the counter started."""
        self.window_peak = self.live_at_reset = 0
        """Most bytes alive at once since :meth:`reset_window`, and those alive then."""
        self._storages: dict[int, int] = {}

    def reset_window(self) -> None:
        """Start a new window peak (:attr:`window_peak`) from the bytes alive now."""
        self.window_peak = self.live_at_reset = self.live

    def window_growth(self) -> int:
        """The most bytes added above :attr:`live_at_reset` since :meth:`reset_window`."""
        return self.window_peak - self.live_at_reset

    def track(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage from now until it is freed (once per storage)."""
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._storages:
            return
        nbytes = storage.nbytes()
        self._storages[key] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self.window_peak = max(self.window_peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._storages.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: Optional[dict] = None) -> Any:
        return self.track_all(func(*args, **(kwargs or {})), (args, kwargs))

    def track_all(self, out: Any, inputs: Any) -> Any:
        """:meth:`track` every tensor of an op's output that does not alias an input (a view,
        ``detach`` or an in-place result shares a storage that exists already); returns it."""
        seen = {t.untyped_storage()._cdata for t in tree_flatten(inputs)[0]
                if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and not t.is_meta  # meta: nothing allocated
                    and not is_traceable_wrapper_subclass(t)  # a DTensor: its local tensor is
                    and t.untyped_storage()._cdata not in seen):  # counted by the inner op
                self.track(t)
        return out


class AllocationCounter(StorageCounter):
    """A :class:`StorageCounter` for the dry run: it also shadows small integer tensors with
    their real values so that ``.item()`` / ``.tolist()`` stay truthful."""

    def __init__(self, fake_mode: Any) -> None:
        super().__init__()
        self.fake_mode = fake_mode
        self._shadow = WeakIdKeyDictionary()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: Optional[dict] = None) -> Any:
        args, kwargs = tree_map(self._fake, (args, kwargs or {}))
        if func is torch.ops.aten._local_scalar_dense.default:
            return self._scalar(args[0])
        try:
            out = func(*args, **kwargs)
        except DynamicOutputShapeException:  # nonzero & co.: fine when the input values are known
            out = self._real_op(func, args, kwargs)
            if out is None:
                raise
        self.track_all(out, (args, kwargs))
        self._maybe_shadow(func, args, kwargs, out)
        return out

    # ------------------------------------------------------------------- real small ints
    def _fake(self, t: Any) -> Any:
        """A real tensor argument (a batch from the loader) -> its fake twin, remembered."""
        if not isinstance(t, torch.Tensor) or is_fake(t):
            return t
        fake = self.fake_mode.from_tensor(t)
        if _small_int(t):
            self._shadow[fake] = t
        return fake

    def _real(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        return self._shadow.get(t)

    def _real_op(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """``func`` on the real values of shadowed CPU inputs, as fake CPU tensors (None when an
        input has no real value or is not on the CPU)."""
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        reals = [self._real(t) for t in inputs]
        if not inputs or any(r is None for r in reals) or any(t.device.type != "cpu"
                                                              for t in inputs):
            return None
        mapping = {id(t): r for t, r in zip(inputs, reals)}
        with _disable_current_modes():
            value = func(*tree_map(lambda x: mapping.get(id(x), x), args),
                         **tree_map(lambda x: mapping.get(id(x), x), kwargs))
        return tree_map(lambda x: self._fake(x) if isinstance(x, torch.Tensor) else x, value)

    def _maybe_shadow(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """When every tensor input (if any) is real (or shadowed), small and integer, run
        ``func`` on the real values too (on CPU) and remember the result next to the fake
        output."""
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outs or not all(_small_int(t) for t in outs):
            return
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if not all(_small_int(t) for t in inputs):  # no inputs: a factory (arange, a mesh)
            return
        reals = [self._real(t) for t in inputs]
        if any(r is None for r in reals):
            return
        mapping = {id(t): r for t, r in zip(inputs, reals)}

        def real(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return mapping[id(x)]
            return torch.device("cpu") if isinstance(x, torch.device) else x

        with _disable_current_modes():
            value = func(*tree_map(real, args), **tree_map(real, kwargs))
        values = [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
        for fake, real_value in zip(outs, values):
            self._shadow[fake] = real_value

    def _scalar(self, t: torch.Tensor) -> Any:
        real = self._real(t)
        if real is not None:
            with _disable_current_modes():
                return real.item()
        return 1.0 if t.dtype.is_floating_point else 1


def _small_int(t: torch.Tensor) -> bool:
    return (not t.dtype.is_floating_point and not t.dtype.is_complex
            and t.numel() <= _SHADOW_LIMIT)


def _is_parameter(t: torch.Tensor) -> bool:
    """A parameter or a view of one (``weight.t()`` saved by a matmul): not an activation."""
    return isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)


class SavedActivations:
    """Peak bytes saved for backward: storages from pack until freed, each counted once."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._storages: dict[int, int] = {}
        self.excluded: set[int] = set()
        """Storages of the parameters' local tensors (tensor-parallel shards saved by matmuls)."""

    def exclude(self, params: Any) -> None:
        """Never count the storages of ``params`` (DTensors: their local shards)."""
        for p in params:
            local = getattr(p, "_local_tensor", p)  # no to_local op under the counting mode
            self.excluded.add(local.untyped_storage()._cdata)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """``saved_tensors_hooks`` pack: count, keep the tensor as it is."""
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self._storages and key not in self.excluded and not _is_parameter(t):
            self._storages[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)
        return t

    def _free(self, key: int) -> None:
        self.live -= self._storages.pop(key, 0)

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        """Count while active."""
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield


class _StandInFunctions(TorchFunctionMode):
    """What the stand-in accelerator does differently from the CPU, at the torch-function level.

    * ``torch.tensor(data, device=<stand-in>)`` is built on the CPU, then moved (the stand-in has
      no kernels, and the literal's copy to it runs below the fake mode);
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func in (torch.tensor, torch.as_tensor) and device is not None \
                and torch.device(device).type == STAND_IN:
            return func(*args, **{**kwargs, "device": None}).to(device)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _fake_module_conversion(mode: Any) -> Iterator[None]:
    """Let ``nn.Module._apply`` (``.to``, ``to_empty``) swap fake parameters: FakeTensorMode's
    converter memo holds a weakref to every fake tensor it saw, which ``swap_tensors`` refuses;
    the memo is a cache, so the entries of the two tensors being swapped are dropped first."""
    original = torch.utils.swap_tensors
    converter = mode.fake_tensor_converter
    memos = (converter.tensor_memo, converter.meta_converter.tensor_memo)

    def swap(t1: torch.Tensor, t2: torch.Tensor) -> None:
        for memo in memos:
            for key in [k for k, v in list(memo.items()) if v is t1 or v is t2]:
                del memo[key]
        original(t1, t2)

    torch.utils.swap_tensors = swap
    try:
        yield
    finally:
        torch.utils.swap_tensors = original


# --------------------------------------------------------------------------------- the run


def dry_run(cfg: Any, world: int, rank: int = 0, device: str = "cuda", seed: int = 1024,
            run_dir: Optional[Path] = None) -> dict:
    """Build rank ``rank`` of a ``world``-rank run of ``cfg`` on fake tensors, run one training
    step and build the checkpoint state dict; returns the per-rank report (see module doc)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from internevo.parallel.comm import Comm
    from internevo.parallel.layout import ParallelLayout
    from internevo.train.trainer import Trainer

    if dist.is_initialized():
        raise RuntimeError("dry_run: this process already has a process group; run the dry run "
                           "in a process of its own (it installs a fake one)")
    cfg = copy.deepcopy(cfg)
    cfg.ckpt.enable_save_ckpt = False  # nothing is written
    cfg.data.num_worker = 0  # one batch: no loader processes
    layout = ParallelLayout.from_config(cfg, world, rank)
    dev = dry_run_device(device)
    init_fake_process_group(world, rank, dev)
    try:
        layout.build_groups()
        comm = Comm(layout, device=dev)
        fake = FakeTensorMode()
        counter, saved = AllocationCounter(fake), SavedActivations()
        with fake, counter, _fake_module_conversion(fake), _StandInFunctions():
            trainer = Trainer(cfg, layout, comm, dev, Path(run_dir or "runs/dryrun"), seed)
            grads = GradientBytes(trainer)
            saved.exclude(trainer.model.parameters())
            batch = next(iter(trainer.loader))
            with saved.hooks():
                trainer.train_step(batch)
            step_comm = {k[len("comm/"):-len("/bytes")]: v for k, v in comm.snapshot().items()
                         if k.endswith("/bytes")}
            counter.reset_window()
            state = trainer.ckpt.save_state()
            save_peak = counter.window_growth()
            del state
            report = _report(trainer, layout, grads.bytes(), {
                "activations_peak": saved.peak, "checkpoint_save_peak": save_peak,
                "total_peak": counter.peak}, step_comm)
    finally:
        dist.destroy_process_group()
    return report


class GradientBytes:
    """Bytes of the parameters' gradients: each gradient as backward produces it (tensor hooks,
    the largest per parameter), or what ``.grad`` holds when the optimizer step starts (FSDP
    writes its sharded gradients there), whichever is more."""

    def __init__(self, trainer: Any) -> None:
        self.params = [p for p in trainer.model.parameters() if p.requires_grad]
        self.produced = [0] * len(self.params)
        self.at_step = 0
        for i, p in enumerate(self.params):
            p.register_hook(functools.partial(self._seen, i))
        inner, optimizer = trainer.optimizer.step, trainer.optimizer

        def step(*args: Any, **kwargs: Any) -> Any:
            self.at_step = storage_bytes(p.grad for p in self.params if p.grad is not None)
            return inner(*args, **kwargs)

        optimizer.step = step

    def _seen(self, i: int, grad: torch.Tensor) -> None:
        self.produced[i] = max(self.produced[i], storage_bytes([grad]))

    def bytes(self) -> int:
        """The larger of the two counts."""
        return max(sum(self.produced), self.at_step)


def _report(trainer: Any, layout: Any, grads: int, peaks: dict, step_comm: dict) -> dict:
    """The per-rank report; ``attention`` names the packed-attention backend the step used."""
    states = trainer.optimizer._state_tensors()
    sizes = {"tensor": layout.tensor, "data": layout.data, "pipeline": layout.pipeline,
             "zero1": layout.zero1, "fsdp": layout.fsdp, "tensor_mode": layout.tensor_mode}
    sizes_bytes = {
        "params": storage_bytes(trainer.model.parameters()), "grads": grads,
        "master": storage_bytes(states["master"]),
        "optimizer_states": storage_bytes(states["exp_avg"] + states["exp_avg_sq"]), **peaks}
    m = trainer.cfg.model
    backend = attention.attention_backend(trainer.device, m.use_flash_attn, m.attn_drop_rate)
    return {"world": layout.world_size, "rank": layout.rank, "layout": sizes,
            "attention": backend, "bytes": sizes_bytes, "comm": step_comm}


def format_report(report: dict) -> str:
    """The report as a two-part text table (bytes, then communication per step)."""
    from internevo.parallel.comm import human_bytes

    lay = report["layout"]
    head = (f"dry run: world {report['world']} rank {report['rank']} | tensor {lay['tensor']} "
            f"({lay['tensor_mode']}) data {lay['data']} pipeline {lay['pipeline']} zero1 "
            f"{lay['zero1']} fsdp {lay['fsdp']} | attention {report['attention']}")
    lines = [head, f"{'bytes':<22}{'per rank':>14}"]
    lines += [f"{k:<22}{human_bytes(v):>14}" for k, v in report["bytes"].items()]
    lines.append(f"{'comm per step':<22}{'payload':>14}")
    lines += [f"{k:<22}{human_bytes(v):>14}" for k, v in report["comm"].items()]
    return "\n".join(lines)


def write_report(report: dict, run_dir: Path) -> Path:
    """``run_dir/dryrun.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "dryrun.json"
    path.write_text(json.dumps(report, indent=1))
    return path
