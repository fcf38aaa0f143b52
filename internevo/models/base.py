"""What a model folder declares: :class:`ModelSpec` and the parts it is made of.

Generic code (initialisation, tensor parallel, checkpoints, Hugging Face conversion, pipeline and
weight parallel) asks the spec of ``cfg.model_type`` (:func:`internevo.models.registry.get_spec`)
and never branches on the model type.  A model folder ``models/<name>/`` holds ``model.py`` (the
single-device ``nn.Module``) and ``spec.py`` (one :class:`ModelSpec`); the registry maps the
``model_type`` string to it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from internevo.config import ModelConfig, TrainConfig
from internevo.models.common import ffn_hidden

StateDict = dict[str, Tensor]

GQA_MODEL_KEYS = frozenset({
    "num_kv_attention_heads", "adapt_hf", "no_bias", "init_type", "embedding_init_std",
    "attn_wqkv_init_std", "attn_other_init_std", "ffn_uplayer_init_std", "ffn_other_init_std",
    "out_head_init_std",
})
"""``model.*`` keys InternEvo's grouped-query models (InternLM2, LLaMA 2) accept and v1 does not:
KV heads, the q/k layout, and the per-kind init stds."""


@dataclass(frozen=True)
class Dims:
    """The shapes conversions and plans need, derived from a :class:`TrainConfig`."""

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


@dataclass(frozen=True)
class TPPlan:
    """Module names (inside each block, or at the top) and how tensor parallel splits each."""

    embedding: str
    """Top-level token embedding (vocab- or hidden-parallel)."""
    head: str
    """Top-level output head (column-parallel over the vocabulary)."""
    regions: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]
    """Region (a module inside a block) -> (column-parallel linears, row-parallel linears)."""
    fused_qkv: tuple[str, ...] = ()
    """Column linears whose rows are ``[Q; K; V]`` blocks (InternLM v1): sharded per block."""

    def block_linears(self) -> list[str]:
        """Every split linear of one block, as ``region.linear`` (what weight parallel shards)."""
        return [f"{region}.{name}" for region, (cols, rows) in self.regions.items()
                for name in (*cols, *rows)]


@dataclass(frozen=True)
class HFMapping:
    """How the model is written as (and read from) a Hugging Face folder.

    ``formats`` are the layouts it can be written in (``llama`` is what stock ``transformers``
    loads); renamed tensors come from ``top_names`` / ``layer_names`` (``layer_names`` suffixes
    sit under ``<blocks>.{i}`` on our side and ``model.layers.{i}`` on theirs), tensors that are
    split or fused come from ``to_hf_layer`` / ``from_hf_layer``.
    """

    formats: tuple[str, ...]
    top_names: dict[str, dict[str, str]]
    """Format -> {our name: HF name} of the tensors outside the blocks."""
    layer_names: dict[str, dict[str, str]]
    """Format -> {our suffix: HF suffix} of the per-layer tensors that are only renamed."""
    to_hf_layer: Callable[[StateDict, str, int, Dims], StateDict]
    """(our state dict, format, layer, dims) -> the HF tensors of the layer's fused parts."""
    from_hf_layer: Callable[[StateDict, str, int, Dims], StateDict]
    """Inverse of ``to_hf_layer``: our fused tensors of the layer from the HF state dict."""
    config_fields: Callable[[TrainConfig, str], dict[str, Any]]
    """Model-specific ``config.json`` fields of format ``fmt`` (architectures, biases …)."""
    matches: Callable[[dict, str], bool]
    """Whether a HF ``config.json`` (and its format) describes a model of this type."""
    model_fields: Callable[[dict, str, str], dict[str, Any]]
    """(config.json, format, where) -> this type's own ``model`` keys (e.g. KV heads); raises
    :class:`ValueError` naming ``where`` for a config it cannot represent."""
    to_hf_order: Optional[Callable[[StateDict, TrainConfig], StateDict]] = None
    """Turn a state dict into the feature order HF expects (InternLM2 ``adapt_hf=False``)."""
    from_hf_order: Optional[Callable[[StateDict, TrainConfig], StateDict]] = None
    """Inverse of ``to_hf_order``, applied when the run's config asks for it."""


