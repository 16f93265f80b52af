"""RMSNorm as a module (the math lives in hybridlm.kernels.norms.rms_norm)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from hybridlm.kernels.norms import rms_norm


class RMSNorm(nn.Module):
    """``y = x / rms(x) * weight`` over the last axis, computed in fp32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
