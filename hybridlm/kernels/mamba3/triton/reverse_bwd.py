"""Backward, second design ("reverse", KernelTuning.triton_backward): one program per (sequence,
head) walks the sequence's chunks from last to first with the state gradient G (P × N, fp32) in
registers.

Per chunk, with G the gradient of the state leaving it and S_c the forward's state entering it, the
program computes dv, dq̄, dk̄, dθ and the per-token scalars exactly as chunk_bwd.py does (same
formulas, its docstring), then steps G back over the chunk:

    G ← e^{cs_end} G + Σ_a e^{cs_a} dy_a q̄_aᵀ

so the reverse state pass and its per-chunk G buffer (n_chunks × H × P × N fp32, written once and
read once by the chunk-parallel design) are gone. d_state is walked once per chunk: the rotated q̄
and k̄ of the whole N are held, in the matmul dtype, as the a and b halves of the rotation pairs.
The reductions happen in the kernel: heads of a group share q and k, so dq and dk (T, R, G, N) are
fp32 atomic adds when a group has several heads (plain stores otherwise); the B/C bias gradients
and dD are summed over the sequence in registers and added once per program.

A chunk is ``ScanSpec.reverse_chunk`` tokens × R ranks in one tile (64 tokens by default, at most
128 rows with 16-bit products, as shared memory allows; so a bf16 MIMO R=4 chunk is 32 tokens × 4
ranks, two of the forward's 16-token chunks). It is a whole number of the forward's chunks: the
forward stores the state entering each of its chunks, and the walk reads every ``chunk_ratio``-th.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.mamba3.triton.chunk_fwd import value_strides
from hybridlm.kernels.mamba3.triton.interpreter_compat import interpreting
from hybridlm.kernels.mamba3.triton.rows import (
    add_pairs, chunk_rotation, chunk_scalars, intra_weights, load_pairs, load_rows, mm, opaque_zero, rotated_qk,
    rows_to_ranks, rows_to_tokens, rows_to_tokens_2d, store_pairs,
)
from hybridlm.kernels.mamba3.triton.spec import ScanSpec


@triton.jit
def store_or_add(X, row_stride, rows, valid, i0, half_n, a, b, BLOCK_PAIRS: tl.constexpr, INTERLEAVED: tl.constexpr,
                 ADD: tl.constexpr):
    """dq or dk of a pair block: added (fp32) when the heads of a group share it, else stored."""
    if ADD:
        add_pairs(X, row_stride, rows, valid, i0, half_n, a, b, BLOCK_PAIRS, INTERLEAVED)
    else:
        store_pairs(X, row_stride, rows, valid, i0, half_n, a, b, BLOCK_PAIRS, INTERLEAVED)


@triton.jit
def _reverse_bwd_kernel(
    Q, K, Q_BIAS, K_BIAS, THETA, V, DY, ADT, GAMMA, SCALE, D, STATES, DFINAL,
    DQ, DK, DQ_BIAS, DK_BIAS, DV, DTHETA, DADT, DGAMMA, DSCALE, DD, DSSM0, CU_SEQLENS, CU_CHUNKS,
    v_row, v_head, dy_row, dy_head, chunk_ratio,
    n_heads, heads_per_group, n_groups, d_state, half_n, headdim, n_angles,
    R: tl.constexpr, CHUNK: tl.constexpr, BLOCK_PAIRS: tl.constexpr, BLOCK_P: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_DFINAL: tl.constexpr,
    NEED_DSSM0: tl.constexpr, SUM_HEADS: tl.constexpr, MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    OPAQUE: tl.constexpr,
):
    """Every gradient of one (sequence, head); BLOCK_PAIRS covers all N/2 rotation pairs."""
    seq, h = tl.program_id(0), tl.program_id(1)
    start = tl.load(CU_SEQLENS + seq)
    end = tl.load(CU_SEQLENS + seq + 1)
    first_state = tl.load(CU_CHUNKS + seq)  # the forward's first chunk of this sequence
    n_chunks = tl.cdiv(end - start, CHUNK)
    p = tl.arange(0, BLOCK_P)
    p_mask = p < headdim
    rows = tl.arange(0, CHUNK * R)
    tok_local = rows // R
    t = tl.arange(0, CHUNK)
    j = tl.arange(0, BLOCK_PAIRS)
    k_row = n_groups * d_state  # q, k and dq, dk (T, R, G, N): a chunk's rows of head h's group
    group_col = (h // heads_per_group) * d_state
    state_size = headdim * d_state
    at_seq = (seq.to(tl.int64) * n_heads + h) * state_size
    if HAS_DFINAL:
        grad_a, grad_b = load_pairs(DFINAL + at_seq, d_state, p, p_mask, 0, half_n, BLOCK_PAIRS, INTERLEAVED)
    else:
        grad_a = tl.zeros([BLOCK_P, BLOCK_PAIRS], dtype=tl.float32)
        grad_b = tl.zeros([BLOCK_P, BLOCK_PAIRS], dtype=tl.float32)
    dq_bias_a = tl.zeros([R, BLOCK_PAIRS], dtype=tl.float32)
    dq_bias_b = tl.zeros([R, BLOCK_PAIRS], dtype=tl.float32)
    dk_bias_a = tl.zeros([R, BLOCK_PAIRS], dtype=tl.float32)
    dk_bias_b = tl.zeros([R, BLOCK_PAIRS], dtype=tl.float32)
    dskip = 0.0  # Σ dy·v over the sequence: its share of dD
    for back in range(n_chunks):
        c = n_chunks - 1 - back
        zero = opaque_zero(back, OPAQUE)  # keeps the index tiles below inside the loop
        p = tl.arange(0, BLOCK_P) + zero
        p_mask = p < headdim
        rows = tl.arange(0, CHUNK * R) + zero
        tok_local = rows // R
        t = tl.arange(0, CHUNK) + zero
        tok0 = start + c * CHUNK
        valid = tok_local < end - tok0
        t_valid = t < end - tok0
        at_chunk = tok0.to(tl.int64) * (R * k_row) + group_col
        at_token0 = tok0.to(tl.int64) * n_heads + h  # the chunk's first token at head h; token t is + t·H
        at_token = t * n_heads

        # q̄, k̄ over all of N, in the matmul dtype; the rotation's cos/sin are recomputed where
        # needed (keeping them live costs more registers than reloading the angles)
        qa, qb, ka, kb, _, _ = rotated_qk(Q, K, Q_BIAS, K_BIAS, THETA, at_chunk, k_row, tok0, end, h, n_heads,
                                          n_angles, d_state, half_n, rows, valid, 0, CHUNK, R, BLOCK_PAIRS,
                                          INTERLEAVED, HAS_BIAS)
        qa = qa.to(MM_DTYPE)
        qb = qb.to(MM_DTYPE)
        ka = ka.to(MM_DTYPE)
        kb = kb.to(MM_DTYPE)
        cs, cs_end, gamma, scale = chunk_scalars(ADT, GAMMA, SCALE, tok0, end, h, n_heads, CHUNK, R)
        v = load_rows(V + tok0.to(tl.int64) * (R * v_row) + h * v_head, v_row, rows, valid, p, p_mask)
        dy = load_rows(DY + tok0.to(tl.int64) * (R * dy_row) + h * dy_head, dy_row, rows, valid, p, p_mask)
        if HAS_D:
            dskip += tl.sum(tl.sum(dy.to(tl.float32) * v.to(tl.float32), 1), 0)
        growth = tl.exp(cs)[:, None]
        to_end = tl.exp(cs_end - cs)
        w = to_end * scale

        # 1. the intra-chunk product (as chunk_bwd.py): dv, dγ and the C×C tiles' share of d scale and
        #    d cs; afterwards only P ∘ M (dscores) stays live
        scores = mm(qa, tl.trans(ka), MM_DTYPE, PRECISION) + mm(qb, tl.trans(kb), MM_DTYPE, PRECISION)
        dprod = mm(dy, tl.trans(v), MM_DTYPE, PRECISION)  # dy_a · v_b
        weights, decay, same = intra_weights(tok_local, cs, gamma, scale)
        dweights = dprod * scores
        dscores = (dprod * weights).to(MM_DTYPE)
        ddecay = dweights * decay
        through_decay = ddecay * scale[None, :]
        dcs = tl.sum(through_decay, 1) - tl.sum(through_decay, 0)
        dscale = tl.sum(ddecay, 0)
        tl.store((DGAMMA + at_token0) + at_token,
                 rows_to_tokens(tl.sum(tl.where(same, dweights, 0.0), 1), CHUNK, R), mask=t_valid)
        k_grad = mm(ka, tl.trans(grad_a), MM_DTYPE, PRECISION) + mm(kb, tl.trans(grad_b), MM_DTYPE, PRECISION)
        dv = mm(tl.trans(scores * weights), dy, MM_DTYPE, PRECISION) + w[:, None] * k_grad  # k_grad: row b G k̄_b
        if HAS_D:
            dv += tl.load(D + h) * dy.to(tl.float32)
        dv_row = n_heads * headdim
        tl.store(DV + tok0.to(tl.int64) * (R * dv_row) + h * headdim + rows[:, None] * dv_row + p[None, :],
                 dv.to(DV.dtype.element_ty), mask=valid[:, None] & p_mask[None, :])
        dy = dy.to(MM_DTYPE)
        v = v.to(MM_DTYPE)

        # 2. dk̄ = (P ∘ M)ᵀ q̄ + w · v G, with G still the gradient leaving the chunk
        dka = mm(v, grad_a, MM_DTYPE, PRECISION)  # row b of v G
        dkb = mm(v, grad_b, MM_DTYPE, PRECISION)
        ratio = tl.sum(ka.to(tl.float32) * dka + kb.to(tl.float32) * dkb, 1)  # k̄_b·(Gᵀ v_b)
        dscores_t = tl.trans(dscores)
        dka = mm(dscores_t, qa, MM_DTYPE, PRECISION) + w[:, None] * dka
        dkb = mm(dscores_t, qb, MM_DTYPE, PRECISION) + w[:, None] * dkb
        dtheta = dkb * ka.to(tl.float32) - dka * kb.to(tl.float32)
        cos, sin = chunk_rotation(THETA, tok0, end, h, n_heads, n_angles, 0, CHUNK, R, BLOCK_PAIRS)
        dk_a = dka * cos + dkb * sin  # rotated back: the gradient of k + k_bias
        dk_b = dkb * cos - dka * sin
        store_or_add(DK + at_chunk, k_row, rows, valid, 0, half_n, dk_a, dk_b, BLOCK_PAIRS, INTERLEAVED, SUM_HEADS)
        if HAS_BIAS:  # invalid rows hold zeros
            dk_bias_a += rows_to_ranks(dk_a, CHUNK, R, BLOCK_PAIRS)
            dk_bias_b += rows_to_ranks(dk_b, CHUNK, R, BLOCK_PAIRS)

        # 3. ⟨S_c, G⟩, then G steps back over the chunk: the gradient of the state entering it
        state = STATES + ((first_state + c * chunk_ratio).to(tl.int64) * n_heads + h) * state_size
        state_a, state_b = load_pairs(state, d_state, p, p_mask, 0, half_n, BLOCK_PAIRS, INTERLEAVED)
        entering = tl.sum(tl.sum(state_a * grad_a + state_b * grad_b, 1), 0)
        left = tl.trans(dy)
        chunk_decay = tl.exp(cs_end)
        grad_a = chunk_decay * grad_a + mm(left, qa.to(tl.float32) * growth, MM_DTYPE, PRECISION)
        grad_b = chunk_decay * grad_b + mm(left, qb.to(tl.float32) * growth, MM_DTYPE, PRECISION)

        # 4. dq̄ = (P ∘ M) k̄ + e^{cs} dy S_c; the inter-chunk term also gives d cs_a = q̄_a · (its dq̄)
        dqa = mm(dy, state_a, MM_DTYPE, PRECISION) * growth
        dqb = mm(dy, state_b, MM_DTYPE, PRECISION) * growth
        dcs += tl.sum(qa.to(tl.float32) * dqa + qb.to(tl.float32) * dqb, 1)
        dqa += mm(dscores, ka, MM_DTYPE, PRECISION)
        dqb += mm(dscores, kb, MM_DTYPE, PRECISION)
        dtheta += dqb * qa.to(tl.float32) - dqa * qb.to(tl.float32)
        tl.store((DTHETA + at_token0 * n_angles) + (t[:, None] * (n_heads * n_angles) + j[None, :]),
                 rows_to_tokens_2d(dtheta, CHUNK, R, BLOCK_PAIRS), mask=t_valid[:, None] & (j < n_angles)[None, :])
        cos, sin = chunk_rotation(THETA, tok0, end, h, n_heads, n_angles, 0, CHUNK, R, BLOCK_PAIRS)
        dq_a = dqa * cos + dqb * sin
        dq_b = dqb * cos - dqa * sin
        store_or_add(DQ + at_chunk, k_row, rows, valid, 0, half_n, dq_a, dq_b, BLOCK_PAIRS, INTERLEAVED, SUM_HEADS)
        if HAS_BIAS:
            dq_bias_a += rows_to_ranks(dq_a, CHUNK, R, BLOCK_PAIRS)
            dq_bias_b += rows_to_ranks(dq_b, CHUNK, R, BLOCK_PAIRS)

        # 5. the per-token scalars' state terms: e^{cs_end − cs_b} ratio_b is the d scale_b of k̄_b's
        #    contribution to the state leaving the chunk
        ratio *= to_end
        tl.store((DSCALE + at_token0) + at_token, rows_to_tokens(dscale + ratio, CHUNK, R), mask=t_valid)
        state_term = ratio * scale
        dcs -= state_term
        dcs_end = tl.sum(state_term, 0) + chunk_decay * entering
        tl.store((DADT + at_token0) + at_token, tl.cumsum(rows_to_tokens(dcs, CHUNK, R), 0, reverse=True) + dcs_end,
                 mask=t_valid)

    if HAS_BIAS:
        ranks = tl.arange(0, R)
        bias_row = h * R * d_state
        add_pairs(DQ_BIAS + bias_row, d_state, ranks, ranks < R, 0, half_n, dq_bias_a, dq_bias_b, BLOCK_PAIRS,
                  INTERLEAVED)
        add_pairs(DK_BIAS + bias_row, d_state, ranks, ranks < R, 0, half_n, dk_bias_a, dk_bias_b, BLOCK_PAIRS,
                  INTERLEAVED)
    if HAS_D:
        tl.atomic_add(DD + h, dskip, sem="relaxed")
    if NEED_DSSM0:
        store_pairs(DSSM0 + at_seq, d_state, p, p_mask, 0, half_n, grad_a, grad_b, BLOCK_PAIRS, INTERLEAVED)


def reverse_backward(spec: ScanSpec, saved: dict, dy: Tensor, dfinal: Tensor | None, need_dssm0: bool) -> dict:
    """The gradients of the chunk scan (the dict of chunk_bwd.scan_backward) from one launch."""
    lay = spec.layout
    q, k, q_bias, k_bias = saved["q"], saved["k"], saved["q_bias"], saved["k_bias"]
    theta, v, adt, gamma, scale, D, states = (saved[n] for n in ("theta", "v", "adt", "gamma", "scale", "D", "states"))
    T, H, P, N, R, S, G = q.shape[0], spec.n_heads, spec.headdim, spec.d_state, spec.rank, spec.n_angles, spec.n_groups
    dev = q.device
    f32 = dict(device=dev, dtype=torch.float32)
    sum_heads = H != G  # several heads add into one group's dq, dk: fp32, from zero
    if sum_heads:
        dq, dk = torch.zeros(T, R, G, N, **f32), torch.zeros(T, R, G, N, **f32)
    else:
        dq, dk = torch.empty(T, R, G, N, device=dev, dtype=q.dtype), torch.empty(T, R, G, N, device=dev, dtype=k.dtype)
    has_bias = k_bias is not None
    dq_bias = torch.zeros(H, R, N, **f32) if has_bias else None
    dk_bias = torch.zeros(H, R, N, **f32) if has_bias else None
    dD = torch.zeros(H, **f32) if D is not None else None
    dssm0 = torch.empty(lay.n_seqs, H, P, N, **f32) if need_dssm0 else None
    dv = torch.empty(T, R, H, P, device=dev, dtype=v.dtype)
    dtheta = torch.empty(T, H, S, **f32)
    dadt, dgamma, dscale = (torch.empty(T, H, **f32) for _ in range(3))
    chunk = spec.reverse_chunk
    consts = spec.constexprs() | dict(CHUNK=chunk, BLOCK_PAIRS=max(16, triton.next_power_of_2(N // 2)))

    def given(t: Tensor | None) -> Tensor:  # a pointer the kernel does not read when its flag is off
        return t if t is not None else adt

    if lay.n_seqs:
        _reverse_bwd_kernel[(lay.n_seqs, H)](
            q, k, q_bias if has_bias else q, k_bias if has_bias else k, theta, v, dy, adt, gamma, scale, given(D),
            states, given(dfinal), dq, dk, given(dq_bias), given(dk_bias), dv, dtheta, dadt, dgamma, dscale,
            given(dD), given(dssm0), lay.cu_seqlens, lay.cu_chunks, *value_strides(v), dy.stride(1), dy.stride(2),
            chunk // lay.chunk, *spec.dims(), BLOCK_P=spec.block_p, HAS_BIAS=has_bias, HAS_D=D is not None,
            HAS_DFINAL=dfinal is not None, NEED_DSSM0=need_dssm0, SUM_HEADS=sum_heads, OPAQUE=not interpreting(),
            num_warps=spec.reverse_warps, num_stages=spec.backward_stages, **consts)
    return dict(dq=dq, dk=dk, dq_bias=dq_bias, dk_bias=dk_bias, dtheta=dtheta, dv=dv, dadt=dadt, dgamma=dgamma,
                dscale=dscale, dD=dD, dssm0=dssm0)
