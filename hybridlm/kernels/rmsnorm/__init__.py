"""Residual add + RMSNorm in one op: the layer boundary of the inference path.

    normed, stream = add_rms_norm(h, residual, weight, eps, out_dtype=torch.bfloat16)

``stream = h + residual`` in h's dtype (``residual=None``: no add, ``stream`` is ``h``), and
``normed`` is :func:`hybridlm.kernels.norms.rms_norm` of it in ``out_dtype``: the next block's
input. In a pre-norm model every block ends with an add and the next begins with a norm, so the
inference path (``HybridLM.features(..., fused_norms=True)``) runs one such op per block boundary
instead of a residual add and RMSNorm's seven torch ops.

Backends (kind ``rmsnorm``, op ``add_rms_norm``), chosen by :mod:`hybridlm.kernels.registry`:
``reference`` (``reference.py``: plain PyTorch on :func:`~hybridlm.kernels.norms.rms_norm`; every
device and dtype; differentiable) and ``triton`` (``triton.py``: one program per row; ``auto`` on
CUDA, on the CPU under ``TRITON_INTERPRET=1`` when asked for by name; fp64 and rows wider than
16K elements go to the reference with one warning). The Triton op has no backward, so while
autograd records (grad mode on and an input that requires grad) the reference runs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from hybridlm.kernels import registry
from hybridlm.kernels.rmsnorm import reference

KIND = "rmsnorm"
OP = "add_rms_norm"

registry.register_reference_and_triton(KIND, OP, reference.add_rms_norm, "hybridlm.kernels.rmsnorm.triton",
                                       "add_rms_norm")


def add_rms_norm(h: Tensor, residual: Tensor | None, weight: Tensor, eps: float, *,
                 out_dtype: torch.dtype | None = None, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """h, residual (..., D); weight (D,) -> (normed in ``out_dtype`` (default: h's), stream in h's dtype).

    ``backend``: a registered ``rmsnorm`` backend name, None or ``"auto"`` for the registry's choice.
    """
    if residual is not None and residual.shape != h.shape:
        raise ValueError(f"add_rms_norm: residual shape {tuple(residual.shape)} != stream shape {tuple(h.shape)}")
    if weight.shape != h.shape[-1:]:
        raise ValueError(f"add_rms_norm: weight shape {tuple(weight.shape)} != ({h.shape[-1]},), the row width")
    out_dtype = out_dtype or h.dtype
    if registry.records_autograd(h, residual, weight):
        return reference.add_rms_norm(h, residual, weight, eps, out_dtype)
    dtypes = (h.dtype, weight.dtype, out_dtype) + (() if residual is None else (residual.dtype,))
    name = registry.choose(KIND, OP, backend, h.device.type, h.device.index, dtypes, int(h.shape[-1]))
    return registry.implementation(KIND, name, OP)(h, residual, weight, eps, out_dtype)


__all__ = ["add_rms_norm", "KIND", "OP"]
