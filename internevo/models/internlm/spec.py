"""The spec of InternLM v1: init rules, tensor-parallel plan, HF (Llama with biases) mapping and
the fused ``Wqkv`` checkpoint shape."""

from __future__ import annotations

from typing import Any, Optional

import torch

from internevo.config import ModelConfig
from internevo.models.base import Dims, HFMapping, ModelSpec, StateDict, TPPlan, scaled_std
from internevo.models.internlm.model import InternLM

QKV_SUFFIXES = ("mixer.Wqkv.weight", "mixer.Wqkv.bias")
"""Parameter names (suffixes) of the fused ``[Q; K; V]`` projection."""


def qkv_checkpoint_shape(name: str, shape: tuple) -> Optional[tuple]:
    """The checkpoint shape of tensor ``name`` when it is a fused ``Wqkv`` weight or bias (None
    otherwise): ``[3, H*d, *rest]`` from either the model's ``[3*H*d, *rest]`` or the tensor-
    parallel ``[3, H*d, *rest]`` (told apart by the number of dimensions, not by their sizes)."""
    if not name.endswith(QKV_SUFFIXES):
        return None
    shape = tuple(shape)
    model_ndim = 2 if name.endswith(".weight") else 1
    return shape if len(shape) == model_ndim + 1 else (3, shape[0] // 3, *shape[1:])


def init_std(name: str, layer: Optional[int], m: ModelConfig) -> Optional[float]:
    """InternEvo's v1 rules: embedding and head N(0, 0.0052); ``Wqkv``, ``w1``, ``w3``
    N(0, 0.006); ``out_proj`` and ``w2`` scaled by the layer under ``use_scaled_init``."""
    if name.endswith(("embedding.weight", "word_embeddings.weight")) or name == "head.weight":
        return 0.0052
    if name.endswith(("Wqkv.weight", "mlp.w1.weight", "mlp.w3.weight")):
        return 0.006
    if name.endswith(("out_proj.weight", "mlp.w2.weight")):
        return scaled_std(0.006, layer, m)
    return None


def _to_hf_layer(sd: StateDict, fmt: str, i: int, dims: Dims) -> StateDict:
    """``Wqkv`` weight and bias -> ``q_proj``/``k_proj``/``v_proj`` (views)."""
    out = {}
    for kind in ("weight", "bias"):
        q, k, v = sd[f"blocks.{i}.mixer.Wqkv.{kind}"].chunk(3, dim=0)
        out.update({f"model.layers.{i}.self_attn.{n}_proj.{kind}": t
                    for n, t in zip("qkv", (q, k, v))})
    return out


def _from_hf_layer(hf_sd: StateDict, fmt: str, i: int, dims: Dims) -> StateDict:
    return {f"blocks.{i}.mixer.Wqkv.{kind}": torch.cat(
        [hf_sd[f"model.layers.{i}.self_attn.{n}_proj.{kind}"] for n in "qkv"])
        for kind in ("weight", "bias")}


def _has_bias(hf_config: dict) -> bool:
    return bool(hf_config.get("attention_bias") or hf_config.get("bias"))  # Llama's / InternLM's


def _model_fields(hf_config: dict, fmt: str, where: str) -> dict[str, Any]:
    heads = int(hf_config["num_attention_heads"])
    kv = int(hf_config.get("num_key_value_heads") or heads)
    if kv != heads:
        raise ValueError(f"{where}: attention biases with num_key_value_heads={kv} != "
                         f"num_attention_heads={heads}: InternLM v1 (biases) has no "
                         "grouped-query attention")
    return {}


HF = HFMapping(
    formats=("llama",),
    top_names={"llama": {"embedding.weight": "model.embed_tokens.weight",
                         "norm.weight": "model.norm.weight", "head.weight": "lm_head.weight"}},
    layer_names={"llama": dict(zip(
        ("norm1.weight", "norm2.weight", "mlp.w1.weight", "mlp.w3.weight", "mlp.w2.weight",
         "mixer.out_proj.weight", "mixer.out_proj.bias"),
        ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
         "mlp.up_proj.weight", "mlp.down_proj.weight", "self_attn.o_proj.weight",
         "self_attn.o_proj.bias")))},
    to_hf_layer=_to_hf_layer,
    from_hf_layer=_from_hf_layer,
    config_fields=lambda cfg, fmt: {"attention_bias": True},
    matches=lambda hf_config, fmt: fmt == "llama" and _has_bias(hf_config),
    model_fields=_model_fields,
)


def legacy_mlp_names(sd: StateDict, m: ModelConfig) -> StateDict:
    """InternLM's ``main`` branch called the down projection ``w3`` (and the up projection
    ``w2``), spec §4.1: told by ``w3``'s shape ``[h, ffn/tp]``, swapped to our names."""
    h = m.hidden_size
    if not any(k.endswith(".mlp.w3.weight") and v.shape[0] == h != v.shape[1]
               for k, v in sd.items()):
        return sd
    swap = {".mlp.w2.": ".mlp.w3.", ".mlp.w3.": ".mlp.w2."}
    out = {}
    for key, value in sd.items():
        old = next((o for o in swap if o in key), None)
        out[key.replace(old, swap[old]) if old else key] = value
    return out


def _kind(m: ModelConfig) -> str:
    return "normal"


SPEC = ModelSpec(
    name="INTERNLM",
    model_class=InternLM,
    own_keys=frozenset(),
    init_std=init_std,
    init_kind=_kind,
    tp_plan=TPPlan(embedding="embedding", head="head",
                   regions={"mixer": (("Wqkv",), ("out_proj",)), "mlp": (("w1", "w3"), ("w2",))},
                   fused_qkv=("Wqkv",)),
    hf=HF,
    checkpoint_shape=qkv_checkpoint_shape,
    legacy_names=legacy_mlp_names,
)
