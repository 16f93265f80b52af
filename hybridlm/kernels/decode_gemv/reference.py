"""The decode GEMVs in plain PyTorch: the reference every backend is held to, each op rounded to the
inputs' dtype as the blocks compute it (the residual add and RMSNorm as
:func:`hybridlm.kernels.rmsnorm.reference.add_rms_norm`, then ``F.linear``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridlm.kernels.rmsnorm.reference import add_rms_norm


def gemv(x: Tensor, w: Tensor) -> Tensor:
    """x (..., K), w (N, K) -> x wᵀ (..., N): a plain projection (out_proj, w2, wo)."""
    return F.linear(x, w)


def silu_mul_gemv(x: Tensor, w1: Tensor, w3: Tensor) -> Tensor:
    """x (..., d_model), w1 and w3 (hidden, d_model) -> silu(x w1ᵀ) * (x w3ᵀ) (..., hidden)."""
    return F.silu(F.linear(x, w1)) * F.linear(x, w3)


def norm_gemv(h: Tensor, residual: Tensor | None, norm_weight: Tensor, eps: float, w: Tensor,
              w_up: Tensor | None = None, stacked: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """stream = h + residual, x = rms_norm(stream) in w's dtype, then (x wᵀ, or silu(x wᵀ) * (x w_upᵀ)
    with ``w_up``, or x wᵀ, x w2ᵀ, x w3ᵀ side by side with ``stacked = (w2, w3)``; the stream)."""
    x, stream = add_rms_norm(h, residual, norm_weight, eps, w.dtype)
    if stacked is not None:
        return torch.cat([F.linear(x, t) for t in (w, *stacked)], dim=-1), stream
    return (F.linear(x, w) if w_up is None else silu_mul_gemv(x, w, w_up)), stream
