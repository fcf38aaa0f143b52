"""Building blocks shared by the models: RMSNorm, RoPE (with dynamic NTK), SwiGLU, and the
decoder skeleton (embedding -> blocks -> norm -> head) with the per-forward context.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from internevo.config import ModelConfig
from internevo.models.attention import CuSeqlens, Segments, packed_causal_attention


def ffn_hidden(hidden: int, mlp_ratio: float, multiple_of: int) -> int:
    """FFN width: ``int(hidden * mlp_ratio)`` rounded up to a multiple of ``multiple_of``."""
    return multiple_of * math.ceil(int(hidden * mlp_ratio) / multiple_of)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (whatever the input and weight dtypes), returned in the input dtype.

    Computing in fp32 lets the weight stay fp32 (``use_fp32_norm``) under a 16-bit model.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise the last dimension."""
        out = F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps)
        return out.to(x.dtype)


def head_rows(module: nn.Module, weight: Tensor) -> Tensor:
    """``weight`` as the output head ``module`` multiplies the hidden states by: rows L2-normalised
    for a :class:`NormHead` (any shard that holds whole rows), unchanged otherwise."""
    return F.normalize(weight, dim=-1) if getattr(module, "norm_rows", False) else weight


class NormHead(nn.Linear):
    """Output head with L2-normalised rows in every forward (InternEvo's ``norm_head``, from
    Baichuan 2): a token's logit does not grow with the norm of its output embedding.  The
    parameter stays the raw weight (what checkpoints hold); the flag is an instance attribute,
    so it survives the tensor-parallel class swap (``ColumnParallelLinear.local_weight``)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.norm_rows = True

    def forward(self, x: Tensor) -> Tensor:
        """Logits against the normalised rows."""
        return F.linear(x, head_rows(self, self.weight))


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)`` without biases (w2 is the down projection)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the gated MLP."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# --------------------------------------------------------------------------------------------
# rotary position embedding


class RotaryEmbedding(nn.Module):
    """cos/sin tables of RoPE for per-token positions, with optional dynamic-NTK scaling.

    The fp32 table is a plain attribute (not a buffer): it stays out of ``state_dict()``, is never
    cast to the model dtype, and is rebuilt lazily (larger, or on another device) when needed.
    Dynamic NTK follows Hugging Face Llama with scaling factor 1: when the longest position of the
    batch ``L = max(positions) + 1`` exceeds ``max_position_embeddings`` ``M``, the base becomes
    ``base * (L / M) ** (d / (d - 2))``.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, max_position_embeddings: int = 2048,
                 dynamic_ntk: bool = False) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.base = float(base)
        self.max_position_embeddings = max_position_embeddings
        self.dynamic_ntk = dynamic_ntk
        self._table: Optional[tuple[Tensor, Tensor]] = None

    def ntk_base(self, length: int) -> float:
        """RoPE base used for a batch whose longest position is ``length - 1``."""
        if not self.dynamic_ntk or length <= self.max_position_embeddings:
            return self.base
        d = self.head_dim
        return self.base * (length / self.max_position_embeddings) ** (d / (d - 2))

    def table(self, length: int, base: float, device: torch.device) -> tuple[Tensor, Tensor]:
        """fp32 ``cos, sin`` of shape ``[length, d/2]`` for positions ``0 .. length-1``."""
        inv_freq = 1.0 / (base ** (torch.arange(0, self.head_dim, 2, device=device).float()
                                   / self.head_dim))
        freqs = torch.outer(torch.arange(length, device=device).float(), inv_freq)
        return freqs.cos(), freqs.sin()

    def forward(self, positions: Optional[Tensor], length: int, dtype: torch.dtype,
                device: torch.device) -> tuple[Tensor, Tensor]:
        """``cos, sin`` of shape ``positions.shape + (d/2,)`` in ``dtype``.

        ``positions=None`` means ``arange(length)``; otherwise ``length`` must exceed every
        position (the caller computes it once per forward).
        """
        base = self.ntk_base(length)
        if base != self.base:  # scaled table depends on this batch: not cached
            cos, sin = self.table(length, base, device)
        else:
            cos, sin = self._cached(length, device)
        if positions is None:
            return cos[:length].to(dtype), sin[:length].to(dtype)
        return cos[positions].to(dtype), sin[positions].to(dtype)

    def _cached(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        table = self._table
        if table is None or table[0].shape[0] < length or table[0].device != device:
            size = max(length, self.max_position_embeddings)
            table = self._table = self.table(size, self.base, device)
        return table


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """Rotate ``x [B, S, *heads, d]`` (any strides) by RoPE; the result is contiguous.

    ``cos``/``sin`` are ``[S, d/2]`` or ``[B, S, d/2]``.  Half-split (NeoX) pairs feature ``i`` with
    ``i + d/2``.  ``interleaved=True`` pairs ``2i`` with ``2i+1`` (GPT-J) and writes the rotated
    features as [evens, odds]: the same as permuting the features to [evens, odds] and then applying
    the half-split rotation; attention scores are unchanged when q and k get the same permutation.
    """
    for _ in range(x.dim() - 3):  # broadcast over the head dimension(s)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# --------------------------------------------------------------------------------------------
# decoder skeleton


@dataclass
class ForwardContext:
    """What every block needs besides its input, computed once per forward."""

    cos: Tensor
    """RoPE cos, ``[S, d/2]`` or ``[B, S, d/2]`` in the activation dtype."""
    sin: Tensor
    """RoPE sin, same shape."""
    segments: Optional[Segments]
    """Packed-row segment boundaries (None: each row is one causal sequence)."""
    exchange: Optional[Any] = None
    """Sequence parallel across attention (isp's Ulysses all-to-all): ``to_heads(q, k, v)`` turns
    sequence shards into head shards of the full row, ``to_sequence(out)`` turns them back."""


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout that costs nothing when it is off."""
    return F.dropout(x, p, training) if p > 0 and training else x


def attend(q: Tensor, k: Tensor, v: Tensor, ctx: ForwardContext, dropout_p: float,
           training: bool, use_flash: bool) -> Tensor:
    """Attention on ``[B, S, H, d]`` tensors, packed (B == 1) when the context has segments."""
    if ctx.exchange is not None:
        q, k, v = ctx.exchange.to_heads(q, k, v)
    if ctx.segments is None:
        out = packed_causal_attention(q, k, v, None, dropout_p, training, use_flash=use_flash)
    else:
        out = packed_causal_attention(q[0], k[0], v[0], ctx.segments, dropout_p, training,
                                      use_flash=use_flash).unsqueeze(0)
    return out if ctx.exchange is None else ctx.exchange.to_sequence(out)


class Block(nn.Module):
    """A transformer block whose forward can be recomputed in backward (activation checkpointing).

    ``recompute`` is set per instance by ``apply_activation_checkpointing``; keeping the switch
    inside the block leaves parameter names untouched and works for whoever calls the block.
    """

    recompute: bool = False

    def __init__(self, m: ModelConfig, part_names: tuple[str, str, str, str],
                 attention_class: type[nn.Module]) -> None:
        super().__init__()
        self.part_names = part_names
        """Attribute names of (attention, its norm, MLP, its norm): each model keeps its own."""
        attention, attention_norm, mlp, mlp_norm = part_names
        h = m.hidden_size
        self.drop_rate = m.drop_rate
        setattr(self, attention, attention_class(m))
        setattr(self, attention_norm, RMSNorm(h, m.layer_norm_epsilon))
        setattr(self, mlp_norm, RMSNorm(h, m.layer_norm_epsilon))
        setattr(self, mlp, SwiGLU(h, ffn_hidden(h, m.mlp_ratio, m.multiple_of)))

    def forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        """Run the block, under non-reentrant checkpointing when ``recompute`` is set."""
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self.block_forward, x, ctx, use_reentrant=False)
        return self.block_forward(x, ctx)

    def block_forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        """Pre-norm attention and MLP with residuals (spec §4.1, §4.2)."""
        attention, attention_norm, mlp, mlp_norm = (getattr(self, n) for n in self.part_names)
        residual = dropout(x, self.drop_rate, self.training)
        attn = attention(attention_norm(residual), ctx)
        residual = dropout(attn, self.drop_rate, self.training) + residual
        return mlp(mlp_norm(residual)) + residual


class CausalLM(nn.Module):
    """Embedding -> blocks -> final norm -> head, with packed-sequence handling.

    A model class names its modules (the ``*_attr`` class attributes, the blocks' ``part_names``)
    and its attention class; the modules are built here from the
    :class:`~internevo.config.ModelConfig`.  A pipeline stage
    may set the embedding, norm or head to ``None``: it then takes / returns hidden states.
    """

    embedding_attr: ClassVar[str]
    blocks_attr: ClassVar[str]
    norm_attr: ClassVar[str]
    head_attr: ClassVar[str]
    part_names: ClassVar[tuple[str, str, str, str]]
    """Attribute names, inside each block, of (attention, its norm, MLP, its norm)."""
    attention_class: ClassVar[type[nn.Module]]
    """Each block's attention, built as ``attention_class(m)``."""

    def __init__(self, m: ModelConfig) -> None:
        super().__init__()
        self.rotary = RotaryEmbedding(m.hidden_size // m.num_attention_heads, m.rope_base,
                                      m.max_position_embeddings, m.use_dynamic_ntk_rope)
        setattr(self, self.embedding_attr, nn.Embedding(m.vocab_size, m.hidden_size))
        setattr(self, self.blocks_attr,
                nn.ModuleList(Block(m, self.part_names, self.attention_class)
                              for _ in range(m.num_layers)))
        setattr(self, self.norm_attr, RMSNorm(m.hidden_size, m.layer_norm_epsilon))
        setattr(self, self.head_attr, self.build_head(m))

    def build_head(self, m: ModelConfig) -> nn.Module:
        """The output head: a bias-free ``[V, h]`` Linear (a model may override it)."""
        return nn.Linear(m.hidden_size, m.vocab_size, bias=False)

    def transformer_blocks(self) -> nn.ModuleList:
        """The list of transformer blocks (for activation checkpointing and pipeline splits)."""
        return getattr(self, self.blocks_attr)

    def forward(self, input_ids: Tensor, cu_seqlens: CuSeqlens = None,
                indexes: Optional[Tensor] = None, return_hidden: bool = False,
                blocks: Optional[Sequence[nn.Module]] = None, final: bool = True) -> Tensor:
        """``input_ids [B, S]`` -> logits ``[B, S, V]`` in the model dtype.

        With ``cu_seqlens`` (only ``B == 1``) attention stays inside each segment and ``indexes``
        (``[S]`` or ``[1, S]``, default: positions inside the segments) are the RoPE positions;
        without it each row is one causal sequence at positions ``arange(S)`` (or ``indexes``).
        ``return_hidden=True`` stops before the head and returns the final-normed hidden states
        ``[B, S, h]`` (the trainer's fused head + loss multiplies them by :meth:`head_weight`).

        A pipeline chunk passes hidden states ``[B, S, h]`` instead of token ids (the embedding
        runs on integer input only), its ``blocks`` (default: every block of this model) and
        ``final=False`` unless it ends the model (then neither the final norm nor the head runs).
        """
        embedding = getattr(self, self.embedding_attr)
        embed = embedding is not None and not input_ids.is_floating_point()
        x = embedding(input_ids) if embed else input_ids
        ctx = self.forward_context(x, cu_seqlens, indexes)
        for block in self.transformer_blocks() if blocks is None else blocks:
            x = block(x, ctx)
        norm, head = getattr(self, self.norm_attr), getattr(self, self.head_attr)
        if norm is not None and final:
            x = norm(x)
        return head(x) if head is not None and final and not return_hidden else x

    def head_weight(self) -> Optional[Tensor]:
        """The ``[V, h]`` matrix the head multiplies by (normalised rows for a :class:`NormHead`;
        None on a pipeline stage without the head)."""
        head = getattr(self, self.head_attr)
        return head_rows(head, head.weight) if head is not None else None

    def forward_context(self, x: Tensor, cu_seqlens: CuSeqlens,
                        indexes: Optional[Tensor]) -> ForwardContext:
        """Segments and RoPE tables for hidden states ``x [B, S, h]`` (one host sync at most)."""
        batch, seq = x.shape[0], x.shape[1]
        segments, positions = None, None
        if cu_seqlens is not None:
            if batch != 1:
                raise ValueError(f"packed input (cu_seqlens given) needs batch size 1, got {batch}")
            segments = cu_seqlens if isinstance(cu_seqlens, Segments) else \
                Segments.build(cu_seqlens, x.device, total=seq)
            positions = segments.positions() if indexes is None else indexes.reshape(-1)
        elif indexes is not None:
            positions = indexes.reshape(-1) if indexes.shape[0] == 1 else indexes
        if positions is not None:
            positions = positions.to(x.device)
        length = seq if positions is None else int(positions.max()) + 1
        cos, sin = self.rotary(positions, length, x.dtype, x.device)
        return ForwardContext(cos, sin, segments)
