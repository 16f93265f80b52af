"""Triton helpers shared by the chunk kernels: one chunk as a block of token-rank rows.

A chunk of C tokens and R ranks is a block of C·R rows, row ``a`` = token ``a // R``, rank
``a % R`` (the MIMO token-rank axis; SISO has R = 1). The d_state axis of q, k and the state is
split into the two halves of the rotation pairs — ``a`` dims and ``b`` dims, (2i, 2i+1) for the
interleaved layout and (i, i + N/2) for the half layout — so that a rotation is elementwise and
a dot product over N is the sum of two dot products over N/2.

Layouts (all contiguous): q, k (T, R, G, N); biases (H, R, N); theta (T, H, S); per-token
scalars (T, H) fp32; v, y (T, R, H, P) with strides passed in; states (·, H, P, N).
"""
import triton
import triton.language as tl


@triton.jit
def chunk_rows(tok0, end, CHUNK: tl.constexpr, R: tl.constexpr):
    """Token (local, global) and rank of each row; rows past the sequence end are invalid."""
    rows = tl.arange(0, CHUNK * R)
    tok_local = rows // R
    tok = tok0 + tok_local
    return tok_local, rows % R, tok.to(tl.int64), tok < end


@triton.jit
def pair_dims(half_n, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    i = tl.arange(0, BLOCK_HALF)
    if INTERLEAVED:
        dim_a = 2 * i
        dim_b = 2 * i + 1
    else:
        dim_a = i
        dim_b = i + half_n
    return dim_a, dim_b, i < half_n


@triton.jit
def rotation(THETA, tok, valid, h, n_heads, n_angles, BLOCK_HALF: tl.constexpr):
    """cos and sin of each row's angles (C·R, BLOCK_HALF); pairs i >= S are not rotated."""
    i = tl.arange(0, BLOCK_HALF)
    mask = valid[:, None] & (i < n_angles)[None, :]
    theta = tl.load(THETA + (tok[:, None] * n_heads + h) * n_angles + i[None, :], mask=mask, other=0.0)
    return tl.cos(theta), tl.sin(theta)


@triton.jit
def load_rotated(X, XB, tok, rank, valid, row_stride, rank_stride, d_state, dim_a, dim_b, half_mask, cos, sin,
                 HAS_BIAS: tl.constexpr):
    """Rows of X (+ bias), rotated: the a and b halves, fp32, zero on invalid rows.
    X points at the row's group, XB at the head's bias (R, N)."""
    mask = valid[:, None] & half_mask[None, :]
    base = X + tok[:, None] * row_stride + rank[:, None] * rank_stride
    a = tl.load(base + dim_a[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(base + dim_b[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = XB + rank[:, None] * d_state
        a += tl.load(bias + dim_a[None, :], mask=mask, other=0.0)
        b += tl.load(bias + dim_b[None, :], mask=mask, other=0.0)
    return a * cos - b * sin, a * sin + b * cos


@triton.jit
def row_scalars(ADT, GAMMA, SCALE, tok, rank, valid, h, n_heads):
    """Per row: cs (chunk-local inclusive cumsum of A·Δ), γ, scale; and cs at the chunk's last token.
    Only rank-0 rows carry A·Δ into the cumsum, so every rank of a token sees that token's cs."""
    offs = tok * n_heads + h
    adt = tl.load(ADT + offs, mask=valid & (rank == 0), other=0.0)
    gamma = tl.load(GAMMA + offs, mask=valid, other=0.0)
    scale = tl.load(SCALE + offs, mask=valid, other=0.0)
    return tl.cumsum(adt, 0), tl.sum(adt, 0), gamma, scale


@triton.jit
def intra_weights(tok_local, cs, gamma, scale):
    """M[a, b]: how much row b feeds row a inside the chunk — scale_b·e^{cs_a − cs_b} for an earlier
    token, γ for the same token (every rank pair), 0 after. Also the strictly-earlier decay E."""
    earlier = tok_local[:, None] > tok_local[None, :]
    same = tok_local[:, None] == tok_local[None, :]
    decay = tl.where(earlier, tl.exp(tl.minimum(cs[:, None] - cs[None, :], 0.0)), 0.0)
    return decay * scale[None, :] + tl.where(same, gamma[:, None], 0.0), decay, same


@triton.jit
def load_rows(X, tok, rank, valid, h, row_stride, rank_stride, head_stride, p, p_mask):
    return tl.load(X + tok[:, None] * row_stride + rank[:, None] * rank_stride + h * head_stride + p[None, :],
                   mask=valid[:, None] & p_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def state_offsets(p, dim_a, dim_b, d_state):
    return p[:, None] * d_state + dim_a[None, :], p[:, None] * d_state + dim_b[None, :]


@triton.jit
def mm(a, b, MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with operands in the matmul dtype, accumulated in fp32."""
    return tl.dot(a.to(MM_DTYPE), b.to(MM_DTYPE), input_precision=PRECISION, out_dtype=tl.float32)


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
