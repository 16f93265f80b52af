"""The cumulative rotation angle: a per-sequence prefix sum reduced modulo 2π.

θ_t = (θ_init + Σ_{τ ≤ t} δθ_τ) mod 2π, per (head, angle pair), restarting at every sequence. The
running sum is carried in fp32 and reduced after every block of tokens, so it stays in [0, 2π) and
keeps fp32 resolution however long the sequence (docs/mamba3.md §2.1). The backward treats
the reduction as the identity: dδθ_t = Σ_{τ ≥ t} dθ_τ, dθ_init = Σ_τ dθ_τ.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_T = 64
TWO_PI = 2 * math.pi
# Loads of the walks' next blocks in flight while a block is summed (Triton's software pipeline, through shared
# memory): a program is one (sequence, head) walking its tokens one 4 KB block at a time, 512 of them at B 8 and
# 64 heads, so a walk that waits for each load leaves the memory system idle (65 and 79 µs forward and backward on
# an H200 at B 8, L 2K, 16 angles, ≈ 40 % of the copy bandwidth; the pipelined walk is not yet timed).
STAGES = tl.constexpr(3)


@triton.jit
def _mod_two_pi(x):
    return x - 6.283185307179586 * tl.floor(x * 0.15915494309189535)


@triton.jit
def _angle_cumsum_fwd_kernel(DELTA, THETA0, THETA, CU, s_t, s_h, s0_n, s0_h, n_angles,
                             HAS_INIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
    seq, h = tl.program_id(0), tl.program_id(1)
    start = tl.load(CU + seq)
    end = tl.load(CU + seq + 1)
    s = tl.arange(0, BLOCK_S)
    s_mask = s < n_angles
    carry = tl.zeros([BLOCK_S], dtype=tl.float32)
    if HAS_INIT:
        carry = tl.load(THETA0 + seq * s0_n + h * s0_h + s, mask=s_mask, other=0.0).to(tl.float32)
    for i in tl.range(tl.cdiv(end - start, BLOCK_T), num_stages=STAGES):
        t = start + i * BLOCK_T + tl.arange(0, BLOCK_T)
        m = (t < end)[:, None] & s_mask[None, :]
        offs = t.to(tl.int64)[:, None] * s_t + h * s_h + s[None, :]
        d = tl.load(DELTA + offs, mask=m, other=0.0)
        theta = _mod_two_pi(carry[None, :] + tl.cumsum(d, 0))
        tl.store(THETA + offs, theta, mask=m)
        carry = _mod_two_pi(carry + tl.sum(d, 0))


@triton.jit
def _angle_cumsum_bwd_kernel(DTHETA, DDELTA, DTHETA0, CU, s_t, s_h, n_angles,
                             BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
    seq, h = tl.program_id(0), tl.program_id(1)
    start = tl.load(CU + seq)
    end = tl.load(CU + seq + 1)
    s = tl.arange(0, BLOCK_S)
    s_mask = s < n_angles
    carry = tl.zeros([BLOCK_S], dtype=tl.float32)  # Σ dθ over the tokens after this block
    n_blocks = tl.cdiv(end - start, BLOCK_T)
    for i in tl.range(n_blocks, num_stages=STAGES):
        t = start + (n_blocks - 1 - i) * BLOCK_T + tl.arange(0, BLOCK_T)
        m = (t < end)[:, None] & s_mask[None, :]
        offs = t.to(tl.int64)[:, None] * s_t + h * s_h + s[None, :]
        g = tl.load(DTHETA + offs, mask=m, other=0.0)
        tl.store(DDELTA + offs, carry[None, :] + tl.cumsum(g, 0, reverse=True), mask=m)
        carry += tl.sum(g, 0)
    tl.store(DTHETA0 + (seq * tl.num_programs(1) + h) * n_angles + s, carry, mask=s_mask)


@torch.library.custom_op("hybridlm::angle_cumsum_fwd", mutates_args=())
def angle_cumsum_fwd(delta: Tensor, theta0: Tensor | None, cu_seqlens: Tensor) -> Tensor:
    """delta (T, H, S) fp32, theta0 (NS, H, S) or None, cu_seqlens (NS+1,) int32 -> theta (T, H, S)."""
    delta = delta.contiguous()
    T, H, S = delta.shape
    theta = torch.empty_like(delta)
    if T and S:
        init = theta0.float().contiguous() if theta0 is not None else delta
        _angle_cumsum_fwd_kernel[(cu_seqlens.numel() - 1, H)](
            delta, init, theta, cu_seqlens, delta.stride(0), delta.stride(1),
            init.stride(0) if theta0 is not None else 0, init.stride(1) if theta0 is not None else 0, S,
            HAS_INIT=theta0 is not None, BLOCK_T=BLOCK_T, BLOCK_S=triton.next_power_of_2(S))
    return theta


@angle_cumsum_fwd.register_fake
def _(delta, theta0, cu_seqlens):
    return torch.empty_like(delta, memory_format=torch.contiguous_format)


@torch.library.custom_op("hybridlm::angle_cumsum_bwd", mutates_args=())
def angle_cumsum_bwd(dtheta: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, Tensor]:
    """dtheta (T, H, S) -> d delta (T, H, S) and d theta0 (NS, H, S), fp32."""
    dtheta = dtheta.float().contiguous()
    T, H, S = dtheta.shape
    n_seqs = cu_seqlens.numel() - 1
    ddelta = torch.zeros_like(dtheta)
    dtheta0 = torch.zeros(n_seqs, H, S, dtype=torch.float32, device=dtheta.device)
    if S and n_seqs:
        _angle_cumsum_bwd_kernel[(n_seqs, H)](
            dtheta, ddelta, dtheta0, cu_seqlens, dtheta.stride(0), dtheta.stride(1), S,
            BLOCK_T=BLOCK_T, BLOCK_S=triton.next_power_of_2(S))
    return ddelta, dtheta0


@angle_cumsum_bwd.register_fake
def _(dtheta, cu_seqlens):
    T, H, S = dtheta.shape
    return dtheta.new_empty(T, H, S, dtype=torch.float32), dtheta.new_empty(cu_seqlens.shape[0] - 1, H, S,
                                                                            dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])
    ctx.has_init = inputs[1] is not None


def _backward(ctx, dtheta: Tensor):
    (cu_seqlens,) = ctx.saved_tensors
    ddelta, dtheta0 = angle_cumsum_bwd(dtheta, cu_seqlens)
    return ddelta, (dtheta0 if ctx.has_init else None), None


angle_cumsum_fwd.register_autograd(_backward, setup_context=_setup_context)
