"""RoPE of q and k as one Triton kernel: a program rotates every head of one token of q or of k.

Roundings are the reference's (hybridlm/kernels/rope/reference.py) up to the last bit: the
frequencies are the reference's own fp32 tensor, each angle is the same one fp32 product of the
position and the frequency, the rotation runs in fp32 and is rounded once to the input's dtype;
only cos/sin (libdevice vs torch) and the contraction of a·cos − b·sin into an FMA may differ by an
ulp. A ``torch.library`` custom op (opaque to ``torch.compile``, capturable in a CUDA graph) with no
backward: the entry point (hybridlm/kernels/rope/__init__.py) sends autograd to the reference.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.mamba3.triton.interpreter_compat import device_type_reason, one_dtype_reason
from hybridlm.kernels.rope.reference import inverse_frequencies

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 512  # a token's heads of one tensor live in one program's registers, in blocks of heads


@triton.jit
def _rotate_heads(X, x_at, OUT, out_at, n_heads, pos, freq, i, i_mask, half,
                  BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Every head of the row starting at X + x_at (heads of 2·half contiguous elements) rotated by
    ``pos``, to the row starting at OUT + out_at."""
    angle = pos * freq
    cos, sin = tl.cos(angle)[None, :], tl.sin(angle)[None, :]
    for h0 in range(0, n_heads, BLOCK_HEADS):
        h = h0 + tl.arange(0, BLOCK_HEADS)
        mask = (h < n_heads)[:, None] & i_mask[None, :]
        at = h.to(tl.int64)[:, None] * (2 * half) + i[None, :]
        a = tl.load(X + x_at + at, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(X + x_at + at + half, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + out_at + at, (a * cos - b * sin).to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + out_at + at + half, (a * sin + b * cos).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, Q_OUT, K_OUT, POS, FREQ, n_q_heads, n_k_heads, half,
                 BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Program (token, q or k)."""
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + tok).to(tl.float32)
    i = tl.arange(0, BLOCK_HALF)
    i_mask = i < half
    freq = tl.load(FREQ + i, mask=i_mask, other=0.0)
    if tl.program_id(1) == 0:
        at = tok * n_q_heads * 2 * half
        _rotate_heads(Q, at, Q_OUT, at, n_q_heads, pos, freq, i, i_mask, half, BLOCK_HEADS, BLOCK_HALF)
    else:
        at = tok * n_k_heads * 2 * half
        _rotate_heads(K, at, K_OUT, at, n_k_heads, pos, freq, i, i_mask, half, BLOCK_HEADS, BLOCK_HALF)


@functools.lru_cache(maxsize=32)
def _frequencies(head_dim: int, theta: float, device: torch.device) -> Tensor:
    """The reference's fp32 frequencies, made once per (head_dim, theta, device): kept alive here,
    so a captured CUDA graph may read them."""
    return inverse_frequencies(head_dim, theta, torch.float32, device)


def head_blocks(half: int, n_heads: int) -> tuple[int, int]:
    """(BLOCK_HALF, BLOCK_HEADS): a head's half in one block, heads in blocks of ≤ 2,048 elements."""
    block_half = triton.next_power_of_2(half)
    return block_half, max(1, min(triton.next_power_of_2(n_heads), 2048 // block_half))


@torch.library.custom_op("hybridlm::rope_qk", mutates_args=("q_out", "k_out"))
def rope_qk_op(q: Tensor, k: Tensor, positions: Tensor, frequencies: Tensor, q_out: Tensor, k_out: Tensor) -> None:
    """q (T, Hq, D), k (T, Hk, D), positions (T,), frequencies (D/2,) fp32, all contiguous -> q_out, k_out."""
    T, n_q, D = q.shape
    if T:
        half = D // 2
        block_half, block_heads = head_blocks(half, max(n_q, k.shape[1]))
        _rope_kernel[(T, 2)](q, k, q_out, k_out, positions, frequencies, n_q, k.shape[1], half,
                             BLOCK_HEADS=block_heads, BLOCK_HALF=block_half)


def rope_qk(q: Tensor, k: Tensor, positions: Tensor, theta: float) -> tuple[Tensor, Tensor]:
    """As :func:`hybridlm.kernels.rope.reference.rope_qk`, in one kernel."""
    lead = q.shape[:-2]
    D = q.shape[-1]
    flat_positions = positions.expand(lead).reshape(-1).contiguous()
    q3, k3 = q.reshape(-1, q.shape[-2], D).contiguous(), k.reshape(-1, k.shape[-2], D).contiguous()
    q_out, k_out = torch.empty_like(q3), torch.empty_like(k3)
    rope_qk_op(q3, k3, flat_positions, _frequencies(D, float(theta), q.device), q_out, k_out)
    return q_out.view(q.shape), k_out.view(k.shape)


def unsupported_reason(device: torch.device, dtypes: tuple[torch.dtype, ...], head_dim: int) -> str | None:
    """Why the kernel cannot take these inputs (plain values); None when it can."""
    odd_head_dim = head_dim % 2 or head_dim > MAX_HEAD_DIM
    return (device_type_reason(device, "the Triton RoPE kernel") or one_dtype_reason(dtypes, DTYPES)
            or (f"head_dim {head_dim} (an even number up to {MAX_HEAD_DIM})" if odd_head_dim else None))