def _no_checkpoint_shape(name: str, shape: tuple) -> Optional[tuple]:
    return None


@dataclass(frozen=True)
class ModelSpec:
    """Everything the framework needs to know about one registered model type."""

    name: str
    """The ``model_type`` string of config files."""
    model_class: type[nn.Module]
    """The single-device model (built from a :class:`~internevo.config.ModelConfig`)."""
    own_keys: frozenset[str]
    """``model.*`` config keys only this type (among the registered ones) accepts."""
    init_std: Callable[[str, Optional[int], ModelConfig], Optional[float]]
    """(canonical parameter name, its block index or None, model config) -> initial std (None:
    no rule for that name); norm weights (1) and biases (0) are handled generically."""
    init_kind: Callable[[ModelConfig], str]
    """``normal`` or ``uniform`` for the std-initialised parameters."""
    tp_plan: TPPlan
    """Tensor-parallel plan (also the per-block linears of weight parallel)."""
    hf: HFMapping
    """Hugging Face names, layouts and config fields."""
    checkpoint_shape: Callable[[str, tuple], Optional[tuple]] = field(
        default=_no_checkpoint_shape)
    defaults: dict[str, Any] = field(default_factory=dict)
    """``model.*`` values this type uses when a config file does not set them (InternEvo's
    per-model defaults, e.g. LLAMA2's ``adapt_hf=False``); applied when a config is loaded."""
    """(name, shape) -> the tensor's layout-independent checkpoint shape, or None when it is
    saved as it is (InternLM v1's fused ``Wqkv`` is saved as ``[3, H*d, ...]``)."""
    legacy_names: Optional[Callable[[StateDict, ModelConfig], StateDict]] = None
    """Rename the tensors of one InternEvo model file written under an older naming (told by
    their shapes) to ours; None when the type has no older naming."""

    def build(self, cfg: TrainConfig) -> nn.Module:
        """The uninitialised single-device model of ``cfg``."""
        return self.model_class(cfg.model)

    @property
    def blocks_attr(self) -> str:
        """Attribute of the ``nn.ModuleList`` of transformer blocks (pipeline split points)."""
        return self.model_class.blocks_attr

    @property
    def embedding_attr(self) -> str:
        """Attribute of the token embedding (first pipeline stage only)."""
        return self.model_class.embedding_attr

    @property
    def norm_attr(self) -> str:
        """Attribute of the final norm (last pipeline stage only)."""
        return self.model_class.norm_attr

    @property
    def head_attr(self) -> str:
        """Attribute of the output head (last pipeline stage only)."""
        return self.model_class.head_attr

    def layer_index(self, name: str) -> Optional[int]:
        """Block index of parameter ``name`` (None outside the blocks)."""
        match = re.search(rf"(?:^|\.){re.escape(self.blocks_attr)}\.(\d+)\.", name)
        return int(match.group(1)) if match else None


def scaled_std(std: float, layer: Optional[int], m: ModelConfig) -> float:
    """``std / sqrt(2 (layer + 1))`` for output projections under ``use_scaled_init``."""
    if not m.use_scaled_init or layer is None:
        return std
    return std / math.sqrt(2.0 * (layer + 1))


def suffix_lookup(name: str, table: dict[str, float]) -> Optional[float]:
    """The value of the first ``table`` suffix that ``name`` ends with (as a dotted component)."""
    for suffix, value in table.items():
        if name == suffix or name.endswith("." + suffix):
            return value
    return None


def _half_split_perm(head_dim: int) -> Tensor:
    """Feature ``j`` of the half-split order is feature ``perm[j]`` of the interleaved order."""
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))


def permute_heads(w: Tensor, head_dim: int, inverse: bool) -> Tensor:
    """Reorder the rows of every ``head_dim``-row head of ``w`` from interleaved (GPT-J) to
    half-split (NeoX) q/k feature order (``inverse``: back): what a model that stores q/k
    interleaved (``adapt_hf=False``) needs for Hugging Face's RoPE."""
    perm = _half_split_perm(head_dim)
    if inverse:
        perm = torch.argsort(perm)
    rest = w.shape[1:]
    return w.reshape(-1, head_dim, *rest)[:, perm.to(w.device)].reshape(-1, *rest)
