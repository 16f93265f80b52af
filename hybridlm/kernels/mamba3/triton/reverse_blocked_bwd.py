"""Backward, third design ("reverse-blocked", KernelTuning.triton_backward): the reverse walk of
reverse_bwd.py with the register budget of chunk_bwd.py.

One program per (sequence, head) walks the sequence's chunks from last to first, as in
reverse_bwd.py, but d_state is walked in blocks of rotation pairs (twice per chunk, as in
chunk_bwd.py: the first walk builds q̄k̄ᵀ and G k̄, the second writes dq̄, dk̄, dθ), so no tile
spans all of N. The state gradient G therefore cannot stay in registers (a register tile cannot
be indexed by a runtime block); it stays in a per-(sequence, head) fp32 scratch that the program
alone reads and writes (P × N, in L2 while the program runs), double-buffered: chunk c reads G
leaving it from one buffer and, in its first walk, writes G entering it to the other; a barrier
between chunks makes the writes visible to every thread of the program. Compared with chunk-parallel, the reverse
state pass and its n_chunks × H × P × N buffer in HBM are gone; compared with reverse, q̄ and k̄
are recomputed in the second walk. Formulas: chunk_bwd.py. The group sums of dq, dk are atomic
adds (plain stores with one head per group); the bias gradients are added per chunk and pair
block; dD once per program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.mamba3.triton.chunk_fwd import value_strides
from hybridlm.kernels.mamba3.triton.interpreter_compat import interpreting
from hybridlm.kernels.mamba3.triton.reverse_bwd import store_or_add
from hybridlm.kernels.mamba3.triton.rows import (
    add_pairs, chunk_scalars, intra_weights, load_pairs, load_rows, mm, opaque_zero, rotated_qk, rows_to_ranks,
    rows_to_tokens, rows_to_tokens_2d, store_pairs,
)
from hybridlm.kernels.mamba3.triton.spec import ScanSpec


@triton.jit
def _reverse_blocked_bwd_kernel(
    Q, K, Q_BIAS, K_BIAS, THETA, V, DY, ADT, GAMMA, SCALE, D, STATES, GRADS, DSSM0,
    DQ, DK, DQ_BIAS, DK_BIAS, DV, DTHETA, DADT, DGAMMA, DSCALE, DD, CU_SEQLENS, CU_CHUNKS,
    v_row, v_head, dy_row, dy_head, chunk_ratio, grads_buffer,
    n_heads, heads_per_group, n_groups, d_state, half_n, headdim, n_angles,
    R: tl.constexpr, CHUNK: tl.constexpr, BLOCK_PAIRS: tl.constexpr, BLOCK_P: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, NEED_DSSM0: tl.constexpr,
    SUM_HEADS: tl.constexpr, MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    OPAQUE: tl.constexpr,
):
    """Every gradient of one (sequence, head). GRADS (2, NS, H, P, N) fp32: buffer 0 holds the
    final state's gradient (or zeros) on entry; ``grads_buffer`` is the offset of buffer 1."""
    seq, h = tl.program_id(0), tl.program_id(1)
    start = tl.load(CU_SEQLENS + seq)
    end = tl.load(CU_SEQLENS + seq + 1)
    first_state = tl.load(CU_CHUNKS + seq)
    n_chunks = tl.cdiv(end - start, CHUNK)
    p = tl.arange(0, BLOCK_P)
    p_mask = p < headdim
    rows = tl.arange(0, CHUNK * R)
    tok_local = rows // R
    t = tl.arange(0, CHUNK)
    j = tl.arange(0, BLOCK_PAIRS)
    ranks = tl.arange(0, R)
    k_row = n_groups * d_state
    group_col = (h // heads_per_group) * d_state
    state_size = headdim * d_state
    at_seq = (seq.to(tl.int64) * n_heads + h) * state_size
    dskip = 0.0
    for back in range(n_chunks):
        c = n_chunks - 1 - back
        zero = opaque_zero(back, OPAQUE)  # keeps the index tiles below inside the loop
        p = tl.arange(0, BLOCK_P) + zero
        p_mask = p < headdim
        rows = tl.arange(0, CHUNK * R) + zero
        tok_local = rows // R
        t = tl.arange(0, CHUNK) + zero
        grads_in = GRADS + (back % 2) * grads_buffer + at_seq  # G leaving the chunk
        grads_out = GRADS + ((back + 1) % 2) * grads_buffer + at_seq  # G entering it
        tok0 = start + c * CHUNK
        valid = tok_local < end - tok0
        t_valid = t < end - tok0
        at_chunk = tok0.to(tl.int64) * (R * k_row) + group_col
        at_token0 = tok0.to(tl.int64) * n_heads + h
        at_token = t * n_heads
        state = STATES + ((first_state + c * chunk_ratio).to(tl.int64) * n_heads + h) * state_size

        # walk 1: A = q̄ k̄ᵀ and G k̄ over all of N, and G stepped back over the chunk into the other
        # buffer (walk 2 still reads G leaving the chunk)
        cs, cs_end, gamma, scale = chunk_scalars(ADT, GAMMA, SCALE, tok0, end, h, n_heads, CHUNK, R)
        growth = tl.exp(cs)[:, None]
        chunk_decay = tl.exp(cs_end)
        dy = load_rows(DY + tok0.to(tl.int64) * (R * dy_row) + h * dy_head, dy_row, rows, valid, p, p_mask)
        left = tl.trans(dy).to(MM_DTYPE)
        scores = tl.zeros([CHUNK * R, CHUNK * R], dtype=tl.float32)
        k_grad = tl.zeros([CHUNK * R, BLOCK_P], dtype=tl.float32)
        for i0 in range(0, half_n, BLOCK_PAIRS):
            qa, qb, ka, kb, _, _ = rotated_qk(Q, K, Q_BIAS, K_BIAS, THETA, at_chunk, k_row, tok0, end, h, n_heads,
                                              n_angles, d_state, half_n, rows, valid, i0, CHUNK, R, BLOCK_PAIRS,
                                              INTERLEAVED, HAS_BIAS)
            scores += mm(qa, tl.trans(ka), MM_DTYPE, PRECISION) + mm(qb, tl.trans(kb), MM_DTYPE, PRECISION)
            grad_a, grad_b = load_pairs(grads_in, d_state, p, p_mask, i0, half_n, BLOCK_PAIRS, INTERLEAVED)
            k_grad += mm(ka, tl.trans(grad_a), MM_DTYPE, PRECISION) + mm(kb, tl.trans(grad_b), MM_DTYPE, PRECISION)
            store_pairs(grads_out, d_state, p, p_mask, i0, half_n,
                        chunk_decay * grad_a + mm(left, qa * growth, MM_DTYPE, PRECISION),
                        chunk_decay * grad_b + mm(left, qb * growth, MM_DTYPE, PRECISION), BLOCK_PAIRS, INTERLEAVED)

        # dv and the per-token scalars of the intra-chunk product
        v = load_rows(V + tok0.to(tl.int64) * (R * v_row) + h * v_head, v_row, rows, valid, p, p_mask)
        dprod = mm(dy, tl.trans(v), MM_DTYPE, PRECISION)
        weights, decay, same = intra_weights(tok_local, cs, gamma, scale)
        if HAS_D:
            dskip += tl.sum(tl.sum(dy.to(tl.float32) * v.to(tl.float32), 1), 0)
        dweights = dprod * scores
        dscores = (dprod * weights).to(MM_DTYPE)
        ddecay = dweights * decay
        through_decay = ddecay * scale[None, :]
        dcs = tl.sum(through_decay, 1) - tl.sum(through_decay, 0)
        dscale = tl.sum(ddecay, 0)
        tl.store((DGAMMA + at_token0) + at_token,
                 rows_to_tokens(tl.sum(tl.where(same, dweights, 0.0), 1), CHUNK, R), mask=t_valid)
        to_end = tl.exp(cs_end - cs)
        w = to_end * scale
        dv = mm(tl.trans(scores * weights), dy, MM_DTYPE, PRECISION) + w[:, None] * k_grad
        if HAS_D:
            dv += tl.load(D + h) * dy.to(tl.float32)
        dv_row = n_heads * headdim
        tl.store(DV + tok0.to(tl.int64) * (R * dv_row) + h * headdim + rows[:, None] * dv_row + p[None, :],
                 dv.to(DV.dtype.element_ty), mask=valid[:, None] & p_mask[None, :])

        # walk 2: dq̄, dk̄, dθ block by block
        w = w[:, None]
        dscores_t = tl.trans(dscores)
        dy = dy.to(MM_DTYPE)
        v = v.to(MM_DTYPE)
        entering = 0.0
        ratio = tl.zeros([CHUNK * R], dtype=tl.float32)
        for i0 in range(0, half_n, BLOCK_PAIRS):
            qa, qb, ka, kb, cos, sin = rotated_qk(Q, K, Q_BIAS, K_BIAS, THETA, at_chunk, k_row, tok0, end, h,
                                                  n_heads, n_angles, d_state, half_n, rows, valid, i0, CHUNK, R,
                                                  BLOCK_PAIRS, INTERLEAVED, HAS_BIAS)
            state_a, state_b = load_pairs(state, d_state, p, p_mask, i0, half_n, BLOCK_PAIRS, INTERLEAVED)
            grad_a, grad_b = load_pairs(grads_in, d_state, p, p_mask, i0, half_n, BLOCK_PAIRS, INTERLEAVED)
            entering += tl.sum(tl.sum(state_a * grad_a + state_b * grad_b, 1), 0)
            dqa = mm(dy, state_a, MM_DTYPE, PRECISION) * growth
            dqb = mm(dy, state_b, MM_DTYPE, PRECISION) * growth
            dcs += tl.sum(qa * dqa + qb * dqb, 1)
            dqa += mm(dscores, ka, MM_DTYPE, PRECISION)
            dqb += mm(dscores, kb, MM_DTYPE, PRECISION)
            dka = mm(v, grad_a, MM_DTYPE, PRECISION)
            dkb = mm(v, grad_b, MM_DTYPE, PRECISION)
            ratio += tl.sum(ka * dka + kb * dkb, 1)
            dka = mm(dscores_t, qa, MM_DTYPE, PRECISION) + w * dka
            dkb = mm(dscores_t, qb, MM_DTYPE, PRECISION) + w * dkb
            tl.store((DTHETA + (at_token0 * n_angles + i0)) + (t[:, None] * (n_heads * n_angles) + j[None, :]),
                     rows_to_tokens_2d(dqb * qa - dqa * qb + dkb * ka - dka * kb, CHUNK, R, BLOCK_PAIRS),
                     mask=t_valid[:, None] & (j < n_angles - i0)[None, :])
            dq_a = dqa * cos + dqb * sin  # rotated back
            dq_b = dqb * cos - dqa * sin
            dk_a = dka * cos + dkb * sin
            dk_b = dkb * cos - dka * sin
            store_or_add(DQ + at_chunk, k_row, rows, valid, i0, half_n, dq_a, dq_b, BLOCK_PAIRS, INTERLEAVED,
                         SUM_HEADS)
            store_or_add(DK + at_chunk, k_row, rows, valid, i0, half_n, dk_a, dk_b, BLOCK_PAIRS, INTERLEAVED,
                         SUM_HEADS)
            if HAS_BIAS:
                bias_row = h * R * d_state
                add_pairs(DQ_BIAS + bias_row, d_state, ranks, ranks < R, i0, half_n,
                          rows_to_ranks(dq_a, CHUNK, R, BLOCK_PAIRS), rows_to_ranks(dq_b, CHUNK, R, BLOCK_PAIRS),
                          BLOCK_PAIRS, INTERLEAVED)
                add_pairs(DK_BIAS + bias_row, d_state, ranks, ranks < R, i0, half_n,
                          rows_to_ranks(dk_a, CHUNK, R, BLOCK_PAIRS), rows_to_ranks(dk_b, CHUNK, R, BLOCK_PAIRS),
                          BLOCK_PAIRS, INTERLEAVED)
        ratio *= to_end
        tl.store((DSCALE + at_token0) + at_token, rows_to_tokens(dscale + ratio, CHUNK, R), mask=t_valid)
        state_term = ratio * scale
        dcs -= state_term
        dcs_end = tl.sum(state_term, 0) + chunk_decay * entering
        tl.store((DADT + at_token0) + at_token, tl.cumsum(rows_to_tokens(dcs, CHUNK, R), 0, reverse=True) + dcs_end,
                 mask=t_valid)
        tl.debug_barrier()  # the next chunk's threads read what this chunk's threads wrote

    if HAS_D:
        tl.atomic_add(DD + h, dskip, sem="relaxed")
    if NEED_DSSM0:  # G entering the sequence: in the buffer the last chunk wrote
        grads_first = GRADS + (n_chunks % 2) * grads_buffer + at_seq
        for i0 in range(0, half_n, BLOCK_PAIRS):
            grad_a, grad_b = load_pairs(grads_first, d_state, p, p_mask, i0, half_n, BLOCK_PAIRS, INTERLEAVED)
            store_pairs(DSSM0 + at_seq, d_state, p, p_mask, i0, half_n, grad_a, grad_b, BLOCK_PAIRS, INTERLEAVED)


def reverse_blocked_backward(spec: ScanSpec, saved: dict, dy: Tensor, dfinal: Tensor | None, need_dssm0: bool
                             ) -> dict:
    """The gradients of the chunk scan (the dict of chunk_bwd.scan_backward) from one launch."""
    lay = spec.layout
    q, k, q_bias, k_bias = saved["q"], saved["k"], saved["q_bias"], saved["k_bias"]
    theta, v, adt, gamma, scale, D, states = (saved[n] for n in ("theta", "v", "adt", "gamma", "scale", "D", "states"))
    T, H, P, N, R, S, G = q.shape[0], spec.n_heads, spec.headdim, spec.d_state, spec.rank, spec.n_angles, spec.n_groups
    NS = lay.n_seqs
    dev = q.device
    f32 = dict(device=dev, dtype=torch.float32)
    sum_heads = H != G
    if sum_heads:
        dq, dk = torch.zeros(T, R, G, N, **f32), torch.zeros(T, R, G, N, **f32)
    else:
        dq, dk = torch.empty(T, R, G, N, device=dev, dtype=q.dtype), torch.empty(T, R, G, N, device=dev, dtype=k.dtype)
    has_bias = k_bias is not None
    dq_bias = torch.zeros(H, R, N, **f32) if has_bias else None
    dk_bias = torch.zeros(H, R, N, **f32) if has_bias else None
    dD = torch.zeros(H, **f32) if D is not None else None
    dssm0 = torch.empty(NS, H, P, N, **f32) if need_dssm0 else None
    grads = torch.empty(2, NS, H, P, N, **f32)  # the state gradient, double-buffered
    if dfinal is not None:
        grads[0].copy_(dfinal)
    else:
        grads[0].zero_()
    dv = torch.empty(T, R, H, P, device=dev, dtype=v.dtype)
    dtheta = torch.empty(T, H, S, **f32)
    dadt, dgamma, dscale = (torch.empty(T, H, **f32) for _ in range(3))
    chunk = spec.reverse_chunk
    consts = spec.constexprs() | dict(CHUNK=chunk)

    def given(t: Tensor | None) -> Tensor:
        return t if t is not None else adt

    if NS:
        _reverse_blocked_bwd_kernel[(NS, H)](
            q, k, q_bias if has_bias else q, k_bias if has_bias else k, theta, v, dy, adt, gamma, scale, given(D),
            states, grads, given(dssm0), dq, dk, given(dq_bias), given(dk_bias), dv, dtheta, dadt, dgamma, dscale,
            given(dD), lay.cu_seqlens, lay.cu_chunks, *value_strides(v), dy.stride(1), dy.stride(2),
            chunk // lay.chunk, NS * H * P * N, *spec.dims(), BLOCK_P=spec.block_p, HAS_BIAS=has_bias,
            HAS_D=D is not None, NEED_DSSM0=need_dssm0, SUM_HEADS=sum_heads, OPAQUE=not interpreting(),
            num_warps=spec.reverse_warps, num_stages=spec.backward_stages, **consts)
    return dict(dq=dq, dk=dk, dq_bias=dq_bias, dk_bias=dk_bias, dtheta=dtheta, dv=dv, dadt=dadt, dgamma=dgamma,
                dscale=dscale, dD=dD, dssm0=dssm0)
