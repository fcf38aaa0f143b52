"""Checkpoint manager: cadence, resume, stop file, (asynchronous) DCP saves and loading.

The manager saves and loads a ``dict[str, Stateful]`` of the run's parts (``model``,
``optimizer``, ``schedules``, ``train_state``, ``loader``) in the folder format of
:mod:`internevo.checkpoint.format` (see ``docs/checkpoints.md``).  Tensors are saved per parameter
with their global shapes (DTensors under tensor parallelism / FSDP), so DCP can load them into a
different parallel layout; model-specific checkpoint shapes come from the model's spec
(:func:`checkpoint_layout`).
"""

from __future__ import annotations

import logging
import random
import shutil
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.staging import AsyncStager

from internevo.checkpoint.format import (
    CONFIG_FILE,
    DCP_METADATA,
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    MODEL_CONFIG_FILE,
    TMP_PREFIX,
    TRASH_PREFIX,
    CheckpointError,
    check_tensors,
    checkpoint_step,
    complete_checkpoints,
    config_hint,
    config_text,
    finalize,
    latest_checkpoint,
    load_torch,
    local_path,
    marker_step,
    meta_field,
    remove_checkpoint,
    save_torch,
    saved_shapes,
    to_checkpoint_shape,
    verify_checkpoint,
    write_bytes,
    write_json,
)
from internevo.checkpoint.lock import FolderLock
from internevo.config import TrainConfig
from internevo.convert.internevo import InternEvoCheckpointError, find_checkpoint, read_checkpoint
from internevo.models.base import ModelSpec
from internevo.models.registry import get_spec
from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout
from internevo.parallel.sharded_state import copy_full_into, sharded_to_cpu

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor, distribute_tensor = (), None  # type: ignore[assignment]

log = logging.getLogger(__name__)
# DCP warns on every single-process call, even with no_dist=True which asks for exactly that (and
# async_save warns from its own thread, out of reach of a local catch_warnings).
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or "
                        "uninitialized", category=UserWarning)

PARTS = ("model", "optimizer", "scheduler", "sampler", "train_state", "rng")
"""What a checkpoint restores; ``content="all"`` is every part."""
_CONTENT = {"model": ("model",), "optimizer": ("optimizer",), "scheduler": ("scheduler",),
            "sampler": ("sampler",), "all": PARTS}
_CKPT_TYPES = {"internevo": "internevo", "internlm": "internevo", "hf": "hf", "hf_llama": "hf"}
_LOAD_INFO_KEYS = ("path", "content", "ckpt_type", "strict")


@dataclass(frozen=True)
class LoadRequest:
    """What to load from where."""

    path: Path
    """A checkpoint folder, a run's save folder (its newest checkpoint) or a HF folder."""
    parts: frozenset
    """Subset of :data:`PARTS`."""
    ckpt_type: str = "internevo"
    """``internevo`` (our DCP folders) or ``hf`` (a Hugging Face folder)."""
    source: str = "ckpt.load_ckpt_info"
    """Where the request came from (named in errors)."""
    strict: bool = True
    """Refuse a checkpoint with tensors this model does not have (False: leave them out)."""


# ------------------------------------------------------------------------------ load requests


def parse_content(content: Any, key: str) -> frozenset:
    """InternEvo content names (``model``, ``optimizer``, ``scheduler``, ``sampler``, ``all``)
    -> parts; anything beyond the model also restores the train state (as InternEvo does)."""
    names = (content,) if isinstance(content, str) else tuple(content or ())
    parts: set[str] = set()
    for name in names:
        lowered = str(name).lower()
        if lowered not in _CONTENT:
            raise CheckpointError(f"{key}: unknown content {name!r}; valid: "
                                  f"{', '.join(_CONTENT)}")
        parts.update(_CONTENT[lowered])
    if not parts:
        raise CheckpointError(f"{key}: names no content; use e.g. ('model',) or ('all',)")
    if parts != {"model"}:
        parts.add("train_state")
    return frozenset(parts)


