"""Conversion between internevo checkpoints and Hugging Face folders.

Two Hugging Face layouts (``fmt``):

* ``llama``: what stock ``transformers`` loads as ``LlamaForCausalLM`` without remote code.
  InternLM2's fused, KV-group-major ``wqkv`` is split into ``q_proj``/``k_proj``/``v_proj`` (GQA
  kept); InternLM v1 keeps its q/k/v/o biases (``attention_bias=True``).
* ``internlm2``: the published InternLM2 layout (``model.tok_embeddings``, ``attention.wqkv`` …)
  for users of InternLM2's remote code (its ``.py`` files are not shipped: copy them in).

Both apply half-split (NeoX) RoPE to the stored q/k features.  An InternLM2 trained with
``adapt_hf=False`` stores each head's q/k features interleaved, so they are reordered to
[evens, odds] on export and back on import (:func:`reorder_qk`); v rows never move.

The state-dict functions are pure; :func:`export_hf`, :func:`load_hf` and :func:`convert_main`
do the file work.  Only safetensors are read from a Hugging Face folder (never pickle), and every
check runs before anything is written: a bad folder raises one :class:`HFConversionError` naming
the file or the key, and the target is replaced only once the new one is complete.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from internevo.config import ConfigError, ModelConfig, TrainConfig, config_from_dict, load_config
from internevo.models.layers import ffn_hidden

log = logging.getLogger(__name__)

FORMATS = ("llama", "internlm2")
INTERNLM, INTERNLM2 = "INTERNLM", "INTERNLM2_PUBLIC"
_SUPPORTED = {(INTERNLM2, "llama"), (INTERNLM2, "internlm2"), (INTERNLM, "llama")}
_DTYPE_NAMES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
    "fp16": torch.float16, "half": torch.float16, "float32": torch.float32, "fp32": torch.float32,
    "float": torch.float32,
}
# non-weights some exporters leave in HF folders
_IGNORED_HF_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json")
_INTERNLM2_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}


class HFConversionError(ValueError):
    """A checkpoint or Hugging Face folder cannot be converted (names the file or the key)."""


@dataclass(frozen=True)
class Dims:
    """The shapes a conversion needs, derived from a :class:`ModelConfig`."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    ffn: int

    @property
    def q_per_kv(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads

    @classmethod
    def of(cls, cfg: TrainConfig) -> Dims:
        """Dims of ``cfg.model``."""
        m = cfg.model
        return cls(m.num_layers, m.hidden_size, m.num_attention_heads, cfg.num_kv_heads,
                   m.hidden_size // m.num_attention_heads, m.vocab_size,
                   ffn_hidden(m.hidden_size, m.mlp_ratio, m.multiple_of))


# --------------------------------------------------------------------------------------------
# q/k feature order (InternLM2 adapt_hf=False)


def _half_split_perm(head_dim: int) -> Tensor:
    """Feature ``j`` of the half-split order is feature ``perm[j]`` of the interleaved order."""
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))


def _permute_heads(w: Tensor, head_dim: int, inverse: bool) -> Tensor:
    """Reorder the rows of every ``head_dim``-row head of ``w`` (interleaved -> half-split)."""
    perm = _half_split_perm(head_dim)
    if inverse:
        perm = torch.argsort(perm)
    rest = w.shape[1:]
    return w.reshape(-1, head_dim, *rest)[:, perm.to(w.device)].reshape(-1, *rest)


def reorder_qk(sd: dict[str, Tensor], cfg: TrainConfig, to_half_split: bool) -> dict[str, Tensor]:
    """InternLM2 ``wqkv``s with q/k features moved between interleaved and half-split order.

    ``to_half_split=True`` turns an ``adapt_hf=False`` state dict into the ``adapt_hf=True`` one
    that computes the same function (the model's runtime reordering made explicit);
    ``False`` is the inverse.  Other tensors are passed through.
    """
    dims = Dims.of(cfg)
    out = dict(sd)
    for i in range(dims.layers):
        key = f"layers.{i}.attention.wqkv.weight"
        q, k, v = _split_gqa(sd[key], dims)
        q = _permute_heads(q, dims.head_dim, inverse=not to_half_split)
        k = _permute_heads(k, dims.head_dim, inverse=not to_half_split)
        out[key] = _fuse_gqa(q, k, v, dims)
    return out


# --------------------------------------------------------------------------------------------
# fused projections


def _split_gqa(w: Tensor, dims: Dims) -> tuple[Tensor, Tensor, Tensor]:
    """KV-group-major ``wqkv`` rows ``[g: q_g0 .. q_g(qpk-1), k_g, v_g]`` -> q, k, v rows."""
    qpk, rest = dims.q_per_kv, w.shape[1:]
    g = w.reshape(dims.kv_heads, qpk + 2, dims.head_dim, *rest)
    return (g[:, :qpk].reshape(-1, *rest), g[:, qpk].reshape(-1, *rest),
            g[:, qpk + 1].reshape(-1, *rest))


