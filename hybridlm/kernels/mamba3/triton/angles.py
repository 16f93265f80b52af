"""The per-token walk before the chunk scan: the trapezoid weights and the cumulative rotation angle.

Per sequence, head and token t (docs/mamba3.md §2.1):

    γ_t = λ_t Δ_t,   scale_t = γ_t + (1 − λ_{t+1}) Δ_{t+1}   (the second term 0 at a sequence's last token)
    θ_t = (θ_init + Σ_{τ ≤ t} π·tanh(rate_τ)·Δ_τ) mod 2π      (per angle pair; the rates are shared by the heads)

One program walks one (sequence, head): γ and scale need the next token, θ the running sum. The
running sum is carried in fp32 and reduced after every block of tokens, so it stays in [0, 2π) and
keeps fp32 resolution however long the sequence. The backward walks in reverse, treats the reduction
as the identity (dδθ_t = Σ_{τ ≥ t} dθ_τ, dθ_init = Σ_τ dθ_τ) and writes dΔ, dλ and, for the rates'
gradient (a sum over heads), each head's dδθ·Δ, which a third kernel sums over the heads. (More programs do
not make it faster: cutting each walk into up to 64 segments, about 8K programs, with a first pass of segment
sums, took 92 + 29 µs forward and 171 + 29 µs backward against 87 and 125 on an H100 at B 8, L 2K, 64 heads,
16 angles; docs/benchmarks.md, session 23.) In plain
torch the same was a dozen ops forward and twenty backward over (T, H) tensors, and the per-head
increments δθ (T, H, S) went through memory three times more.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_T = 64
RATE_TILE = 8192  # values of the per-head rate terms a program of the rates' gradient sums at once
# Loads of the walks' next blocks in flight while a block is summed (Triton's software pipeline, through shared
# memory): 512 programs at B 8 and 64 heads, each walking its tokens one block at a time, leave the memory system
# idle when each waits for its loads (the angle sums alone took 65 and 79 µs forward and backward on an H200 at
# B 8, L 2K, 16 angles, ≈ 40 % of the copy bandwidth, before they were pipelined; not yet timed since).
STAGES = tl.constexpr(3)


@triton.jit
def _mod_two_pi(x):
    return x - 6.283185307179586 * tl.floor(x * 0.15915494309189535)


@triton.jit
def _tanh(x):
    # sign(x)·(1 − 2 / (e^{2|x|} + 1)): no overflow; absolute error ≈ 1e-7 near 0, enough for an angle rate
    e2 = tl.exp(2.0 * tl.minimum(tl.abs(x), 15.0))
    magnitude = 1.0 - 2.0 / (e2 + 1.0)
    return tl.where(x < 0.0, -magnitude, magnitude)


@triton.jit
def _walk_fwd_kernel(DT, LAM, RATE, THETA0, GAMMA, SCALE, THETA, CU, H, n_angles, s0_n, s0_h,
                     HAS_ANGLES: tl.constexpr, HAS_INIT: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_S: tl.constexpr):
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
        m = t < end
        th = t.to(tl.int64) * H + h
        dt = tl.load(DT + th, mask=m, other=0.0)
        lam = tl.load(LAM + th, mask=m, other=0.0)
        has_next = t + 1 < end
        dt_next = tl.load(DT + th + H, mask=has_next, other=0.0)
        lam_next = tl.load(LAM + th + H, mask=has_next, other=0.0)
        gamma = lam * dt
        tl.store(GAMMA + th, gamma, mask=m)
        tl.store(SCALE + th, gamma + dt_next * (1.0 - lam_next), mask=m)
        if HAS_ANGLES:
            ms = m[:, None] & s_mask[None, :]
            rate = tl.load(RATE + t.to(tl.int64)[:, None] * n_angles + s[None, :], mask=ms, other=0.0)
            d = (3.141592653589793 * _tanh(rate.to(tl.float32))) * dt[:, None]
            theta = _mod_two_pi(carry[None, :] + tl.cumsum(d, 0))
            tl.store(THETA + th[:, None] * n_angles + s[None, :], theta, mask=ms)
            carry = _mod_two_pi(carry + tl.sum(d, 0))


@triton.jit
def _walk_bwd_kernel(DGAMMA, DSCALE, DTHETA, DT, LAM, RATE, DDT, DLAM, RATE_TERMS, DTHETA0, CU, H, n_angles,
                     HAS_ANGLES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
    """dΔ, dλ of the (sequence, head)'s tokens; RATE_TERMS (T, H, S) gets dδθ·Δ (the rates' gradient
    is π·(1 − tanh²) times its sum over heads); DTHETA0 (NS, H, S) the initial angle's gradient."""
    seq, h = tl.program_id(0), tl.program_id(1)
    start = tl.load(CU + seq)
    end = tl.load(CU + seq + 1)
    s = tl.arange(0, BLOCK_S)
    s_mask = s < n_angles
    carry = tl.zeros([BLOCK_S], dtype=tl.float32)  # Σ dθ over the tokens after this block
    n_blocks = tl.cdiv(end - start, BLOCK_T)
    for i in tl.range(n_blocks, num_stages=STAGES):
        t = start + (n_blocks - 1 - i) * BLOCK_T + tl.arange(0, BLOCK_T)
        m = t < end
        th = t.to(tl.int64) * H + h
        dt = tl.load(DT + th, mask=m, other=0.0)
        lam = tl.load(LAM + th, mask=m, other=0.0)
        d_scale = tl.load(DSCALE + th, mask=m, other=0.0)
        d_gamma = tl.load(DGAMMA + th, mask=m, other=0.0) + d_scale  # γ_t enters scale_t too
        # token t's Δ and λ enter scale_{t−1} as (1 − λ_t) Δ_t
        d_scale_prev = tl.load(DSCALE + th - H, mask=m & (t > start), other=0.0)
        d_dt = d_gamma * lam + d_scale_prev * (1.0 - lam)
        d_lam = (d_gamma - d_scale_prev) * dt
        if HAS_ANGLES:
            ms = m[:, None] & s_mask[None, :]
            offs = th[:, None] * n_angles + s[None, :]
            g = tl.load(DTHETA + offs, mask=ms, other=0.0)
            d_delta = carry[None, :] + tl.cumsum(g, 0, reverse=True)
            carry += tl.sum(g, 0)
            rate = tl.load(RATE + t.to(tl.int64)[:, None] * n_angles + s[None, :], mask=ms, other=0.0)
            d_dt += tl.sum(d_delta * (3.141592653589793 * _tanh(rate.to(tl.float32))), 1)
            tl.store(RATE_TERMS + offs, d_delta * dt[:, None], mask=ms)
        tl.store(DDT + th, d_dt, mask=m)
        tl.store(DLAM + th, d_lam, mask=m)
    if HAS_ANGLES:
        tl.store(DTHETA0 + (seq * H + h) * n_angles + s, carry, mask=s_mask)


