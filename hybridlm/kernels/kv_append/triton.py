"""A decode step's KV-cache write, RoPE included, as one Triton kernel: a program takes one token's
heads of k (rotated, into the cache and k_out), of v (into the cache) or of q (rotated, RoPE only).

Positions come from the cache's lengths on the device (no host sync, so a CUDA graph replays it);
the rotation is the RoPE kernel's own (hybridlm/kernels/rope/triton.py), so q and k round as there.
The program of a row's first k token also writes ``lengths + L``. A ``torch.library`` custom op
(opaque to ``torch.compile``, capturable in a CUDA graph) with no backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.mamba3.triton.interpreter_compat import device_type_reason
from hybridlm.kernels.rope.triton import MAX_HEAD_DIM, _frequencies, _rotate_heads, head_blocks

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _copy_heads(X, x_row, OUT, out_row, n_heads, i, i_mask, half, BLOCK_HEADS: tl.constexpr):
    for h0 in range(0, n_heads, BLOCK_HEADS):
        h = h0 + tl.arange(0, BLOCK_HEADS)
        mask = (h < n_heads)[:, None] & i_mask[None, :]
        x_at = (x_row * n_heads + h.to(tl.int64))[:, None] * (2 * half) + i[None, :]
        out_at = (out_row * n_heads + h.to(tl.int64))[:, None] * (2 * half) + i[None, :]
        tl.store(OUT + out_at, tl.load(X + x_at, mask=mask).to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + out_at + half, tl.load(X + x_at + half, mask=mask).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _append_kv_kernel(Q, K, V, Q_OUT, K_OUT, K_CACHE, V_CACHE, LENGTHS, KV_LENGTHS, FREQ, L, max_len, n_q_heads,
                      n_k_heads, half, ROPE: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Program (token, k / v / q)."""
    tok = tl.program_id(0).to(tl.int64)
    b, t = tok // L, tok % L
    length = tl.load(LENGTHS + b)
    pos = length.to(tl.int64) + t
    cache_row = b * max_len + pos
    i = tl.arange(0, BLOCK_HALF)
    i_mask = i < half
    which = tl.program_id(1)
    if which == 1:
        _copy_heads(V, tok, V_CACHE, cache_row, n_k_heads, i, i_mask, half, BLOCK_HEADS)
    elif ROPE:
        freq = tl.load(FREQ + i, mask=i_mask, other=0.0)
        if which == 0:  # the same instructions twice: the cache row and k_out agree bitwise
            _rotate_heads(K, tok, K_CACHE, cache_row, n_k_heads, pos.to(tl.float32), freq, i, i_mask, half,
                          BLOCK_HEADS, BLOCK_HALF)
            _rotate_heads(K, tok, K_OUT, tok, n_k_heads, pos.to(tl.float32), freq, i, i_mask, half,
                          BLOCK_HEADS, BLOCK_HALF)
        else:
            _rotate_heads(Q, tok, Q_OUT, tok, n_q_heads, pos.to(tl.float32), freq, i, i_mask, half,
                          BLOCK_HEADS, BLOCK_HALF)
    else:
        _copy_heads(K, tok, K_CACHE, cache_row, n_k_heads, i, i_mask, half, BLOCK_HEADS)
    if which == 0 and t == 0:
        tl.store(KV_LENGTHS + b, length + L)


@torch.library.custom_op("hybridlm::append_kv", mutates_args=("q_out", "k_out", "k_cache", "v_cache", "kv_lengths"))
def append_kv_op(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor,
                 frequencies: Tensor | None, q_out: Tensor | None, k_out: Tensor | None, kv_lengths: Tensor) -> None:
    """q (B, L, Hq, D), k, v (B, L, Hk, D), caches (B, max_len, Hk, D), all contiguous; lengths and
    kv_lengths (B,) int32; frequencies (D/2,) fp32, q_out and k_out for RoPE, all None for NoPE."""
    B, L, n_q, D = q.shape
    if B and L:
        half = D // 2
        block_half, block_heads = head_blocks(half, max(n_q, k.shape[2]))
        rope = frequencies is not None
        _append_kv_kernel[(B * L, 3 if rope else 2)](
            q, k, v, q if q_out is None else q_out, k if k_out is None else k_out, k_cache, v_cache, lengths, kv_lengths, frequencies if rope else lengths, L,
            k_cache.shape[1], n_q, k.shape[2], half, ROPE=rope, BLOCK_HEADS=block_heads, BLOCK_HALF=block_half)


def append_kv(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor,
              theta: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """As :func:`hybridlm.kernels.kv_append.reference.append_kv`, in one kernel."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    frequencies = None if theta is None else _frequencies(q.shape[-1], float(theta), q.device)
    q_out, k_out = (None, None) if theta is None else (torch.empty_like(q), torch.empty_like(k))
    kv_lengths = torch.empty_like(lengths)
    append_kv_op(q, k, v, k_cache, v_cache, lengths, frequencies, q_out, k_out, kv_lengths)
    return (q, k, kv_lengths) if theta is None else (q_out, k_out, kv_lengths)


def unsupported_reason(device: torch.device, dtypes: tuple[torch.dtype, ...], head_dim: int,
                       lengths_dtype: torch.dtype) -> str | None:
    """Why the kernel cannot take these inputs (plain values); None when it can."""
    where = device_type_reason(device, "the Triton KV-cache kernel")
    if where:
        return where
    odd = sorted({str(d).removeprefix("torch.") for d in dtypes if d not in DTYPES})
    if odd:
        return f"dtype {', '.join(odd)} (the kernel takes fp32, bf16 and fp16)"
    if head_dim % 2 or head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} (an even number up to {MAX_HEAD_DIM})"
    if lengths_dtype != torch.int32:
        return f"cache lengths of dtype {lengths_dtype} (int32)"
    return None
