"""CuTe-DSL kernels (nvidia-cutlass-dsl 4.8.1, Hopper and newer): the Mamba-3 decode step.

Importing this package imports nothing from the CuTe DSL; :func:`import_error` says whether it
can run, :func:`unsupported_reason` which inputs the kernel takes, and
:func:`mamba3_decode_step` compiles one kernel per layer configuration (the batch size stays
symbolic) and runs it on the current CUDA stream, so a CUDA graph can capture it.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from hybridlm.kernels.mamba3.cute.layout import VEC, row_groups
from hybridlm.kernels.hopper import hopper_reason
from hybridlm.kernels.mamba3.contract import DecodeLayout, DecodeParams, Mamba3State
from hybridlm.kernels.mamba3.step_output import OUT_MODES, allocate_step_output, finish_step_output



@functools.lru_cache(maxsize=1)
def import_error() -> str | None:
    """Why the CuTe DSL cannot run here (None when it can)."""
    try:
        import cutlass.cute  # noqa: F401
        import tvm_ffi  # noqa: F401  (the kernels take torch tensors through tvm-ffi)
    except Exception as e:  # a broken CUDA install raises more than ImportError
        return (f"the CuTe DSL does not import ({type(e).__name__}: {e}); "
                "install nvidia-cutlass-dsl==4.8.1 and apache-tvm-ffi")
    return None


def unsupported_reason(proj: Tensor, state: Mamba3State, layout: DecodeLayout) -> str | None:
    """Why the CuTe step cannot take these inputs (None when it can)."""
    device = hopper_reason(proj, "the CuTe step")
    if device:
        return device
    if state.ssm.dtype != torch.float32 or state.angle.dtype != torch.float32:
        return f"state dtype {state.ssm.dtype}; the CuTe step keeps an fp32 state"
    if proj.dtype not in _DTYPES or state.k.dtype not in _DTYPES or state.v.dtype not in _DTYPES:
        return f"dtypes {proj.dtype}/{state.k.dtype}; the CuTe step takes bf16, fp16 or fp32"
    N = layout.d_state
    lanes = N // VEC
    if N % VEC or lanes & (lanes - 1) or lanes > 32:
        return f"d_state {N}; the CuTe step takes 8·2^k up to 256"
    if row_groups(layout.headdim, N) is None:
        return f"headdim {layout.headdim} with d_state {N}; no split of the state rows fits"
    if layout.out_norm not in OUT_MODES:
        return f"out_norm {layout.out_norm!r}"
    return import_error()


_DTYPES = {torch.bfloat16: "BFloat16", torch.float16: "Float16", torch.float32: "Float32"}


@functools.lru_cache(maxsize=None)
def _compiled(layout: DecodeLayout, proj_dtype: torch.dtype, kv_dtype: torch.dtype, norm_dtype: torch.dtype,
              has_bias: bool, has_mimo: bool, has_norm: bool):
    """One compiled kernel per layer configuration; the batch size is symbolic."""
    from hybridlm.kernels.mamba3.cute.step import Mamba3DecodeStep, compile_step

    op = Mamba3DecodeStep(
        nheads=layout.nheads, headdim=layout.headdim, ngroups=layout.ngroups, rank=layout.rank,
        d_state=layout.d_state, n_angles=layout.n_angles, interleaved=layout.pair_layout == "interleaved",
        discretization=layout.discretization, heavy_tail=layout.a_activation == "heavy_tail",
        A_floor=float(layout.A_floor), bc_eps=float(layout.bc_norm_eps), out_eps=float(layout.norm_eps),
        out_mode=OUT_MODES[layout.out_norm], row_groups=row_groups(layout.headdim, layout.d_state, layout.rank),
        mimo=has_mimo)
    return compile_step(op, proj_dtype=_DTYPES[proj_dtype], kv_dtype=_DTYPES[kv_dtype],
                        norm_dtype=_DTYPES[norm_dtype], has_bias=has_bias, has_norm=has_norm)


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.float().contiguous()


def mamba3_decode_step(proj: Tensor, state: Mamba3State, params: DecodeParams, layout: DecodeLayout) -> Tensor:
    """As :func:`hybridlm.kernels.mamba3.oracle.mamba3_decode_step`; ``state`` is updated in place."""
    proj = proj.contiguous()
    out_mode = OUT_MODES[layout.out_norm]
    has_norm = params.norm_weight is not None and out_mode in (1, 2)
    norm_dtype = params.B_norm.dtype
    kernel = _compiled(layout, proj.dtype, state.k.dtype, norm_dtype, params.B_bias is not None,
                       params.mimo_x is not None, has_norm)
    out = allocate_step_output(proj, layout)
    kernel(proj, state.angle if layout.n_angles else None, state.ssm, state.k, state.v, out,
           _f32(params.dt_bias), params.B_norm.contiguous(), params.C_norm.to(norm_dtype).contiguous(),
           _f32(params.B_bias), _f32(params.C_bias), _f32(params.D), _f32(params.mimo_x), _f32(params.mimo_z),
           _f32(params.mimo_o), params.norm_weight.to(norm_dtype).contiguous() if has_norm else None)
    return finish_step_output(out, proj, params, layout)
