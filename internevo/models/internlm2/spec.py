"""The spec of InternLM2: init rules, tensor-parallel plan and the HF mappings (stock Llama, with
``wqkv`` split into q/k/v, and InternLM2's published layout)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from internevo.config import ModelConfig, TrainConfig
from internevo.models.base import (
    GQA_MODEL_KEYS,
    Dims,
    HFMapping,
    ModelSpec,
    StateDict,
    TPPlan,
    permute_heads,
    scaled_std,
    suffix_lookup,
)
from internevo.models.internlm2.model import InternLM2

OWN_KEYS = GQA_MODEL_KEYS | {"norm_head"}
_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}


def init_std(name: str, layer: Optional[int], m: ModelConfig) -> Optional[float]:
    """The ``*_init_std`` fields; ``wo``/``w2`` scaled by the layer under ``use_scaled_init``."""
    return suffix_lookup(name, {
        "tok_embeddings.weight": m.embedding_init_std,
        "tok_embeddings.word_embeddings.weight": m.embedding_init_std,
        "output.weight": m.out_head_init_std,
        "attention.wqkv.weight": m.attn_wqkv_init_std,
        "attention.wo.weight": scaled_std(m.attn_other_init_std, layer, m),
        "feed_forward.w1.weight": m.ffn_uplayer_init_std,
        "feed_forward.w3.weight": m.ffn_uplayer_init_std,
        "feed_forward.w2.weight": scaled_std(m.ffn_other_init_std, layer, m),
    })


# --------------------------------------------------------------------------------------------
# fused, KV-group-major wqkv


def split_gqa(w: Tensor, dims: Dims) -> tuple[Tensor, Tensor, Tensor]:
    """KV-group-major ``wqkv`` rows ``[g: q_g0 .. q_g(qpk-1), k_g, v_g]`` -> q, k, v rows."""
    qpk, rest = dims.q_per_kv, w.shape[1:]
    g = w.reshape(dims.kv_heads, qpk + 2, dims.head_dim, *rest)
    return (g[:, :qpk].reshape(-1, *rest), g[:, qpk].reshape(-1, *rest),
            g[:, qpk + 1].reshape(-1, *rest))


def fuse_gqa(q: Tensor, k: Tensor, v: Tensor, dims: Dims) -> Tensor:
    """Inverse of :func:`split_gqa`."""
    rest, d, kv = q.shape[1:], dims.head_dim, dims.kv_heads
    parts = (q.reshape(kv, dims.q_per_kv, d, *rest), k.reshape(kv, 1, d, *rest),
             v.reshape(kv, 1, d, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def reorder_qk(sd: StateDict, cfg: TrainConfig, to_half_split: bool) -> StateDict:
    """``wqkv``s with q/k features moved between interleaved and half-split order.

    ``to_half_split=True`` turns an ``adapt_hf=False`` state dict into the ``adapt_hf=True`` one
    that computes the same function (the model's runtime reordering made explicit);
    ``False`` is the inverse.  Other tensors are passed through.
    """
    dims = Dims.of(cfg)
    out = dict(sd)
    for i in range(dims.layers):
        key = f"layers.{i}.attention.wqkv.weight"
        q, k, v = split_gqa(sd[key], dims)
        q = permute_heads(q, dims.head_dim, inverse=not to_half_split)
        k = permute_heads(k, dims.head_dim, inverse=not to_half_split)
        out[key] = fuse_gqa(q, k, v, dims)
    return out


# --------------------------------------------------------------------------------------------
# Hugging Face


def _to_hf_layer(sd: StateDict, fmt: str, i: int, dims: Dims) -> StateDict:
    hf, wqkv = f"model.layers.{i}", sd[f"layers.{i}.attention.wqkv.weight"]
    if fmt == "internlm2":
        return {f"{hf}.attention.wqkv.weight": wqkv}
    q, k, v = split_gqa(wqkv, dims)
    return {f"{hf}.self_attn.q_proj.weight": q, f"{hf}.self_attn.k_proj.weight": k,
            f"{hf}.self_attn.v_proj.weight": v}


def _from_hf_layer(hf_sd: StateDict, fmt: str, i: int, dims: Dims) -> StateDict:
    hf = f"model.layers.{i}"
    if fmt == "internlm2":
        wqkv = hf_sd[f"{hf}.attention.wqkv.weight"]
    else:
        wqkv = fuse_gqa(*(hf_sd[f"{hf}.self_attn.{n}_proj.weight"] for n in "qkv"), dims)
    return {f"layers.{i}.attention.wqkv.weight": wqkv}


def _config_fields(cfg: TrainConfig, fmt: str) -> dict[str, Any]:
    if fmt == "internlm2":
        return {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
                "auto_map": dict(_AUTO_MAP), "bias": False, "attn_implementation": "eager"}
    return {"attention_bias": False}


def _matches(hf_config: dict, fmt: str) -> bool:
    return not (hf_config.get("attention_bias") or hf_config.get("bias"))


def _model_fields(hf_config: dict, fmt: str, where: str) -> dict[str, Any]:
    heads = int(hf_config["num_attention_heads"])
    kv = int(hf_config.get("num_key_value_heads") or heads)
    return {"num_kv_attention_heads": kv, "adapt_hf": True, "no_bias": True}


_NAMES = ("attention_norm.weight", "ffn_norm.weight", "feed_forward.w1.weight",
          "feed_forward.w3.weight", "feed_forward.w2.weight", "attention.wo.weight")
LLAMA_LAYER_NAMES = dict(zip(_NAMES, (
    "input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
    "mlp.up_proj.weight", "mlp.down_proj.weight", "self_attn.o_proj.weight")))
"""Llama's names of the InternEvo block tensors that are only renamed."""

HF = HFMapping(
    formats=("llama", "internlm2"),
    top_names={
        "llama": {"tok_embeddings.weight": "model.embed_tokens.weight",
                  "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"},
        "internlm2": {"tok_embeddings.weight": "model.tok_embeddings.weight",
                      "norm.weight": "model.norm.weight", "output.weight": "output.weight"},
    },
    layer_names={"llama": LLAMA_LAYER_NAMES, "internlm2": {n: n for n in _NAMES}},
    to_hf_layer=_to_hf_layer,
    from_hf_layer=_from_hf_layer,
    config_fields=_config_fields,
    matches=_matches,
    model_fields=_model_fields,
    to_hf_order=lambda sd, cfg: sd if cfg.model.adapt_hf else reorder_qk(sd, cfg, True),
    from_hf_order=lambda sd, cfg: sd if cfg.model.adapt_hf else reorder_qk(sd, cfg, False),
)

SPEC = ModelSpec(
    name="INTERNLM2_PUBLIC",
    model_class=InternLM2,
    own_keys=OWN_KEYS,
    init_std=init_std,
    init_kind=lambda m: m.init_type,
    tp_plan=TPPlan(embedding="tok_embeddings", head="output",
                   regions={"attention": (("wqkv",), ("wo",)),
                            "feed_forward": (("w1", "w3"), ("w2",))}),
    hf=HF,
)
