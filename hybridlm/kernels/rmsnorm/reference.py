"""Residual add + RMSNorm in plain PyTorch: the reference every other backend is held to.

The norm itself is :func:`hybridlm.kernels.norms.rms_norm`, the one definition of the math; this
adds only the residual add in front of it, rounded exactly as the residual block rounds it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from hybridlm.kernels.norms import rms_norm


def add_rms_norm(h: Tensor, residual: Tensor | None, weight: Tensor, eps: float,
                 out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """stream = h + residual (in h's dtype), then (rms_norm(stream) in ``out_dtype``, stream).

    The same roundings as ``ResidualBlock``: the residual is cast to the stream's dtype before the
    add, the norm is computed in fp32 (fp64 stays), returned in the stream's dtype, then cast to
    ``out_dtype``."""
    stream = h if residual is None else h + residual.to(h.dtype)
    return rms_norm(stream, weight, eps).to(out_dtype), stream
