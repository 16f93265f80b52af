"""The reductions after the chunk-parallel backward kernel: the sum of dq and dk over the heads of a
group, and the B/C bias gradients.

The chunk kernel writes dq̄, dk̄ rotated back per head, (T, R, H, N) in q's dtype. Head h reads
group h // (H/G), so dq (T, R, G, N) is the sum over a group's heads: a program takes a block of
token-rank rows of one group, sums its heads in fp32 (several neighbouring heads a load) and stores the
result in q's dtype. A bias (H, R, N) is added to every token, so its gradient is the per-head sum over
tokens: a program takes one head and a long run of rows (``KernelTuning.triton_bias_rows`` of them), sums
them per rank in fp32 registers and adds the result to the fp32 gradient once. With one rank and
``KernelTuning.triton_bias_in_group_sums``, the group sums write each load's column sums instead (a partial
per row block, summed by torch: an eighth of the bytes the bias kernel reads again), off by default: timed on
the H200, the group sums with column sums took 2.4-4.8x the time of the plain group sums, more than the bias
kernel's own pass (2026-12-05, docs/benchmarks.md). (The first design added
every row block's sums atomically from the group-sum programs: at MIMO R = 4, B 8, L 2K, 64 heads, 33M atomic adds onto
32K addresses. It took 1.37 ms on the H200, 8.5× its SISO time where every other kernel took ≈ 4×,
which pointed at the atomics; this design makes 0.5M, and took 1.36 ms all the same: see the bias
kernel.)
The same math as the torch reductions these replaced (per-head values in q's dtype, fp32 sums).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.mamba3.tuning import KernelTuning, kernel_tuning


@triton.jit
def _group_sums_kernel(DQ_HEADS, DK_HEADS, DQ, DK, DQ_COLUMNS, DK_COLUMNS, n_rows, n_heads, heads_per_group,
                       n_groups, d_state, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEADS: tl.constexpr,
                       COLUMN_SUMS: tl.constexpr):
    """Program (row block, group, q or k). A load takes HEADS neighbouring heads of a row (HEADS·N values
    side by side in memory), so a program keeps HEADS times the bytes in flight of a head-by-head walk;
    the heads are told apart once, after the walk (a reshape in the loop would move every tile through
    shared memory). COLUMN_SUMS (one rank: a row is a token): each load's column sums, this row block's
    share of its heads' bias gradients, go to row ``program_id(0)`` of DQ_COLUMNS / DK_COLUMNS (blocks, H, N)."""
    X, OUT, COLUMNS = DQ_HEADS, DQ, DQ_COLUMNS
    if tl.program_id(2) == 1:
        X, OUT, COLUMNS = DK_HEADS, DK, DK_COLUMNS
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # row = token·R + rank
    g = tl.program_id(1)
    cols = tl.arange(0, HEADS * BLOCK_N)  # head j·HEADS + cols // BLOCK_N, column cols % BLOCK_N
    head = cols // BLOCK_N
    n = cols % BLOCK_N
    mask = (rows < n_rows)[:, None] & (n < d_state)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    total = tl.zeros([BLOCK_ROWS, HEADS * BLOCK_N], dtype=tl.float32)
    for j in range(0, heads_per_group, HEADS):
        h = g * heads_per_group + j + head
        in_group = (j + head < heads_per_group)[None, :]
        x = tl.load(X + (rows64 * n_heads + h[None, :]) * d_state + n[None, :], mask=mask & in_group,
                    other=0.0).to(tl.float32)
        total += x
        if COLUMN_SUMS:
            tl.store(COLUMNS + (tl.program_id(0).to(tl.int64) * n_heads + h) * d_state + n, tl.sum(x, 0),
                     mask=(n < d_state) & (j + head < heads_per_group))
    sums = tl.sum(tl.reshape(total, (BLOCK_ROWS, HEADS, BLOCK_N)), axis=1)
    n_out = tl.arange(0, BLOCK_N)
    out_mask = (rows < n_rows)[:, None] & (n_out < d_state)[None, :]
    tl.store(OUT + (rows64 * n_groups + g) * d_state + n_out[None, :], sums.to(OUT.dtype.element_ty), mask=out_mask)


