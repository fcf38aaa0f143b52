"""Conversion between our state dicts and Hugging Face ones: pure functions, no files.

Two Hugging Face layouts (``fmt``, :data:`~internevo.convert.hf_config.FORMATS`):

* ``llama``: what stock ``transformers`` loads as ``LlamaForCausalLM`` without remote code.
* ``internlm2``: the published InternLM2 layout for users of InternLM2's remote code.

Each model's spec says which layouts it has and how its tensors are named and split
(``spec.hf``): tensors that are only renamed come from its name tables, fused ones (InternLM2's
KV-group-major ``wqkv``, v1's ``Wqkv``) from its per-layer functions, and a model whose stored
q/k feature order differs from Hugging Face's half-split RoPE reorders them
(``spec.hf.to_hf_order``).  Folder I/O is :mod:`internevo.convert.hf_folder`.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from internevo.config import TrainConfig, config_from_dict
from internevo.convert.hf_config import HFConversionError, check_supported, model_overrides_from_hf
from internevo.models.base import Dims
from internevo.models.build import build_model

# non-weights some exporters leave in HF folders
_IGNORED_HF_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def name_map(cfg: TrainConfig, fmt: str) -> dict[str, str]:
    """Our name -> HF name for every tensor that is only renamed (not the fused ones)."""
    spec = check_supported(cfg, fmt)
    names = dict(spec.hf.top_names[fmt])
    for i in range(cfg.model.num_layers):
        for ours, theirs in spec.hf.layer_names[fmt].items():
            names[f"{spec.blocks_attr}.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


def _normalise_ours(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Accept the vocab-split embedding alias ``<embedding>.word_embeddings.weight``."""
    return {k.replace(".word_embeddings.", "."): v for k, v in sd.items()}


def expected_shapes(cfg: TrainConfig) -> dict[str, torch.Size]:
    """Our parameter names and shapes for ``cfg`` (from the model built on the meta device)."""
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
    spec = check_supported(cfg, fmt)
    sd = _normalise_ours(sd)
    _check_keys(sd, expected_shapes(cfg), cfg.source or "<checkpoint>", "model",
                "the run's config")
    if spec.hf.to_hf_order is not None:
        sd = spec.hf.to_hf_order(sd, cfg)
    if cfg.model.norm_head:  # HF has a plain head: write the rows the forward multiplies by
        head = f"{spec.head_attr}.weight"
        sd = {**sd, head: F.normalize(sd[head].float(), dim=-1).to(sd[head].dtype)}
    dims = Dims.of(cfg)
    out = {theirs: sd[ours] for ours, theirs in name_map(cfg, fmt).items()}
    for i in range(dims.layers):
        out.update(spec.hf.to_hf_layer(sd, fmt, i, dims))
    return out


def _hf_to_ours(hf_sd: dict[str, Tensor], cfg: TrainConfig, fmt: str) -> dict[str, Tensor]:
    """Rename and fuse (the inputs are already checked)."""
    spec, dims = check_supported(cfg, fmt), Dims.of(cfg)
    out = {ours: hf_sd[theirs] for ours, theirs in name_map(cfg, fmt).items()}
    for i in range(dims.layers):
        out.update(spec.hf.from_hf_layer(hf_sd, fmt, i, dims))
    return out


def from_hf_state_dict(hf_sd: dict[str, Tensor], hf_config: dict, fmt: str,
                       source: str = "<hf>", model_type: Optional[str] = None
                       ) -> tuple[dict[str, Tensor], dict]:
    """HF state dict + ``config.json`` dict -> (our state dict, config overrides).

    The overrides are ``{"model_type": ..., "model": {...}}`` (top-level names of a config file);
    The model type is the first registered one whose spec matches the config (or
    ``model_type``); InternLM2 comes back with ``adapt_hf=True`` (``spec.hf.from_hf_order`` gives
    the other order).
    Missing, misshapen or unexpected tensors raise :class:`HFConversionError` naming the key and
    ``source`` (the folder).
    """
    where = f"{source}/config.json"
    hf_sd = {k: v for k, v in hf_sd.items() if not _IGNORED_HF_KEYS.search(k)}
    if hf_config.get("tie_word_embeddings") and "lm_head.weight" not in hf_sd:
        embed = hf_sd.get("model.embed_tokens.weight")
        if embed is not None:  # tied head: our model keeps its own copy
            hf_sd["lm_head.weight"] = embed.clone()
    overrides = model_overrides_from_hf(hf_config, fmt, where, model_type)
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
