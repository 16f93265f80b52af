"""SwiGLU's gate in plain PyTorch: ``silu(gate) * value``, the reference every backend is held to."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def silu_mul(gate: Tensor, value: Tensor) -> Tensor:
    """silu(gate) * value, each op rounded to the inputs' dtype (as the SwiGLU block computes it)."""
    return F.silu(gate) * value


def silu_mul_(gate: Tensor, value: Tensor) -> Tensor:
    """The same values written into ``gate``'s buffer (no (tokens, hidden) tensor allocated); no autograd."""
    return F.silu(gate, inplace=True).mul_(value)
