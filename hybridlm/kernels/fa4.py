"""Causal attention on FlashAttention-4 (``flash_attn.cute``, CuTe-DSL kernels for Hopper and
Blackwell), with the same arguments and layout as :func:`hybridlm.kernels.attention.sdpa_attention`.

FA4 takes GQA (fewer K/V heads), packed sequences (``cu_seqlens``) and a left window natively,
forward and backward. Its causal mask is aligned to the bottom right, which is our ``q_offset``
exactly when the keys end where the queries end (a KV cache filled up to the current token), so
that is the only offset it is given. ``unsupported_reason`` says which inputs it cannot take; the
caller falls back to SDPA for those.

:func:`fa4_cached_attention` reads a preallocated KV cache whose rows hold different numbers of
tokens through ``flash_attn_varlen_func``'s ``seqused_k`` (keys past a row's length are ignored,
and the causal mask is aligned to each row's last used key). Its arguments are device tensors of
fixed shapes, so the call can be captured in a CUDA graph once the kernel has been compiled.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from hybridlm.kernels.hopper import hopper_reason

MAX_HEAD_DIM = 256


@functools.lru_cache(maxsize=1)
def import_error() -> str | None:
    """Why ``flash_attn.cute`` does not import (None when it does)."""
    try:
        import flash_attn.cute  # noqa: F401
    except Exception as e:  # a broken CUDA/CuTe install raises more than ImportError
        return f"flash_attn.cute does not import ({type(e).__name__}: {e}); install flash-attn-4"
    return None


def unsupported_reason(q: Tensor, k: Tensor, q_offset: int) -> str | None:
    """Why FA4 cannot run these inputs, or None when it can."""
    device = hopper_reason(q, "FA4")
    if device:
        return device
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype}; FA4 takes bfloat16 or float16"
    head_dim = q.shape[-1]
    if head_dim > MAX_HEAD_DIM or head_dim % 8:
        return f"head_dim {head_dim}; FA4 takes multiples of 8 up to {MAX_HEAD_DIM}"
    if q_offset and k.shape[1] != q_offset + q.shape[1]:
        return "queries that do not end where the keys end (FA4 aligns the causal mask to the last key)"
    return import_error()


@torch.compiler.disable  # dynamo would trace into the CuTe DSL's JIT; a clean graph break instead
def fa4_attention(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None = None, window: int | None = None,
                  scale: float | None = None) -> Tensor:
    """q (B, L, H, D); k, v (B, Lk, Hkv, D) -> (B, L, H, D); packed input is B = 1 with cu_seqlens."""
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

    # our window keeps key j for query i when i - j < window: FA4's left window is window - 1
    window_size = (None, None) if window is None else (window - 1, 0)
    if cu_seqlens is None:
        return _first(flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=window_size))
    cu = cu_seqlens.to(torch.int32)
    out = flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens_q=cu, cu_seqlens_k=cu, softmax_scale=scale,
                                 causal=True, window_size=window_size)
    return _first(out).unsqueeze(0)


@torch.compiler.disable
def fa4_cached_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_lengths: Tensor, *,
                         cu_seqlens: Tensor | None = None, window: int | None = None,
                         scale: float | None = None) -> Tensor:
    """q (B, L, H, D) or packed (1, T, H, D) with cu_seqlens; caches (B, max_len, Hkv, D); kv_lengths
    (B,) int32, the new tokens included. As :func:`hybridlm.kernels.attention.cached_attention`."""
    from flash_attn.cute import flash_attn_varlen_func

    window_size = (None, None) if window is None else (window - 1, 0)
    used = kv_lengths.to(torch.int32).contiguous()  # already int32 from the KV cache: no copy
    if cu_seqlens is None:
        out = flash_attn_varlen_func(q, k_cache, v_cache, seqused_k=used, softmax_scale=scale, causal=True,
                                     window_size=window_size)
        return _first(out)
    out = flash_attn_varlen_func(q[0], k_cache, v_cache, cu_seqlens_q=cu_seqlens.to(torch.int32), seqused_k=used,
                                 softmax_scale=scale, causal=True, window_size=window_size)
    return _first(out).unsqueeze(0)


def _first(out):
    """FA4 returns the output alone or (output, lse) depending on the version."""
    return out[0] if isinstance(out, tuple) else out
