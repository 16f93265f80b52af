"""Backward, third design (``KernelTuning.triton_backward_kernels = 3``): a reverse walk with the state
gradient resident, and the rotation back in a kernel of its own.

1. ``_reverse_dqkv_kernel``, one program per (sequence, head), walks the sequence's chunks from last to
   first with G, the gradient of the state leaving the chunk (P × N, fp32), in registers:

       dv  = (A ∘ M)ᵀ dy + w ⊙ k̄ Gᵀ (+ D dy)        dq̄ = (P ∘ M) k̄ + e^{cs} ⊙ dy S_c
       dk̄  = (P ∘ M)ᵀ q̄ + w ⊙ v G                   G ← e^{cs_end} G + (e^{cs} ⊙ dy)ᵀ q̄

   with the per-token scalars (dγ, d scale, dA·Δ, dD) as chunk_bwd.py computes them (its helpers, its
   formulas). Every product runs over the whole of N at once (q̄, k̄, S_c and G as their a and b halves
   side by side), so d_state is read once a chunk, and there is no reverse states pass and no per-chunk G
   buffer (n_chunks × H × P × N fp32, written and read by the chunk-parallel designs). dq̄ and dk̄ are
   stored per head **in the rotated frame**: no cos/sin, dθ or rotation back here, which is what made the
   first reverse design (removed, docs/benchmarks.md) spill 976 B a thread.
2. ``_rotate_back_kernel``, one program per (block of tokens, head), touches only the pair blocks that
   hold rotated pairs: dθ from q̄, k̄ and dq̄, dk̄, then dq̄, dk̄ rotated back in place.
3. head_sums.py sums the heads of a group and the bias gradients, as for the other designs.

The official module splits its backward so too (its ``dqkv`` kernel walks a (sequence, head) in reverse, its
``rotary_bias_angles`` kernel rotates back), but its walk gets q̄ and k̃ ready-made and keeps scale and γ out of
it: design 4 (walk_bwd.py) follows it that far. Here q̄ and k̄ are recomputed from q, k and the angles in the
walk: no extra memory. The grid is B·H programs (512 at B 8 and 64 heads), against n_chunks·H for the
chunk-parallel designs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.mamba3.triton.chunk_bwd import _intra_terms, _state_terms, _store_dv, _store_head_pairs
from hybridlm.kernels.mamba3.triton.chunk_fwd import value_strides
from hybridlm.kernels.mamba3.triton.head_sums import head_sums
from hybridlm.kernels.mamba3.triton.rows import (
    chunk_rows, halves, joined, load_pairs, mm, rotated_qk, rows_to_tokens, rows_to_tokens_2d, store_pairs,
)
from hybridlm.kernels.mamba3.triton.spec import ScanSpec


@triton.jit
def _reverse_dqkv_kernel(
    Q, K, Q_BIAS, K_BIAS, THETA, V, RANKS, DY, ADT, GAMMA, SCALE, D, STATES, DFINAL,
    DQ, DK, DV, DRANKS, DADT, DGAMMA, DSCALE, DD, DSSM0, CU_SEQLENS, CU_CHUNKS,
    v_row, v_head, dy_row, dy_head,
    n_heads, heads_per_group, n_groups, d_state, half_n, headdim, n_angles,
    R: tl.constexpr, CHUNK: tl.constexpr, ALL_PAIRS: tl.constexpr, BLOCK_P: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_DFINAL: tl.constexpr,
    NEED_DSSM0: tl.constexpr, MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr, EXPAND: tl.constexpr,
):
    """dv (or, EXPAND, dx and the chunks' shares of d mimo_x), dq̄ and dk̄ of the head in the rotated frame,
    dγ, d scale, dA·Δ, the chunks' shares of dD and the gradient of the sequence's initial state."""
    seq, h = tl.program_id(0), tl.program_id(1)
    first = tl.load(CU_CHUNKS + seq)
    n_chunks = tl.load(CU_CHUNKS + seq + 1) - first
    seq_tok0 = tl.load(CU_SEQLENS + seq)  # the chunks start here, CHUNK apart (layout.py)
    end = tl.load(CU_SEQLENS + seq + 1)
    p = tl.arange(0, BLOCK_P)
    p_mask = p < headdim
    t = tl.arange(0, CHUNK)
    state_size = headdim * d_state
    at_seq = (seq.to(tl.int64) * n_heads + h) * state_size
    if HAS_DFINAL:
        grad_a, grad_b = load_pairs(DFINAL + at_seq, d_state, p, p_mask, 0, half_n, ALL_PAIRS, INTERLEAVED)
    else:
        grad_a = tl.zeros([BLOCK_P, ALL_PAIRS], dtype=tl.float32)
        grad_b = tl.zeros([BLOCK_P, ALL_PAIRS], dtype=tl.float32)
    grad2 = joined(grad_a, grad_b, ALL_PAIRS)  # G, the a and b columns side by side as q̄ and k̄ are
    for back in range(n_chunks):
        local = n_chunks - 1 - back
        c = first + local
        tok0 = seq_tok0 + local * CHUNK
        rows, tok_local, valid, k_row, at_chunk, _, _ = chunk_rows(
            tok0, end, h, heads_per_group, n_groups, d_state, headdim, CHUNK, R, BLOCK_P)
        t_valid = t < end - tok0
        at_token0 = tok0.to(tl.int64) * n_heads + h  # the chunk's first token at head h; token t is + t·H
        at_token = t * n_heads

        qa, qb, ka, kb, _, _ = rotated_qk(Q, K, Q_BIAS, K_BIAS, THETA, at_chunk, k_row, tok0, end, h, n_heads,
                                          n_angles, d_state, half_n, rows, valid, 0, CHUNK, R, ALL_PAIRS,
                                          INTERLEAVED, HAS_BIAS, True)
        q2 = joined(qa, qb, ALL_PAIRS).to(MM_DTYPE)
        k2 = joined(ka, kb, ALL_PAIRS).to(MM_DTYPE)
        scores = mm(q2, tl.trans(k2), MM_DTYPE, PRECISION)
        cs, cs_end, scale, v, dy, weights, dscores, dcs, dscale, to_end, w = _intra_terms(
            ADT, GAMMA, SCALE, V, RANKS, DY, DGAMMA, DD, h, n_heads, headdim, v_row, v_head, dy_row, dy_head, tok0,
            end, rows, valid, tok_local, t_valid, at_token0, at_token, p, p_mask, scores, CHUNK, R, HAS_D, MM_DTYPE,
            PRECISION, EXPAND)
        k_grad = mm(k2, tl.trans(grad2), MM_DTYPE, PRECISION)  # row b: G k̄_b
        ratio = tl.sum(v.to(tl.float32) * k_grad, 1)  # v_b·(G k̄_b) = k̄_b·(Gᵀ v_b), for d scale_b
        _store_dv(DV, D, V, RANKS, DRANKS, c, h, n_heads, headdim, v_row, v_head, tok0, rows, valid, t, t_valid, p,
                  p_mask, scores, weights, dy, k_grad, w, CHUNK, R, HAS_D, MM_DTYPE, PRECISION, EXPAND)
        dy = dy.to(MM_DTYPE)
        growth = tl.exp(cs)[:, None]

        # dq̄; its inter-chunk term also gives d cs_a = q̄_a · (its dq̄)
        state_a, state_b = load_pairs(STATES + (c.to(tl.int64) * n_heads + h) * state_size, d_state, p, p_mask, 0,
                                      half_n, ALL_PAIRS, INTERLEAVED)
        state2 = joined(state_a, state_b, ALL_PAIRS)
        dq2 = mm(dy, state2, MM_DTYPE, PRECISION) * growth
        dcs += tl.sum(q2.to(tl.float32) * dq2, 1)
        dq2 += mm(dscores, k2, MM_DTYPE, PRECISION)
        dqa, dqb = halves(dq2, ALL_PAIRS)
        _store_head_pairs(DQ, tok0, h, n_heads, d_state, rows, valid, 0, half_n, dqa, dqb, R, ALL_PAIRS,
                          INTERLEAVED)

        # dk̄ = (P ∘ M)ᵀ q̄ + w · v G
        dk2 = mm(tl.trans(dscores), q2, MM_DTYPE, PRECISION) + w[:, None] * mm(v.to(MM_DTYPE), grad2, MM_DTYPE,
                                                                                PRECISION)
        dka, dkb = halves(dk2, ALL_PAIRS)
        _store_head_pairs(DK, tok0, h, n_heads, d_state, rows, valid, 0, half_n, dka, dkb, R, ALL_PAIRS,
                          INTERLEAVED)

        entering = tl.sum(tl.sum(state2 * grad2, 1), 0)  # ⟨S_c, G⟩
        ratio, state_term, dcs_end = _state_terms(ratio, entering, to_end, scale, cs_end)
        tl.store((DSCALE + at_token0) + at_token, rows_to_tokens(dscale + ratio, CHUNK, R), mask=t_valid)
        tl.store((DADT + at_token0) + at_token,
                 tl.cumsum(rows_to_tokens(dcs - state_term, CHUNK, R), 0, reverse=True) + dcs_end, mask=t_valid)
        # G steps back over the chunk: the gradient of the state entering it
        grad2 = tl.exp(cs_end) * grad2 + mm(tl.trans(dy), q2.to(tl.float32) * growth, MM_DTYPE, PRECISION)
    if NEED_DSSM0:
        grad_a, grad_b = halves(grad2, ALL_PAIRS)
        store_pairs(DSSM0 + at_seq, d_state, p, p_mask, 0, half_n, grad_a, grad_b, ALL_PAIRS, INTERLEAVED)


@triton.jit
def _rotate_back_kernel(
    Q, K, Q_BIAS, K_BIAS, THETA, DQ, DK, DTHETA, n_tokens,
    n_heads, heads_per_group, n_groups, d_state, half_n, headdim, n_angles,
    R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_PAIRS: tl.constexpr, INTERLEAVED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Program (block of BLOCK_T tokens, head h): over the pair blocks that hold rotated pairs, dθ from both
    sides and dq̄, dk̄ (T, R, H, N) rotated back in place; the other pairs' gradients need nothing."""
    tok0, h = tl.program_id(0) * BLOCK_T, tl.program_id(1)
    rows, _, valid, k_row, at_chunk, _, _ = chunk_rows(
        tok0, n_tokens, h, heads_per_group, n_groups, d_state, headdim, BLOCK_T, R, 16)
    t = tl.arange(0, BLOCK_T)
    t_valid = t < n_tokens - tok0
    j = tl.arange(0, BLOCK_PAIRS)
    at_token0 = tok0.to(tl.int64) * n_heads + h
    head_row = n_heads * d_state
    at_head = tok0.to(tl.int64) * (R * head_row) + h * d_state
    for i0 in range(0, n_angles, BLOCK_PAIRS):
        qa, qb, ka, kb, cos, sin = rotated_qk(Q, K, Q_BIAS, K_BIAS, THETA, at_chunk, k_row, tok0, n_tokens, h,
                                              n_heads, n_angles, d_state, half_n, rows, valid, i0, BLOCK_T, R,
                                              BLOCK_PAIRS, INTERLEAVED, HAS_BIAS, True)
        dqa, dqb = load_pairs(DQ + at_head, head_row, rows, valid, i0, half_n, BLOCK_PAIRS, INTERLEAVED)
        dka, dkb = load_pairs(DK + at_head, head_row, rows, valid, i0, half_n, BLOCK_PAIRS, INTERLEAVED)
        tl.store((DTHETA + (at_token0 * n_angles + i0)) + (t[:, None] * (n_heads * n_angles) + j[None, :]),
                 rows_to_tokens_2d(dqb * qa - dqa * qb + dkb * ka - dka * kb, BLOCK_T, R, BLOCK_PAIRS),
                 mask=t_valid[:, None] & (j < n_angles - i0)[None, :])
        store_pairs(DQ + at_head, head_row, rows, valid, i0, half_n, dqa * cos + dqb * sin, dqb * cos - dqa * sin,
                    BLOCK_PAIRS, INTERLEAVED)
        store_pairs(DK + at_head, head_row, rows, valid, i0, half_n, dka * cos + dkb * sin, dkb * cos - dka * sin,
                    BLOCK_PAIRS, INTERLEAVED)


def reverse_backward(spec: ScanSpec, saved: dict, dy: Tensor, dfinal: Tensor | None, need_dssm0: bool) -> dict:
    """The gradients of the chunk scan, the dict of chunk_bwd.scan_backward, by the reverse walk: three
    launches (the walk, the rotation back, the group and bias sums)."""
    lay = spec.layout
    q, k, q_bias, k_bias = saved["q"], saved["k"], saved["q_bias"], saved["k_bias"]
    theta, v, adt, gamma, scale, D, states = (saved[n] for n in ("theta", "v", "adt", "gamma", "scale", "D", "states"))
    mimo_x = saved.get("mimo_x")
    T, H, P, N, R, S = q.shape[0], spec.n_heads, spec.headdim, spec.d_state, spec.rank, spec.n_angles
    dev = q.device
    f32 = dict(device=dev, dtype=torch.float32)
    dq_heads = torch.empty(T, R, H, N, device=dev, dtype=q.dtype)  # dq̄, dk̄ per head; rotated back in place
    dk_heads = torch.empty(T, R, H, N, device=dev, dtype=q.dtype)
    dv = torch.empty(v.shape, device=dev, dtype=v.dtype)
    d_ranks = torch.zeros(lay.n_chunks, H, R, P, **f32) if mimo_x is not None else None
    dtheta = torch.empty(T, H, S, **f32)
    dadt, dgamma, dscale = (torch.empty(T, H, **f32) for _ in range(3))
    dD = torch.zeros(H, **f32) if D is not None else None
    dssm0 = torch.empty(lay.n_seqs, H, P, N, **f32) if need_dssm0 else None
    has_bias = k_bias is not None

    def given(x: Tensor | None) -> Tensor:  # a pointer the kernel does not read when its flag is off
        return x if x is not None else adt

    qb, kb = (q_bias, k_bias) if has_bias else (q, k)
    consts = spec.constexprs()
    if lay.n_seqs:
        _reverse_dqkv_kernel[(lay.n_seqs, H)](
            q, k, qb, kb, theta, v, given(mimo_x), dy, adt, gamma, scale, given(D), states, given(dfinal),
            dq_heads, dk_heads, dv, given(d_ranks), dadt, dgamma, dscale, given(dD), given(dssm0), lay.cu_seqlens,
            lay.cu_chunks, *value_strides(v), dy.stride(1), dy.stride(2), *spec.dims(),
            R=R, CHUNK=lay.chunk, ALL_PAIRS=spec.all_pairs, BLOCK_P=spec.block_p, INTERLEAVED=spec.interleaved,
            HAS_BIAS=has_bias, HAS_D=D is not None, HAS_DFINAL=dfinal is not None, NEED_DSSM0=need_dssm0,
            MM_DTYPE=consts["MM_DTYPE"], PRECISION=consts["PRECISION"], EXPAND=mimo_x is not None,
            num_warps=spec.reverse_warps, num_stages=spec.backward_stages)
    if T and S:
        block_t = max(1, 64 // R)  # 64 token-rank rows a program
        _rotate_back_kernel[(triton.cdiv(T, block_t), H)](
            q, k, qb, kb, theta, dq_heads, dk_heads, dtheta, T, *spec.dims(), R=R, BLOCK_T=block_t,
            BLOCK_PAIRS=spec.block_pairs, INTERLEAVED=spec.interleaved, HAS_BIAS=has_bias, num_warps=4)
    dq, dk, dq_bias, dk_bias = head_sums(dq_heads, dk_heads, spec.n_groups, has_bias, spec.knobs)
    return dict(dq=dq, dk=dk, dq_bias=dq_bias, dk_bias=dk_bias, dtheta=dtheta, dv=dv, dadt=dadt, dgamma=dgamma,
                dscale=dscale, dD=dD, dssm0=dssm0 if need_dssm0 else None,
                dmimo_x=d_ranks.sum(0) if d_ranks is not None else None)
