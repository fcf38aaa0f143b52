"""InternLM2 (``INTERNLM2_PUBLIC``): grouped-query attention with a fused, KV-group-major ``wqkv``.

Parameter names are InternEvo's (and Hugging Face InternLM2's without the ``model.`` prefix):
``tok_embeddings``, ``layers.{i}.attention.{wqkv,wo}``, ``layers.{i}.attention_norm``,
``layers.{i}.ffn_norm``, ``layers.{i}.feed_forward.{w1,w2,w3}``, ``norm``, ``output``.
"""

from __future__ import annotations

from torch import Tensor, nn

from internevo.config import ModelConfig
from internevo.models.common import (
    CausalLM,
    ForwardContext,
    NormHead,
    apply_rotary,
    attend,
)


class GQA(nn.Module):
    """Grouped-query attention with RoPE and no biases.

    ``wqkv`` output rows are grouped by KV head: group ``g`` holds ``[q_{g,0} .. q_{g,qpk-1}, k_g,
    v_g]`` (``d`` rows each), query head ``g*qpk + i``.  Only the ratio ``qpk`` is stored, so a
    ``wqkv`` sharded by contiguous KV groups (tensor parallel) needs no change here.
    """

    def __init__(self, m: ModelConfig) -> None:
        super().__init__()
        heads = m.num_attention_heads
        kv_heads = m.num_kv_attention_heads or heads
        self.head_dim = m.hidden_size // heads
        self.q_per_kv = heads // kv_heads
        self.interleaved = not m.adapt_hf
        self.attn_drop = m.attn_drop_rate
        self.use_flash = m.use_flash_attn
        rows = (heads + 2 * kv_heads) * self.head_dim
        self.wqkv = nn.Linear(m.hidden_size, rows, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, m.hidden_size, bias=False)

    def forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        """``x [B, S, h]`` -> ``[B, S, h]``; the KV-group count comes from the weight's shape."""
        b, s, _ = x.shape
        qpk = self.q_per_kv
        qkv = self.wqkv(x).view(b, s, -1, qpk + 2, self.head_dim)
        # RoPE reads the strided q/k views and writes contiguous tensors: no extra copy
        q = apply_rotary(qkv[:, :, :, :qpk], ctx.cos, ctx.sin, self.interleaved)
        k = apply_rotary(qkv[:, :, :, qpk], ctx.cos, ctx.sin, self.interleaved)
        q = q.view(b, s, -1, self.head_dim)
        out = attend(q, k, qkv[:, :, :, qpk + 1], ctx, self.attn_drop, self.training,
                     self.use_flash)
        return self.wo(out.reshape(b, s, -1))


class InternLM2(CausalLM):
    """InternLM2 decoder (``model_type="INTERNLM2_PUBLIC"``); each block is
    ``r = drop(x); r = drop(attention(attention_norm(r))) + r; feed_forward(ffn_norm(r)) + r``."""

    embedding_attr = "tok_embeddings"
    blocks_attr = "layers"
    norm_attr = "norm"
    head_attr = "output"
    part_names = ("attention", "attention_norm", "feed_forward", "ffn_norm")
    attention_class = GQA

    def build_head(self, m: ModelConfig) -> nn.Module:
        """``norm_head``: InternLM2's row-normalised head; otherwise a bias-free Linear."""
        return NormHead(m.hidden_size, m.vocab_size) if m.norm_head else super().build_head(m)
