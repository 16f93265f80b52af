"""Forward: the states entering every chunk (states.py), then every chunk's output in parallel
(intra-chunk attention-like product + the entering state)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.mamba3.triton.rows import (
    block_scores, chunk_of, chunk_scalars, intra_weights, joined, load_pairs, load_values, mm, rank_weights,
)
from hybridlm.kernels.mamba3.triton.spec import ScanSpec
from hybridlm.kernels.mamba3.triton.states import chunk_states


@triton.jit
def _output_block(Q, K, Q_BIAS, K_BIAS, THETA, state, at_chunk, k_row, tok0, end, h, n_heads, n_angles, d_state,
                  half_n, rows, valid, p, p_mask, i0, scores, inter, CHUNK: tl.constexpr, R: tl.constexpr,
                  BLOCK_PAIRS: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr,
                  MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ROTATE: tl.constexpr):
    """Pair block i0's share of q̄ k̄ᵀ and of q̄ S_cᵀ."""
    q2, _, scores = block_scores(Q, K, Q_BIAS, K_BIAS, THETA, at_chunk, k_row, tok0, end, h, n_heads, n_angles,
                                 d_state, half_n, rows, valid, i0, scores, CHUNK, R, BLOCK_PAIRS, INTERLEAVED,
                                 HAS_BIAS, MM_DTYPE, PRECISION, ROTATE)
    state_a, state_b = load_pairs(state, d_state, p, p_mask, i0, half_n, BLOCK_PAIRS, INTERLEAVED)
    inter += mm(q2, tl.trans(joined(state_a, state_b, BLOCK_PAIRS)), MM_DTYPE, PRECISION)
    return scores, inter


@triton.jit
def _output_fwd_kernel(
    Q, K, Q_BIAS, K_BIAS, THETA, V, RANKS, ADT, GAMMA, SCALE, D, STATES, Y, CU_SEQLENS, CHUNK_SEQ, CHUNK_START,
    v_row, v_head,
    n_heads, heads_per_group, n_groups, d_state, half_n, headdim, n_angles,
    R: tl.constexpr, CHUNK: tl.constexpr, BLOCK_PAIRS: tl.constexpr, BLOCK_P: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr,
    MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr, EXPAND: tl.constexpr,
):
    """y_a = Σ_b (q̄_a·k̄_b) M_ab v_b + e^{cs_a} S_c q̄_a + D v_a for the rows of one chunk and head."""
    c, h = tl.program_id(0), tl.program_id(1)
    tok0, end, rows, tok_local, valid, k_row, at_chunk, p, p_mask = chunk_of(
        CU_SEQLENS, CHUNK_SEQ, CHUNK_START, c, h, heads_per_group, n_groups, d_state, headdim, CHUNK, R, BLOCK_P)
    if end <= tok0:  # an empty slot of a packed layout (layout.py)
        return
    state = STATES + (c.to(tl.int64) * n_heads + h) * headdim * d_state
    scores = tl.zeros([CHUNK * R, CHUNK * R], dtype=tl.float32)
    inter = tl.zeros([CHUNK * R, BLOCK_P], dtype=tl.float32)
    # one loop, every block rotated (angle 0 past S); split in two as the backward's walks (the second without
    # angles), it compiled to more instructions here (two pipelined loops' prologues)
    for i0 in range(0, half_n, BLOCK_PAIRS):
        scores, inter = _output_block(Q, K, Q_BIAS, K_BIAS, THETA, state, at_chunk, k_row, tok0, end, h, n_heads,
                                      n_angles, d_state, half_n, rows, valid, p, p_mask, i0, scores, inter, CHUNK,
                                      R, BLOCK_PAIRS, INTERLEAVED, HAS_BIAS, MM_DTYPE, PRECISION, True)
    cs, cs_end, gamma, scale = chunk_scalars(ADT, GAMMA, SCALE, tok0, end, h, n_heads, CHUNK, R)
    weights, _, _ = intra_weights(tok_local, cs, gamma, scale)
    ranked = rank_weights(RANKS, h, rows, valid, p, p_mask, headdim, R) if EXPAND else 0.0
    v, _ = load_values(V, ranked, v_row, v_head, tok0, h, rows, valid, p, p_mask, R, EXPAND)
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
                 ssm0: Tensor | None, mimo_x: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Returns y (T, R, H, P) in v's dtype, the states entering every chunk (matmul dtype), and the
    final state (NS, H, P, N) fp32. ``mimo_x`` (H, R, P) fp32: v is x (T, 1, H, P), expanded to the R
    ranks where the kernels load it (the rank expansion fused)."""
    lay = spec.layout
    T, H, P, R = q.shape[0], spec.n_heads, spec.headdim, spec.rank
    dev = q.device
    y = torch.empty(T, R, H, P, device=dev, dtype=v.dtype)
    common = dict(HAS_BIAS=k_bias is not None, **spec.constexprs())
    vs = value_strides(v)
    states, final = chunk_states(spec, k, k_bias, theta, v, adt, scale, ssm0, True, vs, spec.matmul_dtype, mimo_x)
    if lay.n_chunks:
        _output_fwd_kernel[(lay.n_chunks, H)](
            q, k, q_bias if q_bias is not None else q, k_bias if k_bias is not None else k, theta, v,
            mimo_x if mimo_x is not None else adt, adt, gamma, scale, D if D is not None else adt, states, y,
            lay.cu_seqlens, lay.chunk_seq, lay.chunk_start,
            *vs, *spec.dims(), BLOCK_P=spec.block_p, HAS_D=D is not None, num_warps=spec.parallel_warps,
            EXPAND=mimo_x is not None, **common)
    return y, states, final
