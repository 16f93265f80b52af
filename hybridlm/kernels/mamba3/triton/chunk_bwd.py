"""Backward chunk kernels.

With G the gradient of the state leaving a chunk (S_{c+1}) and dy the gradient of the pre-gate
output, per chunk and head (rows a, b; P_ab = dy_a·v_b, A_ab = q̄_a·k̄_b, M the intra weights):

    G_c   = e^{cs_end} G_{c+1} + Σ_a e^{cs_a} dy_a q̄_aᵀ                       (states.py, reversed)
    dv_b  = Σ_a A_ab M_ab dy_a + e^{cs_end − cs_b} scale_b G k̄_b + D dy_b
    dq̄_a  = Σ_b P_ab M_ab k̄_b + e^{cs_a} S_cᵀ dy_a
    dk̄_b  = Σ_a P_ab M_ab q̄_a + e^{cs_end − cs_b} scale_b Gᵀ v_b
and the per-token scalars get dM = P ⊙ A through M, plus the inter-chunk and state terms; dA·Δ is
the reverse cumsum of d cs inside the chunk plus d cs_end on every token. dq̄, dk̄ are rotated back
per head (head_sums.py sums the heads of a group and the bias gradients) and give dθ.

N is walked in blocks of rotation pairs twice: walk 1 builds A and G k̄ (for dv); then the C×C
tiles are formed; walk 2 recomputes the rotated q̄, k̄ blocks and writes dq, dk and dθ; its v G
blocks also give the state term's k̄_b·(Gᵀ v_b), so G k̄ dies with dv. (One walk doing both, since
walk 2 needs P ∘ M and not A, kept A, G k̄ and walk 2's tiles live together: ~2 KB of spills a
thread, more instructions than two walks.) Each walk is two loops, the pair blocks that hold rotated
pairs and then the rest (rows.rotated_end), and a block's a and b halves are joined into one
operand, so each product over a block is one tl.dot. Every output is written once, except dD,
which each chunk adds to (atomically).

Two designs, chosen by ``KernelTuning.triton_backward_kernels`` (both one program per (chunk,
head), the same helpers and formulas):

* fused (1): one kernel does both walks; A dies with dv, before walk 2.
* split (2): kernel 1 does walk 1 and what needs A (dv, dγ, dD, and the A-parts of d cs and
  d scale, summed per token into fp32 (T, H) scratch); kernel 2 recomputes P and M (C×C, cheap),
  does walk 2 and adds the rest, so no kernel holds A next to walk 2's tiles. Adding the A-parts
  last, per token, changes only the order of the fp32 sums. Slower than fused on the H200 at every
  measured shape (docs/benchmarks.md); kept as the lower-register fallback.

The fused kernel is issue-bound (ncu: ≈ 7 cycles an instruction a warp at 255 registers), and its
time followed its instruction count until about 262 M a call at B 8, L 2K (after that, 4 % fewer
instructions left it at 1.03 ms); the choices here were made by SASS counts weighted by loop trips
(docs/benchmarks.md, "Fewer instructions"): pair-block and angle addresses are a per-block
scalar base plus loop-invariant 32-bit offsets, row validity is a compare against a scalar, dD is
the trace of P, and between the walks P comes first and A ∘ M goes into dv last.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.mamba3.triton.chunk_fwd import value_strides
from hybridlm.kernels.mamba3.triton.head_sums import head_sums
from hybridlm.kernels.mamba3.triton.rows import (
    block_scores, chunk_of, chunk_scalars, halves, intra_weights, joined, load_pairs, load_rows, load_values, mm,
    rank_weights, rotated_end, rotated_qk, rows_to_tokens, rows_to_tokens_2d, store_pairs, token_rows,
)
from hybridlm.kernels.mamba3.triton.spec import ScanSpec
from hybridlm.kernels.mamba3.triton.states import chunk_states


@triton.jit
def _store_head_pairs(DX, tok0, h, n_heads, d_state, rows, valid, i0, half_n, da, db, R: tl.constexpr,
                      BLOCK_PAIRS: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Store the gradient of one pair block (already rotated back) for head h in DX (T, R, H, N)."""
    out = DX + tok0.to(tl.int64) * (R * n_heads * d_state) + h * d_state
    store_pairs(out, n_heads * d_state, rows, valid, i0, half_n, da, db, BLOCK_PAIRS, INTERLEAVED)


