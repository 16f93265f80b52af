"""The reductions after the chunk-parallel backward kernel, as one kernel: the sum of dq and dk over
the heads of a group, and the B/C bias gradients.

The chunk kernel writes dq̄, dk̄ rotated back per head, (T, R, H, N) in q's dtype. Head h reads
group h // (H/G), so dq (T, R, G, N) is the sum over a group's heads, and a bias (H, R, N) is added
to every token, so its gradient is the per-head sum over tokens. Both come from one read of the
per-head tensors: a program takes a block of token-rank rows of one group, sums its heads in fp32
and stores the result in q's dtype, and adds each head's per-rank column sums to the fp32 bias
gradient (atomically: every row block adds to the same (H, R, N)). The same math as the torch
reductions it replaced (per-head values in q's dtype, fp32 sums), in one launch instead of eight.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _sum_heads(X, OUT, BIAS, row0, g, n_rows, n_heads, heads_per_group, n_groups, d_state,
               R: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, WRITE_SUMS: tl.constexpr,
               HAS_BIAS: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK_ROWS)  # row = token·R + rank
    n = tl.arange(0, BLOCK_N)
    n_mask = n < d_state
    mask = (rows < n_rows)[:, None] & n_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    ranks = tl.arange(0, R)
    total = tl.zeros([BLOCK_ROWS, BLOCK_N], dtype=tl.float32)
    for j in range(heads_per_group):
        h = g * heads_per_group + j
        x = tl.load(X + (rows64 * n_heads + h) * d_state + n[None, :], mask=mask, other=0.0).to(tl.float32)
        total += x
        if HAS_BIAS:  # block rows start at a rank-0 row, so a token's R rows are consecutive
            rank_sums = tl.sum(tl.reshape(x, (BLOCK_ROWS // R, R, BLOCK_N)), axis=0)
            tl.atomic_add(BIAS + (h * R + ranks[:, None]) * d_state + n[None, :], rank_sums, mask=n_mask[None, :],
                          sem="relaxed")
    if WRITE_SUMS:
        tl.store(OUT + (rows64 * n_groups + g) * d_state + n[None, :], total.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _head_sums_kernel(DQ_HEADS, DK_HEADS, DQ, DK, DQ_BIAS, DK_BIAS, n_rows, n_heads, heads_per_group, n_groups,
                      d_state, R: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                      WRITE_SUMS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Program (row block, group, q or k)."""
    row0, g = tl.program_id(0) * BLOCK_ROWS, tl.program_id(1)
    if tl.program_id(2) == 0:
        _sum_heads(DQ_HEADS, DQ, DQ_BIAS, row0, g, n_rows, n_heads, heads_per_group, n_groups, d_state,
                   R, BLOCK_ROWS, BLOCK_N, WRITE_SUMS, HAS_BIAS)
    else:
        _sum_heads(DK_HEADS, DK, DK_BIAS, row0, g, n_rows, n_heads, heads_per_group, n_groups, d_state,
                   R, BLOCK_ROWS, BLOCK_N, WRITE_SUMS, HAS_BIAS)


def head_sums(dq_heads: Tensor, dk_heads: Tensor, n_groups: int, has_bias: bool
              ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """dq_heads, dk_heads (T, R, H, N), contiguous -> dq, dk (T, R, G, N) in their dtype and, with
    biases, dq_bias, dk_bias (H, R, N) fp32. With one head per group dq, dk are the inputs."""
    T, R, H, N = dq_heads.shape
    write_sums = H != n_groups
    if write_sums:
        dq = dq_heads.new_empty(T, R, n_groups, N)
        dk = dk_heads.new_empty(T, R, n_groups, N)
    else:
        dq, dk = dq_heads, dk_heads
    dq_bias = dk_bias = None
    if has_bias:
        dq_bias = torch.zeros(H, R, N, device=dq_heads.device, dtype=torch.float32)
        dk_bias = torch.zeros(H, R, N, device=dq_heads.device, dtype=torch.float32)
    if (write_sums or has_bias) and T:
        block_n = max(16, triton.next_power_of_2(N))
        block_rows = max(R, min(64, 4096 // block_n))  # ≤ 4K elements a tile: no spills, many programs
        _head_sums_kernel[(triton.cdiv(T * R, block_rows), n_groups, 2)](
            dq_heads, dk_heads, dq, dk, dq_bias if has_bias else dq, dk_bias if has_bias else dk, T * R, H,
            H // n_groups, n_groups, N, R=R, BLOCK_ROWS=block_rows, BLOCK_N=block_n, WRITE_SUMS=write_sums,
            HAS_BIAS=has_bias)
    return dq, dk, dq_bias, dk_bias
