"""The states between chunks. Per chunk, its own contribution (a P × N matrix product)

       forward:   ΔS_c = Σ_b e^{cs_end − cs_b} scale_b v_b k̄_bᵀ
       backward:  ΔG_c = Σ_a e^{cs_a} dy_a q̄_aᵀ

enters the recurrence over a sequence's chunks

       forward:   S_{c+1} = e^{cs_end} S_c + ΔS_c           (stores every S_c, returns the last)
       backward:  G_c = e^{cs_end} G_{c+1} + ΔG_c           (stores every G_{c+1}, returns G_0)

Both happen in one kernel: a program owns one block of rotation pairs of one head's state (all of
P) in fp32 registers and walks the chunks of its sequence, so the ΔS never go to memory (Mamba-2's
SSD writes them, then passes states in a second kernel).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.mamba3.triton.rows import (
    chunk_rotation, chunk_rows, chunk_scalars, halves, joined, load_biased, load_pairs, load_rotated, load_values,
    mm, rank_weights, store_pairs,
)
from hybridlm.kernels.mamba3.triton.spec import ScanSpec


@triton.jit
def _chunk_delta(X, X_BIAS, THETA, LEFT, left_weights, ADT, SCALE, tok0, end, h, left_row, left_head,
                 n_heads, heads_per_group, n_groups, d_state, half_n, headdim, n_angles, i0, p, p_mask,
                 R: tl.constexpr, CHUNK: tl.constexpr, BLOCK_PAIRS: tl.constexpr, BLOCK_P: tl.constexpr,
                 INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, FORWARD: tl.constexpr, ROTATE: tl.constexpr,
                 MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr, EXPAND: tl.constexpr):
    """One chunk's contribution ΔS (ΔG) to the program's state block, (BLOCK_P, 2·BLOCK_PAIRS) fp32, and its
    decay e^{cs_end}. A chunk with no valid row (tok0 = end) gives 0 and 1. ROTATE: whether the pair block
    is rotated (rows.rotated_end)."""
    rows, _, valid, k_row, at_chunk, _, _ = chunk_rows(
        tok0, end, h, heads_per_group, n_groups, d_state, headdim, CHUNK, R, BLOCK_P)
    if ROTATE:
        cos, sin = chunk_rotation(THETA, tok0, end, h, n_heads, n_angles, i0, CHUNK, R, BLOCK_PAIRS)
        xa, xb = load_rotated(X + at_chunk, k_row, X_BIAS + h * R * d_state, d_state, rows, valid, i0, half_n,
                              cos, sin, CHUNK, R, BLOCK_PAIRS, INTERLEAVED, HAS_BIAS)
    else:  # a block of unrotated pairs (rows.rotated_end): no angles
        xa, xb = load_biased(X + at_chunk, k_row, X_BIAS + h * R * d_state, d_state, rows, valid, i0, half_n,
                             CHUNK, R, BLOCK_PAIRS, INTERLEAVED, HAS_BIAS)
    left = tl.trans(load_values(LEFT, left_weights, left_row, left_head, tok0, h, rows, valid, p, p_mask, R,
                                EXPAND)[0])
    cs, cs_end, _, scale = chunk_scalars(ADT, SCALE, SCALE, tok0, end, h, n_heads, CHUNK, R)
    if FORWARD:
        w = (tl.exp(cs_end - cs) * scale)[:, None]
    else:
        w = tl.exp(cs)[:, None]
    return mm(left, joined(xa, xb, BLOCK_PAIRS) * w, MM_DTYPE, PRECISION), tl.exp(cs_end)


@triton.jit
def _walk(X, X_BIAS, THETA, LEFT, left_weights, ADT, SCALE, STATES, state2, first, n_chunks, seq_tok0, end, h, left_row,
          left_head, n_heads, heads_per_group, n_groups, d_state, half_n, headdim, n_angles, i0, p, p_mask,
          R: tl.constexpr, CHUNK: tl.constexpr, BLOCK_PAIRS: tl.constexpr, BLOCK_P: tl.constexpr,
          INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, FORWARD: tl.constexpr, ROTATE: tl.constexpr,
          MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr, EXPAND: tl.constexpr):
    """The walk over a sequence's chunks from ``state2``: stores the state entering each chunk, returns the
    last. ROTATE, the program's pair block's kind, is fixed for the walk, so the loop body has no branch
    and Triton's pipeliner prefetches every load of the next chunk (TTGIR: 6 asynchronous copies a trip
    forward; with the kind tested in every trip, k and the angles were loaded, and waited for, in the
    trip: 3). MIMO's states call took 987 → 756 µs with this, 2 stages and 128 registers (H200, B 8,
    L 2K, d_state 64; docs/benchmarks.md)."""
    for j in range(0, n_chunks):
        if FORWARD:
            local = j
        else:
            local = n_chunks - 1 - j
        c = first + local
        at_state = (c.to(tl.int64) * n_heads + h) * headdim * d_state
        state_a, state_b = halves(state2, BLOCK_PAIRS)
        store_pairs(STATES + at_state, d_state, p, p_mask, i0, half_n, state_a, state_b, BLOCK_PAIRS, INTERLEAVED)
        delta, decay = _chunk_delta(
            X, X_BIAS, THETA, LEFT, left_weights, ADT, SCALE, seq_tok0 + local * CHUNK, end, h, left_row, left_head,
            n_heads, heads_per_group, n_groups, d_state, half_n, headdim, n_angles, i0, p, p_mask,
            R, CHUNK, BLOCK_PAIRS, BLOCK_P, INTERLEAVED, HAS_BIAS, FORWARD, ROTATE, MM_DTYPE, PRECISION, EXPAND)
        state2 = decay * state2 + delta
    return state2


@triton.jit
def _states_kernel(
    X, X_BIAS, THETA, LEFT, LEFT_RANKS, ADT, SCALE, START, STATES, FINAL, CU_SEQLENS, CU_CHUNKS,
    left_row, left_head,
    n_heads, heads_per_group, n_groups, d_state, half_n, headdim, n_angles,
    R: tl.constexpr, CHUNK: tl.constexpr, BLOCK_PAIRS: tl.constexpr, BLOCK_P: tl.constexpr, SPLIT_P: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_START: tl.constexpr, FORWARD: tl.constexpr,
    MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr, EXPAND: tl.constexpr,
):
    """Steps 1 and 2 in one program per (sequence, head, pair block, block of P rows): the block of
    the state stays in registers while the program walks the sequence's chunks, adding each
    chunk's ΔS (ΔG walking backwards) as it goes; nothing but the per-chunk states is written."""
    seq, pid = tl.program_id(0), tl.program_id(2)
    h = tl.program_id(1) // SPLIT_P
    p0 = (tl.program_id(1) % SPLIT_P) * BLOCK_P
    i0 = pid * BLOCK_PAIRS
    first = tl.load(CU_CHUNKS + seq)
    n_chunks = tl.load(CU_CHUNKS + seq + 1) - first
    # a sequence's chunks start at its first token, CHUNK apart (the layouts' chunk_start): computed,
    # not loaded, so no address in the walk waits on a load made in the walk
    seq_tok0 = tl.load(CU_SEQLENS + seq)
    end = tl.load(CU_SEQLENS + seq + 1)
    p = p0 + tl.arange(0, BLOCK_P)
    p_mask = p < headdim
    at_seq = (seq.to(tl.int64) * n_heads + h) * headdim * d_state
    if HAS_START:
        state_a, state_b = load_pairs(START + at_seq, d_state, p, p_mask, i0, half_n, BLOCK_PAIRS, INTERLEAVED)
    else:
        state_a = tl.zeros([BLOCK_P, BLOCK_PAIRS], dtype=tl.float32)
        state_b = tl.zeros([BLOCK_P, BLOCK_PAIRS], dtype=tl.float32)
    state2 = joined(state_a, state_b, BLOCK_PAIRS)  # the block's a and b columns side by side: one product a chunk
    left_weights = 0.0
    if EXPAND:  # the rank weights of x, loaded once for the whole walk
        all_rows = tl.arange(0, CHUNK * R)
        left_weights = rank_weights(LEFT_RANKS, h, all_rows, all_rows >= 0, p, p_mask, headdim, R)
    if i0 < n_angles:
        state2 = _walk(X, X_BIAS, THETA, LEFT, left_weights, ADT, SCALE, STATES, state2, first, n_chunks, seq_tok0,
                       end, h, left_row, left_head, n_heads, heads_per_group, n_groups, d_state, half_n, headdim,
                       n_angles, i0, p, p_mask, R, CHUNK, BLOCK_PAIRS, BLOCK_P, INTERLEAVED, HAS_BIAS, FORWARD, True,
                       MM_DTYPE, PRECISION, EXPAND)
    else:  # a block of unrotated pairs (rows.rotated_end): no angles
        state2 = _walk(X, X_BIAS, THETA, LEFT, left_weights, ADT, SCALE, STATES, state2, first, n_chunks, seq_tok0,
                       end, h, left_row, left_head, n_heads, heads_per_group, n_groups, d_state, half_n, headdim,
                       n_angles, i0, p, p_mask, R, CHUNK, BLOCK_PAIRS, BLOCK_P, INTERLEAVED, HAS_BIAS, FORWARD, False,
                       MM_DTYPE, PRECISION, EXPAND)
    state_a, state_b = halves(state2, BLOCK_PAIRS)
    store_pairs(FINAL + at_seq, d_state, p, p_mask, i0, half_n, state_a, state_b, BLOCK_PAIRS, INTERLEAVED)


