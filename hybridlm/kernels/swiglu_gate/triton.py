"""SwiGLU's gate as one Triton kernel, in place: ``gate <- silu(gate) * value``.

One pass over the two (tokens, hidden) tensors instead of two kernels. Roundings are the
reference's (hybridlm/kernels/swiglu_gate/reference.py): silu is computed in fp32 and rounded to
the gate's dtype, then the product in fp32, rounded again. A ``torch.library`` custom op that
mutates ``gate`` (opaque to ``torch.compile``, capturable in a CUDA graph); no backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.mamba3.triton.interpreter_compat import device_type_reason, one_dtype_reason

BLOCK = 1024
DTYPES = (torch.float32, torch.bfloat16, torch.float16)



@triton.jit
def _silu_mul_kernel(GATE, VALUE, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(VALUE + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(GATE.dtype.element_ty).to(tl.float32)
    tl.store(GATE + offs, (silu * v).to(GATE.dtype.element_ty), mask=mask)


@torch.library.custom_op("hybridlm::silu_mul_", mutates_args=("gate",))
def silu_mul_op(gate: Tensor, value: Tensor) -> None:
    """gate, value (..., hidden), same shape and dtype, contiguous: gate <- silu(gate) * value."""
    n = gate.numel()
    if n:
        _silu_mul_kernel[(triton.cdiv(n, BLOCK),)](gate, value, n, BLOCK=BLOCK)


def silu_mul_(gate: Tensor, value: Tensor) -> Tensor:
    """As :func:`hybridlm.kernels.swiglu_gate.reference.silu_mul_`, in one kernel."""
    silu_mul_op(gate, value.contiguous())
    return gate


def unsupported_reason(device: torch.device, dtypes: tuple[torch.dtype, ...], contiguous: bool) -> str | None:
    """Why the kernel cannot take these inputs (plain values); None when it can."""
    return (device_type_reason(device, "the Triton SwiGLU gate kernel") or one_dtype_reason(dtypes, DTYPES)
            or (None if contiguous else "a gate that is not contiguous (it is written in place)"))
