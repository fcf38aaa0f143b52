"""InternEvo's own checkpoint folders (spec §6.2): read them into full per-parameter state, and
write model weights back in InternEvo's layout.

One InternEvo checkpoint ``<save_ckpt_folder>/<step>/`` holds, for tensor rank ``t``, pipeline
stage ``p`` and zero1 rank ``z``::

    model_tp{t}_pp{p}.pt                   the stage's state dict: local block indices, TP shards
    optimizer_tp{t}_pp{p}_zo{z}.pt         grad_scaler, base_optim_states (AdamW over one flat fp32
                                           master per param group), flat_fp32_weights
    gpus-{W}_wp-{w}_tp-{t}_dp-{d}_pp-{p}_zo-{z}.pt   the partition plan: per group, per zero1 rank,
                                           the ids "{index in numel-sorted order}_{shape}" it owns
    context.pt  schedulder.pt  sampler.pt  train counters, LR scheduler, batch sampler
    config_file.pt  model_config.pt  <step>.step

Reading merges the pipeline stages (block indices shifted by the blocks of the earlier stages),
then the tensor shards (InternLM v1's per-rank ``[3, H/tp, d]`` ``Wqkv`` rows, InternLM2's
KV-group-major ``wqkv``, either embedding split), into the single-process state dict of our model;
the optimizer's flat shards are cut back into per-parameter masters and moments by the plan and
merged the same way.  The trainer then loads that full state into any layout
(:func:`internevo.checkpoint.manager.CheckpointManager.load`).  Every ``.pt`` file is read with
``torch.load(weights_only=True)``; ``sampler.pt`` needs NumPy's array reconstruction allowed (its
RNG state and indices are NumPy arrays) and nothing else.  ``model_config.pt`` pickles InternEvo's
``Config`` class, which ``weights_only`` refuses: it is never read (the model comes from the run's
config, or from the config text in ``config_file.pt``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from internevo.config import TrainConfig
from internevo.data.loader import STATE_VERSION
from internevo.errors import InternEvoError
from internevo.models.registry import get_spec

log = logging.getLogger(__name__)

MODEL_FILE = re.compile(r"model_tp(\d+)_pp(\d+)\.pt")
OPTIMIZER_FILE = re.compile(r"optimizer_tp(\d+)_pp(\d+)_zo(\d+)\.pt")
PLAN_FILE = re.compile(r"gpus-(\d+)_wp-(\d+)_tp-(\d+)_dp-(\d+)_pp-(\d+)_zo-(\d+)\.pt")
_REFUSED_FILES = {
    re.compile(r"model_tp\d+_wp\d+_pp\d+\.pt"): "an ISP (weight-parallel) checkpoint",
    re.compile(r"model_tp\d+_pp\d+_dp\d+\.pt"): "an FSDP checkpoint",
    re.compile(r"model_moe_layer\d+_expert\d+_tp\d+\.pt"): "an MoE checkpoint",
}
_BUFFER = re.compile(r"(^|\.)inv_freq$")  # RoPE buffers some InternEvo versions save
_GROUPS = ("default", "fp32")  # InternEvo's optimizer param groups without ISP / MoE
_MOMENTS = ("exp_avg", "exp_avg_sq")


class InternEvoCheckpointError(InternEvoError, ValueError):
    """An InternEvo checkpoint cannot be read or written (the message names the file)."""

    kind = "checkpoint error"


# --------------------------------------------------------------------------------------------
# folders and files


def has_model_files(folder: Path) -> bool:
    """Whether ``folder`` holds InternEvo model files (of any parallel layout)."""
    if not folder.is_dir():
        return False
    patterns = (MODEL_FILE, *_REFUSED_FILES)
    return any(p.fullmatch(f.name) for f in folder.iterdir() for p in patterns)


def find_checkpoint(path: Path, complete_only: bool = False) -> Optional[Path]:
    """``path`` itself when it is an InternEvo checkpoint; in a save folder, the newest step
    folder with a ``<step>.step`` marker (else, unless ``complete_only``, the newest one with
    model files, as InternEvo does)."""
    if has_model_files(path):
        return path
    if not path.is_dir():
        return None
    steps = sorted((int(c.name), c) for c in path.iterdir()
                   if c.name.isdigit() and has_model_files(c))
    marked = [c for s, c in steps if (c / f"{s}.step").is_file()]
    if marked or complete_only:
        return marked[-1] if marked else None
    return steps[-1][1] if steps else None


def require_checkpoint(path: Path) -> Path:
    """:func:`find_checkpoint`, raising (one line naming ``path``) when there is none."""
    folder = find_checkpoint(path)
    if folder is None:
        raise InternEvoCheckpointError(f"{path}: no InternEvo model_tp*_pp*.pt files here or in "
                                       "a numbered step folder")
    return folder


def _safe_numpy_globals() -> list:
    """What unpickling NumPy arrays needs (InternEvo's sampler state), under both module names."""
    reconstruct, scalar = np._core.multiarray._reconstruct, np._core.multiarray.scalar
    return [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"), scalar,
            (scalar, "numpy.core.multiarray.scalar"), np.ndarray, np.dtype,
            *{type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFD"}]


def load_pt(path: Path, numpy: bool = False) -> Any:
    """``torch.load(weights_only=True)`` (with NumPy arrays allowed when ``numpy``)."""
    if not path.is_file():
        raise InternEvoCheckpointError(f"{path}: missing from the InternEvo checkpoint")
    try:
        with torch.serialization.safe_globals(_safe_numpy_globals() if numpy else []):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses a class, or the file is damaged
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InternEvoCheckpointError(f"{path}: cannot be read with torch.load(weights_only="
                                       f"True): {first}") from None


@dataclass(frozen=True)
class Layout:
    """The parallel layout an InternEvo checkpoint was written with (from its file names)."""

    tensor: int
    pipeline: int
    zero1: int
    """Optimizer files per (tensor, pipeline) pair (0: no optimizer files)."""
    world: int
    """World size of the run (from the plan file's name; tensor * pipeline when absent)."""
    data: int
    """Data-parallel size of the run: ``world / (tensor * pipeline)``."""


def scan(folder: Path) -> Layout:
    """Tensor / pipeline / zero1 sizes from the file names; refuses ISP, FSDP and MoE folders."""
    names = [f.name for f in folder.iterdir()]
    for pattern, what in _REFUSED_FILES.items():
        hit = next((n for n in names if pattern.fullmatch(n)), None)
        if hit:
            raise InternEvoCheckpointError(f"{folder / hit}: {what}; only tensor / pipeline / "
                                           "zero1-parallel dense checkpoints are read")
    model = {tuple(map(int, m.groups())) for n in names if (m := MODEL_FILE.fullmatch(n))}
    optim = {tuple(map(int, m.groups())) for n in names if (m := OPTIMIZER_FILE.fullmatch(n))}
    tp, pp = (max(x[i] for x in model) + 1 for i in (0, 1))
    _require_all(folder, model, {(t, p) for t in range(tp) for p in range(pp)},
                 "model_tp{}_pp{}.pt")
    zo = max((x[2] for x in optim), default=-1) + 1
    if zo:
        _require_all(folder, optim, {(t, p, z) for t in range(tp) for p in range(pp)
                                     for z in range(zo)}, "optimizer_tp{}_pp{}_zo{}.pt")
    plans = [tuple(map(int, m.groups())) for n in names if (m := PLAN_FILE.fullmatch(n))]
    world = plans[0][0] if plans else tp * pp * max(zo, 1)  # the name holds ranks, and W
    return Layout(tp, pp, zo, world, world // (tp * pp))


def _require_all(folder: Path, have: set, want: set, pattern: str) -> None:
    missing = sorted(want - have)
    if missing:
        raise InternEvoCheckpointError(f"{folder / pattern.format(*missing[0])}: missing (the "
                                       f"other files name {len(want)} of them)")


# --------------------------------------------------------------------------------------------
# names: one stage's keys -> our names (block indices still local)


_KEY = re.compile(r"^(?:(\d+)\.)?(?:model\.)?(.*)$")  # "<chunk>." with num_chunks > 1, "model."


def normalise_stage(sd: dict[str, Tensor], cfg: TrainConfig) -> dict[int, dict[str, Tensor]]:
    """One ``model_tp*_pp*.pt`` state dict -> ``{chunk: {our name: tensor}}``.

    Strips the ``model.`` / chunk prefixes, drops RoPE buffers, accepts the vocab-parallel
    embedding's ``.word_embeddings.`` and the model's older namings (``ModelSpec.legacy_names``:
    InternLM v1's ``w3`` as the down projection).
    """
    chunks: dict[int, dict[str, Tensor]] = {}
    for key, value in sd.items():
        chunk, name = _KEY.match(key).groups()
        if _BUFFER.search(name):
            continue
        chunks.setdefault(int(chunk or 0), {})[name.replace(".word_embeddings.", ".")] = value
    legacy = get_spec(cfg.model_type).legacy_names
    return {c: legacy(s, cfg.model) if legacy else s for c, s in chunks.items()}


# --------------------------------------------------------------------------------------------
# pipeline stages


def _blocks_attr(cfg: TrainConfig) -> str:
    return get_spec(cfg.model_type).blocks_attr


def block_count(sd: dict[str, Tensor], blocks: str) -> int:
    """Number of transformer blocks in one stage's state dict."""
    pattern = re.compile(rf"^{re.escape(blocks)}\.(\d+)\.")
    return len({m.group(1) for k in sd if (m := pattern.match(k))})


def merge_stages(stages: list[dict[str, Tensor]], blocks: str) -> dict[str, Tensor]:
    """Stage state dicts in model order (chunk-major) -> one, block indices made global."""
    pattern = re.compile(rf"^{re.escape(blocks)}\.(\d+)\.")
    out: dict[str, Tensor] = {}
    offset = 0
    for sd in stages:
        def shift(m: re.Match, by: int = offset) -> str:
            return f"{blocks}.{int(m.group(1)) + by}."

        for key, value in sd.items():
            out[pattern.sub(shift, key)] = value
        offset += block_count(sd, blocks)
    return out


def split_stages(sd: dict[str, Tensor], cfg: TrainConfig, pp: int) -> list[dict[str, Tensor]]:
    """Inverse of :func:`merge_stages` with InternEvo's partition (spec §3.7): ``L // pp`` blocks
    per stage, the last ``L % pp`` stages one more; embedding first, norm and head last."""
    blocks, layers = _blocks_attr(cfg), cfg.model.num_layers
    if not 1 <= pp <= layers:
        raise InternEvoCheckpointError(f"--pp {pp}: must be between 1 and num_layers={layers}")
    sizes = [layers // pp + (1 if p >= pp - layers % pp else 0) for p in range(pp)]
    starts = [sum(sizes[:p]) for p in range(pp)]
    pattern = re.compile(rf"^{re.escape(blocks)}\.(\d+)\.(.*)$")
    plan = get_spec(cfg.model_type).tp_plan
    out: list[dict[str, Tensor]] = [{} for _ in range(pp)]
    for key, value in sd.items():
        m = pattern.match(key)
        if m:
            i = int(m.group(1))
            p = max(s for s in range(pp) if starts[s] <= i)
            out[p][f"{blocks}.{i - starts[p]}.{m.group(2)}"] = value
        else:
            out[0 if key.startswith(f"{plan.embedding}.") else pp - 1][key] = value
    return out


# --------------------------------------------------------------------------------------------
# tensor shards


@dataclass(frozen=True)
class ShardRule:
    """How one parameter is split over tensor ranks."""

    dim: Optional[int]
    """Concatenation dim (None: replicated, rank 0's copy is the value)."""
    qkv: bool = False
    """InternLM v1's fused ``Wqkv``: each rank's rows are its heads of Q, then K, then V."""


def shard_rule(name: str, cfg: TrainConfig, embed_split_hidden: bool) -> ShardRule:
    """The rule of parameter ``name`` from the model's tensor-parallel plan."""
    plan = get_spec(cfg.model_type).tp_plan
    if name == f"{plan.embedding}.weight":
        return ShardRule(1 if embed_split_hidden else 0)
    if name == f"{plan.head}.weight":
        return ShardRule(0)
    parts = name.split(".")
    if len(parts) >= 5 and parts[2] in plan.regions:
        columns, rows = plan.regions[parts[2]]
        linear, kind = parts[3], parts[4]
        if linear in columns:
            return ShardRule(0, qkv=linear in plan.fused_qkv)
        if linear in rows:
            return ShardRule(1 if kind == "weight" else None)
    return ShardRule(None)


def _embed_split_hidden(shards: list[dict[str, Tensor]], cfg: TrainConfig) -> bool:
    """Which way the embedding was split, from its shapes (``embed_split_hidden`` either way)."""
    name = f"{get_spec(cfg.model_type).tp_plan.embedding}.weight"
    if len(shards) == 1 or name not in shards[0]:
        return cfg.model.embed_split_hidden
    return tuple(shards[0][name].shape) == (cfg.model.vocab_size,
                                            cfg.model.hidden_size // len(shards))


def merge_tensor_shards(shards: list[dict[str, Tensor]], cfg: TrainConfig) -> dict[str, Tensor]:
    """Per-tensor-rank state dicts (same names) -> full tensors in our single-process shapes."""
    split_hidden = _embed_split_hidden(shards, cfg)
    out = {}
    for name, first in shards[0].items():
        rule = shard_rule(name, cfg, split_hidden)
        if rule.dim is None or len(shards) == 1:
            out[name] = first
        elif rule.qkv:  # rank r: [Q_r; K_r; V_r] -> [Q; K; V]
            parts = [s[name].reshape(3, -1, *first.shape[1:]) for s in shards]
            out[name] = torch.cat(parts, dim=1).flatten(0, 1)
        else:
            out[name] = torch.cat([s[name] for s in shards], dim=rule.dim)
    return out


def split_tensor_shards(sd: dict[str, Tensor], cfg: TrainConfig,
                        tp: int) -> list[dict[str, Tensor]]:
    """Inverse of :func:`merge_tensor_shards` (the embedding split as the config says)."""
    out: list[dict[str, Tensor]] = [{} for _ in range(tp)]
    for name, value in sd.items():
        rule = shard_rule(name, cfg, cfg.model.embed_split_hidden)
        if rule.dim is None:
            pieces = [value] * tp
        elif rule.qkv:
            pieces = [p.flatten(0, 1) for p in value.reshape(3, -1, *value.shape[1:]).chunk(tp, 1)]
        else:
            if value.shape[rule.dim] % tp:
                raise InternEvoCheckpointError(f"--tp {tp} does not divide dim {rule.dim} of "
                                               f"{name!r} {tuple(value.shape)}")
            pieces = list(value.chunk(tp, dim=rule.dim))
        for r in range(tp):
            out[r][name] = pieces[r].clone()
    return out


# --------------------------------------------------------------------------------------------
# model weights


def _stage_dicts(folder: Path, lay: Layout, cfg: TrainConfig,
                 per_rank: Callable[[int, int], dict[str, Tensor]]) -> dict[str, Tensor]:
    """Merge ``per_rank(t, p)`` state dicts (InternEvo names) over stages, then tensor ranks."""
    blocks = _blocks_attr(cfg)
    shards = []
    for t in range(lay.tensor):
        chunks = [normalise_stage(per_rank(t, p), cfg) for p in range(lay.pipeline)]
        order = [c[k] for k in sorted({k for c in chunks for k in c}) for c in chunks if k in c]
        shards.append(merge_stages(order, blocks))
    return merge_tensor_shards(shards, cfg)


def read_model(folder: Path, cfg: TrainConfig, lay: Optional[Layout] = None) -> dict[str, Tensor]:
    """Model weights of an InternEvo checkpoint folder as our single-process state dict."""
    lay = lay or scan(folder)
    files: dict[tuple[int, int], dict[str, Tensor]] = {}

    def load(t: int, p: int) -> dict[str, Tensor]:
        if (t, p) not in files:
            files[(t, p)] = _tensor_dict(load_pt(folder / f"model_tp{t}_pp{p}.pt"),
                                         folder / f"model_tp{t}_pp{p}.pt")
        return files[(t, p)]

    return _stage_dicts(folder, lay, cfg, load)


def _tensor_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise InternEvoCheckpointError(f"{path}: not a state dict of tensors")
    return dict(obj)


def write_model(sd: dict[str, Tensor], cfg: TrainConfig, folder: Path, tp: int, pp: int,
                dtype: Optional[torch.dtype] = None) -> list[Path]:
    """``model_tp{t}_pp{p}.pt`` files of our single-process state dict ``sd`` (InternEvo's names,
    local block indices, the vocab-split embedding under ``.word_embeddings.`` as InternEvo's
    ``ParallelGPT2Embeddings`` names it)."""
    heads, kv = cfg.model.num_attention_heads, cfg.num_kv_heads
    if tp < 1 or heads % tp or kv % tp:
        raise InternEvoCheckpointError(f"--tp {tp}: must divide num_attention_heads={heads} "
                                       f"and the key/value heads ({kv})")
    embedding = f"{get_spec(cfg.model_type).tp_plan.embedding}.weight"
    written = []
    for t, shard in enumerate(split_tensor_shards(sd, cfg, tp)):
        for p, stage in enumerate(split_stages(shard, cfg, pp)):
            if embedding in stage and not cfg.model.embed_split_hidden:
                stage[embedding.replace(".weight", ".word_embeddings.weight")] = \
                    stage.pop(embedding)
            if dtype is not None:
                stage = {k: v.to(dtype) for k, v in stage.items()}
            path = folder / f"model_tp{t}_pp{p}.pt"
            torch.save(stage, path)
            written.append(path)
    return written


# --------------------------------------------------------------------------------------------
# optimizer: flat fp32 shards + partition plan -> per-parameter masters and moments


def _plan_of(folder: Path, t: int, p: int) -> list:
    """The partition plan of (tensor rank ``t``, stage ``p``): every zero1 rank writes the same."""
    for f in sorted(folder.iterdir()):
        m = PLAN_FILE.fullmatch(f.name)
        if m and int(m.group(3)) == t and int(m.group(5)) == p:
            return load_pt(f)
    raise InternEvoCheckpointError(f"{folder}: no partition-plan file gpus-*_tp-{t}_*_pp-{p}_*.pt "
                                   "(written by InternEvo's HybridZeroOptimizer) for the optimizer")


def plan_names(params: dict[str, Tensor], plan: list, where: str) -> list[list[list[str]]]:
    """Plan ids -> parameter names, per group and zero1 rank.

    InternEvo puts fp32 parameters in group 1 and the others in group 0, sorts each group's
    parameters (model order) by element count, largest first (a stable sort), and names each by
    ``"{position}_{dim0}_{dim1}..."``; the shapes in the ids are checked against the weights.
    """
    if len(plan) != len(_GROUPS):
        raise InternEvoCheckpointError(f"{where}: {len(plan)} optimizer groups; only InternEvo's "
                                       f"{'/'.join(_GROUPS)} groups (no ISP, no MoE) are read")
    out = []
    for g, ranks in enumerate(plan):
        members = [n for n, v in params.items() if (v.dtype == torch.float32) == (g == 1)]
        ordered = sorted(members, key=lambda n: -params[n].numel())
        names = {"_".join([str(i), *map(str, params[n].shape)]): n for i, n in enumerate(ordered)}
        for ids in ranks:
            unknown = [i for i in ids if i not in names]
            if unknown:
                raise InternEvoCheckpointError(f"{where}: plan id {unknown[0]!r} of group "
                                               f"{_GROUPS[g]} matches no parameter of the "
                                               "model file (another model or parameter order)")
        out.append([[names[i] for i in ids] for ids in ranks])
    return out


def _rank_state(optim: dict, group: int, path: Path) -> tuple[Tensor, dict]:
    """(flat fp32 master, AdamW state) of one param group in one optimizer file."""
    try:
        flat = optim["flat_fp32_weights"][group]
        inner = optim["base_optim_states"]
        index = inner["param_groups"][group]["params"][0]
    except (KeyError, IndexError, TypeError) as err:
        raise InternEvoCheckpointError(f"{path}: no flat fp32 master of group {group} "
                                       f"({type(err).__name__}: {err})") from None
    return flat, inner["state"].get(index, {})


def read_optimizer_rank(folder: Path, lay: Layout, t: int, p: int,
                        params: dict[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], dict]:
    """Per-parameter ``master`` / ``exp_avg`` / ``exp_avg_sq`` (InternEvo names, this rank's
    shapes) of (tensor rank ``t``, stage ``p``), and ``{"step", "scaler"}``."""
    params = {n: v for n, v in params.items() if not _BUFFER.search(n)}
    groups = plan_names(params, _plan_of(folder, t, p), str(folder))
    out: dict[str, dict[str, Tensor]] = {}
    steps, scaler = [], {}
    for z in range(lay.zero1):
        path = folder / f"optimizer_tp{t}_pp{p}_zo{z}.pt"
        optim = load_pt(path)
        scaler = optim.get("grad_scaler", scaler)
        for g, ranks in enumerate(groups):
            if not ranks[z]:
                continue
            flat, state = _rank_state(optim, g, path)
            if "step" in state:
                steps.append(float(state["step"]))
            values = {"master": flat, **{k: state.get(k, torch.zeros_like(flat)) for k in _MOMENTS}}
            sizes = [params[n].numel() for n in ranks[z]]
            if sum(sizes) != flat.numel():
                raise InternEvoCheckpointError(f"{path}: group {_GROUPS[g]} holds {flat.numel()} "
                                               f"elements, the plan names {sum(sizes)}")
            for key, vec in values.items():
                for name, piece in zip(ranks[z], vec.float().split(sizes)):
                    out.setdefault(name, {})[key] = piece.view(params[name].shape)
    return out, {"step": max(steps, default=0.0), "scaler": scaler}


def read_optimizer(folder: Path, cfg: TrainConfig, lay: Layout) -> dict:
    """Our optimizer state dict (full per-parameter tensors) of an InternEvo checkpoint."""
    if not lay.zero1:
        raise InternEvoCheckpointError(f"{folder}: no optimizer_tp*_pp*_zo*.pt files; load it "
                                       "with content=('model',)")
    ranks, extra = {}, {}
    for t in range(lay.tensor):
        for p in range(lay.pipeline):
            params = _tensor_dict(load_pt(folder / f"model_tp{t}_pp{p}.pt"), folder)
            ranks[(t, p)], extra = read_optimizer_rank(folder, lay, t, p, params)
    per_key = {key: _stage_dicts(folder, lay, cfg, lambda t, p, k=key: {
        n: d[k] for n, d in ranks[(t, p)].items()}) for key in ("master", *_MOMENTS)}
    params = {n: {k: per_key[k][n] for k in per_key} for n in per_key["master"]}
    return {"params": params, "step": extra["step"], "scaler": _scaler(extra["scaler"], cfg)}


def _scaler(saved: dict, cfg: TrainConfig) -> dict:
    """InternEvo's loss-scaler state; ours scales fp16 only (InternEvo also bf16), so another
    dtype starts unscaled."""
    if cfg.model.dtype != "torch.float16" or not saved:
        return {"scale": 1.0 if cfg.model.dtype != "torch.float16"
                else cfg.grad_scaler.fp16.initial_scale, "growth_step": 0, "hysteresis_step": 0}
    return {"scale": float(saved["_scale"]), "growth_step": int(saved["_growth_step"]),
            "hysteresis_step": int(saved["_hysteresis_step"])}


# --------------------------------------------------------------------------------------------
# counters, scheduler, sampler


def train_state(context: dict) -> dict:
    """Our train state from ``context.pt``: InternEvo saves the index of the batch it has just
    trained, ours counts the batches consumed (InternEvo adds 1 on resume too)."""
    return {"batch_count": int(context["batch_count"]) + 1,
            "step_count": int(context["step_count"]),
            "num_consumed_tokens": int(context.get("num_consumed_tokens", 0)),
            "inf_nan_skip_batches": int(context.get("inf_nan_skip_batches", 0)),
            "skipped_batches": 0}


def schedules_state(scheduler: Optional[dict], step_count: int) -> dict:
    """The LR scheduler's ``last_epoch`` is the number of successful updates (ours too; InternEvo
    itself resumes one step ahead, at ``step_count + 1``)."""
    done = step_count if scheduler is None else int(scheduler.get("last_epoch", step_count))
    return {"updates_done": done}


def sampler_state(sampler: dict) -> dict:
    """Our loader state from InternEvo's ``StaticBatchSampler`` state.

    Both shuffle ``arange(N)`` with one ``RandomState(seed)`` stream, epoch after epoch, and
    rank ``r`` reads every ``dp``-th row, so the position is (epoch, rows this rank consumed in
    it, batches).  InternEvo keeps the epoch only in its RNG state; it is recovered from the
    batch count and the epoch length (exact without ramp-up, or once the ramp-up is over).
    The row count is not saved by InternEvo, so it is not checked on resume (``num_rows`` None).
    """
    micro_num, dp = int(sampler["batch_size"]), int(sampler["data_world_size"])
    consumed, batches = int(sampler["num_consumed_samples_in_epoch"]), int(sampler["batch_count"])
    per_epoch = max(len(sampler["indices"]) // (micro_num * dp), 1)
    epoch = max(batches - consumed // micro_num, 0) // per_epoch
    if sampler.get("raw_rampup_batch_size"):
        log.warning("InternEvo sampler with rampup_batch_size=%r: the epoch (%d) is computed for "
                    "batches of the full size", sampler["raw_rampup_batch_size"], epoch)
    return {"version": STATE_VERSION, "kind": "packed",
            "sampler": {"epoch": epoch, "offset": consumed, "batch_count": batches,
                        "seed": int(sampler["seed"]), "dp_size": dp,
                        "rampup": sampler.get("raw_rampup_batch_size") or "", "num_rows": None}}


# --------------------------------------------------------------------------------------------
# the whole checkpoint


def read_checkpoint(path: Path, cfg: TrainConfig, parts: frozenset) -> dict:
    """``parts`` (names of :data:`internevo.checkpoint.manager.PARTS`) of the InternEvo checkpoint
    at ``path`` (a step folder, or a save folder: its newest), as full state:
    ``{"folder", "layout", "model", "optimizer", "train_state", "schedules", "loader"}``."""
    folder = require_checkpoint(path)
    lay = scan(folder)
    out: dict[str, Any] = {"folder": folder, "layout": lay}
    if "model" in parts:
        out["model"] = read_model(folder, cfg, lay)
    if "optimizer" in parts:
        out["optimizer"] = read_optimizer(folder, cfg, lay)
    if parts & {"train_state", "scheduler"}:
        state = train_state(load_pt(folder / "context.pt"))
        out["train_state"] = state
        if "scheduler" in parts:
            sched = folder / "schedulder.pt"  # sic, InternEvo's name
            out["schedules"] = schedules_state(load_pt(sched) if sched.is_file() else None,
                                               state["step_count"])
    if "sampler" in parts:
        if (folder / "sampler.pt").is_file():
            out["loader"] = sampler_state(load_pt(folder / "sampler.pt", numpy=True))
        else:
            log.warning("%s: no sampler.pt (streaming data?): the data starts from the beginning",
                        folder)
    return out


def saved_config_text(folder: Path) -> Optional[str]:
    """The run's config file text saved in ``config_file.pt`` (None when absent)."""
    path = folder / "config_file.pt"
    if not path.is_file():
        return None
    text = load_pt(path)
    return text if isinstance(text, str) else None
