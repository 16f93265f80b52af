"""The scan's per-token inputs from in_proj's output in one kernel each way: B and C through their
RMSNorm, and Δ, A·Δ, λ from their projections (:func:`hybridlm.kernels.mamba3.oracle.mamba3_inputs`).

In plain torch these are about 35 small ops forward and 60 backward a layer (each norm seven
forward, each activation three or four), every one a launch over a few MB: ≈ 0.4 ms of a SISO
layer's forward+backward on an H200 at B 8, L 2K (session 19's profile put all the layer's torch
glue at ≈ 0.8 ms). Here a program takes a block of tokens: every (rank, group) row of B and C is
normed, every head's scalars computed, in one pass over the bytes; the backward recomputes the
norms' factors and the activations from the same inputs and writes every input gradient, with
the reductions over tokens (the norm weights', dt_bias's) as one partial row per program summed
by torch.

Arithmetic is fp32; q, k are returned in B/C's dtype, Δ, A·Δ, λ in fp32, as the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.mamba3.triton.activations import a_magnitude, a_magnitude_slope, softplus
from hybridlm.kernels.mamba3.triton.interpreter_compat import device_type_reason, dtypes_reason

# values a program holds of B (and as many of C): rows of (rank, group) × d_state, whole tokens
TILE_VALUES = 4096
MAX_TOKENS = 64
MAX_HEADS = 1024
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _norm_rows(X, s_x, t0, T, RG, N, eps, BLOCK_T: tl.constexpr, BLOCK_RG: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """The block's (token, rank·group) rows of X (token stride s_x, rows of N contiguous): values
    (fp32), x·rstd, rstd, the mask and each value's offset in a contiguous (T, RG, N) tensor."""
    i = tl.arange(0, BLOCK_T * BLOCK_RG)
    t = t0 + i // BLOCK_RG
    rg = i % BLOCK_RG
    n = tl.arange(0, BLOCK_N)
    mask = ((t < T) & (rg < RG))[:, None] & (n < N)[None, :]
    x = tl.load(X + t.to(tl.int64)[:, None] * s_x + rg[:, None] * N + n[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / N + eps)
    packed = (t.to(tl.int64) * RG + rg)[:, None] * N + n[None, :]
    return x, x * rstd[:, None], rstd, mask, packed


@triton.jit
def _norm_fwd(X, W, OUT, s_x, t0, T, RG, N, eps, BLOCK_T: tl.constexpr, BLOCK_RG: tl.constexpr,
              BLOCK_N: tl.constexpr):
    n = tl.arange(0, BLOCK_N)
    w = tl.load(W + n, mask=n < N, other=0.0).to(tl.float32)
    _, xhat, _, mask, packed = _norm_rows(X, s_x, t0, T, RG, N, eps, BLOCK_T, BLOCK_RG, BLOCK_N)
    tl.store(OUT + packed, (xhat * w[None, :]).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd(X, W, G, DX, PARTIAL, s_x, t0, T, RG, N, eps, BLOCK_T: tl.constexpr, BLOCK_RG: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """dX of the block's rows; the weight's gradient over them into PARTIAL (N values)."""
    n = tl.arange(0, BLOCK_N)
    w = tl.load(W + n, mask=n < N, other=0.0).to(tl.float32)
    _, xhat, rstd, mask, packed = _norm_rows(X, s_x, t0, T, RG, N, eps, BLOCK_T, BLOCK_RG, BLOCK_N)
    g = tl.load(G + packed, mask=mask, other=0.0).to(tl.float32)
    tl.store(PARTIAL + n, tl.sum(g * xhat, 0), mask=n < N)
    gw = g * w[None, :]
    dx = rstd[:, None] * (gw - xhat * (tl.sum(gw * xhat, 1) / N)[:, None])
    tl.store(DX + packed, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _head_tile(t0, T, H, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """The block's (token, head) tile: token rows (int64), heads, mask, offsets in a (T, H) tensor."""
    t = t0 + tl.arange(0, BLOCK_T)
    h = tl.arange(0, BLOCK_H)
    mask = (t < T)[:, None] & (h < H)[None, :]
    rows = t.to(tl.int64)[:, None]
    return rows, h, mask, rows * H + h[None, :]


@triton.jit
def _inputs_fwd_kernel(B, C, WB, WC, DDT, DA, TRAP, DT_BIAS, K, Q, DT, ADT, LAM,
                       T, H, RG, N, s_b, s_c, s_dt, s_da, s_trap, eps_b, eps_c, A_floor, lam_constant,
                       BLOCK_T: tl.constexpr, BLOCK_RG: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_H: tl.constexpr, HEAVY_TAIL: tl.constexpr, HAS_TRAP: tl.constexpr):
    t0 = tl.program_id(0) * BLOCK_T
    _norm_fwd(B, WB, K, s_b, t0, T, RG, N, eps_b, BLOCK_T, BLOCK_RG, BLOCK_N)
    _norm_fwd(C, WC, Q, s_c, t0, T, RG, N, eps_c, BLOCK_T, BLOCK_RG, BLOCK_N)

    rows, h, mask, out = _head_tile(t0, T, H, BLOCK_T, BLOCK_H)
    bias = tl.load(DT_BIAS + h, mask=h < H, other=0.0).to(tl.float32)
    dt = softplus(tl.load(DDT + rows * s_dt + h[None, :], mask=mask, other=0.0).to(tl.float32) + bias[None, :])
    a = tl.load(DA + rows * s_da + h[None, :], mask=mask, other=0.0).to(tl.float32)
    A = -tl.maximum(a_magnitude(a, HEAVY_TAIL), A_floor)
    tl.store(DT + out, dt, mask=mask)
    tl.store(ADT + out, A * dt, mask=mask)
    if HAS_TRAP:
        lam = tl.sigmoid(tl.load(TRAP + rows * s_trap + h[None, :], mask=mask, other=0.0).to(tl.float32))
    else:
        lam = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32) + lam_constant
    tl.store(LAM + out, lam, mask=mask)


@triton.jit
def _inputs_bwd_kernel(B, C, WB, WC, DDT, DA, TRAP, DT_BIAS, DK, DQ, GDT, GADT, GLAM,
                       DB, DC, DDDT, DDA, DTRAP, PARTIAL,
                       T, H, RG, N, s_b, s_c, s_dt, s_da, s_trap, eps_b, eps_c, A_floor,
                       BLOCK_T: tl.constexpr, BLOCK_RG: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_H: tl.constexpr, HEAVY_TAIL: tl.constexpr, HAS_TRAP: tl.constexpr):
    """Input gradients of the block's tokens (contiguous); PARTIAL's row of
    this program: d dt_bias (H), then the B and C norm weights' gradients over these tokens (N each)."""
    pid = tl.program_id(0)
    t0 = pid * BLOCK_T
    partial = PARTIAL + pid.to(tl.int64) * (H + 2 * N)
    _norm_bwd(B, WB, DK, DB, partial + H, s_b, t0, T, RG, N, eps_b, BLOCK_T, BLOCK_RG, BLOCK_N)
    _norm_bwd(C, WC, DQ, DC, partial + H + N, s_c, t0, T, RG, N, eps_c, BLOCK_T, BLOCK_RG, BLOCK_N)

    rows, h, mask, out = _head_tile(t0, T, H, BLOCK_T, BLOCK_H)
    bias = tl.load(DT_BIAS + h, mask=h < H, other=0.0).to(tl.float32)
    s = tl.load(DDT + rows * s_dt + h[None, :], mask=mask, other=0.0).to(tl.float32) + bias[None, :]
    dt = softplus(s)
    a = tl.load(DA + rows * s_da + h[None, :], mask=mask, other=0.0).to(tl.float32)
    magnitude = a_magnitude(a, HEAVY_TAIL)
    A = -tl.maximum(magnitude, A_floor)
    g_adt = tl.load(GADT + out, mask=mask, other=0.0)
    g_dt = tl.load(GDT + out, mask=mask, other=0.0) + g_adt * A
    ds = tl.where(s > 20.0, g_dt, g_dt * tl.sigmoid(s))
    tl.store(DDDT + out, ds.to(DDDT.dtype.element_ty), mask=mask)
    tl.store(partial + h, tl.sum(ds, 0), mask=h < H)
    # A = −max(|A|, floor): no gradient below the floor (at it, as torch's clamp, the gradient passes)
    da = tl.where(magnitude >= A_floor, -(g_adt * dt), 0.0) * a_magnitude_slope(a, HEAVY_TAIL)
    tl.store(DDA + out, da.to(DDA.dtype.element_ty), mask=mask)
    if HAS_TRAP:
        lam = tl.sigmoid(tl.load(TRAP + rows * s_trap + h[None, :], mask=mask, other=0.0).to(tl.float32))
        dtrap = tl.load(GLAM + out, mask=mask, other=0.0) * lam * (1.0 - lam)
        tl.store(DTRAP + out, dtrap.to(DTRAP.dtype.element_ty), mask=mask)


def _tokens(t: Tensor) -> Tensor:
    """(..., C) -> (T, C) with unit column stride (a view of an in_proj segment where possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _blocks(RG: int, N: int, H: int) -> dict:
    block_rg, block_n = triton.next_power_of_2(RG), triton.next_power_of_2(N)
    tokens = max(1, min(MAX_TOKENS, TILE_VALUES // (block_rg * block_n)))
    return dict(BLOCK_T=tokens, BLOCK_RG=block_rg, BLOCK_N=block_n, BLOCK_H=triton.next_power_of_2(H))


def _sizes(b: Tensor, dd_dt: Tensor, b_norm: Tensor):
    N, H = b_norm.shape[0], dd_dt.shape[-1]
    return b.numel() // b.shape[-1], H, b.shape[-1] // N, N  # T, H, R·G, N


def _scalar_args(eps_b: float, eps_c: float, A_floor: float, heavy_tail: bool, has_trap: bool, blocks: dict):
    return dict(eps_b=eps_b, eps_c=eps_c, A_floor=A_floor, HEAVY_TAIL=heavy_tail, HAS_TRAP=has_trap, **blocks)


@torch.library.custom_op("hybridlm::mamba3_inputs_fwd", mutates_args=())
def inputs_fwd(b: Tensor, c: Tensor, dd_dt: Tensor, dd_a: Tensor, trap: Tensor | None, dt_bias: Tensor,
               b_norm: Tensor, c_norm: Tensor, rank: int, eps_b: float, eps_c: float, A_floor: float,
               heavy_tail: bool, lam_constant: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """b, c (..., R·G·N); dd_dt, dd_a, trap (..., H) -> k, q (..., R, G, N) in b's dtype; Δ, A·Δ, λ (..., H) fp32."""
    T, H, RG, N = _sizes(b, dd_dt, b_norm)
    lead = b.shape[:-1]
    bt, ct, dtt, dat = _tokens(b), _tokens(c), _tokens(dd_dt), _tokens(dd_a)
    trapt = _tokens(trap) if trap is not None else dtt
    k = torch.empty(*lead, rank, RG // rank, N, dtype=b.dtype, device=b.device)
    q = torch.empty_like(k)
    dt, adt, lam = (torch.empty(*lead, H, dtype=torch.float32, device=b.device) for _ in range(3))
    blocks = _blocks(RG, N, H)
    if T:
        _inputs_fwd_kernel[(triton.cdiv(T, blocks["BLOCK_T"]),)](
            bt, ct, b_norm, c_norm, dtt, dat, trapt, dt_bias, k, q, dt, adt, lam, T, H, RG, N,
            bt.stride(0), ct.stride(0), dtt.stride(0), dat.stride(0), trapt.stride(0), lam_constant=lam_constant,
            **_scalar_args(eps_b, eps_c, A_floor, heavy_tail, trap is not None, blocks))
    return k, q, dt, adt, lam


@inputs_fwd.register_fake
def _(b, c, dd_dt, dd_a, trap, dt_bias, b_norm, c_norm, rank, eps_b, eps_c, A_floor, heavy_tail, lam_constant):
    N, H = b_norm.shape[0], dd_dt.shape[-1]
    k = b.new_empty(*b.shape[:-1], rank, b.shape[-1] // (rank * N), N)
    scalars = [dd_dt.new_empty(*dd_dt.shape, dtype=torch.float32) for _ in range(3)]
    return k, torch.empty_like(k), *scalars


@torch.library.custom_op("hybridlm::mamba3_inputs_bwd", mutates_args=())
def inputs_bwd(b: Tensor, c: Tensor, dd_dt: Tensor, dd_a: Tensor, trap: Tensor | None, dt_bias: Tensor,
               b_norm: Tensor, c_norm: Tensor, dk: Tensor, dq: Tensor, ddt: Tensor, dadt: Tensor, dlam: Tensor,
               rank: int, eps_b: float, eps_c: float, A_floor: float, heavy_tail: bool,
               lam_constant: float) -> list[Tensor]:
    """[db, dc, d dd_dt, d dd_a, d trap (empty without trap), d dt_bias, d b_norm, d c_norm], each in
    its input's dtype and shape (contiguous)."""
    T, H, RG, N = _sizes(b, dd_dt, b_norm)
    bt, ct, dtt, dat = _tokens(b), _tokens(c), _tokens(dd_dt), _tokens(dd_a)
    trapt = _tokens(trap) if trap is not None else dtt
    db, dc, d_ddt, d_da = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (b, c, dd_dt, dd_a))
    d_trap = torch.empty_like(trap, memory_format=torch.contiguous_format) if trap is not None else dd_dt.new_empty(0)
    blocks = _blocks(RG, N, H)
    programs = triton.cdiv(T, blocks["BLOCK_T"])
    partial = torch.empty(programs, H + 2 * N, dtype=torch.float32, device=b.device)  # each program writes its row
    if T:
        _inputs_bwd_kernel[(programs,)](
            bt, ct, b_norm, c_norm, dtt, dat, trapt, dt_bias, dk.contiguous(), dq.contiguous(),
            ddt.float().contiguous(), dadt.float().contiguous(), dlam.float().contiguous(),
            db, dc, d_ddt, d_da, d_trap if trap is not None else d_ddt, partial, T, H, RG, N,
            bt.stride(0), ct.stride(0), dtt.stride(0), dat.stride(0), trapt.stride(0),
            **_scalar_args(eps_b, eps_c, A_floor, heavy_tail, trap is not None, blocks))
    d_bias, d_bn, d_cn = partial.sum(0).split([H, N, N])  # copies: an op's outputs may not share storage
    return [db, dc, d_ddt, d_da, d_trap, d_bias.to(dt_bias.dtype, copy=True), d_bn.to(b_norm.dtype, copy=True),
            d_cn.to(c_norm.dtype, copy=True)]


@inputs_bwd.register_fake
def _(b, c, dd_dt, dd_a, trap, dt_bias, b_norm, c_norm, dk, dq, ddt, dadt, dlam, rank, eps_b, eps_c, A_floor,
      heavy_tail, lam_constant):
    like = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (b, c, dd_dt, dd_a)]
    d_trap = torch.empty_like(trap, memory_format=torch.contiguous_format) if trap is not None else dd_dt.new_empty(0)
    return [*like, d_trap, torch.empty_like(dt_bias), torch.empty_like(b_norm), torch.empty_like(c_norm)]


_SCALARS = ("rank", "eps_b", "eps_c", "A_floor", "heavy_tail", "lam_constant")


def _setup_context(ctx, inputs, output):
    b, c, dd_dt, dd_a, trap, dt_bias, b_norm, c_norm, *scalars = inputs
    ctx.save_for_backward(b, c, dd_dt, dd_a, trap, dt_bias, b_norm, c_norm)
    ctx.scalars = scalars


def _or_zeros(grad: Tensor | None, shape, dtype: torch.dtype, like: Tensor) -> Tensor:
    """An output's gradient, or zeros where autograd passes None (the output was not used)."""
    return grad if grad is not None else torch.zeros(shape, dtype=dtype, device=like.device)


def _backward(ctx, dk, dq, ddt, dadt, dlam):
    b, c, dd_dt, dd_a, trap, dt_bias, b_norm, c_norm = ctx.saved_tensors
    rank, N = ctx.scalars[0], b_norm.shape[0]
    k_shape = (*b.shape[:-1], rank, b.shape[-1] // (rank * N), N)
    dk, dq = (_or_zeros(g, k_shape, b.dtype, b) for g in (dk, dq))
    ddt, dadt, dlam = (_or_zeros(g, dd_dt.shape, torch.float32, b) for g in (ddt, dadt, dlam))
    grads = inputs_bwd(b, c, dd_dt, dd_a, trap, dt_bias, b_norm, c_norm, dk, dq, ddt, dadt, dlam, *ctx.scalars)
    db, dc, d_ddt, d_da, d_trap, d_bias, d_bn, d_cn = grads
    return (db, dc, d_ddt, d_da, d_trap if trap is not None else None, d_bias, d_bn, d_cn) + (None,) * len(_SCALARS)


inputs_fwd.register_autograd(_backward, setup_context=_setup_context)


def mamba3_inputs(b: Tensor, c: Tensor, dd_dt: Tensor, dd_a: Tensor, trap: Tensor | None, dt_bias: Tensor,
                  b_norm: Tensor, c_norm: Tensor, *, rank: int, a_activation: str, A_floor: float,
                  discretization: str, b_eps: float, c_eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """As :func:`hybridlm.kernels.mamba3.oracle.mamba3_inputs`: (q, k, Δ, A·Δ, λ)."""
    lam_constant = 1.0 if discretization == "euler" else 0.5  # λ without a trap projection, as the reference
    k, q, dt, adt, lam = inputs_fwd(b, c, dd_dt, dd_a, trap, dt_bias, b_norm, c_norm, rank, b_eps, c_eps, A_floor,
                                    a_activation == "heavy_tail", lam_constant)
    return q, k, dt, adt, lam


def unsupported_reason(device: torch.device, bc_width: int, heads: int, dtypes: tuple[torch.dtype, ...]) -> str | None:
    """Why the kernels cannot take these inputs (plain values: B's row width, the head count, the
    dtypes of B, C, the projections and the norm weights), or None."""
    reason = device_type_reason(device, "the Triton kernels") or dtypes_reason(dtypes, DTYPES)
    if reason:
        return reason
    if triton.next_power_of_2(bc_width) > TILE_VALUES:
        return f"B/C rows of {bc_width} values (the kernel holds at most {TILE_VALUES} of a token)"
    if heads > MAX_HEADS:
        return f"{heads} heads (the kernel holds at most {MAX_HEADS} of a token)"
    return None