@triton.jit
def _walk1_block(Q, K, Q_BIAS, K_BIAS, THETA, DSTATES, at_chunk, k_row, at_state, tok0, end, h, n_heads, n_angles,
                 d_state, half_n, rows, valid, p, p_mask, i0, scores, k_grad, CHUNK: tl.constexpr, R: tl.constexpr,
                 BLOCK_PAIRS: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr,
                 MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ROTATE: tl.constexpr):
    _, k2, scores = block_scores(Q, K, Q_BIAS, K_BIAS, THETA, at_chunk, k_row, tok0, end, h, n_heads, n_angles,
                                 d_state, half_n, rows, valid, i0, scores, CHUNK, R, BLOCK_PAIRS, INTERLEAVED,
                                 HAS_BIAS, MM_DTYPE, PRECISION, ROTATE)
    grad_a, grad_b = load_pairs(DSTATES + at_state, d_state, p, p_mask, i0, half_n, BLOCK_PAIRS, INTERLEAVED)
    k_grad += mm(k2, tl.trans(joined(grad_a, grad_b, BLOCK_PAIRS)), MM_DTYPE, PRECISION)
    return scores, k_grad


@triton.jit
def _scores_and_state_grad(Q, K, Q_BIAS, K_BIAS, THETA, DSTATES, at_chunk, k_row, at_state, tok0, end, h, n_heads,
                           n_angles, d_state, half_n, rows, valid, p, p_mask, CHUNK: tl.constexpr, R: tl.constexpr,
                           BLOCK_PAIRS: tl.constexpr, BLOCK_P: tl.constexpr, INTERLEAVED: tl.constexpr,
                           HAS_BIAS: tl.constexpr, MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Walk 1: A = q̄ k̄ᵀ and, row b, G k̄_b, over all of N (the rotated pair blocks, then the rest).
    Loops, not unrolled: unrolled (``tl.static_range``) walks passed every fp32 test but gave wrong bf16
    gradients on the tensor cores (Triton 3.6, 2026-12-05: a layer's 0.1-0.84 relative to fp64 on an H200,
    0.12-0.62 relative to these loops on an H100)."""
    scores = tl.zeros([CHUNK * R, CHUNK * R], dtype=tl.float32)
    k_grad = tl.zeros([CHUNK * R, BLOCK_P], dtype=tl.float32)
    rotated = rotated_end(n_angles, half_n, BLOCK_PAIRS)
    for i0 in range(0, rotated, BLOCK_PAIRS):
        scores, k_grad = _walk1_block(Q, K, Q_BIAS, K_BIAS, THETA, DSTATES, at_chunk, k_row, at_state, tok0, end,
                                      h, n_heads, n_angles, d_state, half_n, rows, valid, p, p_mask, i0, scores,
                                      k_grad, CHUNK, R, BLOCK_PAIRS, INTERLEAVED, HAS_BIAS, MM_DTYPE, PRECISION,
                                      True)
    for i0 in range(rotated, half_n, BLOCK_PAIRS):
        scores, k_grad = _walk1_block(Q, K, Q_BIAS, K_BIAS, THETA, DSTATES, at_chunk, k_row, at_state, tok0, end,
                                      h, n_heads, n_angles, d_state, half_n, rows, valid, p, p_mask, i0, scores,
                                      k_grad, CHUNK, R, BLOCK_PAIRS, INTERLEAVED, HAS_BIAS, MM_DTYPE, PRECISION,
                                      False)
    return scores, k_grad


@triton.jit
def _chunk_tiles(ADT, GAMMA, SCALE, V, RANKS, DY, v_row, v_head, dy_row, dy_head, tok0, end, h, n_heads, headdim,
                 rows, valid, tok_local, p, p_mask, CHUNK: tl.constexpr, R: tl.constexpr, MM_DTYPE: tl.constexpr,
                 PRECISION: tl.constexpr, EXPAND: tl.constexpr):
    """What the chunk's tiles need besides q̄, k̄: per row cs, scale; cs_end; the v and dy rows;
    P = dy vᵀ; the intra weights M, the strictly-earlier decay E and the same-token mask. (EXPAND: v
    expanded from x as it loads, rows.load_values.)"""
    cs, cs_end, gamma, scale = chunk_scalars(ADT, GAMMA, SCALE, tok0, end, h, n_heads, CHUNK, R)
    ranked = rank_weights(RANKS, h, rows, valid, p, p_mask, headdim, R) if EXPAND else 0.0
    v, _ = load_values(V, ranked, v_row, v_head, tok0, h, rows, valid, p, p_mask, R, EXPAND)
    dy = load_rows(DY + tok0.to(tl.int64) * (R * dy_row) + h * dy_head, dy_row, rows, valid, p, p_mask)
    dprod = mm(dy, tl.trans(v), MM_DTYPE, PRECISION)  # dy_a · v_b
    weights, decay, same = intra_weights(tok_local, cs, gamma, scale)
    return cs, cs_end, scale, v, dy, dprod, weights, decay, same


@triton.jit
def _add_chunk_dD(DD, h, rows, dprod):
    """The chunk's share of dD = Σ_a dy_a·v_a, the trace of P = dy vᵀ (a row sum of its diagonal,
    cheaper than the elementwise product and its sum), added across chunks."""
    diagonal = tl.where(rows[:, None] == rows[None, :], dprod, 0.0)
    tl.atomic_add(DD + h, tl.sum(tl.sum(diagonal, 1), 0), sem="relaxed")


@triton.jit
def _through_weights(DGAMMA, at_token0, at_token, t_valid, dprod, scores, weights, decay, same, scale,
                     CHUNK: tl.constexpr, R: tl.constexpr, MM_DTYPE: tl.constexpr):
    """dM = P ⊙ A through M: stores dγ and returns the rows' d cs and d scale parts; also P ∘ M,
    walk 2's operand (in the matmul dtype; formed here, in the order ptxas spills least in)."""
    dweights = dprod * scores
    dscores = (dprod * weights).to(MM_DTYPE)
    ddecay = dweights * decay
    # the column sums of ddecay·scale_b are scale·dscale: one cross-warp column sum, not two
    dcs = tl.sum(ddecay * scale[None, :], 1)
    dscale = tl.sum(ddecay, 0)
    dcs -= scale * dscale
    tl.store((DGAMMA + at_token0) + at_token, rows_to_tokens(tl.sum(tl.where(same, dweights, 0.0), 1), CHUNK, R),
             mask=t_valid)
    return dscores, dcs, dscale


