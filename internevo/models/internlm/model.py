"""InternLM v1 (``INTERNLM``): pre-norm decoder, fused ``Wqkv`` with bias, SwiGLU MLP.

Parameter names are InternEvo's: ``embedding``, ``blocks.{i}.mixer.{Wqkv,out_proj}``,
``blocks.{i}.norm1``, ``blocks.{i}.norm2``, ``blocks.{i}.mlp.{w1,w2,w3}``, ``norm``, ``head``.

Checkpoints store the fused ``Wqkv`` weight and bias as ``[3, H*d, h]`` / ``[3, H*d]`` whatever
the tensor-parallel size (``spec.qkv_checkpoint_shape``): the shape tensor parallel holds them in.
"""

from __future__ import annotations

from torch import Tensor, nn

from internevo.config import ModelConfig
from internevo.models.common import (
    CausalLM,
    ForwardContext,
    apply_rotary,
    attend,
)


class MHA(nn.Module):
    """Multi-head self-attention with RoPE; ``Wqkv`` rows are ``[Q; K; V]``, each ``[H*d]``."""

    def __init__(self, m: ModelConfig) -> None:
        super().__init__()
        hidden = m.hidden_size
        self.head_dim = hidden // m.num_attention_heads
        self.attn_drop = m.attn_drop_rate
        self.use_flash = m.use_flash_attn
        self.Wqkv = nn.Linear(hidden, 3 * hidden, bias=True)
        self.out_proj = nn.Linear(hidden, hidden, bias=True)

    def forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        """``x [B, S, h]`` -> ``[B, S, h]``; the head count comes from the weight's shape."""
        b, s, _ = x.shape
        qkv = self.Wqkv(x).view(b, s, 3, -1, self.head_dim)
        q = apply_rotary(qkv[:, :, 0], ctx.cos, ctx.sin)
        k = apply_rotary(qkv[:, :, 1], ctx.cos, ctx.sin)
        out = attend(q, k, qkv[:, :, 2], ctx, self.attn_drop, self.training, self.use_flash)
        return self.out_proj(out.reshape(b, s, -1))


class InternLM(CausalLM):
    """InternLM v1 decoder (``model_type="INTERNLM"``); each block is InternEvo's
    ``r = drop(x); r = drop(mixer(norm1(r))) + r; mlp(norm2(r)) + r``."""

    embedding_attr = "embedding"
    blocks_attr = "blocks"
    norm_attr = "norm"
    head_attr = "head"
    part_names = ("mixer", "norm1", "mlp", "norm2")
    attention_class = MHA
