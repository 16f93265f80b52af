"""RMSNorm as a module (the math lives in hybridlm.kernels.norms.rms_norm)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from hybridlm.kernels.norms import rms_norm
from hybridlm.kernels.rmsnorm import add_rms_norm


class RMSNorm(nn.Module):
    """``y = x / rms(x) * weight`` over the last axis, computed in fp32, returned in x's dtype.

    ``backend``: the ``rmsnorm`` kernel backend of :meth:`add_forward` (None: the registry's ``auto``).
    """

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None, backend: str | None = None):
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_forward(self, h: Tensor, residual: Tensor | None, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The residual add in front of the norm, one fused op: ``stream = h + residual`` (in h's
        dtype; None adds nothing) -> ``(self(stream).to(out_dtype), stream)``."""
        return add_rms_norm(h, residual, self.weight, self.eps, out_dtype=out_dtype, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
