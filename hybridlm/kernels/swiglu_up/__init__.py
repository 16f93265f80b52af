"""SwiGLU's up projection and gate in one op at decode sizes: ``silu(x w1ᵀ) * (x w3ᵀ)``.

    hidden = silu_mul_gemv(x, w1.weight, w3.weight)     # then w2(hidden)

Backends (kind ``swiglu_up``, op ``silu_mul_gemv``), chosen by :mod:`hybridlm.kernels.registry`:
``reference`` (``reference.py``: two GEMMs and the gate, every device, dtype and size) and
``triton`` (``triton.py``: one kernel for inputs of at most ``MAX_ROWS`` rows; ``auto`` on CUDA, on
the CPU under ``TRITON_INTERPRET=1`` when asked for by name). No autograd: the SwiGLU block calls it
only while autograd does not record, and only for decode-sized inputs (:func:`takes`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from hybridlm.kernels import registry
from hybridlm.kernels.swiglu_up import reference

KIND = "swiglu_up"
OP = "silu_mul_gemv"
MAX_ROWS = 16  # rows the fused kernel takes (one tensor-core tile): decode steps up to batch 16

registry.register_reference_and_triton(KIND, OP, reference.silu_mul_gemv, "hybridlm.kernels.swiglu_up.triton",
                                       "silu_mul_gemv")


def backend_for(x: Tensor, w1: Tensor, w3: Tensor, backend: str | None = None) -> str:
    """The backend that would run these inputs: ``reference`` for more than ``MAX_ROWS`` rows (a
    prefill or training batch: cuBLAS GEMMs are the right tool there, no warning), else the registry's."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows > MAX_ROWS:
        return "reference"
    return registry.choose(KIND, OP, backend, x.device.type, x.device.index, (x.dtype, w1.dtype, w3.dtype), rows)


def silu_mul_gemv(x: Tensor, w1: Tensor, w3: Tensor, *, backend: str | None = None) -> Tensor:
    """silu(x w1ᵀ) * (x w3ᵀ): x (..., d_model), w1 and w3 (hidden, d_model) -> (..., hidden).
    ``backend``: a registered ``swiglu_up`` backend, None or ``"auto"``."""
    if w1.shape != w3.shape or x.shape[-1] != w1.shape[-1]:
        raise ValueError(f"silu_mul_gemv: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, w3 {tuple(w3.shape)} "
                         "do not fit (w1 and w3 (hidden, d_model), x (..., d_model))")
    if torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad or w3.requires_grad):
        return reference.silu_mul_gemv(x, w1, w3)
    return registry.implementation(KIND, backend_for(x, w1, w3, backend), OP)(x, w1, w3)


__all__ = ["silu_mul_gemv", "backend_for", "KIND", "OP", "MAX_ROWS"]
