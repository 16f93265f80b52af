"""Forward chunk kernels: the states entering every chunk (sequential over a sequence's chunks),
then every chunk's output in parallel (intra-chunk attention-like product + the entering state)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.triton.rows import (
    chunk_rotation, chunk_scalars, intra_weights, load_pairs, load_rotated, load_rows, mm, store_pairs,
)
from hybridlm.kernels.triton.spec import ScanSpec


@triton.jit
def _state_fwd_kernel(
    K, K_BIAS, THETA, V, ADT, SCALE, SSM0, STATES, FINAL, CU_SEQLENS, CU_CHUNKS,
    v_row, v_head,
    n_heads, heads_per_group, n_groups, d_state, half_n, headdim, n_angles,
    R: tl.constexpr, CHUNK: tl.constexpr, BLOCK_PAIRS: tl.constexpr, BLOCK_P: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
    MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """S_{c+1} = e^{cs_end} S_c + Σ_b e^{cs_end − cs_b} scale_b v_b k̄_bᵀ; stores every S_c.
    One program owns a (P block) × (pair block) tile of one head's state."""
    seq, h, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_p_blocks = tl.cdiv(headdim, BLOCK_P)
    pid_p, pid_pairs = pid % n_p_blocks, pid // n_p_blocks
    start = tl.load(CU_SEQLENS + seq)
    end = tl.load(CU_SEQLENS + seq + 1)
    first_chunk = tl.load(CU_CHUNKS + seq).to(tl.int64)
    i0 = pid_pairs * BLOCK_PAIRS

    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < headdim
    head_size = headdim * d_state
    if HAS_INIT:
        init = SSM0 + (seq * n_heads + h).to(tl.int64) * head_size
        state_a, state_b = load_pairs(init, d_state, p, p_mask, i0, half_n, BLOCK_PAIRS, INTERLEAVED)
    else:
        state_a = tl.zeros([BLOCK_P, BLOCK_PAIRS], dtype=tl.float32)
        state_b = tl.zeros([BLOCK_P, BLOCK_PAIRS], dtype=tl.float32)
    rows = tl.arange(0, CHUNK * R)
    tok_local = rows // R
    k_row = n_groups * d_state
    k_group = K + (h // heads_per_group) * d_state
    k_bias = K_BIAS + h * R * d_state
    for c in range(tl.cdiv(end - start, CHUNK)):
        tok0 = start + c * CHUNK
        out = STATES + ((first_chunk + c) * n_heads + h) * head_size
        store_pairs(out, d_state, p, p_mask, i0, half_n, state_a, state_b, BLOCK_PAIRS, INTERLEAVED)
        valid = tok0 + tok_local < end
        cos, sin = chunk_rotation(THETA, tok0, end, h, n_heads, n_angles, i0 + tl.arange(0, BLOCK_PAIRS), CHUNK, R, BLOCK_PAIRS)
        ka, kb = load_rotated(k_group + tok0.to(tl.int64) * (R * k_row), k_row, k_bias, d_state, rows, valid, i0, half_n, cos, sin, CHUNK, R, BLOCK_PAIRS, INTERLEAVED, HAS_BIAS)
        v = load_rows(V + tok0.to(tl.int64) * (R * v_row) + h * v_head, v_row, rows, valid, p, p_mask)
        cs, cs_end, _, scale = chunk_scalars(ADT, SCALE, SCALE, tok0, end, h, n_heads, CHUNK, R)
        to_end = (tl.exp(cs_end - cs) * scale)[:, None]
        vt = tl.trans(v)
        decay = tl.exp(cs_end)
        state_a = state_a * decay + mm(vt, ka * to_end, MM_DTYPE, PRECISION)
        state_b = state_b * decay + mm(vt, kb * to_end, MM_DTYPE, PRECISION)
    final = FINAL + (seq * n_heads + h).to(tl.int64) * head_size
    store_pairs(final, d_state, p, p_mask, i0, half_n, state_a, state_b, BLOCK_PAIRS, INTERLEAVED)


@triton.jit
def _output_fwd_kernel(
    Q, K, Q_BIAS, K_BIAS, THETA, V, ADT, GAMMA, SCALE, D, STATES, Y, CU_SEQLENS, CHUNK_SEQ, CHUNK_START,
    v_row, v_head,
    n_heads, heads_per_group, n_groups, d_state, half_n, headdim, n_angles,
    R: tl.constexpr, CHUNK: tl.constexpr, BLOCK_PAIRS: tl.constexpr, BLOCK_P: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr,
    MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """y_a = Σ_b (q̄_a·k̄_b) M_ab v_b + e^{cs_a} S_c q̄_a + D v_a for the rows of one chunk and head."""
    c, h = tl.program_id(0), tl.program_id(1)
    end = tl.load(CU_SEQLENS + tl.load(CHUNK_SEQ + c) + 1)
    tok0 = tl.load(CHUNK_START + c)
    rows = tl.arange(0, CHUNK * R)
    tok_local = rows // R
    valid = tok0 + tok_local < end
    k_row = n_groups * d_state
    at_chunk = tok0.to(tl.int64) * (R * k_row) + (h // heads_per_group) * d_state
    p = tl.arange(0, BLOCK_P)
    p_mask = p < headdim
    state = STATES + (c.to(tl.int64) * n_heads + h) * headdim * d_state
    scores = tl.zeros([CHUNK * R, CHUNK * R], dtype=tl.float32)
    inter = tl.zeros([CHUNK * R, BLOCK_P], dtype=tl.float32)
    for i0 in range(0, half_n, BLOCK_PAIRS):
        
        cos, sin = chunk_rotation(THETA, tok0, end, h, n_heads, n_angles, i0 + tl.arange(0, BLOCK_PAIRS), CHUNK, R, BLOCK_PAIRS)
        qa, qb = load_rotated(Q + at_chunk, k_row, Q_BIAS + h * R * d_state, d_state, rows, valid, i0, half_n, cos, sin, CHUNK, R, BLOCK_PAIRS, INTERLEAVED, HAS_BIAS)
        ka, kb = load_rotated(K + at_chunk, k_row, K_BIAS + h * R * d_state, d_state, rows, valid, i0, half_n, cos, sin, CHUNK, R, BLOCK_PAIRS, INTERLEAVED, HAS_BIAS)
        scores += mm(qa, tl.trans(ka), MM_DTYPE, PRECISION) + mm(qb, tl.trans(kb), MM_DTYPE, PRECISION)
        state_a, state_b = load_pairs(state, d_state, p, p_mask, i0, half_n, BLOCK_PAIRS, INTERLEAVED)
        inter += mm(qa, tl.trans(state_a), MM_DTYPE, PRECISION) + mm(qb, tl.trans(state_b), MM_DTYPE, PRECISION)
    cs, cs_end, gamma, scale = chunk_scalars(ADT, GAMMA, SCALE, tok0, end, h, n_heads, CHUNK, R)
    weights, _, _ = intra_weights(tok_local, cs, gamma, scale)
    v = load_rows(V + tok0.to(tl.int64) * (R * v_row) + h * v_head, v_row, rows, valid, p, p_mask)
    y = mm(scores * weights, v, MM_DTYPE, PRECISION) + tl.exp(cs)[:, None] * inter
    if HAS_D:
        y += tl.load(D + h) * v.to(tl.float32)
    y_row = n_heads * headdim
    tl.store(Y + tok0.to(tl.int64) * (R * y_row) + h * headdim + rows[:, None] * y_row + p[None, :],
             y.to(Y.dtype.element_ty), mask=valid[:, None] & p_mask[None, :])


def value_strides(v: Tensor) -> tuple[int, int]:
    """(row stride, head stride) of v (T, R, H, P): rows must be evenly strided."""
    R = v.shape[1]
    row = v.stride(0) if R == 1 else v.stride(1)
    assert R == 1 or v.stride(0) == R * v.stride(1), "v rows must be evenly strided"
    assert v.stride(-1) == 1
    return row, v.stride(2)


def scan_forward(spec: ScanSpec, q: Tensor, k: Tensor, q_bias: Tensor | None, k_bias: Tensor | None,
                 theta: Tensor, v: Tensor, adt: Tensor, gamma: Tensor, scale: Tensor, D: Tensor | None,
                 ssm0: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Returns y (T, R, H, P) in v's dtype, the states entering every chunk (matmul dtype), and the
    final state (NS, H, P, N) fp32."""
    lay = spec.layout
    T, H, P, N, R = q.shape[0], spec.n_heads, spec.headdim, spec.d_state, spec.rank
    dev = q.device
    states = torch.empty(lay.n_chunks, H, P, N, device=dev, dtype=spec.matmul_dtype)
    final = torch.empty(lay.n_seqs, H, P, N, device=dev, dtype=torch.float32)
    y = torch.empty(T, R, H, P, device=dev, dtype=v.dtype)
    common = dict(HAS_BIAS=k_bias is not None, **spec.constexprs())
    vs = value_strides(v)
    if lay.n_seqs:
        bp = spec.block_p_sequential
        tiles = triton.cdiv(P, bp) * triton.cdiv(N // 2, spec.block_pairs)
        _state_fwd_kernel[(lay.n_seqs, H, tiles)](
            k, k_bias if k_bias is not None else k, theta, v, adt, scale,
            ssm0 if ssm0 is not None else final, states, final, lay.cu_seqlens, lay.cu_chunks,
            *vs, *spec.dims(), BLOCK_P=bp, HAS_INIT=ssm0 is not None, num_warps=8, **common)
    if lay.n_chunks:
        _output_fwd_kernel[(lay.n_chunks, H)](
            q, k, q_bias if q_bias is not None else q, k_bias if k_bias is not None else k, theta, v, adt, gamma,
            scale, D if D is not None else adt, states, y, lay.cu_seqlens, lay.chunk_seq, lay.chunk_start,
            *vs, *spec.dims(), BLOCK_P=spec.block_p, HAS_D=D is not None, num_warps=spec.parallel_warps, **common)
    return y, states, final