@triton.jit
def _store_dv(DV, D, V, RANKS, DRANKS, c, h, n_heads, headdim, v_row, v_head, tok0, rows, valid, t, t_valid, p,
              p_mask, scores, weights, dy, k_grad, w, CHUNK: tl.constexpr, R: tl.constexpr, HAS_D: tl.constexpr,
              MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr, EXPAND: tl.constexpr):
    """dv = (A ∘ M)ᵀ dy + w G k̄ (+ D dy); w = e^{cs_end − cs_b} scale_b per row. EXPAND: v was x ⊙ the rank
    weights, so instead dx = Σ_r dv_r ⊙ RANKS[h, r] per token into DV (T, H, P), and this chunk's share of
    d RANKS[h] = Σ_t dv_r ⊙ x into DRANKS (n_chunks, H, R, P), from dv rounded to v's dtype as the
    expansion kernel's backward reads it (ranks.py)."""
    dv = mm(tl.trans(scores * weights), dy, MM_DTYPE, PRECISION) + w[:, None] * k_grad
    if HAS_D:
        dv += tl.load(D + h) * dy.to(tl.float32)
    if EXPAND:
        dv = dv.to(DV.dtype.element_ty).to(tl.float32)
        dx = rows_to_tokens_2d(dv * rank_weights(RANKS, h, rows, valid, p, p_mask, headdim, R), CHUNK, R,
                               p.shape[0])
        tl.store(DV + (tok0.to(tl.int64) * n_heads + h) * headdim + (t * n_heads * headdim)[:, None] + p[None, :],
                 dx.to(DV.dtype.element_ty), mask=t_valid[:, None] & p_mask[None, :])
        x = token_rows(V, v_row, v_head, tok0, h, rows, valid, p, p_mask, R).to(tl.float32)
        share = tl.sum(tl.reshape(dv * x, (CHUNK, R, p.shape[0])), axis=0)  # (R, BLOCK_P): each rank's token sum
        r = tl.arange(0, R)
        tl.store(DRANKS + ((c.to(tl.int64) * n_heads + h) * R + r[:, None]) * headdim + p[None, :], share,
                 mask=p_mask[None, :])
    else:
        dv_row = n_heads * headdim
        tl.store(DV + tok0.to(tl.int64) * (R * dv_row) + h * headdim + rows[:, None] * dv_row + p[None, :],
                 dv.to(DV.dtype.element_ty), mask=valid[:, None] & p_mask[None, :])