def parse_load_info(info: Any, key: str = "ckpt.load_ckpt_info") -> LoadRequest:
    """Validate ``load_ckpt_info`` (errors name the key); the path is checked when it is used."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{key}: expected dict(path=..., content=..., ckpt_type=...), "
                              f"got {info!r}")
    unknown = sorted(set(info) - set(_LOAD_INFO_KEYS))
    if unknown:
        raise CheckpointError(f"{key}: unknown key {unknown[0]!r}; valid: "
                              f"{', '.join(_LOAD_INFO_KEYS)}")
    if not info.get("path"):
        raise CheckpointError(f"{key}.path is not set: name the checkpoint folder to load")
    ckpt_type = _CKPT_TYPES.get(str(info.get("ckpt_type", "internevo")).lower())
    if ckpt_type is None:
        raise CheckpointError(f"{key}.ckpt_type: {info.get('ckpt_type')!r} is not supported; "
                              f"valid: {', '.join(_CKPT_TYPES)}")
    parts = parse_content(info.get("content", ("model",)), f"{key}.content")
    if ckpt_type == "hf" and parts != {"model"}:
        raise CheckpointError(f"{key}.content: a Hugging Face folder holds model weights only; "
                              f"use content=('model',), got {info.get('content')!r}")
    strict = info.get("strict", True)
    if not isinstance(strict, bool):
        raise CheckpointError(f"{key}.strict: expected True or False, got {strict!r}")
    return LoadRequest(local_path(info["path"], f"{key}.path"), parts, ckpt_type, key, strict)


def _copy_full(target: torch.Tensor, source: torch.Tensor) -> None:
    """Copy the full ``source`` (any shape with ``target``'s global element order) into
    ``target``, taking a DTensor's or ShardedTensor's local part without communication."""
    source = source.reshape(target.shape).to(target.dtype)
    if isinstance(target, ShardedTensor):
        copy_full_into(target, source)
        return
    if isinstance(target, DTensor):  # every rank holds the full tensor
        source = distribute_tensor(source, target.device_mesh, target.placements,
                                   src_data_rank=None).to_local()
        target = target.to_local()
    target.copy_(source)


def copy_full_state(model: nn.Module, state: dict[str, torch.Tensor], where: str,
                    spec: ModelSpec) -> None:
    """Copy full (unsharded) tensors into the model's parameters, sharding DTensors locally.

    Shapes are compared in the checkpoint layout, so a single-process ``[3*H*d, h]`` v1 ``Wqkv``
    fits a tensor-parallel ``[3, H*d, h]`` parameter."""
    current = model.state_dict()
    for name, target in current.items():
        if name not in state:
            raise CheckpointError(f"{where}: tensor {name!r} is missing")
        got, want = tuple(state[name].shape), tuple(target.shape)
        if (spec.checkpoint_shape(name, got) or got) != (spec.checkpoint_shape(name, want) or want):
            raise CheckpointError(f"{where}: tensor {name!r} has shape {got} but the model's is "
                                  f"{want}")
    extra = sorted(set(state) - set(current))
    if extra:
        raise CheckpointError(f"{where}: tensors not in this model: {extra[:5]}")
    bad = non_finite({"model": state}, where)
    if bad:
        raise CheckpointError(bad)
    with torch.no_grad():
        for name, target in current.items():
            _copy_full(target, state[name])


def load_full_state(parts: dict[str, Any], full: dict, wanted: frozenset, where: str,
                    spec: ModelSpec) -> None:
    """Load full (unsharded) state into a run's ``parts`` (each rank keeps its shard), for the
    ``wanted`` parts: ``full["model"]`` (name -> tensor), ``full["optimizer"]`` (our optimizer
    state dict with full per-parameter tensors), ``full["schedules"]``, ``full["train_state"]``
    and ``full["loader"]`` (the ones present)."""
    optimizer = parts["optimizer"]
    if "model" in wanted:
        copy_full_state(parts["model"], full["model"], where, spec)
    if "optimizer" in wanted:
        current = optimizer.state_dict()
        with torch.no_grad():
            for name, tensors in current["params"].items():
                if name not in full["optimizer"]["params"]:
                    raise CheckpointError(f"{where}: no optimizer state for {name!r}")
                for key, target in tensors.items():
                    _copy_full(target, full["optimizer"]["params"][name][key])
        optimizer.load_state_dict({**current, "step": full["optimizer"]["step"],
                                   "scaler": full["optimizer"]["scaler"]})
        if "model" not in wanted:
            optimizer.after_update()  # the masters are the truth: weights follow them
    else:
        optimizer.refresh_masters_from_params()
    for part, key in (("scheduler", "schedules"), ("train_state", "train_state"),
                      ("sampler", "loader")):
        if part in wanted and key in full:
            parts[key].load_state_dict(full[key])


def meta_record(cfg: TrainConfig, step: int, layout: dict, train_state: dict, schedules: dict,
                optimizer: dict) -> dict:
    """The content of ``meta.json``."""
    return {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "job_name": cfg.JOB_NAME,
            "model_type": cfg.model_type, "dtype": cfg.model.dtype,
            "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"), "layout": layout,
            "train_state": train_state, "schedules": schedules, "optimizer": optimizer}


def write_full_checkpoint(save_folder: Path, cfg: TrainConfig, full: dict, layout: dict,
                          text: str) -> Path:
    """A complete checkpoint ``<save_folder>/<step>/`` of full (unsharded) state, written by one
    process (``full`` as :func:`load_full_state` takes it; ``loader``, when present, is every
    data rank's state of ``layout``); ``text`` is its ``config.py``."""
    step = int(full["train_state"]["step_count"])
    tmp = save_folder / f"{TMP_PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    opt_tensors, opt_plain = split_tree(full["optimizer"])
    write_json(tmp / META_FILE, meta_record(cfg, step, layout, full["train_state"],
                                            full["schedules"], opt_plain))
    write_json(tmp / MODEL_CONFIG_FILE, asdict(cfg.model))
    write_bytes(tmp / CONFIG_FILE, text.encode())
    if "loader" in full:
        for d in range(layout["data"]):
            save_torch(tmp / "loader" / f"dp{d}.pt", full["loader"])
    model = {k: v.contiguous() for k, v in full["model"].items()}
    state, _ = checkpoint_layout({"model": model, "optimizer": opt_tensors},
                                 get_spec(cfg.model_type))
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp)), no_dist=True)
    return finalize(tmp, save_folder, step)


