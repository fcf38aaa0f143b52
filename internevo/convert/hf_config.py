"""``config.json`` of a Hugging Face folder: writing it for an export, reading a model from it.

Format-level fields (Llama's architecture, RoPE, sizes) are built here; model-specific fields
(biases, InternLM2's remote-code layout) come from the spec (``spec.hf.config_fields``).  With
transformers installed, a ``llama`` config is passed through ``transformers.LlamaConfig`` so that
a field it would reject fails here, at export time.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from internevo.config import ModelConfig, TrainConfig, config_from_dict
from internevo.errors import InternEvoError
from internevo.models.base import Dims, ModelSpec
from internevo.models.common import ffn_hidden
from internevo.models.registry import MODEL_REGISTRY, get_spec

log = logging.getLogger(__name__)

FORMATS = ("llama", "internlm2")
"""Hugging Face layouts: ``llama`` (stock ``LlamaForCausalLM``), ``internlm2`` (remote code)."""


class HFConversionError(InternEvoError, ValueError):
    """A checkpoint or Hugging Face folder cannot be converted (names the file or the key)."""

    kind = "conversion error"


def check_supported(cfg: TrainConfig, fmt: str) -> ModelSpec:
    """The spec of ``cfg``'s model when it can be written in layout ``fmt``."""
    if fmt not in FORMATS:
        raise HFConversionError(f"unknown Hugging Face format {fmt!r}; valid: {', '.join(FORMATS)}")
    spec = get_spec(cfg.model_type)
    if fmt not in spec.hf.formats:
        raise HFConversionError(f"model_type {cfg.model_type} cannot be written in the {fmt!r} "
                                f"format (valid for it: {', '.join(spec.hf.formats)})")
    return spec


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
    spec = check_supported(cfg, fmt)
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
    if fmt == "llama":
        out.update(architectures=["LlamaForCausalLM"], model_type="llama",
                   head_dim=dims.head_dim, attention_dropout=0.0, mlp_bias=False,
                   pretraining_tp=1)
    out.update(spec.hf.config_fields(cfg, fmt))
    if fmt == "llama":
        _check_with_transformers(out)
    return out


def _check_with_transformers(config: dict[str, Any]) -> None:
    """Let ``transformers.LlamaConfig`` read the dict (when installed): a field it rejects, or a
    size it reads differently, fails the export instead of the user's later load."""
    try:
        from transformers import LlamaConfig
    except ImportError:  # transformers is optional
        return
    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    parsed = LlamaConfig(**fields)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "head_dim"):
        if getattr(parsed, key) != config[key]:
            raise HFConversionError(f"config.json: transformers reads {key}={getattr(parsed, key)}"
                                    f" but the export wrote {config[key]}")




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


def model_overrides_from_hf(hf_config: dict, fmt: str, where: str = "config.json",
                            model_type: Optional[str] = None) -> dict:
    """Config-file names (``model_type``, ``model``) describing the model of a HF config.json
    (``model_type``: read it as that registered type instead of the first that matches)."""
    c = hf_config
    try:
        hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        layers, vocab, inter = (int(c["num_hidden_layers"]), int(c["vocab_size"]),
                                int(c["intermediate_size"]))
    except KeyError as err:
        raise HFConversionError(f"{where}: required field {err.args[0]!r} is missing") from None
    _require(c.get("hidden_act", "silu") == "silu", where,
             f"hidden_act={c.get('hidden_act')!r}: only silu (SwiGLU) is supported")
    _require(not c.get("mlp_bias"), where, "mlp_bias=true is not supported")
    _require(heads and hidden % heads == 0 and c.get("head_dim") in (None, hidden // heads), where,
             f"head_dim={c.get('head_dim')} must equal hidden_size/num_attention_heads")
    spec = _spec_of(c, fmt, where, model_type)
    theta, dynamic = _rope_from_hf(c, where)
    ratio, multiple_of = _mlp_fields(hidden, inter)
    model = dict(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, vocab_size=vocab,
                 mlp_ratio=ratio, multiple_of=multiple_of,
                 layer_norm_epsilon=float(c.get("rms_norm_eps", 1e-6)), rope_base=theta,
                 use_dynamic_ntk_rope=dynamic,
                 max_position_embeddings=int(c.get("max_position_embeddings", 2048)))
    try:
        model.update(spec.hf.model_fields(c, fmt, where))
    except ValueError as err:
        raise HFConversionError(str(err)) from None
    return {"model_type": spec.name, "model": model}


def _spec_of(hf_config: dict, fmt: str, where: str, model_type: Optional[str]) -> ModelSpec:
    """The registered model a config.json describes: ``model_type`` when given (it must be able
    to read ``fmt``), else the first registered spec whose ``hf.matches`` accepts it."""
    if model_type is not None:
        spec = get_spec(model_type)
        _require(fmt in spec.hf.formats and spec.hf.matches(hf_config, fmt), where,
                 f"does not describe a {model_type} model in the {fmt!r} layout")
        return spec
    for spec in MODEL_REGISTRY.values():
        if fmt in spec.hf.formats and spec.hf.matches(hf_config, fmt):
            return spec
    raise HFConversionError(f"{where}: no registered model reads this {fmt!r} config "
                            f"(registered: {', '.join(MODEL_REGISTRY)})")


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