@triton.jit
def _bias_sums_kernel(DQ_HEADS, DK_HEADS, DQ_BIAS, DK_BIAS, n_rows, rows_per_program, n_heads, d_state,
                      R: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (run of rows, head, q or k): one head's per-rank column sums over ``rows_per_program``
    rows (a multiple of BLOCK_ROWS, itself of R: a token's R rows stay in one block), added once."""
    X, BIAS = DQ_HEADS, DQ_BIAS
    if tl.program_id(2) == 1:
        X, BIAS = DK_HEADS, DK_BIAS
    h = tl.program_id(1)
    n = tl.arange(0, BLOCK_N)
    n_mask = n < d_state
    # Tile row i always holds rank i % R (every row0 is a multiple of BLOCK_ROWS, itself of R), so the
    # tiles are added as they come and split by rank once at the end: a reshape in the loop moved
    # every tile through shared memory (1.36 ms at MIMO R = 4, d_state 128, B 8, L 2K on an H200,
    # where the group sums read the same bytes in 0.59 ms).
    acc = tl.zeros([BLOCK_ROWS, BLOCK_N], dtype=tl.float32)
    first = tl.program_id(0) * rows_per_program
    for row0 in range(first, tl.minimum(first + rows_per_program, n_rows), BLOCK_ROWS):
        rows = row0 + tl.arange(0, BLOCK_ROWS)
        mask = (rows < n_rows)[:, None] & n_mask[None, :]
        x = tl.load(X + (rows.to(tl.int64)[:, None] * n_heads + h) * d_state + n[None, :], mask=mask, other=0.0)
        acc += x.to(tl.float32)
    sums = tl.sum(tl.reshape(acc, (BLOCK_ROWS // R, R, BLOCK_N)), axis=0)
    ranks = tl.arange(0, R)
    tl.atomic_add(BIAS + (h * R + ranks[:, None]) * d_state + n[None, :], sums, mask=n_mask[None, :], sem="relaxed")


BIAS_PROGRAMS = 1024  # programs the bias sums aim at: ≈ 8 an SM on an H200


def bias_rows_for(n_rows: int, n_heads: int) -> int:
    """Rows one bias program sums: a power of two from 1024 to 4096 that makes about BIAS_PROGRAMS programs
    (q and k, every head). Fewer programs leave too few loads in flight, more add atomics. Measured on the
    H200 (B 8, L 2K, d_state 64, 32 heads; docs/benchmarks.md): SISO 106 µs at 4096 rows (256 programs), 72 µs
    at 1024 (1,024); MIMO R = 4 279 µs at 4096 (1,024 programs), 311 µs at 1024 (4,096)."""
    wanted = n_rows * n_heads * 2 // BIAS_PROGRAMS
    return min(4096, max(1024, triton.next_power_of_2(max(1, wanted))))


TILE_VALUES = 4096  # values a program of either kernel adds per load: 32 fp32 registers a thread at 4 warps
GROUP_SPAN = 256  # values of a row one group-sum load takes side by side (512 bytes of bf16)


def group_heads_for(heads_per_group: int, block_n: int, tuning: KernelTuning) -> int:
    """Heads one load of the group sums takes: ``tuning.triton_group_heads``, or enough for GROUP_SPAN
    contiguous values a row; never more than the group's heads (rounded up to a power of two)."""
    wanted = tuning.triton_group_heads or max(1, GROUP_SPAN // block_n)
    return min(wanted, triton.next_power_of_2(heads_per_group))


def head_sums(dq_heads: Tensor, dk_heads: Tensor, n_groups: int, has_bias: bool, tuning: KernelTuning | None = None
              ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """dq_heads, dk_heads (T, R, H, N), contiguous -> dq, dk (T, R, G, N) in their dtype and, with
    biases, dq_bias, dk_bias (H, R, N) fp32. With one head per group dq, dk are the inputs.
    ``tuning``: the scan's knobs (``triton_group_heads``, ``triton_bias_rows``), default those in force."""
    T, R, H, N = dq_heads.shape
    tuning = tuning or kernel_tuning()
    block_n = max(16, triton.next_power_of_2(N))
    block_rows = max(R, min(64, TILE_VALUES // block_n))  # the bias sums' tile: no spills, many programs
    dq, dk = dq_heads, dk_heads
    columns = None  # with the bias sums folded into the group sums: each row block's per-head column sums
    if H != n_groups:
        dq = dq_heads.new_empty(T, R, n_groups, N)
        dk = dk_heads.new_empty(T, R, n_groups, N)
        if T:
            heads = group_heads_for(H // n_groups, block_n, tuning)
            group_rows = max(1, TILE_VALUES // (heads * block_n))
            blocks = triton.cdiv(T * R, group_rows)
            # MIMO keeps the bias kernel: a rank's column sums out of a tile of several ranks' rows compiled to
            # 503 instructions a load (masked sums), against 278 for the group and bias loads together
            if has_bias and R == 1 and tuning.triton_bias_in_group_sums:
                columns = torch.empty(2, blocks, H, N, device=dq_heads.device, dtype=torch.float32)
            _group_sums_kernel[(blocks, n_groups, 2)](
                dq_heads, dk_heads, dq, dk, *(columns if columns is not None else (dq, dk)), T * R, H,
                H // n_groups, n_groups, N, BLOCK_ROWS=group_rows, BLOCK_N=block_n, HEADS=heads,
                COLUMN_SUMS=columns is not None)
    if not has_bias:
        return dq, dk, None, None
    if columns is not None:  # every (block, head) column sum written: no zeros; the blocks summed here
        return dq, dk, columns[0].sum(0).view(H, 1, N), columns[1].sum(0).view(H, 1, N)
    dq_bias = torch.zeros(H, R, N, device=dq_heads.device, dtype=torch.float32)
    dk_bias = torch.zeros(H, R, N, device=dq_heads.device, dtype=torch.float32)
    if T:
        bias_rows = tuning.triton_bias_rows or bias_rows_for(T * R, H)
        rows_per_program = max(block_rows, bias_rows // block_rows * block_rows)
        _bias_sums_kernel[(triton.cdiv(T * R, rows_per_program), H, 2)](
            dq_heads, dk_heads, dq_bias, dk_bias, T * R, rows_per_program, H, N, R=R, BLOCK_ROWS=block_rows,
            BLOCK_N=block_n)
    return dq, dk, dq_bias, dk_bias