@triton.jit
def _rate_grad_kernel(TERMS, RATE, DRATE, T, H, n_angles, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_S: tl.constexpr):
    """d rate_t = π·(1 − tanh²(rate_t))·Σ_h TERMS[t, h] for a block of tokens (TERMS (T, H, S) fp32)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.arange(0, BLOCK_H)
    s = tl.arange(0, BLOCK_S)
    rows = t.to(tl.int64)
    m = (t < T)[:, None] & (s < n_angles)[None, :]
    m3 = m[:, None, :] & (h < H)[None, :, None]
    terms = tl.load(TERMS + (rows[:, None, None] * H + h[None, :, None]) * n_angles + s[None, None, :], mask=m3,
                    other=0.0)
    at = rows[:, None] * n_angles + s[None, :]
    tanh = _tanh(tl.load(RATE + at, mask=m, other=0.0).to(tl.float32))
    d_rate = tl.sum(terms, 1) * (3.141592653589793 * (1.0 - tanh * tanh))
    tl.store(DRATE + at, d_rate.to(DRATE.dtype.element_ty), mask=m)


def _angles(rate: Tensor | None) -> int:
    return 0 if rate is None else rate.shape[-1]


@torch.library.custom_op("hybridlm::token_walk_fwd", mutates_args=())
def token_walk_fwd(dt: Tensor, lam: Tensor, rate: Tensor | None, theta0: Tensor | None,
                   cu_seqlens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """dt, lam (T, H) fp32; rate (T, S) or None; theta0 (NS, H, S) or None; cu_seqlens (NS+1,) int32
    -> γ, scale (T, H) and θ (T, H, S), fp32."""
    dt, lam = dt.float().contiguous(), lam.float().contiguous()
    T, H = dt.shape
    S = _angles(rate)
    gamma, scale = torch.empty_like(dt), torch.empty_like(dt)
    theta = torch.empty(T, H, S, dtype=torch.float32, device=dt.device)
    n_seqs = cu_seqlens.numel() - 1
    if T and n_seqs:
        rate_ = rate.contiguous() if S else dt
        init = theta0.float().contiguous() if theta0 is not None and S else None
        _walk_fwd_kernel[(n_seqs, H)](
            dt, lam, rate_, init if init is not None else dt, gamma, scale, theta, cu_seqlens, H, S,
            init.stride(0) if init is not None else 0, init.stride(1) if init is not None else 0,
            HAS_ANGLES=S > 0, HAS_INIT=init is not None, BLOCK_T=BLOCK_T, BLOCK_S=triton.next_power_of_2(max(S, 1)))
    return gamma, scale, theta


@token_walk_fwd.register_fake
def _(dt, lam, rate, theta0, cu_seqlens):
    T, H = dt.shape
    f32 = dict(dtype=torch.float32)
    return dt.new_empty(T, H, **f32), dt.new_empty(T, H, **f32), dt.new_empty(T, H, _angles(rate), **f32)


@torch.library.custom_op("hybridlm::token_walk_bwd", mutates_args=())
def token_walk_bwd(d_gamma: Tensor, d_scale: Tensor, d_theta: Tensor, dt: Tensor, lam: Tensor, rate: Tensor | None,
                   cu_seqlens: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> dΔ, dλ (T, H), d rate (rate's shape and dtype; empty without rates), dθ_init (NS, H, S), fp32."""
    T, H = dt.shape
    S = _angles(rate)
    n_seqs = cu_seqlens.numel() - 1
    # every token is some sequence's (cu_seqlens ends at T: shared.check_cu_seqlens), so no buffer needs zeros
    d_dt = torch.empty(T, H, dtype=torch.float32, device=dt.device)
    d_lam = torch.empty_like(d_dt)
    d_theta0 = torch.empty(n_seqs, H, S, dtype=torch.float32, device=dt.device)
    terms = torch.empty(T, H, S, dtype=torch.float32, device=dt.device) if S else None
    if T and n_seqs:
        _walk_bwd_kernel[(n_seqs, H)](
            d_gamma.float().contiguous(), d_scale.float().contiguous(),
            d_theta.float().contiguous() if S else d_dt, dt.contiguous(), lam.contiguous(),
            rate.contiguous() if S else d_dt, d_dt, d_lam, terms if S else d_dt, d_theta0, cu_seqlens, H, S,
            HAS_ANGLES=S > 0, BLOCK_T=BLOCK_T, BLOCK_S=triton.next_power_of_2(max(S, 1)))
    if S and T:
        rate = rate.contiguous()
        d_rate = torch.empty_like(rate)
        block_h, block_s = triton.next_power_of_2(H), triton.next_power_of_2(S)
        block_t = max(1, min(64, RATE_TILE // (block_h * block_s)))
        _rate_grad_kernel[(triton.cdiv(T, block_t),)](terms, rate, d_rate, T, H, S, BLOCK_T=block_t, BLOCK_H=block_h,
                                                       BLOCK_S=block_s)
    else:
        d_rate = torch.empty_like(rate) if S else dt.new_empty(0)
    return d_dt, d_lam, d_rate, d_theta0


@token_walk_bwd.register_fake
def _(d_gamma, d_scale, d_theta, dt, lam, rate, cu_seqlens):
    T, H = dt.shape
    f32 = dict(dtype=torch.float32)
    d_rate = torch.empty_like(rate, memory_format=torch.contiguous_format) if rate is not None else dt.new_empty(0)
    return (dt.new_empty(T, H, **f32), dt.new_empty(T, H, **f32), d_rate,
            dt.new_empty(cu_seqlens.shape[0] - 1, H, _angles(rate), **f32))


def _setup_context(ctx, inputs, output):
    dt, lam, rate, theta0, cu_seqlens = inputs
    ctx.save_for_backward(dt, lam, rate, cu_seqlens)
    ctx.has_init = theta0 is not None


def _backward(ctx, d_gamma: Tensor | None, d_scale: Tensor | None, d_theta: Tensor | None):
    dt, lam, rate, cu_seqlens = ctx.saved_tensors
    d_gamma, d_scale, d_theta = (g if g is not None else torch.zeros(shape, dtype=torch.float32, device=dt.device)
                                 for g, shape in ((d_gamma, dt.shape), (d_scale, dt.shape),
                                                  (d_theta, (*dt.shape, _angles(rate)))))
    d_dt, d_lam, d_rate, d_theta0 = token_walk_bwd(d_gamma, d_scale, d_theta, dt, lam, rate, cu_seqlens)
    return d_dt, d_lam, d_rate if rate is not None else None, d_theta0 if ctx.has_init else None, None


token_walk_fwd.register_autograd(_backward, setup_context=_setup_context)
