"""The output stage as one fused kernel each way: per-rank gate silu(z ⊙ mimo_z), the grouped RMS
norms (over each head's P values, before or after the gate), and the rank contraction with mimo_o.

y (T, R, H, P) -> out (T, H, P), the same function as :func:`oracle (shared.mamba3_output)` for
``out_norm`` in none | pregate_grouped | postgate_grouped. The "default" norms take the RMS over
all H·P values of a token, across the heads of a program; they stay on the torch path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.mamba3.tuning import kernel_tuning

FUSED_NORMS = {"none": 0, "pregate_grouped": 1, "postgate_grouped": 2}
BLOCK_T = 32  # tokens a program, unless KernelTuning.triton_output_block_t says otherwise


def token_tiling(default_block_t: int) -> tuple[int, int]:
    """(tokens a program, warps) of the token-block kernels here and in ranks.py: the tuning's
    ``triton_output_block_t`` / ``triton_output_warps``, else ``default_block_t`` and 4."""
    tuning = kernel_tuning()
    return tuning.triton_output_block_t or default_block_t, tuning.triton_output_warps or 4


@triton.jit
def _silu_parts(z):
    sig = 1.0 / (1.0 + tl.exp(-z))
    return z * sig, sig * (1.0 + z * (1.0 - sig))  # silu(z), silu'(z)


@triton.jit
def token_block(pid_t, n_tokens, headdim, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    """A program's block of tokens of one head: token offsets (BLOCK_T, 1), p, and the masks."""
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    p = tl.arange(0, BLOCK_P)
    p_mask = p < headdim
    return t.to(tl.int64)[:, None], p, p_mask, (t < n_tokens)[:, None] & p_mask[None, :]


@triton.jit
def rank_rows(X, t64, r, h, n_heads, headdim, p, mask, R: tl.constexpr):
    """Rank r's rows (BLOCK_T, BLOCK_P) of head h in a (T, R, H, P) tensor, in X's dtype."""
    return tl.load(X + (t64 * R + r) * (n_heads * headdim) + h * headdim + p[None, :], mask=mask, other=0.0)


@triton.jit
def rank_vector(V, h, r, headdim, p, p_mask, R: tl.constexpr):
    """Rank r's row (1, BLOCK_P) of head h in a per-head (H, R, P) vector."""
    return tl.load(V + (h * R + r) * headdim + p, mask=p_mask, other=0.0)[None, :]


@triton.jit
def _row_rstd(x, eps, headdim):
    """1 / RMS of each row of x (BLOCK_T, BLOCK_P) over the head's headdim values, as a column."""
    return tl.rsqrt(tl.sum(x * x, 1) / headdim + eps)[:, None]


@triton.jit
def _rms_back(dxhat, xhat, rstd, headdim):
    """dx of x̂ = x·rstd: rstd·(dx̂ − x̂·mean(dx̂·x̂)), the row's factors first, then two operations an element."""
    return rstd * dxhat - xhat * (rstd * (tl.sum(dxhat * xhat, 1) / headdim)[:, None])