@triton.jit
def _walk2_block(Q, K, Q_BIAS, K_BIAS, THETA, STATES, DSTATES, DQ, DK, DTHETA, at_chunk, k_row, at_state, at_token0,
                 tok0, end, h, n_heads, n_angles, d_state, half_n, rows, valid, t, t_valid, p, p_mask, i0,
                 dscores, dscores_t, dy, v, growth, w, dcs, entering, ratio, CHUNK: tl.constexpr, R: tl.constexpr,
                 BLOCK_PAIRS: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr,
                 MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ROTATE: tl.constexpr):
    qa, qb, ka, kb, cos, sin = rotated_qk(Q, K, Q_BIAS, K_BIAS, THETA, at_chunk, k_row, tok0, end, h, n_heads,
                                          n_angles, d_state, half_n, rows, valid, i0, CHUNK, R, BLOCK_PAIRS,
                                          INTERLEAVED, HAS_BIAS, ROTATE)
    state_a, state_b = load_pairs(STATES + at_state, d_state, p, p_mask, i0, half_n, BLOCK_PAIRS, INTERLEAVED)
    grad_a, grad_b = load_pairs(DSTATES + at_state, d_state, p, p_mask, i0, half_n, BLOCK_PAIRS, INTERLEAVED)
    q2 = joined(qa, qb, BLOCK_PAIRS)
    k2 = joined(ka, kb, BLOCK_PAIRS)
    state2 = joined(state_a, state_b, BLOCK_PAIRS)
    grad2 = joined(grad_a, grad_b, BLOCK_PAIRS)
    entering += state2 * grad2
    # the inter-chunk term; it also gives d cs_a = q̄_a · (its dq̄)
    dq2 = mm(dy, state2, MM_DTYPE, PRECISION) * growth
    dcs += tl.sum(q2 * dq2, 1)
    dq2 += mm(dscores, k2, MM_DTYPE, PRECISION)
    # the state term of dk̄: row b of v G, which also gives k̄_b·(Gᵀ v_b) for d scale_b
    dk2 = mm(v, grad2, MM_DTYPE, PRECISION)
    ratio += tl.sum(k2 * dk2, 1)
    dk2 = mm(dscores_t, q2, MM_DTYPE, PRECISION) + w * dk2
    dqa, dqb = halves(dq2, BLOCK_PAIRS)
    dka, dkb = halves(dk2, BLOCK_PAIRS)
    if ROTATE:
        j = tl.arange(0, BLOCK_PAIRS)
        tl.store((DTHETA + (at_token0 * n_angles + i0)) + (t[:, None] * (n_heads * n_angles) + j[None, :]),
                 rows_to_tokens_2d(dqb * qa - dqa * qb + dkb * ka - dka * kb, CHUNK, R, BLOCK_PAIRS),
                 mask=t_valid[:, None] & (j < n_angles - i0)[None, :])
        dqa, dqb = dqa * cos + dqb * sin, dqb * cos - dqa * sin
        dka, dkb = dka * cos + dkb * sin, dkb * cos - dka * sin
    _store_head_pairs(DQ, tok0, h, n_heads, d_state, rows, valid, i0, half_n, dqa, dqb, R, BLOCK_PAIRS, INTERLEAVED)
    _store_head_pairs(DK, tok0, h, n_heads, d_state, rows, valid, i0, half_n, dka, dkb, R, BLOCK_PAIRS, INTERLEAVED)
    return dcs, entering, ratio