def chunk_states(spec: ScanSpec, x: Tensor, x_bias: Tensor | None, theta: Tensor, left: Tensor, adt: Tensor,
                 scale: Tensor, start: Tensor | None, forward: bool, left_strides: tuple[int, int],
                 states_dtype: torch.dtype, left_ranks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The state at every chunk boundary (n_chunks, H, P, N) in ``states_dtype`` — forward: the
    state entering each chunk (x = k, left = v); backward: the gradient of the state leaving each
    chunk (x = q, left = dy) — and, fp32 (NS, H, P, N), the state after a sequence's last chunk
    (forward) or the gradient of the one entering its first (backward). ``start`` is the initial
    state (forward) or the final state's gradient (backward). ``left_ranks`` (H, R, P) fp32: left is x
    (T, H, P), expanded to the R ranks as the rows load (rows.load_values)."""
    lay = spec.layout
    H, P, N = spec.n_heads, spec.headdim, spec.d_state
    states = torch.empty(lay.n_chunks, H, P, N, device=x.device, dtype=states_dtype)
    final = torch.empty(lay.n_seqs, H, P, N, device=x.device, dtype=torch.float32)
    if lay.n_seqs:
        # bf16/fp16: 2 stages and at most 128 registers (4 programs an SM; ptxas takes 128-150 without
        # the cap): MIMO's call 987 -> 756 µs, SISO's 186 -> 179 (H200, B 8, L 2K, d_state 64;
        # docs/benchmarks.md). fp32 products spill on 4 warps, so 8 warps and 1 stage.
        fp32 = spec.matmul_dtype == torch.float32
        warps, stages, maxnreg = (8, 1, None) if fp32 else (4, 2, 128)
        knobs = spec.knobs
        if knobs.triton_states_stages is not None:
            stages = knobs.triton_states_stages
        maxnreg = knobs.triton_states_maxnreg or maxnreg
        block_pairs = knobs.triton_states_block_pairs or spec.block_pairs
        split_p = min(knobs.triton_states_split_p, spec.block_p // 16)  # a dot's operand is ≥ 16 rows
        consts = spec.constexprs() | dict(BLOCK_PAIRS=block_pairs)
        _states_kernel[(lay.n_seqs, H * split_p, triton.cdiv(N // 2, block_pairs))](
            x, x_bias if x_bias is not None else x, theta, left, left_ranks if left_ranks is not None else adt,
            adt, scale, start if start is not None else final,
            states, final, lay.cu_seqlens, lay.cu_chunks, *left_strides,
            *spec.dims(), BLOCK_P=spec.block_p // split_p, SPLIT_P=split_p, HAS_BIAS=x_bias is not None,
            HAS_START=start is not None, FORWARD=forward, EXPAND=left_ranks is not None, num_warps=warps,
            num_stages=stages, **consts,
            **({"maxnreg": maxnreg} if maxnreg else {}))
    return states, final
