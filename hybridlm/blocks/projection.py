"""A block's plain output projection (Mamba-3's out_proj, SwiGLU's w2, attention's wo)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from hybridlm.kernels import decode_gemv


def project(layer: nn.Linear, x: Tensor, backend: str | None = None) -> Tensor:
    """``layer(x)``; without autograd through :func:`hybridlm.kernels.decode_gemv.linear`, which sends a
    decode-sized input to the GEMV kernel when ``backend`` is named or ``decode_gemv.PLAIN_GEMVS`` is
    set, and anything else to ``F.linear``. With autograd the module itself runs, so its hooks do
    (FSDP, tensor parallelism)."""
    if torch.is_grad_enabled() or layer.bias is not None:
        return layer(x)
    return decode_gemv.linear(x, layer.weight, backend=backend)