@triton.jit
def _dq_dk_walk(Q, K, Q_BIAS, K_BIAS, THETA, STATES, DSTATES, DQ, DK, DTHETA, at_chunk, k_row, at_state, at_token0,
                tok0, end, h, n_heads, n_angles, d_state, half_n, rows, valid, t, t_valid, p, p_mask,
                dscores, dy, v, growth, w, dcs, CHUNK: tl.constexpr, R: tl.constexpr, BLOCK_PAIRS: tl.constexpr,
                BLOCK_P: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr,
                MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Walk 2: dq̄, dk̄ block by block, rotated back and stored, and dθ from both sides (the rotated
    pair blocks, then the rest); dscores = P ∘ M, dy and v in the matmul dtype, growth = e^{cs_a}
    and w per row as columns. Returns dcs plus the inter-chunk term q̄_a·dq̄_a, ⟨S_c, G⟩ and
    k̄_b·(Gᵀ v_b)."""
    dscores_t = tl.trans(dscores)
    entering = tl.zeros([BLOCK_P, 2 * BLOCK_PAIRS], dtype=tl.float32)  # ⟨S_c, G⟩ elementwise, summed after
    ratio = tl.zeros([CHUNK * R], dtype=tl.float32)  # k̄_b·(Gᵀ v_b), accumulated
    rotated = rotated_end(n_angles, half_n, BLOCK_PAIRS)
    for i0 in range(0, rotated, BLOCK_PAIRS):
        dcs, entering, ratio = _walk2_block(
            Q, K, Q_BIAS, K_BIAS, THETA, STATES, DSTATES, DQ, DK, DTHETA, at_chunk, k_row, at_state, at_token0,
            tok0, end, h, n_heads, n_angles, d_state, half_n, rows, valid, t, t_valid, p, p_mask, i0, dscores,
            dscores_t, dy, v, growth, w, dcs, entering, ratio, CHUNK, R, BLOCK_PAIRS, INTERLEAVED, HAS_BIAS,
            MM_DTYPE, PRECISION, True)
    for i0 in range(rotated, half_n, BLOCK_PAIRS):
        dcs, entering, ratio = _walk2_block(
            Q, K, Q_BIAS, K_BIAS, THETA, STATES, DSTATES, DQ, DK, DTHETA, at_chunk, k_row, at_state, at_token0,
            tok0, end, h, n_heads, n_angles, d_state, half_n, rows, valid, t, t_valid, p, p_mask, i0, dscores,
            dscores_t, dy, v, growth, w, dcs, entering, ratio, CHUNK, R, BLOCK_PAIRS, INTERLEAVED, HAS_BIAS,
            MM_DTYPE, PRECISION, False)
    return dcs, tl.sum(tl.sum(entering, 1), 0), ratio


@triton.jit
def _state_terms(ratio, entering, to_end, scale, cs_end):
    """The state term: e^{cs_end − cs_b} ratio_b is the d scale_b of k̄_b's contribution to S_{c+1};
    times scale_b it is −d cs_b, and with e^{cs_end} ⟨S_c, G⟩ it sums to d cs_end. Returns the
    d scale part, the d cs part per row and d cs_end."""
    ratio *= to_end
    state_term = ratio * scale
    return ratio, state_term, tl.sum(state_term, 0) + tl.exp(cs_end) * entering


@triton.jit
def _chunk_bwd_kernel(
    Q, K, Q_BIAS, K_BIAS, THETA, V, RANKS, DY, ADT, GAMMA, SCALE, D, STATES, DSTATES,
    DQ, DK, DV, DRANKS, DTHETA, DADT, DGAMMA, DSCALE, DD, CU_SEQLENS, CHUNK_SEQ, CHUNK_START,
    v_row, v_head, dy_row, dy_head,
    n_heads, heads_per_group, n_groups, d_state, half_n, headdim, n_angles,
    R: tl.constexpr, CHUNK: tl.constexpr, BLOCK_PAIRS: tl.constexpr, BLOCK_P: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr,
    MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr, EXPAND: tl.constexpr,
):
    """Fused: per chunk and head, dv (or, EXPAND, dx and the chunk's share of d mimo_x), dq and dk of the
    head, dθ, dγ, d scale, dA·Δ and the chunk's share of dD."""
    c, h = tl.program_id(0), tl.program_id(1)
    tok0, end, rows, tok_local, valid, k_row, at_chunk, p, p_mask = chunk_of(
        CU_SEQLENS, CHUNK_SEQ, CHUNK_START, c, h, heads_per_group, n_groups, d_state, headdim, CHUNK, R, BLOCK_P)
    if end <= tok0:  # an empty slot of a packed layout (layout.py)
        return
    at_state = (c.to(tl.int64) * n_heads + h) * headdim * d_state
    scores, k_grad = _scores_and_state_grad(
        Q, K, Q_BIAS, K_BIAS, THETA, DSTATES, at_chunk, k_row, at_state, tok0, end, h, n_heads, n_angles, d_state,
        half_n, rows, valid, p, p_mask, CHUNK, R, BLOCK_PAIRS, BLOCK_P, INTERLEAVED, HAS_BIAS, MM_DTYPE, PRECISION)

    # dv and the per-token scalars that need no second walk
    t = tl.arange(0, CHUNK)
    t_valid = t < end - tok0
    at_token0 = tok0.to(tl.int64) * n_heads + h  # the chunk's first token at head h; token t is + t·H
    at_token = t * n_heads
    cs, cs_end, scale, v, dy, dprod, weights, decay, same = _chunk_tiles(
        ADT, GAMMA, SCALE, V, RANKS, DY, v_row, v_head, dy_row, dy_head, tok0, end, h, n_heads, headdim, rows, valid,
        tok_local, p, p_mask, CHUNK, R, MM_DTYPE, PRECISION, EXPAND)
    # P ∘ A through M gives the per-token scalars, P ∘ M is walk 2's operand, A ∘ M goes into dv
    # last (the order ptxas spills least in)
    if HAS_D:
        _add_chunk_dD(DD, h, rows, dprod)
    dscores, dcs, dscale = _through_weights(DGAMMA, at_token0, at_token, t_valid, dprod, scores, weights, decay,
                                            same, scale, CHUNK, R, MM_DTYPE)
    to_end = tl.exp(cs_end - cs)
    w = to_end * scale
    _store_dv(DV, D, V, RANKS, DRANKS, c, h, n_heads, headdim, v_row, v_head, tok0, rows, valid, t, t_valid, p,
              p_mask, scores, weights, dy, k_grad, w, CHUNK, R, HAS_D, MM_DTYPE, PRECISION, EXPAND)

    dcs, entering, ratio = _dq_dk_walk(
        Q, K, Q_BIAS, K_BIAS, THETA, STATES, DSTATES, DQ, DK, DTHETA, at_chunk, k_row, at_state, at_token0, tok0,
        end, h, n_heads, n_angles, d_state, half_n, rows, valid, t, t_valid, p, p_mask, dscores, dy.to(MM_DTYPE),
        v.to(MM_DTYPE), tl.exp(cs)[:, None], w[:, None], dcs, CHUNK, R, BLOCK_PAIRS, BLOCK_P, INTERLEAVED,
        HAS_BIAS, MM_DTYPE, PRECISION)
    ratio, state_term, dcs_end = _state_terms(ratio, entering, to_end, scale, cs_end)
    tl.store((DSCALE + at_token0) + at_token, rows_to_tokens(dscale + ratio, CHUNK, R), mask=t_valid)
    tl.store((DADT + at_token0) + at_token,
             tl.cumsum(rows_to_tokens(dcs - state_term, CHUNK, R), 0, reverse=True) + dcs_end, mask=t_valid)


@triton.jit
def _chunk_bwd_dv_kernel(
    Q, K, Q_BIAS, K_BIAS, THETA, V, RANKS, DY, ADT, GAMMA, SCALE, D, DSTATES,
    DV, DRANKS, DCS_PART, DGAMMA, DSCALE_PART, DD, CU_SEQLENS, CHUNK_SEQ, CHUNK_START,
    v_row, v_head, dy_row, dy_head,
    n_heads, heads_per_group, n_groups, d_state, half_n, headdim, n_angles,
    R: tl.constexpr, CHUNK: tl.constexpr, BLOCK_PAIRS: tl.constexpr, BLOCK_P: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr,
    MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr, EXPAND: tl.constexpr,
):
    """Split, kernel 1 (walk 1): dv, dγ, the chunk's share of dD, and per token the parts of d cs
    and d scale that need A (into DCS_PART, DSCALE_PART (T, H) fp32, for kernel 2)."""
    c, h = tl.program_id(0), tl.program_id(1)
    tok0, end, rows, tok_local, valid, k_row, at_chunk, p, p_mask = chunk_of(
        CU_SEQLENS, CHUNK_SEQ, CHUNK_START, c, h, heads_per_group, n_groups, d_state, headdim, CHUNK, R, BLOCK_P)
    if end <= tok0:
        return
    at_state = (c.to(tl.int64) * n_heads + h) * headdim * d_state
    scores, k_grad = _scores_and_state_grad(
        Q, K, Q_BIAS, K_BIAS, THETA, DSTATES, at_chunk, k_row, at_state, tok0, end, h, n_heads, n_angles, d_state,
        half_n, rows, valid, p, p_mask, CHUNK, R, BLOCK_PAIRS, BLOCK_P, INTERLEAVED, HAS_BIAS, MM_DTYPE, PRECISION)
    t = tl.arange(0, CHUNK)
    t_valid = t < end - tok0
    at_token0 = tok0.to(tl.int64) * n_heads + h
    at_token = t * n_heads
    cs, cs_end, scale, v, dy, dprod, weights, decay, same = _chunk_tiles(
        ADT, GAMMA, SCALE, V, RANKS, DY, v_row, v_head, dy_row, dy_head, tok0, end, h, n_heads, headdim, rows, valid,
        tok_local, p, p_mask, CHUNK, R, MM_DTYPE, PRECISION, EXPAND)
    if HAS_D:
        _add_chunk_dD(DD, h, rows, dprod)
    _, dcs, dscale = _through_weights(DGAMMA, at_token0, at_token, t_valid, dprod, scores, weights, decay, same,
                                      scale, CHUNK, R, MM_DTYPE)  # P ∘ M unused here: compiled away
    tl.store((DCS_PART + at_token0) + at_token, rows_to_tokens(dcs, CHUNK, R), mask=t_valid)
    tl.store((DSCALE_PART + at_token0) + at_token, rows_to_tokens(dscale, CHUNK, R), mask=t_valid)
    _store_dv(DV, D, V, RANKS, DRANKS, c, h, n_heads, headdim, v_row, v_head, tok0, rows, valid, t, t_valid, p,
              p_mask, scores, weights, dy, k_grad, tl.exp(cs_end - cs) * scale, CHUNK, R, HAS_D, MM_DTYPE, PRECISION,
              EXPAND)


@triton.jit
def _chunk_bwd_dqk_kernel(
    Q, K, Q_BIAS, K_BIAS, THETA, V, RANKS, DY, ADT, GAMMA, SCALE, STATES, DSTATES,
    DQ, DK, DTHETA, DADT, DSCALE, DCS_PART, DSCALE_PART, CU_SEQLENS, CHUNK_SEQ, CHUNK_START,
    v_row, v_head, dy_row, dy_head,
    n_heads, heads_per_group, n_groups, d_state, half_n, headdim, n_angles,
    R: tl.constexpr, CHUNK: tl.constexpr, BLOCK_PAIRS: tl.constexpr, BLOCK_P: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr,
    MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr, EXPAND: tl.constexpr,
):
    """Split, kernel 2 (walk 2): P and M again, then dq and dk of the head and dθ; d scale and dA·Δ
    from kernel 1's parts plus the inter-chunk and state terms."""
    c, h = tl.program_id(0), tl.program_id(1)
    tok0, end, rows, tok_local, valid, k_row, at_chunk, p, p_mask = chunk_of(
        CU_SEQLENS, CHUNK_SEQ, CHUNK_START, c, h, heads_per_group, n_groups, d_state, headdim, CHUNK, R, BLOCK_P)
    if end <= tok0:
        return
    at_state = (c.to(tl.int64) * n_heads + h) * headdim * d_state
    t = tl.arange(0, CHUNK)
    t_valid = t < end - tok0
    at_token0 = tok0.to(tl.int64) * n_heads + h
    at_token = t * n_heads
    cs, cs_end, scale, v, dy, dprod, weights, _, _ = _chunk_tiles(
        ADT, GAMMA, SCALE, V, RANKS, DY, v_row, v_head, dy_row, dy_head, tok0, end, h, n_heads, headdim, rows, valid,
        tok_local, p, p_mask, CHUNK, R, MM_DTYPE, PRECISION, EXPAND)
    to_end = tl.exp(cs_end - cs)
    dcs, entering, ratio = _dq_dk_walk(
        Q, K, Q_BIAS, K_BIAS, THETA, STATES, DSTATES, DQ, DK, DTHETA, at_chunk, k_row, at_state, at_token0, tok0,
        end, h, n_heads, n_angles, d_state, half_n, rows, valid, t, t_valid, p, p_mask,
        (dprod * weights).to(MM_DTYPE), dy.to(MM_DTYPE), v.to(MM_DTYPE), tl.exp(cs)[:, None],
        (to_end * scale)[:, None], tl.zeros([CHUNK * R], dtype=tl.float32), CHUNK, R, BLOCK_PAIRS, BLOCK_P,
        INTERLEAVED, HAS_BIAS, MM_DTYPE, PRECISION)
    ratio, state_term, dcs_end = _state_terms(ratio, entering, to_end, scale, cs_end)
    dscale_part = tl.load((DSCALE_PART + at_token0) + at_token, mask=t_valid, other=0.0)
    dcs_part = tl.load((DCS_PART + at_token0) + at_token, mask=t_valid, other=0.0)
    tl.store((DSCALE + at_token0) + at_token, dscale_part + rows_to_tokens(ratio, CHUNK, R), mask=t_valid)
    dcs_tokens = dcs_part + rows_to_tokens(dcs - state_term, CHUNK, R)
    tl.store((DADT + at_token0) + at_token, tl.cumsum(dcs_tokens, 0, reverse=True) + dcs_end, mask=t_valid)


def scan_backward(spec: ScanSpec, saved: dict, dy: Tensor, dfinal: Tensor | None, need_dssm0: bool):
    """Gradients of the chunk scan. The states kernel walks every sequence backwards and stores the
    state gradient leaving each chunk; the chunk kernel (or the split pair, by
    ``spec.backward_kernels``) then takes all chunks in parallel; one kernel sums the heads of a
    group and the bias gradients (head_sums.py). Returns a dict: dq, dk (T, R, G, N) in q's dtype;
    dq_bias, dk_bias (H, R, N) fp32 or None; dtheta, dv (v's dtype; with ``saved["mimo_x"]``, v is x and
    dv its gradient), dadt, dgamma, dscale, dD (None without D), dssm0 (or None) and dmimo_x (H, R, P)
    (None without ``saved["mimo_x"]``), the rest fp32."""
    lay = spec.layout
    q, k, q_bias, k_bias = saved["q"], saved["k"], saved["q_bias"], saved["k_bias"]
    theta, v, adt, gamma, scale, D, states = (saved[n] for n in ("theta", "v", "adt", "gamma", "scale", "D", "states"))
    mimo_x = saved.get("mimo_x")  # given: v is x (T, 1, H, P), expanded to the ranks where the kernels load it
    T, H, P, N, R, S = q.shape[0], spec.n_heads, spec.headdim, spec.d_state, spec.rank, spec.n_angles
    dev = q.device
    f32 = dict(device=dev, dtype=torch.float32)
    # Every token belongs to one chunk, so the chunk kernels write all of these; dq, dk per head.
    dq_heads = torch.empty(T, R, H, N, device=dev, dtype=q.dtype)
    dk_heads = torch.empty(T, R, H, N, device=dev, dtype=q.dtype)
    dv = torch.empty(v.shape, device=dev, dtype=v.dtype)  # (T, R, H, P), or dx (T, 1, H, P) with mimo_x
    # each chunk's share of d mimo_x (an empty slot of a packed layout writes none: zeros)
    d_ranks = torch.zeros(lay.n_chunks, H, R, P, **f32) if mimo_x is not None else None
    ranks_or_any, d_ranks_or_any = (mimo_x, d_ranks) if mimo_x is not None else (adt, adt)
    dtheta = torch.empty(T, H, S, **f32)
    dadt, dgamma, dscale = (torch.empty(T, H, **f32) for _ in range(3))
    dD = torch.zeros(H, **f32) if D is not None else None  # Σ dy·v, added chunk by chunk
    has_bias = k_bias is not None
    qb = q_bias if has_bias else q
    kb = k_bias if has_bias else k
    common = dict(HAS_BIAS=has_bias, BLOCK_P=spec.block_p, num_warps=spec.backward_warps,
                  num_stages=spec.backward_stages, EXPAND=mimo_x is not None, **spec.constexprs())
    dys = (dy.stride(1), dy.stride(2))
    vs = value_strides(v)
    # G in fp32 unless the knob narrows it to the matmul dtype (its products round it there anyway)
    grads_dtype = spec.matmul_dtype if spec.knobs.triton_narrow_state_grads else torch.float32
    dstates, dssm0 = chunk_states(spec, q, q_bias, theta, dy, adt, adt, dfinal, False, dys, grads_dtype)
    grid = (lay.n_chunks, H)
    D_or_any = D if D is not None else adt  # an unread pointer without D
    if lay.n_chunks and spec.backward_kernels == 1:
        _chunk_bwd_kernel[grid](
            q, k, qb, kb, theta, v, ranks_or_any, dy, adt, gamma, scale, D_or_any, states, dstates,
            dq_heads, dk_heads, dv, d_ranks_or_any, dtheta, dadt, dgamma, dscale, dD if D is not None else adt,
            lay.cu_seqlens,
            lay.chunk_seq, lay.chunk_start, *vs, *dys, *spec.dims(), HAS_D=D is not None, **common)
    elif lay.n_chunks:
        dcs_part, dscale_part = (torch.empty(T, H, **f32) for _ in range(2))  # kernel 1's A-parts per token
        _chunk_bwd_dv_kernel[grid](
            q, k, qb, kb, theta, v, ranks_or_any, dy, adt, gamma, scale, D_or_any, dstates,
            dv, d_ranks_or_any, dcs_part, dgamma, dscale_part, dD if D is not None else adt, lay.cu_seqlens,
            lay.chunk_seq, lay.chunk_start, *vs, *dys, *spec.dims(), HAS_D=D is not None, **common)
        _chunk_bwd_dqk_kernel[grid](
            q, k, qb, kb, theta, v, ranks_or_any, dy, adt, gamma, scale, states, dstates,
            dq_heads, dk_heads, dtheta, dadt, dscale, dcs_part, dscale_part, lay.cu_seqlens,
            lay.chunk_seq, lay.chunk_start, *vs, *dys, *spec.dims(), **common)
    dq, dk, dq_bias, dk_bias = head_sums(dq_heads, dk_heads, spec.n_groups, has_bias, spec.knobs)
    return dict(dq=dq, dk=dk, dq_bias=dq_bias, dk_bias=dk_bias, dtheta=dtheta, dv=dv, dadt=dadt, dgamma=dgamma,
                dscale=dscale, dD=dD, dssm0=dssm0 if need_dssm0 else None,
                dmimo_x=d_ranks.sum(0) if d_ranks is not None else None)
