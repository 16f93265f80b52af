"""The decode step of a whole Mamba-3 layer as one Triton kernel (the CuTe kernel's fallback).

Between in_proj and out_proj everything is one program per (sequence, head): Δ, A, λ from their
projections; RMSNorm, bias and rotation of B and C for every rank; the angle update (mod 2π); the
trapezoid update of the fp32 state in place; the read-out, D skip, gate, grouped output norm and the
rank contraction. Reading the state once and writing it once is the whole cost at large batch, so
the state tile stays in registers from its load to its store. Arguments and semantics are
:func:`hybridlm.kernels.mamba3.oracle.mamba3_decode_step`'s.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.mamba3.contract import DecodeLayout, DecodeParams, Mamba3State
from hybridlm.kernels.mamba3.shared import fp32_state_reason
from hybridlm.kernels.mamba3.step_output import OUT_MODES, allocate_step_output, finish_step_output
from hybridlm.kernels.mamba3.triton.activations import a_magnitude, softplus
from hybridlm.kernels.mamba3.triton.interpreter_compat import device_reason

DISCRETIZATIONS = {"trapezoid": 0, "euler": 1, "half": 2}  # the kernel's DISCRETIZATION codes


@triton.jit
def _pairs(n, N: tl.constexpr, S, INTERLEAVED: tl.constexpr):
    """For each of the N slots: its pair index, its partner slot, whether it rotates, whether it
    is the pair's first slot (docs/mamba3.md §2.3: interleaved (2j, 2j+1) for SISO, (j, j + N/2) for MIMO)."""
    if INTERLEAVED:
        pair = n // 2
        partner = n ^ 1
        first = (n % 2) == 0
    else:
        half = N // 2
        first = n < half
        pair = tl.where(first, n, n - half)
        partner = tl.where(first, n + half, n - half)
    return pair, partner, pair < S, first


