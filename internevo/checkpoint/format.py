"""The on-disk checkpoint format, shared by the checkpoint manager and the converters.

One checkpoint is one folder ``<save_ckpt_folder>/<step>/`` (``step`` = successful updates)::

    .metadata  __<r>_0.distcp    DCP: ``model.<name>`` and ``optimizer.params.<name>.<key>`` tensors
    meta.json                    format, step, train state, schedules, optimizer scalars, layout
    model_config.json            the run's ``model`` section
    config.py                    the run's config file
    loader/dp<d>.pt              data-loader state of data-parallel rank ``d``
    rng/rank<r>.pt               Python / NumPy / torch (/ CUDA) RNG states of global rank ``r``
    manifest.json                size of every file above (truncation check on load)
    <step>.step                  completion marker, written last

It is written as ``.tmp-<step>/`` and renamed to ``<step>/`` only once the marker is inside, so a
numbered folder is complete by construction.  A *model-only* folder (``internevo convert
from-hf``: DCP ``model.*`` tensors + ``config.py`` + ``model_config.json``, written atomically
through :func:`staged_dir`, no marker) loads with ``content=("model",)``.

Tensors are saved with their global, layout-independent shapes; a model may store some in
another shape (``spec.checkpoint_shape``: InternLM v1's fused ``Wqkv`` as ``[3, H*d, ...]``,
the shape tensor parallel holds it in): :func:`to_checkpoint_shape` / :func:`from_checkpoint_shape`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import warnings
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from internevo.config import ModelConfig, TrainConfig, load_config
from internevo.errors import InternEvoError
from internevo.models.base import ModelSpec
from internevo.models.registry import foreign_keys, get_spec

FORMAT, FORMAT_VERSION = "internevo-dcp", 1
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.py"
MODEL_CONFIG_FILE = "model_config.json"
DCP_METADATA = ".metadata"
TMP_PREFIX, TRASH_PREFIX = ".tmp-", ".trash-"
MODEL_PREFIX = "model."
"""DCP keys of the model weights: ``model.<parameter name>``."""
_BACKEND = re.compile(r"^([A-Za-z][A-Za-z0-9_]+):")
_CKPT_NAME = re.compile(r"^(\d+)(?:\.(\d+))?$")
_CHUNK = 1 << 20


class CheckpointError(InternEvoError, RuntimeError):
    """A checkpoint cannot be written or read; the message names the file, tensor or config key."""

    kind = "checkpoint error"


# ------------------------------------------------------------------------------------ paths


def local_path(path: str, key: str) -> Path:
    """``path`` without a ``local:`` prefix; object-store backends are refused (naming ``key``)."""
    text = str(path)
    match = _BACKEND.match(text)
    if match:
        if match.group(1) != "local":
            raise CheckpointError(f"{key}: storage backend {match.group(1)!r} of {text!r} is not "
                                  "supported; use a local path (optionally 'local:<path>')")
        text = text[len("local:"):]
    return Path(text).expanduser()


def marker_step(folder: Path) -> Optional[int]:
    """The step named by the completion marker ``<step>.step`` inside ``folder`` (None: none)."""
    if not folder.is_dir():
        return None
    steps = [int(p.stem) for p in folder.glob("*.step") if p.stem.isdigit() and p.is_file()]
    return max(steps) if steps else None


def checkpoint_step(name: str) -> Optional[tuple[int, int]]:
    """``"5"`` -> (5, 0); ``"5.2"`` -> (5, 2) (the third save of step 5 in this folder, by a run
    that found ``5`` taken); anything else -> None."""
    match = _CKPT_NAME.match(name)
    return None if match is None else (int(match.group(1)), int(match.group(2) or 0))


def complete_checkpoints(save_folder: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint in ``save_folder``, oldest first (a
    repeated step's later saves after its earlier ones)."""
    if not save_folder.is_dir():
        return []
    found = [(key, c) for c in save_folder.iterdir()
             if (key := checkpoint_step(c.name)) is not None and marker_step(c) == key[0]]
    return [(key[0], c) for key, c in sorted(found)]