def _fuse_gqa(q: Tensor, k: Tensor, v: Tensor, dims: Dims) -> Tensor:
    """Inverse of :func:`_split_gqa`."""
    rest, d, kv = q.shape[1:], dims.head_dim, dims.kv_heads
    parts = (q.reshape(kv, dims.q_per_kv, d, *rest), k.reshape(kv, 1, d, *rest),
             v.reshape(kv, 1, d, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)


# --------------------------------------------------------------------------------------------
# name tables: our parameter name <-> Hugging Face name (fused q/k/v handled separately)

_TOP_NAMES = {
    (INTERNLM2, "llama"): {"tok_embeddings.weight": "model.embed_tokens.weight",
                           "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"},
    (INTERNLM2, "internlm2"): {"tok_embeddings.weight": "model.tok_embeddings.weight",
                               "norm.weight": "model.norm.weight",
                               "output.weight": "output.weight"},
    (INTERNLM, "llama"): {"embedding.weight": "model.embed_tokens.weight",
                          "norm.weight": "model.norm.weight", "head.weight": "lm_head.weight"},
}
_LLAMA_LAYER = {"input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                "mlp.up_proj.weight", "mlp.down_proj.weight", "self_attn.o_proj.weight"}
_LAYER_NAMES = {  # (our block prefix, {our suffix: HF suffix under model.layers.{i}})
    (INTERNLM2, "llama"): ("layers", dict(zip(
        ("attention_norm.weight", "ffn_norm.weight", "feed_forward.w1.weight",
         "feed_forward.w3.weight", "feed_forward.w2.weight", "attention.wo.weight"),
        ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
         "mlp.up_proj.weight", "mlp.down_proj.weight", "self_attn.o_proj.weight")))),
    (INTERNLM2, "internlm2"): ("layers", {n: n for n in (
        "attention_norm.weight", "ffn_norm.weight", "feed_forward.w1.weight",
        "feed_forward.w3.weight", "feed_forward.w2.weight", "attention.wo.weight")}),
    (INTERNLM, "llama"): ("blocks", dict(zip(
        ("norm1.weight", "norm2.weight", "mlp.w1.weight", "mlp.w3.weight", "mlp.w2.weight",
         "mixer.out_proj.weight", "mixer.out_proj.bias"),
        ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
         "mlp.up_proj.weight", "mlp.down_proj.weight", "self_attn.o_proj.weight",
         "self_attn.o_proj.bias")))),
}


