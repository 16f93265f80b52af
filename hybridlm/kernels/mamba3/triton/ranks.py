"""The MIMO rank expansion of x as one kernel each way: v[t, r, h] = x[t, h] ⊙ mimo_x[h, r].

Backward: dx[t, h] = Σ_r dv[t, r, h] ⊙ mimo_x[h, r] and d mimo_x[h, r] = Σ_t dv[t, r, h] ⊙ x[t, h],
one read of dv and x (as torch ops, the broadcast products and their two reductions pass over the
(T, R, H, P) tensors five times). A program takes a block of tokens of one head; its share of
d mimo_x goes to a per-block partial that a small torch sum reduces.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.mamba3.triton.output import rank_rows, rank_vector, token_block, token_tiling

BLOCK_T = 64  # tokens a program, unless KernelTuning.triton_output_block_t says otherwise


@triton.jit
def _expand_fwd_kernel(X, MIMO_X, V, n_tokens, n_heads, headdim, x_row,
                       R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_t, h = tl.program_id(0), tl.program_id(1)
    t64, p, p_mask, mask = token_block(pid_t, n_tokens, headdim, BLOCK_T, BLOCK_P)
    x = tl.load(X + t64 * x_row + h * headdim + p[None, :], mask=mask, other=0.0).to(tl.float32)
    for r in tl.static_range(R):
        w = rank_vector(MIMO_X, h, r, headdim, p, p_mask, R)
        tl.store(V + (t64 * R + r) * (n_heads * headdim) + h * headdim + p[None, :],
                 (x * w).to(V.dtype.element_ty), mask=mask)


@triton.jit
def _expand_bwd_kernel(DV, X, MIMO_X, DX, DMIMO_PARTIAL, n_tokens, n_heads, headdim, x_row,
                       R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    """Every rank's dv rows and mimo_x rows are loaded before the first store (of a partial), since the
    compiler moves no load above a store to a tensor it cannot prove apart: one round trip to memory a
    program, not R (343 -> 278 us at B 8, L 2K, R 4, d_model 2048 on an H200, 2026-12-05)."""
    pid_t, h = tl.program_id(0), tl.program_id(1)
    t64, p, p_mask, mask = token_block(pid_t, n_tokens, headdim, BLOCK_T, BLOCK_P)
    x = tl.load(X + t64 * x_row + h * headdim + p[None, :], mask=mask, other=0.0).to(tl.float32)
    dx = tl.zeros([BLOCK_T, BLOCK_P], dtype=tl.float32)
    partial = DMIMO_PARTIAL + (pid_t.to(tl.int64) * n_heads + h) * R * headdim
    dvs, ws = (), ()
    for r in tl.static_range(R):
        dvs = dvs + (rank_rows(DV, t64, r, h, n_heads, headdim, p, mask, R),)
        ws = ws + (rank_vector(MIMO_X, h, r, headdim, p, p_mask, R),)
    for r in tl.static_range(R):
        w = ws[r]
        dv = dvs[r].to(tl.float32)
        dx += dv * w
        tl.store(partial + r * headdim + p, tl.sum(dv * x, 0), mask=p_mask)
    tl.store(DX + t64 * (n_heads * headdim) + h * headdim + p[None, :], dx.to(DX.dtype.element_ty), mask=mask)


def _launch_dims(x: Tensor) -> tuple[int, int, int, int]:
    T, H, P = x.shape
    return T, H, P, max(16, triton.next_power_of_2(P))


def _rows(x: Tensor) -> Tensor:
    """x with its heads and P contiguous inside a token (tokens may be strided: an in_proj slice)."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


@torch.library.custom_op("hybridlm::expand_ranks_fwd", mutates_args=())
def expand_ranks_fwd(x: Tensor, mimo_x: Tensor) -> Tensor:
    """x (T, H, P) with a contiguous last axis, mimo_x (H, R, P) fp32 -> v (T, R, H, P) in x's dtype."""
    x = _rows(x)
    T, H, P, block_p = _launch_dims(x)
    R = mimo_x.shape[1]
    v = torch.empty(T, R, H, P, device=x.device, dtype=x.dtype)
    block_t, warps = token_tiling(BLOCK_T)
    if T:
        _expand_fwd_kernel[(triton.cdiv(T, block_t), H)](
            x, mimo_x.float().contiguous(), v, T, H, P, x.stride(0), R=R, BLOCK_T=block_t, BLOCK_P=block_p,
            num_warps=warps)
    return v


@expand_ranks_fwd.register_fake
def _(x, mimo_x):
    T, H, P = x.shape
    return x.new_empty(T, mimo_x.shape[1], H, P)


@torch.library.custom_op("hybridlm::expand_ranks_bwd", mutates_args=())
def expand_ranks_bwd(dv: Tensor, x: Tensor, mimo_x: Tensor) -> tuple[Tensor, Tensor]:
    """dv (T, R, H, P) -> dx (T, H, P) in x's dtype and d mimo_x (H, R, P) fp32."""
    x = _rows(x)
    T, H, P, block_p = _launch_dims(x)
    R = mimo_x.shape[1]
    dv = dv.contiguous()
    dx = torch.empty(T, H, P, device=x.device, dtype=x.dtype)
    block_t, warps = token_tiling(BLOCK_T)
    n_blocks = triton.cdiv(T, block_t)
    # every (block, head) program writes its partial whole: no zero fill (T = 0 sums no blocks)
    partial = torch.empty(n_blocks, H, R, P, device=x.device, dtype=torch.float32)
    if T:
        _expand_bwd_kernel[(n_blocks, H)](
            dv, x, mimo_x.float().contiguous(), dx, partial, T, H, P, x.stride(0), R=R, BLOCK_T=block_t,
            BLOCK_P=block_p, num_warps=warps)
    return dx, partial.sum(0)


@expand_ranks_bwd.register_fake
def _(dv, x, mimo_x):
    T, H, P = x.shape
    return x.new_empty(T, H, P), x.new_empty(H, mimo_x.shape[1], P, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dv: Tensor):
    x, mimo_x = ctx.saved_tensors
    dx, dmimo = expand_ranks_bwd(dv, x, mimo_x)
    return dx, dmimo.to(mimo_x.dtype)


expand_ranks_fwd.register_autograd(_backward, setup_context=_setup_context)