def checkpoint_layout(state: dict, spec: ModelSpec, saved: Optional[dict[str, tuple]] = None
                      ) -> tuple[dict, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``{"model": {name: t}, "optimizer": {"params": {name: {key: t}}, ...}}`` (either part
    optional) with every tensor in its checkpoint shape, which does not depend on the layout:
    ``spec.checkpoint_shape`` (InternLM v1's fused ``Wqkv`` is ``[3, H*d, h]`` / ``[3, H*d]``,
    :func:`~internevo.checkpoint.format.to_checkpoint_shape`), everything else keeps its shape.

    The tensors are views of the originals, so DCP's in-place load reaches them.  A tensor
    without such a view (an FSDP-sharded ``Wqkv``) is replaced by a full tensor: its value when
    saving (``saved`` None; a collective), an empty buffer when loading, and the
    ``(original, full)`` pairs are returned for :func:`copy_back` after the load.  When loading,
    ``saved`` (:func:`saved_shapes`) lets a single-process v1 checkpoint written before this
    layout (``Wqkv`` as ``[3*H*d, h]``) load too.
    """
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []

    def convert(key: str, name: str, t: torch.Tensor) -> torch.Tensor:
        if saved is not None:
            shape = spec.checkpoint_shape(name, tuple(t.shape))
            if shape is not None and saved.get(key) == (shape[0] * shape[1], *shape[2:]):
                if tuple(t.shape) == saved[key]:  # an old flat v1 checkpoint
                    return t
                out = torch.empty(saved[key], dtype=t.dtype)
                copies.append((t, out))
                return out
        out = to_checkpoint_shape(spec, name, t)
        if out is not None:
            return out
        shape = spec.checkpoint_shape(name, tuple(t.shape))
        if saved is None:
            return t.full_tensor().view(shape)
        out = torch.empty(shape, dtype=t.dtype)
        copies.append((t, out))
        return out

    out = dict(state)
    if "model" in state:
        out["model"] = {n: convert(f"model.{n}", n, t) for n, t in state["model"].items()}
    if "optimizer" in state and "params" in state["optimizer"]:
        params = {n: {k: convert(f"optimizer.params.{n}.{k}", n, t) for k, t in d.items()}
                  for n, d in state["optimizer"]["params"].items()}
        out["optimizer"] = {**state["optimizer"], "params": params}
    return out, copies


@torch.no_grad()
def copy_back(copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """After a load through :func:`checkpoint_layout`: the full tensors into the originals."""
    for target, full in copies:
        _copy_full(target, full)


# ------------------------------------------------------------------------------ state helpers


def split_tree(tree: dict) -> tuple[dict, dict]:
    """Nested dict -> (its tensors, everything else), both keeping the nesting."""
    tensors: dict = {}
    plain: dict = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            t, p = split_tree(value)
            if t:
                tensors[key] = t
            if p:
                plain[key] = p
        elif isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            plain[key] = value
    return tensors, plain


def merge_tree(a: dict, b: dict) -> dict:
    """Inverse of :func:`split_tree`."""
    out = dict(a)
    for key, value in b.items():
        out[key] = merge_tree(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def flat_shapes(tree: dict, prefix: str = "") -> dict[str, tuple]:
    """DCP's flattened keys (``a.b.c``) and global shapes of a nested dict of tensors."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_shapes(value, name + "."))
        else:
            out[name] = tuple(value.shape)
    return out


def rng_state() -> dict:
    """Python, NumPy, torch and (when present) CUDA RNG states, loadable with ``weights_only``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` output."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _local_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """This rank's tensors of ``t``: a DTensor's local shard, a ShardedTensor's local boxes."""
    if isinstance(t, ShardedTensor):
        return [s.tensor for s in t.local_shards()]
    return [t.to_local() if isinstance(t, DTensor) else t]


def non_finite(tree: dict, where: str, prefix: str = "") -> str:
    """The error line for the first tensor of a nested dict (DCP key order) holding NaN or
    infinite values (this rank's shard of a DTensor or ShardedTensor), or ``""``."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found = non_finite(value, where, name + ".")
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            parts = _local_parts(value)
            bad = sum(int((~torch.isfinite(t)).sum()) for t in parts)
            found = (f"{where}: tensor {name!r} holds {bad} non-finite values (NaN or inf) of "
                     f"{sum(t.numel() for t in parts)}; training cannot start from it: load an "
                     "earlier checkpoint") if bad else ""
        else:
            found = ""
        if found:
            return found
    return ""


def _reason(err: BaseException) -> str:
    """The last line of an error (DCP's CheckpointException carries every rank's traceback)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def is_internevo_checkpoint(path: Path) -> bool:
    """Whether ``path`` is an InternEvo run's checkpoint (or its save folder), told by its files:
    ``ckpt_type="internevo"`` reads InternEvo's folders and ours alike."""
    return not (path / META_FILE).exists() and find_checkpoint(path) is not None


# -------------------------------------------------------------------------------- the manager


class Stateful(Protocol):
    """What the manager saves and loads: ``state_dict()`` / ``load_state_dict(state)``."""

    def state_dict(self) -> dict:
        """The part's state (tensors are saved through DCP, everything else in meta.json)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""


STATEFUL_PARTS = ("model", "optimizer", "schedules", "train_state", "loader")
"""The parts a run hands to the manager.  ``optimizer`` also offers ``after_update()`` and
``refresh_masters_from_params()`` (weights follow the masters / masters follow the weights);
``train_state`` has ``step_count`` and ``batch_count`` (the saving cadence reads them)."""


def _optimizer_state(optimizer: Any) -> dict:
    """The optimizer's state as a checkpoint holds it: what this rank owns, with global offsets
    (``sharded_state_dict``), for optimizers that have it."""
    sharded = getattr(optimizer, "sharded_state_dict", None)
    return sharded() if sharded is not None else optimizer.state_dict()


def to_cpu(tree: Any) -> Any:
    """A CPU copy of a state dict's tensors (DTensors and ShardedTensors keep their layout)."""
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, ShardedTensor):
        return sharded_to_cpu(tree)
    if isinstance(tree, DTensor):
        local = tree.to_local().detach().to("cpu", copy=True)
        return DTensor.from_local(local, tree.device_mesh, tree.placements, run_check=False,
                                  shape=tree.shape, stride=tree.stride())
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    return tree


