"""Triton helpers shared by the chunk kernels: one chunk as a block of token-rank rows.

A chunk of C tokens and R ranks is a block of C·R rows, row ``a`` = token ``a // R``, rank
``a % R`` (the MIMO token-rank axis; SISO has R = 1). In every rank-major tensor — q, k (T, R, G, N),
v and y (T, R, H, P) — the rows of one group or head are evenly strided, so a chunk is addressed
as one scalar base pointer (64-bit) plus 32-bit offsets inside the chunk. Per-token values (the
angle, A·Δ, γ, scale) are loaded once per token and repeated for the R rows.

The d_state axis of q, k and the state is walked in blocks of rotation pairs; a block's pairs
have ``a`` dims and ``b`` dims, (2i, 2i+1) for the interleaved layout and (i, i + N/2) for the half
layout, so a rotation is elementwise and a dot product over N is a sum over blocks of two
products. Blocking N keeps the registers of a program bounded whatever d_state is.
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

from hybridlm.kernels.mamba3.triton.interpreter_compat import interpreting

# Compiled, cos and sin come from the SFU's approximations (cos.approx / sin.approx): θ lies in
# [0, 2π) (angles.py), where their absolute error is about 1e-6, far below bf16's rounding, while
# libdevice's exact versions cost ~35 instructions each plus a slow-path branch: a fifth of the
# backward chunk kernel's instructions (ncu, H200, docs/benchmarks.md). Triton's interpreter has
# no libdevice, so on the CPU they are tl.cos / tl.sin. Read when Triton is, at import.
_SFU_TRIG = tl.constexpr(not interpreting())


@triton.jit
def expand_rows(x, CHUNK: tl.constexpr, R: tl.constexpr):
    """Per token -> per row: (C,) -> (C·R,), each value repeated for its R ranks."""
    if R == 1:
        return x
    else:
        return tl.reshape(tl.broadcast_to(x[:, None], (CHUNK, R)), (CHUNK * R,))


@triton.jit
def expand_rows_2d(x, CHUNK: tl.constexpr, R: tl.constexpr, WIDTH: tl.constexpr):
    """(C, W) -> (C·R, W)."""
    if R == 1:
        return x
    else:
        return tl.reshape(tl.broadcast_to(x[:, None, :], (CHUNK, R, WIDTH)), (CHUNK * R, WIDTH))


@triton.jit
def rows_to_tokens(x, CHUNK: tl.constexpr, R: tl.constexpr):
    """Sum the R rank rows of each token: (C·R,) -> (C,)."""
    if R == 1:
        return x
    else:
        return tl.sum(tl.reshape(x, (CHUNK, R)), axis=1)


@triton.jit
def rows_to_tokens_2d(x, CHUNK: tl.constexpr, R: tl.constexpr, WIDTH: tl.constexpr):
    """(C·R, W) -> (C, W)."""
    if R == 1:
        return x
    else:
        return tl.sum(tl.reshape(x, (CHUNK, R, WIDTH)), axis=1)


@triton.jit
def load_pairs(X, row_stride, rows, valid, i0, half_n, BLOCK_PAIRS: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The a and b halves of pairs i0 … i0 + BLOCK_PAIRS − 1 of some rows of X (fp32, zero outside).
    Interleaved pairs are read as one contiguous tile and split in registers."""
    if INTERLEAVED:
        d = tl.arange(0, 2 * BLOCK_PAIRS)
        x = tl.load((X + 2 * i0) + (rows[:, None] * row_stride + d[None, :]),
                    mask=valid[:, None] & (d < 2 * (half_n - i0))[None, :], other=0.0)
        a, b = tl.split(tl.reshape(x, (x.shape[0], BLOCK_PAIRS, 2)))
    else:
        i = tl.arange(0, BLOCK_PAIRS)
        offs = rows[:, None] * row_stride + i[None, :]
        mask = valid[:, None] & (i < half_n - i0)[None, :]
        a = tl.load((X + i0) + offs, mask=mask, other=0.0)
        b = tl.load((X + half_n + i0) + offs, mask=mask, other=0.0)
    return a.to(tl.float32), b.to(tl.float32)


