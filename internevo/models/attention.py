"""Packed causal attention: flash-attn varlen on GPU, SDPA looped over segments otherwise.

Tensors are token-major (``[S, H, d]`` packed, ``[B, S, H, d]`` batched), the layout the QKV
projection produces, so no transpose copies are needed before or after the kernel.  The number of
heads is read from the tensors, never from a config, so a tensor-parallel shard works unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # optional GPU kernel; everything works without it
    from flash_attn import flash_attn_varlen_func as _flash_varlen
except ImportError:  # pragma: no cover - depends on the environment
    _flash_varlen = None


@dataclass(frozen=True, eq=False)  # eq would compare tensors; identity is what matters
class Segments:
    """Segment boundaries of one packed row, computed once per forward and shared by all layers.

    Python ints drive the CPU loop (no device sync per layer); the int32 tensor and ``max_seqlen``
    are what flash-attn's varlen kernel wants.
    """

    bounds: tuple[int, ...]
    """``0 = b_0 <= b_1 <= ... <= b_n = S``: segment ``i`` is tokens ``[b_i, b_{i+1})``."""
    cu_seqlens: Tensor
    """The same boundaries as an int32 tensor on the compute device."""
    max_seqlen: int
    """Longest segment."""

    @classmethod
    def build(cls, cu_seqlens: Union[Tensor, Sequence[int]], device: torch.device,
              total: int | None = None) -> Segments:
        """Normalise ``cu_seqlens`` (tensor or list); check it covers ``total`` tokens if given."""
        if isinstance(cu_seqlens, Tensor):
            bounds = tuple(int(b) for b in cu_seqlens.reshape(-1).tolist())
        else:
            bounds = tuple(int(b) for b in cu_seqlens)
        if len(bounds) < 2 or bounds[0] != 0 or any(a > b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {bounds}")
        if total is not None and bounds[-1] != total:
            raise ValueError(f"cu_seqlens ends at {bounds[-1]} but the row has {total} tokens")
        tensor = torch.tensor(bounds, dtype=torch.int32, device=device)
        max_len = max(b - a for a, b in zip(bounds, bounds[1:]))
        return cls(bounds, tensor, max_len)

    def positions(self) -> Tensor:
        """Position of every token inside its segment (used when no ``indexes`` are given)."""
        lengths = [b - a for a, b in zip(self.bounds, self.bounds[1:])]
        return torch.cat([torch.arange(n, device=self.cu_seqlens.device) for n in lengths])


CuSeqlens = Union[Segments, Tensor, Sequence[int], None]


def packed_causal_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: CuSeqlens = None,
                            dropout_p: float = 0.0, training: bool = False, *,
                            use_flash: bool = True) -> Tensor:
    """Causal softmax attention with scale ``1/sqrt(d)`` that never crosses a segment boundary.

    With ``cu_seqlens`` (a :class:`Segments`, an int tensor or a list) ``q`` is ``[S, Hq, d]`` and
    ``k``/``v`` are ``[S, Hkv, d]``; without it they are ``[B, S, H, d]`` and every row is one
    causal sequence.  ``Hq`` must be a multiple of ``Hkv`` (grouped-query attention: query head
    ``j`` reads KV head ``j // (Hq // Hkv)``).  Returns a tensor shaped like ``q``.
    """
    p = dropout_p if training else 0.0
    if cu_seqlens is None:
        return _sdpa(q, k, v, p)
    if _use_flash(q, use_flash):
        return _flash_packed(q, k, v, _as_segments(cu_seqlens, q.device), p)
    bounds = cu_seqlens.bounds if isinstance(cu_seqlens, Segments) else _bounds(cu_seqlens)
    if bounds[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens ends at {bounds[-1]} but q has {q.shape[0]} tokens")
    spans = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    if len(spans) == 1:  # one segment: no slicing, no concatenation
        return _sdpa(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), p).squeeze(0)
    outs = [_sdpa(q[None, a:b], k[None, a:b], v[None, a:b], p) for a, b in spans]
    return torch.cat(outs, dim=1).squeeze(0)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
    """Causal SDPA on token-major ``[B, S, H, d]`` tensors.

    The inputs must be 4-D: 3-D inputs miss the fused CPU kernel (about 7x slower).  The CPU
    kernel returns a transposed view of a ``[B, S, H, d]`` buffer, so transposing back is free.
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
        is_causal=True, scale=q.shape[-1] ** -0.5, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def _use_flash(q: Tensor, use_flash: bool) -> bool:
    return use_flash and _flash_varlen is not None and q.is_cuda


def _flash_packed(q: Tensor, k: Tensor, v: Tensor, seg: Segments, dropout_p: float) -> Tensor:
    """flash-attn varlen (GQA handled by the kernel); fp32 runs in bf16 as InternEvo does."""
    dtype = q.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    out = _flash_varlen(q, k, v, seg.cu_seqlens, seg.cu_seqlens, seg.max_seqlen, seg.max_seqlen,
                        dropout_p, softmax_scale=q.shape[-1] ** -0.5, causal=True)
    return out.to(dtype)


def _as_segments(cu_seqlens: CuSeqlens, device: torch.device) -> Segments:
    if isinstance(cu_seqlens, Segments):
        return cu_seqlens
    return Segments.build(cu_seqlens, device)


def _bounds(cu_seqlens: Union[Tensor, Sequence[int]]) -> list[int]:
    if isinstance(cu_seqlens, Tensor):
        return cu_seqlens.reshape(-1).tolist()
    return [int(b) for b in cu_seqlens]