@triton.jit
def _gate_fwd_kernel(
    Y, Z, MIMO_Z, MIMO_O, NORM_W, OUT, n_tokens, n_heads, headdim, z_row, eps,
    R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, NORM: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_MIMO_Z: tl.constexpr, HAS_MIMO_O: tl.constexpr,
):
    pid_t, h = tl.program_id(0), tl.program_id(1)
    t64, p, p_mask, mask = token_block(pid_t, n_tokens, headdim, BLOCK_T, BLOCK_P)
    if HAS_Z:
        z = tl.load(Z + t64 * z_row + h * headdim + p[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORM != 0:
        w = tl.load(NORM_W + h * headdim + p, mask=p_mask, other=0.0).to(tl.float32)[None, :]
    out = tl.zeros([BLOCK_T, BLOCK_P], dtype=tl.float32)
    for r in tl.static_range(R):
        y = rank_rows(Y, t64, r, h, n_heads, headdim, p, mask, R).to(tl.float32)
        if HAS_Z:
            zr = z
            if HAS_MIMO_Z:
                zr = z * rank_vector(MIMO_Z, h, r, headdim, p, p_mask, R)
            gate, _ = _silu_parts(zr)
        else:
            gate = 1.0
        if NORM == 1:
            o = y * _row_rstd(y, eps, headdim) * w * gate
        elif NORM == 2:
            m = y * gate
            o = m * _row_rstd(m, eps, headdim) * w
        else:
            o = y * gate
        if HAS_MIMO_O:
            o = o * rank_vector(MIMO_O, h, r, headdim, p, p_mask, R)
        out += o
    tl.store(OUT + t64 * (n_heads * headdim) + h * headdim + p[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd_kernel(
    Y, Z, MIMO_Z, MIMO_O, NORM_W, DOUT, DY, DZ, DMIMO_Z, DMIMO_O, DNORM_W,
    n_tokens, n_heads, headdim, z_row, dout_row, eps,
    R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, NORM: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_MIMO_Z: tl.constexpr, HAS_MIMO_O: tl.constexpr,
):
    """dy per rank, dz, and this block's partial sums of d mimo_z, d mimo_o (R, P) and d norm weight (P).
    Each rank's loads follow the last rank's stores: loading them all first (as ranks.py's backward does)
    took R = 4 from 168 to 247 registers and measured 2.6 % slower (H200, 2026-12-05, docs/benchmarks.md)."""
    pid_t, h = tl.program_id(0), tl.program_id(1)
    t64, p, p_mask, mask = token_block(pid_t, n_tokens, headdim, BLOCK_T, BLOCK_P)
    dout = tl.load(DOUT + t64 * dout_row + h * headdim + p[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(Z + t64 * z_row + h * headdim + p[None, :], mask=mask, other=0.0).to(tl.float32)
        dz = tl.zeros([BLOCK_T, BLOCK_P], dtype=tl.float32)
    if NORM != 0:
        w = tl.load(NORM_W + h * headdim + p, mask=p_mask, other=0.0).to(tl.float32)[None, :]
        dw = tl.zeros([BLOCK_P], dtype=tl.float32)
    partial = (pid_t * n_heads + h).to(tl.int64)
    for r in tl.static_range(R):
        y = rank_rows(Y, t64, r, h, n_heads, headdim, p, mask, R).to(tl.float32)
        if HAS_Z:
            zr = z
            if HAS_MIMO_Z:
                mz = rank_vector(MIMO_Z, h, r, headdim, p, p_mask, R)
                zr = z * mz
            gate, dgate = _silu_parts(zr)
        else:
            gate = 1.0
        do = dout
        if HAS_MIMO_O:
            do = dout * rank_vector(MIMO_O, h, r, headdim, p, p_mask, R)
        if NORM == 1:  # o = n·gate, n = ŷ·w, ŷ = y·rstd
            rstd = _row_rstd(y, eps, headdim)
            yhat = y * rstd
            n = yhat * w
            o = n * gate
            dn = do * gate
            dw += tl.sum(dn * yhat, 0)
            dyhat = dn * w
            dy = _rms_back(dyhat, yhat, rstd, headdim)
            dgated = do * n
        elif NORM == 2:  # o = m̂·w, m̂ = m·rstd, m = y·gate
            m = y * gate
            rstd = _row_rstd(m, eps, headdim)
            mhat = m * rstd
            o = mhat * w
            dw += tl.sum(do * mhat, 0)
            dmhat = do * w
            dm = _rms_back(dmhat, mhat, rstd, headdim)
            dy = dm * gate
            dgated = dm * y
        else:
            o = y * gate
            dy = do * gate
            dgated = do * y
        tl.store(DY + (t64 * R + r) * (n_heads * headdim) + h * headdim + p[None, :], dy.to(DY.dtype.element_ty),
                 mask=mask)
        if HAS_MIMO_O:
            tl.store(DMIMO_O + (partial * R + r) * headdim + p, tl.sum(dout * o, 0), mask=p_mask)
        if HAS_Z:
            dzr = dgated * dgate
            if HAS_MIMO_Z:
                tl.store(DMIMO_Z + (partial * R + r) * headdim + p, tl.sum(dzr * z, 0), mask=p_mask)
                dz += dzr * mz
            else:
                dz += dzr
    if HAS_Z:
        tl.store(DZ + t64 * (n_heads * headdim) + h * headdim + p[None, :], dz.to(DZ.dtype.element_ty), mask=mask)
    if NORM != 0:
        tl.store(DNORM_W + partial * headdim + p, dw, mask=p_mask)


@torch.library.custom_op("hybridlm::gated_output_fwd", mutates_args=())
def gated_output_fwd(y: Tensor, z: Tensor | None, mimo_z: Tensor | None, mimo_o: Tensor | None,
                     norm_weight: Tensor | None, out_norm: str, eps: float) -> Tensor:
    """y (T, R, H, P), z (T, H, P) or None, mimo_z / mimo_o (H, R, P) or None, norm_weight (H·P) or
    None -> out (T, H, P) in y's dtype."""
    T, R, H, P = y.shape
    y, z = y.contiguous(), _rows_of_heads(z, P)
    out = torch.empty(T, H, P, device=y.device, dtype=y.dtype)
    block_t, warps = token_tiling(BLOCK_T)
    if T:
        _gate_fwd_kernel[(triton.cdiv(T, block_t), H)](
            y, _or(z, y), _or(mimo_z, y), _or(mimo_o, y), _or(norm_weight, y), out, T, H, P,
            z.stride(0) if z is not None else 0, eps, **_constants(R, P, out_norm, z, mimo_z, mimo_o, block_t),
            num_warps=warps)
    return out


@gated_output_fwd.register_fake
def _(y, z, mimo_z, mimo_o, norm_weight, out_norm, eps):
    T, R, H, P = y.shape
    return y.new_empty(T, H, P)


@torch.library.custom_op("hybridlm::gated_output_bwd", mutates_args=())
def gated_output_bwd(y: Tensor, z: Tensor | None, mimo_z: Tensor | None, mimo_o: Tensor | None,
                     norm_weight: Tensor | None, dout: Tensor, out_norm: str, eps: float) -> list[Tensor]:
    """[dy, dz, d mimo_z, d mimo_o, d norm_weight]; the gradient of an absent input is an empty
    placeholder (op schemas cannot return None)."""
    T, R, H, P = y.shape
    y, z = y.contiguous(), _rows_of_heads(z, P)
    dout = dout if dout.stride(-1) == 1 and dout.stride(1) == P else dout.contiguous()
    block_t, warps = token_tiling(BLOCK_T)
    n_blocks = triton.cdiv(T, block_t)
    f32 = dict(device=y.device, dtype=torch.float32)
    dy = torch.empty_like(y)
    dz = torch.empty(T, H, P, device=y.device, dtype=z.dtype) if z is not None else None
    # every (block, head) program writes its partials whole: no zero fill (T = 0 sums no blocks)
    dmimo_z = torch.empty(n_blocks, H, R, P, **f32) if mimo_z is not None and z is not None else None
    dmimo_o = torch.empty(n_blocks, H, R, P, **f32) if mimo_o is not None else None
    dnorm = torch.empty(n_blocks, H, P, **f32) if out_norm != "none" else None
    if T:
        _gate_bwd_kernel[(n_blocks, H)](
            y, _or(z, y), _or(mimo_z, y), _or(mimo_o, y), _or(norm_weight, y), dout, dy, _or(dz, y),
            _or(dmimo_z, y), _or(dmimo_o, y), _or(dnorm, y), T, H, P,
            z.stride(0) if z is not None else 0, dout.stride(0), eps,
            **_constants(R, P, out_norm, z, mimo_z, mimo_o, block_t), num_warps=warps)
    return [dy, dz if dz is not None else _absent(y),
            dmimo_z.sum(0).to(mimo_z.dtype) if dmimo_z is not None else _absent(y),
            dmimo_o.sum(0).to(mimo_o.dtype) if dmimo_o is not None else _absent(y),
            dnorm.sum(0).flatten().to(norm_weight.dtype) if dnorm is not None and norm_weight is not None
            else _absent(y)]


@gated_output_bwd.register_fake
def _(y, z, mimo_z, mimo_o, norm_weight, dout, out_norm, eps):
    has_norm = out_norm != "none" and norm_weight is not None
    return [torch.empty_like(y, memory_format=torch.contiguous_format),
            z.new_empty(z.shape) if z is not None else _absent(y),
            mimo_z.new_empty(mimo_z.shape) if mimo_z is not None and z is not None else _absent(y),
            mimo_o.new_empty(mimo_o.shape) if mimo_o is not None else _absent(y),
            norm_weight.new_empty(norm_weight.numel()) if has_norm else _absent(y)]


def _setup_context(ctx, inputs, output):
    y, z, mimo_z, mimo_o, norm_weight, out_norm, eps = inputs
    ctx.save_for_backward(y, z, mimo_z, mimo_o, norm_weight)
    ctx.out_norm, ctx.eps = out_norm, eps


def _backward(ctx, dout: Tensor):
    y, z, mimo_z, mimo_o, norm_weight = ctx.saved_tensors
    grads = gated_output_bwd(y, z, mimo_z, mimo_o, norm_weight, dout, ctx.out_norm, ctx.eps)
    present = (True, z is not None, mimo_z is not None and z is not None, mimo_o is not None,
               ctx.out_norm != "none" and norm_weight is not None)
    return (*(g if p else None for g, p in zip(grads, present)), None, None)


gated_output_fwd.register_autograd(_backward, setup_context=_setup_context)


def _absent(like: Tensor) -> Tensor:
    """Stands for the gradient of an absent input (op schemas cannot return None); a fresh tensor
    each time, since custom-op outputs may not alias one another."""
    return like.new_empty(0)


def _rows_of_heads(z: Tensor | None, P: int) -> Tensor | None:
    """z as the kernels read it: unit stride along P and heads P apart."""
    if z is not None and (z.stride(-1) != 1 or z.stride(1) != P):
        return z.contiguous()
    return z


def _or(t: Tensor | None, fallback: Tensor) -> Tensor:
    """A pointer argument the kernel does not read (its flag is off)."""
    return t if t is not None else fallback


def _constants(R: int, P: int, out_norm: str, z, mimo_z, mimo_o, block_t: int) -> dict:
    return dict(R=R, BLOCK_T=block_t, BLOCK_P=max(16, triton.next_power_of_2(P)), NORM=FUSED_NORMS[out_norm],
                HAS_Z=z is not None, HAS_MIMO_Z=mimo_z is not None, HAS_MIMO_O=mimo_o is not None)
