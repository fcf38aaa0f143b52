"""The spec of LLAMA2: InternEvo's init rules, the tensor-parallel plan and the HF Llama mapping
(every tensor is only renamed; ``adapt_hf=False`` q/k rows are permuted to half-split order)."""

from __future__ import annotations

from typing import Any, Optional

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
from internevo.models.llama.model import Llama

OWN_KEYS = GQA_MODEL_KEYS


def init_std(name: str, layer: Optional[int], m: ModelConfig) -> Optional[float]:
    """InternEvo's Llama: the ``*_init_std`` fields (``wq``/``wk``/``wv`` take
    ``attn_wqkv_init_std``); ``wo`` and ``w2`` scaled by the layer under ``use_scaled_init``."""
    return suffix_lookup(name, {
        "tok_embeddings.weight": m.embedding_init_std,
        "output.weight": m.out_head_init_std,
        "attention.wq.weight": m.attn_wqkv_init_std,
        "attention.wk.weight": m.attn_wqkv_init_std,
        "attention.wv.weight": m.attn_wqkv_init_std,
        "attention.wo.weight": scaled_std(m.attn_other_init_std, layer, m),
        "feed_forward.w1.weight": m.ffn_uplayer_init_std,
        "feed_forward.w3.weight": m.ffn_uplayer_init_std,
        "feed_forward.w2.weight": scaled_std(m.ffn_other_init_std, layer, m),
    })


def _reorder_qk(sd: StateDict, cfg: TrainConfig, inverse: bool) -> StateDict:
    """``wq``/``wk`` rows between interleaved (``adapt_hf=False``) and half-split order."""
    if cfg.model.adapt_hf:
        return sd
    d = Dims.of(cfg).head_dim
    out = dict(sd)
    for i in range(cfg.model.num_layers):
        for proj in ("wq", "wk"):
            key = f"layers.{i}.attention.{proj}.weight"
            out[key] = permute_heads(sd[key], d, inverse)
    return out


def _model_fields(hf_config: dict, fmt: str, where: str) -> dict[str, Any]:
    heads = int(hf_config["num_attention_heads"])
    kv = int(hf_config.get("num_key_value_heads") or heads)
    return {"num_kv_attention_heads": kv, "adapt_hf": True, "no_bias": True}


HF = HFMapping(
    formats=("llama",),
    top_names={"llama": {"tok_embeddings.weight": "model.embed_tokens.weight",
                         "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}},
    layer_names={"llama": dict(zip(
        ("attention_norm.weight", "ffn_norm.weight", "attention.wq.weight", "attention.wk.weight",
         "attention.wv.weight", "attention.wo.weight", "feed_forward.w1.weight",
         "feed_forward.w3.weight", "feed_forward.w2.weight"),
        ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
         "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
         "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")))},
    to_hf_layer=lambda sd, fmt, i, dims: {},
    from_hf_layer=lambda hf_sd, fmt, i, dims: {},
    config_fields=lambda cfg, fmt: {"attention_bias": False},
    matches=lambda hf_config, fmt: not (hf_config.get("attention_bias") or hf_config.get("bias")),
    model_fields=_model_fields,
    to_hf_order=lambda sd, cfg: _reorder_qk(sd, cfg, inverse=False),
    from_hf_order=lambda sd, cfg: _reorder_qk(sd, cfg, inverse=True),
)

SPEC = ModelSpec(
    name="LLAMA2",
    model_class=Llama,
    own_keys=OWN_KEYS,
    init_std=init_std,
    init_kind=lambda m: m.init_type,
    tp_plan=TPPlan(embedding="tok_embeddings", head="output",
                   regions={"attention": (("wq", "wk", "wv"), ("wo",)),
                            "feed_forward": (("w1", "w3"), ("w2",))}),
    hf=HF,
    defaults={"adapt_hf": False},
)