@triton.jit
def store_pairs(X, row_stride, rows, valid, i0, half_n, a, b, BLOCK_PAIRS: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Inverse of :func:`load_pairs` (values cast to X's dtype)."""
    a = a.to(X.dtype.element_ty)
    b = b.to(X.dtype.element_ty)
    if INTERLEAVED:
        d = tl.arange(0, 2 * BLOCK_PAIRS)
        x = tl.reshape(tl.join(a, b), (a.shape[0], 2 * BLOCK_PAIRS))
        tl.store((X + 2 * i0) + (rows[:, None] * row_stride + d[None, :]), x,
                 mask=valid[:, None] & (d < 2 * (half_n - i0))[None, :])
    else:
        i = tl.arange(0, BLOCK_PAIRS)
        offs = rows[:, None] * row_stride + i[None, :]
        mask = valid[:, None] & (i < half_n - i0)[None, :]
        tl.store((X + i0) + offs, a, mask=mask)
        tl.store((X + half_n + i0) + offs, b, mask=mask)


@triton.jit
def chunk_scalars(ADT, GAMMA, SCALE, tok0, end, h, n_heads, CHUNK: tl.constexpr, R: tl.constexpr):
    """Per row: cs (chunk-local inclusive cumsum of A·Δ), γ, scale; and cs at the chunk's last token."""
    t = tl.arange(0, CHUNK)
    t_valid = t < end - tok0
    offs = (tok0.to(tl.int64) * n_heads + h) + t * n_heads
    adt = tl.load(ADT + offs, mask=t_valid, other=0.0)
    gamma = tl.load(GAMMA + offs, mask=t_valid, other=0.0)
    scale = tl.load(SCALE + offs, mask=t_valid, other=0.0)
    cs = tl.cumsum(adt, 0)
    return (expand_rows(cs, CHUNK, R), tl.sum(adt, 0), expand_rows(gamma, CHUNK, R),
            expand_rows(scale, CHUNK, R))


@triton.jit
def chunk_rotation(THETA, tok0, end, h, n_heads, n_angles, i0, CHUNK: tl.constexpr, R: tl.constexpr,
                   BLOCK_PAIRS: tl.constexpr):
    """cos and sin of every row's angles for pairs i0 … i0 + BLOCK_PAIRS − 1 (C·R, BLOCK_PAIRS); pairs
    i >= S are not rotated."""
    t = tl.arange(0, CHUNK)
    j = tl.arange(0, BLOCK_PAIRS)
    base = THETA + ((tok0.to(tl.int64) * n_heads + h) * n_angles + i0)
    theta = tl.load(base + (t[:, None] * (n_heads * n_angles) + j[None, :]),
                    mask=(t < end - tok0)[:, None] & (j < n_angles - i0)[None, :], other=0.0)
    cos, sin = cos_sin(theta)
    return expand_rows_2d(cos, CHUNK, R, BLOCK_PAIRS), expand_rows_2d(sin, CHUNK, R, BLOCK_PAIRS)


@triton.jit
def cos_sin(theta):
    """cos θ and sin θ for θ in [0, 2π): the SFU's approximations when compiled."""
    if _SFU_TRIG:
        return libdevice.fast_cosf(theta), libdevice.fast_sinf(theta)
    else:
        return tl.cos(theta), tl.sin(theta)


@triton.jit
def load_biased(X, row_stride, XB, d_state, rows, valid, i0, half_n, CHUNK: tl.constexpr, R: tl.constexpr,
                BLOCK_PAIRS: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The chunk's rows of X (+ the head's bias (R, N)), pairs i0…: the a and b halves in fp32,
    zero on invalid rows. X points at the chunk's first row of the right group."""
    a, b = load_pairs(X, row_stride, rows, valid, i0, half_n, BLOCK_PAIRS, INTERLEAVED)
    if HAS_BIAS:
        ranks = tl.arange(0, R)
        bias_a, bias_b = load_pairs(XB, d_state, ranks, ranks < R, i0, half_n, BLOCK_PAIRS, INTERLEAVED)
        if R > 1:
            bias_a = expand_ranks(bias_a, CHUNK, R, BLOCK_PAIRS)
            bias_b = expand_ranks(bias_b, CHUNK, R, BLOCK_PAIRS)
        # Invalid rows reach no output (their v, dy, γ and scale load as 0), but left holding the
        # bias the backward chunk kernel spills; the bias times a 0/1 row factor keeps them 0 in one
        # FFMA an element, where add-and-select took two (SASS 4,016 -> 3,848 a chunk and warp)
        keep = valid.to(tl.float32)[:, None]
        a += bias_a * keep
        b += bias_b * keep
    return a, b


@triton.jit
def load_rotated(X, row_stride, XB, d_state, rows, valid, i0, half_n, cos, sin, CHUNK: tl.constexpr,
                 R: tl.constexpr, BLOCK_PAIRS: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr):
    """:func:`load_biased`, rotated by (cos, sin)."""
    a, b = load_biased(X, row_stride, XB, d_state, rows, valid, i0, half_n, CHUNK, R, BLOCK_PAIRS, INTERLEAVED,
                       HAS_BIAS)
    return a * cos - b * sin, a * sin + b * cos


@triton.jit
def rotated_end(n_angles, half_n, BLOCK_PAIRS: tl.constexpr):
    """Where the pair blocks that hold rotated pairs end: blocks before it are rotated (pairs past
    S inside the last one get angle 0), blocks from it on are not, and need no angles at all. The
    chunk kernels run the two kinds as two loops (ROTATE = True / False), so the unrotated half of
    d_state (rope_fraction 0.5, the default) skips the angle loads, cos/sin and the rotations."""
    return tl.minimum(tl.cdiv(n_angles, BLOCK_PAIRS) * BLOCK_PAIRS, half_n)


@triton.jit
def expand_ranks(x, CHUNK: tl.constexpr, R: tl.constexpr, WIDTH: tl.constexpr):
    """Per rank -> per row: (R, W) -> (C·R, W)."""
    return tl.reshape(tl.broadcast_to(x[None, :, :], (CHUNK, R, WIDTH)), (CHUNK * R, WIDTH))


@triton.jit
def chunk_of(CU_SEQLENS, CHUNK_SEQ, CHUNK_START, c, h, heads_per_group, n_groups, d_state, headdim,
             CHUNK: tl.constexpr, R: tl.constexpr, BLOCK_P: tl.constexpr):
    """What a chunk-parallel program (chunk c, head h) addresses: the chunk's first token, its
    sequence's end, its rows (local token, validity), the q/k row stride and the chunk's offset in
    q/k at the head's group, and the P lanes."""
    end = tl.load(CU_SEQLENS + tl.load(CHUNK_SEQ + c) + 1)
    tok0 = tl.load(CHUNK_START + c)
    rows, tok_local, valid, k_row, at_chunk, p, p_mask = chunk_rows(
        tok0, end, h, heads_per_group, n_groups, d_state, headdim, CHUNK, R, BLOCK_P)
    return tok0, end, rows, tok_local, valid, k_row, at_chunk, p, p_mask


@triton.jit
def chunk_rows(tok0, end, h, heads_per_group, n_groups, d_state, headdim, CHUNK: tl.constexpr, R: tl.constexpr,
               BLOCK_P: tl.constexpr):
    """:func:`chunk_of` from the chunk's first token and its sequence's end, for a program that
    knows them without loading (one that walks its own sequence's chunks)."""
    rows = tl.arange(0, CHUNK * R)
    tok_local = rows // R
    k_row = n_groups * d_state
    at_chunk = tok0.to(tl.int64) * (R * k_row) + (h // heads_per_group) * d_state
    p = tl.arange(0, BLOCK_P)
    return rows, tok_local, tok_local < end - tok0, k_row, at_chunk, p, p < headdim


@triton.jit
def rotated_qk(Q, K, Q_BIAS, K_BIAS, THETA, at_chunk, k_row, tok0, end, h, n_heads, n_angles, d_state, half_n,
               rows, valid, i0, CHUNK: tl.constexpr, R: tl.constexpr, BLOCK_PAIRS: tl.constexpr,
               INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, ROTATE: tl.constexpr = True):
    """Pair block i0 of the chunk's rotated q̄ and k̄ for head h (a and b halves), with the cos and
    sin; for a block past :func:`rotated_end` (ROTATE False) q + bias and k + bias, and cos = sin = 0
    (unused)."""
    if ROTATE:
        cos, sin = chunk_rotation(THETA, tok0, end, h, n_heads, n_angles, i0, CHUNK, R, BLOCK_PAIRS)
        qa, qb = load_rotated(Q + at_chunk, k_row, Q_BIAS + h * R * d_state, d_state, rows, valid, i0, half_n, cos,
                              sin, CHUNK, R, BLOCK_PAIRS, INTERLEAVED, HAS_BIAS)
        ka, kb = load_rotated(K + at_chunk, k_row, K_BIAS + h * R * d_state, d_state, rows, valid, i0, half_n, cos,
                              sin, CHUNK, R, BLOCK_PAIRS, INTERLEAVED, HAS_BIAS)
    else:
        cos = 0.0
        sin = 0.0
        qa, qb = load_biased(Q + at_chunk, k_row, Q_BIAS + h * R * d_state, d_state, rows, valid, i0, half_n,
                             CHUNK, R, BLOCK_PAIRS, INTERLEAVED, HAS_BIAS)
        ka, kb = load_biased(K + at_chunk, k_row, K_BIAS + h * R * d_state, d_state, rows, valid, i0, half_n,
                             CHUNK, R, BLOCK_PAIRS, INTERLEAVED, HAS_BIAS)
    return qa, qb, ka, kb, cos, sin


@triton.jit
def block_scores(Q, K, Q_BIAS, K_BIAS, THETA, at_chunk, k_row, tok0, end, h, n_heads, n_angles, d_state, half_n,
                 rows, valid, i0, scores, CHUNK: tl.constexpr, R: tl.constexpr, BLOCK_PAIRS: tl.constexpr,
                 INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                 ROTATE: tl.constexpr):
    """Pair block i0 of the chunk's q̄ and k̄ as joined operands (:func:`rotated_qk`), and ``scores`` plus the
    block's share of q̄ k̄ᵀ."""
    qa, qb, ka, kb, _, _ = rotated_qk(Q, K, Q_BIAS, K_BIAS, THETA, at_chunk, k_row, tok0, end, h, n_heads, n_angles,
                                      d_state, half_n, rows, valid, i0, CHUNK, R, BLOCK_PAIRS, INTERLEAVED, HAS_BIAS,
                                      ROTATE)
    q2 = joined(qa, qb, BLOCK_PAIRS)
    k2 = joined(ka, kb, BLOCK_PAIRS)
    return q2, k2, scores + mm(q2, tl.trans(k2), MM_DTYPE, PRECISION)


@triton.jit
def intra_weights(tok_local, cs, gamma, scale):
    """M[a, b]: how much row b feeds row a inside the chunk — scale_b·e^{cs_a − cs_b} for an earlier
    token, γ for the same token (every rank pair), 0 after. Also the strictly-earlier decay E."""
    earlier = tok_local[:, None] > tok_local[None, :]
    same = tok_local[:, None] == tok_local[None, :]
    # 2^{(cs_a − cs_b)·log2 e}, the scaling done per row, not per pair, and −∞ (→ 0) after the token:
    # no clamp and no select on the C×C tile
    cs2 = cs * 1.4426950408889634
    decay = tl.math.exp2(tl.where(earlier, cs2[:, None] - cs2[None, :], float("-inf")))
    return decay * scale[None, :] + tl.where(same, gamma[:, None], 0.0), decay, same


@triton.jit
def load_rows(X, row_stride, rows, valid, p, p_mask):
    """(C·R, BLOCK_P) rows of a (…, P) tensor; X points at the chunk's first row of the head."""
    return tl.load(X + rows[:, None] * row_stride + p[None, :], mask=valid[:, None] & p_mask[None, :], other=0.0)


@triton.jit
def rank_weights(RANKS, h, rows, valid, p, p_mask, headdim, R: tl.constexpr):
    """Row a's rank weights RANKS[h, a % R] (the (H, R, P) fp32 mimo_x; 0 on invalid rows) as a (C·R, BLOCK_P)
    tile: what :func:`load_values` multiplies x by (a program that walks chunks loads them once)."""
    return tl.load(RANKS + (h * R + rows % R)[:, None] * headdim + p[None, :], mask=valid[:, None] & p_mask[None, :],
                   other=0.0)


@triton.jit
def token_rows(X, x_row, x_head, tok0, h, rows, valid, p, p_mask, R: tl.constexpr):
    """Row a of the chunk as token a // R's row of head h in X (T, H, P): each token's row repeated for its
    R ranks (zeros on invalid rows)."""
    at = X + tok0.to(tl.int64) * x_row + h * x_head
    return tl.load(at + (rows // R)[:, None] * x_row + p[None, :], mask=valid[:, None] & p_mask[None, :], other=0.0)


@triton.jit
def load_values(V, weights, v_row, v_head, tok0, h, rows, valid, p, p_mask, R: tl.constexpr, EXPAND: tl.constexpr):
    """The chunk's value rows (C·R, BLOCK_P) of head h in V's dtype: V (T, R, H, P) read as rows, or, EXPAND
    (MIMO with the rank expansion fused), V is x (T, H, P) and row a is x[token a // R] ⊙ ``weights`` (the
    :func:`rank_weights` tile) rounded to x's dtype, as the expansion kernel rounds (ranks.py). Also returns
    the token rows x (EXPAND; else the values again) for the d mimo_x sums."""
    if EXPAND:
        x = token_rows(V, v_row, v_head, tok0, h, rows, valid, p, p_mask, R)
        return (x.to(tl.float32) * weights).to(V.dtype.element_ty), x
    else:
        v = load_rows(V + tok0.to(tl.int64) * (R * v_row) + h * v_head, v_row, rows, valid, p, p_mask)
        return v, v


@triton.jit
def joined(a, b, BLOCK_PAIRS: tl.constexpr):
    """The a and b halves of a pair block side by side as one (rows, 2·BLOCK_PAIRS) operand: a dot
    over a block is one product of depth 2·BLOCK_PAIRS, not two of BLOCK_PAIRS (the pair order
    inside the block does not matter to a dot product)."""
    return tl.reshape(tl.join(a, b), (a.shape[0], 2 * BLOCK_PAIRS))


@triton.jit
def halves(x, BLOCK_PAIRS: tl.constexpr):
    """Inverse of :func:`joined`."""
    return tl.split(tl.reshape(x, (x.shape[0], BLOCK_PAIRS, 2)))


@triton.jit
def mm(a, b, MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with operands in the matmul dtype, accumulated in fp32."""
    return tl.dot(a.to(MM_DTYPE), b.to(MM_DTYPE), input_precision=PRECISION, out_dtype=tl.float32)
