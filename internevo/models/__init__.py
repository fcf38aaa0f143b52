"""Single-device model code (no communication inside): one folder per model (``internlm/``,
``internlm2/``), shared layers, the registry of model specs, building and loss math."""

from internevo.models.attention import Segments, packed_causal_attention
from internevo.models.base import ModelSpec
from internevo.models.build import (
    apply_activation_checkpointing,
    build_model,
    count_parameters,
    model_dtype,
)
from internevo.models.common import RMSNorm, RotaryEmbedding, SwiGLU, ffn_hidden
from internevo.models.init import init_parameter, init_weights
from internevo.models.internlm import InternLM
from internevo.models.internlm2 import InternLM2
from internevo.models.registry import MODEL_REGISTRY, get_spec

__all__ = [
    "MODEL_REGISTRY", "InternLM", "InternLM2", "ModelSpec", "RMSNorm", "RotaryEmbedding",
    "Segments", "SwiGLU", "apply_activation_checkpointing", "build_model", "count_parameters",
    "ffn_hidden", "get_spec", "init_parameter", "init_weights", "model_dtype",
    "packed_causal_attention",
]
