"""LLaMA 2 (``LLAMA2``): InternEvo's Llama with separate ``wq``/``wk``/``wv``, GQA, no biases.

Parameter names are InternEvo's: ``tok_embeddings``, ``layers.{i}.attention.{wq,wk,wv,wo}``,
``layers.{i}.attention_norm``, ``layers.{i}.ffn_norm``, ``layers.{i}.feed_forward.{w1,w2,w3}``,
``norm``, ``output``.  Query head ``h`` attends with key/value head ``h // (H / KV)``.  With
``adapt_hf=False`` (the LLAMA2 default) the stored q/k features of each head are interleaved
(GPT-J RoPE); ``adapt_hf=True`` stores them half-split, as Hugging Face Llama does.
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


class LlamaAttention(nn.Module):
    """Grouped-query attention with RoPE from three projections; head counts follow the weights'
    shapes (so tensor parallel, which splits ``wq`` by query heads and ``wk``/``wv`` by KV heads,
    needs no change here)."""

    def __init__(self, m: ModelConfig) -> None:
        super().__init__()
        heads = m.num_attention_heads
        kv_heads = m.num_kv_attention_heads or heads
        self.head_dim = m.hidden_size // heads
        self.interleaved = not m.adapt_hf
        self.attn_drop = m.attn_drop_rate
        self.use_flash = m.use_flash_attn
        self.wq = nn.Linear(m.hidden_size, heads * self.head_dim, bias=False)
        self.wk = nn.Linear(m.hidden_size, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(m.hidden_size, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, m.hidden_size, bias=False)

    def forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        """``x [B, S, h]`` -> ``[B, S, h]``."""
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, -1, self.head_dim)
        k = self.wk(x).view(b, s, -1, self.head_dim)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        q = apply_rotary(q, ctx.cos, ctx.sin, self.interleaved)
        k = apply_rotary(k, ctx.cos, ctx.sin, self.interleaved)
        out = attend(q, k, v, ctx, self.attn_drop, self.training, self.use_flash)
        return self.wo(out.reshape(b, s, -1))


class Llama(CausalLM):
    """LLaMA 2 decoder (``model_type="LLAMA2"``); each block is
    ``r = drop(x); r = drop(attention(attention_norm(r))) + r; feed_forward(ffn_norm(r)) + r``."""

    embedding_attr = "tok_embeddings"
    blocks_attr = "layers"
    norm_attr = "norm"
    head_attr = "output"
    part_names = ("attention", "attention_norm", "feed_forward", "ffn_norm")
    attention_class = LlamaAttention