def latest_checkpoint(save_folder: Path) -> Optional[Path]:
    """The newest complete checkpoint (by step) in ``save_folder``; incomplete ones never count."""
    found = complete_checkpoints(save_folder)
    return found[-1][1] if found else None


# ------------------------------------------------------------------------------ small files


def write_bytes(path: Path, data: bytes) -> None:
    """Write and fsync: the marker must never reach the disk before the files it vouches for."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, obj: Any) -> None:
    write_bytes(path, json.dumps(obj, indent=1).encode())


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` whose short write (torch says ``unexpected pos``) names the file and the
    free space on its device."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.save(obj, path)
    except RuntimeError as err:
        if "unexpected pos" not in str(err) and "failed writing" not in str(err):
            raise
        free = shutil.disk_usage(path.parent).free
        raise CheckpointError(f"{path}: the write came out short; {free} bytes are free on its "
                              "device: no space left there? Free space or choose another "
                              "ckpt.save_ckpt_folder") from None


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err}); the checkpoint is corrupted") from None


def load_torch(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable ({err}); the checkpoint is corrupted") from None


def meta_field(meta: dict, key: str, folder: Path) -> Any:
    if key not in meta:
        raise CheckpointError(f"{folder / META_FILE}: has no {key!r} entry")
    return meta[key]


# ---------------------------------------------------------------------- completion and checks


def file_crc32(path: Path) -> int:
    """CRC-32 of a file's bytes (zlib; about 1 GB/s, a fraction of writing it)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_manifest(folder: Path) -> None:
    """Record the size and CRC-32 of every file in ``folder`` (both checked on load)."""
    paths = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in paths}
    crc32 = {p.relative_to(folder).as_posix(): file_crc32(p) for p in paths}
    write_json(folder / MANIFEST_FILE, {"files": files, "crc32": crc32})


def free_name(save_folder: Path, step: int) -> Path:
    """``<step>``, or ``<step>.<k>`` with the first free ``k`` when a checkpoint of that step is
    there already (another run's, or this run's before it restarted from an older state): a
    save never replaces a checkpoint."""
    final, k = save_folder / str(step), 0
    while final.exists():
        k += 1
        final = save_folder / f"{step}.{k}"
    return final


def finalize(tmp: Path, save_folder: Path, step: int) -> Path:
    """Manifest, marker, then the atomic rename ``.tmp-<step>`` -> ``<step>`` (or a free
    ``<step>.<k>``: :func:`free_name`) (rank 0 only); returns the checkpoint folder."""
    write_manifest(tmp)
    write_json(tmp / f"{step}.step", {"step": step})
    final = free_name(save_folder, step)
    tmp.rename(final)
    fd = os.open(save_folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


def remove_checkpoint(folder: Path) -> None:
    """Rename first (one atomic step makes it incomplete), then delete."""
    trash = folder.with_name(f"{TRASH_PREFIX}{folder.name}")
    shutil.rmtree(trash, ignore_errors=True)
    folder.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def check_manifest(folder: Path, manifest: dict, share: tuple[int, int] = (0, 1)) -> None:
    """Every file the manifest lists is there with its size and (when recorded) its CRC-32.

    ``share = (index, count)``: check the checksums of every ``count``-th file from ``index``
    only (the ranks of a job split the reading); sizes are always checked.
    """
    crcs = manifest.get("crc32", {})
    for i, (name, size) in enumerate(sorted(manifest.get("files", {}).items())):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; the checkpoint is incomplete")
        if path.stat().st_size != size:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes but {size} were written; "
                                  "the checkpoint is truncated or corrupted")
        if name not in crcs or i % share[1] != share[0]:
            continue
        crc = file_crc32(path)
        if crc != crcs[name]:
            raise CheckpointError(f"{path}: checksum mismatch (crc32 {crc:08x}, "
                                  f"{crcs[name]:08x} when written): the file was damaged after "
                                  "it was saved; load an earlier checkpoint")