def name_map(model_type: str, fmt: str, num_layers: int) -> dict[str, str]:
    """Our name -> HF name for every tensor that is only renamed (not the fused q/k/v)."""
    _check_supported(model_type, fmt)
    names = dict(_TOP_NAMES[(model_type, fmt)])
    prefix, layer = _LAYER_NAMES[(model_type, fmt)]
    for i in range(num_layers):
        for ours, theirs in layer.items():
            names[f"{prefix}.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


def _check_supported(model_type: str, fmt: str) -> None:
    if fmt not in FORMATS:
        raise HFConversionError(f"unknown Hugging Face format {fmt!r}; valid: {', '.join(FORMATS)}")
    if (model_type, fmt) not in _SUPPORTED:
        raise HFConversionError(f"model_type {model_type} cannot be written in the {fmt!r} format "
                                f"(only {INTERNLM2} has an internlm2 layout; use 'llama')")


def _qkv_to_hf(sd: dict[str, Tensor], model_type: str, fmt: str, i: int,
               dims: Dims) -> dict[str, Tensor]:
    """The HF tensors of layer ``i``'s fused q/k/v projection."""
    hf = f"model.layers.{i}"
    if model_type == INTERNLM:
        out = {}
        for kind in ("weight", "bias"):
            q, k, v = sd[f"blocks.{i}.mixer.Wqkv.{kind}"].chunk(3, dim=0)
            out.update({f"{hf}.self_attn.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, v))})
        return out
    wqkv = sd[f"layers.{i}.attention.wqkv.weight"]
    if fmt == "internlm2":
        return {f"{hf}.attention.wqkv.weight": wqkv}
    q, k, v = _split_gqa(wqkv, dims)
    return {f"{hf}.self_attn.q_proj.weight": q, f"{hf}.self_attn.k_proj.weight": k,
            f"{hf}.self_attn.v_proj.weight": v}


def _qkv_from_hf(hf_sd: dict[str, Tensor], model_type: str, fmt: str, i: int,
                 dims: Dims) -> dict[str, Tensor]:
    """Our fused q/k/v tensors of layer ``i`` (inverse of :func:`_qkv_to_hf`)."""
    hf = f"model.layers.{i}"
    if model_type == INTERNLM:
        return {f"blocks.{i}.mixer.Wqkv.{kind}": torch.cat(
            [hf_sd[f"{hf}.self_attn.{n}_proj.{kind}"] for n in "qkv"])
            for kind in ("weight", "bias")}
    if fmt == "internlm2":
        wqkv = hf_sd[f"{hf}.attention.wqkv.weight"]
    else:
        wqkv = _fuse_gqa(*(hf_sd[f"{hf}.self_attn.{n}_proj.weight"] for n in "qkv"), dims)
    return {f"layers.{i}.attention.wqkv.weight": wqkv}


# --------------------------------------------------------------------------------------------
# state dicts


def _normalise_ours(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Accept the vocab-split embedding alias ``<embedding>.word_embeddings.weight``."""
    return {k.replace(".word_embeddings.", "."): v for k, v in sd.items()}


def expected_shapes(cfg: TrainConfig) -> dict[str, torch.Size]:
    """Our parameter names and shapes for ``cfg`` (from the model built on the meta device)."""
    from internevo.models.registry import build_model  # the model code imports this module's deps

    model = build_model(cfg, device="meta")
    return {k: v.shape for k, v in model.state_dict().items()}


def _check_keys(got: dict[str, Tensor], want: dict[str, torch.Size], where: str, what: str,
                config_name: str) -> None:
    """One error naming the first missing key, a wrong shape, or the unexpected keys."""
    for key, shape in want.items():
        if key not in got:
            raise HFConversionError(f"{where}: {what} tensor {key!r} is missing")
        if tuple(got[key].shape) != tuple(shape):
            raise HFConversionError(f"{where}: {what} tensor {key!r} has shape "
                                    f"{tuple(got[key].shape)} but {config_name} implies "
                                    f"{tuple(shape)}")
    extra = sorted(k for k in got if k not in want)
    if extra:
        more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
        raise HFConversionError(f"{where}: unexpected {what} tensors {extra[:5]}{more}: "
                                "not part of this model's layout")


def to_hf_state_dict(sd: dict[str, Tensor], cfg: TrainConfig, fmt: str) -> dict[str, Tensor]:
    """Our full (unsharded) state dict -> the HF state dict of layout ``fmt`` (views, no cast)."""
    _check_supported(cfg.model_type, fmt)
    sd = _normalise_ours(sd)
    _check_keys(sd, expected_shapes(cfg), cfg.source or "<checkpoint>", "model",
                "the run's config")
    if cfg.model_type == INTERNLM2 and not cfg.model.adapt_hf:
        sd = reorder_qk(sd, cfg, to_half_split=True)
    dims = Dims.of(cfg)
    out = {theirs: sd[ours] for ours, theirs in name_map(cfg.model_type, fmt, dims.layers).items()}
    for i in range(dims.layers):
        out.update(_qkv_to_hf(sd, cfg.model_type, fmt, i, dims))
    return out


def _hf_to_ours(hf_sd: dict[str, Tensor], cfg: TrainConfig, fmt: str) -> dict[str, Tensor]:
    """Rename and fuse (the inputs are already checked)."""
    dims = Dims.of(cfg)
    names = name_map(cfg.model_type, fmt, dims.layers)
    out = {ours: hf_sd[theirs] for ours, theirs in names.items()}
    for i in range(dims.layers):
        out.update(_qkv_from_hf(hf_sd, cfg.model_type, fmt, i, dims))
    return out


def from_hf_state_dict(hf_sd: dict[str, Tensor], hf_config: dict, fmt: str,
                       source: str = "<hf>") -> tuple[dict[str, Tensor], dict]:
    """HF state dict + ``config.json`` dict -> (our state dict, config overrides).

    The overrides are ``{"model_type": ..., "model": {...}}`` (top-level names of a config file);
    InternLM2 comes back with ``adapt_hf=True`` (use :func:`reorder_qk` for the other order).
    Missing, misshapen or unexpected tensors raise :class:`HFConversionError` naming the key and
    ``source`` (the folder).
    """
    where = f"{source}/config.json"
    hf_sd = {k: v for k, v in hf_sd.items() if not _IGNORED_HF_KEYS.search(k)}
    if hf_config.get("tie_word_embeddings") and "lm_head.weight" not in hf_sd:
        embed = hf_sd.get("model.embed_tokens.weight")
        if embed is not None:  # tied head: our model keeps its own copy
            hf_sd["lm_head.weight"] = embed.clone()
    overrides = model_overrides_from_hf(hf_config, fmt, where)
    embed = next((hf_sd[k] for k in ("model.embed_tokens.weight", "model.tok_embeddings.weight")
                  if k in hf_sd), None)
    if embed is not None and embed.is_floating_point():
        overrides["model"]["dtype"] = str(embed.dtype)
    cfg = config_from_dict(overrides, where)
    want = {k: v.shape for k, v in to_hf_state_dict(_meta_state(cfg), cfg, fmt).items()}
    _check_keys(hf_sd, want, source, "Hugging Face", "config.json")
    return _hf_to_ours(hf_sd, cfg, fmt), overrides


def _meta_state(cfg: TrainConfig) -> dict[str, Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in expected_shapes(cfg).items()}


# --------------------------------------------------------------------------------------------
# configs


def _rope_to_hf(m: ModelConfig, fmt: str) -> Optional[dict]:
    """HF dynamic NTK with factor 1 is exactly our scaling (base grows past max positions)."""
    if not m.use_dynamic_ntk_rope:
        return None
    key = "type" if fmt == "internlm2" else "rope_type"  # InternLM2's remote code reads "type"
    return {key: "dynamic", "factor": 1.0}


def hf_config_dict(cfg: TrainConfig, fmt: str, tokenizer_ids: Optional[dict] = None,
                   dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """``config.json`` of the export of ``cfg`` in layout ``fmt``.

    Written with the long-standing ``rope_theta``/``rope_scaling`` fields, which transformers 4.x
    reads as is and 5.x moves into ``rope_parameters``.  ``tokenizer_ids`` holds
    ``bos_token_id``/``eos_token_id``/``pad_token_id``.
    """
    _check_supported(cfg.model_type, fmt)
    m, dims = cfg.model, Dims.of(cfg)
    out: dict[str, Any] = {
        "vocab_size": dims.vocab, "hidden_size": dims.hidden, "intermediate_size": dims.ffn,
        "num_hidden_layers": dims.layers, "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.kv_heads, "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings, "rms_norm_eps": m.layer_norm_epsilon,
        "rope_theta": float(m.rope_base), "rope_scaling": _rope_to_hf(m, fmt),
        "tie_word_embeddings": False, "initializer_range": 0.02, "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **(tokenizer_ids or {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}),
    }
    if fmt == "internlm2":
        out.update(architectures=["InternLM2ForCausalLM"], model_type="internlm2",
                   auto_map=dict(_INTERNLM2_AUTO_MAP), bias=False, attn_implementation="eager")
    else:
        out.update(architectures=["LlamaForCausalLM"], model_type="llama",
                   head_dim=dims.head_dim, attention_bias=cfg.model_type == INTERNLM,
                   attention_dropout=0.0, mlp_bias=False, pretraining_tp=1)
    return out


def detect_format(hf_config: dict, where: str = "config.json") -> str:
    """``llama`` or ``internlm2`` from ``architectures`` / ``model_type`` of a config.json."""
    arch = " ".join(hf_config.get("architectures") or [])
    kind = str(hf_config.get("model_type", ""))
    if "InternLM2" in arch or kind == "internlm2":
        return "internlm2"
    if "Llama" in arch or kind == "llama" or "InternLMFor" in arch or kind == "internlm":
        return "llama"  # InternLM v1's HF layout is Llama's (with biases)
    raise HFConversionError(f"{where}: unsupported architectures={arch or None!r} "
                            f"model_type={kind or None!r} (supported: Llama, InternLM, InternLM2)")


def _rope_params(hf_config: dict) -> dict:
    """RoPE settings as one dict: transformers 5.x ``rope_parameters``, 4.x ``rope_theta`` +
    ``rope_scaling``, or InternLM v1's ``rotary`` (``type`` origin = plain RoPE)."""
    c = hf_config
    params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    rotary = c.get("rotary") or {}
    params.setdefault("rope_theta", c.get("rope_theta", rotary.get("base", 10000.0)))
    kind = params.get("rope_type", params.get("type", rotary.get("type", "default")))
    params["rope_type"] = "default" if kind in (None, "origin") else kind
    if "factor" not in params and "scaling_factor" in rotary:
        params["factor"] = rotary["scaling_factor"]
    return params


def _rope_from_hf(hf_config: dict, where: str) -> tuple[float, bool]:
    """(rope base, dynamic NTK) of a config.json.

    Our dynamic NTK is Hugging Face's with factor 1.  Another factor (InternLM2's releases use
    2.0) only changes positions beyond ``max_position_embeddings``, so it is accepted with a
    warning; scalings that change every position (linear, yarn, llama3 …) are refused.
    """
    params = _rope_params(hf_config)
    theta, kind = float(params["rope_theta"]), params["rope_type"]
    if kind == "default":
        return theta, False
    if kind != "dynamic":
        raise HFConversionError(f"{where}: RoPE scaling {kind!r} is not supported (only plain "
                                "RoPE and dynamic NTK)")
    factor = float(params.get("factor", 1.0))
    if factor != 1.0:
        log.warning("%s: dynamic NTK factor %s is read as 1.0 (identical up to "
                    "max_position_embeddings=%s, different beyond)", where, factor,
                    hf_config.get("max_position_embeddings"))
    return theta, True


def _require(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise HFConversionError(f"{where}: {msg}")


def _mlp_fields(hidden: int, inter: int) -> tuple[float, int]:
    """(mlp_ratio, multiple_of) whose FFN width is exactly ``inter``."""
    for multiple_of in (256, 1):
        if ffn_hidden(hidden, inter / hidden, multiple_of) == inter:
            return inter / hidden, multiple_of
    return (inter + 0.5) / hidden, 1  # int() of the product is inter even after rounding


def model_overrides_from_hf(hf_config: dict, fmt: str, where: str = "config.json") -> dict:
    """Config-file names (``model_type``, ``model``) describing the model of a HF config.json."""
    c = hf_config
    try:
        hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        layers, vocab, inter = (int(c["num_hidden_layers"]), int(c["vocab_size"]),
                                int(c["intermediate_size"]))
    except KeyError as err:
        raise HFConversionError(f"{where}: required field {err.args[0]!r} is missing") from None
    kv = int(c.get("num_key_value_heads") or heads)
    _require(c.get("hidden_act", "silu") == "silu", where,
             f"hidden_act={c.get('hidden_act')!r}: only silu (SwiGLU) is supported")
    _require(not c.get("mlp_bias"), where, "mlp_bias=true is not supported")
    _require(heads and hidden % heads == 0 and c.get("head_dim") in (None, hidden // heads), where,
             f"head_dim={c.get('head_dim')} must equal hidden_size/num_attention_heads")
    bias = bool(c.get("attention_bias") or c.get("bias"))  # Llama's name / InternLM's name
    model_type = INTERNLM if bias else INTERNLM2
    _require(not (bias and fmt == "internlm2"), where, "InternLM2 with bias=true is not supported")
    _require(not bias or kv == heads, where, f"attention biases with num_key_value_heads={kv} != "
             f"num_attention_heads={heads}: InternLM v1 (biases) has no grouped-query attention")
    theta, dynamic = _rope_from_hf(c, where)
    ratio, multiple_of = _mlp_fields(hidden, inter)
    model = dict(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, vocab_size=vocab,
                 mlp_ratio=ratio, multiple_of=multiple_of,
                 layer_norm_epsilon=float(c.get("rms_norm_eps", 1e-6)), rope_base=theta,
                 use_dynamic_ntk_rope=dynamic,
                 max_position_embeddings=int(c.get("max_position_embeddings", 2048)))
    if model_type == INTERNLM2:
        model.update(num_kv_attention_heads=kv, adapt_hf=True, no_bias=True)
    return {"model_type": model_type, "model": model}


def check_against_run(overrides: dict, cfg: TrainConfig, where: str) -> list[str]:
    """Raise when a HF model cannot be loaded into ``cfg``'s model; return softer differences.

    Shapes must match (the error names the config.json field and the run's key); RoPE and norm
    numerics that differ only come back as warnings (extending the context changes the base).
    """
    theirs = config_from_dict(overrides, where)
    _require(theirs.model_type == cfg.model_type, where,
             f"holds a {theirs.model_type} model but the run's model_type is {cfg.model_type}")
    pairs = (("num_hidden_layers", "model.num_layers", Dims.of(theirs).layers, Dims.of(cfg).layers),
             ("hidden_size", "model.hidden_size", theirs.model.hidden_size, cfg.model.hidden_size),
             ("num_attention_heads", "model.num_attention_heads",
              theirs.model.num_attention_heads, cfg.model.num_attention_heads),
             ("num_key_value_heads", "model.num_kv_attention_heads",
              theirs.num_kv_heads, cfg.num_kv_heads),
             ("vocab_size", "model.vocab_size", theirs.model.vocab_size, cfg.model.vocab_size),
             ("intermediate_size", "model.mlp_ratio/multiple_of", Dims.of(theirs).ffn,
              Dims.of(cfg).ffn))
    for hf_key, our_key, a, b in pairs:
        _require(a == b, where, f"{hf_key}={a} but the run's {our_key} gives {b}")
    soft = (("rope_theta", "rope_base"), ("rms_norm_eps", "layer_norm_epsilon"),
            ("rope_scaling", "use_dynamic_ntk_rope"),
            ("max_position_embeddings", "max_position_embeddings"))
    return [f"{where}: {h}={getattr(theirs.model, o)} differs from the run's model.{o}="
            f"{getattr(cfg.model, o)}" for h, o in soft
            if getattr(theirs.model, o) != getattr(cfg.model, o)
            and (o != "max_position_embeddings" or cfg.model.use_dynamic_ntk_rope)]


# --------------------------------------------------------------------------------------------
# Hugging Face folders: reading


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise HFConversionError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise HFConversionError(f"{path}: not valid JSON ({err})") from None


def _safetensors_files(folder: Path) -> list[Path]:
    """The weight files of ``folder`` (from the index when there is one); never pickle files."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map") or {}
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise HFConversionError(f"{f}: missing (named by {index.name})")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for ext in ("bin", "pt", "pth") for p in folder.glob(f"*.{ext}"))
        hint = (f"; found {pickles[:3]}: pickle files are not read, re-save them as safetensors"
                if pickles else "")
        raise HFConversionError(f"{folder}: no .safetensors weights{hint}")
    return files


def read_safetensors(folder: Union[str, Path]) -> dict[str, Tensor]:
    """Every tensor of the safetensors shards of ``folder`` (index-listed keys must be present)."""
    from safetensors import safe_open

    folder = Path(folder)
    out: dict[str, Tensor] = {}
    for f in _safetensors_files(folder):
        with safe_open(str(f), framework="pt") as reader:
            for key in reader.keys():
                out[key] = reader.get_tensor(key)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        for key, name in _read_json(index)["weight_map"].items():
            if key not in out:
                raise HFConversionError(f"{folder / name}: tensor {key!r} listed in {index.name} "
                                        "is missing")
    return out


def load_hf(folder: Union[str, Path]) -> tuple[dict[str, Tensor], dict]:
    """A HF folder (``llama`` or ``internlm2`` layout, safetensors only) -> (our state dict,
    config overrides); the layout comes from config.json's ``architectures``/``model_type``."""
    folder = Path(folder)
    hf_config = _read_json(folder / "config.json")
    fmt = detect_format(hf_config, str(folder / "config.json"))
    return from_hf_state_dict(read_safetensors(folder), hf_config, fmt, str(folder))


def load_hf_for_training(folder: Union[str, Path], cfg: TrainConfig) -> dict[str, Tensor]:
    """State dict for ``cfg``'s model from a HF folder (``ckpt_type="hf"``).

    Shape mismatches with the run's config raise (naming the config.json field); numeric
    differences (RoPE base, norm eps) are logged as warnings.  The q/k order follows
    ``cfg.model.adapt_hf``.
    """
    sd, overrides = load_hf(folder)
    for warning in check_against_run(overrides, cfg, str(Path(folder) / "config.json")):
        log.warning(warning)
    if cfg.model_type == INTERNLM2 and not cfg.model.adapt_hf:
        sd = reorder_qk(sd, cfg, to_half_split=False)
    return sd


# --------------------------------------------------------------------------------------------
# Hugging Face folders: writing


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


def _plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Greedy, in key order: a new shard starts when the next tensor would overflow this one."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def write_safetensors_shards(hf_sd: dict[str, Tensor], out: Path, dtype: torch.dtype,
                             max_shard_bytes: int) -> None:
    """``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` (always indexed)."""
    from safetensors.torch import save_file

    def cast(t: Tensor) -> Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    sizes = {k: t.numel() * cast(t[:0]).element_size() for k, t in hf_sd.items()}
    shards = _plan_shards(sizes, max_shard_bytes)
    weight_map = {}
    for n, keys in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        # clone: q/k/v are views of one fused tensor and safetensors rejects shared storage
        save_file({k: cast(hf_sd[k]).clone(memory_format=torch.contiguous_format) for k in keys},
                  str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


@dataclass(frozen=True)
class SentencePieceInfo:
    """What the export needs to know about a SentencePiece model."""

    ids: dict
    """``bos_token_id``/``eos_token_id``/``pad_token_id`` for config.json (pad defaults to eos)."""
    pieces: dict
    """``bos_token``/``eos_token``/``unk_token`` strings for tokenizer_config.json."""
    vocab_size: int
    """Number of pieces."""
    add_dummy_prefix: bool
    """Whether '▁' is prepended to the text (InternLM's models: no)."""


def sentencepiece_info(model_file: Union[str, Path]) -> SentencePieceInfo:
    """Special tokens, size and prefix rule of a SentencePiece model."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    proto = pb.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    if proto.normalizer_spec.name != "identity":  # InternLM's models use identity
        log.warning("%s: SentencePiece normalizer %r: transformers' LlamaTokenizer does not apply "
                    "it, so its ids may differ from SentencePiece's on some text", model_file,
                    proto.normalizer_spec.name)
    special = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    ids = {f"{k}_token_id": (v if v >= 0 else None) for k, v in special.items() if k != "unk"}
    if ids["pad_token_id"] is None:
        ids["pad_token_id"] = ids["eos_token_id"]
    pieces = {f"{k}_token": sp.id_to_piece(v) for k, v in special.items()
              if k != "pad" and v >= 0}
    return SentencePieceInfo(ids, pieces, sp.vocab_size(),
                             bool(proto.normalizer_spec.add_dummy_prefix))


def write_tokenizer(tokenizer_path: Union[str, Path], out: Path) -> dict:
    """Copy the tokenizer into ``out`` so ``AutoTokenizer.from_pretrained(out)`` works offline.

    A SentencePiece file becomes ``tokenizer.model`` + a ``LlamaTokenizer``
    ``tokenizer_config.json`` (plus ``tokenizer.json`` when transformers is installed to build
    it); a folder's tokenizer files are copied.  Returns the special-token ids for config.json.
    """
    src = Path(tokenizer_path)
    if src.is_dir():
        for f in src.iterdir():
            if f.name in _TOKENIZER_FILES or re.fullmatch(r"tokenization_\w+\.py", f.name):
                shutil.copy2(f, out / f.name)
        sp_file = out / "tokenizer.model"
        return sentencepiece_info(sp_file).ids if sp_file.is_file() else {}
    if not src.is_file():
        raise HFConversionError(f"{src}: tokenizer not found")
    shutil.copy2(src, out / "tokenizer.model")
    info = sentencepiece_info(src)
    config = {"tokenizer_class": "LlamaTokenizer", **info.pieces, "add_bos_token": True,
              "add_eos_token": False, "add_prefix_space": info.add_dummy_prefix, "legacy": True,
              "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    _add_fast_tokenizer(out)
    return info.ids


def _add_fast_tokenizer(out: Path) -> None:
    """Let transformers build ``tokenizer.json`` from the SentencePiece model (fast loading)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:  # transformers is optional: the .model + config are enough to load
        return
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _check_tokenizer(tokenizer_path: Union[str, Path], cfg: TrainConfig) -> Optional[dict]:
    """Special-token ids of a SentencePiece tokenizer that fits the model (None for a folder)."""
    path = Path(tokenizer_path)
    if path.is_dir():
        return None
    if not path.is_file():
        raise HFConversionError(f"{path}: tokenizer not found")
    info = sentencepiece_info(path)
    if info.vocab_size > cfg.model.vocab_size:
        raise HFConversionError(f"{path}: tokenizer has {info.vocab_size} tokens but the "
                                f"model's vocab_size is {cfg.model.vocab_size}")
    return info.ids


def export_hf(model_state_dict: dict[str, Tensor], cfg: TrainConfig, out_dir: Union[str, Path],
              tokenizer_path: Optional[Union[str, Path]], fmt: str = "llama",
              dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 10 * 10**9,
              overwrite: bool = False) -> Path:
    """Write a Hugging Face folder: safetensors shards + index, config.json,
    generation_config.json and the tokenizer files.  ``out_dir`` is replaced only when complete.
    """
    hf_sd = to_hf_state_dict(model_state_dict, cfg, fmt)  # every check before any write
    ids = _check_tokenizer(tokenizer_path, cfg) if tokenizer_path is not None else None
    with staged_dir(out_dir, overwrite) as tmp:
        write_safetensors_shards(hf_sd, tmp, dtype, max_shard_bytes)
        if tokenizer_path is not None:
            ids = write_tokenizer(tokenizer_path, tmp) or ids
        config = hf_config_dict(cfg, fmt, ids, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return Path(out_dir)


# --------------------------------------------------------------------------------------------
# our checkpoints (isolated: the only code that knows the checkpoint layout)

CKPT_CONFIG_FILE = "config.py"
"""The run's config file, saved next to the DCP files of a checkpoint."""
CKPT_MODEL_CONFIG_FILE = "model_config.json"
"""The run's ``model`` section as JSON (the trainer names differences in shape errors)."""
CKPT_MODEL_PREFIX = "model."
"""DCP keys of the model weights: ``model.<parameter name>``."""


@contextlib.contextmanager
def _single_process_dcp() -> Iterator[None]:
    """DCP warns on every single-process call, which is exactly what the converter does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _resolve_ckpt_folder(path: Path) -> Path:
    """A checkpoint folder, or the newest complete checkpoint of a run's save folder; checked
    for completeness (marker, manifest) by the trainer's own rules."""
    from internevo.train.checkpoint import (
        CheckpointError,
        latest_checkpoint,
        marker_step,
        verify_checkpoint,
    )

    folder = path
    if marker_step(path) is None and not (path / ".metadata").is_file():
        folder = latest_checkpoint(path) or path
    try:
        verify_checkpoint(folder, ("model",))
    except CheckpointError as err:
        raise HFConversionError(str(err)) from None
    return folder


def load_model_state_for_export(path: Union[str, Path]) -> tuple[dict[str, Tensor], TrainConfig]:
    """(model state dict, run config) of one of our checkpoints (DCP, read on one process), in
    the single-process model's shapes whatever the run's parallel layout."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = _resolve_ckpt_folder(Path(path))
    if not (folder / CKPT_CONFIG_FILE).is_file():
        raise HFConversionError(f"{folder / CKPT_CONFIG_FILE}: missing (the run's config file is "
                                "needed to know the model)")
    cfg = load_config(folder / CKPT_CONFIG_FILE)
    reader = dcp.FileSystemReader(str(folder))
    meta = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if k.startswith(CKPT_MODEL_PREFIX) and isinstance(m, TensorStorageMetadata)}
    if not state:
        raise HFConversionError(f"{folder}: no '{CKPT_MODEL_PREFIX}*' tensors in the checkpoint")
    with _single_process_dcp():
        dcp.load(state, storage_reader=reader, no_dist=True)
    from internevo.models.internlm import qkv_from_checkpoint  # v1 Wqkv: [3, H*d, h] on disk

    names = {k: k[len(CKPT_MODEL_PREFIX):] for k in state}
    return {names[k]: qkv_from_checkpoint(names[k], v) for k, v in state.items()}, cfg


def config_text(cfg: TrainConfig) -> str:
    """A loadable config file holding ``cfg``'s model (the text of ``cfg`` when it has one)."""
    if cfg.text:
        return cfg.text
    from internevo.config import MODEL_KEYS_ONLY_FOR

    foreign = set().union(*(ks for t, ks in MODEL_KEYS_ONLY_FOR.items() if t != cfg.model_type))
    defaults = ModelConfig()
    model = {f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(ModelConfig)
             if f.name not in foreign and getattr(cfg.model, f.name) != getattr(defaults, f.name)}
    body = ",\n".join(f"    {k}={v!r}" for k, v in model.items())
    return (f"# written by internevo (model only)\nJOB_NAME = {cfg.JOB_NAME!r}\n"
            f"model_type = {cfg.model_type!r}\nmodel = dict(\n{body},\n)\n")


def save_model_state(path: Union[str, Path], sd: dict[str, Tensor], cfg: TrainConfig,
                     overwrite: bool = False) -> Path:
    """Write a model-only checkpoint: DCP ``model.<name>`` tensors, config.py and
    model_config.json, which the trainer loads with ``content=("model",)``."""
    import torch.distributed.checkpoint as dcp

    from internevo.models.internlm import qkv_to_checkpoint  # the trainer's checkpoint layout

    with staged_dir(path, overwrite) as tmp:
        state = {CKPT_MODEL_PREFIX + k: qkv_to_checkpoint(k, v.contiguous()) for k, v in sd.items()}
        with _single_process_dcp():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp)), no_dist=True)
        (tmp / CKPT_CONFIG_FILE).write_text(config_text(cfg))
        model = json.dumps(dataclasses.asdict(cfg.model), indent=2)
        (tmp / CKPT_MODEL_CONFIG_FILE).write_text(model + "\n")
    return Path(path)


# --------------------------------------------------------------------------------------------
# command line


def parse_size(text: str) -> int:
    """``10GB`` / ``500MB`` / ``2GiB`` / ``1048576`` -> bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 10GB, 500MB)")
    value, unit, binary = match.groups()
    power = "KMGT".find(unit.upper()) + 1 if unit else 0
    return int(float(value) * (1024 if binary else 1000) ** power)


def parse_dtype(text: str) -> torch.dtype:
    """``bfloat16`` / ``bf16`` / ``torch.float16`` … -> torch dtype."""
    name = text.removeprefix("torch.").lower()
    if name not in _DTYPE_NAMES:
        raise argparse.ArgumentTypeError(f"unsupported dtype {text!r}; use bfloat16, float16 or "
                                         "float32")
    return _DTYPE_NAMES[name]


def _to_hf(args: argparse.Namespace) -> int:
    sd, cfg = load_model_state_for_export(args.src)
    out = export_hf(sd, cfg, args.tgt, args.tokenizer, args.format, args.dtype,
                    args.max_shard, args.overwrite)
    print(f"wrote {args.format} Hugging Face folder {out} ({cfg.model_type}, {args.dtype})")
    if args.format == "internlm2":
        print("note: copy configuration_internlm2.py / modeling_internlm2.py from an InternLM2 "
              "release into it to load with trust_remote_code=True")
    return 0


def _from_hf(args: argparse.Namespace) -> int:
    sd, overrides = load_hf(args.src)
    if args.dtype is not None:
        sd = {k: v.to(args.dtype) for k, v in sd.items()}
        overrides["model"]["dtype"] = str(args.dtype)
    if overrides["model_type"] == INTERNLM2 and not args.adapt_hf:
        overrides["model"]["adapt_hf"] = False
    cfg = config_from_dict(overrides, str(Path(args.src) / "config.json"))
    if not cfg.model.adapt_hf:
        sd = reorder_qk(sd, cfg, to_half_split=False)
    save_model_state(args.tgt, sd, cfg, args.overwrite)
    print(f"wrote checkpoint {args.tgt} ({cfg.model_type}); load it with "
          f"load_ckpt_info=dict(path={str(args.tgt)!r}, content=('model',), ckpt_type='internevo')")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """``internevo convert {to-hf,from-hf}``."""
    parser = argparse.ArgumentParser(prog="internevo convert")
    sub = parser.add_subparsers(dest="command", required=True)
    to = sub.add_parser("to-hf", help="our checkpoint -> Hugging Face folder")
    to.add_argument("--src", required=True, help="checkpoint folder (or a run's save folder)")
    to.add_argument("--tgt", required=True, help="Hugging Face folder to write")
    to.add_argument("--tokenizer", required=True, help="SentencePiece model (or tokenizer folder)")
    to.add_argument("--format", choices=FORMATS, default="llama")
    to.add_argument("--dtype", type=parse_dtype, default=torch.bfloat16)
    to.add_argument("--max_shard", type=parse_size, default=10 * 10**9, help="e.g. 10GB")
    to.add_argument("--overwrite", action="store_true", help="replace a non-empty --tgt")
    to.set_defaults(run=_to_hf)
    back = sub.add_parser("from-hf", help="Hugging Face folder -> our checkpoint")
    back.add_argument("--src", required=True, help="Hugging Face folder (safetensors)")
    back.add_argument("--tgt", required=True, help="checkpoint folder to write")
    back.add_argument("--dtype", type=parse_dtype, default=None, help="default: keep the weights'")
    back.add_argument("--adapt_hf", type=lambda s: s.lower() in ("1", "true", "yes"),
                      default=True, help="InternLM2: false stores q/k interleaved")
    back.add_argument("--overwrite", action="store_true", help="replace a non-empty --tgt")
    back.set_defaults(run=_from_hf)
    return parser


def convert_main(argv: Sequence[str]) -> int:
    """Entry point of ``internevo convert`` and of ``tools/transformers/*.py``."""
    args = build_parser().parse_args(list(argv))
    try:
        return args.run(args)
    except (HFConversionError, ConfigError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
