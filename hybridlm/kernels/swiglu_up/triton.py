"""SwiGLU's up projection and gate as one Triton kernel for decode-sized inputs (a few rows).

At batch 1 a SwiGLU block is three weight reads (w1, w3, w2) and, through cuBLAS, three GEMV
kernels plus the gate; this kernel reads w1 and w3 side by side and writes ``silu(x w1ᵀ) * (x w3ᵀ)``
directly: one launch instead of three, no (rows, hidden) intermediates. Each program owns
``BLOCK_N`` hidden units and streams both weights over d_model, each weight tile used by every
row of x (at most ``MAX_ROWS``). Roundings are the reference's (hybridlm/kernels/swiglu_up/reference.py):
both projections accumulate in fp32 and are rounded to the dtype, then silu in fp32 rounded, then
the product. A ``torch.library`` custom op (opaque to ``torch.compile``, capturable in a CUDA
graph); no backward (inference only).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.mamba3.triton.interpreter_compat import device_type_reason, one_dtype_reason
from hybridlm.kernels.swiglu_up import MAX_ROWS  # one tensor-core tile of rows: decode steps up to batch 16

BLOCK_N = 16  # hidden units a program: 352 programs at the 1.5B presets' hidden 5,632
BLOCK_K = 256
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _silu_mul_gemv_kernel(X, W1, W3, OUT, M, N, K, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    # Weight tiles (BLOCK_N, BLOCK_K) with d_model last: each row of w1 / w3 is read contiguously.
    # The rows of x go one at a time through the loaded tiles (CUDA-core multiply-adds: at ≤ 16 rows
    # the kernel waits on the weights, and a padded tensor-core tile would do 16× the work at batch 1).
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, ROWS)
    col_in = cols < N
    gate = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_in = ks < K
        w_at = cols[:, None].to(tl.int64) * K + ks[None, :]
        w_mask = col_in[:, None] & k_in[None, :]
        w1 = tl.load(W1 + w_at, mask=w_mask, other=0.0).to(tl.float32)
        w3 = tl.load(W3 + w_at, mask=w_mask, other=0.0).to(tl.float32)
        for r in tl.static_range(ROWS):
            x = tl.load(X + r * K + ks, mask=k_in & (r < M), other=0.0).to(tl.float32)
            here = (rows == r)[:, None]
            gate = tl.where(here, gate + tl.sum(w1 * x[None, :], axis=1)[None, :], gate)
            up = tl.where(here, up + tl.sum(w3 * x[None, :], axis=1)[None, :], up)
    dtype = OUT.dtype.element_ty
    g = gate.to(dtype).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    out = silu * up.to(dtype).to(tl.float32)
    tl.store(OUT + rows[:, None] * N + cols[None, :], out.to(dtype), mask=(rows < M)[:, None] & col_in[None, :])


@torch.library.custom_op("hybridlm::silu_mul_gemv", mutates_args=())
def silu_mul_gemv_op(x: Tensor, w1: Tensor, w3: Tensor) -> Tensor:
    """x (rows <= MAX_ROWS, K), w1 and w3 (N, K), all contiguous and of one dtype -> (rows, N)."""
    rows, k = x.shape
    n = w1.shape[0]
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    if rows and n:
        _silu_mul_gemv_kernel[(triton.cdiv(n, BLOCK_N),)](
            x, w1, w3, out, rows, n, k, ROWS=triton.next_power_of_2(rows), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out


@silu_mul_gemv_op.register_fake
def _(x: Tensor, w1: Tensor, w3: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], w1.shape[0])


def silu_mul_gemv(x: Tensor, w1: Tensor, w3: Tensor) -> Tensor:
    """As :func:`hybridlm.kernels.swiglu_up.reference.silu_mul_gemv`, in one kernel."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    return silu_mul_gemv_op(flat, w1.contiguous(), w3.contiguous()).view(*x.shape[:-1], w1.shape[0])


def unsupported_reason(device: torch.device, dtypes: tuple[torch.dtype, ...], rows: int) -> str | None:
    """Why the kernel cannot take these inputs (plain values); None when it can."""
    return (device_type_reason(device, "the Triton SwiGLU GEMV kernel") or one_dtype_reason(dtypes, DTYPES)
            or (None if rows <= MAX_ROWS else f"{rows} rows (a decode-sized input takes at most {MAX_ROWS})"))