def verify_checkpoint(folder: Path, parts: Iterable[str],
                      share: tuple[int, int] = (0, 1)) -> Optional[dict]:
    """``meta.json`` of a complete, undamaged checkpoint; None for a model-only folder.

    Model-only folders (``internevo convert from-hf``: DCP ``model.*`` tensors + ``config.py``,
    written atomically, no marker) are accepted when only the model is asked for; their manifest
    (when they have one) is checked too.  ``share``: see :func:`check_manifest`.
    """
    step = marker_step(folder)
    if step is None:
        if (folder / META_FILE).exists() or folder.name.startswith(TMP_PREFIX):
            raise CheckpointError(f"{folder}: incomplete checkpoint (no '<step>.step' completion "
                                  "marker): its save was interrupted; load an earlier one")
        if not (folder / DCP_METADATA).is_file():
            raise CheckpointError(f"{folder}: not a checkpoint (no '<step>.step' marker and no "
                                  f"DCP {DCP_METADATA} file)")
        if set(parts) != {"model"}:
            raise CheckpointError(f"{folder}: holds model weights only (no {META_FILE}); load it "
                                  "with content=('model',)")
        if (folder / MANIFEST_FILE).is_file():
            check_manifest(folder, read_json(folder / MANIFEST_FILE), share)
        return None
    check_manifest(folder, read_json(folder / MANIFEST_FILE), share)
    meta = read_json(folder / META_FILE)
    if meta.get("format") != FORMAT or meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{folder / META_FILE}: format {meta.get('format')!r} version "
                              f"{meta.get('version')!r} is not {FORMAT!r} <= {FORMAT_VERSION}")
    return meta


def config_hint(folder: Path, model_cfg: dict) -> str:
    """Which model settings differ from the checkpoint's (appended to shape errors)."""
    path = folder / MODEL_CONFIG_FILE
    if not path.is_file():
        return ""
    saved = json.loads(path.read_text())
    diffs = [f"{k}={saved[k]!r} (now {model_cfg[k]!r})" for k in model_cfg
             if k in saved and saved[k] != model_cfg[k]]
    return f"; the checkpoint's model config differs: {', '.join(diffs[:6])}" if diffs else ""


def saved_shapes(folder: Path) -> dict[str, tuple]:
    """DCP key -> global shape of every tensor in the checkpoint ``folder``."""
    try:
        saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    except Exception as err:
        raise CheckpointError(f"{folder / DCP_METADATA}: unreadable DCP metadata ({err})") from None
    return {k: tuple(m.size) for k, m in saved.items() if isinstance(m, TensorStorageMetadata)}


def check_tensors(folder: Path, expected: dict[str, tuple], model_cfg: dict,
                  saved: Optional[dict[str, tuple]] = None) -> None:
    """Every expected tensor is in the checkpoint with the same (global) shape (``expected`` in
    the checkpoint layout: see :func:`checkpoint_layout`)."""
    saved = saved_shapes(folder) if saved is None else saved
    for key, shape in expected.items():
        if key not in saved:
            raise CheckpointError(f"{folder}: tensor {key!r} is not in the checkpoint"
                                  f"{config_hint(folder, model_cfg)}")
        if saved[key] != tuple(shape):
            raise CheckpointError(f"{folder}: tensor {key!r} has shape {saved[key]} in the "
                                  f"checkpoint but {tuple(shape)} in this model"
                                  f"{config_hint(folder, model_cfg)}")


# --------------------------------------------------------------------- model-specific shapes


def to_checkpoint_shape(spec: ModelSpec, name: str, t: Tensor) -> Optional[Tensor]:
    """``t`` in its checkpoint shape: itself, or a *view* of it (so a load into the result writes
    into ``t``); None when no view exists (a DTensor not sharded the way the checkpoint shape
    assumes, e.g. an FSDP shard of v1's ``Wqkv``: the caller goes through the full tensor)."""
    shape = spec.checkpoint_shape(name, tuple(t.shape))
    if shape is None or tuple(t.shape) == shape:
        return t
    if hasattr(t, "to_local"):
        return None
    return t.view(shape)


