"""Single-device model code (no communication inside): InternLM v1 and InternLM2."""

from internevo.models.attention import Segments, packed_causal_attention
from internevo.models.init import init_parameter, init_weights
from internevo.models.internlm import InternLM
from internevo.models.internlm2 import InternLM2
from internevo.models.layers import RMSNorm, RotaryEmbedding, SwiGLU, ffn_hidden
from internevo.models.registry import (
    MODEL_REGISTRY,
    ModelSpec,
    apply_activation_checkpointing,
    build_model,
    count_parameters,
    get_spec,
    model_dtype,
)

__all__ = [
    "MODEL_REGISTRY", "InternLM", "InternLM2", "ModelSpec", "RMSNorm", "RotaryEmbedding",
    "Segments", "SwiGLU", "apply_activation_checkpointing", "build_model", "count_parameters",
    "ffn_hidden", "get_spec", "init_parameter", "init_weights", "model_dtype",
    "packed_causal_attention",
]
