"""Backward chunk kernels.

With G the gradient of the state leaving a chunk (S_{c+1}) and dy the gradient of the pre-gate
output, per chunk and head (rows a, b; P_ab = dy_a·v_b, A_ab = q̄_a·k̄_b, M the intra weights):

    G_c   = e^{cs_end} G_{c+1} + Σ_a e^{cs_a} dy_a q̄_aᵀ                       (sequential, reversed)
    dv_b  = Σ_a A_ab M_ab dy_a + e^{cs_end − cs_b} scale_b G k̄_b + D dy_b
    dq̄_a  = Σ_b P_ab M_ab k̄_b + e^{cs_a} S_cᵀ dy_a
    dk̄_b  = Σ_a P_ab M_ab q̄_a + e^{cs_end − cs_b} scale_b Gᵀ v_b
and the per-token scalars get dM = P ⊙ A through M, plus the inter-chunk and state terms; dA·Δ is
the reverse cumsum of d cs inside the chunk plus d cs_end on every token. dq̄, dk̄ are rotated back
(giving dq, dk per head) and give dθ.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.triton.rows import (
    chunk_rows, intra_weights, load_rotated, load_rows, mm, pair_dims, row_scalars, rotation, rows_to_tokens,
    rows_to_tokens_2d, state_offsets,
)
from hybridlm.kernels.triton.spec import ScanSpec


@triton.jit
def _state_bwd_kernel(
    Q, Q_BIAS, THETA, DY, ADT, DFINAL, DSTATES, DSSM0, CU_SEQLENS, CU_CHUNKS,
    dy_st, dy_sr, dy_sh,
    n_heads, heads_per_group, n_groups, d_state, half_n, headdim, n_angles,
    R: tl.constexpr, CHUNK: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_P: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DFINAL: tl.constexpr,
    MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Stores the gradient of the state leaving every chunk, and of the initial state."""
    seq, h, pid_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(CU_SEQLENS + seq)
    end = tl.load(CU_SEQLENS + seq + 1)
    first_chunk = tl.load(CU_CHUNKS + seq).to(tl.int64)
    dim_a, dim_b, half_mask = pair_dims(half_n, BLOCK_HALF, INTERLEAVED)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < headdim
    off_a, off_b = state_offsets(p, dim_a, dim_b, d_state)
    s_mask = p_mask[:, None] & half_mask[None, :]
    head_size = headdim * d_state
    row = (seq * n_heads + h).to(tl.int64) * head_size
    if HAS_DFINAL:
        grad_a = tl.load(DFINAL + row + off_a, mask=s_mask, other=0.0).to(tl.float32)
        grad_b = tl.load(DFINAL + row + off_b, mask=s_mask, other=0.0).to(tl.float32)
    else:
        grad_a = tl.zeros([BLOCK_P, BLOCK_HALF], dtype=tl.float32)
        grad_b = tl.zeros([BLOCK_P, BLOCK_HALF], dtype=tl.float32)
    q_group = Q + (h // heads_per_group) * d_state
    q_bias = Q_BIAS + h * R * d_state
    n_chunks = tl.cdiv(end - start, CHUNK)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        out = DSTATES + ((first_chunk + c) * n_heads + h) * head_size
        tl.store(out + off_a, grad_a, mask=s_mask)
        tl.store(out + off_b, grad_b, mask=s_mask)
        tok_local, rank, tok, valid = chunk_rows(start + c * CHUNK, end, CHUNK, R)
        cos, sin = rotation(THETA, tok, valid, h, n_heads, n_angles, BLOCK_HALF)
        qa, qb = load_rotated(q_group, q_bias, tok, rank, valid, R * n_groups * d_state, n_groups * d_state,
                              d_state, dim_a, dim_b, half_mask, cos, sin, HAS_BIAS)
        dy = load_rows(DY, tok, rank, valid, h, dy_st, dy_sr, dy_sh, p, p_mask)
        cs, cs_end, _, _ = row_scalars(ADT, ADT, ADT, tok, rank, valid, h, n_heads)
        dye = tl.trans(dy * tl.exp(cs)[:, None])
        decay = tl.exp(cs_end)
        grad_a = grad_a * decay + mm(dye, qa, MM_DTYPE, PRECISION)
        grad_b = grad_b * decay + mm(dye, qb, MM_DTYPE, PRECISION)
    tl.store(DSSM0 + row + off_a, grad_a, mask=s_mask)
    tl.store(DSSM0 + row + off_b, grad_b, mask=s_mask)


@triton.jit
def _dv_kernel(
    Q, K, Q_BIAS, K_BIAS, THETA, DY, ADT, GAMMA, SCALE, D, DSTATES, DV, CU_SEQLENS, CHUNK_SEQ, CHUNK_START,
    dy_st, dy_sr, dy_sh,
    n_heads, heads_per_group, n_groups, d_state, half_n, headdim, n_angles,
    R: tl.constexpr, CHUNK: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_P: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr,
    MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    c, h = tl.program_id(0), tl.program_id(1)
    seq = tl.load(CHUNK_SEQ + c)
    end = tl.load(CU_SEQLENS + seq + 1)
    tok_local, rank, tok, valid = chunk_rows(tl.load(CHUNK_START + c), end, CHUNK, R)
    dim_a, dim_b, half_mask = pair_dims(half_n, BLOCK_HALF, INTERLEAVED)
    cos, sin = rotation(THETA, tok, valid, h, n_heads, n_angles, BLOCK_HALF)
    group = (h // heads_per_group) * d_state
    qa, qb = load_rotated(Q + group, Q_BIAS + h * R * d_state, tok, rank, valid, R * n_groups * d_state,
                          n_groups * d_state, d_state, dim_a, dim_b, half_mask, cos, sin, HAS_BIAS)
    ka, kb = load_rotated(K + group, K_BIAS + h * R * d_state, tok, rank, valid, R * n_groups * d_state,
                          n_groups * d_state, d_state, dim_a, dim_b, half_mask, cos, sin, HAS_BIAS)
    p = tl.arange(0, BLOCK_P)
    p_mask = p < headdim
    dy = load_rows(DY, tok, rank, valid, h, dy_st, dy_sr, dy_sh, p, p_mask)
    cs, cs_end, gamma, scale = row_scalars(ADT, GAMMA, SCALE, tok, rank, valid, h, n_heads)
    weights, _, _ = intra_weights(tok_local, cs, gamma, scale)
    scores = mm(qa, tl.trans(ka), MM_DTYPE, PRECISION) + mm(qb, tl.trans(kb), MM_DTYPE, PRECISION)
    dv = mm(tl.trans(scores * weights), dy, MM_DTYPE, PRECISION)
    off_a, off_b = state_offsets(p, dim_a, dim_b, d_state)
    s_mask = p_mask[:, None] & half_mask[None, :]
    grad = DSTATES + (c.to(tl.int64) * n_heads + h) * headdim * d_state
    grad_a = tl.load(grad + off_a, mask=s_mask, other=0.0)
    grad_b = tl.load(grad + off_b, mask=s_mask, other=0.0)
    to_end = tl.exp(cs_end - cs) * scale
    dv += to_end[:, None] * (mm(ka, tl.trans(grad_a), MM_DTYPE, PRECISION)
                             + mm(kb, tl.trans(grad_b), MM_DTYPE, PRECISION))
    if HAS_D:
        dv += tl.load(D + h) * dy
    tl.store(DV + tok[:, None] * (R * n_heads * headdim) + rank[:, None] * (n_heads * headdim) + h * headdim
             + p[None, :], dv, mask=valid[:, None] & p_mask[None, :])


@triton.jit
def _dqk_kernel(
    Q, K, Q_BIAS, K_BIAS, THETA, V, DY, ADT, GAMMA, SCALE, STATES, DSTATES,
    DQ, DK, DTHETA, DADT, DGAMMA, DSCALE, CU_SEQLENS, CHUNK_SEQ, CHUNK_START,
    v_st, v_sr, v_sh, dy_st, dy_sr, dy_sh,
    n_heads, heads_per_group, n_groups, d_state, half_n, headdim, n_angles,
    R: tl.constexpr, CHUNK: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_P: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr,
    MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    c, h = tl.program_id(0), tl.program_id(1)
    seq = tl.load(CHUNK_SEQ + c)
    end = tl.load(CU_SEQLENS + seq + 1)
    tok0 = tl.load(CHUNK_START + c)
    tok_local, rank, tok, valid = chunk_rows(tok0, end, CHUNK, R)
    dim_a, dim_b, half_mask = pair_dims(half_n, BLOCK_HALF, INTERLEAVED)
    cos, sin = rotation(THETA, tok, valid, h, n_heads, n_angles, BLOCK_HALF)
    group = (h // heads_per_group) * d_state
    qa, qb = load_rotated(Q + group, Q_BIAS + h * R * d_state, tok, rank, valid, R * n_groups * d_state,
                          n_groups * d_state, d_state, dim_a, dim_b, half_mask, cos, sin, HAS_BIAS)
    ka, kb = load_rotated(K + group, K_BIAS + h * R * d_state, tok, rank, valid, R * n_groups * d_state,
                          n_groups * d_state, d_state, dim_a, dim_b, half_mask, cos, sin, HAS_BIAS)
    p = tl.arange(0, BLOCK_P)
    p_mask = p < headdim
    v = load_rows(V, tok, rank, valid, h, v_st, v_sr, v_sh, p, p_mask)
    dy = load_rows(DY, tok, rank, valid, h, dy_st, dy_sr, dy_sh, p, p_mask)
    cs, cs_end, gamma, scale = row_scalars(ADT, GAMMA, SCALE, tok, rank, valid, h, n_heads)
    weights, decay, same = intra_weights(tok_local, cs, gamma, scale)
    scores = mm(qa, tl.trans(ka), MM_DTYPE, PRECISION) + mm(qb, tl.trans(kb), MM_DTYPE, PRECISION)
    dprod = mm(dy, tl.trans(v), MM_DTYPE, PRECISION)  # dy_a · v_b
    dscores = dprod * weights
    dweights = dprod * scores

    off_a, off_b = state_offsets(p, dim_a, dim_b, d_state)
    s_mask = p_mask[:, None] & half_mask[None, :]
    at_chunk = (c.to(tl.int64) * n_heads + h) * headdim * d_state
    state_a = tl.load(STATES + at_chunk + off_a, mask=s_mask, other=0.0).to(tl.float32)
    state_b = tl.load(STATES + at_chunk + off_b, mask=s_mask, other=0.0).to(tl.float32)
    grad_a = tl.load(DSTATES + at_chunk + off_a, mask=s_mask, other=0.0)
    grad_b = tl.load(DSTATES + at_chunk + off_b, mask=s_mask, other=0.0)

    # q̄: intra and inter terms; the inter term also gives d cs_a = q̄_a · (its dq̄)
    growth = tl.exp(cs)
    dqa_inter = growth[:, None] * mm(dy, state_a, MM_DTYPE, PRECISION)
    dqb_inter = growth[:, None] * mm(dy, state_b, MM_DTYPE, PRECISION)
    dcs = tl.sum(qa * dqa_inter + qb * dqb_inter, 1)
    dqa = mm(dscores, ka, MM_DTYPE, PRECISION) + dqa_inter
    dqb = mm(dscores, kb, MM_DTYPE, PRECISION) + dqb_inter

    # k̄: intra and state terms; ratio_b = e^{cs_end − cs_b} k̄_b·(Gᵀ v_b) is d scale_b of the state term
    vg_a = mm(v, grad_a, MM_DTYPE, PRECISION)
    vg_b = mm(v, grad_b, MM_DTYPE, PRECISION)
    to_end = tl.exp(cs_end - cs)
    ratio = to_end * tl.sum(ka * vg_a + kb * vg_b, 1)
    dka = mm(tl.trans(dscores), qa, MM_DTYPE, PRECISION) + (to_end * scale)[:, None] * vg_a
    dkb = mm(tl.trans(dscores), qb, MM_DTYPE, PRECISION) + (to_end * scale)[:, None] * vg_b

    # the per-token scalars
    ddecay = dweights * decay
    dscale = tl.sum(ddecay, 0) + ratio
    through_decay = ddecay * scale[None, :]
    state_term = ratio * scale
    dcs += tl.sum(through_decay, 1) - tl.sum(through_decay, 0) - state_term
    dcs_end = tl.sum(state_term, 0) + tl.exp(cs_end) * (tl.sum(tl.sum(state_a * grad_a, 1), 0)
                                                        + tl.sum(tl.sum(state_b * grad_b, 1), 0))
    dgamma = tl.sum(tl.where(same, dweights, 0.0), 1)
    dtheta = (dqb * qa - dqa * qb) + (dkb * ka - dka * kb)

    # back through the rotation: per-head dq, dk (the caller sums the heads of a group)
    mask = valid[:, None] & half_mask[None, :]
    rows = tok[:, None] * (R * n_heads * d_state) + rank[:, None] * (n_heads * d_state) + h * d_state
    tl.store(DQ + rows + dim_a[None, :], dqa * cos + dqb * sin, mask=mask)
    tl.store(DQ + rows + dim_b[None, :], dqb * cos - dqa * sin, mask=mask)
    tl.store(DK + rows + dim_a[None, :], dka * cos + dkb * sin, mask=mask)
    tl.store(DK + rows + dim_b[None, :], dkb * cos - dka * sin, mask=mask)

    t = tok0 + tl.arange(0, CHUNK)
    t_valid = t < end
    at_token = t.to(tl.int64) * n_heads + h
    dcs_tok = rows_to_tokens(dcs, CHUNK, R)
    tl.store(DADT + at_token, tl.cumsum(dcs_tok, 0, reverse=True) + dcs_end, mask=t_valid)
    tl.store(DGAMMA + at_token, rows_to_tokens(dgamma, CHUNK, R), mask=t_valid)
    tl.store(DSCALE + at_token, rows_to_tokens(dscale, CHUNK, R), mask=t_valid)
    i = tl.arange(0, BLOCK_HALF)
    tl.store(DTHETA + at_token[:, None] * n_angles + i[None, :], rows_to_tokens_2d(dtheta, CHUNK, R, BLOCK_HALF),
             mask=t_valid[:, None] & (i < n_angles)[None, :])


def scan_backward(spec: ScanSpec, saved: dict, dy: Tensor, dfinal: Tensor | None, need_dssm0: bool):
    """Gradients of the chunk scan. Returns a dict of per-head dq, dk (T, R, H, N), dtheta, dv,
    dadt, dgamma, dscale and dssm0 (or None)."""
    lay = spec.layout
    q, k, q_bias, k_bias = saved["q"], saved["k"], saved["q_bias"], saved["k_bias"]
    theta, v, adt, gamma, scale, D, states = (saved[n] for n in ("theta", "v", "adt", "gamma", "scale", "D", "states"))
    T, H, P, N, R, S = q.shape[0], spec.n_heads, spec.headdim, spec.d_state, spec.rank, spec.n_angles
    dev = q.device
    f32 = dict(device=dev, dtype=torch.float32)
    dstates = torch.empty(lay.n_chunks, H, P, N, **f32)
    dssm0 = torch.empty(lay.n_seqs, H, P, N, **f32)
    dq, dk = torch.empty(T, R, H, N, **f32), torch.empty(T, R, H, N, **f32)
    dv = torch.empty(T, R, H, P, **f32)
    dtheta = torch.empty(T, H, S, **f32)
    dadt, dgamma, dscale = (torch.empty(T, H, **f32) for _ in range(3))
    has_bias = k_bias is not None
    qb = q_bias if has_bias else q
    kb = k_bias if has_bias else k
    common = dict(HAS_BIAS=has_bias, **spec.constexprs())
    dys = (dy.stride(0), dy.stride(1), dy.stride(2))
    if lay.n_seqs:
        bp = spec.block_p_sequential
        _state_bwd_kernel[(lay.n_seqs, H, triton.cdiv(P, bp))](
            q, qb, theta, dy, adt, dfinal if dfinal is not None else dssm0, dstates, dssm0,
            lay.cu_seqlens, lay.cu_chunks, *dys, *spec.dims(), BLOCK_P=bp, HAS_DFINAL=dfinal is not None, **common)
    if lay.n_chunks:
        grid = (lay.n_chunks, H)
        _dv_kernel[grid](
            q, k, qb, kb, theta, dy, adt, gamma, scale, D if D is not None else adt, dstates, dv,
            lay.cu_seqlens, lay.chunk_seq, lay.chunk_start, *dys, *spec.dims(),
            BLOCK_P=spec.block_p, HAS_D=D is not None, **common)
        _dqk_kernel[grid](
            q, k, qb, kb, theta, v, dy, adt, gamma, scale, states, dstates,
            dq, dk, dtheta, dadt, dgamma, dscale, lay.cu_seqlens, lay.chunk_seq, lay.chunk_start,
            v.stride(0), v.stride(1), v.stride(2), *dys, *spec.dims(), BLOCK_P=spec.block_p, **common)
    return dict(dq=dq, dk=dk, dtheta=dtheta, dv=dv, dadt=dadt, dgamma=dgamma, dscale=dscale,
                dssm0=dssm0 if need_dssm0 else None)