def from_checkpoint_shape(spec: ModelSpec, name: str, t: Tensor) -> Tensor:
    """Inverse of :func:`to_checkpoint_shape` for full tensors: the single-process model's
    shape (a view); tensors saved in their own shape pass through."""
    shape = spec.checkpoint_shape(name, tuple(t.shape))
    if shape is None or tuple(t.shape) != shape:
        return t
    return t.flatten(0, 1)


# ---------------------------------------------------------------------- model-only folders


@contextlib.contextmanager
def staged_dir(target: Union[str, Path], overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty sibling folder that replaces ``target`` only if the block succeeds.

    A non-empty ``target`` is refused unless ``overwrite``; on any error the half-written folder
    is removed and ``target`` is untouched.
    """
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise FileExistsError(f"{target}: exists and is not empty (pass --overwrite to replace it)")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        tmp.rename(target)


@contextlib.contextmanager
def _single_process_dcp() -> Iterator[None]:
    """DCP warns on every single-process call, which is exactly what the converter does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def config_text(cfg: TrainConfig) -> str:
    """A loadable config file holding ``cfg``'s model (the text of ``cfg`` when it has one)."""
    if cfg.text:
        return cfg.text
    foreign = set(foreign_keys(cfg.model_type))
    defaults = ModelConfig()
    model = {f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(ModelConfig)
             if f.name not in foreign and getattr(cfg.model, f.name) != getattr(defaults, f.name)}
    body = ",\n".join(f"    {k}={v!r}" for k, v in model.items())
    return (f"# written by internevo (model only)\nJOB_NAME = {cfg.JOB_NAME!r}\n"
            f"model_type = {cfg.model_type!r}\nmodel = dict(\n{body},\n)\n")


def save_model_state(path: Union[str, Path], sd: dict[str, Tensor], cfg: TrainConfig,
                     overwrite: bool = False) -> Path:
    """Write a model-only folder: DCP ``model.<name>`` tensors (in their checkpoint shapes),
    config.py and model_config.json, which the trainer loads with ``content=("model",)``."""
    spec = get_spec(cfg.model_type)
    with staged_dir(path, overwrite) as tmp:
        state = {MODEL_PREFIX + k: to_checkpoint_shape(spec, k, v.contiguous())
                 for k, v in sd.items()}
        with _single_process_dcp():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp)), no_dist=True)
        (tmp / CONFIG_FILE).write_text(config_text(cfg))
        model = json.dumps(dataclasses.asdict(cfg.model), indent=2)
        (tmp / MODEL_CONFIG_FILE).write_text(model + "\n")
        write_manifest(tmp)
    return Path(path)


def resolve_model_folder(path: Path) -> Path:
    """A checkpoint folder (or model-only folder), or the newest complete checkpoint of a run's
    save folder; checked for completeness (marker, manifest)."""
    folder = path
    if marker_step(path) is None and not (path / DCP_METADATA).is_file():
        folder = latest_checkpoint(path) or path
    verify_checkpoint(folder, ("model",))
    return folder


def load_model_state(path: Union[str, Path]) -> tuple[dict[str, Tensor], TrainConfig]:
    """(model state dict, run config) of a checkpoint or model-only folder (DCP, read on one
    process), in the single-process model's shapes whatever the run's parallel layout."""
    folder = resolve_model_folder(Path(path))
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"{folder / CONFIG_FILE}: missing (the run's config file is "
                              "needed to know the model)")
    cfg = load_config(folder / CONFIG_FILE)
    reader = dcp.FileSystemReader(str(folder))
    meta = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if k.startswith(MODEL_PREFIX) and isinstance(m, TensorStorageMetadata)}
    if not state:
        raise CheckpointError(f"{folder}: no '{MODEL_PREFIX}*' tensors in the checkpoint")
    with _single_process_dcp():
        dcp.load(state, storage_reader=reader, no_dist=True)
    spec = get_spec(cfg.model_type)
    names = {k: k[len(MODEL_PREFIX):] for k in state}
    return {names[k]: from_checkpoint_shape(spec, names[k], v) for k, v in state.items()}, cfg