@triton.jit
def _bc_rank(ROW, col, r, g, G, N_REAL, n, n_mask, partner, rotates, cos, sin_signed, NORM_W, BIAS, h, R,
             eps, HAS_BIAS: tl.constexpr):
    """B or C of rank r for this head: RMSNorm over N, + bias, rotated. fp32 (N,)."""
    base = ROW + col + (r * G + g) * N_REAL
    v = tl.load(base + n, mask=n_mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(v * v, 0) / N_REAL + eps)
    mate = tl.load(base + partner, mask=n_mask & rotates, other=0.0).to(tl.float32)
    v = v * rstd * tl.load(NORM_W + n, mask=n_mask, other=0.0).to(tl.float32)
    mate = mate * rstd * tl.load(NORM_W + partner, mask=n_mask & rotates, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias_row = BIAS + (h * R + r) * N_REAL
        v += tl.load(bias_row + n, mask=n_mask, other=0.0)
        mate += tl.load(bias_row + partner, mask=n_mask & rotates, other=0.0)
    return tl.where(rotates, v * cos + mate * sin_signed, v)


@triton.jit
def _rank_weight(W, h, r, p, p_mask, P, R, HAS: tl.constexpr):
    """mimo_x / mimo_z / mimo_o of rank r for this head; ones for SISO."""
    if HAS:
        return tl.load(W + (h * R + r) * P + p, mask=p_mask, other=0.0)
    return tl.full(p.shape, 1.0, tl.float32)


@triton.jit
def _step_kernel(
    PROJ, proj_row, ANGLE, SSM, K_STATE, V_STATE, OUT, out_row,
    DT_BIAS, B_NORM_W, C_NORM_W, B_BIAS, C_BIAS, D, MIMO_X, MIMO_Z, MIMO_O, NORM_W,
    H, P, G, S, col_z, col_x, col_b, col_c, col_dt, col_a, col_trap, col_angle,
    A_floor, bc_eps, out_eps,
    N: tl.constexpr, R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MIMO: tl.constexpr, DISCRETIZATION: tl.constexpr,
    HEAVY_TAIL: tl.constexpr, OUT_MODE: tl.constexpr, HAS_ANGLES: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    row = PROJ + b * proj_row
    bh = b * H + h
    g = h // (H // G)

    # per-head scalars (docs/mamba3.md §2.1)
    dt = tl.load(row + col_dt + h).to(tl.float32) + tl.load(DT_BIAS + h)
    dt = softplus(dt)
    A = -tl.maximum(a_magnitude(tl.load(row + col_a + h).to(tl.float32), HEAVY_TAIL), A_floor)
    if DISCRETIZATION == 0:
        lam = tl.sigmoid(tl.load(row + col_trap + h).to(tl.float32))
    elif DISCRETIZATION == 1:
        lam = 1.0
    else:
        lam = 0.5
    alpha = tl.exp(A * dt)
    beta = (1.0 - lam) * dt * alpha
    gamma = lam * dt

    # the angle update: θ ← (θ + π·tanh(rate)·Δ) mod 2π, one value per pair, seen from every slot
    n = tl.arange(0, BLOCK_N)
    n_mask = n < N
    pair, partner, rotates, first = _pairs(n, N, S, INTERLEAVED)
    rotates = rotates & n_mask
    if HAS_ANGLES:
        theta = tl.load(ANGLE + bh * S + pair, mask=rotates, other=0.0)
        rate = tl.load(row + col_angle + pair, mask=rotates, other=0.0).to(tl.float32)
        e2 = tl.exp(2.0 * tl.minimum(tl.abs(rate), 15.0))
        tanh = tl.where(rate < 0, -1.0, 1.0) * (e2 - 1.0) / (e2 + 1.0)
        theta = theta + 3.141592653589793 * tanh * dt
        theta = theta - 6.283185307179586 * tl.floor(theta / 6.283185307179586)
    else:
        theta = tl.zeros([BLOCK_N], dtype=tl.float32)
    cos = tl.cos(theta)
    sin_signed = tl.where(first, -tl.sin(theta), tl.sin(theta))

    p = tl.arange(0, BLOCK_P)
    p_mask = p < P
    tile_mask = p_mask[:, None] & n_mask[None, :]
    x = tl.load(row + col_x + h * P + p, mask=p_mask, other=0.0).to(tl.float32)
    x_prev = tl.load(V_STATE + bh * P + p, mask=p_mask, other=0.0).to(tl.float32)
    ssm_ptrs = SSM + bh * P * N + p[:, None] * N + n[None, :]
    state = tl.load(ssm_ptrs, mask=tile_mask, other=0.0) * alpha

    # H ← αH + Σ_r [γ (x⊙mimo_x_r) k_rᵀ + β (x_prev⊙mimo_x_r) k_prev_rᵀ]
    for r in tl.static_range(R):
        k = _bc_rank(row, col_b, r, g, G, N, n, n_mask, partner, rotates, cos, sin_signed, B_NORM_W, B_BIAS, h,
                     R, bc_eps, HAS_BIAS)
        k_state_ptrs = K_STATE + ((b * R + r) * H + h) * N + n
        k_prev = tl.load(k_state_ptrs, mask=n_mask, other=0.0).to(tl.float32)
        mx = _rank_weight(MIMO_X, h, r, p, p_mask, P, R, HAS_MIMO)
        state += (gamma * x * mx)[:, None] * k[None, :] + (beta * x_prev * mx)[:, None] * k_prev[None, :]
        tl.debug_barrier()  # every thread has read the old k before any writes the new one
        tl.store(k_state_ptrs, k.to(K_STATE.dtype.element_ty), mask=n_mask)
    tl.store(ssm_ptrs, state, mask=tile_mask)

    # y_r = H q_r + D x_r; gate, norm and rank contraction
    z = tl.load(row + col_z + h * P + p, mask=p_mask, other=0.0).to(tl.float32)
    d_skip = tl.load(D + h)
    if OUT_MODE == 1 or OUT_MODE == 2:
        norm_w = tl.load(NORM_W + h * P + p, mask=p_mask, other=0.0).to(tl.float32)
    o = tl.zeros([BLOCK_P], dtype=tl.float32)
    for r in tl.static_range(R):
        q = _bc_rank(row, col_c, r, g, G, N, n, n_mask, partner, rotates, cos, sin_signed, C_NORM_W, C_BIAS, h,
                     R, bc_eps, HAS_BIAS)
        mx = _rank_weight(MIMO_X, h, r, p, p_mask, P, R, HAS_MIMO)
        y = tl.sum(state * q[None, :], 1) + d_skip * x * mx
        if OUT_MODE == 3:
            tl.store(OUT + (b * R + r) * out_row + h * P + p, y, mask=p_mask)
        else:
            zr = z * _rank_weight(MIMO_Z, h, r, p, p_mask, P, R, HAS_MIMO)
            gate = zr * tl.sigmoid(zr)
            if OUT_MODE == 0:
                y = y * gate
            elif OUT_MODE == 1:
                y = y / tl.sqrt(tl.sum(y * y, 0) / P + out_eps) * norm_w * gate
            else:
                y = y * gate
                y = y / tl.sqrt(tl.sum(y * y, 0) / P + out_eps) * norm_w
            o += y * _rank_weight(MIMO_O, h, r, p, p_mask, P, R, HAS_MIMO)
    if OUT_MODE != 3:
        tl.store(OUT + b * out_row + h * P + p, o.to(OUT.dtype.element_ty), mask=p_mask)

    tl.debug_barrier()  # the old x and angles are read by every thread above
    tl.store(V_STATE + bh * P + p, x.to(V_STATE.dtype.element_ty), mask=p_mask)
    if HAS_ANGLES:
        tl.store(ANGLE + bh * S + pair, theta, mask=rotates & first)


def unsupported_reason(proj: Tensor, state: Mamba3State, layout: DecodeLayout) -> str | None:
    """Why the kernel cannot take these inputs (None when it can)."""
    reason = device_reason(proj, "the Triton kernels") or fp32_state_reason(state, "the step kernel")
    if reason:
        return reason
    if layout.d_state % 2 or layout.d_state > 256:
        return f"d_state {layout.d_state}; the step kernel takes even d_state up to 256"
    if layout.headdim > 128:
        return f"headdim {layout.headdim}; the step kernel takes up to 128"
    if layout.out_norm not in OUT_MODES:
        return f"out_norm {layout.out_norm!r}"
    return None


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def mamba3_decode_step(proj: Tensor, state: Mamba3State, params: DecodeParams, layout: DecodeLayout) -> Tensor:
    """As :func:`hybridlm.kernels.mamba3.oracle.mamba3_decode_step`; ``state`` is updated in place."""
    H, P, G, R, N, S = (layout.nheads, layout.headdim, layout.ngroups, layout.rank, layout.d_state,
                        layout.n_angles)
    batch = proj.shape[0]
    cols = [layout.in_proj.offset(name) for name in ("z", "x", "B", "C", "dt", "A", "trap", "angle")]
    out_mode = OUT_MODES[layout.out_norm]
    if proj.stride(-1) != 1:
        proj = proj.contiguous()
    out = allocate_step_output(proj, layout)
    has_bias, has_mimo = params.B_bias is not None, params.mimo_x is not None
    dummy = params.D
    block_n = max(16, triton.next_power_of_2(N))
    block_p = max(16, triton.next_power_of_2(P))
    _step_kernel[(batch, H)](
        proj, proj.stride(0), state.angle, state.ssm, state.k, state.v, out, H * P,
        params.dt_bias, params.B_norm, params.C_norm,
        _contiguous(params.B_bias) if has_bias else dummy, _contiguous(params.C_bias) if has_bias else dummy,
        params.D, *((_contiguous(getattr(params, f"mimo_{w}")) if has_mimo else dummy) for w in "xzo"),
        params.norm_weight if params.norm_weight is not None else dummy,
        H, P, G, S, *cols,
        float(layout.A_floor), float(layout.bc_norm_eps), float(layout.norm_eps),
        N=N, R=R, BLOCK_P=block_p, BLOCK_N=block_n, INTERLEAVED=layout.pair_layout == "interleaved",
        HAS_BIAS=has_bias, HAS_MIMO=has_mimo, DISCRETIZATION=DISCRETIZATIONS[layout.discretization],
        HEAVY_TAIL=layout.a_activation == "heavy_tail", OUT_MODE=out_mode, HAS_ANGLES=S > 0,
        num_warps=4 if block_p * block_n <= 4096 else 8,
    )
    return finish_step_output(out, proj, params, layout)
