"""Packed causal attention: a varlen kernel on GPU, SDPA looped over segments otherwise.

On CUDA the backend is chosen automatically (:func:`attention_backend`), in this order:
PyTorch's own ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10, no extra package),
flash-attn's ``flash_attn_varlen_func`` when installed, SDPA per segment otherwise.  On CPU it is
always SDPA per segment.  A device type in :data:`ACCELERATOR_STAND_INS` (the dry run's fake
accelerator on a CPU-only build) is treated as a capability-9.0 CUDA device, so the dry run
records what a real GPU run saves for backward.

Tensors are token-major (``[S, H, d]`` packed, ``[B, S, H, d]`` batched), the layout the QKV
projection produces, so no transpose copies are needed before or after the kernel.  The number of
heads is read from the tensors, never from a config, so a tensor-parallel shard works unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # optional GPU kernel; everything works without it
    from flash_attn import flash_attn_varlen_func as _flash_varlen
except ImportError:  # pragma: no cover - depends on the environment
    _flash_varlen = None

try:  # PyTorch's own varlen kernel (torch >= 2.10)
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen
except ImportError:  # pragma: no cover - depends on the torch version
    _torch_varlen = None

TORCH_VARLEN, FLASH_ATTN, SDPA = "torch_varlen", "flash_attn", "sdpa"
DESCRIPTIONS = {
    TORCH_VARLEN: "torch.nn.attention.varlen.varlen_attn (PyTorch's flash kernel)",
    FLASH_ATTN: "flash_attn.flash_attn_varlen_func",
    SDPA: "scaled_dot_product_attention per segment",
}
"""What each backend name stands for (the start-up log line)."""
ACCELERATOR_STAND_INS: set[str] = set()
"""Device types that stand in for a capability-9.0 CUDA device (registered by the layer that
creates them, e.g. the dry run's PrivateUse1 ``gpu``; this module never imports it)."""


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
    ``j`` reads KV head ``j // (Hq // Hkv)``).  ``use_flash=False`` forces SDPA.  Returns a tensor
    shaped like ``q``.
    """
    p = dropout_p if training else 0.0
    if cu_seqlens is None:
        return _sdpa(q, k, v, p)
    backend = attention_backend(q.device, use_flash, p)
    if backend == TORCH_VARLEN:
        return _torch_varlen_packed(q, k, v, _as_segments(cu_seqlens, q.device))
    if backend == FLASH_ATTN:
        return _flash_packed(q, k, v, _as_segments(cu_seqlens, q.device), p)
    return _sdpa_packed(q, k, v, cu_seqlens, p)


def attention_backend(device: torch.device, use_flash: bool = True,
                      dropout_p: float = 0.0) -> str:
    """Packed-attention backend on ``device``: ``torch_varlen``, ``flash_attn`` or ``sdpa``.

    The varlen kernels need a CUDA device of compute capability 8.0 or newer; PyTorch's kernel
    has no dropout, so attention dropout in training goes to flash-attn or SDPA.  A stand-in
    accelerator (:data:`ACCELERATOR_STAND_INS`) counts as capability 9.0.
    """
    if not use_flash or not _has_flash_kernels(device):
        return SDPA
    if _torch_varlen is not None and dropout_p == 0.0:
        return TORCH_VARLEN
    return FLASH_ATTN if _flash_varlen is not None else SDPA


def describe_backend(device: torch.device, use_flash: bool = True, dropout_p: float = 0.0) -> str:
    """One line naming the packed-attention backend on ``device`` (printed once at start)."""
    return f"attention: {DESCRIPTIONS[attention_backend(device, use_flash, dropout_p)]} on {device}"


def _has_flash_kernels(device: torch.device) -> bool:
    """A CUDA device of capability >= 8.0, or a stand-in for one (counted as capability 9.0)."""
    if device.type in ACCELERATOR_STAND_INS:
        return True
    return device.type == "cuda" and _cuda_capability(device) >= (8, 0)


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _sdpa_packed(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: CuSeqlens, p: float) -> Tensor:
    """SDPA looped over the segments of one packed row."""
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


def _half(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The flash kernels take fp16 / bf16 only: fp32 runs in bf16, as InternEvo does."""
    if q.dtype in (torch.float16, torch.bfloat16):
        return q, k, v
    return q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)


def _flash_packed(q: Tensor, k: Tensor, v: Tensor, seg: Segments, dropout_p: float) -> Tensor:
    """flash-attn varlen (GQA handled by the kernel)."""
    hq, hk, hv = _half(q, k, v)
    out = _flash_varlen(hq, hk, hv, seg.cu_seqlens, seg.cu_seqlens, seg.max_seqlen,
                        seg.max_seqlen, dropout_p, softmax_scale=q.shape[-1] ** -0.5, causal=True)
    return out.to(q.dtype)


def _torch_varlen_packed(q: Tensor, k: Tensor, v: Tensor, seg: Segments) -> Tensor:
    """PyTorch's varlen_attn; its arguments changed across releases, see :func:`_varlen_kwargs`."""
    hq, hk, hv = _half(q, k, v)
    kwargs, native_gqa = _varlen_kwargs(_torch_varlen)
    if hk.shape[1] != hq.shape[1]:
        if native_gqa:
            kwargs = {**kwargs, "enable_gqa": True}
        else:  # torch 2.10-2.11: repeat each KV head for its group of query heads
            group = hq.shape[1] // hk.shape[1]
            hk, hv = hk.repeat_interleave(group, dim=1), hv.repeat_interleave(group, dim=1)
    out = _torch_varlen(hq, hk, hv, seg.cu_seqlens, seg.cu_seqlens, seg.max_seqlen,
                        seg.max_seqlen, **kwargs)
    return out.to(q.dtype)


@lru_cache(maxsize=4)
def _varlen_kwargs(fn: Callable) -> tuple[dict, bool]:
    """Causal keyword arguments of ``varlen_attn`` and whether it takes ``enable_gqa``.

    torch 2.10 has ``is_causal``; later releases replaced it by ``window_size=(-1, 0)`` and added
    ``enable_gqa`` (2.12).  The default scale is ``1/sqrt(d)`` in all of them.
    """
    params = inspect.signature(fn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    return causal, "enable_gqa" in params


def _as_segments(cu_seqlens: CuSeqlens, device: torch.device) -> Segments:
    if isinstance(cu_seqlens, Segments):
        return cu_seqlens
    return Segments.build(cu_seqlens, device)


def _bounds(cu_seqlens: Union[Tensor, Sequence[int]]) -> list[int]:
    if isinstance(cu_seqlens, Tensor):
        return cu_seqlens.reshape(-1).tolist()
    return [int(b) for b in cu_seqlens]
