"""Forward chunk kernels: the states entering every chunk (sequential over a sequence's chunks),
then every chunk's output in parallel (intra-chunk attention-like product + the entering state)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.triton.rows import (
    chunk_rows, intra_weights, load_rotated, load_rows, mm, pair_dims, row_scalars, rotation, state_offsets,
)
from hybridlm.kernels.triton.spec import ScanSpec


@triton.jit
def _state_fwd_kernel(
    K, K_BIAS, THETA, V, ADT, SCALE, SSM0, STATES, FINAL, CU_SEQLENS, CU_CHUNKS,
    v_st, v_sr, v_sh,
    n_heads, heads_per_group, n_groups, d_state, half_n, headdim, n_angles,
    R: tl.constexpr, CHUNK: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_P: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
    MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """S_{c+1} = e^{cs_end} S_c + Σ_b e^{cs_end − cs_b} scale_b v_b k̄_bᵀ; stores every S_c."""
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
    if HAS_INIT:
        init = SSM0 + (seq * n_heads + h).to(tl.int64) * head_size
        state_a = tl.load(init + off_a, mask=s_mask, other=0.0).to(tl.float32)
        state_b = tl.load(init + off_b, mask=s_mask, other=0.0).to(tl.float32)
    else:
        state_a = tl.zeros([BLOCK_P, BLOCK_HALF], dtype=tl.float32)
        state_b = tl.zeros([BLOCK_P, BLOCK_HALF], dtype=tl.float32)
    k_group = K + (h // heads_per_group) * d_state
    k_bias = K_BIAS + h * R * d_state
    for c in range(tl.cdiv(end - start, CHUNK)):
        out = STATES + ((first_chunk + c) * n_heads + h) * head_size
        tl.store(out + off_a, state_a.to(STATES.dtype.element_ty), mask=s_mask)
        tl.store(out + off_b, state_b.to(STATES.dtype.element_ty), mask=s_mask)
        tok_local, rank, tok, valid = chunk_rows(start + c * CHUNK, end, CHUNK, R)
        cos, sin = rotation(THETA, tok, valid, h, n_heads, n_angles, BLOCK_HALF)
        ka, kb = load_rotated(k_group, k_bias, tok, rank, valid, R * n_groups * d_state, n_groups * d_state,
                              d_state, dim_a, dim_b, half_mask, cos, sin, HAS_BIAS)
        v = load_rows(V, tok, rank, valid, h, v_st, v_sr, v_sh, p, p_mask)
        cs, cs_end, _, scale = row_scalars(ADT, SCALE, SCALE, tok, rank, valid, h, n_heads)
        vw = tl.trans(v * (tl.exp(cs_end - cs) * scale)[:, None])
        decay = tl.exp(cs_end)
        state_a = state_a * decay + mm(vw, ka, MM_DTYPE, PRECISION)
        state_b = state_b * decay + mm(vw, kb, MM_DTYPE, PRECISION)
    final = FINAL + (seq * n_heads + h).to(tl.int64) * head_size
    tl.store(final + off_a, state_a, mask=s_mask)
    tl.store(final + off_b, state_b, mask=s_mask)


@triton.jit
def _output_fwd_kernel(
    Q, K, Q_BIAS, K_BIAS, THETA, V, ADT, GAMMA, SCALE, D, STATES, Y, CU_SEQLENS, CHUNK_SEQ, CHUNK_START,
    v_st, v_sr, v_sh, y_st, y_sr, y_sh,
    n_heads, heads_per_group, n_groups, d_state, half_n, headdim, n_angles,
    R: tl.constexpr, CHUNK: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_P: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr,
    MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """y_a = Σ_b (q̄_a·k̄_b) M_ab v_b + e^{cs_a} S_c q̄_a + D v_a for the rows of one chunk and head."""
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
    v = load_rows(V, tok, rank, valid, h, v_st, v_sr, v_sh, p, p_mask)
    cs, cs_end, gamma, scale = row_scalars(ADT, GAMMA, SCALE, tok, rank, valid, h, n_heads)
    weights, _, _ = intra_weights(tok_local, cs, gamma, scale)
    scores = mm(qa, tl.trans(ka), MM_DTYPE, PRECISION) + mm(qb, tl.trans(kb), MM_DTYPE, PRECISION)
    y = mm(scores * weights, v, MM_DTYPE, PRECISION)
    off_a, off_b = state_offsets(p, dim_a, dim_b, d_state)
    s_mask = p_mask[:, None] & half_mask[None, :]
    state = STATES + (c.to(tl.int64) * n_heads + h) * headdim * d_state
    state_a = tl.load(state + off_a, mask=s_mask, other=0.0)
    state_b = tl.load(state + off_b, mask=s_mask, other=0.0)
    inter = mm(qa, tl.trans(state_a), MM_DTYPE, PRECISION) + mm(qb, tl.trans(state_b), MM_DTYPE, PRECISION)
    y += tl.exp(cs)[:, None] * inter
    if HAS_D:
        y += tl.load(D + h) * v
    tl.store(Y + tok[:, None] * y_st + rank[:, None] * y_sr + h * y_sh + p[None, :], y,
             mask=valid[:, None] & p_mask[None, :])


def scan_forward(spec: ScanSpec, q: Tensor, k: Tensor, q_bias: Tensor | None, k_bias: Tensor | None,
                 theta: Tensor, v: Tensor, adt: Tensor, gamma: Tensor, scale: Tensor, D: Tensor | None,
                 ssm0: Tensor | None, states_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Returns y (T, R, H, P) fp32, the states entering every chunk, and the final state (NS, H, P, N) fp32."""
    lay = spec.layout
    T, H, P, N, R = q.shape[0], spec.n_heads, spec.headdim, spec.d_state, spec.rank
    dev = q.device
    states = torch.empty(lay.n_chunks, H, P, N, device=dev, dtype=states_dtype)
    final = torch.empty(lay.n_seqs, H, P, N, device=dev, dtype=torch.float32)
    y = torch.empty(T, R, H, P, device=dev, dtype=torch.float32)
    common = dict(HAS_BIAS=k_bias is not None, **spec.constexprs())
    vs = (v.stride(0), v.stride(1), v.stride(2))
    if lay.n_seqs:
        bp = spec.block_p_sequential
        _state_fwd_kernel[(lay.n_seqs, H, triton.cdiv(P, bp))](
            k, k_bias if k_bias is not None else k, theta, v, adt, scale,
            ssm0 if ssm0 is not None else final, states, final, lay.cu_seqlens, lay.cu_chunks,
            *vs, *spec.dims(), BLOCK_P=bp, HAS_INIT=ssm0 is not None, **common)
    if lay.n_chunks:
        _output_fwd_kernel[(lay.n_chunks, H)](
            q, k, q_bias if q_bias is not None else q, k_bias if k_bias is not None else k, theta, v, adt, gamma,
            scale, D if D is not None else adt, states, y, lay.cu_seqlens, lay.chunk_seq, lay.chunk_start,
            *vs, y.stride(0), y.stride(1), y.stride(2), *spec.dims(),
            BLOCK_P=spec.block_p, HAS_D=D is not None, **common)
    return y, states, final
