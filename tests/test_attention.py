"""Packed-attention backends: which one is chosen, and each one against the naive masked softmax.

The selection and the adapters run on CPU with the kernels replaced by fakes that check the
arguments they receive and compute the naive reference; the real kernels run in the tests marked
``gpu`` (``benchmarks/gpu_check.py`` runs them; skipped without CUDA).
"""

from __future__ import annotations

import pytest
import torch
from test_models import naive_attention

from internevo.models import attention
from internevo.models.attention import (
    FLASH_ATTN,
    SDPA,
    TORCH_VARLEN,
    Segments,
    attention_backend,
    describe_backend,
    packed_causal_attention,
)

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")
BOUNDS = [0, 3, 3, 8, 13]  # includes an empty segment


def fake_kernel(*_a, **_k):
    """Stands for an installed kernel in the selection tests (never called there)."""
    raise AssertionError("selection only")


@pytest.mark.parametrize("device,torch_k,flash_k,cap,use_flash,drop,expected", [
    (CPU, True, True, (9, 0), True, 0.0, SDPA),           # CPU: always SDPA
    (CUDA, True, True, (9, 0), True, 0.0, TORCH_VARLEN),  # PyTorch's kernel first
    (CUDA, False, True, (9, 0), True, 0.0, FLASH_ATTN),   # then flash-attn
    (CUDA, False, False, (9, 0), True, 0.0, SDPA),        # then SDPA per segment
    (CUDA, True, True, (9, 0), False, 0.0, SDPA),         # use_flash_attn=False
    (CUDA, True, True, (7, 5), True, 0.0, SDPA),          # no flash kernels before sm80
    (CUDA, True, True, (8, 0), True, 0.1, FLASH_ATTN),    # dropout: torch's kernel has none
    (CUDA, True, False, (8, 0), True, 0.1, SDPA),
])
def test_backend_selection(monkeypatch, device, torch_k, flash_k, cap, use_flash, drop,
                           expected):
    monkeypatch.setattr(attention, "_torch_varlen", fake_kernel if torch_k else None)
    monkeypatch.setattr(attention, "_flash_varlen", fake_kernel if flash_k else None)
    monkeypatch.setattr(attention, "_cuda_capability", lambda _d: cap)
    assert attention_backend(device, use_flash, drop) == expected
    line = describe_backend(device, use_flash, drop)
    assert line == f"attention: {attention.DESCRIPTIONS[expected]} on {device}"


def reference(q, k, v, cu):
    """The naive masked softmax in fp32 on CPU, cast back like a kernel's output."""
    bounds = [int(b) for b in cu.tolist()]
    return naive_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), bounds).to(q)


def torch_varlen_210(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.10's signature: ``is_causal``, no GQA, no scale."""
    assert is_causal and k.shape[1] == q.shape[1], (is_causal, k.shape, q.shape)
    return check_and_reference(q, k, v, cu_q, cu_k, max_q, max_k)


def torch_varlen_212(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None,
                     num_splits=None):
    """torch >= 2.12's signature: causal as ``window_size=(-1, 0)``, ``enable_gqa``."""
    assert tuple(window_size) == (-1, 0) and scale is None, (window_size, scale)
    assert enable_gqa == (k.shape[1] != q.shape[1])
    return check_and_reference(q, k, v, cu_q, cu_k, max_q, max_k)


def flash_attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal):
    """flash-attn's ``flash_attn_varlen_func`` (GQA native)."""
    assert causal and dropout_p == 0.0 and softmax_scale == q.shape[-1] ** -0.5
    return check_and_reference(q, k, v, cu_q, cu_k, max_q, max_k)


def check_and_reference(q, k, v, cu_q, cu_k, max_q, max_k):
    """What every varlen kernel requires: half precision, int32 boundaries, the longest span."""
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16
    assert cu_q.dtype == torch.int32 and cu_q.tolist() == cu_k.tolist() == BOUNDS
    assert max_q == max_k == max(b - a for a, b in zip(BOUNDS, BOUNDS[1:]))
    return reference(q, k, v, cu_q)


@pytest.mark.parametrize("backend,attr,kernel", [
    (TORCH_VARLEN, "_torch_varlen", torch_varlen_210),
    (TORCH_VARLEN, "_torch_varlen", torch_varlen_212),
    (FLASH_ATTN, "_flash_varlen", flash_attn_varlen),
])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
def test_varlen_adapters_match_naive(monkeypatch, backend, attr, kernel, hq, hkv):
    """Each adapter hands its kernel the arguments it needs; fp32 comes back as fp32."""
    monkeypatch.setattr(attention, attr, kernel)
    monkeypatch.setattr(attention, "attention_backend", lambda *_a: backend)
    torch.manual_seed(0)
    q, k, v = torch.randn(13, hq, 8), torch.randn(13, hkv, 8), torch.randn(13, hkv, 8)
    out = packed_causal_attention(q, k, v, Segments.build(BOUNDS, q.device))
    assert out.dtype == torch.float32 and out.shape == q.shape
    exact = naive_attention(q, k, v, BOUNDS)
    torch.testing.assert_close(out, exact, atol=3e-2, rtol=3e-2)  # bf16 inputs


def test_sdpa_is_used_on_cpu_without_fakes():
    """On CPU the SDPA loop runs in fp32 (exact), even with kernels installed."""
    torch.manual_seed(1)
    q, k, v = torch.randn(13, 4, 8), torch.randn(13, 2, 8), torch.randn(13, 2, 8)
    out = packed_causal_attention(q, k, v, BOUNDS)
    torch.testing.assert_close(out, naive_attention(q, k, v, BOUNDS), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ real GPU kernels
def cuda_backends() -> list[str]:
    """The backends this machine's CUDA device can run (SDPA always)."""
    if not torch.cuda.is_available():
        return [SDPA]
    names = [SDPA]
    if attention._torch_varlen is not None:
        names.append(TORCH_VARLEN)
    if attention._flash_varlen is not None:
        names.append(FLASH_ATTN)
    return names


@pytest.mark.gpu
@pytest.mark.parametrize("backend", cuda_backends())
@pytest.mark.parametrize("hq,hkv", [(16, 8), (8, 8)])
def test_gpu_kernels_match_naive(monkeypatch, backend, hq, hkv):
    """Forward and gradients of each real kernel (bf16) against the fp32 naive reference."""
    monkeypatch.setattr(attention, "attention_backend", lambda *_a: backend)
    bounds = [0, 100, 100, 357, 512]
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(512, hq, 64), (512, hkv, 64), (512, hkv, 64)]
    q, k, v = (torch.randn(s, device="cuda", generator=gen, dtype=torch.bfloat16)
               .requires_grad_() for s in shapes)
    out = packed_causal_attention(q, k, v, Segments.build(bounds, q.device))
    qf, kf, vf = (t.detach().float().cpu().requires_grad_() for t in (q, k, v))
    ref = naive_attention(qf, kf, vf, bounds)
    torch.testing.assert_close(out.float().cpu(), ref, atol=2e-2, rtol=2e-2)
    w = torch.randn(ref.shape)
    grads = torch.autograd.grad((out.float() * w.cuda()).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (qf, kf, vf))
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.float().cpu(), rg, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
def test_gpu_picks_a_varlen_kernel_when_torch_has_one():
    """torch >= 2.10 on an sm80+ GPU: PyTorch's own kernel, no extra package needed."""
    if attention._torch_varlen is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("flash kernels need sm80+")
    assert attention_backend(torch.device("cuda")) == TORCH_VARLEN
