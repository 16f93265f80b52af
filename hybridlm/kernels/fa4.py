"""Causal attention on FlashAttention-4 (``flash_attn.cute``, CuTe-DSL kernels for Hopper and
Blackwell), with the same arguments and layout as :func:`hybridlm.kernels.attention.sdpa_attention`.

FA4 takes GQA (fewer K/V heads), packed sequences (``cu_seqlens``) and a left window natively,
forward and backward. Its causal mask is aligned to the bottom right, which is our ``q_offset``
exactly when the keys end where the queries end (a KV cache filled up to the current token), so
that is the only offset it is given. ``unsupported_reason`` says which inputs it cannot take; the
caller falls back to SDPA for those.

Training goes through two ``torch.library`` custom ops, ``hybridlm::fa4_fwd`` and
``hybridlm::fa4_bwd``, with fake (shape) implementations and a registered backward: under
``torch.compile`` they are opaque calls inside the graph. (A ``torch.compiler.disable`` wrapper
would break the graph there, and a graph break inside an activation-checkpointed block makes
dynamo give up on the whole block: it then runs eagerly under the checkpoint's dispatch mode.)
Selective activation checkpointing keeps the forward op's outputs (``FA4_SAC_SAVE_OPS``).

:func:`fa4_cached_attention` reads a preallocated KV cache whose rows hold different numbers of
tokens through ``flash_attn_varlen_func``'s ``seqused_k`` (keys past a row's length are ignored,
and the causal mask is aligned to each row's last used key). Its arguments are device tensors of
fixed shapes, so the call can be captured in a CUDA graph once the kernel has been compiled.
"""
from __future__ import annotations

import functools
import importlib.util
import math

import torch
from torch import Tensor

from hybridlm.kernels.hopper import device_reason

MAX_HEAD_DIM = 256
NO_WINDOW = -1  # window_left of the ops when there is no sliding window


def installed() -> bool:
    """Whether a ``flash_attn`` package is present at all (importing it may still fail)."""
    try:
        return importlib.util.find_spec("flash_attn") is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=1)
def import_error() -> str | None:
    """Why ``flash_attn.cute`` and the entry points we call do not import (None when they do)."""
    try:
        import flash_attn.cute  # noqa: F401
        from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd  # noqa: F401
    except Exception as e:  # a broken CUDA/CuTe install raises more than ImportError
        return f"flash_attn.cute does not import ({type(e).__name__}: {e}); install flash-attn-4"
    return None


def unsupported_reason_for(device: torch.device, dtype: torch.dtype, k_dtype: torch.dtype, head_dim: int,
                           aligned: bool = True) -> str | None:
    """Why FA4 cannot run inputs of this kind (None when it can). ``aligned``: the queries end
    where the keys end (no offset, or a cache filled up to the last query)."""
    device_problem = device_reason(device, "FA4")
    if device_problem:
        return device_problem
    if dtype not in (torch.bfloat16, torch.float16) or k_dtype != dtype:
        return f"dtype {dtype}/{k_dtype}; FA4 takes bfloat16 or float16"
    if head_dim > MAX_HEAD_DIM or head_dim % 8:
        return f"head_dim {head_dim}; FA4 takes multiples of 8 up to {MAX_HEAD_DIM}"
    if not aligned:
        return "queries that do not end where the keys end (FA4 aligns the causal mask to the last key)"
    return import_error()


def unsupported_reason(q: Tensor, k: Tensor, q_offset: int) -> str | None:
    """Why FA4 cannot run these inputs, or None when it can."""
    aligned = not q_offset or k.shape[1] == q_offset + q.shape[1]
    return unsupported_reason_for(q.device, q.dtype, k.dtype, q.shape[-1], aligned)


def _window(window_left: int) -> tuple[int | None, int | None]:
    return (None, None) if window_left == NO_WINDOW else (window_left, 0)


@torch.library.custom_op("hybridlm::fa4_fwd", mutates_args=())
def fa4_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None, max_seqlen: int, scale: float,
            window_left: int) -> tuple[Tensor, Tensor]:
    """Causal FA4 forward: (out, lse). Dense q (B, L, H, D), lse (B, H, L); packed q (T, H, D) with
    ``cu_seqlens``, lse (H, T). ``max_seqlen``: a host bound of the longest sequence (0: unknown)."""
    from flash_attn.cute.interface import _flash_attn_fwd

    left, right = _window(window_left)
    out, lse, *_ = _flash_attn_fwd(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                   max_seqlen_q=max_seqlen or None, max_seqlen_k=max_seqlen or None,
                                   softmax_scale=scale, causal=True, window_size_left=left,
                                   window_size_right=right, return_lse=True)
    return out, lse


