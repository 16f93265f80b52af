"""A decode step's KV-cache write, RoPE included, as one Triton kernel: a program takes one token's
heads of k (rotated, into the cache and k_out), of v (into the cache) or of q (rotated, or copied
for NoPE, into a contiguous q_out).

Positions come from the cache's lengths on the device (no host sync, so a CUDA graph replays it);
the rotation is the RoPE kernel's own (hybridlm/kernels/rope/triton.py), so q and k round as there.
The lengths advance in place: in a decode step one program per row does k, v and q and then writes
its row's new length (no other program reads it); a longer input writes them to a buffer first and
copies. A ``torch.library`` custom op
(opaque to ``torch.compile``, capturable in a CUDA graph) with no backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.mamba3.triton.interpreter_compat import device_type_reason, dtypes_reason
from hybridlm.kernels.pdl import launch_options, let_next_launch, wait_for_previous
from hybridlm.kernels.pdl import usable as pdl_usable
from hybridlm.kernels.rope.triton import MAX_HEAD_DIM, _frequencies, _rotate_heads, head_blocks

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PDL = False  # launched with PDL on Hopper+ (hybridlm/kernels/pdl.py); knob KV_APPEND_PDL, off until timed


@triton.jit
def _copy_heads(X, x_at, OUT, out_at, n_heads, i, i_mask, half, BLOCK_HEADS: tl.constexpr):
    for h0 in range(0, n_heads, BLOCK_HEADS):
        h = h0 + tl.arange(0, BLOCK_HEADS)
        mask = (h < n_heads)[:, None] & i_mask[None, :]
        at = h.to(tl.int64)[:, None] * (2 * half) + i[None, :]
        tl.store(OUT + out_at + at, tl.load(X + x_at + at, mask=mask).to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + out_at + at + half, tl.load(X + x_at + at + half, mask=mask).to(OUT.dtype.element_ty),
                 mask=mask)


@triton.jit
def _append_one(which, Q, K, V, Q_OUT, K_OUT, K_CACHE, V_CACHE, FREQ, tok, pos, cache_at, q_stride, kv_stride,
                n_q_heads, n_k_heads, i, i_mask, half, ROPE: tl.constexpr, BLOCK_HEADS: tl.constexpr,
                BLOCK_HALF: tl.constexpr):
    """Token ``tok``'s heads of k (which 0: into the cache, and k_out with RoPE), v (1: into the
    cache) or q (2: into q_out, rotated with RoPE)."""
    if which == 1:
        _copy_heads(V, tok * kv_stride, V_CACHE, cache_at, n_k_heads, i, i_mask, half, BLOCK_HEADS)
    elif ROPE:
        freq = tl.load(FREQ + i, mask=i_mask, other=0.0)
        if which == 0:  # the same instructions twice: the cache row and k_out agree bitwise
            _rotate_heads(K, tok * kv_stride, K_CACHE, cache_at, n_k_heads, pos.to(tl.float32), freq, i, i_mask,
                          half, BLOCK_HEADS, BLOCK_HALF)
            _rotate_heads(K, tok * kv_stride, K_OUT, tok * n_k_heads * 2 * half, n_k_heads, pos.to(tl.float32),
                          freq, i, i_mask, half, BLOCK_HEADS, BLOCK_HALF)
        else:
            _rotate_heads(Q, tok * q_stride, Q_OUT, tok * n_q_heads * 2 * half, n_q_heads, pos.to(tl.float32),
                          freq, i, i_mask, half, BLOCK_HEADS, BLOCK_HALF)
    elif which == 0:
        _copy_heads(K, tok * kv_stride, K_CACHE, cache_at, n_k_heads, i, i_mask, half, BLOCK_HEADS)
    else:  # q as it is, into a contiguous q_out
        _copy_heads(Q, tok * q_stride, Q_OUT, tok * n_q_heads * 2 * half, n_q_heads, i, i_mask, half, BLOCK_HEADS)


@triton.jit
def _append_kv_kernel(Q, K, V, Q_OUT, K_OUT, K_CACHE, V_CACHE, LENGTHS, NEW_LENGTHS, FREQ, L, max_len, q_stride,
                      kv_stride, n_q_heads, n_k_heads, half, ROPE: tl.constexpr, ONE_TOKEN: tl.constexpr,
                      BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr):
    """ONE_TOKEN (a decode step): program (row), k, v and q in turn, then the row's length + 1
    written over LENGTHS (the one program that reads it). Else program (token, k / v / q), the new
    lengths to NEW_LENGTHS. q, k, v: rows of heads ``q_stride`` / ``kv_stride`` elements apart (views
    into one projection's output are fine); the outputs and caches are contiguous."""
    let_next_launch(PDL)
    wait_for_previous(PDL)
    tok = tl.program_id(0).to(tl.int64)
    b, t = tok // L, tok % L
    length = tl.load(LENGTHS + b)
    pos = length.to(tl.int64) + t
    cache_at = (b * max_len + pos) * n_k_heads * 2 * half
    i = tl.arange(0, BLOCK_HALF)
    i_mask = i < half
    if ONE_TOKEN:
        for which in tl.static_range(3):
            _append_one(which, Q, K, V, Q_OUT, K_OUT, K_CACHE, V_CACHE, FREQ, tok, pos, cache_at, q_stride,
                        kv_stride, n_q_heads, n_k_heads, i, i_mask, half, ROPE, BLOCK_HEADS, BLOCK_HALF)
        tl.store(LENGTHS + b, length + 1)
    else:
        _append_one(tl.program_id(1), Q, K, V, Q_OUT, K_OUT, K_CACHE, V_CACHE, FREQ, tok, pos, cache_at, q_stride,
                    kv_stride, n_q_heads, n_k_heads, i, i_mask, half, ROPE, BLOCK_HEADS, BLOCK_HALF)
        if tl.program_id(1) == 0 and t == 0:
            tl.store(NEW_LENGTHS + b, length + L)


@torch.library.custom_op("hybridlm::append_kv", mutates_args=("q_out", "k_out", "k_cache", "v_cache", "lengths"))
def append_kv_op(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor,
                 frequencies: Tensor | None, q_out: Tensor, k_out: Tensor | None) -> None:
    """q (B, L, Hq, D), k, v (B, L, Hk, D) with rows of heads (see :func:`_row_stride`); caches
    (B, max_len, Hk, D), q_out and k_out contiguous; lengths (B,) int32, advanced by L in place;
    frequencies (D/2,) fp32 and k_out for RoPE, both None for NoPE (q_out then gets q as it is)."""
    B, L, n_q, D = q.shape
    if B and L:
        half = D // 2
        block_half, block_heads = head_blocks(half, max(n_q, k.shape[2]))
        rope = frequencies is not None
        new_lengths = lengths if L == 1 else torch.empty_like(lengths)
        pdl_on = PDL and pdl_usable(q.device)
        _append_kv_kernel[(B,) if L == 1 else (B * L, 3)](
            q, k, v, q_out, k if k_out is None else k_out, k_cache, v_cache, lengths, new_lengths,
            frequencies if rope else lengths, L, k_cache.shape[1], _row_stride(q), _row_stride(k), n_q, k.shape[2],
            half, ROPE=rope, ONE_TOKEN=L == 1, BLOCK_HEADS=block_heads, BLOCK_HALF=block_half, PDL=pdl_on,
            **launch_options(pdl_on))
        if L > 1:  # several programs read a row's length: the new one went to a buffer first
            lengths.copy_(new_lengths)


def _row_stride(t: Tensor) -> int:
    """Elements between t's tokens, for (B, L, H, D) with contiguous heads and rows evenly spaced."""
    return t.stride(1) if t.shape[1] > 1 or t.shape[0] == 1 else t.stride(0)


def _rows_of_heads(t: Tensor) -> Tensor:
    """t itself where its tokens are evenly spaced rows of contiguous heads (a slice of a wider
    projection output, say), else a contiguous copy."""
    B, L, H, D = t.shape
    heads_ok = t.stride(3) == 1 and (H == 1 or t.stride(2) == D)
    rows_ok = B == 1 or L == 1 or t.stride(0) == L * t.stride(1)
    return t if heads_ok and rows_ok else t.contiguous()


def append_kv(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor,
              theta: float | None) -> tuple[Tensor, Tensor]:
    """As :func:`hybridlm.kernels.kv_append.reference.append_kv`, in one kernel (two for L > 1: the
    lengths' copy); q returned contiguous."""
    q, k, v = _rows_of_heads(q), _rows_of_heads(k), _rows_of_heads(v)
    if _row_stride(k) != _row_stride(v):
        k, v = k.contiguous(), v.contiguous()
    frequencies = None if theta is None else _frequencies(q.shape[-1], float(theta), q.device)
    q_out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    k_out = None if theta is None else torch.empty(k.shape, device=k.device, dtype=k.dtype)
    append_kv_op(q, k, v, k_cache, v_cache, lengths, frequencies, q_out, k_out)
    return q_out, (k if k_out is None else k_out)


def unsupported_reason(device: torch.device, dtypes: tuple[torch.dtype, ...], head_dim: int,
                       lengths_dtype: torch.dtype) -> str | None:
    """Why the kernel cannot take these inputs (plain values); None when it can."""
    odd_head_dim = head_dim % 2 or head_dim > MAX_HEAD_DIM
    return (device_type_reason(device, "the Triton KV-cache kernel") or dtypes_reason(dtypes, DTYPES)
            or (f"head_dim {head_dim} (an even number up to {MAX_HEAD_DIM})" if odd_head_dim else None)
            or (f"cache lengths of dtype {lengths_dtype} (int32)" if lengths_dtype != torch.int32 else None))
