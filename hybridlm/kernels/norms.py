"""RMSNorm on tensors, computed in fp32 (fp64 stays): the math behind every norm in the model."""
from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def upcast(t: Tensor) -> Tensor:
    """At least float32: bf16/fp16 go to fp32, fp32 and fp64 stay."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def rms_norm(x: Tensor, weight: Tensor | None, eps: float, dims: int = 1) -> Tensor:
    """RMSNorm over the last ``dims`` axes, computed in fp32 (or fp64) and returned in x's dtype."""
    cd = compute_dtype(x)
    xf = x.to(cd)
    axes = tuple(range(-dims, 0))
    out = xf * torch.rsqrt(xf.pow(2).mean(dim=axes, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.to(cd)
    return out.to(x.dtype)