class CpuStager(AsyncStager):
    """Staging of asynchronous saves: a CPU copy of what this rank writes (PyTorch's default
    stager cannot copy ShardedTensors); training may change the originals as soon as it returns."""

    _synchronize_after_execute = False

    def stage(self, state_dict: dict) -> dict:
        """The copy (blocking)."""
        return to_cpu(state_dict)

    def synchronize_staging(self) -> None:
        """Nothing to wait for: :meth:`stage` blocks."""

    def close(self) -> None:
        """Nothing to release."""


class CheckpointManager:
    """Saving cadence, stop file, (asynchronous) DCP saves and loading of a run's parts."""

    def __init__(self, cfg: TrainConfig, layout: ParallelLayout, comm: Comm,
                 device: torch.device, parts: dict[str, Stateful]):
        missing = [name for name in STATEFUL_PARTS if name not in parts]
        if missing:
            raise TypeError(f"CheckpointManager: parts {missing} are missing; "
                            f"pass all of {', '.join(STATEFUL_PARTS)}")
        self.cfg, self.layout, self.comm, self.device = cfg, layout, comm, device
        self.parts = parts
        self.state = parts["train_state"]
        self.spec = get_spec(self.cfg.model_type)
        ck = self.cfg.ckpt
        self.save_folder = (local_path(ck.save_ckpt_folder, "ckpt.save_ckpt_folder")
                            if ck.save_ckpt_folder else None)
        self.saving = bool(ck.enable_save_ckpt and self.save_folder is not None)
        self.stop_file = (local_path(ck.stop_file_path, "ckpt.stop_file_path")
                          if ck.stop_file_path else None)
        self.explicit = self._explicit_request()
        self._pg = self._checkpoint_group()
        self._executor = (ThreadPoolExecutor(1, thread_name_prefix="internevo-ckpt")
                          if ck.async_save and self.saving else None)
        self._pending: Optional[Future] = None
        self._saved_batch = self._saved_step = -1  # what the newest checkpoint of this run holds
        self._seen_step = 0  # step_count at the previous after_step: cadence counts updates only
        self._bad_stop_text: Optional[str] = None
        self._passed_stop = 0  # the passed stop-file step warned about
        self._saved_path: Optional[Path] = None  # where the newest save went (rank 0 knows)
        if ck.enable_save_ckpt and self.save_folder is None and self.layout.is_log_rank:
            log.warning("ckpt.enable_save_ckpt is True but ckpt.save_ckpt_folder is not set: "
                        "no checkpoints will be written")
        self.lock: Optional[FolderLock] = self._own_folder() if self.saving else None
        if self.layout.rank == 0:
            self._reset_stop_file()
            self._remove_stale()

    # ---------------------------------------------------------------------------- set-up
    def _explicit_request(self) -> Optional[LoadRequest]:
        """``load_ckpt_info`` (or the legacy ``load_ckpt_folder``), validated at start-up."""
        ck = self.cfg.ckpt
        if ck.load_ckpt_info is not None:
            return parse_load_info(ck.load_ckpt_info)
        if ck.load_ckpt_folder:
            parts = parse_content(("model", "sampler", "optimizer"), "ckpt.load_ckpt_folder")
            return LoadRequest(local_path(ck.load_ckpt_folder, "ckpt.load_ckpt_folder"), parts,
                               "internevo", "ckpt.load_ckpt_folder")
        return None

    def _own_folder(self) -> Optional[FolderLock]:
        """Rank 0 takes the save folder's lock (before anything in it is touched); every rank
        hears whether that worked."""
        error, lock = "", None
        if self.layout.rank == 0:
            try:
                lock = FolderLock.acquire(self.save_folder, self.cfg.JOB_NAME)
            except CheckpointError as err:
                error = str(err)
        self._agree(error, "the save folder's lock")
        return lock

    def _agree(self, error: str, what: str) -> None:
        """Raise on every rank when any rank has an ``error`` (the lowest such rank's own line
        names the problem; the others name that rank)."""
        if self.layout.world_size > 1:
            world = self.layout.world_size
            first = torch.tensor([self.layout.rank if error else world], dtype=torch.int64,
                                 device=self.device)
            self.comm.all_reduce(first, "world", op="min")
            if not error and first.item() < world:
                error = f"rank {first.item()} refused {what} (its error line says why)"
        if error:
            raise CheckpointError(error)

    def _checkpoint_group(self) -> Any:
        """A gloo group of all ranks for DCP: asynchronous saves run collectives in a thread,
        which must not share a communicator with the training collectives of the main thread."""
        if self.layout.world_size > 1 and dist.is_initialized():
            fake = "fake" in str(dist.get_backend())  # the dry run's process group
            return dist.new_group(backend=None if fake else "gloo", timeout=self.layout.timeout)
        return None

    def _dcp_kwargs(self) -> dict:
        return {"process_group": self._pg} if self._pg is not None else {"no_dist": True}

    def _reset_stop_file(self) -> None:
        """Spec §6.5: rank 0 (re)creates the stop file with "0" at start."""
        if self.stop_file is not None:
            self.stop_file.parent.mkdir(parents=True, exist_ok=True)
            self.stop_file.write_text("0")

    def _remove_stale(self) -> None:
        """Half-written (``.tmp-``) and half-deleted (``.trash-``) folders of an earlier run:
        this run holds the folder's lock, so whoever wrote them has exited."""
        if not self.saving or not self.save_folder.is_dir():
            return
        for child in self.save_folder.iterdir():
            if child.is_dir() and child.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(child, ignore_errors=True)

    def _say(self, msg: str) -> None:
        if self.layout.is_log_rank:
            print(f"[internevo] checkpoint: {msg}", flush=True)

    # ---------------------------------------------------------------------------- resume
    def maybe_resume(self) -> bool:
        """Load the newest complete checkpoint (or ``load_ckpt_info``); True if something loaded."""
        request = self.resume_request()
        if request is None:
            return False
        self.load(request)
        return True

    def resume_request(self) -> Optional[LoadRequest]:
        """Auto-resume wins when ``save_ckpt_folder`` holds a complete checkpoint; otherwise
        ``load_ckpt_info`` (so a first run can start from pre-trained weights)."""
        if self.cfg.ckpt.auto_resume and self.save_folder is not None:
            latest = self._agreed_latest()
            if latest is not None:
                if self.explicit is not None:
                    self._say(f"auto_resume: {latest} overrides {self.explicit.source}")
                return LoadRequest(latest, frozenset(PARTS), "internevo", "auto_resume")
        return self.explicit

    def _agreed_latest(self) -> Optional[Path]:
        """Rank 0 picks the newest complete checkpoint and tells the others (one decision).
        A complete InternEvo checkpoint in the save folder counts too (an InternEvo run's
        ``save_ckpt_folder`` continues here)."""
        key = (-1, 0)
        if self.layout.rank == 0:
            found = [p for p in (latest_checkpoint(self.save_folder),
                                 find_checkpoint(self.save_folder, complete_only=True)) if p]
            key = max((checkpoint_step(p.name) for p in found), default=key)
        found = torch.tensor(key, dtype=torch.int64, device=self.device)
        self.comm.broadcast(found, "world")
        step, k = found.tolist()
        return None if step < 0 else self.save_folder / (f"{step}.{k}" if k else str(step))

    def load(self, request: LoadRequest) -> None:
        """Load ``request.parts`` into the run's parts (errors name the file, tensor or key)."""
        start = time.perf_counter()
        if not request.path.exists():
            raise CheckpointError(f"{request.source}.path: {request.path} does not exist")
        if request.ckpt_type == "hf":
            self._load_hf(request)
        elif is_internevo_checkpoint(request.path):
            request = self._load_internevo(request)
        else:
            folder = self._checkpoint_folder(request)
            meta = self._verify(folder, request.parts)
            self._load_tensors(folder, meta, request)
            if meta is not None:
                self._load_extras(folder, meta, request.parts)
            request = LoadRequest(folder, request.parts, request.ckpt_type, request.source)
        st = self.state
        self._seen_step = st.step_count
        if "train_state" in request.parts:
            self._saved_batch, self._saved_step = st.batch_count, st.step_count
        self._say(f"loaded {', '.join(sorted(request.parts))} from {request.path} "
                  f"({request.source}) in {time.perf_counter() - start:.1f}s: step "
                  f"{st.step_count}, batch {st.batch_count}")

    def _verify(self, folder: Path, parts: frozenset) -> Optional[dict]:
        """:func:`verify_checkpoint` with the checksum reading split over the ranks."""
        meta, error = None, ""
        try:
            meta = verify_checkpoint(folder, parts, (self.layout.rank, self.layout.world_size))
        except CheckpointError as err:
            error = str(err)
        self._agree(error, f"the checkpoint {folder}")
        return meta

    def _checkpoint_folder(self, request: LoadRequest) -> Path:
        """The folder itself, or the newest checkpoint when it is a run's save folder."""
        path = request.path
        if marker_step(path) is None and not (path / DCP_METADATA).exists():
            latest = latest_checkpoint(path)
            if latest is not None:
                return latest
        return path

    def _load_tensors(self, folder: Path, meta: Optional[dict], request: LoadRequest) -> None:
        """Model weights and optimizer tensors through DCP (resharded to this layout); ``meta``
        (None for a model-only folder) holds the optimizer's scalars.  Tensors the model lacks
        are refused unless ``request.strict`` is False; non-finite values are refused."""
        parts = request.parts
        state: dict[str, Any] = {}
        opt_plain: dict = {}
        optimizer = self.parts["optimizer"]
        if "model" in parts:
            state["model"] = self.parts["model"].state_dict()  # parameter views: loaded in place
        if "optimizer" in parts:
            state["optimizer"], opt_plain = split_tree(_optimizer_state(optimizer))
        if not state:
            return
        saved = saved_shapes(folder)
        disk, copies = checkpoint_layout(state, self.spec, saved)  # views: loading fills ``state``
        expected = flat_shapes(disk)
        check_tensors(folder, expected, asdict(self.cfg.model), saved)
        self._check_extra(folder, request, set(saved) - self._every_stage(set(expected)))
        try:
            dcp.load(disk, storage_reader=dcp.FileSystemReader(str(folder)), **self._dcp_kwargs())
        except (Exception, dcp.CheckpointException) as err:
            raise CheckpointError(f"{folder}: reading the checkpoint failed: "
                                  f"{_reason(err)}") from err
        copy_back(copies)
        self._agree(non_finite(disk, str(folder)), f"the checkpoint {folder}")
        if "optimizer" in parts:
            plain = merge_tree(opt_plain, meta_field(meta, "optimizer", folder))
            optimizer.load_state_dict(merge_tree(state["optimizer"], plain))
            if "model" not in parts:
                optimizer.after_update()  # the masters are the truth: weights follow them
        else:
            optimizer.refresh_masters_from_params()

    def _every_stage(self, names: set[str]) -> set[str]:
        """``names`` of this rank joined with those of the other pipeline stages: a stage holds
        only its own blocks, the checkpoint every stage's (gathered outside :class:`Comm`, like
        DCP's own collectives)."""
        group = self.layout.group("pipeline")
        if group is None:
            return names
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, sorted(names), group=group)
        return set().union(*(set(g) for g in gathered))

    def _check_extra(self, folder: Path, request: LoadRequest, extra: set[str]) -> None:
        """Tensors of the loaded parts that this model does not have: refused (strict), else
        named in a warning and left out."""
        prefixes = tuple(f"{p}." for p in ("model", "optimizer") if p in request.parts)
        extra = sorted(k for k in extra if k.startswith(prefixes))
        if not extra:
            return
        names = f"{len(extra)} tensors, e.g. {', '.join(repr(k) for k in extra[:3])}"
        if request.strict:
            raise CheckpointError(f"{folder}: holds tensors this model does not have ({names})"
                                  f"{config_hint(folder, asdict(self.cfg.model))}; fix the "
                                  f"model config, or set {request.source}.strict=False to leave "
                                  "them out")
        log.warning("%s: leaving out tensors this model does not have (%s; strict=False)",
                    folder, names)

    def _load_extras(self, folder: Path, meta: dict, parts: frozenset) -> None:
        if "scheduler" in parts:
            self.parts["schedules"].load_state_dict(meta_field(meta, "schedules", folder))
        if "train_state" in parts:
            self.state.load_state_dict(meta_field(meta, "train_state", folder))
        if "sampler" in parts:
            self.parts["loader"].load_state_dict(load_torch(self._loader_file(folder, meta)))
        if "rng" in parts:
            path = folder / "rng" / f"rank{self.layout.rank}.pt"
            if path.is_file():
                set_rng_state(load_torch(path))
            else:
                log.warning("%s: no RNG state for rank %d (saved with world size %s); "
                            "RNG streams restart from the seed", folder, self.layout.rank,
                            meta.get("layout", {}).get("world_size"))

    def _loader_file(self, folder: Path, meta: dict) -> Path:
        """This data rank's loader state; with another data-parallel size, rank 0's (the loader
        then decides whether the position carries over)."""
        path = folder / "loader" / f"dp{self.layout.dp_rank}.pt"
        saved_dp = meta.get("layout", {}).get("data", self.layout.data)
        return path if saved_dp == self.layout.data else folder / "loader" / "dp0.pt"

    def _load_internevo(self, request: LoadRequest) -> LoadRequest:
        """An InternEvo run's own checkpoint (``model_tp*_pp*.pt`` ...): every rank reads the
        files, merges them into full tensors and keeps its part."""
        parts = request.parts - {"rng"}  # InternEvo saves no RNG states
        try:
            full = read_checkpoint(request.path, self.cfg, parts)
        except InternEvoCheckpointError as err:
            raise CheckpointError(f"{request.source}: {err}") from err
        load_full_state(self.parts, full, parts, str(full["folder"]), self.spec)
        return LoadRequest(full["folder"], parts, request.ckpt_type, request.source)

    def _load_hf(self, request: LoadRequest) -> None:
        """Weights of a Hugging Face folder (``ckpt_type="hf"``); masters follow the weights."""
        from internevo.convert.hf_folder import load_hf_for_training

        try:
            state = load_hf_for_training(request.path, self.cfg)
        except ValueError as err:  # HFConversionError / ConfigError name the file and the key
            raise CheckpointError(f"{request.source} (ckpt_type='hf'): {err}") from err
        copy_full_state(self.parts["model"], state, str(request.path), self.spec)
        self.parts["optimizer"].refresh_masters_from_params()

    # ---------------------------------------------------------------------------- saving
    def after_step(self) -> bool:
        """Save when the cadence, the last batch or the stop file asks; True when training stops."""
        st = self.state
        action = self._stop_action()
        updated, self._seen_step = st.step_count != self._seen_step, st.step_count
        if self.saving and self._save_due(action, updated):
            self.save()
        self._warn_passed_stop_step(action)
        stop = action > 0 and action == st.step_count
        if stop:
            self._say(f"stop file {self.stop_file} asked to stop at step {action}")
        return stop

    def _warn_passed_stop_step(self, action: int) -> None:
        """A stop file naming a step this run has already passed is ignored: say so once."""
        step = self.state.step_count
        if action and abs(action) < step and action != self._passed_stop and self.layout.rank == 0:
            log.warning("stop file %s names step %d, which this run passed already (now at "
                        "step %d): ignored; write a later step", self.stop_file, abs(action), step)
            self._passed_stop = action

    def save_now(self) -> Optional[Path]:
        """Save the current state unless it is saved already, and wait for it (a stop on a
        signal); the checkpoint folder, or None when saving is not configured."""
        if not self.saving:
            return None
        if self.state.batch_count != self._saved_batch:
            self.save()
        self.wait()
        return self._saved_path or self.save_folder / str(self._saved_step)

    def _save_due(self, action: int, updated: bool) -> bool:
        """checkpoint_every (successful updates only), the last batch, or the stop file's step;
        never the same state twice."""
        st, every = self.state, self.cfg.ckpt.checkpoint_every
        if updated and every and st.step_count % every == 0:
            return True
        if st.batch_count >= self.cfg.data.total_steps and st.batch_count != self._saved_batch:
            return True
        return action != 0 and abs(action) == st.step_count and st.step_count != self._saved_step

    def _stop_action(self) -> int:
        """Rank 0 reads the stop file, every rank gets the value (0 = nothing to do)."""
        if self.stop_file is None:
            return 0
        value = torch.zeros(1, dtype=torch.int64, device=self.device)
        if self.layout.rank == 0:
            value.fill_(self._read_stop_file())
        self.comm.broadcast(value, "world")
        return int(value.item())

    def _read_stop_file(self) -> int:
        try:
            text = self.stop_file.read_text().strip()
        except FileNotFoundError:
            return 0
        try:
            return int(text or 0)
        except ValueError:
            if text != self._bad_stop_text:  # warn once per distinct content, not every step
                log.warning("stop file %s holds %r, not an integer: ignored", self.stop_file, text)
                self._bad_stop_text = text
            return 0

    def save(self) -> Path:
        """Write a checkpoint of the current state (in the background with ``async_save``)."""
        if self.save_folder is None:
            raise CheckpointError("ckpt.save_ckpt_folder is not set: nowhere to save")
        self.wait()  # one save in flight at a time
        st = self.state
        step = st.step_count
        tmp = self.save_folder / f"{TMP_PREFIX}{step}"
        self._prepare(tmp)
        state, opt_plain = self.save_state()
        self._write_extras(tmp, step, opt_plain)
        self._saved_batch, self._saved_step = st.batch_count, step
        writer = dcp.FileSystemWriter(str(tmp))
        if self._executor is None:
            self._run_dcp(lambda: dcp.save(state, storage_writer=writer, **self._dcp_kwargs()), tmp)
            self._complete(tmp, step)
        else:  # DCP stages (copies) the tensors before returning; writing goes on in a thread
            future = self._run_dcp(
                lambda: dcp.async_save(state, storage_writer=writer, async_stager=CpuStager(),
                                       **self._dcp_kwargs()), tmp)
            self._pending = self._executor.submit(self._complete_async, future, tmp, step)
        return self.save_folder / str(step)

    def save_state(self) -> tuple[dict, dict]:
        """What a save hands to DCP (model and optimizer tensors in the checkpoint layout) and
        the optimizer's plain values (for ``meta.json``); the dry run builds it too."""
        opt_tensors, opt_plain = split_tree(_optimizer_state(self.parts["optimizer"]))
        state, _ = checkpoint_layout({"model": self.parts["model"].state_dict(),
                                      "optimizer": opt_tensors}, self.spec)
        return state, opt_plain

    def _prepare(self, tmp: Path) -> None:
        """Rank 0 starts from an empty temporary folder before any rank writes into it."""
        if self.layout.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.comm.barrier()

    def _write_extras(self, tmp: Path, step: int, opt_plain: dict) -> None:
        """The small files; every rank writes its own before entering the (collective) DCP save,
        so they all exist once rank 0's DCP save returns."""
        lay = self.layout
        if lay.rank == 0:
            write_json(tmp / META_FILE, self._meta(step, opt_plain))
            write_json(tmp / MODEL_CONFIG_FILE, asdict(self.cfg.model))
            write_bytes(tmp / CONFIG_FILE, config_text(self.cfg).encode())
        if lay.tp_rank == 0 and lay.pp_rank == 0:  # loader states differ per data rank only
            save_torch(tmp / "loader" / f"dp{lay.dp_rank}.pt", self.parts["loader"].state_dict())
        save_torch(tmp / "rng" / f"rank{lay.rank}.pt", rng_state())

    def _meta(self, step: int, opt_plain: dict) -> dict:
        lay = self.layout
        layout = {"world_size": lay.world_size, "tensor": lay.tensor, "data": lay.data,
                  "pipeline": lay.pipeline, "zero1": lay.zero1, "fsdp": lay.fsdp}
        return meta_record(self.cfg, step, layout, self.state.state_dict(),
                           self.parts["schedules"].state_dict(), opt_plain)

    def _run_dcp(self, fn: Callable[[], Any], tmp: Path) -> Any:
        try:
            return fn()
        except (Exception, dcp.CheckpointException) as err:
            raise CheckpointError(f"writing checkpoint {tmp} failed: {_reason(err)}; earlier "
                                  "checkpoints are untouched") from err

    def _complete_async(self, future: Future, tmp: Path, step: int) -> None:
        self._run_dcp(future.result, tmp)
        self._complete(tmp, step)

    def _complete(self, tmp: Path, step: int) -> None:
        """Rank 0 marks the checkpoint complete and prunes; every rank learns whether it worked."""
        error, final = "", self.save_folder / str(step)
        if self.layout.rank == 0:
            try:
                final = finalize(tmp, self.save_folder, step)
            except Exception as err:  # other ranks must hear of it, not hang in the broadcast
                error = f"{type(err).__name__}: {err}"
        if self._pg is not None:
            flag = torch.tensor([1 if error else 0], dtype=torch.int64)
            dist.broadcast(flag, src=0, group=self._pg)
            error = error or ("rank 0 failed to finalise it" if flag.item() else "")
        if error:
            raise CheckpointError(f"completing checkpoint {tmp} failed: {error}; earlier "
                                  "checkpoints are untouched")
        taken = "" if final.name == str(step) else f" ({step} exists: never replaced)"
        self._say(f"saved step {step} to {final}{taken}")
        self._saved_path = final
        if self.layout.rank == 0:
            self._prune(step)

    def _prune(self, step: int) -> None:
        """keep_last_n: drop the oldest complete checkpoints before ``step`` (never newer ones,
        which another run may still want)."""
        keep = self.cfg.ckpt.keep_last_n
        if not keep:
            return
        older = [p for s, p in complete_checkpoints(self.save_folder) if s < step]
        for folder in older[:max(0, len(older) - (keep - 1))]:
            try:
                remove_checkpoint(folder)
            except OSError as err:  # the new checkpoint is safe; a leftover old one is harmless
                log.warning("keep_last_n: could not remove %s: %s", folder, err)

    def wait(self) -> None:
        """Block until the asynchronous save in flight is complete; re-raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def finish(self) -> None:
        """Save the final state if the loop ended without doing so, then wait for saves."""
        st = self.state
        if (self.saving and st.batch_count >= self.cfg.data.total_steps
                and st.batch_count != self._saved_batch):
            self.save()  # the last batches were skipped, so after_step never saw the end
        self.wait()
        self.comm.barrier()

    def release(self) -> None:
        """Give the save folder's lock back (the run is over, or failed)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
