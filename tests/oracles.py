"""Test oracles: collective volumes and saved-activation bytes worked out from shapes.

Production code does not use these; the tests compare them with what the counting
:class:`~internevo.parallel.comm.Comm` and autograd's saved-tensor hooks measure, and
``benchmarks/bench_tensor_memory.py`` prints the activation bytes.  docs/parallel.md and
docs/architecture.md derive the same formulas.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from internevo.config import TrainConfig
from internevo.models.build import model_dtype
from internevo.models.common import ffn_hidden
from internevo.models.registry import get_spec
from internevo.parallel.layout import ParallelLayout
from internevo.parallel.zero import plan_buckets

GROUP = "tensor"


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def analytic_step_bytes(cfg: Any, layout: ParallelLayout, shapes: dict[str, tuple[int, ...]],
                        blocks: list[str], micro_num: int) -> dict[str, int]:
    """Payload bytes per successful training step, as ``{"comm/<kind>/<group>/bytes": n}``.

    ``shapes`` maps parameter names to full (tensor-parallel-local) shapes, ``blocks`` the module
    names of the transformer blocks (FSDP's units; the root owns the rest).  Assumes every
    parameter is in the model dtype and pipeline = 1 for FSDP (FSDP x tensor parallel shards
    the tensor-parallel-local shapes given here).
    """
    g = torch.empty(0, dtype=model_dtype(cfg)).element_size()
    zo, replicas = layout.zero1, layout.data // layout.zero1
    if layout.fsdp:
        volumes = _fsdp_volumes(shapes, blocks, zo, micro_num, g)
    else:
        volumes = _zero_volumes(cfg, shapes, zo, g)
    out = {}
    for (kind, group), n in volumes.items():
        size = {"zero1": zo, "zero1_replica": replicas}.get(group, 0)
        if n and size > 1:
            out[f"comm/{kind}/{group}/bytes"] = n
    out["comm/all_reduce/zero1/bytes"] = 8 if zo > 1 else 0  # fp64 squared gradient norm
    if layout.tensor > 1:
        out["comm/all_reduce/tensor/bytes"] = 8
    if layout.data > 1:
        out["comm/all_reduce/data/bytes"] = 8  # the logged loss (fp64)
    return {k: v for k, v in sorted(out.items()) if v}


def _zero_volumes(cfg: Any, shapes: dict[str, tuple[int, ...]], zo: int,
                  g: int) -> dict[tuple[str, str], int]:
    """ZeRO-1.5: reduce-scatter + all-gather of padded buckets, replica all-reduce of a shard."""
    numels = [math.prod(s) for s in shapes.values()]
    padded = sum(b.shard * zo for b in plan_buckets(
        numels, cfg.hybrid_zero_optimizer.reduce_bucket_size, zo))
    return {("reduce_scatter", "zero1"): padded * g, ("all_gather", "zero1"): padded * g,
            ("all_reduce", "zero1_replica"): padded // zo * g}


def _fsdp_volumes(shapes: dict[str, tuple[int, ...]], blocks: list[str], zo: int,
                  micro_num: int, g: int) -> dict[tuple[str, str], int]:
    """FSDP2: per micro-batch all units gathered in forward, blocks again in backward; fp32
    gradients reduce-scattered (and all-reduced across replicas) once, in the last backward."""
    def padded(name: str) -> int:  # FSDP2 pads dim 0 to a multiple of the shard-group size
        shape = shapes[name]
        return math.ceil(shape[0] / zo) * zo * math.prod(shape[1:])

    in_block = [n for n in shapes if any(n.startswith(b + ".") for b in blocks)]
    block_elems = sum(padded(n) for n in in_block)
    all_elems = sum(padded(n) for n in shapes)
    return {("all_gather", "zero1"): micro_num * (all_elems + block_elems) * g,
            ("reduce_scatter", "zero1"): all_elems * 4,
            ("all_reduce", "zero1_replica"): all_elems // zo * 4}




def expected_block_collectives(cfg: TrainConfig, mode: str, tokens: int,
                               tp: int) -> dict[tuple[str, str], tuple[int, int]]:
    """``{(kind, "tensor"): (calls, payload bytes)}`` of one block's forward + backward on a row
    of ``tokens`` tokens (the table of docs/architecture.md)."""
    if tp == 1:
        return {}
    h = cfg.model.hidden_size
    act = tokens * h * torch.empty(0, dtype=model_dtype(cfg)).element_size()
    if mode == "mtp":
        return {("all_reduce", GROUP): (4, 4 * act)}
    norm_bytes = h * (4 if cfg.use_fp32_norm else act // (tokens * h))
    bias_bytes = act // tokens if cfg.model_type == "INTERNLM" else 0  # v1 out_proj bias
    columns = sum(len(cols) for cols, _ in get_spec(cfg.model_type).tp_plan.regions.values())
    gathers = 4 if mode == "msp" else 4 + columns  # fsp: each column linear re-gathers
    return {("all_gather", GROUP): (gathers, gathers * act),
            ("reduce_scatter", GROUP): (4, 4 * act),
            ("all_reduce", GROUP): (2 + (bias_bytes > 0), 2 * norm_bytes + bias_bytes)}


def expected_isp_block_collectives(cfg: TrainConfig, tokens: int, sp: int, wp: int) -> dict:
    """One isp block's collectives for a row of ``tokens``, from the shapes (fp32, 4 bytes): each
    linear's weight (+ bias) gathered in forward and in backward and its gradient reduce-scattered
    (five linears, seven for LLaMA's separate wq / wk / wv); q, k, v in one all-to-all and the
    attention output in another, both ways; the two norm-weight gradients all-reduced over the
    weight group.  Under activation checkpointing the recomputation gathers the weights it keeps
    for the backward (same counts)."""
    m = cfg.model
    h, heads, kv = m.hidden_size, m.num_attention_heads, cfg.num_kv_heads
    d, f = h // heads, ffn_hidden(h, m.mlp_ratio, m.multiple_of)
    if cfg.model_type == "INTERNLM":  # Wqkv [3h, h] + bias, out_proj [h, h] + bias
        attn = (3 * h * h + 3 * h) + (h * h + h)
    else:  # wqkv (or wq, wk, wv) [(H + 2 KV) d, h], wo [h, H d]
        attn = (heads + 2 * kv) * d * h + h * heads * d
    weights = 4 * (attn + 3 * h * f)
    linears = 7 if cfg.model_type == "LLAMA2" else 5
    out = {}
    if wp > 1:
        out[("all_gather", "weight")] = (2 * linears, 2 * weights)
        out[("reduce_scatter", "weight")] = (linears, weights)
        out[("all_reduce", "weight")] = (2, 2 * 4 * h)
    if sp > 1:  # a recomputed (checkpointed) block runs its forward all-to-alls twice
        local, passes = tokens // sp, 3 if m.checkpoint else 2
        out[("all_to_all", "tensor")] = (2 * passes,
                                         passes * 4 * local * d * ((heads + 2 * kv) + heads))
    return out


def saved_activation_bytes(model: nn.Module, ids: Tensor, cu_seqlens: Any,
                           indexes: Optional[Tensor], block: int = 0) -> int:
    """Bytes of the distinct storages block ``block`` saves for backward on this rank (its
    parameters excluded), for one row: the activation memory a layer holds between forward and
    backward."""
    params = {_local(p).untyped_storage().data_ptr() for p in model.parameters()}
    x = model.get_submodule(model.embedding_attr)(ids).detach().requires_grad_()
    ctx = model.forward_context(x, cu_seqlens, indexes)
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.transformer_blocks()[block](x, ctx)
    del out
    return sum(seen.values())
