"""SwiGLU's up projection and gate in plain PyTorch: ``silu(x w1ᵀ) * (x w3ᵀ)``, the reference
every backend is held to (each op rounded to the inputs' dtype, as the SwiGLU block computes it)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def silu_mul_gemv(x: Tensor, w1: Tensor, w3: Tensor) -> Tensor:
    """x (..., d_model), w1 and w3 (hidden, d_model) -> (..., hidden)."""
    return F.silu(F.linear(x, w1)) * F.linear(x, w3)
