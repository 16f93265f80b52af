"""Residual add + RMSNorm as one Triton kernel: one program per row reads the stream and the
residual once, writes the new stream and the normed row once.

Roundings are the reference's (hybridlm/kernels/rmsnorm/reference.py): the residual is cast to
the stream's dtype, the sum is rounded to the stream's dtype before it is normed, the norm runs in
fp32 and its result is rounded to the stream's dtype, then to the output dtype. Only the sum of
squares is ordered differently (a tree sum instead of torch's mean). The ops are
``torch.library`` custom ops (opaque to ``torch.compile``, capturable in a CUDA graph); they have
no backward: the entry point (hybridlm/kernels/rmsnorm/__init__.py) sends autograd to the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.mamba3.triton.interpreter_compat import device_type_reason, dtypes_reason
from hybridlm.kernels.pdl import launch_options, let_next_launch, wait_for_previous
from hybridlm.kernels.pdl import usable as pdl_usable

# A row lives in one program's registers; wider rows (d_model > 16K) go to the reference.
MAX_DIM = 16384
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PDL = False  # launched with PDL on Hopper+ (hybridlm/kernels/pdl.py); knob NORM_PDL, off until timed



@triton.jit
def _add_rms_norm_kernel(H, RES, W, STREAM, NORMED, D, eps, HAS_RES: tl.constexpr, BLOCK_D: tl.constexpr,
                         PDL: tl.constexpr):
    let_next_launch(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)  # a weight: no kernel writes it
    wait_for_previous(PDL)
    x = tl.load(H + row * D + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(RES + row * D + cols, mask=mask, other=0.0).to(H.dtype.element_ty)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(H.dtype.element_ty)
        tl.store(STREAM + row * D + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / D + eps)
    y = (xf * rstd * w).to(H.dtype.element_ty).to(NORMED.dtype.element_ty)
    tl.store(NORMED + row * D + cols, y, mask=mask)


def _launch(h: Tensor, residual: Tensor | None, weight: Tensor, eps: float, out_dtype: torch.dtype,
            stream: Tensor | None) -> Tensor:
    D = h.shape[-1]
    normed = torch.empty(h.shape, dtype=out_dtype, device=h.device)
    rows = h.numel() // D if D else 0
    if rows:
        block = triton.next_power_of_2(D)
        pdl_on = PDL and pdl_usable(h.device)
        _add_rms_norm_kernel[(rows,)](
            h, h if residual is None else residual, weight, h if stream is None else stream, normed, D, eps,
            HAS_RES=residual is not None, BLOCK_D=block, PDL=pdl_on, num_warps=4 if block <= 1024 else 8 if block <= 4096 else 16,
            **launch_options(pdl_on))
    return normed


@torch.library.custom_op("hybridlm::add_rms_norm_fwd", mutates_args=())
def add_rms_norm_fwd(h: Tensor, residual: Tensor, weight: Tensor, eps: float,
                     out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """h, residual (..., D) -> (normed (..., D) in ``out_dtype``, stream = h + residual in h's dtype)."""
    h, residual, weight = h.contiguous(), residual.contiguous(), weight.contiguous()
    stream = torch.empty_like(h)
    return _launch(h, residual, weight, eps, out_dtype, stream), stream


@add_rms_norm_fwd.register_fake
def _(h, residual, weight, eps, out_dtype):
    return h.new_empty(h.shape, dtype=out_dtype), torch.empty_like(h, memory_format=torch.contiguous_format)


@torch.library.custom_op("hybridlm::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(h: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> Tensor:
    """h (..., D) -> normed (..., D) in ``out_dtype``."""
    return _launch(h.contiguous(), None, weight.contiguous(), eps, out_dtype, None)


@rms_norm_fwd.register_fake
def _(h, weight, eps, out_dtype):
    return h.new_empty(h.shape, dtype=out_dtype)


def add_rms_norm(h: Tensor, residual: Tensor | None, weight: Tensor, eps: float,
                 out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """As :func:`hybridlm.kernels.rmsnorm.reference.add_rms_norm`, in one kernel."""
    if residual is None:
        return rms_norm_fwd(h, weight, float(eps), out_dtype), h
    return add_rms_norm_fwd(h, residual, weight, float(eps), out_dtype)


def unsupported_reason(device: torch.device, dtypes: tuple[torch.dtype, ...], dim: int) -> str | None:
    """Why the kernel cannot take these inputs (plain values: the device, every dtype involved,
    the row width); None when it can."""
    return (device_type_reason(device, "the Triton RMSNorm kernel") or dtypes_reason(dtypes, DTYPES)
            or (f"rows of {dim} elements (at most {MAX_DIM})" if dim > MAX_DIM else None))
