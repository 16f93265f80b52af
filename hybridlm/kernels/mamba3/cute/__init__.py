"""CuTe-DSL kernels (nvidia-cutlass-dsl 4.8.1, Hopper and newer): the Mamba-3 decode step.

Importing this package imports nothing from the CuTe DSL; :func:`import_error` says whether it
can run, :func:`unsupported_reason` which inputs the kernel takes, and
:func:`mamba3_decode_step` compiles one kernel per layer configuration (the batch size stays
symbolic) and runs it on the current CUDA stream, so a CUDA graph can capture it. The support
check and the compile take their configuration from one function, :func:`kernel_config`, so a
layer the check accepts is one the compile can build.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from hybridlm.kernels.hopper import hopper_reason
from hybridlm.kernels.mamba3.contract import DecodeLayout, DecodeParams, Mamba3State
from hybridlm.kernels.mamba3.cute.layout import VEC, default_min_blocks, row_groups
from hybridlm.kernels.mamba3.shared import fp32_contiguous, fp32_state_reason
from hybridlm.kernels.mamba3.step_output import OUT_MODES, allocate_step_output, finish_step_output
from hybridlm.kernels.mamba3.tuning import KernelTuning, kernel_tuning

_DTYPES = {torch.bfloat16: "BFloat16", torch.float16: "Float16", torch.float32: "Float32"}


class StepConfig(NamedTuple):
    """What one compiled CuTe step is built from (besides its parameters' presence): the layer,
    the in_proj row's and the k/v cache's dtypes, and the tiling. Hashable: the compile cache's key."""

    layout: DecodeLayout
    proj_dtype: torch.dtype
    kv_dtype: torch.dtype
    row_groups: int  # state rows worked on side by side (cute/layout.py)
    min_blocks: int  # CTAs per SM the register budget must allow
    prerotate: bool = False  # B and C rotated once per CTA (KernelTuning.cute_prerotate)

    @property
    def threads(self) -> int:
        return self.row_groups * self.layout.d_state // VEC


def kernel_config(layout: DecodeLayout, proj_dtype: torch.dtype, kv_dtype: torch.dtype,
                  tuning: KernelTuning | None = None) -> StepConfig | str:
    """The configuration the CuTe step compiles for this layer and these dtypes under ``tuning``
    (default: the one in force), or why it cannot take them (a reason string). Device-independent:
    the support check and the compile both call it."""
    return _kernel_config(layout, proj_dtype, kv_dtype, tuning or kernel_tuning())


@functools.lru_cache(maxsize=None)
def _kernel_config(layout: DecodeLayout, proj_dtype: torch.dtype, kv_dtype: torch.dtype,
                   tuning: KernelTuning) -> StepConfig | str:
    if proj_dtype not in _DTYPES or kv_dtype not in _DTYPES:
        return f"dtypes {proj_dtype}/{kv_dtype}; the CuTe step takes bf16, fp16 or fp32"
    N = layout.d_state
    lanes = N // VEC
    if N % VEC or lanes & (lanes - 1) or lanes > 32:
        return f"d_state {N}; the CuTe step takes 8·2^k up to 256"
    if layout.out_norm not in OUT_MODES:
        return f"out_norm {layout.out_norm!r}"
    groups = row_groups(layout.headdim, N, tuning.cute_max_rows)
    if groups is None:
        return (f"headdim {layout.headdim} with d_state {N} at rank {layout.rank}; "
                "no split of the state rows fits")
    threads = groups * lanes
    min_blocks = tuning.cute_min_blocks or default_min_blocks(threads)
    # the H100 A/B (docs/benchmarks.md, session 25): MIMO's step 1.3-3 % faster rotated once per CTA, SISO's not
    prerotate = layout.rank > 1 if tuning.cute_prerotate is None else bool(tuning.cute_prerotate)
    return StepConfig(layout, proj_dtype, kv_dtype, groups, min_blocks, prerotate)


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
    reason = hopper_reason(proj, "the CuTe step") or fp32_state_reason(state, "the CuTe step")
    if reason:
        return reason
    if state.v.dtype != state.k.dtype:
        return f"k cache {state.k.dtype} and v cache {state.v.dtype}; the CuTe step takes one dtype for both"
    config = kernel_config(layout, proj.dtype, state.k.dtype)
    if isinstance(config, str):
        return config
    return import_error()


@functools.lru_cache(maxsize=None)
def _compiled(config: StepConfig, norm_dtype: torch.dtype, has_bias: bool, has_mimo: bool, has_norm: bool):
    """One compiled kernel per configuration; the batch size is symbolic."""
    from hybridlm.kernels.mamba3.cute.step import compile_step

    return compile_step(build_op(config, has_mimo), proj_dtype=_DTYPES[config.proj_dtype],
                        kv_dtype=_DTYPES[config.kv_dtype], norm_dtype=_DTYPES[norm_dtype], has_bias=has_bias,
                        has_norm=has_norm)


def build_op(config: StepConfig, has_mimo: bool):
    """The kernel object for ``config`` (imports the CuTe DSL); in_proj's columns from the contract."""
    from hybridlm.kernels.mamba3.cute.step import Mamba3DecodeStep

    layout = config.layout
    in_proj = layout.in_proj
    return Mamba3DecodeStep(
        nheads=layout.nheads, headdim=layout.headdim, ngroups=layout.ngroups, rank=layout.rank,
        d_state=layout.d_state, n_angles=layout.n_angles, interleaved=layout.pair_layout == "interleaved",
        discretization=layout.discretization, heavy_tail=layout.a_activation == "heavy_tail",
        A_floor=float(layout.A_floor), bc_eps=float(layout.bc_norm_eps), out_eps=float(layout.norm_eps),
        out_mode=OUT_MODES[layout.out_norm], row_groups=config.row_groups, min_blocks=config.min_blocks,
        mimo=has_mimo, columns={name: start for name, (start, _) in in_proj.offsets().items()},
        width=in_proj.width, prerotate=config.prerotate)


def mamba3_decode_step(proj: Tensor, state: Mamba3State, params: DecodeParams, layout: DecodeLayout) -> Tensor:
    """As :func:`hybridlm.kernels.mamba3.oracle.mamba3_decode_step`; ``state`` is updated in place."""
    proj = proj.contiguous()
    out_mode = OUT_MODES[layout.out_norm]
    has_norm = params.norm_weight is not None and out_mode in (1, 2)
    norm_dtype = params.B_norm.dtype
    config = kernel_config(layout, proj.dtype, state.k.dtype)
    if isinstance(config, str):
        raise ValueError(f"the CuTe step cannot take this layer: {config}")
    kernel = _compiled(config, norm_dtype, params.B_bias is not None, params.mimo_x is not None, has_norm)
    out = allocate_step_output(proj, layout)
    f32 = fp32_contiguous
    kernel(proj, state.angle if layout.n_angles else None, state.ssm, state.k, state.v, out,
           f32(params.dt_bias), params.B_norm.contiguous(), params.C_norm.to(norm_dtype).contiguous(),
           f32(params.B_bias), f32(params.C_bias), f32(params.D), f32(params.mimo_x), f32(params.mimo_z),
           f32(params.mimo_o), params.norm_weight.to(norm_dtype).contiguous() if has_norm else None)
    return finish_step_output(out, proj, params, layout)