@fa4_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, window_left):
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    if cu_seqlens is None:
        B, L, H = q.shape[:3]
        return out, q.new_empty(B, H, L, dtype=torch.float32)
    T, H = q.shape[:2]
    return out, q.new_empty(H, T, dtype=torch.float32)


@torch.library.custom_op("hybridlm::fa4_bwd", mutates_args=())
def fa4_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor | None,
            max_seqlen: int, scale: float, window_left: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of :func:`fa4_fwd`."""
    from flash_attn.cute.interface import _flash_attn_bwd

    left, right = _window(window_left)
    dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout.contiguous(), lse, scale, True, 0.0, window_size_left=left,
                                 window_size_right=right, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                 max_seqlen_q=max_seqlen or None, max_seqlen_k=max_seqlen or None)[:3]
    return dq, dk, dv


@fa4_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, window_left):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, window_left = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.scalars = (max_seqlen, scale, window_left)


def _backward(ctx, dout: Tensor, dlse: Tensor | None):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = fa4_bwd(dout, q, k, v, out, lse, cu_seqlens, *ctx.scalars)
    return dq, dk, dv, None, None, None, None


fa4_fwd.register_autograd(_backward, setup_context=_setup_context)

# SAC keeps the attention output (and its lse) instead of re-running the forward in the backward.
FA4_SAC_SAVE_OPS = {torch.ops.hybridlm.fa4_fwd.default}


def fa4_attention(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None = None, window: int | None = None,
                  scale: float | None = None, max_seqlen: int = 0) -> Tensor:
    """q (B, L, H, D); k, v (B, Lk, Hkv, D) -> (B, L, H, D); packed input is B = 1 with cu_seqlens
    (``max_seqlen``, if known on the host, bounds the longest sequence)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    # our window keeps key j for query i when i - j < window: FA4's left window is window - 1
    window_left = NO_WINDOW if window is None else window - 1
    if cu_seqlens is None:
        return fa4_fwd(q, k, v, None, max_seqlen, scale, window_left)[0]
    out, _ = fa4_fwd(q[0], k[0], v[0], cu_seqlens.to(torch.int32), max_seqlen, scale, window_left)
    return out.unsqueeze(0)


# FA4's split-KV for a decode step (q of one token a row): 1 = off; 0 = FA4's own heuristic (splits
# that fill the SMs). Off, a step has batch x heads programs, each walking the whole cache: at batch
# 1 one attention layer took 27 µs of hybrid-1.5b's step on an H200 (2026-12-03,
# benchmarks/decode_profile.py), for 4 MiB of cache. `decode_profile.py --fa4-splits 1,0` measures both
# where FA4 has split-KV: not on SM 9.0 (FA4 4.0.0b36 asserts "SplitKV not supported on SM 9.0"), which
# is why decode steps have their own Triton split-KV kernel (hybridlm/kernels/decode_attention/).
DECODE_NUM_SPLITS = 1


@torch.compiler.disable  # inference only (KV-cache reads); dynamo would trace into the CuTe DSL's JIT
def fa4_cached_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_lengths: Tensor, *,
                         cu_seqlens: Tensor | None = None, window: int | None = None,
                         scale: float | None = None) -> Tensor:
    """q (B, L, H, D) or packed (1, T, H, D) with cu_seqlens; caches (B, max_len, Hkv, D); kv_lengths
    (B,) int32, the new tokens included. As :func:`hybridlm.kernels.attention.cached_attention`."""
    from flash_attn.cute import flash_attn_varlen_func

    window_size = (None, None) if window is None else (window - 1, 0)
    used = kv_lengths.to(torch.int32).contiguous()  # already int32 from the KV cache: no copy
    if cu_seqlens is None:
        splits = {"num_splits": DECODE_NUM_SPLITS} if q.shape[1] == 1 and DECODE_NUM_SPLITS != 1 else {}
        out = flash_attn_varlen_func(q, k_cache, v_cache, seqused_k=used, softmax_scale=scale, causal=True,
                                     window_size=window_size, **splits)
        return _first(out)
    out = flash_attn_varlen_func(q[0], k_cache, v_cache, cu_seqlens_q=cu_seqlens.to(torch.int32), seqused_k=used,
                                 softmax_scale=scale, causal=True, window_size=window_size)
    return _first(out).unsqueeze(0)


def _first(out):
    """FA4 returns the output alone or (output, lse) depending on the version."""
    return out[0] if isinstance(out, tuple) else out
